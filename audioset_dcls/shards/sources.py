"""Where a build's clips and labels come from: AudioSet segment lists and a folder of audio,
AudioSet containers (``--hdf5``, ``--parquet``, ``--wds-audio``), a list of labelled files
(``--list``), or one folder per class (``--class-folders``).

``read_clips`` gives the label set, the clips in input order and the input rows left out;
``ref_finder`` gives where each clip's audio is (an ``audio.containers.ClipRef``). The rest of the builder (plan, workers, writer,
manifest) sees only these, whatever the inputs were.

Your own labelled audio (any label set, single- or multi-label):

- ``--list train.csv``: a CSV with a header and columns ``path,labels`` and optionally
  ``start,end`` (seconds: the clip is cut from a longer file; empty: from its start / to its
  end). ``labels`` is one label name or several separated by ``;``. Relative paths are relative
  to the CSV's folder. Several lists (e.g. folds 1-4) make one build.
- ``--class-folders DIR``: ``DIR/<class>/**/<file>`` with an audio extension; one label per
  clip, the folder's name. Other files are ignored.

The class list is the sorted set of label names found, or, with ``--classes FILE``, the names in
``FILE`` in that order: a text file (one name per line) or a shard folder / its
``manifest.json`` (the train build's list, so that eval shards share its class indices). A label
not in ``--classes`` is an error naming the row (``--unknown-mids drop`` drops it and reports it
instead). Names are stored as both the ``mids`` and the ``names`` of the manifest's label list,
so checkpoints carry them. Each clip's id (its sample key without the start) is made from its
path: letters, digits, ``_`` and ``-`` of the path as given, and 8 hex digits of its hash.

AudioSet containers (see ``audioset_dcls.audio.containers`` for the layouts): every clip of the
files, in file and row order, id = the YouTube id (start 0), labels from the container
(HDF5 ``target`` columns in ``--labels`` order; parquet ``labels`` mids; the tar json's
``--label-field``, mids or names). Rows that cannot be used are reported with a kind:
``missing`` (no id / no audio member), ``no_labels`` (no label), ``unreadable`` (bad json),
``label`` (unknown mid, with ``--unknown-mids drop``). With ``--segments`` too, the clips are
those of the segment lists (their times, labels and keys, as a folder build gives), found in the
containers by YouTube id; listed segments the containers lack are skipped as ``missing``.
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Sequence

from ..audio.containers import ClipRef, ContainerClip, expand_container_paths, iter_hdf5, iter_parquet, iter_wds_audio
from ..labels import (
    AUDIO_EXTENSIONS,
    DroppedRow,
    LabelError,
    LabelSet,
    Segment,
    audioset_label_set,
    drop_duplicates,
    index_audio_dir,
    read_label_set,
    read_segment_files,
    resolve_pattern,
)
from .format import MANIFEST_NAME
from .plan import BuildError, BuildOptions

__all__ = ["ClipList", "read_clips", "ref_finder", "file_finder", "container_clips", "read_clip_lists", "read_class_folders", "read_class_names",
           "clip_id"]

LABEL_SEPARATOR = ";"


@dataclass
class ClipList:
    """The clips of a build in input order, their label space, and the input rows left out."""

    labels: LabelSet
    clips: list[Segment]
    dropped: list[DroppedRow] = field(default_factory=list)
    refs: dict[str, ClipRef] | None = None  # containers: YouTube id -> where its audio is
    unlisted: int = 0  # containers with --segments: container clips not in the segment lists


def read_clips(opts: BuildOptions) -> ClipList:
    """The clips of ``opts``' inputs (duplicates removed), labelled with its class list.

    Raises LabelError (one line, naming the file and line) for malformed inputs, BuildError when
    no clip is left.
    """
    if opts.lists or opts.class_folders:
        classes = read_class_names(opts.classes) if opts.classes else None
        rows = read_clip_lists(opts.lists) if opts.lists else read_class_folders(opts.class_folders)
        return label_clips(rows, classes, opts.unknown_mids, inputs=opts.inputs)
    labels = read_label_set(opts.labels) if opts.labels is not None else audioset_label_set()
    if opts.containers:
        return container_clips(opts, labels)
    segs = read_segment_files(opts.segments, labels, unknown_mids=opts.unknown_mids)
    if len(segs) == 0:
        raise BuildError(f"no segments in {', '.join(map(str, opts.segments))}")
    return ClipList(labels, segs.segments, segs.dropped)


def ref_finder(opts: BuildOptions, source: ClipList, clips: Sequence[Segment]) -> Callable[[Segment], ClipRef | None]:
    """clip -> where its audio is, or None (not found: skipped as ``missing``)."""
    if source.refs is not None:
        refs = source.refs
        return lambda seg: refs.get(seg.ytid)
    find = file_finder(opts, clips)

    def ref(seg: Segment) -> ClipRef | None:
        path = find(seg)
        if path is None:
            return None
        return ClipRef.file(path, seg.start, seg.end) if seg.path is not None else ClipRef.file(path)

    return ref


def file_finder(opts: BuildOptions, clips: Sequence[Segment]) -> Callable[[Segment], str | None]:
    """clip -> path string or None: the path the input named (lists, class folders), else by
    ``opts.pattern`` or by a recursive index of the audio folder (built only when ``clips`` is
    not empty: resuming a finished build reads no folder)."""
    if opts.lists or opts.class_folders:
        return lambda seg: seg.path
    if opts.pattern:
        return lambda seg: str(resolve_pattern(opts.pattern, opts.audio_dir, seg))
    if not clips:
        return lambda seg: None
    index = index_audio_dir(opts.audio_dir)
    if opts.progress:
        print(f"indexed {index.num_files} audio files under {opts.audio_dir}", file=sys.stderr)

    def find(seg: Segment) -> str | None:
        path, _ = index.find(seg)
        return None if path is None else str(path)

    return find


# ------------------------------------------------------------------- your own labelled audio

_ID_CHARS = re.compile(r"[^A-Za-z0-9_-]+")


def clip_id(path_text: str, path: str | Path) -> str:
    """A sample-key-safe id of the file ``path``, named ``path_text`` in the input:
    ``dog/001.wav`` -> ``dog-001-<8 hex of the absolute path>`` (no dots or slashes; the hash
    tells apart files of similar names, and the same name in lists of different folders)."""
    stem = os.path.splitext(path_text)[0]
    readable = _ID_CHARS.sub("-", stem).strip("-")[-48:] or "clip"
    return f"{readable}-{hashlib.sha256(os.path.abspath(path).encode()).hexdigest()[:8]}"


@dataclass(frozen=True)
class LabelledRow:
    """One labelled clip of the input, before its label names become class indices."""

    path: str  # the audio file (absolute, or relative to the working directory)
    names: tuple[str, ...]  # label names as written
    start: float
    end: float | None
    id: str  # clip_id of the file
    file: str  # the list file, or the audio file for class folders
    line: int = 0  # the row in the list file (0: class folders)

    @property
    def where(self) -> str:
        return f"{self.file}:{self.line}" if self.line else self.file


def _time(text: str | None, what: str, where: str) -> float | None:
    text = (text or "").strip()
    if not text:
        return None
    try:
        value = float(text)
    except ValueError:
        raise LabelError(f"{where}: {what} {text!r} is not a number of seconds") from None
    if not value >= 0 or value == float("inf"):
        raise LabelError(f"{where}: {what} {text!r} is not a non-negative number of seconds")
    return value


def read_clip_lists(paths: Sequence[str | Path]) -> list[LabelledRow]:
    """Rows of ``--list`` CSVs (``path,labels[,start,end]`` with a header), in file and row order."""
    rows: list[LabelledRow] = []
    for p in map(Path, paths):
        if not p.is_file():
            raise LabelError(f"{p}: no such list file")
        with open(p, newline="", encoding="utf-8-sig") as f:
            reader = csv.DictReader(f, skipinitialspace=True)
            columns = [c.strip().lower() for c in reader.fieldnames or []]
            if "path" not in columns or "labels" not in columns:
                raise LabelError(f"{p}:1: expected a header with the columns path,labels (and optionally "
                                 f"start,end), got {','.join(reader.fieldnames or [])!r}")
            reader.fieldnames = columns
            for row in reader:
                where = f"{p}:{reader.line_num}"
                text = (row.get("path") or "").strip()
                if not text and not "".join(str(v or "") for v in row.values()).strip():
                    continue  # blank line
                if not text:
                    raise LabelError(f"{where}: empty path")
                names = tuple(n.strip() for n in (row.get("labels") or "").split(LABEL_SEPARATOR) if n.strip())
                if not names:
                    raise LabelError(f"{where}: no labels")
                start = _time(row.get("start"), "start", where) or 0.0
                end = _time(row.get("end"), "end", where)
                if end is not None and end <= start:
                    raise LabelError(f"{where}: end {end:g} is not after start {start:g}")
                audio = Path(os.path.normpath(Path(text) if Path(text).is_absolute() else p.parent / text))
                rows.append(LabelledRow(str(audio), tuple(dict.fromkeys(names)), start, end, clip_id(text, audio),
                                        str(p), reader.line_num))
    return rows


def read_class_folders(root: str | Path) -> list[LabelledRow]:
    """One row per audio file under ``root/<class>/`` (any depth), label = the class folder's
    name; classes and files in sorted order."""
    root = Path(root)
    if not root.is_dir():
        raise LabelError(f"{root}: no such folder")
    rows: list[LabelledRow] = []
    for cls in sorted(d for d in root.iterdir() if d.is_dir() and not d.name.startswith(".")):
        for dirpath, dirnames, filenames in os.walk(cls, followlinks=True):
            dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
            for name in sorted(filenames):
                if name.startswith(".") or os.path.splitext(name)[1].lower() not in AUDIO_EXTENSIONS:
                    continue
                path = Path(dirpath) / name
                rel = path.relative_to(root).as_posix()
                rows.append(LabelledRow(str(path), (cls.name,), 0.0, None, clip_id(rel, path), str(path)))
    if not rows:
        raise LabelError(f"{root}: no audio files in class sub-folders (expected {root}/<class>/<file>.wav)")
    return rows


def read_class_names(path: str | Path) -> list[str]:
    """The class list of ``--classes``: a text file (one name per line; blank lines and ``#``
    comments skipped), or a shard folder or its manifest.json (the names of its label list)."""
    path = Path(path)
    if path.is_dir():
        path = path / MANIFEST_NAME
    if not path.is_file():
        raise LabelError(f"{path}: no such class list")
    if path.suffix == ".json":
        try:
            names = list(json.loads(path.read_text())["labels"]["names"])
        except (ValueError, KeyError, TypeError) as err:
            raise LabelError(f"{path}: not a shard manifest with a label list ({err})") from None
    else:
        names, where = [], {}  # name -> the line it is on
        for lineno, line in enumerate(path.read_text(encoding="utf-8-sig").splitlines(), start=1):
            name = line.strip()
            if not name or name.startswith("#"):
                continue
            if name in where:
                raise LabelError(f"{path}:{lineno}: class {name!r} already listed on line {where[name]}")
            names.append(name)
            where[name] = lineno
    if not names:
        raise LabelError(f"{path}: no class names")
    if len(set(names)) != len(names):
        raise LabelError(f"{path}: duplicate class names")
    return names


def label_clips(rows: Iterable[LabelledRow], classes: Sequence[str] | None, unknown: str,
                inputs: str = "the inputs") -> ClipList:
    """Label names -> class indices. Without ``classes``, the class list is the sorted set of
    names found. A name not in ``classes`` is a LabelError, or with ``unknown="drop"`` dropped
    and reported (a row left with no label is skipped: one report per row)."""
    rows = list(rows)
    if classes is None:
        classes = sorted({n for r in rows for n in r.names})
    labels = LabelSet(mids=tuple(classes), names=tuple(classes))
    clips, dropped = [], []
    for r in rows:
        missing = [n for n in r.names if n not in labels.index]
        names = r.names
        if missing:
            if unknown == "error":
                raise LabelError(f"{r.where}: label(s) {', '.join(map(repr, missing))} not in the class list "
                                 "(--classes); use --unknown-mids drop to skip them")
            names = tuple(n for n in names if n in labels.index)
            what = "no known label left, clip skipped" if not names else "dropped"
            dropped.append(DroppedRow("label", r.id, r.start, r.end, r.where,
                                      f"{r.path}: unknown label(s) {', '.join(missing)}; {what}"))
            if not names:
                continue
        indices = tuple(labels.indices(names))
        clips.append(Segment(r.id, r.start, r.end, tuple(labels.mids[i] for i in indices), indices, r.file, r.line,
                             r.path))
    segs = drop_duplicates(clips, dropped)
    if len(segs) == 0:
        raise BuildError(f"no labelled clips in {inputs}")
    return ClipList(labels, segs.segments, segs.dropped)



# ------------------------------------------------------------------- AudioSet containers

_SAFE_ID = re.compile(r"[A-Za-z0-9_-]+")  # what a sample key may hold (YouTube ids do)
_CONTAINER_SUFFIXES = {"hdf5": (".h5", ".hdf5", ".hdf"), "parquet": (".parquet",), "wds_audio": (".tar",)}


def _container_listing(opts: BuildOptions) -> Iterable[ContainerClip]:
    """The clips of the build's container files, file after file, each in its stable order."""
    kind, patterns = opts.containers
    files = expand_container_paths(patterns, _CONTAINER_SUFFIXES[kind], kind.replace("_", " "))
    for path in files:
        if kind == "hdf5":
            yield from iter_hdf5(path)
        elif kind == "parquet":
            yield from iter_parquet(path)
        else:
            yield from iter_wds_audio(path, opts.label_field)


