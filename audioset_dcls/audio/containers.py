"""Where a clip's audio comes from: a file, a cut of a file, or a row of a container, and reading it.

AudioSet travels in containers more often than as loose files. One :class:`ClipRef` (small,
frozen, picklable) says where one clip's audio is:

- ``ClipRef.file(path, start=0.0, end=None)``: an audio file, or the ``[start, end)`` seconds of it;
- ``ClipRef.hdf5(path, row)``: row ``row`` of the ``waveform`` dataset of a PANNs / DCLS-Audio
  HDF5 file (int16 or float32, the file's ``sample_rate`` attribute, 32000 when absent);
- ``ClipRef.parquet(path, group, row)``: row ``row`` of row group ``group`` of a parquet file
  whose ``audio`` column is a struct with ``bytes`` (a whole audio file, e.g. FLAC), the
  Hugging Face ``agkphysics/AudioSet`` layout;
- ``ClipRef.tar(path, member, offset, size)``: an audio member of an uncompressed tar (audio
  WebDataset shards), read at its data offset.

:func:`read_clip` reads any of them: ``(samples (N,) or (N, C) float32, sample_rate)``, raising
:class:`~audioset_dcls.audio.decode.AudioDecodeError` with a ``kind``. :func:`read_clip_mono` is
the same downmixed to (N,) (bit for bit ``downmix(read_clip(ref)[0])``, faster for 16-bit audio).
Containers are opened lazily and kept open: at most one handle per container file per process
(handles are per process, not per thread: use processes, as the shard builder and DataLoader
workers do)
(the last :data:`MAX_OPEN` files used), reopened after a fork. A parquet read keeps the ``audio``
column of the last row group it read (one per process), so reading a group's rows one after
the other reads the group once; that column (``datasets`` writes audio row groups of at most 100
rows: ~100-200 MB of 48 kHz FLAC) is the memory bound of a parquet reader, one row (640 kB) that of an HDF5 reader, one member that of
a tar reader.

The ``iter_*`` functions list a container's clips in a stable order (file order), streaming
(HDF5 in blocks of rows, parquet row group by row group without the ``audio`` column, tar member
by member): each yields :class:`ContainerClip` (id, ref, labels, where, meta).
:func:`hdf5_clip_ids` lists the ids of HDF5 files in their ``audio_name`` order (the row order
that matrices aligned with these files, e.g. teacher predictions, follow).

Needs ``h5py`` (HDF5) and ``pyarrow`` (parquet): ``pip install "audioset-dcls[containers]"``;
without them, :class:`MissingExtra` says so in one line.
"""

from __future__ import annotations

import glob
import json
import os
import tarfile
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator, NamedTuple

import numpy as np

from .decode import AudioDecodeError, decode_bytes, decode_mono, decode_audio, decode_mono_bytes, downmix

__all__ = ["ClipRef", "ContainerClip", "MissingExtra", "read_clip", "read_clip_mono", "open_containers", "close_containers",
           "iter_hdf5", "iter_parquet", "iter_wds_audio", "hdf5_clip_ids", "expand_container_paths", "id_from_name",
           "MAX_OPEN", "HDF5_SAMPLE_RATE"]

MAX_OPEN = 64  # container files kept open per process
PARQUET_BUFFER = 1 << 20  # parquet column chunks are read through a buffer of this size, not whole
HDF5_SAMPLE_RATE = 32000  # PANNs' rate, for files without a sample_rate attribute
EXTRA = 'pip install "audioset-dcls[containers]"'
# Audio member suffixes of audio WebDataset tars (libsndfile formats + ffmpeg-only ones).
TAR_AUDIO_SUFFIXES = ("flac", "wav", "mp3", "ogg", "oga", "opus", "m4a", "mp4", "aac", "webm", "aiff", "aif", "au")


class MissingExtra(ImportError):
    """h5py or pyarrow is not installed. ``str(err)`` is one line naming the extra."""


