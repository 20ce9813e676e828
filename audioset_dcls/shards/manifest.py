"""The finished shard set: ``manifest.json``, ``sizes.json`` and ``skipped.csv``.

Written once every shard slot of the plan has a verified record, by the run (or ``--part`` job)
that completes the set, or by ``merge_shards`` for parts built in separate folders. The
manifest is written last: its presence means "complete".
"""

from __future__ import annotations

import csv
import json
import math
from collections import Counter
from pathlib import Path
from typing import Any

from ..features import FeatureConfig
from ..files import atomic_open, write_json
from .format import MANIFEST_FORMAT, MANIFEST_NAME, SIZES_NAME, LogmelEncoding, hash_ids
from .plan import BuildError, read_plan, shard_name
from .writer import finished_shards, record_path

__all__ = ["SKIPPED_NAME", "finalize", "remove_manifest", "make_manifest", "merge_shards", "name_ranges",
           "short_clips_warning"]

SKIPPED_NAME = "skipped.csv"


def finalize(out: Path, plan: dict[str, Any], verified: set[int], full_verify: bool = False,
             threads: int = 1) -> tuple[dict[str, Any] | None, list[str]]:
    """Write manifest.json, sizes.json and skipped.csv if all shards are done.

    Returns ``(manifest or None, names of shards not finished yet)``. Shards in ``verified``
    were checked by this run; the others (other parts) are checked here (size, and sha256 when
    ``full_verify``).
    """
    split, n = plan["split"], plan["num_shards"]
    others = [i for i in range(n) if i not in verified]
    records = finished_shards(out, split, others, full_verify, threads, mine=False)
    for i in verified:
        records[i] = json.loads(record_path(out, split, i).read_text())
    missing = [shard_name(split, i) for i in range(n) if i not in records]
    if missing:
        remove_manifest(out)  # an incomplete folder must not look like a shard set
        return None, missing
    manifest = make_manifest(plan, [records[i] for i in range(n)])
    write_json(out / SIZES_NAME, {s["name"]: s["count"] for s in manifest["shards"]})
    _write_skipped_csv(out / SKIPPED_NAME, manifest["skipped"])
    write_json(out / MANIFEST_NAME, manifest)  # last: its presence means "complete"
    return manifest, []


def remove_manifest(out: Path) -> None:
    """Remove what marks ``out`` as a complete shard set (its shards are about to change)."""
    for name in (MANIFEST_NAME, SIZES_NAME, SKIPPED_NAME):
        (out / name).unlink(missing_ok=True)


def make_manifest(plan: dict[str, Any], records: list[dict[str, Any]]) -> dict[str, Any]:
    """The manifest of a complete set from its plan and the records of all its shard slots."""
    cfg = FeatureConfig.from_dict(plan["feature_config"])
    encoding = LogmelEncoding.from_dict(plan.get("encoding"))  # absent: planned before encodings (float16)
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
    # Rows left out while reading the inputs never became clips: no key, no audio path.
    skipped = [{"kind": d["kind"], "key": None, "ytid": d["ytid"], "start": d["start"], "end": d["end"],
                "row": d["row"], "path": None, "reason": d["reason"]} for d in plan["dropped_rows"]]
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
        # How each sample's log-mel is stored (shards.LogmelEncoding); readers decode it to float32 dB.
        "encoding": encoding.to_dict(),
        "dtype": encoding.name,
        "shape": [cfg.n_mels, cfg.num_frames],
        "clipped_values": sum(r.get("clipped", 0) for r in records),
        "labels": plan["labels"],
        "num_classes": len(plan["labels"]["mids"]),
        # {"min", "max"} labels of a clip (train.task=auto reads it); None from records of older builders
        "labels_per_clip": _labels_per_clip(records),
        # Statistics of the stored (as decoded, dB) features, for Normalization.from_dict.
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


def short_clips_warning(manifest: dict) -> list[str]:
    """One warning line when the clips are mostly silence padding (their mean length under 3/4
    of the clip length), else none: 5 s clips padded to 10 s trained to 0.19 mAP where the same
    clips at 5 s reached 0.50 (benchmarks/RESULTS.md, issue 22)."""
    d, clip = manifest.get("durations") or {"mean": None}, manifest["feature_config"]["clip_seconds"]
    if d["mean"] is None or d["mean"] >= 0.75 * clip or 2 * d["padded"] < manifest["num_samples"]:
        return []
    return [f"warning: the clips average {d['mean']:.2f} s of the {clip:g} s each one is padded to with silence; "
            f"to train on them, build with --clip-seconds {math.ceil(d['max']):d} (the longest is {d['max']:.2f} s; "
            "docs/finetune.md)"]


def _labels_per_clip(records: list[dict[str, Any]]) -> dict[str, int] | None:
    counts = [r.get("labels_per_clip", "old") for r in records if r["count"]]
    if not counts or "old" in counts:
        return None
    return {"min": min(c[0] for c in counts), "max": max(c[1] for c in counts)}


def _write_skipped_csv(path: Path, skipped: list[dict[str, Any]]) -> None:
    with atomic_open(path, newline="") as f:
        w = csv.writer(f)
        w.writerow(["kind", "ytid", "start_seconds", "end_seconds", "reason", "audio_path", "segment_row"])
        for s in skipped:
            w.writerow([s["kind"], s["ytid"] or "", "" if s["start"] is None else f"{s['start']:.3f}",
                        "" if s["end"] is None else f"{s['end']:.3f}", s["reason"], s["path"] or "", s["row"]])


def merge_shards(out: str | Path, verify: bool = True, threads: int = 1) -> dict[str, Any]:
    """Write the manifest of a folder whose shards were built by several ``--part`` jobs.

    Verifies every shard against its ``_build`` record (size; sha256 when ``verify``).
    Raises BuildError naming the shards still missing.
    """
    out = Path(out)
    plan = read_plan(out)
    manifest, missing = finalize(out, plan, verified=set(), full_verify=verify, threads=threads)
    if manifest is None:
        raise BuildError(f"{out}: {len(missing)} of {plan['num_shards']} shards not built yet "
                         f"({name_ranges(missing)}); run the --part jobs that build them")
    return manifest


def name_ranges(names: list[str], limit: int = 4) -> str:
    """The first ``limit`` names, then how many more: for one-line messages."""
    shown = ", ".join(names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")
