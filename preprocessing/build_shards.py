"""Build log-mel WebDataset shards from an AudioSet download.

    python -m preprocessing.build_shards --segments balanced_train_segments.csv \\
        unbalanced_train_segments.csv --labels class_labels_indices.csv \\
        --audio-dir /data/audioset/audio --out /data/shards/train --split train --workers 16

Output, in ``--out`` (one split per folder):

- ``<split>-NNNNNN.tar``: WebDataset shards; each sample is ``<ytid>_<start_ms>.logmel.npy``
  (float16 (128, 1001) log-mel in dB, not normalised) + ``.json`` (ytid, start, end, labels,
  source, duration): see ``audioset_dcls.shards``.
- ``sizes.json`` (shard name -> sample count) and ``manifest.json`` (feature config, labels,
  per-shard count/bytes/sha256, feature mean/std, clip-id hash, every skipped clip and why).
- ``skipped.csv``: the skipped clips, one per line, for people.
- ``_build/``: the plan and one small record per finished shard; what resuming and merging read.

How clips become shards (deterministic, so resuming and ``--part`` are safe): the segment rows
of all CSVs (duplicates removed) are shuffled with ``--seed``; shard ``i`` holds positions
``[i * shard_size, (i + 1) * shard_size)`` of that order, minus the clips that turned out to be
missing or broken. A shard's content therefore depends only on the inputs and the settings, never
on which other shards exist (a slot whose clips are all bad gets no tar, so numbers can have
gaps: use the manifest or ``sizes.json``, not a brace range). Each shard is written to
``<name>.tmp`` and renamed when complete,
then its record is written to ``_build/``; a shard counts as finished when its record exists and
the tar's size and sha256 match it. Re-running the same command skips finished shards (verified)
and rebuilds the rest, so a killed run loses at most the shards in progress.

``--part i/N`` (0 <= i < N) builds only shards ``[i*K//N, (i+1)*K//N)`` of the K shards: N jobs
(e.g. a SLURM array, ``--part $SLURM_ARRAY_TASK_ID/N``) build disjoint ranges that together are
exactly the single-run shard set. Jobs may share ``--out``; the job that completes the set writes
the manifest. Jobs with separate output folders: copy all tars and ``_build/`` records into one
folder (names never collide) and run ``--merge --out DIR``, which verifies every shard and
writes ``manifest.json``, ``sizes.json`` and ``skipped.csv``.

Work split: the parent resolves files and writes tars; worker processes (one torch thread each)
decode + resample + log-mel + encode batches of clips and send back encoded float16 samples
(~256 kB each). Clip-sized tasks keep every worker busy to the end, and a single writer keeps
shard state simple.
"""

from __future__ import annotations

import argparse
import csv
import ctypes
import ctypes.util
import hashlib
import io
import json
import math
import multiprocessing as mp
import os
import re
import sys
import tarfile
import time
from collections import Counter, deque
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

import numpy as np
import torch
from tqdm import tqdm

from audioset_dcls import features
from audioset_dcls.features import AudioDecodeError, FeatureConfig
from audioset_dcls.labels import (
    LabelError,
    LabelSet,
    Segment,
    index_audio_dir,
    read_label_set,
    read_segment_files,
    resolve_pattern,
)
from audioset_dcls.shards import (
    MANIFEST_FORMAT,
    MANIFEST_NAME,
    SIZES_NAME,
    encode_sample,
    hash_ids,
    sha256_file,
)

__all__ = [
    "BuildError",
    "BuildOptions",
    "BuildResult",
    "ClipTask",
    "build_shards",
    "merge_shards",
    "order_segments",
    "part_shard_range",
    "shard_name",
    "process_clip",
    "main",
]

STATE_DIR = "_build"
PLAN_NAME = "plan.json"
SKIPPED_NAME = "skipped.csv"
PLAN_FORMAT = "audioset_dcls.build_plan/1"
# Plan entries that must agree for a folder to be resumed or merged.
_PLAN_KEYS = ("split", "num_clips", "shard_size", "num_shards", "seed", "shuffle", "order_sha256",
              "feature_config", "labels")
_SPLIT_RE = re.compile(r"[A-Za-z0-9_-]+")


class BuildError(RuntimeError):
    """The build cannot go on (bad arguments, a folder from another build). One line."""


# ---------------------------------------------------------------------------------------------
# Options and plan