def _h5py():
    try:  # imported here: only HDF5 inputs need it, and it is an optional extra
        import h5py
    except ImportError:
        raise MissingExtra(f"reading HDF5 files needs h5py: {EXTRA}") from None
    return h5py


def _pq():
    try:  # imported here: only parquet inputs need it, and it is an optional extra
        import pyarrow.parquet as pq
    except ImportError:
        raise MissingExtra(f"reading parquet files needs pyarrow: {EXTRA}") from None
    return pq


@dataclass(frozen=True, slots=True)
class ClipRef:
    """Where one clip's audio is. ``container``: ``"file"``, ``"hdf5"``, ``"parquet"`` or ``"tar"``.

    ``row``: the HDF5 row, or the row within parquet row group ``group``; ``member``, ``offset``,
    ``size``: the tar member's name, data offset and byte count; ``start`` / ``end``: seconds
    kept of a file (``end`` None: to its end).
    """

    container: str
    path: str
    row: int = -1
    group: int = -1
    member: str = ""
    offset: int = -1
    size: int = -1
    start: float = 0.0
    end: float | None = None

    @classmethod
    def file(cls, path: str | Path, start: float = 0.0, end: float | None = None) -> "ClipRef":
        return cls("file", str(path), start=float(start), end=end)

    @classmethod
    def hdf5(cls, path: str | Path, row: int) -> "ClipRef":
        return cls("hdf5", str(path), row=int(row))

    @classmethod
    def parquet(cls, path: str | Path, group: int, row: int) -> "ClipRef":
        return cls("parquet", str(path), row=int(row), group=int(group))

    @classmethod
    def tar(cls, path: str | Path, member: str, offset: int, size: int) -> "ClipRef":
        return cls("tar", str(path), member=member, offset=int(offset), size=int(size))

    @property
    def is_cut(self) -> bool:
        return self.container == "file" and (self.start > 0 or self.end is not None)

    @property
    def block(self) -> tuple[str, int] | None:
        """What is read at once to read this clip: a parquet row group (else None)."""
        return (self.path, self.group) if self.container == "parquet" else None

    def describe(self) -> str:
        """The clip for people: ``a.wav``, ``a.h5:row 17``, ``a.parquet:group 3 row 5``, ``a.tar:key.flac``."""
        if self.container == "hdf5":
            return f"{self.path}:row {self.row}"
        if self.container == "parquet":
            return f"{self.path}:group {self.group} row {self.row}"
        if self.container == "tar":
            return f"{self.path}:{self.member}"
        return self.path


class ContainerClip(NamedTuple):
    """One clip listed by an ``iter_*`` function.

    ``id``: the clip's id (AudioSet: the YouTube id; ``""`` when the container has none for it);
    ``labels``: HDF5: class indices (the ``True`` columns of ``target``); parquet and tar: label
    strings (mids or names) as stored; ``where``: ``file:row ...`` for messages; ``meta``: other
    fields (HDF5: ``num_classes``, the width of ``target``; parquet: ``human_labels``; tar: the
    sample's JSON); when the row cannot be used, ``meta["problem"]`` says why
    (one line) and ``meta["problem_kind"]`` is its kind (``missing``, ``no_labels``, ``unreadable``).
    """

    id: str
    ref: ClipRef
    labels: tuple
    where: str
    meta: dict[str, Any]


# ------------------------------------------------------------------------------ open handles

@dataclass
class _Handles:
    """This process's open containers (LRU) and the last parquet row group read."""

    pid: int = field(default_factory=os.getpid)
    open: "OrderedDict[tuple[str, str], Any]" = field(default_factory=OrderedDict)
    group_key: tuple[str, int] | None = None
    group_audio: Any = None  # pyarrow array of the audio column of that row group


_HANDLES = _Handles()


def _handles() -> _Handles:
    global _HANDLES
    if _HANDLES.pid != os.getpid():  # a forked child: the parent's handles are not ours to use
        _HANDLES = _Handles()
    return _HANDLES


