"""AudioSet metadata: the class index, the segment lists, and where each segment's audio lives.

``class_labels_indices.csv`` (``index,mid,display_name``, names quoted because they contain
commas) becomes a :class:`LabelSet`. The segment lists (``balanced_train_segments.csv``,
``unbalanced_train_segments.csv``, ``eval_segments.csv``) become :class:`Segment` records. Both
variants users have are read:

- official: ``# Segments csv created ...`` and ``# num_ytids=...`` comment lines, the
  ``# YTID, start_seconds, end_seconds, positive_labels`` column line, ``, `` separators,
  ``0.000`` times, label lists always quoted;
- re-saved: no leading comment lines, ``,`` separators, integer times, label list quoted only
  when it has several mids.

A mid that the class index does not know is an error by default (it means the segment list and
the class index do not belong together); ``unknown_mids="drop"`` removes such mids instead and
reports them, and a row left with no known mid is reported and skipped.

Audio files are found either with a filename pattern (``"Y{ytid}.wav"``,
``"{ytid}_{start_ms}_{end_ms}.m4a"``; may contain sub-folders) or, by default, with a recursive
index of the audio folder that recognises the usual layouts (``Y<ytid>.<ext>``, ``<ytid>.<ext>``,
``<ytid>_<start>.<ext>``, ``<ytid>_<start>_<end>.<ext>`` with seconds as integers, as ``30.000``
or as milliseconds, with or without the ``Y`` prefix, in any sub-folder, any audio extension).
"""

from __future__ import annotations

import csv
import dataclasses
import functools
import importlib.resources
import os
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np

__all__ = [
    "clip_key",
    "LabelError",
    "LabelSet",
    "Segment",
    "SegmentList",
    "DroppedRow",
    "read_label_set",
    "audioset_label_set",
    "read_segments",
    "read_segment_files",
    "drop_duplicates",
    "AUDIO_EXTENSIONS",
    "AudioIndex",
    "index_audio_dir",
    "resolve_pattern",
    "candidate_stems",
]


def clip_key(ytid: str, start: float) -> str:
    """Sample key of one segment: ``<ytid>_<start in integer milliseconds>``."""
    return f"{ytid}_{int(round(float(start) * 1000))}"


# Suffixes an AudioSet downloader produces (libsndfile formats + ffmpeg-only containers).
AUDIO_EXTENSIONS = frozenset(
    {".wav", ".flac", ".mp3", ".ogg", ".oga", ".opus", ".m4a", ".mp4", ".aac", ".webm", ".mkv",
     ".aiff", ".aif", ".au", ".wma"}
)

_YTID_RE = re.compile(r"[A-Za-z0-9_-]+")


class LabelError(ValueError):
    """A metadata file is malformed. The message is one line naming the file and line."""


@dataclass(frozen=True)
class LabelSet:
    """The class index: ``mids[i]`` and ``names[i]`` describe class ``i``."""

    mids: tuple[str, ...]
    names: tuple[str, ...]
    index: dict[str, int] = field(init=False, repr=False, compare=False)

    def __post_init__(self):
        if len(self.mids) != len(self.names):
            raise ValueError(f"{len(self.mids)} mids but {len(self.names)} names")
        index = {m: i for i, m in enumerate(self.mids)}
        if len(index) != len(self.mids):
            dup = sorted({m for m in self.mids if self.mids.count(m) > 1})
            raise ValueError(f"duplicate mids in class index: {dup[:5]}")
        object.__setattr__(self, "index", index)

    def __len__(self) -> int:
        return len(self.mids)

    def indices(self, mids: Iterable[str]) -> list[int]:
        """Sorted class indices of ``mids``; KeyError names an unknown mid."""
        out = set()
        for m in mids:
            if m not in self.index:
                raise KeyError(f"unknown mid {m!r}")
            out.add(self.index[m])
        return sorted(out)

    def to_multi_hot(self, labels: Iterable[str | int], dtype=np.float32) -> np.ndarray:
        """Mids or class indices -> multi-hot vector (num_classes,)."""
        y = np.zeros(len(self), dtype=dtype)
        for lab in labels:
            y[self.index[lab] if isinstance(lab, str) else int(lab)] = 1
        return y

    def to_dict(self) -> dict[str, list[str]]:
        """JSON-able form stored in shard manifests and checkpoints."""
        return {"mids": list(self.mids), "names": list(self.names)}

    @classmethod
    def from_dict(cls, d: dict) -> "LabelSet":
        return cls(mids=tuple(d["mids"]), names=tuple(d["names"]))

    def to_records(self) -> list[dict[str, Any]]:
        """``[{"index", "mid", "name"}]`` in class order: the form inference checkpoints store."""
        return [{"index": i, "mid": m, "name": n} for i, (m, n) in enumerate(zip(self.mids, self.names))]


