"""``infer.py --plot``: a file's spectrogram with its tags over time and its events (matplotlib)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from ..audio.stream import stream_audio
from ..features import FeatureConfig, LogMel, pad_or_trim
from .events import Event
from .results import TagResult

__all__ = ["plot_tags"]


def plot_tags(result: TagResult, out: str | Path, *, k: int = 5, audio_path: str | Path | None = None,
              features: FeatureConfig | None = None, max_columns: int = 4000,
              events: Sequence[Event] | None = None) -> Path:
    """Draw the log-mel spectrogram of ``result.source`` with the top-``k`` tags over time, and
    with ``events`` (``TagResult.events``) one bar per event under it, a row per class.

    Needs matplotlib (``pip install matplotlib``). The spectrogram is streamed and
    time-pooled to at most ``max_columns`` columns, so hours of audio stay cheap.
    """
    try:  # the optional [plot] extra
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise RuntimeError("--plot needs matplotlib: pip install matplotlib (or the project's [plot] extra)") from None
    cfg = features or FeatureConfig()
    spec = _streamed_spectrogram(audio_path or result.source, cfg, max_columns)
    tags = result.top(k)
    rows = sorted({e.index: e.name for e in events or ()}.items())
    ratios = [2, 1] + ([max(0.6, 0.25 * len(rows))] if events is not None else [])
    fig, axes = plt.subplots(len(ratios), 1, figsize=(12, 6 + (1.5 if events is not None else 0)), sharex=True,
                             gridspec_kw={"height_ratios": ratios}, squeeze=False)
    ax0, ax1 = axes[0, 0], axes[1, 0]
    ax0.imshow(spec, origin="lower", aspect="auto", cmap="magma", extent=(0, result.duration, 0, cfg.n_mels))
    ax0.set_ylabel("mel bin")
    ax0.set_title(Path(result.source).name)
    centres = (result.starts + result.ends) / 2
    for t in tags:
        if result.num_windows > 1:
            ax1.plot(centres, result.window_scores[:, t.index], marker=".", label=t.name)
        else:
            ax1.bar([t.name], [t.score])
    ax1.set_ylim(0, 1)
    ax1.set_ylabel("score")
    if result.num_windows > 1:
        ax1.legend(loc="upper right", fontsize="small")
    if events is not None:
        ax2 = axes[2, 0]
        row_of = {index: row for row, (index, _) in enumerate(rows)}
        colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
        for e in events:
            row = row_of[e.index]
            ax2.broken_barh([(e.onset, max(e.offset - e.onset, 1e-3))], (row - 0.4, 0.8),
                            facecolors=colours[row % len(colours)], alpha=0.4 + 0.6 * min(1.0, e.peak))
        ax2.set_yticks(range(len(rows)), [name for _, name in rows], fontsize="small")
        ax2.set_ylim(-0.6, max(len(rows), 1) - 0.4)
        ax2.set_xlim(0, result.duration)
        ax2.set_ylabel("events")
        if not rows:
            ax2.text(0.5, 0.5, "no events", transform=ax2.transAxes, ha="center", va="center")
    axes[-1, 0].set_xlabel("time (s)")
    fig.tight_layout()
    out = Path(out)
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


def _streamed_spectrogram(path: str | Path, cfg: FeatureConfig, max_columns: int) -> np.ndarray:
    """Log-mel (n_mels, <= max_columns) of a whole file, 10 s at a time, averaged in time."""
    logmel = LogMel(cfg)
    cols: list[np.ndarray] = []
    clip = cfg.clip_samples
    buf = np.zeros(0, np.float32)
    with torch.no_grad():
        for block in stream_audio(path, cfg.sample_rate):
            buf = np.concatenate([buf, block])
            while buf.shape[0] >= clip:
                cols.append(logmel(torch.from_numpy(buf[:clip]))[:, :-1].numpy())
                buf = buf[clip:]
        if buf.shape[0]:
            # reflect padding needs at least n_fft // 2 + 1 samples; a tiny tail is padded
            tail = pad_or_trim(buf, max(buf.shape[0], cfg.n_fft))
            cols.append(logmel(torch.from_numpy(tail))[:, :-1].numpy())
    spec = np.concatenate(cols, axis=1) if cols else np.zeros((cfg.n_mels, 1), np.float32)
    pool = max(1, math.ceil(spec.shape[1] / max_columns))
    if pool > 1:
        t = spec.shape[1] // pool * pool
        spec = spec[:, :t].reshape(spec.shape[0], -1, pool).mean(-1)
    return spec
