"""Samples -> shard tars, and the per-shard records that make a build resumable.

One process writes every tar, so shard state stays simple. A shard is written to ``<name>.tmp``
and renamed when complete; then its record (count, bytes, sha256, keys, feature sums, values the
encoding clipped, skipped clips) is written to ``_build/<name>.json``. A shard counts as finished when its record exists
and the tar's size (and sha256) match it.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import sys
import tarfile
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

import numpy as np

from ..features import FeatureConfig
from ..files import sha256_file
from ..labels import Segment
from .plan import STATE_DIR, shard_name
from .worker import ClipResult

__all__ = ["ShardWriter", "write_shard", "record_path", "finished_shards"]


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


class ShardWriter:
    """Writes ``<name>.tmp`` and renames it to ``<name>`` in ``close``. Deterministic bytes."""

    def __init__(self, path: Path):
        self.path = path
        self.tmp = path.with_name(path.name + ".tmp")
        self.file = open(self.tmp, "wb")
        self.hasher = _HashingWriter(self.file)
        self.tar = tarfile.open(fileobj=self.hasher, mode="w", format=tarfile.USTAR_FORMAT)

    def write(self, sample: dict[str, Any]) -> None:
        """Add one sample (the dict of ``shards.encode_sample``), members in sorted order."""
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


def record_path(out: Path, split: str, index: int) -> Path:
    """``_build/<split>-NNNNNN.json``: the record of a finished shard."""
    return out / STATE_DIR / (shard_name(split, index)[: -len(".tar")] + ".json")


def _skip_record(seg: Segment, path: str | None, kind: str, reason: str) -> dict[str, Any]:
    return {"key": seg.key, "ytid": seg.ytid, "start": seg.start, "end": seg.end, "row": seg.source,
            "path": path, "kind": kind, "reason": reason}


def write_shard(out: Path, split: str, index: int, segs: Sequence[Segment],
                results: Iterator[ClipResult], bar, skipped: Counter, cfg: FeatureConfig) -> dict[str, Any]:
    """Consume ``len(segs)`` results, write shard ``index``, return its record."""
    name = shard_name(split, index)
    writer = ShardWriter(out / name)
    keys, skips = [], []
    total = total_sq = 0.0
    n_values = clipped = 0
    durations, num_labels = [], []
    try:
        for seg in segs:
            res = next(results)
            if res.kind == "ok":
                writer.write(res.sample)
                keys.append(seg.key)
                durations.append(res.duration)
                num_labels.append(len(seg.labels))
                total += res.value_sum
                total_sq += res.value_sum_sq
                n_values += res.num_values
                clipped += res.clipped
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
        "keys": keys, "sum": total, "sum_sq": total_sq, "num_values": n_values, "clipped": clipped,
        "skipped": skips,
        # fewest and most labels of a written clip: a set with one label per clip is single-label
        "labels_per_clip": [min(num_labels), max(num_labels)] if num_labels else None,
        "durations": {"sum": float(d.sum()), "min": float(d.min()) if d.size else None,
                      "max": float(d.max()) if d.size else None,
                      "short": int((d < cfg.clip_seconds - tol).sum()),
                      "long": int((d > cfg.clip_seconds + tol).sum())},
    }


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


def finished_shards(out: Path, split: str, indices: Iterable[int], full: bool, threads: int,
                    mine: bool = True) -> dict[int, dict]:
    """Records of the shards among ``indices`` that are complete and intact.

    ``mine``: this run will rebuild the bad ones, so their records are removed; otherwise
    (shards of other parts) they are only reported.
    """
    records = {}
    for i in indices:
        rp = record_path(out, split, i)
        if rp.is_file():
            try:
                records[i] = json.loads(rp.read_text())
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
                record_path(out, split, i).unlink(missing_ok=True)
            del records[i]
    return records
