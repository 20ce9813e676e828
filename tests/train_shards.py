"""Shard sets for the training tests, built once per test session and reused (cached on disk
under pytest's base temp dir, so every test module of a session shares them).

``build_shards``: the synthetic mini AudioSet (audioset_dcls.synthetic, with its corrupt, empty
and missing clips) through the real shard builder (preprocessing.build_shards, called in-process),
optionally with a shorter clip so the multi-process tests stay fast (the FeatureConfig travels
in the manifest). ``write_direct_shards``: a few clips written directly with
``shards.encode_sample`` + ``webdataset.TarWriter``, for tests that tamper with a tar.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from audioset_dcls.features import FeatureConfig, compute_logmel
from audioset_dcls.shards.format import MANIFEST_FORMAT, LogmelEncoding, encode_sample, hash_ids, sha256_file
from audioset_dcls.synthetic import CLASSES, make_mini_audioset, synthesize_clip

REPO_ROOT = Path(__file__).resolve().parents[1]


def write_direct_shards(out: Path, split: str, num: int, seed: int, features: FeatureConfig,
                        per_shard: int = 16, encoding: str = "uint8") -> Path:
    """Synthetic clips -> log-mel -> tars + sizes.json + manifest.json (the builder's manifest fields the loaders read)."""
    import webdataset as wds

    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    shards, keys = [], []
    for start in range(0, num, per_shard):
        name = f"{split}-{len(shards):06d}.tar"
        with wds.TarWriter(str(out / name)) as w:
            n = min(per_shard, num - start)
            for i in range(start, start + n):
                k = int(rng.choice([1, 2, 3], p=[0.5, 0.35, 0.15]))
                labels = sorted(int(c) for c in rng.choice(len(CLASSES), size=k, replace=False))
                wave = synthesize_clip(labels, features.clip_seconds, features.sample_rate, rng)
                key = f"clip{seed:03d}x{i:05d}_0"
                w.write(encode_sample(key, compute_logmel(wave, features), labels,
                                      {"ytid": key[:-2], "start": 0.0, "end": 10.0}, encoding))
                keys.append(key)
        shards.append({"name": name, "count": n, "bytes": (out / name).stat().st_size, "sha256": sha256_file(out / name)})
    manifest = {
        "format": MANIFEST_FORMAT, "split": split, "feature_config": features.to_dict(),
        "encoding": LogmelEncoding(encoding).to_dict(),
        "labels": {"mids": [m for m, _ in CLASSES], "names": [nm for _, nm in CLASSES]},
        "shards": shards, "clip_ids_sha256": hash_ids(keys), "skipped": [],
    }
    (out / "manifest.json").write_text(json.dumps(manifest, indent=1))
    (out / "sizes.json").write_text(json.dumps({s["name"]: s["count"] for s in shards}))
    return out


def build_shards(root: Path, num_train: int, num_eval: int, clip_seconds: float, seed: int = 0,
                 per_shard: int = 16) -> tuple[Path, Path]:
    """(train shard dir, eval shard dir) of the mini AudioSet under ``root``, with
    ``clip_seconds`` clips (reused if already built; the audio is shared by all clip lengths)."""
    out = root / f"shards_{clip_seconds:g}s"
    train_dir, eval_dir = out / "train", out / "eval"
    if (out / "DONE").is_file():
        return train_dir, eval_dir
    from audioset_dcls.shards.build import BuildOptions, build_shards as run_builder

    features = FeatureConfig(clip_seconds=clip_seconds)
    audio = root / "audioset"
    if not (audio / "DONE").is_file():
        make_mini_audioset(audio, num_train=num_train, num_eval=num_eval, seed=seed, broken=True)
        (audio / "DONE").write_text("ok")
    labels_csv = audio / "class_labels_indices.csv"
    segments = {"train": audio / "balanced_train_segments.csv", "eval": audio / "eval_segments.csv"}
    for split, split_dir in (("train", train_dir), ("eval", eval_dir)):
        run_builder(BuildOptions(segments=(segments[split],), labels=labels_csv, audio_dir=audio / "audio",
                                 out=split_dir, split=split, workers=0, shard_size=per_shard, progress=False,
                                 feature_config=features))
    (out / "DONE").write_text("ok")
    return train_dir, eval_dir


NUM_TRAIN, NUM_EVAL = 128, 48


def session_shards(tmp_path_factory, clip_seconds: float) -> tuple[Path, Path]:
    """The session's mini AudioSet shards (one audio set; one shard set per clip length)."""
    return build_shards(tmp_path_factory.getbasetemp() / "mini_audioset", NUM_TRAIN, NUM_EVAL, clip_seconds)


def own_shards(tmp_path_factory, clip_seconds: float = 2.0) -> tuple[Path, Path]:
    """(train, eval) shards of the session's own-label set (audioset_dcls.synthetic's
    make_own_dataset, five single-label classes of their own names): fold 1 trains, fold 2
    evaluates with the train class list. Built once per session."""
    root = tmp_path_factory.getbasetemp() / "own_data"
    train_dir, eval_dir = root / f"shards_{clip_seconds:g}s" / "train", root / f"shards_{clip_seconds:g}s" / "eval"
    if (root / f"shards_{clip_seconds:g}s" / "DONE").is_file():
        return train_dir, eval_dir
    from audioset_dcls.shards.build import BuildOptions, build_shards as run_builder
    from audioset_dcls.synthetic import make_own_dataset

    ds = make_own_dataset(root / "audio", per_class=12, folds=2, seconds=3.0)
    features = FeatureConfig(clip_seconds=clip_seconds)
    for split, out, fold, classes in (("train", train_dir, ds.folds[0], None), ("eval", eval_dir, ds.folds[1], train_dir)):
        run_builder(BuildOptions(lists=(fold,), classes=classes, out=out, split=split, workers=0, shard_size=16,
                                 progress=False, feature_config=features))
    (root / f"shards_{clip_seconds:g}s" / "DONE").write_text("ok")
    return train_dir, eval_dir


def train_tiny_run(tmp_path_factory) -> tuple[Path, str]:
    """(run dir, log) of configs/tiny.yaml trained on the session's 10 s mini AudioSet shards for
    4 epochs in one process: the session's trained model (``model.safetensors``, with thresholds
    calibrated by its final evaluation), shared by the learnability, events and live-input tests."""
    import os
    import subprocess
    import sys

    train_dir, eval_dir = session_shards(tmp_path_factory, 10.0)
    out = tmp_path_factory.getbasetemp() / "trained_tiny"
    if (out / "summary.json").is_file():
        return out, (out / "train.log").read_text()
    env = dict(os.environ, OMP_NUM_THREADS="2", MKL_NUM_THREADS="2", PYTHONUNBUFFERED="1")
    proc = subprocess.run([sys.executable, "train.py", "--config", "configs/tiny.yaml", f"data.train={train_dir}",
                           f"data.eval={eval_dir}", f"train.output_dir={out}", "schedule.epochs=4",
                           "eval.every_epochs=4", "train.progress_bar=false"],
                          cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=900)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-5000:]
    (out / "train.log").write_text(log)
    return out, log
