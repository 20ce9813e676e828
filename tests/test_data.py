"""WebDataset loaders on shards built by the real builder from the synthetic mini AudioSet."""

from __future__ import annotations

import json
import os
import shutil
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
from audioset_dcls.features import FeatureConfig, Normalization
from audioset_dcls.shards.format import LOGMEL_EXT, LOGMEL_U8_EXT, encode_sample, hash_ids, read_manifest, sha256_file
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


def test_an_epoch_trains_on_every_clip_once_over_ranks_and_workers(tmp_path):
    """A small set: each epoch is a pass over the shards dealt to all ranks and workers (8 shards
    of 6 clips), or split clip by clip when the shards are fewer than the ranks x workers (2 of
    24), not shards drawn with replacement (which leaves ~1/3 of them out of an epoch)."""
    features = FeatureConfig(clip_seconds=2.0, n_mels=16)  # the synthesiser needs 2 s
    for per_shard in (6, 24):
        d = write_direct_shards(tmp_path / f"small{per_shard}", "train", 48, seed=4, features=features,
                                per_shard=per_shard)
        s = open_shard_set(d, "data.train")
        for world, workers in [(1, 0), (1, 2), (2, 2)]:
            cfg = DataConfig(batch_size=3, num_workers=workers, shuffle_buffer=20, shuffle_initial=5)
            epochs = []
            for epoch in (0, 1):
                keys = []
                for rank in range(world):
                    it, _ = build_train_loader(s, cfg, Normalization(), epoch=epoch, seed=1, rank=rank,
                                               world_size=world, accum=1)
                    keys += [k for b in it for k in b["keys"]]
                assert len(keys) == len(set(keys)) == 48, (per_shard, world, workers, epoch)
                epochs.append(keys)
            assert epochs[0] != epochs[1]  # each epoch a new order


