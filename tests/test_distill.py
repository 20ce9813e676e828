"""Knowledge distillation (distill.*): teacher tables from real parquet folders (the archive
tagging job's layout), .npy/.pt matrices in PANNs HDF5 order (real h5py files), the loader's
lookups on shards built by the real builder, the loss, and real training runs: a teacher that
knows the right labels while the shards carry wrong ones, 2-process training and exact resume."""

from __future__ import annotations

import json
import re
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from audioset_dcls.augment import augment_batch
from audioset_dcls.config import AugmentConfig, DataConfig, load_config
from audioset_dcls.data import build_train_loader, open_shard_set, resolve_normalization
from audioset_dcls.shards.format import read_manifest
from audioset_dcls.synthetic import CLASSES
from audioset_dcls.teacher import TeacherError, TeacherSource, TeacherTable, build_table, clip_id_from_audio_name
from audioset_dcls.training.distill import distillation_loss, teacher_targets
from audioset_dcls.training.loop import compute_loss
from test_train import COMMON, check, run_train, summary
from train_shards import session_shards

pa = pytest.importorskip("pyarrow")
pq = pytest.importorskip("pyarrow.parquet")
h5py = pytest.importorskip("h5py")

C = len(CLASSES)


def write_parquet_folder(folder: Path, ids: list[str], scores: np.ndarray, parts: int = 2, id_col: str = "id",
                         scores_col: str = "scores", labels: list[str] | None = None) -> Path:
    """One part file per chunk, a string id column and list<float16> scores: the archive job's layout."""
    folder.mkdir(parents=True, exist_ok=True)
    bounds = np.linspace(0, len(ids), parts + 1).astype(int)
    for k in range(parts):
        a, b = bounds[k], bounds[k + 1]
        table = pa.table({id_col: pa.array(ids[a:b], pa.string()),
                          scores_col: pa.array([list(r) for r in scores[a:b].astype(np.float16)],
                                               pa.list_(pa.float16()))})
        if labels is not None:
            table = table.replace_schema_metadata({"labels": json.dumps(labels)})
        pq.write_table(table, folder / f"part-{k:05d}.parquet")
    return folder


def write_hdf5(path: Path, names: list[bytes]) -> Path:
    with h5py.File(path, "w") as f:
        f.create_dataset("audio_name", data=np.array(names, dtype="S20"))
        f.create_dataset("target", data=np.zeros((len(names), C), np.bool_))
    return path


def shard_clips(shard_dir: Path) -> list[tuple[str, str, list[int]]]:
    """(key, ytid, labels) of every clip, straight from the tars."""
    out = []
    for s in read_manifest(shard_dir)["shards"]:
        with tarfile.open(shard_dir / s["name"]) as tar:
            for m in tar:
                if m.name.endswith(".json"):
                    meta = json.load(tar.extractfile(m))
                    out.append((m.name.split(".", 1)[0], meta["ytid"], meta["labels"]))
    return out


# ---------------------------------------------------------------------------------- tables


def test_parquet_folder_and_a_matrix_in_hdf5_order_give_the_same_scores(tmp_path):
    rng = np.random.default_rng(0)
    ids = ["--PJHxphWEs", "abcdefghijk", "Zz_9-0aaaaa", "q" * 11, "x-1"]
    probs = rng.uniform(0, 1, (len(ids), C)).astype(np.float16)
    pq_table = TeacherTable(build_table(TeacherSource(str(write_parquet_folder(tmp_path / "pq", ids, probs))),
                                        tmp_path / "t_pq", C))
    # the same clips as a matrix whose rows follow two HDF5 files' audio_name, with one empty name (no clip)
    names = [f"Y{i}.wav".encode() for i in ids[:2]] + [b""] + [f"Y{i}.wav".encode() for i in ids[2:]]
    h5 = [write_hdf5(tmp_path / "a.h5", names[:3]), write_hdf5(tmp_path / "b.h5", names[3:])]
    matrix = np.insert(probs.astype(np.float32), 2, 0.5, axis=0)
    np.save(tmp_path / "m.npy", matrix)
    torch.save(torch.from_numpy(matrix), tmp_path / "m.pt")
    for name in ("m.npy", "m.pt"):
        src = TeacherSource(str(tmp_path / name), hdf5=tuple(map(str, h5)))
        t = TeacherTable(build_table(src, tmp_path / f"t_{name}", C))
        assert len(t) == len(ids) == len(pq_table)
        for i, cid in enumerate(ids):
            np.testing.assert_array_equal(t.row(cid), probs[i])
            np.testing.assert_array_equal(pq_table.row(cid), probs[i])
    assert pq_table.row("notthere") is None and pq_table.row("x" * 40) is None and pq_table.row("x-") is None
    scores, found = pq_table.lookup(["x-1", "nope", "--PJHxphWEs"])
    assert found.tolist() == [True, False, True] and not scores[1].any()
    assert clip_id_from_audio_name(b"Y--PJHxphWEs.wav") == "--PJHxphWEs" and clip_id_from_audio_name(b"") is None


