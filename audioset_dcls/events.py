"""Sound events from window scores: onsets, offsets, labels, peak and mean scores.

The tagger scores windows of the training clip length (10 s) every ``hop`` seconds
(``tagging.window_starts``). Per class, events come from runs of windows:

* a window whose score reaches the class threshold starts (or continues) an event; neighbouring
  windows stay in it while their score is at least ``hysteresis`` x threshold (hysteresis: a
  score that wavers around the threshold does not chop one sound into many);
* a run of windows below that lower threshold that lasts at most ``min_gap`` seconds
  (counted in window steps: ``number of windows x hop``) does not end the event;
* the event's **onset** is the end of the last window before it that did not detect the class
  (the start of the file when there is none), its **offset** the start of the first such window
  after it (the end of the file when there is none): the stretch of time that only detecting
  windows cover. (So a sound within one window length of the file's start or end stretches to it:
  no window there can tell where it starts or stops.) A model that detects a sound once about ``hop`` seconds of it are inside a window
  puts onsets and offsets within a hop of the truth; a window of 10 s cannot say more;
* when that stretch is empty (a sound shorter than the windows' overlap), the event is the
  stretch its first and last detecting windows share;
* ``peak`` and ``mean`` are the maximum and mean of the class score over the event's windows.

:class:`EventTracker` does this one window at a time (live input: an event is reported as soon as
it has closed); :func:`detect_events` runs it over a whole file, so both give the same events.
Writers: :func:`events_table`, :func:`write_events_csv`, :func:`audacity_labels` (an Audacity
label track, ``onset<TAB>offset<TAB>label`` per line, seconds).
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from typing import IO, Any, Sequence

import numpy as np

__all__ = ["Event", "EventTracker", "detect_events", "class_thresholds", "events_table", "EVENT_CSV_COLUMNS",
           "write_events_csv", "audacity_labels", "HYSTERESIS", "MIN_GAP"]

HYSTERESIS = 0.8  # the lower threshold that keeps an event going, as a fraction of the class's threshold
MIN_GAP = 1.0  # seconds of windows below it that do not end an event


@dataclass(frozen=True)
class Event:
    """One sound event: ``label`` (its class name) from ``onset`` to ``offset`` seconds."""

    index: int
    mid: str
    name: str
    onset: float
    offset: float
    peak: float
    mean: float

    def to_dict(self) -> dict[str, Any]:
        return {"onset": round(self.onset, 4), "offset": round(self.offset, 4), "index": self.index,
                "mid": self.mid, "name": self.name, "peak": round(self.peak, 6), "mean": round(self.mean, 6)}


def class_thresholds(threshold: float | Sequence[float] | np.ndarray, num_classes: int) -> np.ndarray:
    """One number for every class, or (C,) per-class values -> (C,) float64."""
    t = np.asarray(threshold, dtype=np.float64)
    if t.ndim == 0:
        return np.full(num_classes, float(t))
    if t.shape != (num_classes,):
        raise ValueError(f"{t.shape[0]} thresholds for {num_classes} classes")
    return t.copy()


@dataclass
class _Open:
    """A class's event in progress."""

    onset: float  # end of the last non-detecting window before it (start of the first window if none)
    first_end: float  # end of its first window
    last_start: float = 0.0  # start of its last detecting window
    offset: float = 0.0  # start of the first non-detecting window after the last detecting one
    dips: int = 0  # non-detecting windows since the last detecting one
    high: bool = False  # a window reached the threshold itself (not only the lower one)
    peak: float = 0.0
    total: float = 0.0  # sum of scores up to the last detecting window
    count: int = 0
    pending_total: float = 0.0  # scores of the dip windows, counted if the event goes on
    pending_count: int = 0


