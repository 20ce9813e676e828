"""What tagging gives back: the scores of one input over its windows, its top tags and events.

Plain data (numpy arrays and label records); :mod:`.outputs` turns them into every output
format, :mod:`.events` into sound events.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

from .events import HYSTERESIS, MIN_GAP, Event, detect_events

__all__ = ["Tag", "TagResult", "TagFailure", "Threshold", "top_tags", "label_records"]


@dataclass(frozen=True)
class Tag:
    """One label with its score."""

    index: int
    mid: str
    name: str
    score: float

    def to_dict(self) -> dict[str, Any]:
        return {"index": self.index, "mid": self.mid, "name": self.name, "score": round(float(self.score), 6)}


def label_records(info: Any) -> list[dict[str, Any]]:
    """``{index, mid, name}`` per class of a CheckpointInfo (``class_N`` names when it has none)."""
    if info.labels:
        return [{"index": int(lab.get("index", i)), "mid": str(lab.get("mid", "")), "name": str(lab["name"])}
                for i, lab in enumerate(info.labels)]
    return [{"index": i, "mid": "", "name": f"class_{i}"} for i in range(info.num_classes)]


Threshold = float | Sequence[float] | np.ndarray  # one number, or (C,) per class (calibrated)


def top_tags(scores: np.ndarray, labels: Sequence[dict[str, Any]], k: int = 10,
             threshold: Threshold | None = None) -> list[Tag]:
    """Highest scores first: the ``k`` best (``k <= 0``: all), then those ``>= threshold`` (one
    number, or (C,) per-class values such as ``CheckpointInfo.class_thresholds``)."""
    order = np.argsort(-scores, kind="stable")
    if k and k > 0:
        order = order[:k]
    tags = [Tag(int(i), labels[i]["mid"], labels[i]["name"], float(scores[i])) for i in order]
    if threshold is not None:
        cut = np.broadcast_to(np.asarray(threshold, dtype=np.float64), scores.shape)
        tags = [t for t in tags if t.score >= cut[t.index]]
    return tags


@dataclass
class TagResult:
    """Tags of one input.

    Attributes:
        source: the path, or ``"<array>"``.
        duration: seconds of audio (before any padding).
        starts, ends: (W,) window start/end times in seconds (``end`` is capped at ``duration``
            for a padded short clip).
        window_scores: (W, C) sigmoid scores per window ("tags over time"); softmax for a
            single-label checkpoint (``info.task``).
        scores: (C,) clip-level scores: ``aggregate`` ("max" or "mean") over the windows.
            (A single-label checkpoint's window scores are softmax probabilities: they sum to 1,
            and so do its clip scores with the "mean" aggregate, its default.)
        window_embeddings: (W, D) pooled features per window, or None.
        embedding: (D,) mean of the window embeddings, or None.
        warning: one line when the tags deserve little trust (a file shorter than one analysis
            window), else None.
        hop_seconds: the step between windows (for :meth:`events`).
    """

    source: str
    duration: float
    starts: np.ndarray
    ends: np.ndarray
    window_scores: np.ndarray
    scores: np.ndarray
    aggregate: str
    labels: list[dict[str, Any]]
    window_embeddings: np.ndarray | None = None
    embedding: np.ndarray | None = None
    warning: str | None = None
    hop_seconds: float = 10.0

    ok = True

    @property
    def num_windows(self) -> int:
        return int(self.window_scores.shape[0])

    def top(self, k: int = 10, threshold: Threshold | None = None) -> list[Tag]:
        """Clip-level top tags (see :func:`top_tags`)."""
        return top_tags(self.scores, self.labels, k, threshold)

    def window_top(self, window: int, k: int = 10, threshold: Threshold | None = None) -> list[Tag]:
        """Top tags of one window."""
        return top_tags(self.window_scores[window], self.labels, k, threshold)

    def events(self, threshold: Threshold, *, hysteresis: float = HYSTERESIS, min_gap: float = MIN_GAP) -> list[Event]:
        """Sound events with onset and offset (``events.detect_events``): per class, runs of windows
        above ``threshold`` (one number or (C,) per class), sorted by onset."""
        return detect_events(self.window_scores, self.starts, self.ends, self.duration, threshold, self.labels,
                             hop_seconds=self.hop_seconds, hysteresis=hysteresis, min_gap=min_gap)


@dataclass
class TagFailure:
    """An input that could not be tagged: ``reason`` is one line (without the file name).

    ``kind``: ``"missing"``, ``"empty"`` or ``"unreadable"`` (an ``AudioDecodeError.kind``), or
    ``"error"`` for any other failure (e.g. an invalid array).
    """

    source: str
    reason: str
    kind: str = "error"
    ok = False