def test_a_table_is_reused_until_its_source_changes(tmp_path):
    ids = ["a", "b"]
    folder = write_parquet_folder(tmp_path / "pq", ids, np.full((2, C), 0.25), parts=1)
    out = build_table(TeacherSource(str(folder)), tmp_path / "t", C)
    stamp = (out / "scores.npy").stat().st_mtime_ns
    assert build_table(TeacherSource(str(folder)), tmp_path / "t", C) == out
    assert (out / "scores.npy").stat().st_mtime_ns == stamp  # reused, not rebuilt
    write_parquet_folder(tmp_path / "pq", ids, np.full((2, C), 0.75), parts=1)
    assert TeacherTable(build_table(TeacherSource(str(folder)), tmp_path / "t", C)).row("a")[0] == 0.75


def test_bad_teacher_sources_are_one_line_naming_the_file(tmp_path):
    def refused(src: TeacherSource, pattern: str, classes: int = C) -> None:
        with pytest.raises(TeacherError, match=pattern) as err:
            build_table(src, tmp_path / "t", classes)
        assert "\n" not in str(err.value)

    short = write_parquet_folder(tmp_path / "short", ["a"], np.zeros((1, C - 1)), parts=1)
    refused(TeacherSource(str(short)), rf"short/part-00000.parquet: row 0 has {C - 1} scores; the training shards "
                                       rf"have {C} classes")
    logits = write_parquet_folder(tmp_path / "logits", ["a"], np.full((1, C), 3.0), parts=1)
    refused(TeacherSource(str(logits)), r"logits/part-00000.parquet: scores outside \[0, 1\].*distill.scores=logits")
    dup = write_parquet_folder(tmp_path / "dup", ["a", "b", "a"], np.zeros((3, C)), parts=2)
    refused(TeacherSource(str(dup)), r"clip id 'a' has two rows")
    refused(TeacherSource(str(dup), id_column="clip"), r"part-00000.parquet: no column 'clip'")
    h5 = write_hdf5(tmp_path / "x.h5", [b"Ya.wav", b"Yb.wav"])
    np.save(tmp_path / "three.npy", np.zeros((3, C), np.float32))
    refused(TeacherSource(str(tmp_path / "three.npy"), hdf5=(str(h5),)), r"three.npy has 3 rows but distill.hdf5")
    np.save(tmp_path / "wide.npy", np.zeros((2, C + 1), np.float32))
    refused(TeacherSource(str(tmp_path / "wide.npy"), hdf5=(str(h5),)), rf"wide.npy scores {C + 1} classes")
    refused(TeacherSource(str(tmp_path / "three.npy")), r"needs distill.hdf5")
    refused(TeacherSource(str(tmp_path / "nowhere.parquet")), r"nowhere.parquet: no such file")


# ------------------------------------------------------------------------------ loss, augment


