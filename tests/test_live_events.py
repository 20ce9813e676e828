"""Calibrated thresholds, sound events and live input with the session's model trained on the
synthetic classes (tests/train_shards.py: the learnability run, shared): thresholds stored by
training and used by ``--threshold auto``; events of a file of silence and known synthetic sounds
found within one hop of where they were put, in every output format (Audacity's included);
``--stdin`` gives the file path's window scores and events, line by line as the audio arrives,
and stops cleanly at the end of input and when its reader goes away."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

from audioset_dcls.hub.checkpoint import read_checkpoint_info
from audioset_dcls.synthetic import synthesize_events
from audioset_dcls.tagging.tagger import Tagger

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
import infer  # noqa: E402  (the thin script at the repository root)

HUM = 0  # "Low hum, harmonic": the class the 4-epoch model learns best (AP 1.0 on the eval clips)
TRUTH = [(HUM, 12.0, 24.0), (HUM, 36.0, 48.0)]  # (class, onset, offset) in a 62 s file
HOP = 2.0


@pytest.fixture(autouse=True)
def keep_threads():
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def model(trained_tiny) -> Path:
    return trained_tiny / "model.safetensors"


@pytest.fixture(scope="module")
def scene(tmp_path_factory) -> Path:
    """Silence (the synthetic noise floor) with two 12 s hums, as a 16-bit WAV."""
    path = tmp_path_factory.mktemp("scene") / "scene.wav"
    sf.write(str(path), synthesize_events(TRUTH, 62.0, 32000, np.random.default_rng(1)), 32000, subtype="PCM_16")
    return path


def run(capsys, *argv) -> tuple[int, str, str]:
    code = infer.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_training_stores_calibrated_thresholds_and_auto_uses_them(model, trained_tiny, scene, capsys):
    info = read_checkpoint_info(model)
    with open(trained_tiny / "eval" / "per_class_ap_epoch003.csv") as f:
        rows = list(csv.DictReader(f))
    assert info.thresholds["method"] == "max_f1" and info.thresholds["num_clips"] == 48
    assert info.class_thresholds == pytest.approx([float(r["threshold"]) for r in rows], abs=1e-6)
    assert all(0 <= float(r["precision"]) <= 1 and 0 <= float(r["recall"]) <= 1 for r in rows if int(r["positives"]))
    code, out, err = run(capsys, "--checkpoint", model, scene, "--threshold", "auto", "--top-k", "0", "--hop", "10",
                         "--format", "jsonl", "-q")
    assert code == 0, err
    tags = json.loads(out)["tags"]
    scores = Tagger.from_checkpoint(model, hop_seconds=10).tag(scene).scores
    cut = info.class_thresholds
    assert sorted(t["index"] for t in tags) == [i for i in range(len(cut)) if scores[i] >= cut[i]]
    assert HUM in [t["index"] for t in tags]


def test_events_of_known_sounds_land_within_one_hop_in_every_format(model, scene, tmp_path, capsys):
    common = ["--checkpoint", model, scene, "--hop", HOP, "--threshold", "auto", "-q"]
    code, out, err = run(capsys, *common, "--events", "--format", "json")
    assert code == 0, err
    events = json.loads(out)["results"][0]["events"]
    hums = [e for e in events if e["index"] == HUM]
    assert len(hums) == len(TRUTH), hums
    for e, (_, onset, offset) in zip(hums, TRUTH):
        assert abs(e["onset"] - onset) <= HOP and abs(e["offset"] - offset) <= HOP, (e, onset, offset)
        assert e["name"] == "Low hum, harmonic" and e["peak"] >= e["mean"] > 0
    assert all(0 <= e["onset"] <= e["offset"] <= 62.0 for e in events)
    # the same events as a CSV table and as an Audacity label track
    assert run(capsys, *common, "--events", "--format", "csv", "-o", tmp_path / "e.csv",
               "--plot", tmp_path / "e.png")[0] == 0
    assert (tmp_path / "e.png").read_bytes()[:4] == b"\x89PNG"  # with the events as bars
    with open(tmp_path / "e.csv") as f:
        table = list(csv.DictReader(f))
    assert [(int(r["index"]), float(r["onset"])) for r in table] == [(e["index"], round(e["onset"], 3)) for e in events]
    assert run(capsys, *common, "--format", "audacity", "-o", tmp_path / "labels.txt")[0] == 0
    track = [line.split("\t") for line in (tmp_path / "labels.txt").read_text().splitlines()]
    assert [name for _, _, name in track] == [e["name"] for e in events]
    assert [float(x) for a, b, _ in track for x in (a, b)] == pytest.approx(
        [t for e in events for t in (e["onset"], e["offset"])], abs=1e-4)
    code, _, err = run(capsys, "--checkpoint", model, scene, scene, "--format", "audacity", "-q")
    assert code == 2 and "one input" in err


def _stdin_command(model: Path, *extra: str) -> list[str]:
    return [sys.executable, "infer.py", "--checkpoint", str(model), "--stdin", "--rate", "48000", "--channels", "2",
            "--hop", "2", "--top-k", "0", "--events", "--threads", "1", *extra]


def test_stdin_gives_the_file_scores_line_by_line_and_stops_cleanly(model, tmp_path):
    # 14 s of 48 kHz stereo (resampled and downmixed on the way): one hum, 16-bit samples
    mono = synthesize_events([(HUM, 3.0, 11.0)], 14.0, 48000, np.random.default_rng(2))
    pcm = (np.stack([mono, 0.5 * mono], 1) * 32767).astype("<i2")
    wav = tmp_path / "live.wav"
    sf.write(str(wav), pcm, 48000, subtype="PCM_16")
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.Popen(_stdin_command(model), cwd=REPO, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    first = int(10.5 * 48000)
    proc.stdin.write(pcm[:first].tobytes())
    proc.stdin.flush()
    line: list[bytes] = []
    reader = threading.Thread(target=lambda: line.append(proc.stdout.readline()))
    reader.start()
    reader.join(timeout=120)
    assert line and line[0], "no line for the first window while the input was still open"
    proc.stdin.write(pcm[first:].tobytes())
    proc.stdin.close()
    rest, err = proc.stdout.read(), proc.stderr.read().decode()
    assert proc.wait(timeout=120) == 0 and "Traceback" not in err, err
    records = [json.loads(x) for x in [line[0], *rest.splitlines()]]
    windows, final = records[:-1], records[-1]
    assert final["end_of_input"] and final["num_windows"] == len(windows) and final["duration"] == 14.0

    tagger = Tagger.from_checkpoint(model, hop_seconds=2, threads=1)
    result = tagger.tag(wav)
    assert [(w["start"], w["end"]) for w in windows] == list(zip(result.starts, result.ends))
    live = np.zeros_like(result.window_scores)
    for i, w in enumerate(windows):
        for t in w["tags"]:
            live[i, t["index"]] = t["score"]
    np.testing.assert_allclose(live, result.window_scores, atol=2e-6)
    live_events = sorted((e for r in records for e in r["events"]), key=lambda e: (e["onset"], e["index"], e["offset"]))
    assert live_events == [e.to_dict() for e in result.events(read_checkpoint_info(model).class_thresholds)]

    # a reader that goes away after the first line: a quiet stop, no traceback
    proc = subprocess.Popen(_stdin_command(model), cwd=REPO, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    def feed() -> None:
        try:
            proc.stdin.write(pcm.tobytes())
            proc.stdin.close()
        except BrokenPipeError:  # it may stop reading before it has all
            pass

    writer = threading.Thread(target=feed)
    writer.start()
    assert proc.stdout.readline()
    proc.stdout.close()
    writer.join(timeout=120)
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=120) == 0 and "Traceback" not in err, err
