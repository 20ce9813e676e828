"""Sound events from window scores: onsets, offsets, labels, peak and mean scores.

The tagger scores windows of the training clip length (10 s) every ``hop`` seconds
(``tagging.window_starts``). Per class, events come from runs of windows:

* a window whose score reaches the class threshold starts (or continues) an event; neighbouring
  windows stay in it while their score is at least ``hysteresis`` x threshold (hysteresis: a
  score that wavers around the threshold does not chop one sound into many);
* a run of windows below that lower threshold that lasts at most ``min_gap`` seconds
  (counted in window steps: ``number of windows x hop``) does not end the event;
* the event's **onset** and **offset** are where the class score crosses half-way between its
  peak in the event and the lowest score around it (from one window length before the event to
  its end), going out from the event's first and last windows above half-way; scores are placed
  at window centres and interpolated between neighbouring windows. A window's
  score grows with how much of it the sound fills (the models average over time), so the half-way
  point is the window centred on the sound's edge: a sound at least one window long gets its
  edges to within about a hop. A shorter sound cannot be placed more finely than the window that
  hears it: it is widened by up to half a window on each side;
* an event still above half-way at the first (last) window of the input starts (ends) there;
  times are clamped to the input;
* ``peak`` and ``mean`` are the maximum and mean of the class score over the event's windows.

:class:`EventTracker` does this one window at a time (live input: an event is reported as soon as
it has closed); :func:`detect_events` runs it over a whole file, so both give the same events.
Events are written (table, CSV, JSON, Audacity label track) by :mod:`.outputs`.
"""

from __future__ import annotations

import collections
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

__all__ = ["Event", "EventTracker", "detect_events", "class_thresholds", "HYSTERESIS", "MIN_GAP"]

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

    trace: list[tuple[float, float, float, int]]  # (start, end, score, window number): from a window length before it
    first: int  # index in trace of its first window
    last: int = 0  # index in trace of its last window reaching the lower threshold
    dips: int = 0  # windows since that one that did not
    high: bool = False  # a window reached the threshold itself (not only the lower one)


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
        self.history: collections.deque[tuple[float, float, np.ndarray]] = collections.deque()
        self.count = 0  # windows pushed
        self.last_end = 0.0

    def push(self, start: float, end: float, scores: np.ndarray) -> list[Event]:
        """One window ``[start, end]`` seconds with its scores (C,); returns the events it closes."""
        scores = np.asarray(scores, dtype=np.float64)
        detect = scores >= self.low
        closed: list[Event] = []
        for c in sorted(set(np.flatnonzero(detect).tolist()) | set(self.open)):
            ev = self.open.get(c)
            if ev is None:  # a new event: with the windows of one window length before it
                n0 = self.count - len(self.history)
                ev = self.open[c] = _Open(trace=[(a, b, float(sc[c]), n0 + k) for k, (a, b, sc) in
                                                 enumerate(self.history)], first=len(self.history))
            ev.trace.append((start, end, float(scores[c]), self.count))
            if detect[c]:
                ev.last, ev.dips = len(ev.trace) - 1, 0
                ev.high |= bool(scores[c] >= self.high[c])
            else:
                ev.dips += 1
                if ev.dips > self.max_dips:
                    closed += self._close(c, at_end=False)
        self.history.append((start, end, scores))
        while self.history and self.history[0][1] <= start:  # keep the windows that overlap this one
            self.history.popleft()
        self.count += 1
        self.last_end = max(self.last_end, end)
        return closed

    def finish(self, duration: float | None = None) -> list[Event]:
        """Close every open event at the end of the audio (``duration`` s; default: the last
        window's end)."""
        if duration is not None:
            self.last_end = float(duration)
        closed: list[Event] = []
        for c in sorted(self.open):
            closed += self._close(c, at_end=True)
        return closed

    def _close(self, c: int, at_end: bool) -> list[Event]:
        ev = self.open.pop(c)
        if not ev.high:  # only ever above the lower threshold: not an event
            return []
        run = ev.trace[ev.first : ev.last + 1]
        run_scores = [sc for _, _, sc, _ in run]
        peak = max(run_scores)
        level = (peak + min(sc for _, _, sc, _ in ev.trace)) / 2
        above = [ev.first + i for i, sc in enumerate(run_scores) if sc >= level]  # the peak at least
        onset = self._crossing(ev.trace, above[0], level, -1, at_edge=ev.trace[0][3] == 0)
        offset = self._crossing(ev.trace, above[-1], level, +1, at_edge=at_end)
        onset, offset = (max(0.0, min(t, self.last_end)) for t in (onset, offset))
        lab = self.labels[c]
        return [Event(c, str(lab.get("mid", "")), str(lab["name"]), onset, max(onset, offset), peak,
                      float(np.mean(run_scores)))]

    @staticmethod
    def _crossing(trace: list[tuple[float, float, float, int]], k: int, level: float, step: int,
                  at_edge: bool) -> float:
        """Walk from window ``k`` (``step`` -1: back, +1: forward) to the first window below ``level``;
        the time where the score crosses it between window centres. Without one: the input's
        start/end when the trace reaches it (``at_edge``), else the outermost window's centre."""
        while 0 <= k + step < len(trace) and trace[k + step][2] >= level:
            k += step
        if not 0 <= k + step < len(trace):
            a, b = trace[k][0], trace[k][1]
            return (a if step < 0 else b) if at_edge else (a + b) / 2
        (a0, b0, s_in, _), (a1, b1, s_out, _) = trace[k], trace[k + step]
        c_in, c_out = (a0 + b0) / 2, (a1 + b1) / 2
        frac = (s_in - level) / (s_in - s_out) if s_in > s_out else 0.5
        return c_in + frac * (c_out - c_in)


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