def read_label_set(path: str | Path) -> LabelSet:
    """Parse ``class_labels_indices.csv`` (``index,mid,display_name``) into a LabelSet.

    Indices must be 0..N-1 in order. Raises LabelError naming the file and line otherwise.
    """
    path = Path(path)
    if not path.is_file():
        raise LabelError(f"{path}: no such class index file")
    mids: list[str] = []
    names: list[str] = []
    seen: dict[str, int] = {}
    with open(path, newline="", encoding="utf-8-sig") as f:
        for lineno, row in enumerate(csv.reader(f, skipinitialspace=True), start=1):
            if not row or not "".join(row).strip() or row[0].lstrip().startswith("#"):
                continue
            if row[0].strip().lower() == "index":
                continue  # column line
            if len(row) < 3:
                raise LabelError(f"{path}:{lineno}: expected index,mid,display_name, got {','.join(row)!r}")
            idx_text, mid, name = row[0].strip(), row[1].strip(), ",".join(row[2:]).strip()
            try:
                idx = int(idx_text)
            except ValueError:
                raise LabelError(f"{path}:{lineno}: class index {idx_text!r} is not an integer") from None
            if idx != len(mids):
                raise LabelError(f"{path}:{lineno}: class index {idx} out of order (expected {len(mids)})")
            if not mid:
                raise LabelError(f"{path}:{lineno}: empty mid")
            if mid in seen:
                raise LabelError(f"{path}:{lineno}: mid {mid} already used on line {seen[mid]}")
            seen[mid] = lineno
            mids.append(mid)
            names.append(name)
    if not mids:
        raise LabelError(f"{path}: no classes found")
    return LabelSet(mids=tuple(mids), names=tuple(names))


@functools.cache
def audioset_label_set() -> LabelSet:
    """AudioSet's 527 classes, from the ``class_labels_indices.csv`` that ships with the package
    (``audioset_dcls/assets``, CC BY 4.0 Google; see the NOTICE.md beside it)."""
    resource = importlib.resources.files("audioset_dcls") / "assets" / "class_labels_indices.csv"
    with importlib.resources.as_file(resource) as path:
        return read_label_set(path)


@dataclass(frozen=True, slots=True)
class Segment:
    """One row of a segment list: a 10 s (or shorter) excerpt of a YouTube video.

    ``labels`` are class indices into the LabelSet the list was read with; ``file`` and
    ``line`` say where the row came from (slots and shared strings keep the ~2M rows of the
    unbalanced list at a few hundred MB).

    ``path``: the audio file, when the input names it (a ``--list`` CSV or ``--class-folders``;
    see ``shards.sources``). Then ``ytid`` is an id made from the path, and ``start`` /
    ``end`` cut the clip from that file (``end`` None: to the end of the file). Without
    ``path`` (AudioSet), they are the times in the video, and the file found for the segment
    already holds just the clip.
    """

    ytid: str
    start: float
    end: float | None
    mids: tuple[str, ...]
    labels: tuple[int, ...] = ()
    file: str = ""
    line: int = 0
    path: str | None = None

    @property
    def source(self) -> str:
        """``file:line`` of the row, for messages (the audio file of a class folder: no line)."""
        return f"{self.file}:{self.line}" if self.line else self.file

    @property
    def key(self) -> str:
        """Sample key in the shards: ``<ytid>_<start_ms>``."""
        return clip_key(self.ytid, self.start)


@dataclass(frozen=True)
class DroppedRow:
    """A segment row, or some of its mids, left out while reading a segment list.

    ``kind``: ``"duplicate"`` (its key was read before: the row is skipped) or ``"label"``
    (unknown mids dropped with ``unknown_mids="drop"``; the row is skipped when none is left).
    ``row`` is ``file:line``; ``reason`` is one line for people.
    """

    kind: str
    ytid: str
    start: float
    end: float | None
    row: str
    reason: str

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass
class SegmentList:
    """Segments read from one or more files, plus what was left out while reading.

    ``dropped``: a :class:`DroppedRow` for every row or mid removed (only with
    ``unknown_mids="drop"`` or for duplicate segments).
    """

    segments: list[Segment]
    dropped: list[DroppedRow] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.segments)

    def __iter__(self):
        return iter(self.segments)

    def __getitem__(self, i):
        return self.segments[i]


