"""Long audio -> 10 s windows every hop: the one windowing rule of tagging (files, arrays, live).

* windows start at 0, hop, 2*hop, ... as long as they end inside the audio;
* if the last of those ends before the audio does, one more window is added that **ends exactly
  at the end of the audio** (it starts at ``duration - 10 s``), so every window is full of real
  audio and the tail is never scored on mostly padding;
* audio of 10 s or less gives one window, zero-padded at the end exactly like in training
  (``features.pad_or_trim``).

A 35 s file with hop 5 s gives 6 windows (0-10, ..., 25-35); a 37 s file gives 7 (0-10, ...,
25-35, 27-37).
"""

from __future__ import annotations

from typing import Iterable, Iterator

import numpy as np

from ..features import pad_or_trim

__all__ = ["window_starts", "SlidingWindows"]


def window_starts(num_samples: int, clip_samples: int, hop_samples: int) -> list[int]:
    """Start samples of the windows over ``num_samples`` of audio (the rule in the module doc).

    Returns a list of ints, never empty: ``[0]`` for audio no longer than one clip.
    """
    if hop_samples <= 0:
        raise ValueError(f"hop must be positive, got {hop_samples} samples")
    if num_samples <= clip_samples:
        return [0]
    starts = list(range(0, num_samples - clip_samples + 1, hop_samples))
    if starts[-1] + clip_samples < num_samples:
        starts.append(num_samples - clip_samples)
    return starts


class SlidingWindows:
    """Cut a stream of mono blocks into fixed-length windows without holding the whole signal.

    Iterating yields ``(start_sample, window)`` with window float32 of shape (clip_samples,);
    the starts are exactly ``window_starts(total, clip, hop)``. After the iteration
    ``num_samples`` holds the total length of the stream. At most about
    ``clip + hop + one block`` samples are held at any time.
    """

    def __init__(self, blocks: Iterable[np.ndarray], clip_samples: int, hop_samples: int):
        if hop_samples <= 0:
            raise ValueError(f"hop must be positive, got {hop_samples} samples")
        self.blocks = blocks
        self.clip = clip_samples
        self.hop = hop_samples
        self.num_samples = 0

    def __iter__(self) -> Iterator[tuple[int, np.ndarray]]:
        clip, hop = self.clip, self.hop
        buf = np.zeros(0, np.float32)
        buf_start = 0  # absolute index of buf[0]
        next_start = 0
        last_end = 0  # end of the last window yielded
        total = 0
        for block in self.blocks:
            if block.size == 0:
                continue
            buf = np.concatenate([buf, block.astype(np.float32, copy=False)])
            total += block.shape[0]
            while next_start + clip <= total:
                s = next_start - buf_start
                yield next_start, buf[s : s + clip].copy()
                last_end = next_start + clip
                next_start += hop
            # Keep what the next regular window needs, and always the last clip's worth of
            # samples: the final end-aligned window may need them once the stream ends.
            keep_from = max(buf_start, min(next_start, total - clip))
            buf = buf[keep_from - buf_start :]
            buf_start = keep_from
        self.num_samples = total
        if total == 0:
            return
        if last_end == 0:  # shorter than one clip: pad like training does
            yield 0, pad_or_trim(buf[:total], clip).astype(np.float32, copy=False)
        elif last_end < total:
            start = total - clip
            yield start, buf[start - buf_start :].copy()
