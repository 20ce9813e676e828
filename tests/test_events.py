"""Events from window scores: runs, hysteresis, gaps, onset/offset rules, the live tracker, writers.

The end-to-end check with a model trained on the synthetic classes (events found within one hop
of where they were put) is in tests/test_infer_cli.py."""

from __future__ import annotations

import csv
import io

import numpy as np
import pytest

from audioset_dcls.events import EventTracker, audacity_labels, detect_events

LABELS = [{"mid": "/x/a", "name": "A"}, {"mid": "/x/b", "name": "B b"}]


def windows(duration: float, clip: float = 10.0, hop: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
    starts = list(np.arange(0, duration - clip + 1e-9, hop))
    if starts[-1] + clip < duration:
        starts.append(duration - clip)
    s = np.array(starts)
    return s, s + clip


def ideal_scores(starts, ends, events, need=1.0):
    """A model that scores 0.9 once ``need`` s of the class's sound lie in the window, else 0.1."""
    scores = np.full((len(starts), len(LABELS)), 0.1)
    for c, on, off in events:
        overlap = np.minimum(ends, off) - np.maximum(starts, on)
        scores[overlap >= need - 1e-9, c] = 0.9
    return scores


@pytest.mark.parametrize("need", [0.5, 1.0])
def test_events_land_within_one_hop_of_the_sounds(need):
    starts, ends = windows(60.0)
    truth = [(0, 15.0, 25.0), (1, 30.0, 48.0), (0, 40.5, 41.5)]  # 10 s or more from the ends
    events = detect_events(ideal_scores(starts, ends, truth, need), starts, ends, 60.0, 0.5, LABELS,
                           hop_seconds=1.0)
    assert [(e.index, e.name) for e in events] == [(0, "A"), (1, "B b"), (0, "A")]
    for e, (c, on, off) in zip(events, truth):
        assert abs(e.onset - on) <= 1.0 and abs(e.offset - off) <= 1.0, (e, on, off)
        assert e.peak == 0.9 and e.mean == pytest.approx(0.9)


def test_hysteresis_gap_and_clamping():
    starts, ends = windows(30.0, clip=10.0, hop=1.0)  # 21 windows
    s = np.full((21, 2), 0.1)
    s[0:4, 0] = [0.45, 0.6, 0.42, 0.45]  # above 0.4 (= 0.8 x 0.5) throughout, one window above 0.5
    s[5, 0] = 0.41  # after a one-window dip (1 s <= min_gap): the same event
    s[10:12, 1] = 0.45  # never reaches 0.5: no event
    s[18:, 1] = 0.7  # to the end of the file
    ev = detect_events(s, starts, ends, 30.0, [0.5, 0.5], LABELS, hop_seconds=1.0)
    assert [(e.index, e.onset, e.offset) for e in ev] == [(0, 0.0, 6.0), (1, 27.0, 30.0)]
    assert ev[0].peak == pytest.approx(0.6) and ev[0].mean == pytest.approx(np.mean(s[0:6, 0]))
    split = detect_events(s, starts, ends, 30.0, 0.5, LABELS, hop_seconds=1.0, min_gap=0.0)
    assert [(e.onset, e.offset) for e in split if e.index == 0] == [(0.0, 4.0)]  # the second run never reached 0.5
    loose = detect_events(s, starts, ends, 30.0, 0.5, LABELS, hop_seconds=1.0, hysteresis=1.0)
    assert [(e.onset, e.offset) for e in loose if e.index == 0] == [(1.0, 11.0)]  # one window: its own span
    # a sound shorter than the windows' overlap: the stretch its windows share
    s2 = np.full((21, 2), 0.1)
    s2[8:11, 0] = 0.9
    (short,) = detect_events(s2, starts, ends, 30.0, 0.5, LABELS, hop_seconds=1.0)
    assert (short.onset, short.offset) == (10.0, 18.0)
    # one padded window of a 4 s file: clamped to the file
    (e,) = detect_events(np.array([[0.9, 0.0]]), np.array([0.0]), np.array([4.0]), 4.0, 0.5, LABELS, hop_seconds=1.0)
    assert (e.onset, e.offset) == (0.0, 4.0)


def test_live_tracker_reports_each_event_once_it_closes_and_as_the_whole_file_does():
    starts, ends = windows(60.0)
    scores = ideal_scores(starts, ends, [(0, 15.0, 25.0), (1, 30.0, 60.0)])
    tracker = EventTracker(0.5, LABELS, hop_seconds=1.0)
    live = []
    for i, (a, b, sc) in enumerate(zip(starts, ends, scores)):
        for e in tracker.push(a, b, sc):
            live.append((i, e))
    first_below = int(np.flatnonzero((np.arange(len(starts)) > 20) & (scores[:, 0] < 0.4))[0])
    assert [(i, e.index) for i, e in live] == [(first_below + 1, 0)]  # 1 s gap allowed, then closed
    live += [(len(starts), e) for e in tracker.finish(60.0)]
    assert [e for _, e in live] == detect_events(scores, starts, ends, 60.0, 0.5, LABELS, hop_seconds=1.0)


def test_audacity_labels_parse_as_a_label_track():
    starts, ends = windows(40.0)
    events = detect_events(ideal_scores(starts, ends, [(1, 12.0, 20.0)]), starts, ends, 40.0, 0.5, LABELS,
                           hop_seconds=1.0)
    out = io.StringIO()
    audacity_labels(events, out)
    rows = list(csv.reader(io.StringIO(out.getvalue()), delimiter="\t"))
    assert rows == [[f"{events[0].onset:.6f}", f"{events[0].offset:.6f}", "B b"]]
    assert float(rows[0][0]) < float(rows[0][1])