@dataclass(frozen=True)
class BuildOptions:
    """Everything one build run needs. ``part`` is ``(i, N)``; ``workers=0`` runs in-process."""

    segments: tuple[Path, ...]
    labels: Path
    audio_dir: Path
    out: Path
    split: str
    workers: int = field(default_factory=lambda: os.cpu_count() or 1)
    shard_size: int = 1000
    part: tuple[int, int] = (0, 1)
    seed: int = 0
    shuffle: bool = True
    pattern: str | None = None
    unknown_mids: str = "error"
    verify: bool = True
    progress: bool = True
    clips_per_task: int = 4
    feature_config: FeatureConfig = FeatureConfig()

    def check(self) -> None:
        if not _SPLIT_RE.fullmatch(self.split):
            raise BuildError(f"--split {self.split!r}: use letters, digits, '_' and '-' only")
        if self.shard_size < 1:
            raise BuildError(f"--shard-size must be at least 1, not {self.shard_size}")
        if self.workers < 0:
            raise BuildError(f"--workers must be >= 0, not {self.workers}")
        i, n = self.part
        if not (n >= 1 and 0 <= i < n):
            raise BuildError(f"--part {i}/{n}: expected i/N with 0 <= i < N (e.g. 0/4 ... 3/4)")
        if not Path(self.audio_dir).is_dir():
            raise BuildError(f"{self.audio_dir}: audio folder does not exist")
        if self.pattern:
            try:
                resolve_pattern(self.pattern, self.audio_dir, Segment("x", 0.0, 10.0, ()))
            except ValueError as err:
                raise BuildError(f"--pattern: {err}") from None


def shard_name(split: str, index: int) -> str:
    """``<split>-NNNNNN.tar``."""
    return f"{split}-{index:06d}.tar"


def order_segments(segments: Sequence[Segment], seed: int, shuffle: bool) -> list[Segment]:
    """The build order: a seeded permutation of the rows (or the rows as read)."""
    if not shuffle:
        return list(segments)
    perm = np.random.default_rng(seed).permutation(len(segments))
    return [segments[i] for i in perm]


def part_shard_range(num_shards: int, part: int, parts: int) -> range:
    """Shards built by ``--part part/parts``: disjoint, contiguous, covering ``range(num_shards)``."""
    return range(part * num_shards // parts, (part + 1) * num_shards // parts)


def _order_hash(order: Sequence[Segment]) -> str:
    """sha256 of the ordered (key, labels) list: changes if a row, its labels or the order do."""
    h = hashlib.sha256()
    for seg in order:
        h.update(f"{seg.key} {','.join(map(str, seg.labels))}\n".encode())
    return h.hexdigest()


def _make_plan(opts: BuildOptions, labels: LabelSet, order: Sequence[Segment], dropped) -> dict[str, Any]:
    return {
        "format": PLAN_FORMAT,
        "split": opts.split,
        "num_clips": len(order),
        "shard_size": opts.shard_size,
        "num_shards": math.ceil(len(order) / opts.shard_size),
        "seed": opts.seed,
        "shuffle": opts.shuffle,
        "order_sha256": _order_hash(order),
        "feature_config": opts.feature_config.to_dict(),
        "labels": labels.to_dict(),
        "segment_files": [str(p) for p in opts.segments],
        # Rows left out while reading the CSVs (duplicates, unknown mids): part of the report.
        "dropped_rows": [{"row": src, "reason": reason} for src, reason in dropped],
    }


def _write_json(path: Path, obj: Any) -> None:
    """Write JSON atomically (temp file + os.replace)."""
    tmp = path.with_name(path.name + f".{os.getpid()}.tmp")
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1, sort_keys=True)
        f.write("\n")
    os.replace(tmp, path)


def _read_json(path: Path) -> Any:
    with open(path) as f:
        return json.load(f)


def _check_or_write_plan(out: Path, plan: dict[str, Any]) -> None:
    state = out / STATE_DIR
    path = state / PLAN_NAME
    if path.is_file():
        old = _read_json(path)
        for key in _PLAN_KEYS:
            if old.get(key) != plan[key]:
                what = "segment list" if key in ("order_sha256", "num_clips") else key
                was, now = old.get(key), plan[key]
                detail = f" (was {was}, now {now})" if not isinstance(now, (dict, list)) and key != "order_sha256" else ""
                raise BuildError(
                    f"{out}: holds a build with a different {what}{detail}; use a new --out, "
                    "or delete the folder to rebuild"
                )
        return
    if (out / MANIFEST_NAME).is_file() or any(out.glob("*.tar")):
        raise BuildError(f"{out}: has shards but no {STATE_DIR}/{PLAN_NAME}; use an empty --out")
    state.mkdir(parents=True, exist_ok=True)
    _write_json(path, plan)


# ---------------------------------------------------------------------------------------------
# Worker side: one clip -> one encoded sample or a reason


@dataclass(frozen=True)
class ClipTask:
    """What a worker needs for one clip (small, so cheap to send)."""

    key: str
    path: str | None  # None: no file found for this segment
    labels: tuple[int, ...]
    ytid: str
    start: float
    end: float


