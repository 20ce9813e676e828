"""Audio as it arrives, block by block: long files and raw PCM from a pipe, to mono float32 at the
front end's rate, through the same downmix and (streaming) soxr HQ resampler as :mod:`.decode`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterator

import numpy as np
import soundfile as sf
import soxr

from .decode import (
    AudioDecodeError,
    _check_audio_file,
    _check_finite,
    _needs_ffmpeg,
    _unreadable,
    decode_audio,
    downmix,
    to_mono_resampled,
)

__all__ = ["stream_audio", "stream_pcm"]


def stream_audio(path: str | Path, sample_rate: int, block_seconds: float = 30.0) -> Iterator[np.ndarray]:
    """Decode a file block by block to mono float32 at ``sample_rate``: yields (n,) arrays.

    Concatenated, the blocks equal ``decode.load_audio(path, sample_rate)`` (same downmix, same
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
