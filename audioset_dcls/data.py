"""WebDataset loaders for training and evaluation, as flat lists of named stages (open_clip order).

Training (one loader per epoch, so the epoch is part of every seed and a resumed run rebuilds
exactly the stream it left)::

    shard passes      -- passes over the shards, each a permutation seeded by (seed, epoch,
                         pass) and dealt round-robin to every rank's workers (split_by_node and
                         split_by_worker for an endless stream; clip by clip when the shards
                         are fewer than the workers); corrupt tars and members are
                         logged and counted, not fatal; each worker shuffles its part of a pass
                         in a buffer seeded by (seed, epoch, rank, worker, pass)
    balance           -- optional class-balanced rejection sampling (off by default)
    decode            -- shards.decode_sample, shape check, normalise, multi-hot targets
    batch             -- (B, 1, n_mels, T) float32, (B, num_classes) float32, keys
    epoch slice       -- a fixed number of batches per worker (open_clip's with_epoch), minus
                         the batches a resumed run has already trained on
    Loader (a DataLoader that shuts its workers down at exit)

Evaluation: the ordered shard list is split by node (shard i goes to rank i % world) and by
worker, never resampled or padded, so every clip is seen exactly once over all ranks and
workers; the loop gathers (key, scores, targets) and checks there are no duplicates.

Batches stay on the CPU; the training loop moves them to its device. They are never passed to
``accelerator.prepare``, which would re-split (or dispatch from rank 0) a stream that is
already split by node.
"""

from __future__ import annotations

import atexit
import json
import logging
import math
import random
import tarfile
import weakref
from dataclasses import dataclass
from itertools import count, islice
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import torch
import webdataset as wds

from .config import DataConfig
from .features import REFERENCE_NORMALIZATION, FeatureConfig, Normalization
from .labels import LabelSet
from .preemption import ignore_stop_signals
from .shards.format import (
    META_EXT,
    check_shard_files,
    decode_sample,
    list_shards,
    read_manifest,
    rebuild_command,
)
from .teacher import TeacherTable

log = logging.getLogger(__name__)

__all__ = [
    "ShardSet",
    "DataError",
    "open_shard_set",
    "resolve_normalization",
    "train_batches_per_rank",
    "build_train_loader",
    "build_eval_loader",
    "move_batch",
    "Loader",
    "count_labels",
    "derive_seed",
]


class DataError(RuntimeError):
    """Shard paths are missing or empty; the message says which and what to do."""


@dataclass(frozen=True)
class ShardSet:
    """A shard directory as the loaders need it (read from its manifest.json)."""

    root: Path
    urls: tuple[str, ...]
    num_samples: int
    features: FeatureConfig
    labels: tuple[dict, ...]  # [{"index", "mid", "name"}]
    manifest: dict

    @property
    def num_classes(self) -> int:
        return len(self.labels)


def open_shard_set(path: str | Path, what: str, verify: str = "size") -> ShardSet:
    """Read and check a shard directory. ``what`` names it in errors (e.g. ``data.train``).

    ``verify``: every shard the manifest lists must exist with its recorded size ("size",
    cheap), also its sha256 ("sha256", parallel) or nothing is checked ("none"). A damaged set
    is one DataError naming the shards and the command that rebuilds them, before any training;
    a shard that goes bad later is skipped and counted by the loaders."""
    if not str(path):
        raise DataError(f"{what} is not set: give the shard directory, e.g. {what}=/data/shards/{what.split('.')[-1]}")
    root = Path(path)
    if not root.is_dir():
        raise DataError(f"{what}={root}: no such directory (build shards with `python -m preprocessing.build_shards`)")
    try:
        manifest = read_manifest(root)
        bad = check_shard_files(root, manifest, verify)
        if bad:
            raise DataError(_damaged_shards_line(what, root, manifest, bad))
        paths = list_shards(root)
    except (FileNotFoundError, ValueError) as err:
        raise DataError(f"{what}={root}: {err}") from None
    counts = [int(s["count"]) for s in manifest["shards"]]
    if not paths or sum(counts) == 0:
        raise DataError(f"{what}={root}: the manifest lists no samples (all clips skipped?)")
    labels = LabelSet.from_dict(manifest["labels"]).to_records() if manifest.get("labels") else []
    if not labels:
        raise DataError(f"{what}={root}: the manifest has no label list")
    if "feature_config" not in manifest:
        raise DataError(f"{what}={root}: the manifest has no feature_config")
    features = FeatureConfig.from_dict(manifest["feature_config"])
    return ShardSet(root=root, urls=tuple(str(p) for p in paths), num_samples=sum(counts), features=features,
                    labels=tuple(labels), manifest=manifest)


