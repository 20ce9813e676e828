"""The build's settings and its plan: which clips go into which shard slot.

The plan is fixed before any audio is read: the clips are put in a seeded order and slot ``i``
holds positions ``[i * shard_size, (i + 1) * shard_size)`` of it. ``_build/plan.json`` records the
order's hash and the settings, so a folder is resumed or merged only by the same build.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Hashable, Sequence

import numpy as np

from ..features import FeatureConfig
from ..files import write_json
from ..labels import DroppedRow, LabelSet, Segment, resolve_pattern
from .format import ENCODINGS, MANIFEST_NAME, LogmelEncoding

__all__ = ["BuildError", "BuildOptions", "shard_name", "order_segments", "part_shard_range",
           "make_plan", "check_or_write_plan", "read_plan", "STATE_DIR", "PLAN_NAME", "PLAN_FORMAT"]

STATE_DIR = "_build"
PLAN_NAME = "plan.json"
# /2: dropped rows are records (kind, ytid, start, end, row, reason), not (row, reason) pairs.
PLAN_FORMAT = "audioset_dcls.build_plan/2"
# Plan entries that must agree for a folder to be resumed or merged.
PLAN_KEYS = ("split", "num_clips", "shard_size", "num_shards", "seed", "shuffle", "order_sha256",
             "feature_config", "encoding", "labels")
_SPLIT_RE = re.compile(r"[A-Za-z0-9_-]+")


class BuildError(RuntimeError):
    """The build cannot go on (bad arguments, a folder from another build). One line."""


@dataclass(frozen=True, kw_only=True)
class BuildOptions:
    """Everything one build run needs. ``part`` is ``(i, N)``; ``workers=0`` runs in-process.

    The inputs are one of: AudioSet ``segments`` + ``audio_dir`` (+ ``labels``, a
    ``class_labels_indices.csv``; default: the one that ships with the package); AudioSet
    containers, one kind of ``hdf5`` / ``parquet`` / ``wds_audio`` (files, folders, globs or brace
    patterns; optionally with ``segments`` for their times and coverage); ``lists`` (CSVs of
    ``path,labels[,start,end]``); ``class_folders`` (one sub-folder per class). ``classes`` fixes
    the class list of the last two (see ``sources``)."""

    out: Path
    split: str
    segments: tuple[Path, ...] = ()
    labels: Path | None = None
    audio_dir: Path | None = None
    hdf5: tuple[str, ...] = ()
    parquet: tuple[str, ...] = ()
    wds_audio: tuple[str, ...] = ()
    label_field: str = "labels"  # --wds-audio: the json field holding the labels
    lists: tuple[Path, ...] = ()
    class_folders: Path | None = None
    classes: Path | None = None
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
    encoding: str = "uint8"  # how log-mels are stored: "uint8" (~75 kB per 10 s clip) or "float16" (~256 kB)

    @property
    def containers(self) -> tuple[str, tuple[str, ...]] | None:
        """``("hdf5" | "parquet" | "wds_audio", patterns)`` of a container build, else None."""
        for kind in ("hdf5", "parquet", "wds_audio"):
            if getattr(self, kind):
                return kind, getattr(self, kind)
        return None

    @property
    def inputs(self) -> str:
        """The input files or folder, for messages."""
        return ", ".join(self.input_files())

    def input_files(self) -> list[str]:
        """What the plan records as the build's inputs."""
        if self.containers:
            return [str(p) for p in (*self.containers[1], *self.segments)]
        return [str(p) for p in (self.lists or ((self.class_folders,) if self.class_folders else self.segments))]

    def check(self) -> None:
        kinds = [k for k, on in (("--segments", bool(self.segments) and not self.containers),
                                 ("--hdf5", bool(self.hdf5)), ("--parquet", bool(self.parquet)),
                                 ("--wds-audio", bool(self.wds_audio)), ("--list", bool(self.lists)),
                                 ("--class-folders", self.class_folders is not None)) if on]
        if len(kinds) != 1:
            raise BuildError(f"give one kind of input: --segments with --audio-dir, --hdf5, --parquet or "
                             f"--wds-audio (AudioSet), --list or --class-folders, not {' and '.join(kinds) or 'none'}")
        if self.containers and (self.audio_dir is not None or self.pattern):
            raise BuildError(f"--{kinds[0].lstrip('-')} holds the audio: drop --audio-dir / --pattern")
        if self.segments and not self.containers and self.audio_dir is None:
            raise BuildError("--segments needs --audio-dir (the folder of downloaded clips), or a container "
                             "(--hdf5, --parquet, --wds-audio)")
        if self.classes is not None and (self.segments or self.containers):
            raise BuildError("--classes is for --list and --class-folders; AudioSet's classes come from --labels")
        if not _SPLIT_RE.fullmatch(self.split):
            raise BuildError(f"--split {self.split!r}: use letters, digits, '_' and '-' only")
        if self.shard_size < 1:
            raise BuildError(f"--shard-size must be at least 1, not {self.shard_size}")
        if self.encoding not in ENCODINGS:
            raise BuildError(f"--encoding {self.encoding!r}: use one of {', '.join(ENCODINGS)}")
        if self.workers < 0:
            raise BuildError(f"--workers must be >= 0, not {self.workers}")
        i, n = self.part
        if not (n >= 1 and 0 <= i < n):
            raise BuildError(f"--part {i}/{n}: expected i/N with 0 <= i < N (e.g. 0/4 ... 3/4)")
        if self.segments and not self.containers and not Path(self.audio_dir).is_dir():
            raise BuildError(f"{self.audio_dir}: audio folder does not exist")
        if self.pattern and (not self.segments or self.containers):
            raise BuildError("--pattern is for --segments: lists and class folders name their files")
        if self.pattern:
            try:
                resolve_pattern(self.pattern, self.audio_dir, Segment("x", 0.0, 10.0, ()))
            except ValueError as err:
                raise BuildError(f"--pattern: {err}") from None


