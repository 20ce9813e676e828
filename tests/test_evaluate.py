"""python -m audioset_dcls.training.evaluate: segment coverage, outputs, and inputs it must refuse.

That its numbers are the training loop's (alone and under a 2-process launch) is checked on a
trained run in tests/test_train.py; here a random-weight checkpoint with the shards' front end
is enough.
"""

from __future__ import annotations

import csv
import json
import math
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from audioset_dcls.hub.checkpoint import CheckpointInfo, save_inference_checkpoint
from audioset_dcls.training.evaluate import ClipScores, append_jsonl, main, segment_coverage
from audioset_dcls.features import FeatureConfig
from audioset_dcls.labels import read_segments
from audioset_dcls.metrics import tagging_metrics
from audioset_dcls.models import create_model
from audioset_dcls.shards.format import hash_ids, read_manifest
from helpers_tagging import LABELS, write_checkpoint
from train_shards import session_shards


def test_segment_coverage_scores_exactly_the_listed_clips():
    rng = np.random.default_rng(0)
    keys = [f"clip{i:03d}_0" for i in range(40)]
    targets = (rng.random((40, 5)) < 0.3).astype(np.uint8)
    targets[0] = 1  # every class has a positive among the listed clips
    clips = ClipScores(keys, rng.random((40, 5)).astype(np.float32), targets, corrupt=0)
    listed = keys[:25] + ["absent_0", "absent_1000", "absent_2000"]
    report = segment_coverage(clips, listed + keys[:3])  # a key listed twice counts once
    assert (report["listed"], report["held"], report["missing"], report["not_listed"]) == (28, 25, 3, 15)
    expected = tagging_metrics(targets[:25], clips.scores[:25])
    assert report["mAP"] == expected["mAP"] and report["mAUC"] == expected["mAUC"]
    assert report["num_clips"] == 25 and report["clip_ids_sha256"] == hash_ids(keys[:25])
    none = segment_coverage(clips, ["absent_0"])
    assert none["held"] == 0 and math.isnan(none["mAP"])


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    return session_shards(tmp_path_factory, 2.0)[1]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, shards) -> Path:
    """Random weights with the shards' front end (2 s clips) and classes."""
    torch.manual_seed(0)
    model = create_model("convnext_atto", num_classes=len(LABELS))
    info = CheckpointInfo("convnext_atto", len(LABELS), features=FeatureConfig(clip_seconds=2.0), labels=LABELS)
    return save_inference_checkpoint(tmp_path_factory.mktemp("ckpt") / "m.safetensors", model.state_dict(), info)


@pytest.fixture(autouse=True)
def fresh_accelerate_state():
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)
    yield
    AcceleratorState._reset_state(reset_partial_state=True)


def shard_keys(shards: Path) -> set[str]:
    """The clip keys the shards hold, through the eval loader (whatever the sample encoding)."""
    from audioset_dcls.data import build_eval_loader, open_shard_set
    from audioset_dcls.features import Normalization

    loader = build_eval_loader(open_shard_set(shards, "shards"), 64, 0, Normalization(), rank=0, world_size=1)
    return {k for batch in loader for k in batch["keys"]}


