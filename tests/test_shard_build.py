"""The shard builder as a library (audioset_dcls.shards): skip kinds carried as data, and
folders planned by an older builder. The command line is tested in test_build_shards.py."""

from __future__ import annotations

import csv
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from audioset_dcls.audio.containers import ClipRef
from audioset_dcls.features import FeatureConfig
from audioset_dcls.shards.build import BuildError, BuildOptions, build_shards, format_summary, merge_shards
from audioset_dcls.shards.worker import ClipTask, process_clip
from audioset_dcls.shards.plan import PLAN_FORMAT
from audioset_dcls.shards.format import decode_sample, read_manifest

CFG = FeatureConfig(clip_seconds=1.0)


def _task(path: Path | None) -> ClipTask:
    return ClipTask(key="x_0", ref=None if path is None else ClipRef.file(path), labels=(0,), ytid="x", start=0.0,
                    end=1.0)


def test_process_clip_skip_kinds(tmp_path):
    rng = np.random.default_rng(0)
    good = tmp_path / "good.wav"
    sf.write(good, 0.1 * rng.standard_normal(16000).astype(np.float32), 16000)
    silent = tmp_path / "silent.wav"
    sf.write(silent, np.zeros(16000, np.float32), 16000)
    no_samples = tmp_path / "no_samples.wav"
    sf.write(no_samples, np.zeros(0, np.float32), 16000)
    empty = tmp_path / "empty.flac"
    empty.write_bytes(b"")
    corrupt = tmp_path / "corrupt.flac"
    corrupt.write_bytes(b"fLaC" + rng.bytes(2000))
    cases = [(None, "missing"), (tmp_path / "gone.wav", "missing"), (empty, "empty"), (no_samples, "empty"),
             (silent, "silent"), (corrupt, "unreadable"), (good, "ok")]
    for path, kind in cases:
        result = process_clip(_task(path), CFG)
        assert result.kind == kind, (path, result.reason)
        assert (result.sample is None) == (kind != "ok")
        if path is not None and kind != "ok":
            assert result.reason.startswith(f"{path}: ") and "\n" not in result.reason


@pytest.fixture
def tiny_build(tmp_path) -> tuple[BuildOptions, Path]:
    """Two clips, one row repeated in a second CSV (a duplicate), one row whose mid is unknown."""
    audio = tmp_path / "audio"
    audio.mkdir()
    for i, ytid in enumerate(("aaaaaaaaaaa", "bbbbbbbbbbb")):
        sf.write(audio / f"{ytid}.wav", 0.1 * np.random.default_rng(i).standard_normal(16000).astype(np.float32),
                 16000)
    labels = tmp_path / "labels.csv"
    labels.write_text('index,mid,display_name\n0,/m/a,"A"\n1,/m/b,"B"\n')
    first, second = tmp_path / "first.csv", tmp_path / "second.csv"
    first.write_text("aaaaaaaaaaa,0,1,/m/a\nbbbbbbbbbbb,2.5,3.5,/m/b\nccccccccccc,4,5,/m/zzz\n")
    second.write_text("bbbbbbbbbbb,2.5,3.5,/m/a\n")
    opts = BuildOptions(segments=(first, second), labels=labels, audio_dir=audio, out=tmp_path / "out",
                        split="train", workers=0, shard_size=1, shuffle=False, unknown_mids="drop",
                        progress=False, feature_config=CFG)
    return opts, second


def test_dropped_rows_are_reported_with_their_kind_and_times(tiny_build):
    opts, second = tiny_build
    result = build_shards(opts)
    assert result.clips_written == 2
    assert "left out 2 clip(s): 1 duplicate, 1 label" in format_summary(result)  # one report per row
    assert "trimmed to 1 s" in format_summary(result)  # the build's clip length, not AudioSet's
    dropped = [s for s in read_manifest(opts.out)["skipped"] if s["key"] is None]
    assert [(s["kind"], s["ytid"], s["start"], s["end"]) for s in dropped] == [
        ("label", "ccccccccccc", 4.0, 5.0), ("duplicate", "bbbbbbbbbbb", 2.5, 3.5)]
    assert dropped[1]["row"] == f"{second}:1" and dropped[1]["path"] is None
    with open(opts.out / "skipped.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [(r["kind"], r["start_seconds"], r["end_seconds"]) for r in rows] == [
        ("label", "4.000", "5.000"), ("duplicate", "2.500", "3.500")]