@dataclass
class ClipResult:
    """A worker's answer for one clip: ``kind == "ok"`` with an encoded sample, or a skip.

    ``sample``: the dict of ``shards.encode_sample`` (float16 (n_mels, T) log-mel + json);
    ``value_sum`` / ``value_sum_sq`` / ``num_values``: float64 sums over its float16 values.
    Skip kinds: ``missing``, ``empty``, ``silent``, ``unreadable``; ``reason`` is one line.
    """

    kind: str
    path: str | None
    reason: str = ""
    sample: dict[str, Any] | None = None
    duration: float = 0.0
    value_sum: float = 0.0
    value_sum_sq: float = 0.0
    num_values: int = 0


def process_clip(task: ClipTask, cfg: FeatureConfig) -> ClipResult:
    """Decode, resample, pad/trim and transform one clip with the ``features`` front end.

    Never raises for a bad file: returns a skip result with the reason instead. A bad clip is
    never turned into a zero-filled sample.
    """
    if task.path is None:
        return ClipResult("missing", None, "no audio file found for this segment")
    path = Path(task.path)
    try:
        size = path.stat().st_size
    except OSError:
        return ClipResult("missing", task.path, f"{path}: no such file")
    if size == 0:
        return ClipResult("empty", task.path, f"{path}: empty file (0 bytes)")
    try:
        mono, sr = features.decode_mono(path)
        wave = features.resample(mono, sr, cfg.sample_rate)
        if not wave.any():
            return ClipResult("silent", task.path, f"{path}: every sample is zero")
        duration = wave.shape[0] / cfg.sample_rate
        # torch's float16 cast is ~30x faster than numpy's
        logmel = torch.from_numpy(features.compute_logmel(wave, cfg)).half()  # (n_mels, T)
    except AudioDecodeError as err:
        msg = str(err)
        return ClipResult("empty" if "no audio samples" in msg else "unreadable", task.path, msg)
    except Exception as err:  # a bad clip must never stop the run
        text = " ".join(str(err).split()) or type(err).__name__
        return ClipResult("unreadable", task.path, f"{path}: {type(err).__name__}: {text}")
    values = logmel.double().view(-1)
    meta = {"ytid": task.ytid, "start": task.start, "end": task.end, "source": str(path),
            "duration": round(duration, 6)}
    return ClipResult(
        "ok", task.path, sample=encode_sample(task.key, logmel.numpy(), task.labels, meta),
        duration=duration, value_sum=float(values.sum()), value_sum_sq=float(torch.dot(values, values)),
        num_values=values.numel(),
    )


_WORKER_CFG: FeatureConfig | None = None


def keep_freed_memory() -> bool:
    """Ask glibc malloc to reuse freed memory instead of handing it back to the kernel.

    Each clip allocates ~20 MB in buffers of 0.3-4 MB (decoded samples, spectrogram, ...). With
    glibc's defaults most of them are mmap'ed and unmapped again, or trimmed off the heap, so
    every clip page-faults ~1,200-1,900 fresh zeroed pages: 2.5-3.5 ms of a ~13 ms clip. Serving
    buffers up to 32 MB from the heap and trimming it only above 256 MB keeps a worker's memory
    flat (tens of MB) and those faults gone. Returns False where there is no glibc (no effect).
    """
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    m_trim_threshold, m_mmap_threshold = -1, -3
    return bool(mallopt(m_mmap_threshold, 32 << 20)) and bool(mallopt(m_trim_threshold, 256 << 20))


def _init_worker(cfg_dict: dict[str, Any]) -> None:
    global _WORKER_CFG
    torch.set_num_threads(1)  # one process per core; torch threads would fight over them
    keep_freed_memory()
    _WORKER_CFG = FeatureConfig.from_dict(cfg_dict)
    features.compute_logmel(np.zeros(16, np.float32), _WORKER_CFG)  # build the filterbank once


def _process_batch(tasks: list[ClipTask]) -> list[ClipResult]:
    return [process_clip(t, _WORKER_CFG) for t in tasks]


def _mp_context():
    # forkserver: workers fork from a clean server that has imported torch once (fast start,
    # no fork of a threaded parent); spawn where it does not exist.
    if "forkserver" in mp.get_all_start_methods():
        ctx = mp.get_context("forkserver")
        ctx.set_forkserver_preload(["audioset_dcls.features"])
        return ctx
    return mp.get_context("spawn")