def _open(container: str, path: str) -> Any:
    """The open handle of ``path`` (opened on first use; the least recently used one is closed
    beyond MAX_OPEN). Raises AudioDecodeError (missing / unreadable)."""
    h = _handles()
    key = (container, path)
    if key in h.open:
        h.open.move_to_end(key)
        return h.open[key]
    if not os.path.isfile(path):
        raise AudioDecodeError(path, "missing", "no such file")
    try:
        if container == "hdf5":
            handle = _h5py().File(path, "r")
        elif container == "parquet":
            handle = _pq().ParquetFile(path, buffer_size=PARQUET_BUFFER, pre_buffer=False)
        else:
            handle = open(path, "rb")
    except MissingExtra:
        raise
    except Exception as err:
        raise AudioDecodeError(path, "unreadable", f"cannot open {container} file ({_one_line(err)})") from None
    h.open[key] = handle
    while len(h.open) > MAX_OPEN:
        _, old = h.open.popitem(last=False)
        _close(old)
    return handle


def _close(handle: Any) -> None:
    close = getattr(handle, "close", None)
    if close is not None:
        close()


def open_containers() -> list[tuple[str, str]]:
    """``(container, path)`` of the files this process holds open, least recently used first."""
    return list(_handles().open)


def close_containers() -> None:
    """Close every container this process opened (they reopen on the next read)."""
    h = _handles()
    for handle in h.open.values():
        _close(handle)
    h.open.clear()
    h.group_key = h.group_audio = None


def _one_line(err: BaseException) -> str:
    text = " ".join(str(err).split())
    return text or type(err).__name__


# ------------------------------------------------------------------------------ reading clips

def read_clip(ref: ClipRef) -> tuple[np.ndarray, int]:
    """The audio of ``ref``: ``(samples (N,) or (N, C) float32, sample_rate)``.

    Raises AudioDecodeError(path, kind, reason) with kind ``missing`` / ``empty`` /
    ``unreadable``; ``path`` is ``ref.describe()``.
    """
    if ref.container == "file":
        samples, sr = decode_audio(ref.path)
        return _cut(ref, samples, sr), sr
    if ref.container == "hdf5":
        return _read_hdf5(ref)
    return decode_bytes(*_container_bytes(ref))


def read_clip_mono(ref: ClipRef) -> tuple[np.ndarray, int]:
    """``read_clip`` downmixed: ``(mono float32 (N,), sample_rate)``, bit for bit
    ``downmix(read_clip(ref)[0])`` (16-bit audio is summed as integers, see ``decode_mono``)."""
    if ref.container == "file":
        mono, sr = decode_mono(ref.path)
        return _cut(ref, mono, sr), sr
    if ref.container == "hdf5":
        samples, sr = _read_hdf5(ref)
        return downmix(samples), sr
    return decode_mono_bytes(*_container_bytes(ref))


def _cut(ref: ClipRef, samples: np.ndarray, sr: int) -> np.ndarray:
    """Keep ``[ref.start, ref.end)`` seconds of (N, ...) samples; AudioDecodeError("empty") if none."""
    if not ref.is_cut:
        return samples
    out = samples[int(round(ref.start * sr)): None if ref.end is None else int(round(ref.end * sr))]
    if out.shape[0] == 0:
        raise AudioDecodeError(ref.path, "empty", f"no audio from {ref.start:g} s on (the file is "
                                                  f"{samples.shape[0] / sr:.2f} s long)")
    return out


def _read_hdf5(ref: ClipRef) -> tuple[np.ndarray, int]:
    """Row ``ref.row`` of ``waveform``: int16 -> /32768, float32 as stored; (N,) float32."""
    f = _open("hdf5", ref.path)
    where = ref.describe()
    try:
        wave = f["waveform"]
        row = wave[ref.row]
        sr = int(f.attrs.get("sample_rate", HDF5_SAMPLE_RATE))
    except Exception as err:  # a truncated file, a missing dataset, a row out of range
        raise AudioDecodeError(where, "unreadable", f"cannot read the waveform ({_one_line(err)})") from None
    if row.size == 0:
        raise AudioDecodeError(where, "empty", "no audio samples")
    if row.dtype == np.int16:
        samples = row.astype(np.float32) * np.float32(1.0 / 32768.0)
    elif row.dtype.kind == "f":
        samples = row.astype(np.float32, copy=False)
        if not np.all(np.isfinite(samples)):
            raise AudioDecodeError(where, "unreadable", "audio contains NaN or infinite samples")
    else:
        raise AudioDecodeError(where, "unreadable", f"waveform dtype {row.dtype} (expected int16 or float32)")
    return samples, sr