def _damaged_shards_line(what: str, root: Path, manifest: dict, bad: list[tuple[str, str]]) -> str:
    listed = "; ".join(f"{name} {problem}" for name, problem in bad[:3]) + (f"; and {len(bad) - 3} more" if len(bad) > 3 else "")
    return (f"{what}={root}: {len(bad)} of {len(manifest['shards'])} shards are not as the manifest records them: "
            f"{listed}. Re-run the command that built the folder (it keeps the intact shards and rebuilds these): "
            f"{rebuild_command(root, manifest)}")


def _manifest_stats(manifest: dict) -> tuple[float, float] | None:
    d = manifest.get("normalization")  # the builder's mean/std of the stored dB values
    if isinstance(d, dict) and "mean" in d and "std" in d:
        return float(d["mean"]), float(d["std"])
    return None


def resolve_normalization(cfg: DataConfig, train: ShardSet | None) -> Normalization:
    """Explicit data.norm_mean/std, else the train manifest's stats ("manifest"), else the
    reference's (features.REFERENCE_NORMALIZATION)."""
    if cfg.norm_mean is not None:
        return Normalization(mean=float(cfg.norm_mean), std=float(cfg.norm_std))
    if cfg.normalization == "manifest":
        stats = _manifest_stats(train.manifest) if train is not None else None
        if stats is None:
            raise DataError("data.normalization=manifest but the train manifest has no feature mean/std")
        return Normalization(mean=stats[0], std=stats[1])
    return REFERENCE_NORMALIZATION


# ----------------------------------------------------------------------------------- stages


class CorruptCounter:
    """Handler for WebDataset stages: log the error, count it, keep going.

    Each loader worker holds its own copy; its running count travels with every batch
    (``batch["corrupt"]``) so the main process can report a total.
    """

    def __init__(self) -> None:
        self.count = 0

    def __call__(self, exn: Exception) -> bool:
        self.count += 1
        log.warning("skipping corrupt sample (%d so far in this worker): %s", self.count, exn)
        return True


def _worker() -> tuple[int, int]:
    info = torch.utils.data.get_worker_info()
    return (0, 1) if info is None else (info.id, info.num_workers)


def derive_seed(*parts: int) -> int:
    """A 63-bit seed from integers (seed, epoch, rank, worker, stream, ...): the one way every
    random stream of training is seeded. Python's hash of a tuple of ints is stable across
    processes and runs (no string hashing), so a resumed run rebuilds the same streams."""
    return hash(tuple(int(p) for p in parts)) & 0x7FFFFFFFFFFFFFFF


def _skip_quietly(exn: Exception) -> bool:
    return True


class ShardPasses(torch.utils.data.IterableDataset):
    """Infinite stream of training samples: passes over the shard list, each pass a fresh seeded
    permutation of all shards, shared by every rank and worker (seeded by (seed, epoch, pass)).

    With at least as many shards as ``world_size x workers`` consumers, the concatenated passes
    are dealt to the consumers shard by shard (round-robin), so within a pass no two consumers
    read the same shard. With fewer shards (a small set: 1,600 clips are two 1,000-clip shards,
    against 4 loader workers) every consumer reads the whole pass and keeps every
    ``consumers``-th sample. Each consumer shuffles its part of a pass through its buffer and
    drains the buffer at the pass end. So an epoch trains on every clip exactly once, whatever
    the consumer count, when the shards are fewer than the consumers or a multiple of them, and
    within a shard of it otherwise. Drawing shards with replacement instead (open_clip's resampled
    shards) leaves a third of a 5-shard set out of each epoch and repeats another third: fine for
    AudioSet's thousands of shards, not for a few hundred clips (docs/finetune.md).
    """

    def __init__(self, urls: tuple[str, ...], *, seed: int, epoch: int, rank: int, world_size: int,
                 buffer: int, initial: int, handler: Callable[[Exception], bool]):
        super().__init__()
        self.urls, self.seed, self.epoch, self.rank, self.world_size = urls, seed, epoch, rank, world_size
        self.buffer, self.initial, self.handler = buffer, initial, handler

    def __iter__(self) -> Iterator[dict]:
        worker, workers = _worker()
        consumers, me = self.world_size * workers, self.rank * workers + worker
        n = len(self.urls)
        for k in count():
            order = np.random.default_rng(derive_seed(self.seed, self.epoch, k, 1)).permutation(n)
            if n >= consumers:  # positions k*n + i of the concatenated passes, dealt round-robin
                mine = [{"url": self.urls[order[i]]} for i in range(n) if (k * n + i) % consumers == me]
            else:  # every shard, and below only this consumer's samples of them
                mine = [{"url": self.urls[i]} for i in order]
            if not mine:
                continue
            # every consumer meets a damaged member of a shard all of them read: one of them reports it
            handler = self.handler if n >= consumers or me == 0 else _skip_quietly
            samples = wds.tarfile_to_samples(handler=handler)(iter(mine))
            if n < consumers:
                samples = islice(samples, me, None, consumers)
            rng = random.Random(derive_seed(self.seed, self.epoch, self.rank, worker, 2, k))
            yield from wds.filters._shuffle(samples, self.buffer, self.initial, rng)