def test_clips_without_teacher_scores_get_the_label_loss():
    g = torch.Generator().manual_seed(0)
    logits, labels = torch.randn(6, C, generator=g), torch.rand(6, C, generator=g)
    teacher = torch.rand(6, C, generator=g)
    none = torch.zeros(6)
    assert torch.allclose(distillation_loss(logits, labels, teacher, none, 0.9, 1.0), compute_loss(logits, labels),
                          rtol=1e-6, atol=0)
    full = distillation_loss(logits, labels, teacher, torch.ones(6), 1.0, 1.0)
    assert torch.allclose(full, compute_loss(logits, teacher))  # weight 1: the teacher alone
    half = distillation_loss(logits, labels, teacher, torch.tensor([1.0, 1, 1, 0, 0, 0]), 1.0, 1.0)
    both = torch.cat([torch.nn.functional.binary_cross_entropy_with_logits(logits[:3], teacher[:3], reduction="none"),
                      torch.nn.functional.binary_cross_entropy_with_logits(logits[3:], labels[3:], reduction="none")])
    assert torch.allclose(half, both.mean())
    # single-label: T^2 KL to softmax(z_t / T); zero when the student equals the teacher at T
    z = torch.randn(4, C, generator=g)
    t = teacher_targets(z, torch.ones(4, dtype=torch.bool), torch.zeros(4, C), "logits", 2.0, "singlelabel")
    assert torch.allclose(t, torch.softmax(z / 2, 1))
    y = torch.eye(C)[:4]
    kd_only = distillation_loss(z, y, t, torch.ones(4), 1.0, 2.0, "singlelabel")
    assert kd_only.abs() < 1e-5 < distillation_loss(-z, y, t, torch.ones(4), 1.0, 2.0, "singlelabel")


def test_teacher_targets_from_probabilities_logits_and_missing_rows():
    p = torch.tensor([[0.9, 0.2] + [0.5] * (C - 2), [0.1] * C])
    labels = torch.tensor([[0.0] * C, [1.0] * C])
    has = torch.tensor([True, False])
    t1 = teacher_targets(p, has, labels, "probabilities", 1.0, "multilabel")
    assert torch.allclose(t1[0], p[0]) and torch.equal(t1[1], labels[1])
    z = torch.logit(p)
    assert torch.allclose(teacher_targets(z, has, labels, "logits", 2.0, "multilabel")[0], torch.sigmoid(z[0] / 2))
    assert torch.allclose(teacher_targets(p, has, labels, "probabilities", 2.0, "multilabel")[0],
                          torch.sigmoid(z[0] / 2), atol=1e-5)


def test_mixup_mixes_the_teacher_targets_with_the_labels_lambda_and_draws_nothing_more():
    cfg = AugmentConfig(mixup_alpha=0.8, label_smoothing=0.0)
    x = torch.randn(4, 1, 8, 16)
    y = torch.eye(C)[:4]
    teacher = torch.rand(4, C)
    x1, y1 = augment_batch(x, y, cfg, torch.Generator().manual_seed(3))
    x2, y2, t2 = augment_batch(x, y, cfg, torch.Generator().manual_seed(3), mix_also=teacher)
    assert torch.equal(x1, x2) and torch.equal(y1, y2)
    lam = y1[0, 0].item()  # clip 0 is mixed with clip 3: its class-0 target is lambda
    assert 0 < lam < 1 and torch.allclose(t2, teacher * lam + teacher.flip(0) * (1 - lam))


# ------------------------------------------------------------------------------------ loader


def test_the_loader_attaches_each_clips_teacher_row_by_youtube_id(tmp_path_factory, tmp_path):
    train_dir, _ = session_shards(tmp_path_factory, 2.0)
    clips = shard_clips(train_dir)
    known = {ytid for i, (_, ytid, _) in enumerate(clips) if i % 3}  # every third clip has no scores
    ids = sorted(known)
    scores = np.random.default_rng(1).uniform(0, 1, (len(ids), C)).astype(np.float16)
    table = TeacherTable(build_table(TeacherSource(str(write_parquet_folder(tmp_path / "pq", ids, scores))),
                                     tmp_path / "t", C))
    by_id = dict(zip(ids, scores))
    ytid_of = {key: ytid for key, ytid, _ in clips}
    shards = open_shard_set(train_dir, "data.train")
    cfg = DataConfig(batch_size=8, num_workers=2, shuffle_buffer=20, shuffle_initial=5)
    it, n = build_train_loader(shards, cfg, resolve_normalization(cfg, shards), epoch=0, seed=0, rank=0,
                               world_size=1, accum=1, teacher=table)
    seen = 0
    for batch in it:
        assert batch["teacher"].shape == (8, C) and batch["has_teacher"].dtype == torch.bool
        for key, row, has in zip(batch["keys"], batch["teacher"], batch["has_teacher"]):
            ytid = ytid_of[key]
            assert bool(has) == (ytid in known)
            expected = by_id[ytid].astype(np.float32) if ytid in known else np.zeros(C, np.float32)
            np.testing.assert_array_equal(row.numpy(), expected)
            seen += 1
    assert seen == n * 8


