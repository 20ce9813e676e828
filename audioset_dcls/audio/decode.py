"""Audio files -> samples: decode (libsndfile, or ffmpeg for the containers it does not read),
downmix to mono and resample with soxr HQ.

Every path from a file to the front end (shards, training-time checks, tagging) decodes here, and
every failure is an :class:`AudioDecodeError` whose ``kind`` says what went wrong.
"""

from __future__ import annotations

import io
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import soundfile as sf
import soxr

__all__ = [
    "AudioDecodeError",
    "decode_audio",
    "decode_bytes",
    "decode_mono",
    "decode_mono_bytes",
    "downmix",
    "error_line",
    "load_audio",
    "resample",
    "to_mono_resampled",
]


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


def _decode_ffmpeg(path: Path, data: bytes | None = None) -> tuple[np.ndarray, int]:
    """Decode through ffmpeg: mono float32 at the file's native rate (soxr resamples later).

    ``data``: the file's bytes (fed on stdin; ``path`` then only names them)."""
    ffmpeg = shutil.which("ffmpeg")
    if ffmpeg is None:
        raise AudioDecodeError(
            path, "unreadable", f"cannot decode {path.suffix or 'this'} audio without ffmpeg "
            "(install it, e.g. `apt-get install ffmpeg`, or convert the file to flac/wav)"
        )
    proc = subprocess.run(
        [ffmpeg, *(("-nostdin", "-i", str(path)) if data is None else ("-i", "pipe:0")), "-hide_banner",
         "-map", "0:a:0", "-ac", "1",
         "-f", "f32le", "-acodec", "pcm_f32le", "-"],
        input=data, capture_output=True,
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
    return _soundfile_mono(str(path), path)


def _soundfile_mono(source: str | io.BytesIO, name: Path) -> tuple[np.ndarray, int]:
    """``decode_mono`` of a file name or an in-memory file (``name`` names it in errors)."""
    try:
        with sf.SoundFile(source) as f:
            sr = int(f.samplerate)
            if f.subtype in _INT16_SUBTYPES and f.channels <= 256:
                ints = f.read(dtype="int16", always_2d=True)  # (N, channels)
            else:
                ints, data = None, f.read(dtype="float32", always_2d=False)
    except Exception as err:  # libsndfile reports corrupt/unknown files as several types
        raise _unreadable(name, err) from None
    if ints is None:
        _check_samples(name, data)
        return downmix(data), sr
    _check_samples(name, ints)
    mono = downmix(ints)  # exact integer sums, divided by the channel count
    mono *= np.float32(1.0 / 32768.0)  # a power of two: commutes exactly with that division
    return mono, sr


def _check_bytes(data: bytes, name: str | Path) -> Path:
    if len(data) == 0:
        raise AudioDecodeError(name, "empty", "no audio bytes")
    return Path(str(name))


def decode_bytes(data: bytes, name: str | Path) -> tuple[np.ndarray, int]:
    """``decode_audio`` of a whole audio file held in memory (a container's FLAC/WAV/MP3 bytes).

    ``name`` names the clip in errors and picks ffmpeg by its suffix (``.m4a`` ...). Returns
    ``(samples (N,) or (N, channels) float32, sample_rate)``; raises AudioDecodeError.
    """
    name = _check_bytes(data, name)
    if _needs_ffmpeg(name):
        mono, sr = _decode_ffmpeg(name, data)
        _check_samples(name, mono)
        return mono, sr
    try:
        samples, sr = sf.read(io.BytesIO(data), dtype="float32", always_2d=False)
    except Exception as err:  # libsndfile reports corrupt/unknown files as several types
        raise _unreadable(name, err) from None
    _check_samples(name, samples)
    return samples, int(sr)


def decode_mono_bytes(data: bytes, name: str | Path) -> tuple[np.ndarray, int]:
    """``decode_mono`` of a whole audio file held in memory: ``(mono float32 (N,), sample_rate)``,
    bit for bit what ``decode_mono`` gives for the same bytes in a file."""
    name = _check_bytes(data, name)
    if _needs_ffmpeg(name):
        return decode_bytes(data, name)
    return _soundfile_mono(io.BytesIO(data), name)


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


def load_audio(path: str | Path, sample_rate: int = 32000) -> np.ndarray:
    """Decode any supported file to mono float32 at ``sample_rate``, full length: (N,)."""
    mono, sr = decode_mono(path)
    return resample(mono, sr, sample_rate)
