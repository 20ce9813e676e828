"""WebDataset loaders on shards built by the real builder from the synthetic mini AudioSet."""

from __future__ import annotations

import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
import webdataset as wds

from audioset_dcls.config import DataConfig
from audioset_dcls.data import (
    DataError,
    build_eval_loader,
    build_train_loader,
    count_labels,
    open_shard_set,
    resolve_normalization,
    train_batches_per_rank,
)
from audioset_dcls.features import Normalization
from audioset_dcls.shards import encode_sample, hash_ids, read_manifest
from train_shards import session_shards, write_direct_shards


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    return session_shards(tmp_path_factory, 2.0)


def read_truth(shard_dir: Path) -> dict[str, list[int]]:
    """key -> labels, straight from the tars (independent of the loader)."""
    out = {}
    for s in read_manifest(shard_dir)["shards"]:
        with tarfile.open(shard_dir / s["name"]) as tar:
            for m in tar:
                if m.name.endswith(".json"):
                    out[m.name.split(".", 1)[0]] = json.load(tar.extractfile(m))["labels"]
    return out


def test_missing_and_empty_paths_are_clear_errors(tmp_path):
    with pytest.raises(DataError, match="data.train is not set"):
        open_shard_set("", "data.train")
    with pytest.raises(DataError, match=r"data\.eval=.*nope: no such directory"):
        open_shard_set(tmp_path / "nope", "data.eval")
    with pytest.raises(DataError, match=r"data\.train=.*no shard manifest"):
        open_shard_set(tmp_path, "data.train")


def test_eval_loader_sees_every_clip_once_over_ranks_and_workers(shards):
    _, eval_dir = shards
    s = open_shard_set(eval_dir, "data.eval")
    truth = read_truth(eval_dir)
    assert s.num_samples == len(truth) and len(s.urls) >= 3
    for world, workers in [(1, 0), (1, 2), (2, 2), (3, 1), (5, 2)]:  # 5 ranks: some get no shard
        keys = []
        for rank in range(world):
            for b in build_eval_loader(s, 5, workers, Normalization(), rank=rank, world_size=world):
                keys += b["keys"]
                for k, y in zip(b["keys"], b["y"]):
                    assert sorted(torch.nonzero(y).ravel().tolist()) == truth[k]
        assert len(keys) == len(set(keys)) == len(truth), (world, workers)
        assert hash_ids(keys) == read_manifest(eval_dir)["clip_ids_sha256"]


def test_train_batches_shapes_targets_and_normalisation(shards):
    train_dir, _ = shards
    s = open_shard_set(train_dir, "data.train")
    truth = read_truth(train_dir)
    cfg = DataConfig(batch_size=8, num_workers=0, shuffle_buffer=50, shuffle_initial=10)
    it, per_rank = build_train_loader(s, cfg, Normalization(), epoch=0, seed=0, rank=0, world_size=1, accum=1)
    batches = list(it)
    assert len(batches) == per_rank == train_batches_per_rank(s.num_samples, 8, 1, 0, 1)
    b = batches[0]
    assert b["x"].shape == (8, 1, 128, s.features.num_frames) and b["x"].dtype == torch.float32
    assert b["y"].shape == (8, s.num_classes)
    for k, y in zip(b["keys"], b["y"]):
        assert sorted(torch.nonzero(y).ravel().tolist()) == truth[k]
    # Reference normalisation: raw dB back from the normalised batch.
    raw = b["x"] * 30.5735 - 18.2696
    assert raw.max().item() < 80 and raw.min().item() >= -100.1


def test_train_stream_is_reproducible_per_epoch_and_resumes_mid_epoch(shards):
    train_dir, _ = shards
    s = open_shard_set(train_dir, "data.train")
    cfg = DataConfig(batch_size=4, num_workers=2, shuffle_buffer=40, shuffle_initial=10)

    def keys(epoch, skip=0, rank=0):
        it, _ = build_train_loader(s, cfg, Normalization(), epoch=epoch, seed=3, rank=rank, world_size=2, accum=2,
                                   skip_batches=skip)
        return [tuple(b["keys"]) for b in it]

    full = keys(0)
    assert len(full) % 2 == 0  # whole optimizer steps (accum 2), equal for both workers
    assert keys(0) == full
    assert keys(1) != full and keys(0, rank=1) != full
    for skip in (1, 2, 5):  # odd skips: the main process drops the remainder of the round-robin
        assert keys(0, skip=skip) == full[skip:]


def test_train_batches_per_rank_arithmetic():
    assert train_batches_per_rank(1000, 10, 2, 0, 1) == 50
    assert train_batches_per_rank(1000, 10, 2, 4, 1) == 52  # 13 per worker
    n = train_batches_per_rank(1000, 10, 2, 4, 6)
    assert n % 6 == 0 and n % 4 == 0 and n * 10 * 2 >= 1000


def test_normalisation_choices(shards):
    train_dir, _ = shards
    s = open_shard_set(train_dir, "data.train")
    assert resolve_normalization(DataConfig(), s) == Normalization()
    stats = read_manifest(train_dir)["normalization"]
    assert resolve_normalization(DataConfig(normalization="manifest"), s) == Normalization(stats["mean"], stats["std"])
    assert resolve_normalization(DataConfig(norm_mean=1.0, norm_std=2.0), s) == Normalization(1.0, 2.0)


def test_corrupt_samples_are_logged_counted_and_skipped(tmp_path, shards, caplog):
    train_dir, _ = shards
    features = open_shard_set(train_dir, "data.train").features
    d = write_direct_shards(tmp_path / "bad", "eval", 6, seed=1, features=features, per_shard=6)
    # Append a malformed sample (bad npy bytes) and one with a missing member to the tar.
    tar_path = d / "eval-000000.tar"
    good = list(wds.WebDataset(str(tar_path), shardshuffle=False))
    with wds.TarWriter(str(tar_path)) as w:
        for g in good:
            w.write({k: v for k, v in g.items() if not k.startswith("__") or k == "__key__"})
        bad = encode_sample("broken_0", np.zeros((128, 3)), [0], {})
        bad["logmel.npy"] = b"not a numpy file"
        w.write(bad)
        w.write({"__key__": "nojson_0", "logmel.npy": encode_sample("x", np.zeros((2, 2)), [], {})["logmel.npy"]})
    s = open_shard_set(d, "data.eval")
    batches = list(build_eval_loader(s, 4, 0, Normalization(), rank=0, world_size=1))
    assert sum(len(b["keys"]) for b in batches) == 6
    assert batches[-1]["corrupt"] == 2
    assert "broken_0" in caplog.text and "nojson_0" in caplog.text


def test_class_balanced_sampling_counts_and_stream(shards):
    train_dir, _ = shards
    s = open_shard_set(train_dir, "data.train")
    truth = read_truth(train_dir)
    expected = np.zeros(s.num_classes, int)
    for labels in truth.values():
        expected[labels] += 1
    assert np.array_equal(count_labels(s), expected)
    cfg = DataConfig(batch_size=4, num_workers=0, class_balanced=True, balance_power=1.0, shuffle_buffer=20,
                     shuffle_initial=5)
    it, per_rank = build_train_loader(s, cfg, Normalization(), epoch=0, seed=0, rank=0, world_size=1, accum=1)
    assert sum(1 for _ in it) == per_rank