# ------------------------------------------------------------------------------ training runs


def write_clips(folder: Path, num: int, seed: int, relabel=lambda c: c) -> tuple[Path, dict[str, list[int]]]:
    """``num`` synthetic 2 s multi-label clips (each sound spans the whole clip) as wav files and a
    ``--list`` CSV labelling clip i's classes c as ``relabel(c)``; returns (list, file -> true classes)."""
    import soundfile as sf

    from audioset_dcls.synthetic import synthesize_clip

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    lines, truth = ["path,labels"], {}
    for i in range(num):
        classes = sorted(int(c) for c in rng.choice(C, size=int(rng.choice([1, 2], p=[0.6, 0.4])), replace=False))
        name = f"s{seed}_{i:03d}.wav"
        sf.write(folder / name, synthesize_clip(classes, 2.0, 16000, rng), 16000)
        labels = ";".join(CLASSES[relabel(c)][1] for c in classes)
        lines.append(f'{name},"{labels}"')  # class names hold commas
        truth[name] = classes
    (folder / "list.csv").write_text("\n".join(lines) + "\n")
    return folder / "list.csv", truth


@pytest.fixture(scope="module")
def wrong_labels(tmp_path_factory):
    """(train shards whose every label is the next class's, eval shards with the right labels,
    {clip id: true class indices} of both), built by the project's builder from ``--list`` CSVs
    (own-data ids: the teacher is joined on the id the builder gave each file)."""
    from audioset_dcls.features import FeatureConfig
    from audioset_dcls.shards.build import BuildOptions, build_shards

    root = tmp_path_factory.mktemp("wrong_labels")
    train_list, train_truth = write_clips(root / "train_audio", 96, 1, relabel=lambda c: (c + 1) % C)
    eval_list, eval_truth = write_clips(root / "eval_audio", 48, 2)
    classes = root / "classes.txt"  # the class order of the synthetic set, so index k is CLASSES[k] in both
    classes.write_text("".join(name + "\n" for _, name in CLASSES))
    features = FeatureConfig(clip_seconds=2.0)
    for split, lst in (("train", train_list), ("eval", eval_list)):
        build_shards(BuildOptions(lists=(lst,), classes=classes, out=root / split, split=split, workers=0,
                                  shard_size=16, progress=False, feature_config=features))
    by_file = {**train_truth, **eval_truth}
    # the builder's id of dir/s1_000.wav is s1_000-<8 hex of its path>
    truth = {ytid: by_file[ytid.rsplit("-", 1)[0] + ".wav"] for split in ("train", "eval")
             for _, ytid, _ in shard_clips(root / split)}
    return root / "train", root / "eval", truth


def truth_teacher(out: Path, truth: dict[str, list[int]], eval_dir: Path, drop_every: int) -> Path:
    """A parquet teacher that knows each clip's right classes (0.9 / 0.05): every eval clip and
    the training clips but every ``drop_every``-th, with its class list in the file's metadata."""
    eval_ids = {ytid for _, ytid, _ in shard_clips(eval_dir)}
    train_ids = sorted(set(truth) - eval_ids)
    ids = sorted(eval_ids | {y for i, y in enumerate(train_ids) if i % drop_every})
    scores = np.full((len(ids), C), 0.05, np.float32)
    for i, y in enumerate(ids):
        scores[i, truth[y]] = 0.9
    return write_parquet_folder(out, ids, scores, parts=3, labels=[name for _, name in CLASSES])