def shard_name(split: str, index: int) -> str:
    """``<split>-NNNNNN.tar``."""
    return f"{split}-{index:06d}.tar"


def order_segments(segments: Sequence[Segment], seed: int, shuffle: bool,
                   block_of: Callable[[Segment], Hashable | None] | None = None) -> list[Segment]:
    """The build order: a seeded permutation of the rows (or the rows as read).

    ``block_of``: clips read together (a parquet row group; None: a clip on its own). Then the
    blocks are permuted and each block's clips stay together, permuted among themselves, so a
    worker reads a row group once rather than once per clip. With blocks of one clip this is
    the plain permutation.
    """
    if not shuffle:
        return list(segments)
    rng = np.random.default_rng(seed)
    if block_of is None:
        return [segments[i] for i in rng.permutation(len(segments))]
    blocks: dict[Hashable, list[int]] = {}
    for i, seg in enumerate(segments):
        b = block_of(seg)
        blocks.setdefault(("clip", i) if b is None else b, []).append(i)
    members = list(blocks.values())
    order = []
    for b in rng.permutation(len(members)):
        rows = members[b]
        order += [segments[rows[j]] for j in (rng.permutation(len(rows)) if len(rows) > 1 else (0,))]
    return order


def part_shard_range(num_shards: int, part: int, parts: int) -> range:
    """Shards built by ``--part part/parts``: disjoint, contiguous, covering ``range(num_shards)``."""
    return range(part * num_shards // parts, (part + 1) * num_shards // parts)


def _order_hash(order: Sequence[Segment]) -> str:
    """sha256 of the ordered (key, labels) list: changes if a row, its labels or the order do."""
    h = hashlib.sha256()
    for seg in order:
        h.update(f"{seg.key} {','.join(map(str, seg.labels))}\n".encode())
    return h.hexdigest()


def make_plan(opts: BuildOptions, labels: LabelSet, order: Sequence[Segment],
              dropped: Sequence[DroppedRow]) -> dict[str, Any]:
    """The plan of a build: its settings, the order's hash, and the input rows left out."""
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
        "encoding": LogmelEncoding(opts.encoding).to_dict(),
        "labels": labels.to_dict(),
        "segment_files": opts.input_files(),
        # Rows left out while reading the CSVs (duplicates, unknown mids): part of the report.
        "dropped_rows": [d.to_dict() for d in dropped],
    }


def read_plan(out: Path) -> dict[str, Any]:
    """The plan of the build in ``out``; BuildError if there is none."""
    path = out / STATE_DIR / PLAN_NAME
    if not path.is_file():
        raise BuildError(f"{out}: no {STATE_DIR}/{PLAN_NAME}; is this a build_shards output folder?")
    plan = json.loads(path.read_text())
    if plan.get("format") != PLAN_FORMAT:
        raise BuildError(f"{path}: written by another version of the builder ({plan.get('format')}); "
                         "run the build command once (any --part) to update it")
    return plan


def check_or_write_plan(out: Path, plan: dict[str, Any]) -> None:
    """Write ``plan`` into a new folder, or check that the folder holds the same build."""
    state = out / STATE_DIR
    path = state / PLAN_NAME
    if path.is_file():
        old = json.loads(path.read_text())
        planned_encoding = "encoding" in old  # absent: planned before encodings existed (float16)
        was, now = LogmelEncoding.from_dict(old.get("encoding")), LogmelEncoding.from_dict(plan["encoding"])
        if was != now:
            how = f"stored as {was.name}, not {now.name}" if was.name != now.name else f"with other {now.name} settings"
            raise BuildError(f"{out}: holds a build {how}; resume it with --encoding {was.name}, or use a new "
                             "--out (a shard set never mixes encodings)")
        for key in PLAN_KEYS:
            if key == "encoding":
                continue
            if old.get(key) != plan[key]:
                what = "segment list" if key in ("order_sha256", "num_clips") else key
                was, now = old.get(key), plan[key]
                detail = f" (was {was}, now {now})" if not isinstance(now, (dict, list)) and key != "order_sha256" else ""
                raise BuildError(
                    f"{out}: holds a build with a different {what}{detail}; use a new --out, "
                    "or delete the folder to rebuild"
                )
        if old.get("format") != PLAN_FORMAT or not planned_encoding:  # the same build, planned by an older builder
            write_json(path, plan)
        return
    if (out / MANIFEST_NAME).is_file() or any(out.glob("*.tar")):
        raise BuildError(f"{out}: has shards but no {STATE_DIR}/{PLAN_NAME}; use an empty --out")
    state.mkdir(parents=True, exist_ok=True)
    write_json(path, plan)