def test_outputs_and_coverage_of_a_segment_list(shards, checkpoint, tmp_path, capsys):
    """A segment list with half the eval set's segments and two segments the shards lack."""
    segments = read_segments(shards.parent.parent / "audioset" / "eval_segments.csv")
    half = segments[: len(segments) // 2]
    listed = tmp_path / "eval_segments.csv"
    rows = [f'{s.ytid}, {s.start:.3f}, {s.end:.3f}, "{",".join(s.mids)}"' for s in half]
    rows += ['NotInShards0, 0.000, 10.000, "/m/09x0r"', 'NotInShards1, 30.000, 40.000, "/m/09x0r"']
    listed.write_text("# YTID, start_seconds, end_seconds, positive_labels\n" + "\n".join(rows) + "\n")
    code = main(["--checkpoint", str(checkpoint), "--shards", str(shards), "--segments", str(listed),
                 "--output", str(tmp_path / "r.json"), "--per-class", str(tmp_path / "pc.csv"), "--workers", "1"])
    out = capsys.readouterr().out
    assert code == 0
    results = json.loads((tmp_path / "r.json").read_text())
    manifest = read_manifest(shards)
    assert results["num_clips"] == manifest["num_samples"] and results["clip_ids_sha256"] == manifest["clip_ids_sha256"]
    held = sum(s.key in shard_keys(shards) for s in half)
    assert 0 < held <= len(half)
    seg = results["segments"]
    assert (seg["listed"], seg["held"], seg["missing"]) == (len(half) + 2, held, len(half) + 2 - held)
    assert seg["not_listed"] == results["num_clips"] - held and seg["num_clips"] == held
    assert 0.0 < seg["mAP"] <= 1.0 and seg["mAP"] != results["mAP"]
    assert f"{held} of {len(half) + 2} listed segments evaluated" in out
    with open(tmp_path / "pc.csv") as f:
        table = list(csv.DictReader(f))
    assert [r["name"] for r in table] == [lab["name"] for lab in LABELS]


def test_inputs_it_cannot_evaluate_give_one_line(shards, checkpoint, tmp_path, capsys, monkeypatch):
    def error(*argv: str) -> str:
        assert main([*argv, "--workers", "0"]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        (line,) = [ln for ln in err if ln.startswith("error:")]
        return line

    ten_seconds = write_checkpoint(tmp_path / "10s.safetensors")  # the default front end: 10 s clips
    line = error("--checkpoint", str(ten_seconds), "--shards", str(shards))
    assert str(ten_seconds) in line and "clip_seconds 10.0 vs 2.0" in line and "manifest.json" in line

    other = [dict(lab, mid=f"/x/{i}") for i, lab in enumerate(LABELS)]
    torch.manual_seed(0)
    swapped = save_inference_checkpoint(
        tmp_path / "other_classes.safetensors", create_model("convnext_atto", num_classes=8).state_dict(),
        CheckpointInfo("convnext_atto", 8, features=FeatureConfig(clip_seconds=2.0), labels=other))
    line = error("--checkpoint", str(swapped), "--shards", str(shards))
    assert "its classes are not the shards'" in line and "class 0" in line

    line = error("--checkpoint", "no_such_model", "--shards", str(shards))
    assert "no_such_model: no such checkpoint file or folder, and not a published model" in line
    monkeypatch.setenv("AUDIOSET_DCLS_CACHE", str(tmp_path / "empty_cache"))
    line = error("--checkpoint", "convnext_tiny_dcls", "--shards", str(shards), "--offline")
    assert "convnext_tiny_dcls: not in the cache" in line
    line = error("--checkpoint", str(checkpoint), "--shards", str(tmp_path / "nowhere"))
    assert "no such directory" in line
    (tmp_path / "bad.csv").write_text("YTID,start\nabc,zero,10,/m/x\n")
    line = error("--checkpoint", str(checkpoint), "--shards", str(shards), "--segments", str(tmp_path / "bad.csv"))
    assert "bad.csv:2" in line
    cut = tmp_path / "cut_shards"  # a shard cut short: the start-up check of every shard set
    shutil.copytree(shards, cut)
    first = sorted(cut.glob("*.tar"))[0]
    os.truncate(first, 100)
    line = error("--checkpoint", str(checkpoint), "--shards", str(cut))
    assert f"{first.name} has 100 bytes" in line and "python -m preprocessing.build_shards" in line
    line = error("--checkpoint", str(checkpoint), "--shards", str(shards), "--output", str(first / "results.json"))
    assert line.startswith("error: [Errno") and str(first) in line  # an output that cannot be written (a full disk alike)


def test_results_lines_of_a_step_evaluated_again_are_replaced(tmp_path):
    """A run killed between an evaluation and its checkpoint evaluates that step again on resume."""
    path = tmp_path / "eval" / "results.jsonl"
    for step, m in ((4, 0.1), (8, 0.2), (8, 0.25)):
        append_jsonl(path, {"epoch": step // 4 - 1, "step": step, "mAP": m}, replace="step")
    append_jsonl(path, {"step": 8, "mAP": 0.3})  # without replace: a plain append
    assert [(r["step"], r["mAP"]) for r in map(json.loads, path.read_text().splitlines())] == [
        (4, 0.1), (8, 0.25), (8, 0.3)]
