"""The one audio front end: decode -> mono -> 32 kHz -> pad/trim to 10 s -> log-mel (dB).

Shard building, training-time loading and inference all go through this module, so a clip gives
the same features wherever it is seen. Settings follow the DCLS-Audio reference
(docs/method.md): 32 kHz, n_fft 1024, hann 1024, hop 320, centred reflect padding,
power 2, 128 HTK mel bins 50-14000 Hz without area normalisation, 10*log10(max(x, 1e-10)),
giving (128, 1001) for a 10 s clip. Normalisation is a separate step applied at load time.
"""

from __future__ import annotations

import dataclasses
import functools
import re
import shutil
import subprocess
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import soundfile as sf
import soxr
import torch

__all__ = [
    "FeatureConfig",
    "Normalization",
    "REFERENCE_NORMALIZATION",
    "AudioDecodeError",
    "decode_audio",
    "decode_mono",
    "downmix",
    "resample",
    "load_audio",
    "stream_audio",
    "stream_pcm",
    "to_mono_resampled",
    "pad_or_trim",
    "mel_filterbank",
    "used_bins",
    "LogMel",
    "compute_logmel",
    "logmel_from_file",
]


@dataclass(frozen=True)
class FeatureConfig:
    """Front-end settings. Stored in every shard manifest and every checkpoint."""

    sample_rate: int = 32000
    clip_seconds: float = 10.0
    n_fft: int = 1024
    win_length: int = 1024
    hop_length: int = 320
    n_mels: int = 128
    f_min: float = 50.0
    f_max: float = 14000.0
    amin: float = 1e-10

    @property
    def clip_samples(self) -> int:
        return int(round(self.sample_rate * self.clip_seconds))

    @property
    def num_frames(self) -> int:
        """Frames of a padded clip with centred STFT: 1 + samples // hop (1001 by default)."""
        return 1 + self.clip_samples // self.hop_length

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "FeatureConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown feature settings {sorted(unknown)}")
        return cls(**d)


@dataclass(frozen=True)
class Normalization:
    """Per-dataset log-mel statistics: x -> (x - mean) / std. Defaults are the reference's."""

    mean: float = -18.2696
    std: float = 30.5735

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std

    def apply_(self, x: torch.Tensor) -> torch.Tensor:
        """``apply`` in place, same values; for a float tensor nothing else holds (the loader's)."""
        return x.sub_(self.mean).div_(self.std)

    def to_dict(self) -> dict[str, float]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Normalization":
        return cls(mean=float(d["mean"]), std=float(d["std"]))


# The reference's statistics (AUDIOSET_DEFAULT_MEAN / _STD of DCLS-Audio), which its published
# weights expect and our configs use by default (data.normalization=reference).
REFERENCE_NORMALIZATION = Normalization()


class AudioDecodeError(RuntimeError):
    """A file could not be decoded. ``str(err)`` is one line, ``"<path>: <reason>"``.

    The fields carry what callers act on, so nothing parses the message: ``path`` (the file, or
    a name such as ``"<array>"``), ``reason`` (the cause, one line) and ``kind``: ``"missing"``
    (no such file), ``"empty"`` (0 bytes, or no samples) or ``"unreadable"`` (corrupt, an
    unsupported format, no decoder for it, NaN or infinite samples).
    """

    KINDS = ("missing", "empty", "unreadable")

    def __init__(self, path: str | Path, kind: str, reason: str):
        if kind not in self.KINDS:
            raise ValueError(f"AudioDecodeError kind must be one of {self.KINDS}, not {kind!r}")
        super().__init__(f"{path}: {reason}")
        self.path, self.kind, self.reason = str(path), kind, reason

    def __reduce__(self):  # pickles (e.g. across processes) with its fields
        return type(self), (self.path, self.kind, self.reason)


# Containers libsndfile does not read; they go through ffmpeg when it is installed.
_FFMPEG_SUFFIXES = {".m4a", ".mp4", ".aac", ".opus", ".webm", ".mkv", ".wma"}