def _run_tasks(tasks: Iterable[ClipTask], opts: BuildOptions) -> Iterator[ClipResult]:
    """Results of ``process_clip`` in task order, computed by ``opts.workers`` processes."""
    cfg = opts.feature_config
    if opts.workers == 0:
        # One thread, like the workers: the bytes of a shard do not depend on --workers.
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            for t in tasks:
                yield process_clip(t, cfg)
        finally:
            torch.set_num_threads(threads)
        return
    batches = _batched(tasks, opts.clips_per_task)
    window = 4 * opts.workers  # batches in flight: bounded memory, workers never idle
    with ProcessPoolExecutor(opts.workers, mp_context=_mp_context(), initializer=_init_worker,
                             initargs=(cfg.to_dict(),)) as pool:
        pending = deque(pool.submit(_process_batch, b) for b in _take(batches, window))
        try:
            while pending:
                try:
                    results = pending.popleft().result()
                except BrokenProcessPool:
                    raise BuildError(
                        "a worker process died (out of memory, or a decoder crashed on a file); "
                        "finished shards are kept: re-run the same command to resume"
                    ) from None
                for b in _take(batches, 1):
                    pending.append(pool.submit(_process_batch, b))
                yield from results
        finally:
            for fut in pending:
                fut.cancel()


def _batched(items: Iterable, n: int) -> Iterator[list]:
    batch = []
    for item in items:
        batch.append(item)
        if len(batch) == n:
            yield batch
            batch = []
    if batch:
        yield batch


def _take(it: Iterator, n: int) -> list:
    out = []
    for _ in range(n):
        try:
            out.append(next(it))
        except StopIteration:
            break
    return out


# ---------------------------------------------------------------------------------------------
# Parent side: tars and per-shard records


class _HashingWriter:
    """File wrapper that hashes and counts what tarfile writes."""

    def __init__(self, f):
        self.f, self.sha, self.size = f, hashlib.sha256(), 0

    def write(self, data) -> int:
        self.sha.update(data)
        self.size += len(data)
        return self.f.write(data)

    def tell(self) -> int:
        return self.size


class _ShardWriter:
    """Writes ``<name>.tmp`` and renames it to ``<name>`` in ``close``. Deterministic bytes."""

    def __init__(self, path: Path):
        self.path = path
        self.tmp = path.with_name(path.name + ".tmp")
        self.file = open(self.tmp, "wb")
        self.hasher = _HashingWriter(self.file)
        self.tar = tarfile.open(fileobj=self.hasher, mode="w", format=tarfile.USTAR_FORMAT)

    def write(self, sample: dict[str, Any]) -> None:
        key = sample["__key__"]
        for ext in sorted(k for k in sample if not k.startswith("__")):
            data = sample[ext]
            info = tarfile.TarInfo(f"{key}.{ext}")
            info.size, info.mtime, info.mode = len(data), 0, 0o644
            self.tar.addfile(info, io.BytesIO(data))

    def close(self) -> tuple[int, str]:
        """Finish the tar, fsync, rename; returns (bytes, sha256)."""
        self.tar.close()
        self.file.flush()
        os.fsync(self.file.fileno())
        self.file.close()
        os.replace(self.tmp, self.path)
        return self.hasher.size, self.hasher.sha.hexdigest()

    def abort(self) -> None:
        self.file.close()
        self.tmp.unlink(missing_ok=True)


def _record_path(out: Path, split: str, index: int) -> Path:
    return out / STATE_DIR / (shard_name(split, index)[: -len(".tar")] + ".json")


def _verify_shard(out: Path, record: dict[str, Any], full: bool) -> str | None:
    """None if the shard on disk matches its record, else why not."""
    if record["count"] == 0:
        return None  # no tar is written for a slot whose clips were all bad
    path = out / record["name"]
    if not path.is_file():
        return "tar is missing"
    if path.stat().st_size != record["bytes"]:
        return f"size {path.stat().st_size} != recorded {record['bytes']}"
    if full and sha256_file(path) != record["sha256"]:
        return "sha256 differs from the record"
    return None


def _finished_shards(out: Path, split: str, indices: Iterable[int], full: bool, threads: int,
                     mine: bool = True) -> dict[int, dict]:
    """Records of the shards among ``indices`` that are complete and intact.

    ``mine``: this run will rebuild the bad ones, so their records are removed; otherwise
    (shards of other parts) they are only reported.
    """
    records = {}
    for i in indices:
        rp = _record_path(out, split, i)
        if rp.is_file():
            try:
                records[i] = _read_json(rp)
            except (OSError, ValueError):
                if mine:
                    rp.unlink(missing_ok=True)
    with ThreadPoolExecutor(max(1, threads)) as ex:  # hashing releases the GIL
        problems = dict(zip(records, ex.map(lambda r: _verify_shard(out, r, full), records.values())))
    for i, problem in problems.items():
        if problem is not None:
            action = "rebuilding it" if mine else "re-run the --part that builds it"
            print(f"{out / records[i]['name']}: {problem}; {action}", file=sys.stderr)
            if mine:
                _record_path(out, split, i).unlink(missing_ok=True)
            del records[i]
    return records