def test_values_beyond_the_uint8_range_are_clipped_and_counted(tiny_build):
    """A float WAV far louder than full scale: its log-mel passes 59.375 dB, the top uint8 level.
    Those values are stored as the top level and counted per shard, in the manifest and the summary."""
    opts, _ = tiny_build
    loud = 30 * np.random.default_rng(0).standard_normal(16000).astype(np.float32)
    sf.write(opts.audio_dir / "aaaaaaaaaaa.wav", loud, 16000, subtype="FLOAT")
    result = build_shards(opts)
    records = [json.loads((opts.out / "_build" / f"train-{i:06d}.json").read_text()) for i in range(2)]
    manifest = read_manifest(opts.out)
    assert records[0]["clipped"] > 0 and records[1]["clipped"] == 0  # no shuffle: the loud clip is first
    assert manifest["clipped_values"] == records[0]["clipped"]
    assert f"{records[0]['clipped']} value(s) outside [-100, 59.375] dB clipped" in format_summary(result)
    with tarfile.open(opts.out / "train-000000.tar") as tar:
        sample = {m.name.split(".", 1)[1]: tar.extractfile(m).read() for m in tar}
    logmel = decode_sample({"__key__": "aaaaaaaaaaa_0", **sample}).logmel
    assert logmel.max() == 59.375 and int((logmel == 59.375).sum()) >= records[0]["clipped"]


def test_a_folder_planned_by_the_older_builder(tiny_build):
    """Plans of format /1 stored dropped rows as (row, reason) pairs: --merge asks for one build
    run, which keeps the finished shards and updates the plan."""
    opts, _ = tiny_build
    build_shards(opts)
    manifest = read_manifest(opts.out)
    plan_path = opts.out / "_build" / "plan.json"
    plan = json.loads(plan_path.read_text())
    plan["format"] = "audioset_dcls.build_plan/1"
    plan["dropped_rows"] = [{"row": d["row"], "reason": d["reason"]} for d in plan["dropped_rows"]]
    plan_path.write_text(json.dumps(plan))
    (opts.out / "manifest.json").unlink()
    with pytest.raises(BuildError, match="another version of the builder"):
        merge_shards(opts.out)
    again = build_shards(opts)
    assert again.clips_processed == 0 and len(again.shards_reused) == 2
    assert json.loads(plan_path.read_text())["format"] == PLAN_FORMAT
    assert read_manifest(opts.out) == manifest
    assert merge_shards(opts.out) == manifest


def test_a_killed_worker_is_a_one_line_build_error(tmp_path):
    """A worker killed mid-build (the OOM killer, a decoder crash): BuildError naming the cause and
    the resume, whether the pool breaks under a pending result or under the next submit."""
    import multiprocessing as mp
    import os
    import signal
    import time

    from audioset_dcls.shards.worker import run_clips

    wav = tmp_path / "a.wav"
    sf.write(wav, 0.1 * np.random.default_rng(0).standard_normal(32000).astype(np.float32), 32000)
    tasks = [ClipTask(key=f"x{i}_0", ref=ClipRef.file(wav), labels=(0,), ytid=f"x{i}", start=0.0, end=1.0)
             for i in range(64)]
    for wait in (0.0, 3.0):  # 3 s: the clips in flight are done, so the next submit() breaks
        results = run_clips(iter(tasks), CFG, workers=1, clips_per_task=1)
        assert next(results).kind == "ok"
        time.sleep(wait)
        children = mp.active_children()
        assert children, "the pool's worker is a child of this process"
        for child in children:
            os.kill(child.pid, signal.SIGKILL)
        time.sleep(1.0)  # the pool notices the death
        with pytest.raises(BuildError, match=r"a worker process died .* re-run the same command to resume"):
            list(results)