def _parquet_audio(ref: ClipRef) -> tuple[bytes, str | None]:
    """(bytes, path) of the ``audio`` struct of a parquet row; reads (and keeps) its row group."""
    h = _handles()
    where = ref.describe()
    if h.group_key != (ref.path, ref.group):
        pf = _open("parquet", ref.path)
        h.group_key = h.group_audio = None  # free the old group before reading the new one
        try:
            h.group_audio = pf.read_row_group(ref.group, columns=["audio"], use_threads=False).column("audio")
        except Exception as err:
            raise AudioDecodeError(where, "unreadable", f"cannot read row group {ref.group} "
                                                        f"({_one_line(err)})") from None
        h.group_key = (ref.path, ref.group)
    try:
        value = h.group_audio[ref.row].as_py()
    except IndexError:
        raise AudioDecodeError(where, "missing", "no such row") from None
    if isinstance(value, bytes):  # an ``audio`` column of plain binary (the file's bytes)
        return value, None
    if not isinstance(value, dict):
        raise AudioDecodeError(where, "empty", "no audio (null audio struct)")
    return value.get("bytes") or b"", value.get("path")


def _container_bytes(ref: ClipRef) -> tuple[bytes, str]:
    """The whole audio file stored at ``ref`` (parquet bytes, or a tar member's data) and a name
    for it: the clip's place, ending in the audio's suffix (which picks ffmpeg where needed)."""
    if ref.container == "parquet":
        data, path = _parquet_audio(ref)
        if not data:
            raise AudioDecodeError(ref.describe(), "empty", "no audio bytes")
        return data, ref.describe() + os.path.splitext(path or "")[1].lower()
    if ref.container != "tar":
        raise ValueError(f"unknown container {ref.container!r}")
    f = _open("tar", ref.path)
    f.seek(ref.offset)
    data = f.read(ref.size)
    if len(data) != ref.size:
        raise AudioDecodeError(ref.describe(), "unreadable", f"truncated tar: {len(data)} of {ref.size} bytes")
    if not data:
        raise AudioDecodeError(ref.describe(), "empty", "empty member (0 bytes)")
    return data, ref.describe()


# ------------------------------------------------------------------------------ listing clips

def id_from_name(name: str | bytes) -> str:
    """A clip id from a PANNs ``audio_name`` or a sample key: bytes decoded, folders and the
    extension removed, and a leading ``Y`` removed from ``Y`` + 11-character YouTube ids
    (``b"Y--PJHxphWEs.wav"`` -> ``"--PJHxphWEs"``). ``""`` for an empty name."""
    if isinstance(name, bytes):
        name = name.decode("utf-8", errors="replace")
    name = name.strip().rsplit("/", 1)[-1]
    stem = name.split(".", 1)[0] if "." in name else name
    if len(stem) == 12 and stem.startswith("Y"):
        stem = stem[1:]
    return stem


def hdf5_clip_ids(paths: Iterable[str | Path], block: int = 65536) -> list[str]:
    """The clip ids of HDF5 files, file after file, each in its ``audio_name`` (row) order;
    ``""`` for an empty name. Row ``i`` of the concatenated files has id ``ids[i]``."""
    h5py = _h5py()
    ids: list[str] = []
    for path in paths:
        with h5py.File(path, "r") as f:
            names = _dataset(f, "audio_name", path)
            for lo in range(0, names.shape[0], block):
                ids.extend(id_from_name(n) for n in names[lo: lo + block])
    return ids


