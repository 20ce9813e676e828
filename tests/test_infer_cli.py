"""infer.py end to end: inputs (files, folders, @lists), output formats and their schema,
failures, embeddings, plot, device/thread options."""

from __future__ import annotations

import csv
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

from helpers_tagging import AUDIO_VARIANTS, LABEL_NAMES, LABELS, write_audio, write_checkpoint, write_variants

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
import infer  # noqa: E402  (the thin script at the repository root)

TAG_KEYS = {"index", "mid", "name", "score"}


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    return write_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny.safetensors")


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    """The format variants in a nested folder, a 35 s file, and one corrupt file."""
    root = tmp_path_factory.mktemp("clips")
    write_variants(root / "nested")
    write_audio(root / "long35.wav", 35.0, sr=32000, fmt="WAV")
    (root / "broken.flac").write_bytes(b"fLaC" + bytes(range(256)) * 8)
    (root / "readme.txt").write_text("not audio, skipped by extension")
    return root


@pytest.fixture(autouse=True)
def keep_threads():
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def run(capsys, *argv) -> tuple[int, str, str]:
    code = infer.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def check_tags(tags: list[dict], k: int) -> None:
    assert 0 < len(tags) <= k
    for t in tags:
        assert set(t) == TAG_KEYS
        assert LABELS[t["index"]]["name"] == t["name"] and LABELS[t["index"]]["mid"] == t["mid"]
        assert 0.0 <= t["score"] <= 1.0
    assert [t["score"] for t in tags] == sorted((t["score"] for t in tags), reverse=True)


def test_folder_with_corrupt_file_jsonl(capsys, checkpoint, folder):
    code, out, err = run(capsys, "--checkpoint", checkpoint, folder, "--format", "jsonl", "--top-k", 3, "-q")
    assert code == 1
    records = [json.loads(line) for line in out.splitlines()]
    paths = [r["path"] for r in records]
    assert len(records) == len(AUDIO_VARIANTS) + 2  # every audio file, .txt skipped
    assert paths == sorted(paths)
    bad = [r for r in records if "error" in r]
    assert [r["path"] for r in bad] == [str(folder / "broken.flac")]
    assert set(bad[0]) == {"path", "error", "kind"} and bad[0]["kind"] == "unreadable"
    for r in records:
        if "error" not in r:
            assert set(r) == {"path", "duration", "num_windows", "aggregate", "tags"}
            check_tags(r["tags"], 3)
    # one line on stderr names the file and the reason
    err_lines = [ln for ln in err.splitlines() if ln.startswith("error:")]
    assert len(err_lines) == 1 and str(folder / "broken.flac") in err_lines[0] and "unreadable" in err_lines[0]
    assert "1 failed" in err


def test_a_folder_reports_every_entry_it_cannot_tag_and_warns_about_a_tiny_file(capsys, checkpoint, tmp_path):
    root = tmp_path / "mixed"
    (root / "sub").mkdir(parents=True)
    write_audio(root / "sub" / "good.wav", 2.0, sr=32000, fmt="WAV")
    sf.write(str(root / "tiny.wav"), np.array([0.1, -0.2, 0.1], np.float32), 32000)  # 3 samples
    (root / "gone.flac").symlink_to(tmp_path / "deleted.flac")  # a dangling link
    os.mkfifo(root / "stream.wav")  # not a regular file: reading it would block forever
    (root / "notes.txt").symlink_to(tmp_path / "nowhere.txt")  # not audio: not an input at all
    code, out, err = run(capsys, "--checkpoint", checkpoint, root, "--format", "jsonl", "-q")
    assert code == 1
    errors = [ln for ln in err.splitlines() if ln.startswith("error:")]
    assert errors == [f"error: {root / 'gone.flac'}: dangling symbolic link (to {tmp_path / 'deleted.flac'})",
                      f"error: {root / 'stream.wav'}: not a regular file (a pipe, socket or device)"]
    (warning,) = [ln for ln in err.splitlines() if ln.startswith("warning:")]
    assert warning.startswith(f"warning: {root / 'tiny.wav'}: only 3 samples (0.1 ms)") and "mean little" in warning
    assert "tagged 2 of 4 input(s); 2 failed" in err
    records = {r["path"]: r for r in map(json.loads, out.splitlines())}
    assert set(records) == {str(root / n) for n in ("gone.flac", "stream.wav", "sub/good.wav", "tiny.wav")}
    assert "error" in records[str(root / "gone.flac")] and "warning" in records[str(root / "tiny.wav")]
    assert "warning" not in records[str(root / "sub" / "good.wav")]
    # nothing taggable at all: the same lines, no model loaded
    (root / "sub" / "good.wav").unlink()
    (root / "tiny.wav").unlink()
    code, _, err = run(capsys, "--checkpoint", tmp_path / "never_read.safetensors", root, "-q")
    assert code == 1 and err.count("error:") == 3 and "no audio files could be read" in err