def _decode_ffmpeg(path: Path) -> tuple[np.ndarray, int]:
    """Decode through ffmpeg: mono float32 at the file's native rate (soxr resamples later)."""
    ffmpeg = shutil.which("ffmpeg")
    if ffmpeg is None:
        raise AudioDecodeError(
            path, "unreadable", f"cannot decode {path.suffix or 'this'} audio without ffmpeg "
            "(install it, e.g. `apt-get install ffmpeg`, or convert the file to flac/wav)"
        )
    proc = subprocess.run(
        [ffmpeg, "-nostdin", "-hide_banner", "-i", str(path), "-map", "0:a:0", "-ac", "1",
         "-f", "f32le", "-acodec", "pcm_f32le", "-"],
        capture_output=True,
    )
    log = proc.stderr.decode(errors="replace")
    if proc.returncode != 0:
        lines = [ln for ln in log.strip().splitlines() if ln.strip()]
        raise AudioDecodeError(path, "unreadable", f"ffmpeg failed: {lines[-1] if lines else 'unknown error'}")
    # The input stream line, e.g. "Stream #0:0(und): Audio: aac (LC), 44100 Hz, stereo, fltp".
    m = re.search(r"Stream #0:\d+.*?Audio:.*?(\d+) Hz", log)
    if m is None:
        raise AudioDecodeError(path, "unreadable", "ffmpeg found no audio stream")
    return np.frombuffer(proc.stdout, dtype=np.float32).copy(), int(m.group(1))


def _check_audio_file(path: str | Path) -> Path:
    """The checks every decode path starts with: the file exists and is not empty."""
    path = Path(path)
    if not path.is_file():
        raise AudioDecodeError(path, "missing", "no such file")
    if path.stat().st_size == 0:
        raise AudioDecodeError(path, "empty", "empty file (0 bytes)")
    return path


def _needs_ffmpeg(path: Path) -> bool:
    return path.suffix.lower() in _FFMPEG_SUFFIXES


def error_line(err: BaseException) -> str:
    """The last line of an error's message (where libraries put the cause), or its type name."""
    text = str(err).strip()
    return text.splitlines()[-1] if text else type(err).__name__


def _unreadable(path: Path, err: BaseException) -> AudioDecodeError:
    """One-line error for a file libsndfile rejects (it raises several exception types)."""
    return AudioDecodeError(path, "unreadable", f"unreadable audio ({error_line(err)})")


def decode_audio(path: str | Path) -> tuple[np.ndarray, int]:
    """Decode a file to float32 samples at its native rate.

    Returns ``(samples, sample_rate)`` with samples of shape (N,) or (N, channels).
    Raises AudioDecodeError (one line, naming the file) for a missing, empty or corrupt file.
    """
    path = _check_audio_file(path)
    if _needs_ffmpeg(path):
        data, sr = _decode_ffmpeg(path)
    else:
        try:
            data, sr = sf.read(str(path), dtype="float32", always_2d=False)
        except Exception as err:  # libsndfile reports corrupt/unknown files as several types
            raise _unreadable(path, err) from None
    _check_samples(path, data)
    return data, int(sr)


def _check_samples(path: Path, data: np.ndarray) -> None:
    if data.size == 0:
        raise AudioDecodeError(path, "empty", "no audio samples")
    _check_finite(path, data)


def _check_finite(path: Path, data: np.ndarray) -> None:
    if data.dtype.kind == "f" and not np.all(np.isfinite(data)):
        raise AudioDecodeError(path, "unreadable", "audio contains NaN or infinite samples")


# PCM subtypes whose samples fit in int16 exactly (libsndfile scales 8-bit ones by 256).
_INT16_SUBTYPES = {"PCM_16", "PCM_S8", "PCM_U8"}


def decode_mono(path: str | Path) -> tuple[np.ndarray, int]:
    """Decode a file and downmix it: ``(mono float32 (N,), native sample rate)``.

    Equal, bit for bit, to ``downmix(decode_audio(path)[0])``, and faster for 8/16-bit PCM
    (most downloaded AudioSet FLAC/WAV): those are read as int16 and summed in integers, so the
    float32 stereo array (3.5 MB for 10 s at 44.1 kHz) is never made. Integer sums of up to 256
    channels are exact in float32 and the 1/32768 scale is a power of two, hence the equality.
    """
    if _needs_ffmpeg(Path(path)):
        return decode_audio(path)  # ffmpeg already downmixes
    path = _check_audio_file(path)
    try:
        with sf.SoundFile(str(path)) as f:
            sr = int(f.samplerate)
            if f.subtype in _INT16_SUBTYPES and f.channels <= 256:
                ints = f.read(dtype="int16", always_2d=True)  # (N, channels)
            else:
                ints, data = None, f.read(dtype="float32", always_2d=False)
    except Exception as err:  # libsndfile reports corrupt/unknown files as several types
        raise _unreadable(path, err) from None
    if ints is None:
        _check_samples(path, data)
        return downmix(data), sr
    _check_samples(path, ints)
    mono = downmix(ints)  # exact integer sums, divided by the channel count
    mono *= np.float32(1.0 / 32768.0)  # a power of two: commutes exactly with that division
    return mono, sr