class ShardUrls(torch.utils.data.IterableDataset):
    """A fixed, ordered list of shards as ``{"url": ...}`` (may be empty, unlike wds.SimpleShardList)."""

    def __init__(self, urls: list[str]):
        super().__init__()
        self.urls = list(urls)

    def __iter__(self) -> Iterator[dict]:
        return iter([{"url": u} for u in self.urls])


def _balance_stage(weights: np.ndarray, power: float, seed: int, epoch: int, rank: int):
    """Rejection sampling: keep a clip with probability max_l(w_l) / max(w) where
    w_l = (1 / freq_l) ** power over its labels. Reads only the JSON member (cheap)."""
    w = np.power(weights, power)
    w = w / w.max()

    def stage(src):
        worker, _ = _worker()
        rng = random.Random(derive_seed(seed, epoch, rank, worker, 3))
        for sample in src:
            try:
                labels = json.loads(sample[META_EXT])["labels"]
                accept = float(w[labels].max()) if labels else float(w.min())
            except Exception:  # malformed: let decode log and count it
                accept = 1.0
            if rng.random() < accept:
                yield sample

    return stage


def teacher_row(teacher: TeacherTable, key: str, meta: dict) -> np.ndarray | None:
    """A sample's teacher scores (C,): by its JSON ``ytid`` (AudioSet's YouTube id, or the id the
    builder gave an own-data clip), else by its sample key ``<ytid>_<start_ms>``; None if neither."""
    row = teacher.row(str(meta["ytid"])) if meta.get("ytid") else None
    return row if row is not None else teacher.row(key)


def _decode_stage(features: FeatureConfig, norm: Normalization, num_classes: int, counter: CorruptCounter,
                  teacher: TeacherTable | None = None):
    expected = (features.n_mels, features.num_frames)

    def stage(src):
        for raw in src:
            try:
                s = decode_sample(raw)
                if s.logmel.shape != expected:
                    raise ValueError(f"sample {s.key}: log-mel {s.logmel.shape}, expected {expected}")
                if any(not 0 <= i < num_classes for i in s.labels):
                    raise ValueError(f"sample {s.key}: label index out of range in {s.labels}")
            except ValueError as err:
                counter(err)
                continue
            # decode_sample gives a fresh float32 array (either encoding): normalise it in place
            x = norm.apply_(torch.from_numpy(s.logmel))[None]  # (1, M, T)
            y = torch.zeros(num_classes, dtype=torch.float32)
            y[s.labels] = 1.0
            out = {"key": s.key, "x": x, "y": y}
            if teacher is not None:
                out["t"] = teacher_row(teacher, s.key, s.meta)
            yield out

    return stage


def _collate_teacher(samples: list[dict]) -> dict:
    """``teacher`` (B, C) float32 (zeros where a clip has no scores) and ``has_teacher`` (B,) bool."""
    has = torch.tensor([s["t"] is not None for s in samples])
    c = samples[0]["y"].shape[0]
    t = torch.stack([torch.from_numpy(s["t"].astype(np.float32)) if s["t"] is not None else torch.zeros(c)
                     for s in samples])
    return {"teacher": t, "has_teacher": has}


