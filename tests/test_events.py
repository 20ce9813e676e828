"""Events from window scores: runs, hysteresis, gaps, where onsets and offsets land, the live
tracker, the Audacity writer.

The end-to-end check with a model trained on the synthetic classes (events found within one hop
of where they were put) is in tests/test_live_events.py."""

from __future__ import annotations

import csv
import io

import numpy as np
import pytest

from audioset_dcls.tagging.events import EventTracker, detect_events
from audioset_dcls.tagging.outputs import audacity_labels

LABELS = [{"mid": "/x/a", "name": "A"}, {"mid": "/x/b", "name": "B b"}]


def windows(duration: float, clip: float = 10.0, hop: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
    starts = list(np.arange(0, duration - clip + 1e-9, hop))
    if starts[-1] + clip < duration:
        starts.append(duration - clip)
    s = np.array(starts)
    return s, s + clip


def averaging_model(starts, ends, events, floor=0.1, top=0.9):
    """Scores of a model that averages over time: floor + (top - floor) x the share of the window
    the class's sound fills (as the tagger's models do, roughly)."""
    scores = np.full((len(starts), len(LABELS)), floor)
    for c, on, off in events:
        overlap = np.clip(np.minimum(ends, off) - np.maximum(starts, on), 0, None)
        scores[:, c] = np.maximum(scores[:, c], floor + (top - floor) * overlap / (ends - starts))
    return scores


@pytest.mark.parametrize("hop", [0.5, 1.0, 2.5])
def test_sounds_a_window_long_or_more_get_their_edges_within_a_hop(hop):
    starts, ends = windows(80.0, hop=hop)
    truth = [(0, 15.0, 25.0), (1, 30.0, 52.0), (0, 54.0, 74.0)]
    events = detect_events(averaging_model(starts, ends, truth), starts, ends, 80.0, 0.5, LABELS, hop_seconds=hop)
    assert [(e.index, e.name) for e in events] == [(0, "A"), (1, "B b"), (0, "A")]
    for e, (c, on, off) in zip(events, truth):
        assert abs(e.onset - on) <= hop and abs(e.offset - off) <= hop, (e, on, off)
        assert e.peak == pytest.approx(0.9)


def test_a_short_sound_is_widened_to_at_most_its_window():
    starts, ends = windows(60.0)
    (e,) = detect_events(averaging_model(starts, ends, [(0, 30.0, 34.0)]), starts, ends, 60.0, 0.2, LABELS,
                         hop_seconds=1.0)
    assert 25.0 - 1 <= e.onset <= 30.0 and 34.0 <= e.offset <= 39.0 + 1 and e.offset - e.onset <= 10.0 + 1


def test_hysteresis_gap_and_the_edges_of_the_input():
    starts, ends = windows(30.0, clip=10.0, hop=1.0)  # 21 windows
    s = np.full((21, 2), 0.1)
    s[0:4, 0] = [0.45, 0.6, 0.42, 0.45]  # above 0.4 (= 0.8 x 0.5) throughout, one window above 0.5
    s[5, 0] = 0.41  # after a one-window dip (1 s <= min_gap): the same event
    s[10:12, 1] = 0.45  # never reaches 0.5: no event
    s[18:, 1] = 0.7  # to the end of the input
    ev = detect_events(s, starts, ends, 30.0, [0.5, 0.5], LABELS, hop_seconds=1.0)
    assert [e.index for e in ev] == [0, 1]
    assert ev[0].onset == 0.0  # above half-way from the first window on: starts with the input
    assert ev[0].offset == pytest.approx(10.0 + (0.41 - 0.35) / (0.41 - 0.1))  # past the bridged dip
    assert ev[0].peak == pytest.approx(0.6) and ev[0].mean == pytest.approx(np.mean(s[0:6, 0]))
    assert ev[1].offset == 30.0 and ev[1].onset == pytest.approx(22.5)  # ends with the input
    split = detect_events(s, starts, ends, 30.0, 0.5, LABELS, hop_seconds=1.0, min_gap=0.0)
    assert [e.offset < 9.5 for e in split if e.index == 0] == [True]  # the run after the dip never reached 0.5
    # one padded window of a 4 s input: the whole input
    (e,) = detect_events(np.array([[0.9, 0.0]]), np.array([0.0]), np.array([4.0]), 4.0, 0.5, LABELS, hop_seconds=1.0)
    assert (e.onset, e.offset) == (0.0, 4.0)


def test_live_tracker_reports_each_event_once_it_closes_and_as_the_whole_input_does():
    starts, ends = windows(60.0)
    scores = averaging_model(starts, ends, [(0, 15.0, 25.0), (1, 30.0, 60.0)])
    tracker = EventTracker(0.5, LABELS, hop_seconds=1.0)
    live = []
    for i, (a, b, sc) in enumerate(zip(starts, ends, scores)):
        live += [(i, e) for e in tracker.push(a, b, sc)]
    first_below = int(np.flatnonzero((np.arange(len(starts)) > 15) & (scores[:, 0] < 0.4))[0])
    assert [(i, e.index) for i, e in live] == [(first_below + 1, 0)]  # a 1 s dip allowed, then closed
    live += [(len(starts), e) for e in tracker.finish(60.0)]
    assert [e for _, e in live] == detect_events(scores, starts, ends, 60.0, 0.5, LABELS, hop_seconds=1.0)


def test_audacity_labels_parse_as_a_label_track():
    starts, ends = windows(40.0)
    events = detect_events(averaging_model(starts, ends, [(1, 12.0, 24.0)]), starts, ends, 40.0, 0.5, LABELS,
                           hop_seconds=1.0)
    out = io.StringIO()
    audacity_labels(events, out)
    rows = list(csv.reader(io.StringIO(out.getvalue()), delimiter="\t"))
    assert rows == [[f"{events[0].onset:.6f}", f"{events[0].offset:.6f}", "B b"]]
    assert float(rows[0][0]) < float(rows[0][1])
