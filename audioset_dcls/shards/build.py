"""One build run: plan, then clips -> workers -> tars in slot order, then the manifest."""

from __future__ import annotations

import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

from tqdm import tqdm

from ..features import REFERENCE_NORMALIZATION
from ..files import write_json
from .format import MANIFEST_NAME, SIZES_NAME, LogmelEncoding
from .manifest import SKIPPED_NAME, finalize, merge_shards, name_ranges, remove_manifest, short_clips_warning
from .plan import (
    BuildError,
    BuildOptions,
    check_or_write_plan,
    make_plan,
    order_segments,
    part_shard_range,
    shard_name,
)
from .sources import read_clips, ref_finder
from .worker import ClipResult, ClipTask, run_clips
from .writer import finished_shards, record_path, write_shard

# The builder's API in one place: a build needs the options, the entry point and its result.
__all__ = ["BuildError", "BuildOptions", "BuildResult", "SKIPPED_NAME", "build_shards", "format_summary", "merge_shards"]


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
    upsampled: Counter = field(default_factory=Counter)  # source rate below the front end's -> clips
    unlisted: int = 0  # container clips not in --segments (not built)

    @property
    def clips_per_second(self) -> float:
        return self.clips_processed / self.seconds if self.seconds > 0 else 0.0


def build_shards(opts: BuildOptions) -> BuildResult:
    """Build (or resume) the shards of ``opts.part`` and, when the set is complete, the manifest.

    Raises BuildError / LabelError (one line) for bad inputs; bad clips are reported, not raised.
    """
    opts.check()
    out = Path(opts.out)
    source = read_clips(opts)
    refs = source.refs
    block_of = None if refs is None else (lambda seg: _block(refs, seg))
    order = order_segments(source.clips, opts.seed, opts.shuffle, block_of)
    plan = make_plan(opts, source.labels, order, source.dropped)
    out.mkdir(parents=True, exist_ok=True)
    check_or_write_plan(out, plan)

    mine = part_shard_range(plan["num_shards"], *opts.part)
    for i in mine:  # partial files of a killed run (only this part's: other parts may be writing)
        (out / (shard_name(opts.split, i) + ".tmp")).unlink(missing_ok=True)
        record = record_path(out, opts.split, i)
        for tmp in record.parent.glob(record.name + ".*.tmp"):
            tmp.unlink(missing_ok=True)
    done = finished_shards(out, opts.split, mine, opts.verify, max(1, opts.workers))
    todo = [i for i in mine if i not in done]
    if todo:
        remove_manifest(out)  # shards are about to change; written again when the set is complete
    S = opts.shard_size
    todo_segs = [seg for i in todo for seg in order[i * S : (i + 1) * S]]

    if opts.progress:
        print(f"{opts.split}: {len(order)} segments in {plan['num_shards']} shard slot(s) of {S}; "
              f"this run: {len(todo)} to build, {len(done)} already finished", file=sys.stderr)
    find = ref_finder(opts, source, todo_segs)
    tasks = (ClipTask(seg.key, find(seg), seg.labels, seg.ytid, seg.start, seg.end) for seg in todo_segs)

    written, skipped, n_ok, upsampled = [], Counter(), 0, Counter()
    bar = tqdm(total=len(todo_segs), unit="clips", desc=f"{opts.split} shards", mininterval=1.0,
               disable=not opts.progress or not todo_segs, dynamic_ncols=True)
    t0 = time.perf_counter()
    results = _count_upsampled(
        run_clips(tasks, opts.feature_config, opts.workers, opts.clips_per_task, LogmelEncoding(opts.encoding)),
        opts.feature_config.sample_rate, upsampled)
    try:
        for i in todo:
            shard_segs = order[i * S : (i + 1) * S]
            record = write_shard(out, opts.split, i, shard_segs, results, bar, skipped, opts.feature_config)
            n_ok += record["count"]
            write_json(record_path(out, opts.split, i), record)
            done[i] = record
            written.append(record["name"])
    finally:
        results.close()
        bar.close()
    seconds = time.perf_counter() - t0

    manifest, missing = finalize(out, plan, verified=set(done))
    return BuildResult(
        out=out, manifest=manifest, shards_written=written,
        shards_reused=[done[i]["name"] for i in sorted(done) if done[i]["name"] not in written],
        clips_processed=len(todo_segs), clips_written=n_ok, skipped=skipped, seconds=seconds,
        shards_missing=missing, upsampled=upsampled, unlisted=source.unlisted,
    )


def _block(refs: dict, seg) -> tuple[str, int] | None:
    ref = refs.get(seg.ytid)
    return None if ref is None else ref.block


def _count_upsampled(results: Iterator[ClipResult], rate: int, counts: Counter) -> Iterator[ClipResult]:
    """Pass results through, counting clips per source rate below ``rate`` (their mels above
    half that rate are empty)."""
    try:
        for r in results:
            if r.kind == "ok" and r.rate < rate:
                counts[r.rate] += 1
            yield r
    finally:
        results.close()


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
    if r.upsampled:
        rates = ", ".join(f"{n} from {sr / 1000:g} kHz" for sr, n in sorted(r.upsampled.items()))
        lines.append(f"upsampled {sum(r.upsampled.values())} clip(s) ({rates}): their mels above half "
                     "that rate are empty")
    if r.unlisted:
        lines.append(f"{r.unlisted} clip(s) of the containers are not in --segments and were left out")
    if r.skipped:
        lines.append("skipped this run: " + ", ".join(f"{n} {k}" for k, n in sorted(r.skipped.items())))
    m = r.manifest
    if m is None:
        lines.append(f"{len(r.shards_missing)} shard slot(s) of this set are not built here yet "
                     f"({name_ranges(r.shards_missing)}). Jobs sharing this --out: the last one to "
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
    enc = m["encoding"]
    size = sum(s["bytes"] for s in m["shards"]) / max(1, m["num_samples"])
    if enc["name"] == "uint8":
        stored = (f"stored as uint8 ({enc['step_db']:g} dB steps, zstd): {size / 1e3:.1f} kB per clip; "
                  f"{m['clipped_values']} value(s) outside [{enc['min_db']:g}, {enc['max_db']:g}] dB clipped")
    else:
        stored = f"stored as {enc['name']}: {size / 1e3:.1f} kB per clip"
    lines.append(stored)
    norm = m["normalization"]
    if norm:
        lines.append(f"log-mel mean {norm['mean']:.4f} dB, std {norm['std']:.4f} dB "
                     f"(reference: {REFERENCE_NORMALIZATION.mean}, {REFERENCE_NORMALIZATION.std})")
    d = m["durations"]
    if d["mean"] is not None:
        lines.append(f"durations {d['min']:.2f}-{d['max']:.2f} s (mean {d['mean']:.2f}); "
                     f"{d['padded']} zero-padded, {d['trimmed']} trimmed to {m['feature_config']['clip_seconds']:g} s")
        lines += short_clips_warning(m)
    lines.append(f"manifest: {r.out / MANIFEST_NAME}; sizes: {r.out / SIZES_NAME}")
    return "\n".join(lines)