def test_json_document_and_per_window_timestamps(capsys, checkpoint, folder, tmp_path):
    out_file = tmp_path / "tags.json"
    code, out, _ = run(capsys, "--checkpoint", checkpoint, folder / "long35.wav", folder / "nested" / "short16k.wav",
                       "--format", "json", "--output", out_file, "--hop", 5, "--per-window", "--top-k", 2)
    assert code == 0 and out == ""
    doc = json.loads(out_file.read_text())
    assert doc["model"] == "convnext_atto_dcls" and doc["hop_seconds"] == 5.0 and doc["aggregate"] == "max"
    assert doc["precision"] == "fp32"  # auto on the CPU
    long, short = doc["results"]
    assert long["num_windows"] == 6 and long["duration"] == 35.0
    assert [(w["start"], w["end"]) for w in long["windows"]] == [(s, s + 10.0) for s in (0, 5, 10, 15, 20, 25)]
    for w in long["windows"]:
        check_tags(w["tags"], 2)
    # clip score = max over windows, per label
    best = max(t["score"] for w in long["windows"] for t in w["tags"])
    assert long["tags"][0]["score"] == pytest.approx(best)
    assert short["num_windows"] == 1 and [(w["start"], w["end"]) for w in short["windows"]] == [(0.0, 3.0)]


def test_precision_option(capsys, checkpoint, folder, tmp_path):
    out_file = tmp_path / "tags.json"
    code, _, err = run(capsys, "--checkpoint", checkpoint, folder / "long35.wav", "--format", "json",
                       "--output", out_file, "--precision", "bf16")
    assert code == 0 and "bf16" in err
    assert json.loads(out_file.read_text())["precision"] == "bf16"
    code, _, err = run(capsys, "--checkpoint", checkpoint, folder / "long35.wav", "--precision", "fp16")
    assert code == 2 and "fp16 needs a CUDA device" in err and "\n" not in err.strip()


def test_csv_schema_threshold_and_list_file(capsys, checkpoint, folder, tmp_path):
    listing = tmp_path / "files.txt"
    listing.write_text(f"# inputs\n{folder / 'nested' / 'mono32k.wav'}\n{folder / 'long35.wav'}\n")
    code, out, _ = run(capsys, "--checkpoint", checkpoint, f"@{listing}", "--format", "csv", "--top-k", 0,
                       "--threshold", 0.0, "--per-window", "--aggregate", "mean", "-q")
    assert code == 0
    rows = list(csv.DictReader(io.StringIO(out)))
    assert list(rows[0]) == ["path", "window", "start", "end", "rank", "index", "mid", "name", "score"]
    by_file: dict[str, list[dict]] = {}
    for r in rows:
        by_file.setdefault(r["path"], []).append(r)
    assert list(by_file) == [str(folder / "nested" / "mono32k.wav"), str(folder / "long35.wav")]
    long = by_file[str(folder / "long35.wav")]
    clip_rows = [r for r in long if r["window"] == "clip"]
    assert len(clip_rows) == 8  # --top-k 0: every label
    assert [int(r["rank"]) for r in clip_rows] == list(range(1, 9))
    assert {r["name"] for r in clip_rows} == set(LABEL_NAMES)
    windows = sorted({(int(r["window"]), float(r["start"]), float(r["end"])) for r in long if r["window"] != "clip"})
    assert windows == [(0, 0.0, 10.0), (1, 10.0, 20.0), (2, 20.0, 30.0), (3, 25.0, 35.0)]  # default hop 10 s
    # mean aggregate: the clip score is the mean of the window scores of that label
    label = clip_rows[0]["name"]
    per_window = [float(r["score"]) for r in long if r["window"] != "clip" and r["name"] == label]
    assert float(clip_rows[0]["score"]) == pytest.approx(np.mean(per_window), abs=2e-6)
    # a threshold above every score leaves no rows
    code, out, _ = run(capsys, "--checkpoint", checkpoint, f"@{listing}", "--format", "csv", "--threshold", 1.01, "-q")
    assert code == 0 and out.strip().splitlines() == [",".join(rows[0])]