def _skip_record(seg: Segment, path: str | None, kind: str, reason: str) -> dict[str, Any]:
    return {"key": seg.key, "ytid": seg.ytid, "start": seg.start, "end": seg.end, "row": seg.source,
            "path": path, "kind": kind, "reason": reason}


# ---------------------------------------------------------------------------------------------
# The build


@dataclass
class BuildResult:
    """What one run did. ``manifest`` is None while other parts are still missing."""

    out: Path
    manifest: dict[str, Any] | None
    shards_written: list[str]
    shards_reused: list[str]
    clips_processed: int
    clips_written: int
    skipped: Counter
    seconds: float  # clip processing wall time (pool start to last shard)
    shards_missing: list[str] = field(default_factory=list)

    @property
    def clips_per_second(self) -> float:
        return self.clips_processed / self.seconds if self.seconds > 0 else 0.0


def build_shards(opts: BuildOptions) -> BuildResult:
    """Build (or resume) the shards of ``opts.part`` and, when the set is complete, the manifest.

    Raises BuildError / LabelError (one line) for bad inputs; bad clips are reported, not raised.
    """
    opts.check()
    out = Path(opts.out)
    labels = read_label_set(opts.labels)
    segs = read_segment_files(opts.segments, labels, unknown_mids=opts.unknown_mids)
    if len(segs) == 0:
        raise BuildError(f"no segments in {', '.join(map(str, opts.segments))}")
    order = order_segments(segs.segments, opts.seed, opts.shuffle)
    plan = _make_plan(opts, labels, order, segs.dropped)
    out.mkdir(parents=True, exist_ok=True)
    _check_or_write_plan(out, plan)

    mine = part_shard_range(plan["num_shards"], *opts.part)
    for i in mine:  # partial files of a killed run (only this part's: other parts may be writing)
        (out / (shard_name(opts.split, i) + ".tmp")).unlink(missing_ok=True)
        record = _record_path(out, opts.split, i)
        for tmp in record.parent.glob(record.name + ".*.tmp"):
            tmp.unlink(missing_ok=True)
    done = _finished_shards(out, opts.split, mine, opts.verify, max(1, opts.workers))
    todo = [i for i in mine if i not in done]
    if todo:
        _remove_manifest(out)  # shards are about to change; written again when the set is complete
    S = opts.shard_size
    todo_segs = [seg for i in todo for seg in order[i * S : (i + 1) * S]]

    if opts.progress:
        print(f"{opts.split}: {len(order)} segments in {plan['num_shards']} shard slot(s) of {S}; "
              f"this run: {len(todo)} to build, {len(done)} already finished", file=sys.stderr)
    find = _file_finder(opts, todo_segs)
    tasks = (ClipTask(seg.key, find(seg), seg.labels, seg.ytid, seg.start, seg.end) for seg in todo_segs)

    written, skipped, n_ok = [], Counter(), 0
    bar = tqdm(total=len(todo_segs), unit="clips", desc=f"{opts.split} shards", mininterval=1.0,
               disable=not opts.progress or not todo_segs, dynamic_ncols=True)
    t0 = time.perf_counter()
    results = _run_tasks(tasks, opts)
    try:
        for i in todo:
            shard_segs = order[i * S : (i + 1) * S]
            record = _write_one_shard(out, opts.split, i, shard_segs, results, bar, skipped,
                                      opts.feature_config)
            n_ok += record["count"]
            _write_json(_record_path(out, opts.split, i), record)
            done[i] = record
            written.append(record["name"])
    finally:
        results.close()
        bar.close()
    seconds = time.perf_counter() - t0

    manifest, missing = _try_finalize(out, plan, verified=set(done))
    return BuildResult(
        out=out, manifest=manifest, shards_written=written,
        shards_reused=[done[i]["name"] for i in sorted(done) if done[i]["name"] not in written],
        clips_processed=len(todo_segs), clips_written=n_ok, skipped=skipped, seconds=seconds,
        shards_missing=missing,
    )


def _file_finder(opts: BuildOptions, segs: Sequence[Segment]):
    """segment -> path string or None, by pattern or by a recursive index of the audio folder."""
    if opts.pattern:
        return lambda seg: str(resolve_pattern(opts.pattern, opts.audio_dir, seg))
    if not segs:
        return lambda seg: None
    index = index_audio_dir(opts.audio_dir)
    if opts.progress:
        print(f"indexed {index.num_files} audio files under {opts.audio_dir}", file=sys.stderr)

    def find(seg: Segment) -> str | None:
        path, _ = index.find(seg)
        return None if path is None else str(path)

    return find