def _name_index(labels: LabelSet) -> dict[str, int]:
    """mid or display name -> class index (mids win where a name equals some mid)."""
    index = {n: i for i, n in enumerate(labels.names)}
    index.update(labels.index)
    return index


def _container_labels(c: ContainerClip, labels: LabelSet, index: dict[str, int], unknown: str,
                      dropped: list[DroppedRow]) -> tuple[int, ...] | None:
    """Class indices of a container clip, or None (the clip is reported in ``dropped``)."""
    if c.meta.get("problem"):
        dropped.append(DroppedRow(c.meta["problem_kind"], c.id, 0.0, None, c.where, f"{c.where}: {c.meta['problem']}, clip skipped"))
        return None
    if not c.id:
        dropped.append(DroppedRow("missing", "", 0.0, None, c.where, f"{c.where}: empty clip name (no audio), skipped"))
        return None
    if not _SAFE_ID.fullmatch(c.id):
        dropped.append(DroppedRow("unreadable", c.id, 0.0, None, c.where, f"{c.where}: clip id {c.id!r} has "
                                  "characters other than letters, digits, '_' and '-' (not a sample key), skipped"))
        return None
    if c.ref.container == "hdf5":
        if c.meta["num_classes"] != len(labels):
            raise LabelError(f"{c.ref.path}: target has {c.meta['num_classes']} classes, the class list (--labels) "
                             f"{len(labels)}; give the class_labels_indices.csv these files were packed with")
        found = c.labels
    else:
        unknown_names = [n for n in c.labels if n not in index]
        if unknown_names and unknown == "error":
            raise LabelError(f"{c.where}: unknown label(s) {', '.join(map(repr, unknown_names))} (not in --labels); "
                             "use --unknown-mids drop to skip them")
        found = tuple(index[n] for n in c.labels if n in index)
        if unknown_names:
            what = "no known label left, clip skipped" if not found else "dropped"
            dropped.append(DroppedRow("label", c.id, 0.0, None, c.where,
                                      f"{c.where}: unknown label(s) {', '.join(unknown_names)}; {what}"))
            if not found:
                return None
    if not found:
        dropped.append(DroppedRow("no_labels", c.id, 0.0, None, c.where, f"{c.where}: no label (all-false "
                                  "target or empty label list), clip skipped"))
        return None
    return tuple(sorted(set(found)))