def downmix(data: np.ndarray) -> np.ndarray:
    """(N, C) or (N,) samples (float or integer) -> contiguous float32 mono (N,): the channel mean."""
    if data.ndim == 2:
        # Adding the channel columns is ~30x faster than ``data.mean(axis=1)`` on (N, 2) data
        # (numpy reduces a short trailing axis slowly) and gives the same values for stereo.
        mono = data[:, 0].astype(np.float32, copy=True)
        for c in range(1, data.shape[1]):
            mono += data[:, c]
        if data.shape[1] > 1:
            mono /= np.float32(data.shape[1])
        data = mono
    return np.ascontiguousarray(data, dtype=np.float32)


def resample(mono: np.ndarray, sr: int, sample_rate: int) -> np.ndarray:
    """Mono float32 (N,) at ``sr`` -> ``sample_rate`` with soxr HQ (no copy when the rates agree)."""
    if sr == sample_rate:
        return mono
    return soxr.resample(mono, sr, sample_rate, quality="HQ").astype(np.float32, copy=False)


def to_mono_resampled(data: np.ndarray, sr: int, sample_rate: int) -> np.ndarray:
    """Downmix (N, C) or (N,) samples to mono and resample to ``sample_rate`` with soxr (HQ)."""
    return resample(downmix(data), sr, sample_rate)


def stream_audio(path: str | Path, sample_rate: int, block_seconds: float = 30.0) -> Iterator[np.ndarray]:
    """Decode a file block by block to mono float32 at ``sample_rate``: yields (n,) arrays.

    Concatenated, the blocks equal ``features.load_audio(path, sample_rate)`` (same downmix, same
    soxr HQ resampler run as a stream). ffmpeg-only formats are decoded whole (one block).
    Raises AudioDecodeError (one line, naming the file) for missing, empty or corrupt files.
    """
    path = _check_audio_file(path)
    if _needs_ffmpeg(path):
        data, sr = decode_audio(path)
        yield to_mono_resampled(data, sr, sample_rate)
        return
    try:
        f = sf.SoundFile(str(path))
    except Exception as err:  # libsndfile reports corrupt/unknown files as several types
        raise _unreadable(path, err) from None
    with f:
        sr = int(f.samplerate)
        resampler = None if sr == sample_rate else soxr.ResampleStream(
            sr, sample_rate, 1, dtype="float32", quality="HQ")
        block = max(1, int(block_seconds * sr))
        total = 0
        while True:
            try:
                data = f.read(block, dtype="float32", always_2d=True)  # (n, channels)
            except Exception as err:
                raise _unreadable(path, err) from None
            last = data.shape[0] < block
            if data.shape[0]:
                _check_finite(path, data)
                # The front end's own downmix (row-wise, so independent of the block size);
                # the stream below resamples.
                mono = downmix(data)
                total += mono.shape[0]
            else:
                mono = np.zeros(0, np.float32)
            if resampler is not None:
                mono = resampler.resample_chunk(np.ascontiguousarray(mono), last=last)
            if mono.size:
                yield np.ascontiguousarray(mono, dtype=np.float32)
            if last:
                break
        if total == 0:
            raise AudioDecodeError(path, "empty", "no audio samples")


def stream_pcm(stream: Any, rate: int, channels: int, sample_rate: int, block_bytes: int = 1 << 16
               ) -> Iterator[np.ndarray]:
    """Raw interleaved signed 16-bit little-endian PCM (``arecord -f S16_LE``, ``ffmpeg -f s16le``)
    from a binary stream, **as it arrives**, to mono float32 blocks (n,) at ``sample_rate``.

    Each read returns what the stream has (``read1``), so a live source is never waited on for a
    full block. Samples become floats exactly as soundfile reads 16-bit files (``/ 32768``) and go
    through the same downmix and streaming soxr HQ resampler as :func:`stream_audio`: the same
    samples give the same blocks' concatenation as a 16-bit WAV file of them. A partial frame
    left at the end of input is dropped. Ends at end of input.
    """
    if rate < 1 or channels < 1:
        raise ValueError(f"--rate and --channels must be >= 1, got {rate} and {channels}")
    read = getattr(stream, "read1", stream.read)
    frame = 2 * channels
    resampler = None if rate == sample_rate else soxr.ResampleStream(rate, sample_rate, 1, dtype="float32",
                                                                     quality="HQ")
    rest = b""
    while True:
        chunk = read(block_bytes)
        last = not chunk
        data = rest + chunk
        usable = len(data) // frame * frame
        rest = data[usable:]
        ints = np.frombuffer(data[:usable], dtype="<i2").reshape(-1, channels)
        mono = downmix(ints.astype(np.float32) * np.float32(1.0 / 32768.0))
        if resampler is not None:
            mono = resampler.resample_chunk(mono, last=last)
        if mono.size:
            yield np.ascontiguousarray(mono, dtype=np.float32)
        if last:
            return