def _write_one_shard(out: Path, split: str, index: int, segs: Sequence[Segment],
                     results: Iterator[ClipResult], bar, skipped: Counter, cfg: FeatureConfig) -> dict[str, Any]:
    """Consume ``len(segs)`` results, write shard ``index``, return its record."""
    name = shard_name(split, index)
    writer = _ShardWriter(out / name)
    keys, skips = [], []
    total = total_sq = 0.0
    n_values = 0
    durations = []
    try:
        for seg in segs:
            res = next(results)
            if res.kind == "ok":
                writer.write(res.sample)
                keys.append(seg.key)
                durations.append(res.duration)
                total += res.value_sum
                total_sq += res.value_sum_sq
                n_values += res.num_values
            else:
                skips.append(_skip_record(seg, res.path, res.kind, res.reason))
                skipped[res.kind] += 1
                bar.set_postfix(skipped=sum(skipped.values()), refresh=False)
            bar.update(1)
        if keys:
            size, sha = writer.close()
        else:  # every clip of this slot was bad: no tar (an empty shard trips up loaders)
            writer.abort()
            size, sha = 0, None
    except BaseException:
        writer.abort()
        raise
    d = np.asarray(durations, dtype=np.float64)
    tol = 0.5 / cfg.sample_rate
    return {
        "name": name, "index": index, "count": len(keys), "bytes": size, "sha256": sha,
        "keys": keys, "sum": total, "sum_sq": total_sq, "num_values": n_values, "skipped": skips,
        "durations": {"sum": float(d.sum()), "min": float(d.min()) if d.size else None,
                      "max": float(d.max()) if d.size else None,
                      "short": int((d < cfg.clip_seconds - tol).sum()),
                      "long": int((d > cfg.clip_seconds + tol).sum())},
    }


# ---------------------------------------------------------------------------------------------
# Manifest: written once every shard of the plan is finished


def _try_finalize(out: Path, plan: dict[str, Any], verified: set[int], full_verify: bool = False,
                  threads: int = 1) -> tuple[dict[str, Any] | None, list[str]]:
    """Write manifest.json, sizes.json and skipped.csv if all shards are done.

    Returns ``(manifest or None, names of shards not finished yet)``. Shards in ``verified``
    were checked by this run; the others (other parts) are checked here (size, and sha256 when
    ``full_verify``).
    """
    split, n = plan["split"], plan["num_shards"]
    others = [i for i in range(n) if i not in verified]
    records = _finished_shards(out, split, others, full_verify, threads, mine=False)
    for i in verified:
        records[i] = _read_json(_record_path(out, split, i))
    missing = [shard_name(split, i) for i in range(n) if i not in records]
    if missing:
        _remove_manifest(out)  # an incomplete folder must not look like a shard set
        return None, missing
    manifest = _make_manifest(plan, [records[i] for i in range(n)])
    _write_json(out / SIZES_NAME, {s["name"]: s["count"] for s in manifest["shards"]})
    _write_skipped_csv(out / SKIPPED_NAME, manifest["skipped"])
    _write_json(out / MANIFEST_NAME, manifest)  # last: its presence means "complete"
    return manifest, []


def _remove_manifest(out: Path) -> None:
    for name in (MANIFEST_NAME, SIZES_NAME, SKIPPED_NAME):
        (out / name).unlink(missing_ok=True)