def _batch_stage(batch_size: int, partial: bool, counter: CorruptCounter):
    def collate(samples: list[dict]) -> dict:
        worker, _ = _worker()
        batch = {
            "x": torch.stack([s["x"] for s in samples]),
            "y": torch.stack([s["y"] for s in samples]),
            "keys": [s["key"] for s in samples],
            "worker": worker,
            "corrupt": counter.count,
        }
        if "t" in samples[0]:
            batch.update(_collate_teacher(samples))
        return batch

    return wds.batched(batch_size, collation_fn=collate, partial=partial)


def _epoch_slice_stage(batches_per_worker: int, skip_per_worker: int):
    def stage(src):
        return islice(src, skip_per_worker, batches_per_worker)

    return stage


# ---------------------------------------------------------------------------------- loaders


def train_batches_per_rank(samples_per_epoch: int, batch_size: int, world_size: int, num_workers: int, accum: int) -> int:
    """Batches each rank trains on per epoch: at least ``samples_per_epoch`` over all ranks,
    equal for every loader worker, and a whole number of optimizer steps (a multiple of ``accum``)."""
    workers = max(1, num_workers)
    per_worker = math.ceil(samples_per_epoch / (world_size * batch_size * workers))
    step = accum // math.gcd(workers, accum)  # per_worker * workers must be a multiple of accum
    per_worker = max(step, math.ceil(per_worker / step) * step)
    return per_worker * workers


_LABEL_COUNTS: dict[tuple[str, ...], np.ndarray] = {}


def count_labels(shards: ShardSet) -> np.ndarray:
    """Positives per class (num_classes,) over a shard set, reading only the JSON members
    (tar headers let the data members be skipped). Used by class-balanced sampling; counted
    once per process (the manifest has no per-class counts), not once per epoch."""
    if shards.urls in _LABEL_COUNTS:
        return _LABEL_COUNTS[shards.urls]
    counts = np.zeros(shards.num_classes, dtype=np.int64)
    for url in shards.urls:
        with tarfile.open(url, "r") as tar:
            for member in tar:
                if member.name.endswith("." + META_EXT):
                    labels = json.load(tar.extractfile(member))["labels"]
                    np.add.at(counts, labels, 1)
    _LABEL_COUNTS[shards.urls] = counts
    return counts


def labels_per_clip(shards: ShardSet) -> tuple[int, int]:
    """(fewest, most) labels of a clip in the set: the manifest's ``labels_per_clip``, or, for
    sets built before the builder recorded it, counted from the JSON members (as count_labels)."""
    recorded = shards.manifest.get("labels_per_clip")
    if recorded:
        return int(recorded["min"]), int(recorded["max"])
    lo, hi = None, 0
    for url in shards.urls:
        with tarfile.open(url, "r") as tar:
            for member in tar:
                if member.name.endswith("." + META_EXT):
                    n = len(json.load(tar.extractfile(member))["labels"])
                    lo, hi = n if lo is None else min(lo, n), max(hi, n)
    return lo or 0, hi