def _parse_time(text: str, what: str, where: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise LabelError(f"{where}: {what} {text!r} is not a number") from None
    if not np.isfinite(value) or value < 0:
        raise LabelError(f"{where}: {what} {text!r} is not a non-negative number")
    return value


def read_segments(
    path: str | Path,
    labels: LabelSet | None = None,
    *,
    unknown_mids: str = "error",
) -> SegmentList:
    """Parse one AudioSet segment CSV (either variant, see the module docstring).

    With ``labels``, mids are mapped to class indices (``Segment.labels``); an unknown mid
    raises LabelError (``unknown_mids="error"``) or is dropped and reported (``"drop"``).
    Malformed rows raise LabelError ``"<file>:<line>: <what is wrong>"``.
    """
    if unknown_mids not in ("error", "drop"):
        raise ValueError(f"unknown_mids must be 'error' or 'drop', not {unknown_mids!r}")
    path = Path(path)
    if not path.is_file():
        raise LabelError(f"{path}: no such segment file")
    segments: list[Segment] = []
    dropped: list[DroppedRow] = []
    file_name = str(path)
    with open(path, newline="", encoding="utf-8-sig") as f:
        for lineno, row in enumerate(csv.reader(f, skipinitialspace=True), start=1):
            where = f"{path}:{lineno}"
            if not row or not "".join(row).strip():
                continue
            first = row[0].strip()
            if first.startswith("#") or first.upper() == "YTID":
                continue  # comment or column line
            if len(row) < 4:
                raise LabelError(
                    f"{where}: expected YTID, start_seconds, end_seconds, positive_labels; got {','.join(row)!r}"
                )
            ytid = first
            if not _YTID_RE.fullmatch(ytid):
                raise LabelError(f"{where}: YTID {ytid!r} has characters other than A-Z a-z 0-9 _ -")
            start = _parse_time(row[1].strip(), "start time", where)
            end = _parse_time(row[2].strip(), "end time", where)
            if end < start:
                raise LabelError(f"{where}: end time {end} is before start time {start}")
            # The label list is one quoted field; tolerate writers that did not quote it.
            mids = tuple(m.strip() for field_ in row[3:] for m in field_.split(",") if m.strip())
            if not mids:
                raise LabelError(f"{where}: no labels")
            indices: tuple[int, ...] = ()
            if labels is not None:
                unknown = [m for m in mids if m not in labels.index]
                if unknown:
                    if unknown_mids == "error":
                        raise LabelError(
                            f"{where}: mid(s) {', '.join(unknown)} not in the class index "
                            "(wrong class_labels_indices.csv? use unknown_mids='drop' to skip them)"
                        )
                    mids = tuple(m for m in mids if m in labels.index)
                    # One report per row: the row skipped, or the mids dropped from a kept row.
                    what = "no known label left, segment skipped" if not mids else "dropped"
                    dropped.append(DroppedRow("label", ytid, start, end, where,
                                              f"{ytid}: unknown mid(s) {', '.join(unknown)}; {what}"))
                    if not mids:
                        continue
                indices = tuple(labels.indices(mids))
                mids = tuple(labels.mids[i] for i in indices)  # shared strings, sorted by index
            else:
                mids = tuple(sys.intern(m) for m in mids)
            segments.append(Segment(ytid, start, end, mids, indices, file_name, lineno))
    return SegmentList(segments, dropped)


def read_segment_files(
    paths: Sequence[str | Path], labels: LabelSet | None = None, *, unknown_mids: str = "error"
) -> SegmentList:
    """Read several segment CSVs (e.g. balanced + unbalanced train) into one list.

    A segment whose key (``<ytid>_<start_ms>``) was already read is dropped and reported, so
    each key appears once; order is file order, then row order.
    """
    dropped: list[DroppedRow] = []
    segments: list[Segment] = []
    for p in paths:
        part = read_segments(p, labels, unknown_mids=unknown_mids)
        dropped.extend(part.dropped)
        segments.extend(part.segments)
    return drop_duplicates(segments, dropped)


def drop_duplicates(segments: Iterable[Segment], dropped: Sequence[DroppedRow] = ()) -> SegmentList:
    """Keep the first segment of each key (``<ytid>_<start_ms>``), report the others as
    ``"duplicate"`` after ``dropped``."""
    out: list[Segment] = []
    dropped = list(dropped)
    first_seen: dict[str, str] = {}
    for seg in segments:
        k = seg.key
        if k in first_seen:
            dropped.append(DroppedRow("duplicate", seg.ytid, seg.start, seg.end, seg.source,
                                      f"{seg.ytid}: duplicate of segment at {first_seen[k]}, skipped"))
            continue
        first_seen[k] = seg.source
        out.append(seg)
    return SegmentList(out, dropped)


# ---------------------------------------------------------------------------------------------
# Finding the audio file of a segment


_TIME_STYLES = (
    lambda t: str(int(t)) if float(t).is_integer() else None,  # 30
    lambda t: f"{t:.3f}",  # 30.000
    lambda t: f"{t:.1f}",  # 30.0
    lambda t: str(int(round(t * 1000))),  # 30000 (ms)
)


def candidate_stems(seg: Segment) -> list[str]:
    """File-name stems (no extension) that may hold ``seg``, most specific first."""
    stems = []
    for prefix in ("", "Y"):
        base = prefix + seg.ytid
        # A start and an end written the same way: 30_40, 30.000_40.000, 30.0_40.0, 30000_40000.
        for style in _TIME_STYLES:
            s, e = style(seg.start), style(seg.end)
            if s is not None and e is not None:
                stems.append(f"{base}_{s}_{e}")
        stems += [f"{base}_{s}" for s in (style(seg.start) for style in _TIME_STYLES) if s is not None]
    stems += [seg.ytid, "Y" + seg.ytid]
    return list(dict.fromkeys(stems))


@dataclass
class AudioIndex:
    """Stem -> audio paths found under a folder (recursively). Build with ``index_audio_dir``."""

    root: Path
    by_stem: dict[str, list[str]]
    num_files: int

    def find(self, seg: Segment) -> tuple[Path | None, int]:
        """The file for ``seg`` and how many files matched its best stem (0 when none).

        When several files share a stem (``x.wav`` and ``x.flac``, or two folders), the first
        in sorted path order is used, so the choice is reproducible.
        """
        for stem in candidate_stems(seg):
            hits = self.by_stem.get(stem)
            if hits:
                return Path(hits[0]), len(hits)
        return None, 0


def index_audio_dir(root: str | Path, extensions: Iterable[str] = AUDIO_EXTENSIONS) -> AudioIndex:
    """Walk ``root`` recursively (symlinked folders included, each real folder once) and index
    audio files by stem.

    Files whose suffix (case-insensitive) is not in ``extensions`` are ignored, so partial
    downloads (``.part``, ``.tmp``) never match.
    """
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"{root}: audio folder does not exist")
    exts = {e.lower() if e.startswith(".") else "." + e.lower() for e in extensions}
    by_stem: dict[str, list[str]] = {}
    count = 0
    seen = {os.path.realpath(root)}
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        # Data folders are often symlinks to other disks; skip any real folder seen before (cycles).
        keep = []
        for d in sorted(dirnames):
            real = os.path.realpath(os.path.join(dirpath, d))
            if real not in seen:
                seen.add(real)
                keep.append(d)
        dirnames[:] = keep
        for name in filenames:
            stem, ext = os.path.splitext(name)
            if ext.lower() in exts and not name.startswith("."):
                by_stem.setdefault(stem, []).append(os.path.join(dirpath, name))
                count += 1
    for hits in by_stem.values():
        hits.sort()
    return AudioIndex(root=root, by_stem=by_stem, num_files=count)


def resolve_pattern(pattern: str, root: str | Path, seg: Segment) -> Path:
    """``root / pattern.format(...)`` for a segment.

    Fields: ``{ytid}``, ``{start}`` / ``{end}`` (float seconds; use a format spec such as
    ``{start:.3f}``), ``{start_s}`` / ``{end_s}`` (integer seconds), ``{start_ms}`` /
    ``{end_ms}`` (integer milliseconds). Example: ``"Y{ytid}_{start:.3f}_{end:.3f}.wav"``.
    """
    try:
        rel = pattern.format(
            ytid=seg.ytid, start=seg.start, end=seg.end,
            start_s=int(seg.start), end_s=int(seg.end),
            start_ms=int(round(seg.start * 1000)), end_ms=int(round(seg.end * 1000)),
        )
    except (KeyError, IndexError, ValueError) as err:
        raise ValueError(
            f"bad file pattern {pattern!r} ({err}); fields: ytid, start, end, start_s, end_s, start_ms, end_ms"
        ) from None
    return Path(root) / rel