def _make_manifest(plan: dict[str, Any], records: list[dict[str, Any]]) -> dict[str, Any]:
    cfg = FeatureConfig.from_dict(plan["feature_config"])
    total = sum(r["sum"] for r in records)
    total_sq = sum(r["sum_sq"] for r in records)
    n_values = sum(r["num_values"] for r in records)
    n_samples = sum(r["count"] for r in records)
    if n_values:
        mean = total / n_values
        std = math.sqrt(max(total_sq / n_values - mean * mean, 0.0))
        normalization = {"mean": mean, "std": std}
    else:
        normalization = None
    skipped = [{"kind": _row_kind(d["reason"]), "key": None, "ytid": d["reason"].split(":")[0],
                "start": None, "end": None, "row": d["row"], "path": None, "reason": d["reason"]}
               for d in plan["dropped_rows"]]
    skipped += [s for r in records for s in r["skipped"]]
    durations = [r["durations"] for r in records if r["count"]]
    shards = [{"name": r["name"], "count": r["count"], "bytes": r["bytes"], "sha256": r["sha256"]}
              for r in records if r["count"] > 0]
    return {
        "format": MANIFEST_FORMAT,
        "split": plan["split"],
        "num_samples": n_samples,
        "num_shards": len(shards),
        "shards": shards,
        "feature_config": cfg.to_dict(),
        "dtype": "float16",
        "shape": [cfg.n_mels, cfg.num_frames],
        "labels": plan["labels"],
        "num_classes": len(plan["labels"]["mids"]),
        # Statistics of the stored (float16, dB) features, for Normalization.from_dict.
        "normalization": normalization,
        "feature_stats": {"sum": total, "sum_sq": total_sq, "num_values": n_values},
        "durations": {
            "mean": sum(d["sum"] for d in durations) / n_samples if n_samples else None,
            "min": min((d["min"] for d in durations), default=None),
            "max": max((d["max"] for d in durations), default=None),
            "padded": sum(d["short"] for d in durations),
            "trimmed": sum(d["long"] for d in durations),
        },
        "clip_ids_sha256": hash_ids(k for r in records for k in r["keys"]),
        "num_skipped": len(skipped),
        "skipped_by_kind": dict(sorted(Counter(s["kind"] for s in skipped).items())),
        "skipped": skipped,
        "build": {"num_rows": plan["num_clips"], "shard_size": plan["shard_size"], "seed": plan["seed"],
                  "num_slots": plan["num_shards"],
                  "empty_slots": [r["name"] for r in records if r["count"] == 0],
                  "shuffle": plan["shuffle"], "order_sha256": plan["order_sha256"],
                  "segment_files": plan["segment_files"]},
    }


def _row_kind(reason: str) -> str:
    return "duplicate" if "duplicate" in reason else "label"


def _write_skipped_csv(path: Path, skipped: list[dict[str, Any]]) -> None:
    tmp = path.with_name(path.name + f".{os.getpid()}.tmp")
    with open(tmp, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["kind", "ytid", "start_seconds", "end_seconds", "reason", "audio_path", "segment_row"])
        for s in skipped:
            w.writerow([s["kind"], s["ytid"] or "", "" if s["start"] is None else f"{s['start']:.3f}",
                        "" if s["end"] is None else f"{s['end']:.3f}", s["reason"], s["path"] or "", s["row"]])
    os.replace(tmp, path)


def merge_shards(out: str | Path, verify: bool = True, threads: int = 1) -> dict[str, Any]:
    """Write the manifest of a folder whose shards were built by several ``--part`` jobs.

    Verifies every shard against its ``_build`` record (size; sha256 when ``verify``).
    Raises BuildError naming the shards still missing.
    """
    out = Path(out)
    plan_path = out / STATE_DIR / PLAN_NAME
    if not plan_path.is_file():
        raise BuildError(f"{out}: no {STATE_DIR}/{PLAN_NAME}; is this a build_shards output folder?")
    plan = _read_json(plan_path)
    manifest, missing = _try_finalize(out, plan, verified=set(), full_verify=verify, threads=threads)
    if manifest is None:
        raise BuildError(f"{out}: {len(missing)} of {plan['num_shards']} shards not built yet "
                         f"({_name_ranges(missing)}); run the --part jobs that build them")
    return manifest


def _name_ranges(names: list[str], limit: int = 4) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")


# ---------------------------------------------------------------------------------------------
# Command line


def format_summary(result: BuildResult, opts: BuildOptions | None = None) -> str:
    """A few readable lines about a finished run."""
    lines = []
    r = result
    done_part = f" (part {opts.part[0]}/{opts.part[1]})" if opts and opts.part[1] > 1 else ""
    if r.clips_processed:
        kept = f", kept {len(r.shards_reused)} finished before" if r.shards_reused else ""
        lines.append(
            f"built {len(r.shards_written)} shard(s){done_part}{kept}: {r.clips_written} of "
            f"{r.clips_processed} clips written in {r.seconds:.1f} s ({r.clips_per_second:.1f} clips/s)"
        )
    else:
        lines.append(f"nothing to build{done_part}: all {len(r.shards_reused)} shard(s) were already "
                     "finished (verified)")
    if r.skipped:
        lines.append("skipped this run: " + ", ".join(f"{n} {k}" for k, n in sorted(r.skipped.items())))
    m = r.manifest
    if m is None:
        lines.append(f"{len(r.shards_missing)} shard slot(s) of this set are not built here yet "
                     f"({_name_ranges(r.shards_missing)}). Jobs sharing this --out: the last one to "
                     f"finish writes the manifest. Separate folders: copy them into one and run "
                     f"python -m preprocessing.build_shards --merge --out DIR")
        return "\n".join(lines)
    lines.append(f"shard set complete: {m['num_samples']} samples in {m['num_shards']} shard(s) "
                 f"of split '{m['split']}' in {r.out}")
    if m["num_skipped"]:
        kinds = ", ".join(f"{n} {k}" for k, n in m["skipped_by_kind"].items())
        lines.append(f"left out {m['num_skipped']} clip(s): {kinds}; see {r.out / SKIPPED_NAME}")
    else:
        lines.append("left out no clips")
    norm = m["normalization"]
    if norm:
        lines.append(f"log-mel mean {norm['mean']:.4f} dB, std {norm['std']:.4f} dB "
                     f"(reference: -18.2696, 30.5735)")
    d = m["durations"]
    if d["mean"] is not None:
        lines.append(f"durations {d['min']:.2f}-{d['max']:.2f} s (mean {d['mean']:.2f}); "
                     f"{d['padded']} zero-padded, {d['trimmed']} trimmed to 10 s")
    lines.append(f"manifest: {r.out / MANIFEST_NAME}; sizes: {r.out / SIZES_NAME}")
    return "\n".join(lines)


