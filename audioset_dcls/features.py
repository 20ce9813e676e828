"""The one audio front end: decode -> mono -> 32 kHz -> pad/trim to 10 s -> log-mel (dB).

Shard building, training-time loading and inference all go through this module, so a clip gives
the same features wherever it is seen. Settings follow the DCLS-Audio reference
(../shared/reference/method.md): 32 kHz, n_fft 1024, hann 1024, hop 320, centred reflect padding,
power 2, 128 HTK mel bins 50-14000 Hz without area normalisation, 10*log10(max(x, 1e-10)),
giving (128, 1001) for a 10 s clip. Normalisation is a separate step applied at load time.
"""

from __future__ import annotations

import dataclasses
import functools
import re
import shutil
import subprocess
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
    "AudioDecodeError",
    "decode_audio",
    "load_audio",
    "stream_audio",
    "to_mono_resampled",
    "pad_or_trim",
    "mel_filterbank",
    "mel_bands",
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

    def to_dict(self) -> dict[str, float]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Normalization":
        return cls(mean=float(d["mean"]), std=float(d["std"]))


class AudioDecodeError(RuntimeError):
    """A file could not be decoded. The message names the file and the reason, on one line."""


# Containers libsndfile does not read; they go through ffmpeg when it is installed.
_FFMPEG_SUFFIXES = {".m4a", ".mp4", ".aac", ".opus", ".webm", ".mkv", ".wma"}