def container_clips(opts: BuildOptions, labels: LabelSet) -> ClipList:
    """The clips of ``--hdf5`` / ``--parquet`` / ``--wds-audio`` (with ``--segments``: the listed
    segments, found in the containers by YouTube id)."""
    index = _name_index(labels)
    dropped: list[DroppedRow] = []
    refs: dict[str, ClipRef] = {}
    clips: list[Segment] = []
    for c in _container_listing(opts):
        found = _container_labels(c, labels, index, opts.unknown_mids, dropped)
        if found is None:
            continue
        if c.id in refs:
            dropped.append(DroppedRow("duplicate", c.id, 0.0, None, c.where,
                                      f"{c.id}: duplicate of {refs[c.id].describe()}, skipped"))
            continue
        refs[c.id] = c.ref
        if not opts.segments:
            clips.append(Segment(c.id, 0.0, None, tuple(labels.mids[i] for i in found), found, c.where))
    if opts.segments:
        segs = read_segment_files(opts.segments, labels, unknown_mids=opts.unknown_mids)
        listed = {s.ytid for s in segs.segments}
        unlisted = sum(1 for ytid in refs if ytid not in listed)
        clips, dropped = segs.segments, dropped + segs.dropped
    else:
        unlisted = 0
    if not clips:
        raise BuildError(f"no usable clips in {opts.inputs}")
    return ClipList(labels, clips, dropped, refs, unlisted)