def test_table_and_embeddings(capsys, checkpoint, folder, tmp_path):
    emb = tmp_path / "emb.npy"
    files = [folder / "nested" / v[0] for v in AUDIO_VARIANTS[:3]]
    # inputs before, between and after options
    code, out, err = run(capsys, files[0], "--checkpoint", checkpoint, files[1], "--embeddings", emb, files[2],
                         "--top-k", 4, "--threads", 1, folder / "broken.flac", "--device", "cpu", "--batch-size", 3)
    assert code == 1
    assert "1 CPU threads" in err and "device cpu" in err  # the header states what actually runs
    for f in files:
        assert f"{f}  (" in out
    assert sum(line.strip().startswith(("1 ", "2 ", "3 ", "4 ")) for line in out.splitlines()) == 4 * len(files)
    assert any(name in out for name in LABEL_NAMES)
    matrix = np.load(emb)
    assert matrix.shape == (3, 320) and matrix.dtype == np.float32  # convnext_atto: 320 features
    assert (tmp_path / "emb.paths.txt").read_text().splitlines() == [str(f) for f in files]


def test_labels_come_from_the_checkpoint(capsys, folder, tmp_path):
    """A checkpoint whose classifier favours class 5 and whose label list is its own: the top
    tag of every file is that checkpoint's label 5 (name and mid), whatever the audio."""
    labels = [{"index": i, "mid": f"/t/{i}", "name": f"Own label {i}"} for i in range(8)]
    ckpt = write_checkpoint(tmp_path / "favour5.safetensors", favour=5, labels=labels)
    code, out, _ = run(capsys, "--checkpoint", ckpt, folder / "nested", "--format", "jsonl", "--top-k", 2, "-q")
    assert code == 0
    records = [json.loads(line) for line in out.splitlines()]
    assert len(records) == len(AUDIO_VARIANTS)
    for r in records:
        top = r["tags"][0]
        assert (top["index"], top["mid"], top["name"]) == (5, "/t/5", "Own label 5") and top["score"] > 0.99
        assert r["tags"][1]["score"] < 0.01


def test_bad_options_and_missing_inputs(capsys, checkpoint, tmp_path):
    code, _, err = run(capsys, "--checkpoint", checkpoint, tmp_path, "-q")  # empty folder
    assert code == 1 and "no audio files" in err
    code, _, err = run(capsys, "--checkpoint", tmp_path / "nope.safetensors", tmp_path / "x.wav")
    assert code == 2 and "no such checkpoint" in err
    code, _, err = run(capsys, "--checkpoint", checkpoint, tmp_path / "x.wav", "--batch-size", 0)
    assert code == 2
    if not torch.cuda.is_available():
        code, _, err = run(capsys, "--checkpoint", checkpoint, tmp_path / "x.wav", "--device", "cuda")
        assert code == 2 and "no CUDA device" in err


def test_plot(capsys, checkpoint, folder, tmp_path):
    pytest.importorskip("matplotlib", reason="--plot needs matplotlib (pip install 'audioset-dcls[plot]')")
    out = tmp_path / "tags.png"
    code, _, _ = run(capsys, "--checkpoint", checkpoint, folder / "long35.wav", "--hop", 5, "--plot", out, "-q")
    assert code == 0
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and out.stat().st_size > 5000


def test_script_runs_as_a_process(checkpoint, folder):
    """The real entry point: exit status and stdout/stderr split as a shell user sees them."""
    proc = subprocess.run([sys.executable, str(REPO / "infer.py"), "--checkpoint", str(checkpoint),
                           str(folder / "nested" / "mono32k.wav"), str(folder / "broken.flac"),
                           "--format", "jsonl", "--threads", "1"],
                          capture_output=True, text=True, cwd=REPO, timeout=120)
    assert proc.returncode == 1, proc.stderr
    lines = proc.stdout.splitlines()
    assert len(lines) == 2 and "tags" in json.loads(lines[0]) and "error" in json.loads(lines[1])
    assert "broken.flac" in proc.stderr
