"""The built-in example (the README's first command, minus the install) runs end to end:
synthetic AudioSet -> shards -> tiny DCLS model -> mAP -> tags, shrunk to a CI-sized run."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys

from conftest import REPO_ROOT


def test_example_script_end_to_end(tmp_path):
    out = tmp_path / "example"
    env = dict(os.environ, PYTHON=sys.executable, EXAMPLE_TRAIN="32", EXAMPLE_EVAL="12", EXAMPLE_EPOCHS="2",
               OMP_NUM_THREADS="2")
    proc = subprocess.run(["bash", "scripts/example.sh", str(out)], cwd=REPO_ROOT, env=env,
                          capture_output=True, text=True, timeout=900)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-4000:]

    # the three broken clips are reported, not written
    with open(out / "shards" / "train" / "skipped.csv") as f:
        kinds = sorted(row["kind"] for row in csv.DictReader(f))
    assert kinds == ["empty", "missing", "unreadable"]
    manifest = json.loads((out / "shards" / "train" / "manifest.json").read_text())
    assert manifest["num_samples"] == 32

    # training evaluated every eval clip once and wrote a self-describing checkpoint
    summary = json.loads((out / "run" / "summary.json").read_text())
    final = summary["eval"]
    assert final["num_clips"] == 12 and 0.0 < final["mAP"] <= 1.0
    assert (out / "run" / "model.safetensors").is_file()

    # tags: the table for two clips with their true labels, and one CSV row block per eval file
    assert log.count("true labels of") == 2
    with open(out / "eval_tags.csv") as f:
        rows = list(csv.DictReader(f))
    assert len({r["path"] for r in rows}) == 12
    assert {r["name"] for r in rows} <= {
        "Low hum, harmonic", "High tone", "Hiss, band noise", "Clicks", "Rising chirp", "Falling chirp", "Beeps",
        "Rumble"}
    assert "Done. Where everything went" in log