def _decode_ffmpeg(path: Path) -> tuple[np.ndarray, int]:
    """Decode through ffmpeg: mono float32 at the file's native rate (soxr resamples later)."""
    ffmpeg = shutil.which("ffmpeg")
    if ffmpeg is None:
        raise AudioDecodeError(
            f"{path}: cannot decode {path.suffix or 'this'} audio without ffmpeg "
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
        raise AudioDecodeError(f"{path}: ffmpeg failed: {lines[-1] if lines else 'unknown error'}")
    # The input stream line, e.g. "Stream #0:0(und): Audio: aac (LC), 44100 Hz, stereo, fltp".
    m = re.search(r"Stream #0:\d+.*?Audio:.*?(\d+) Hz", log)
    if m is None:
        raise AudioDecodeError(f"{path}: ffmpeg found no audio stream")
    return np.frombuffer(proc.stdout, dtype=np.float32).copy(), int(m.group(1))


def _check_audio_file(path: str | Path) -> Path:
    """The checks every decode path starts with: the file exists and is not empty."""
    path = Path(path)
    if not path.is_file():
        raise AudioDecodeError(f"{path}: no such file")
    if path.stat().st_size == 0:
        raise AudioDecodeError(f"{path}: empty file (0 bytes)")
    return path


def _needs_ffmpeg(path: Path) -> bool:
    return path.suffix.lower() in _FFMPEG_SUFFIXES


def error_line(err: BaseException) -> str:
    """The last line of an error's message (where libraries put the cause), or its type name."""
    text = str(err).strip()
    return text.splitlines()[-1] if text else type(err).__name__


def _unreadable(path: Path, err: BaseException) -> AudioDecodeError:
    """One-line error for a file libsndfile rejects (it raises several exception types)."""
    return AudioDecodeError(f"{path}: unreadable audio ({error_line(err)})")


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
    if data.size == 0:
        raise AudioDecodeError(f"{path}: no audio samples")
    if not np.all(np.isfinite(data)):
        raise AudioDecodeError(f"{path}: audio contains NaN or infinite samples")
    return data, int(sr)


def to_mono_resampled(data: np.ndarray, sr: int, sample_rate: int) -> np.ndarray:
    """Downmix (N, C) or (N,) samples to mono and resample to ``sample_rate`` with soxr (HQ)."""
    if data.ndim == 2:
        # Adding the channel columns is ~30x faster than ``data.mean(axis=1)`` on (N, 2) data
        # (numpy reduces a short trailing axis slowly) and gives the same values for stereo.
        mono = data[:, 0].astype(np.float32, copy=True)
        for c in range(1, data.shape[1]):
            mono += data[:, c]
        if data.shape[1] > 1:
            mono /= np.float32(data.shape[1])
        data = mono
    data = np.ascontiguousarray(data, dtype=np.float32)
    if sr != sample_rate:
        data = soxr.resample(data, sr, sample_rate, quality="HQ").astype(np.float32, copy=False)
    return data


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
                if not np.all(np.isfinite(data)):
                    raise AudioDecodeError(f"{path}: audio contains NaN or infinite samples")
                # The front end's own downmix (row-wise, so independent of the block size);
                # resampling is done here by the stream, hence the unchanged rate.
                mono = to_mono_resampled(data, sr, sr)
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
            raise AudioDecodeError(f"{path}: no audio samples")


def load_audio(path: str | Path, sample_rate: int = 32000) -> np.ndarray:
    """Decode any supported file to mono float32 at ``sample_rate``, full length: (N,)."""
    data, sr = decode_audio(path)
    return to_mono_resampled(data, sr, sample_rate)


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


def mel_bands(fb: torch.Tensor, rows_per_band: int = 8) -> list[tuple[int, int, int, int]]:
    """Split a filterbank (n_mels, F) into row bands and the frequency-bin span each one touches.

    Returns ``[(row_start, row_stop, bin_start, bin_stop), ...]`` covering every row. A mel
    filter is non-zero only over a few bins, so multiplying each band of 8 rows by its own bin
    span does ~7% of the dense product's work with exactly the same non-zero terms.
    """
    nonzero = (fb != 0).cpu()
    bands = []
    for r0 in range(0, fb.shape[0], rows_per_band):
        r1 = min(fb.shape[0], r0 + rows_per_band)
        cols = nonzero[r0:r1].any(dim=0).nonzero().flatten()
        c0, c1 = (int(cols[0]), int(cols[-1]) + 1) if cols.numel() else (0, 0)
        bands.append((r0, r1, c0, c1))
    return bands


class LogMel(torch.nn.Module):
    """Waveform (B, N) or (N,) at cfg.sample_rate -> log-mel in dB, (B, n_mels, T) or (n_mels, T).

    T = 1 + N // hop. Works on any device; the filterbank and window are buffers. The mel
    product skips the filterbank's zeros (see ``mel_bands``); the result equals ``fb @ power``.
    """

    def __init__(self, cfg: FeatureConfig = FeatureConfig()):
        super().__init__()
        self.cfg = cfg
        self.register_buffer("window", torch.hann_window(cfg.win_length, periodic=True), persistent=False)
        self.register_buffer("fb", mel_filterbank(cfg), persistent=False)
        self.bands = mel_bands(self.fb)
        spans = [(c0, c1) for _, _, c0, c1 in self.bands if c1 > c0]
        # Only bins some filter uses get a power value (bins 2..447 of 513 by default).
        self.bin_lo = min((c0 for c0, _ in spans), default=0)
        self.bin_hi = max((c1 for _, c1 in spans), default=0)

    def forward(self, wave: torch.Tensor) -> torch.Tensor:
        cfg = self.cfg
        spec = torch.stft(
            wave.float(),
            n_fft=cfg.n_fft,
            hop_length=cfg.hop_length,
            win_length=cfg.win_length,
            window=self.window,
            center=True,
            pad_mode="reflect",
            return_complex=True,
        )
        lo = self.bin_lo
        spec = spec[..., lo : self.bin_hi, :]
        power = spec.real.square() + spec.imag.square()  # (..., F_used, T)
        mel = torch.cat(
            [torch.matmul(self.fb[r0:r1, c0:c1], power[..., c0 - lo : c1 - lo, :]) if c1 > c0
             else power.new_zeros(power.shape[:-2] + (r1 - r0, power.shape[-1]))
             for r0, r1, c0, c1 in self.bands],
            dim=-2,
        )  # (..., n_mels, T)
        return 10.0 * torch.log10(mel.clamp_min(cfg.amin))


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