TINY = ["--config", "configs/tiny.yaml", "schedule.epochs=5", "eval.every_epochs=5", "train.progress_bar=false",
        "train.log_every_steps=10"]


def test_a_teacher_that_knows_the_right_labels_teaches_them_and_labels_alone_do_not(wrong_labels, tmp_path):
    train_dir, eval_dir, truth = wrong_labels
    teacher = truth_teacher(tmp_path / "teacher", truth, eval_dir, drop_every=8)
    data = [f"data.train={train_dir}", f"data.eval={eval_dir}"]
    kd_log = check(run_train("single", TINY + data + [f"train.output_dir={tmp_path / 'kd'}",
                                                      f"distill.teacher={teacher}", "distill.weight=1"], threads=2))
    plain_log = check(run_train("single", TINY + data + [f"train.output_dir={tmp_path / 'plain'}"], threads=2))
    kd, plain = summary(tmp_path / "kd"), summary(tmp_path / "plain")
    print(f"distilled mAP {kd['eval']['mAP']:.3f}, labels only {plain['eval']['mAP']:.3f}")
    assert kd["eval"]["mAP"] >= 0.40, kd_log[-3000:]  # tests/test_train.py's LEARNABLE_MAP
    assert plain["eval"]["mAP"] < 0.35 and kd["eval"]["mAP"] > plain["eval"]["mAP"] + 0.15, plain_log[-2000:]
    t = kd["teacher"]
    assert t["eval"]["mAP"] == pytest.approx(1.0) and t["eval"]["clips_scored"] == t["eval"]["clips"]
    assert re.search(r"teacher on the eval shards: mAP 1\.0000 over the (\d+) of \1 eval clips", kd_log)
    # one training clip in 8 has no scores: counted, in the log and the summary
    assert 0 < t["missing_clips_trained"] < t["clips_trained"] / 4, t
    assert f"{t['missing_clips_trained']} of {t['clips_trained']} clips trained on had no teacher scores" in kd_log
    assert plain["teacher"] is None


def test_a_teacher_of_another_class_count_or_order_is_refused_in_one_line(tmp_path_factory, tmp_path):
    train_dir, eval_dir = session_shards(tmp_path_factory, 2.0)
    data = [f"data.train={train_dir}", f"data.eval={eval_dir}"]
    narrow = write_parquet_folder(tmp_path / "narrow", ["a", "b"], np.zeros((2, C - 1)), parts=1)
    proc = run_train("single", TINY + data + [f"train.output_dir={tmp_path / 'r1'}", f"distill.teacher={narrow}"])
    errors = [ln for ln in proc.stderr.splitlines() if " ERROR " in ln]
    assert proc.returncode == 2 and len(errors) == 1, proc.stderr[-2000:]
    assert f"narrow/part-00000.parquet: row 0 has {C - 1} scores; the training shards have {C} classes" in errors[0]
    mids = [m for m, _ in CLASSES]
    swapped = write_parquet_folder(tmp_path / "swapped", ["a"], np.zeros((1, C)), parts=1,
                                   labels=[mids[1], mids[0], *mids[2:]])
    proc = run_train("single", TINY + data + [f"train.output_dir={tmp_path / 'r2'}", f"distill.teacher={swapped}"])
    assert proc.returncode == 2 and f"distill.teacher's class 0 is {mids[1]!r}, data.train's {mids[0]!r}" in proc.stderr


@pytest.fixture(scope="module")
def kd_runs(tmp_path_factory):
    """2-process runs with a teacher (mixup, every augmentation on): uninterrupted (accelerate)
    and interrupted at step 5 then resumed (torchrun), as tests/test_train.py's exact-resume runs."""
    train_dir, eval_dir = session_shards(tmp_path_factory, 2.0)
    root = tmp_path_factory.mktemp("kd_runs")
    clips = shard_clips(train_dir)
    ids = sorted({ytid for i, (_, ytid, _) in enumerate(clips) if i % 4})  # a quarter of the clips unscored
    rng = np.random.default_rng(7)
    teacher = write_parquet_folder(root / "teacher", ids, rng.normal(0, 2, (len(ids), C)), parts=2)
    kd = ["distill.scores=logits", "distill.temperature=2", "distill.weight=0.7", f"distill.teacher={teacher}",
          f"distill.table_dir={root / 'table'}"]
    data = [f"data.train={train_dir}", f"data.eval={eval_dir}"]
    full = check(run_train("accelerate", COMMON + data + kd + [f"train.output_dir={root / 'full'}"]))
    part1 = check(run_train("torchrun", COMMON + data + kd + [f"train.output_dir={root / 'resumed'}",
                                                              "train.max_steps=5"]))
    part2 = check(run_train("torchrun", COMMON + data + kd + [f"train.output_dir={root / 'resumed'}", "--resume"]))
    return root, (full, part1, part2)