def build_train_loader(
    shards: ShardSet, cfg: DataConfig, norm: Normalization, *, epoch: int, seed: int, rank: int, world_size: int,
    accum: int, skip_batches: int = 0, teacher: TeacherTable | None = None,
) -> tuple[Iterator[dict], int]:
    """Training batches of one epoch for this rank.

    Each batch is ``{"x": (B, 1, n_mels, T) float32, "y": (B, num_classes) float32, "keys": [B str],
    "worker": int, "corrupt": int}``; with a ``teacher`` table also ``"teacher"`` (B, num_classes)
    float32, the stored scores (zeros where missing), and ``"has_teacher"`` (B,) bool.

    ``skip_batches``: batches of this epoch this rank already trained on (resume). The stream is
    replayed from the epoch start and the first ``skip_batches`` batches dropped, so the rest is
    exactly what an uninterrupted run would see (the skipped batches are decoded, not trained on).

    Returns ``(iterator, batches_per_rank)``, where batches_per_rank counts the whole epoch.
    """
    samples = cfg.samples_per_epoch or shards.num_samples
    workers = cfg.num_workers
    per_rank = train_batches_per_rank(samples, cfg.batch_size, world_size, workers, accum)
    w = max(1, workers)
    counter = CorruptCounter()
    stages: list[Any] = [
        ShardPasses(shards.urls, seed=seed, epoch=epoch, rank=rank, world_size=world_size,
                    buffer=cfg.shuffle_buffer, initial=cfg.shuffle_initial, handler=counter),
    ]
    if cfg.class_balanced:
        freq = count_labels(shards)
        stages.append(_balance_stage(1.0 / np.maximum(freq, 1.0), cfg.balance_power, seed, epoch, rank))
    stages += [
        _decode_stage(shards.features, norm, shards.num_classes, counter, teacher),
        _batch_stage(cfg.batch_size, partial=False, counter=counter),
        # The DataLoader takes batches from workers round-robin (worker i % w gives batch i):
        # every worker drops skip // w of its own, the main process the first skip % w.
        _epoch_slice_stage(per_rank // w, skip_batches // w),
    ]
    pipeline = wds.DataPipeline(*stages)
    loader = Loader(pipeline, batch_size=None, shuffle=False, num_workers=workers,
                    pin_memory=torch.cuda.is_available(), persistent_workers=False, worker_init_fn=ignore_stop_signals)
    it = iter(loader)
    for _ in range(skip_batches % w):
        next(it)
    return it, per_rank


def build_eval_loader(shards: ShardSet, batch_size: int, num_workers: int, norm: Normalization, *, rank: int,
                      world_size: int) -> Loader:
    """Ordered evaluation batches for this rank (same dict as training, last batch partial).

    Shard i goes to rank i % world_size and, within a rank, to one loader worker: every clip
    is seen exactly once over all ranks and workers. A rank may get no shard at all.
    """
    my_urls = list(shards.urls[rank::world_size])
    workers = min(num_workers, len(my_urls))
    counter = CorruptCounter()
    pipeline = wds.DataPipeline(
        ShardUrls(my_urls),
        wds.split_by_worker,
        wds.tarfile_to_samples(handler=counter),
        _decode_stage(shards.features, norm, shards.num_classes, counter),
        _batch_stage(batch_size, partial=True, counter=counter),
    )
    return Loader(pipeline, batch_size=None, shuffle=False, num_workers=workers,
                  pin_memory=torch.cuda.is_available(), worker_init_fn=ignore_stop_signals)


class Loader(torch.utils.data.DataLoader):
    """A DataLoader that starts its workers safely and shuts them down before the interpreter exits.

    Exit: the workers ignore SIGTERM (:func:`~audioset_dcls.preemption.ignore_stop_signals`),
    and SIGTERM is how multiprocessing ends daemon children at exit: a rank that exits while a
    loader runs (an exception mid-epoch keeps the loader alive in its traceback) would wait on
    them forever. Every iterator with workers is remembered (weakly) and, at exit, shut down the
    way its own ``__del__`` would (done event, then join).

    Start: workers are forked. A finished iterator's index queues are closed but their feeder
    threads (one per worker, in this process) end on their own a moment later, and a thread that
    ends takes the interpreter's thread-list lock: a worker forked at that moment inherits the
    lock held and hangs in its start-up for ever (CPython 3.11's fork; seen in CI as a rank
    waiting on a worker that never started while the other rank waited in all-reduce). So the
    feeders of finished iterators are joined before new workers are forked.
    """

    def __iter__(self):
        _join_finished_feeders()
        it = super().__iter__()
        if self.num_workers > 0:
            global _exit_hook_registered
            if not _exit_hook_registered:
                atexit.register(_shut_down_live_iterators)
                _exit_hook_registered = True
            _ITERATORS.append((weakref.ref(it), list(it._index_queues)))
        return it


# (weak reference to an iterator with workers, its index queues), oldest first
_ITERATORS: list[tuple[weakref.ref, list]] = []
_exit_hook_registered = False


def _join_finished_feeders(timeout: float = 10.0) -> None:
    """Join the feeder threads of iterators that are shut down or gone; forget those iterators."""
    live = []
    for ref, queues in _ITERATORS:
        it = ref()
        if it is not None and not it._shutdown:
            live.append((ref, queues))
            continue
        for q in queues:
            feeder = getattr(q, "_thread", None)  # multiprocessing.Queue's feeder, started by its first put
            if feeder is not None:
                feeder.join(timeout)
    _ITERATORS[:] = live


def _shut_down_live_iterators() -> None:
    for ref, _ in _ITERATORS:
        it = ref()
        if it is not None:
            it._shutdown_workers()  # torch's own clean shutdown (what DataLoader iterators' __del__ calls)


def move_batch(batch: dict, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(x (B, 1, n_mels, T), y (B, num_classes)) on ``device``."""
    return batch["x"].to(device, non_blocking=True), batch["y"].to(device, non_blocking=True)