def _dataset(f: Any, name: str, path: str | Path) -> Any:
    if name not in f:
        raise ValueError(f"{path}: no '{name}' dataset (expected a PANNs-style file with audio_name, "
                         "waveform, target)")
    return f[name]


def iter_hdf5(path: str | Path, block: int = 4096) -> Iterator[ContainerClip]:
    """The clips of a PANNs / DCLS-Audio HDF5 file in row order, reading ``block`` rows of
    ``audio_name`` and ``target`` at a time (never the waveforms). ``labels``: the class indices
    of ``target`` (in the file's column order, AudioSet's ``class_labels_indices.csv``)."""
    h5py = _h5py()
    path = str(path)
    try:
        f = h5py.File(path, "r")
    except OSError as err:
        raise ValueError(f"{path}: not a readable HDF5 file ({_one_line(err)})") from None
    with f:
        names, target = _dataset(f, "audio_name", path), _dataset(f, "target", path)
        _dataset(f, "waveform", path)
        if target.shape[0] != names.shape[0]:
            raise ValueError(f"{path}: {names.shape[0]} audio_name rows but {target.shape[0]} target rows")
        meta = {"num_classes": int(target.shape[1]) if target.ndim == 2 else 0}  # shared by the file's clips
        for lo in range(0, names.shape[0], block):
            t = np.asarray(target[lo: lo + block]) != 0  # (rows, classes) bool
            for i, name in enumerate(names[lo: lo + block]):
                row = lo + i
                yield ContainerClip(id_from_name(name), ClipRef.hdf5(path, row),
                                    tuple(int(c) for c in np.flatnonzero(t[i])), f"{path}:row {row}", meta)


def iter_parquet(path: str | Path) -> Iterator[ContainerClip]:
    """The rows of a Hugging Face AudioSet parquet file, row group by row group, reading only
    ``video_id`` and ``labels`` (mids). ``meta``: ``human_labels`` when present."""
    pf = _pq().ParquetFile(str(path))
    columns = set(pf.schema_arrow.names)
    missing = {"video_id", "labels", "audio"} - columns
    if missing:
        raise ValueError(f"{path}: no column(s) {', '.join(sorted(missing))} (expected the Hugging Face "
                         "AudioSet layout: video_id, audio, labels)")
    wanted = ["video_id", "labels"] + (["human_labels"] if "human_labels" in columns else [])
    for g in range(pf.num_row_groups):
        table = pf.read_row_group(g, columns=wanted).to_pydict()
        for r, vid in enumerate(table["video_id"]):
            labels = table["labels"][r] or []
            meta = {"human_labels": table["human_labels"][r]} if "human_labels" in table else {}
            yield ContainerClip(str(vid or "").strip(), ClipRef.parquet(path, g, r), tuple(map(str, labels)),
                                f"{path}:group {g} row {r}", meta)


def iter_wds_audio(path: str | Path, label_field: str = "labels") -> Iterator[ContainerClip]:
    """The samples of an audio WebDataset tar, member by member: one audio member (``.flac``,
    ``.wav``, ``.mp3``, ...) and a ``.json`` per sample key. ``labels``: the json's
    ``label_field`` (a list, or a ``;``-separated string). A sample without exactly one audio
    member, or without the field, is yielded with ``meta["problem"]`` saying so."""
    path = str(path)
    try:
        tar = tarfile.open(path, "r:")  # uncompressed: members are read later at their offsets
    except tarfile.ReadError as err:
        raise ValueError(f"{path}: not an uncompressed tar ({_one_line(err)}); decompress .tar.gz first") from None
    with tar:
        key, members = None, []
        while (info := tar.next()) is not None:
            tar.members.clear()  # tarfile keeps every header it read: memory would grow with the tar
            if not info.isfile():
                continue
            k, _, ext = _split_member(info.name)
            if k != key and members:
                yield _wds_sample(path, tar, key, members, label_field)
                members = []
            key = k
            members.append((ext, info))
        if members:
            yield _wds_sample(path, tar, key, members, label_field)