def test_two_processes_distil_in_sync_and_resume_exactly(kd_runs):
    root, (full_log, _, part2_log) = kd_runs
    s, r = summary(root / "full"), summary(root / "resumed")
    assert s["processes"] == 2 and s["finished"] and s["param_checksums"][0] == s["param_checksums"][1]
    assert "resumed from" in part2_log and "differ from the checkpoint's" not in part2_log
    a, b = load_file(str(root / "full" / "model.safetensors")), load_file(str(root / "resumed" / "model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a), "resumed weights differ from the uninterrupted run"
    assert s["param_checksums"] == r["param_checksums"]
    # both ranks read the one table; the clips without scores are counted over both, the same in both runs
    t = s["teacher"]
    assert t["table"] == str(root / "table") and t == r["teacher"]
    assert 0.1 < t["missing_clips_trained"] / t["clips_trained"] < 0.45, t
    assert t["eval"] is None and "no scores for any eval clip" in full_log
    assert full_log.count("memory-mapped from") == 1  # logged by the main process once
    ckpt = sorted((root / "resumed" / "checkpoints").glob("step_*"))[-1]
    saved = load_config(ckpt / "config.yaml")  # every checkpoint carries the distillation settings
    assert saved.distill.weight == 0.7 and saved.distill.scores == "logits" and saved.distill.temperature == 2.0


def test_the_archive_jobs_all_scores_folder_is_read_as_is(tmp_path):
    """A folder written by the archive job's own writer (tags/ and failures/ parts, settings in
    the metadata): the teacher reads its tags parts and checks its class list."""
    from audioset_dcls.tagging.archive_parquet import write_chunk

    labels = [{"index": i, "mid": m, "name": n} for i, (m, n) in enumerate(CLASSES)]
    settings = {"format": "x", "model": {"name": "convnext_atto", "num_classes": C, "task": "multilabel",
                                         "labels": labels}}
    options = {"all_scores": True, "per_window": False, "events": False, "embeddings": None}
    rng = np.random.default_rng(2)
    expected = {}
    for chunk, ids in enumerate((["aaaaaaaaaaa", "bbbbbbbbbbb"], ["ccccccccccc", "ddddddddddd"])):
        rows = []
        for cid in ids[:-1] if chunk else ids:  # the last input of chunk 1 failed
            scores = rng.uniform(0, 1, C).astype(np.float16)
            expected[cid] = scores
            rows.append({"id": cid, "path": f"/a/{cid}.wav", "chunk": chunk, "duration": 10.0, "sample_rate": 32000,
                         "num_windows": 1, "top_index": [0], "top_mid": [CLASSES[0][0]], "top_name": [CLASSES[0][1]],
                         "top_score": [0.5], "scores": scores})
        fails = [{"id": ids[-1], "path": "/a/x.wav", "chunk": chunk, "kind": "file", "reason": "corrupt"}
                 ] if chunk else []
        write_chunk(tmp_path / "job", chunk, ids, rows, fails, options, settings, {})
    assert (tmp_path / "job" / "failures").is_dir()
    table = TeacherTable(build_table(TeacherSource(str(tmp_path / "job")), tmp_path / "t", C))
    assert len(table) == 3 and table.labels == [m for m, _ in CLASSES]
    for cid, scores in expected.items():
        np.testing.assert_array_equal(table.row(cid), scores)
    assert table.row("ddddddddddd") is None