class EventTracker:
    """Turn windows, fed in time order, into events (the rules in the module docstring).

    ``thresholds``: (C,) per class (or one number); ``labels``: C records ``{"mid", "name"}``;
    ``hop_seconds``: the step between windows (``min_gap`` counts in it). :meth:`push` takes one
    window and returns the events that closed with it; :meth:`finish` closes the rest at the end
    of the audio. Events come back in the order they close; :func:`detect_events` sorts them.
    """

    def __init__(self, thresholds: float | Sequence[float] | np.ndarray, labels: Sequence[dict[str, Any]], *,
                 hop_seconds: float, hysteresis: float = HYSTERESIS, min_gap: float = MIN_GAP):
        if not 0 < hysteresis <= 1:
            raise ValueError(f"hysteresis must be in (0, 1], got {hysteresis}")
        if min_gap < 0 or hop_seconds <= 0:
            raise ValueError(f"min_gap must be >= 0 and hop > 0, got {min_gap} and {hop_seconds}")
        self.labels = list(labels)
        self.high = class_thresholds(thresholds, len(self.labels))
        self.low = self.high * hysteresis
        self.hop = float(hop_seconds)
        self.max_dips = int(np.floor(min_gap / self.hop + 1e-9))  # dips of more windows than this end an event
        self.open: dict[int, _Open] = {}
        self.prev_end: float | None = None
        self.last_end = 0.0

    def push(self, start: float, end: float, scores: np.ndarray) -> list[Event]:
        """One window ``[start, end]`` seconds with its scores (C,); returns the events it closes."""
        scores = np.asarray(scores, dtype=np.float64)
        detect = scores >= self.low
        closed: list[Event] = []
        for c in sorted(set(np.flatnonzero(detect).tolist()) | set(self.open)):
            s = float(scores[c])
            ev = self.open.get(c)
            if detect[c]:
                if ev is None:
                    onset = start if self.prev_end is None else max(self.prev_end, start)
                    ev = self.open[c] = _Open(onset=onset, first_end=end)
                ev.total += ev.pending_total + s
                ev.count += ev.pending_count + 1
                ev.pending_total, ev.pending_count, ev.dips = 0.0, 0, 0
                ev.last_start = start
                ev.peak = max(ev.peak, s)
                ev.high |= s >= self.high[c]
                continue
            if ev.dips == 0:
                ev.offset = start
            ev.dips += 1
            ev.pending_total += s
            ev.pending_count += 1
            if ev.dips > self.max_dips:
                closed += self._close(c, end)
        self.prev_end = end
        self.last_end = max(self.last_end, end)
        return closed

    def finish(self, duration: float | None = None) -> list[Event]:
        """Close every open event at the end of the audio (``duration`` s; default: the last
        window's end)."""
        end = self.last_end if duration is None else float(duration)
        closed: list[Event] = []
        for c in sorted(self.open):
            if self.open[c].dips == 0:
                self.open[c].offset = end
            closed += self._close(c, end)
        return closed

    def _close(self, c: int, limit: float) -> list[Event]:
        ev = self.open.pop(c)
        if not ev.high:  # only ever above the lower threshold: not an event
            return []
        onset, offset = ev.onset, ev.offset
        if onset >= offset:  # shorter than the overlap: where its first and last windows meet
            onset, offset = min(ev.last_start, ev.first_end), max(ev.last_start, ev.first_end)
        onset, offset = max(0.0, min(onset, limit)), max(0.0, min(offset, limit))
        lab = self.labels[c]
        return [Event(c, str(lab.get("mid", "")), str(lab["name"]), onset, offset, ev.peak, ev.total / ev.count)]


def detect_events(window_scores: np.ndarray, starts: np.ndarray, ends: np.ndarray, duration: float,
                  thresholds: float | Sequence[float] | np.ndarray, labels: Sequence[dict[str, Any]], *,
                  hop_seconds: float, hysteresis: float = HYSTERESIS, min_gap: float = MIN_GAP) -> list[Event]:
    """Events of one input from its window scores (W, C) and window times starts/ends (W,)
    seconds, sorted by onset then class. ``duration``: seconds of audio (offsets are clamped to it)."""
    tracker = EventTracker(thresholds, labels, hop_seconds=hop_seconds, hysteresis=hysteresis, min_gap=min_gap)
    events: list[Event] = []
    for start, end, scores in zip(starts, ends, window_scores):
        events += tracker.push(float(start), float(end), scores)
    events += tracker.finish(duration)
    return sorted(events, key=lambda e: (e.onset, e.index, e.offset))


# --------------------------------------------------------------------------------------------
# Writers


def _clock(seconds: float) -> str:
    m, s = divmod(float(seconds), 60.0)
    h, m = divmod(int(m), 60)
    return f"{h}:{m:02d}:{s:04.1f}" if h else f"{m}:{s:04.1f}"


def events_table(events: Sequence[Event]) -> list[str]:
    """Readable lines, one per event: ``  0:15.0-0:25.0  High tone  peak 0.93 mean 0.81``."""
    if not events:
        return ["  (no events)"]
    width = max(len(e.name) for e in events)
    return [f"  {_clock(e.onset):>8}-{_clock(e.offset):<8}  {e.name:<{width}}  peak {e.peak:.2f} mean {e.mean:.2f}"
            for e in events]


EVENT_CSV_COLUMNS = ["path", "onset", "offset", "index", "mid", "name", "peak", "mean"]


def write_events_csv(writer: Any, path: str, events: Sequence[Event]) -> None:
    """Rows ``EVENT_CSV_COLUMNS`` of one input's events to a ``csv.writer``."""
    for e in events:
        writer.writerow([path, f"{e.onset:.3f}", f"{e.offset:.3f}", e.index, e.mid, e.name, f"{e.peak:.6f}",
                         f"{e.mean:.6f}"])


def audacity_labels(events: Sequence[Event], stream: IO[str]) -> None:
    """An Audacity label track (File > Import > Labels): ``onset<TAB>offset<TAB>label`` per line."""
    w = csv.writer(stream, delimiter="\t", lineterminator="\n", quoting=csv.QUOTE_NONE, escapechar="\\")
    for e in events:
        w.writerow([f"{e.onset:.6f}", f"{e.offset:.6f}", e.name.replace("\t", " ")])