def _split_member(name: str) -> tuple[str, str, str]:
    """WebDataset's split: key = folder + file name up to its first dot; ext = the rest."""
    folder, _, base = name.rpartition("/")
    stem, dot, ext = base.partition(".")
    return (f"{folder}/{stem}" if folder else stem), dot, ext.lower()


def _wds_sample(path: str, tar: tarfile.TarFile, key: str, members: list, label_field: str) -> ContainerClip:
    audio = [(ext, info) for ext, info in members if ext.rsplit(".", 1)[-1] in TAR_AUDIO_SUFFIXES]
    meta: dict[str, Any] = {}
    where = f"{path}:{key}"
    ref = ClipRef.tar(path, audio[0][1].name, audio[0][1].offset_data, audio[0][1].size) if audio else \
        ClipRef.tar(path, key, -1, -1)
    if len(audio) != 1:
        meta["problem"] = (f"{len(audio)} audio members" if audio else "no audio member") + \
            f" (expected one of .{', .'.join(TAR_AUDIO_SUFFIXES[:4])}, ...)"
        meta["problem_kind"] = "missing" if not audio else "unreadable"
        return ContainerClip(id_from_name(key), ref, (), where, meta)
    js = [info for ext, info in members if ext == "json"]
    if not js:
        meta["problem"], meta["problem_kind"] = "no .json member", "no_labels"
        return ContainerClip(id_from_name(key), ref, (), where, meta)
    try:
        doc = json.loads(tar.extractfile(js[0]).read())
    except ValueError as err:
        meta["problem"], meta["problem_kind"] = f"invalid json ({_one_line(err)})", "unreadable"
        return ContainerClip(id_from_name(key), ref, (), where, meta)
    meta.update(doc if isinstance(doc, dict) else {})
    value = doc.get(label_field) if isinstance(doc, dict) else None
    if isinstance(value, str):
        labels = tuple(v.strip() for v in value.split(";") if v.strip())
    elif isinstance(value, list):
        labels = tuple(str(v).strip() for v in value if str(v).strip())
    else:
        labels = ()
    if not labels:
        meta["problem"], meta["problem_kind"] = f"no labels in the json field {label_field!r}", "no_labels"
    return ContainerClip(id_from_name(key), ref, labels, where, meta)


def expand_container_paths(patterns: Iterable[str | Path], suffixes: tuple[str, ...], what: str) -> list[str]:
    """Files named by ``patterns``: files, folders (their ``*suffix`` files, recursively), globs
    (``**`` too) and brace patterns (``a-{000..009}.tar``, ``{a,b}.h5``); sorted within each
    pattern, in pattern order, duplicates removed. ValueError (one line) for a pattern that
    names nothing."""
    out: dict[str, None] = {}
    for pattern in map(str, patterns):
        found: list[str] = []
        for p in _braces(pattern):
            if os.path.isdir(p):
                found += [str(f) for f in sorted(Path(p).rglob("*")) if f.is_file() and f.name.endswith(suffixes)]
            elif os.path.isfile(p):
                found.append(p)
            else:
                found += sorted(f for f in glob.glob(p, recursive=True) if os.path.isfile(f))
        if not found:
            raise ValueError(f"{pattern}: no {what} file(s) found")
        out.update(dict.fromkeys(found))
    return list(out)


def _braces(pattern: str) -> list[str]:
    """Expand the first ``{a..b}`` / ``{x,y}`` of ``pattern``, recursively (like bash/webdataset)."""
    lo = pattern.find("{")
    hi = pattern.find("}", lo)
    if lo < 0 or hi < 0:
        return [pattern]
    body, head, tail = pattern[lo + 1: hi], pattern[:lo], pattern[hi + 1:]
    if ".." in body:
        a, b = body.split("..", 1)
        if a.isdigit() and b.isdigit():
            width = len(a) if a.startswith("0") else 0
            items = [str(i).zfill(width) for i in range(int(a), int(b) + 1)]
        else:
            return [pattern]
    elif "," in body:
        items = body.split(",")
    else:
        return [pattern]
    return [x for item in items for x in _braces(head + item + tail)]