def load_audio(path: str | Path, sample_rate: int = 32000) -> np.ndarray:
    """Decode any supported file to mono float32 at ``sample_rate``, full length: (N,)."""
    mono, sr = decode_mono(path)
    return resample(mono, sr, sample_rate)


def pad_or_trim(wave: np.ndarray | torch.Tensor, num_samples: int):
    """Zero-pad at the end or truncate the last axis to exactly ``num_samples``."""
    n = wave.shape[-1]
    if n == num_samples:
        return wave
    if n > num_samples:
        return wave[..., :num_samples]
    if isinstance(wave, torch.Tensor):
        return torch.nn.functional.pad(wave, (0, num_samples - n))
    pad = [(0, 0)] * (wave.ndim - 1) + [(0, num_samples - n)]
    return np.pad(wave, pad)


@functools.lru_cache(maxsize=8)
def _mel_filterbank_np(sample_rate: int, n_fft: int, n_mels: int, f_min: float, f_max: float) -> np.ndarray:
    # librosa.filters.mel(htk=True, norm=None), written out: importing librosa costs each
    # shard-building worker ~3 s. tests/test_features.py checks the two banks are equal.
    def hz_to_mel(f):
        return 2595.0 * np.log10(1.0 + np.asarray(f, dtype=np.float64) / 700.0)

    def mel_to_hz(m):
        return 700.0 * (10.0 ** (np.asarray(m, dtype=np.float64) / 2595.0) - 1.0)

    fft_freqs = np.fft.rfftfreq(n_fft, d=1.0 / sample_rate)  # (F,)
    mel_freqs = mel_to_hz(np.linspace(hz_to_mel(f_min), hz_to_mel(f_max), n_mels + 2))  # (n_mels + 2,)
    widths = np.diff(mel_freqs)
    ramps = np.subtract.outer(mel_freqs, fft_freqs)  # (n_mels + 2, F)
    rising = -ramps[:-2] / widths[:-1, None]
    falling = ramps[2:] / widths[1:, None]
    fb = np.maximum(0.0, np.minimum(rising, falling)).astype(np.float32)  # (n_mels, F)
    fb.setflags(write=False)
    return fb


def mel_filterbank(cfg: FeatureConfig) -> torch.Tensor:
    """HTK mel filterbank without area normalisation: (n_mels, n_fft // 2 + 1)."""
    return torch.from_numpy(
        _mel_filterbank_np(cfg.sample_rate, cfg.n_fft, cfg.n_mels, cfg.f_min, cfg.f_max).copy()
    )


def used_bins(fb: torch.Tensor) -> tuple[int, int]:
    """``(lo, hi)``: the frequency bins some filter of ``fb`` (n_mels, F) uses (2..447 of 513 by default)."""
    cols = (fb != 0).any(dim=0).nonzero().flatten()
    return (int(cols[0]), int(cols[-1]) + 1) if cols.numel() else (0, 0)