def test_a_rank_that_fails_mid_epoch_exits_instead_of_waiting_on_its_workers(shards):
    """The workers ignore SIGTERM, which is how multiprocessing ends daemon children at exit: a
    rank whose epoch raises (its loader alive in the traceback) used to hang there forever."""
    import subprocess
    import sys

    train_dir, _ = shards
    script = (
        "import sys\n"
        "from audioset_dcls.config import DataConfig\n"
        "from audioset_dcls.data import build_train_loader, open_shard_set\n"
        "from audioset_dcls.features import Normalization\n"
        "s = open_shard_set(sys.argv[1], 'data.train')\n"
        "cfg = DataConfig(batch_size=4, num_workers=2, shuffle_buffer=20, shuffle_initial=5)\n"
        "it, _ = build_train_loader(s, cfg, Normalization(), epoch=0, seed=0, rank=0, world_size=1, accum=1)\n"
        "next(it)\n"
        "raise RuntimeError('failed mid-epoch')\n"
    )
    proc = subprocess.run([sys.executable, "-c", script, str(train_dir)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1 and "RuntimeError: failed mid-epoch" in proc.stderr


def test_a_new_loader_first_joins_the_feeder_threads_of_finished_ones(shards, monkeypatch):
    """Workers forked while a finished loader's feeder thread is still ending can hang in their
    start-up (CPython 3.11): a new loader joins those threads before it forks. Here the ending
    feeders are held back (as a busy machine would) and the new loader must wait for them."""
    import threading
    import time
    from multiprocessing.queues import Queue

    train_dir, _ = shards
    s = open_shard_set(train_dir, "data.train")
    first = iter(build_eval_loader(s, 4, 2, Normalization(), rank=0, world_size=1))
    feeders = [q._thread for q in first._index_queues]
    assert len(feeders) == 2 and all(f is not None and f.is_alive() for f in feeders)
    release = threading.Event()
    close = Queue.close

    def slow_close(self):  # the feeder sees the close only once released
        threading.Thread(target=lambda: (release.wait(), close(self)), daemon=True).start()

    monkeypatch.setattr(Queue, "close", slow_close)
    list(first)  # exhausted: shut down, its queues "closing"
    monkeypatch.undo()
    assert all(f.is_alive() for f in feeders)
    threading.Timer(0.5, release.set).start()
    t0 = time.monotonic()
    batches = list(build_eval_loader(s, 4, 2, Normalization(), rank=0, world_size=1))
    assert batches and time.monotonic() - t0 >= 0.5  # it waited for the release
    assert not any(f.is_alive() for f in feeders)


def test_loader_workers_leave_stop_signals_to_their_rank(shards):
    """A scheduler signals every process of a job, loader workers included: they must keep
    feeding the rank, which finishes its step and checkpoints (training.py)."""
    import signal

    train_dir, _ = shards
    s = open_shard_set(train_dir, "data.train")
    cfg = DataConfig(batch_size=4, num_workers=2, shuffle_buffer=20, shuffle_initial=5)

    def children() -> set[int]:
        return {int(p.parent.name) for p in Path("/proc").glob("[0-9]*/stat")
                if p.read_text().rsplit(")", 1)[1].split()[1] == str(os.getpid())}

    # Loader workers of earlier tests may still be shutting down: only count the new ones.
    before = children()
    it, per_rank = build_train_loader(s, cfg, Normalization(), epoch=0, seed=0, rank=0, world_size=1, accum=1)
    batches = [next(it)]
    workers = children() - before
    assert len(workers) == 2
    for pid in workers:
        for sig in (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT):
            os.kill(pid, sig)
    batches += list(it)
    assert len(batches) == per_rank


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
    # Append malformed samples (bad bytes in either encoding) and one with a missing member to the tar.
    tar_path = d / "eval-000000.tar"
    good = list(wds.WebDataset(str(tar_path), shardshuffle=False))
    with wds.TarWriter(str(tar_path)) as w:
        for g in good:
            w.write({k: v for k, v in g.items() if not k.startswith("__") or k == "__key__"})
        for key, encoding, member in (("broken_0", "uint8", LOGMEL_U8_EXT), ("broken16_0", "float16", LOGMEL_EXT)):
            bad = encode_sample(key, np.zeros((128, 3)), [0], {}, encoding)
            bad[member] = b"not a log-mel"
            w.write(bad)
        w.write({"__key__": "nojson_0", LOGMEL_U8_EXT: encode_sample("x", np.zeros((2, 2)), [], {})[LOGMEL_U8_EXT]})
    # The tar changed after its manifest was written: a shard that goes bad during a run, after
    # the start-up check (which would refuse it: see test_damaged_shards_...).
    with pytest.raises(DataError, match="eval-000000.tar has"):
        open_shard_set(d, "data.eval")
    s = open_shard_set(d, "data.eval", verify="none")
    batches = list(build_eval_loader(s, 4, 0, Normalization(), rank=0, world_size=1))
    assert sum(len(b["keys"]) for b in batches) == 6
    assert batches[-1]["corrupt"] == 3
    assert "broken_0" in caplog.text and "broken16_0" in caplog.text and "nojson_0" in caplog.text


def test_loaders_read_both_encodings_alike(tmp_path, shards):
    """The same clips stored as uint8 and as float16 give the same batches, to the encoding's bound;
    the session's shards (built with the default) are uint8."""
    train_dir, _ = shards
    assert read_manifest(train_dir)["encoding"]["name"] == "uint8"
    features = open_shard_set(train_dir, "data.train").features
    norm = Normalization()
    batches = {}
    for encoding in ("uint8", "float16"):
        d = write_direct_shards(tmp_path / encoding, "eval", 6, seed=2, features=features, per_shard=3,
                                encoding=encoding)
        member = LOGMEL_U8_EXT if encoding == "uint8" else LOGMEL_EXT
        with tarfile.open(d / "eval-000000.tar") as tar:
            assert all(m.name.endswith((member, ".json")) for m in tar)
        batches[encoding] = list(build_eval_loader(open_shard_set(d, "data.eval"), 4, 0, norm, rank=0, world_size=1))
    a, b = batches["uint8"], batches["float16"]
    assert [x["keys"] for x in a] == [x["keys"] for x in b] and sum(len(x["keys"]) for x in a) == 6
    for x, y in zip(a, b):
        assert torch.equal(x["y"], y["y"])
        assert (x["x"] - y["x"]).abs().max().item() * norm.std <= 0.3125 + 0.05  # + float16 rounding


def test_damaged_shards_are_one_line_before_training_and_the_command_it_names_repairs_them(tmp_path, shards):
    from audioset_dcls.shards.build import BuildOptions, build_shards

    train_dir, _ = shards
    d = tmp_path / "train"
    shutil.copytree(train_dir, d)
    names = [s["name"] for s in read_manifest(d)["shards"]]
    digests = {n: sha256_file(d / n) for n in names}
    os.truncate(d / names[1], 1000)  # a copy cut short
    (d / names[4]).unlink()  # a shard lost
    with pytest.raises(DataError) as err:
        open_shard_set(d, "data.train")
    line = str(err.value)
    assert "\n" not in line and f"data.train={d}: 2 of {len(names)} shards" in line
    assert f"{names[1]} has 1000 bytes, the manifest says" in line and f"{names[4]} is missing" in line
    command = line.split("rebuilds these): ")[1]
    assert command.startswith("python -m preprocessing.build_shards --split train --segments ")
    assert f"--shard-size 16 --seed 0 --encoding uint8 --out {d}" in command
    # same size, other bytes: only the full check sees it
    damaged = bytearray((d / names[2]).read_bytes())
    damaged[5000] ^= 0xFF
    (d / names[2]).write_bytes(bytes(damaged))
    with pytest.raises(DataError, match=f"3 of {len(names)} shards.*{names[2]} has another sha256"):
        open_shard_set(d, "data.train", verify="sha256")

    # The command it names, with the labels and audio folder filled in (as in train_shards.py):
    audio = train_dir.parents[1] / "audioset"
    args = command.split()
    segments = tuple(Path(a) for a in args[args.index("--segments") + 1 : args.index("--labels")])
    result = build_shards(BuildOptions(segments=segments, labels=audio / "class_labels_indices.csv",
                                       audio_dir=audio / "audio", out=d, split="train", workers=0, shard_size=16,
                                       progress=False,
                                       feature_config=FeatureConfig.from_dict(read_manifest(d)["feature_config"])))
    assert sorted(result.shards_written) == sorted([names[1], names[2], names[4]])
    assert {n: sha256_file(d / n) for n in names} == digests
    assert open_shard_set(d, "data.train", verify="sha256").num_samples == read_manifest(train_dir)["num_samples"]


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