def _parse_part(text: str) -> tuple[int, int]:
    m = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", text)
    if not m:
        raise argparse.ArgumentTypeError(f"--part {text!r}: expected i/N, e.g. 0/4")
    return int(m.group(1)), int(m.group(2))


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m preprocessing.build_shards",
        description="Build log-mel WebDataset shards (+ manifest, sizes.json, skipped.csv) from AudioSet "
                    "segment CSVs and a folder of downloaded audio.",
    )
    p.add_argument("--segments", nargs="+", type=Path, metavar="CSV",
                   help="segment CSV(s), e.g. balanced_train_segments.csv unbalanced_train_segments.csv")
    p.add_argument("--labels", type=Path, metavar="CSV", help="class_labels_indices.csv")
    p.add_argument("--audio-dir", type=Path, metavar="DIR", help="folder of audio files (searched recursively)")
    p.add_argument("--out", type=Path, required=True, metavar="DIR", help="output folder (one split per folder)")
    p.add_argument("--split", metavar="NAME", help="split name, used in shard names: NAME-000000.tar")
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1,
                   help="worker processes (default: all cores; 0 = in this process)")
    p.add_argument("--shard-size", type=int, default=1000, help="segments per shard (default 1000, ~256 MB)")
    p.add_argument("--part", type=_parse_part, default=(0, 1), metavar="i/N",
                   help="build only part i of N (0-based), e.g. --part $SLURM_ARRAY_TASK_ID/8")
    p.add_argument("--seed", type=int, default=0, help="seed of the clip order (default 0)")
    p.add_argument("--no-shuffle", action="store_true", help="keep the CSV order instead of shuffling")
    p.add_argument("--pattern", metavar="PATTERN",
                   help="file name under --audio-dir instead of searching, e.g. 'Y{ytid}.wav' or "
                        "'{ytid}_{start_ms}_{end_ms}.m4a' (fields: ytid start end start_s end_s start_ms end_ms)")
    p.add_argument("--unknown-mids", choices=("error", "drop"), default="error",
                   help="a label not in --labels: stop with an error (default) or drop it and report it")
    p.add_argument("--no-verify", action="store_true",
                   help="on resume/merge, check finished shards by size only, not sha256")
    p.add_argument("--merge", action="store_true",
                   help="only write the manifest of --out from the shards of all --part jobs")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        if args.merge:
            manifest = merge_shards(args.out, verify=not args.no_verify, threads=max(1, args.workers))
            print(f"merged: {manifest['num_samples']} samples in {manifest['num_shards']} shard(s); "
                  f"{manifest['num_skipped']} clip(s) left out (see {args.out / SKIPPED_NAME}); "
                  f"manifest: {args.out / MANIFEST_NAME}")
            return 0
        missing = [f"--{n.replace('_', '-')}" for n in ("segments", "labels", "audio_dir", "split")
                   if getattr(args, n) is None]
        if missing:
            parser.error(f"missing {', '.join(missing)} (needed unless --merge)")
        opts = BuildOptions(
            segments=tuple(args.segments), labels=args.labels, audio_dir=args.audio_dir, out=args.out,
            split=args.split, workers=args.workers, shard_size=args.shard_size, part=args.part,
            seed=args.seed, shuffle=not args.no_shuffle, pattern=args.pattern,
            unknown_mids=args.unknown_mids, verify=not args.no_verify, progress=not args.no_progress,
        )
        keep_freed_memory()  # this process unpickles and writes every sample (or, with --workers 0, makes them)
        result = build_shards(opts)
    except (BuildError, LabelError, FileNotFoundError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(format_summary(result, opts))
    return 0


if __name__ == "__main__":
    # Run through the importable module so workers unpickle functions by their real name.
    from preprocessing.build_shards import main as _main

    sys.exit(_main())