class LogMel(torch.nn.Module):
    """Waveform (B, N) or (N,) at cfg.sample_rate -> log-mel in dB, (B, n_mels, T) or (n_mels, T).

    T = 1 + N // hop; always computed in float32. Works on any device (the filterbank and window
    are buffers). On the CPU, where the shard builder spends a quarter of its time here, frames go
    through in chunks of ``cpu_chunk_frames`` so each chunk's spectrum stays in cache, and the mel
    product skips the filterbank's zeros (a CSR matrix: 881 of 57,088 weights are non-zero). The
    values equal the plain ``fb @ |stft|^2`` computation to float rounding (tests check both).
    """

    cpu_chunk_frames = 128

    def __init__(self, cfg: FeatureConfig = FeatureConfig()):
        super().__init__()
        self.cfg = cfg
        self.register_buffer("window", torch.hann_window(cfg.win_length, periodic=True), persistent=False)
        fb = mel_filterbank(cfg)
        self.bin_lo, self.bin_hi = used_bins(fb)
        self.register_buffer("fb", fb[:, self.bin_lo : self.bin_hi].contiguous(), persistent=False)
        self._fb_csr: torch.Tensor | None = None

    def forward(self, wave: torch.Tensor) -> torch.Tensor:
        x = _reflect_pad(wave.float(), self.cfg.n_fft // 2)  # == torch.stft(center=True, "reflect")
        mel = self._mel_cpu(x) if x.device.type == "cpu" else self.fb @ self._power(x)
        return 10.0 * torch.log10(mel.clamp_min(self.cfg.amin))

    def _power(self, padded: torch.Tensor) -> torch.Tensor:
        """Power spectrum of the used bins: (..., n) -> (..., bin_hi - bin_lo, frames)."""
        cfg = self.cfg
        spec = torch.stft(padded, n_fft=cfg.n_fft, hop_length=cfg.hop_length, win_length=cfg.win_length,
                          window=self.window, center=False, return_complex=True)
        spec = spec[..., self.bin_lo : self.bin_hi, :]
        return spec.real.square() + spec.imag.square()

    def _mel_cpu(self, padded: torch.Tensor, chunk: int | None = None) -> torch.Tensor:
        cfg = self.cfg
        chunk = chunk or self.cpu_chunk_frames
        if self._fb_csr is None:
            with warnings.catch_warnings():  # "sparse CSR support is in beta": CSR @ dense is all we use
                warnings.simplefilter("ignore", UserWarning)
                self._fb_csr = self.fb.cpu().to_sparse_csr()
        lead, n = padded.shape[:-1], padded.shape[-1]
        x = padded.reshape(-1, n)
        frames = 1 + (n - cfg.n_fft) // cfg.hop_length
        out = x.new_empty(x.shape[0], cfg.n_mels, frames)
        for t0 in range(0, frames, chunk):
            t1 = min(frames, t0 + chunk)
            power = self._power(x[:, t0 * cfg.hop_length : (t1 - 1) * cfg.hop_length + cfg.n_fft])
            for b in range(x.shape[0]):
                out[b, :, t0:t1] = self._fb_csr @ power[b]
        return out.reshape(*lead, cfg.n_mels, frames)


def _reflect_pad(x: torch.Tensor, pad: int) -> torch.Tensor:
    """Reflect-pad the last axis by ``pad`` on both sides, as ``torch.stft(center=True)`` does.

    One copy of the signal plus two short flipped edges: ~3x faster than ``F.pad(mode="reflect")``
    on a 10 s clip (0.1 vs 0.3 ms), which matters at 13 ms per clip in the shard builder.
    """
    n = x.shape[-1]
    if n <= pad:
        raise ValueError(f"signal of {n} samples is too short to reflect-pad by {pad} (needs > {pad})")
    return torch.cat([x[..., 1 : pad + 1].flip(-1), x, x[..., n - pad - 1 : n - 1].flip(-1)], dim=-1)


@functools.lru_cache(maxsize=4)
def _cpu_logmel(cfg: FeatureConfig) -> LogMel:
    return LogMel(cfg)


@torch.no_grad()
def compute_logmel(wave: np.ndarray | torch.Tensor, cfg: FeatureConfig = FeatureConfig()) -> np.ndarray:
    """Mono waveform (N,) -> padded/trimmed to one clip -> log-mel float32 (n_mels, num_frames)."""
    x = torch.as_tensor(np.asarray(wave, dtype=np.float32) if not isinstance(wave, torch.Tensor) else wave)
    x = pad_or_trim(x.float().cpu(), cfg.clip_samples)
    return _cpu_logmel(cfg)(x).numpy()


def logmel_from_file(path: str | Path, cfg: FeatureConfig = FeatureConfig()) -> tuple[np.ndarray, float]:
    """Decode, resample, pad/trim and transform one file.

    Returns ``(logmel (n_mels, num_frames) float32, original duration in seconds)``.
    """
    wave = load_audio(path, cfg.sample_rate)
    duration = wave.shape[-1] / cfg.sample_rate
    return compute_logmel(wave, cfg), duration
