"""A teacher's scores per clip id, as a memory-mapped table (knowledge distillation).

Sources (``distill.teacher``):

- a parquet file, or a folder of parquet part files (read as is: the archive tagging job's
  all-scores output folder, whose ``tags/`` parts are read and whose class list is checked),
  with a string clip-id column (``id``) and a list-of-float scores column (``scores``; list,
  large list or fixed-size list of float16/32/64; names configurable);
- a ``.npy`` or ``.pt`` matrix (N x C) whose rows follow the concatenated ``audio_name`` order
  of one or more PANNs-style HDF5 files (``distill.hdf5``): ``b"Y--PJHxphWEs.wav"`` is clip
  ``--PJHxphWEs`` (leading ``Y`` and extension dropped); an empty name is a row with no clip.
  This is how the published ensemble predictions come (EfficientAT's PaSST ensemble logits).

Whatever the source, :func:`build_table` writes one folder once (the main process; every rank
and loader worker then maps it read-only):

- ``scores.npy``  (M, C) float16, the source's rows in the source's order (~1 kB per clip at 527
  classes: 2.1 GB for two million clips, on disk, paged in on demand and shared by every process
  through the page cache);
- ``ids.npy``     (N,) fixed-width bytes, the clip ids sorted (binary search);
- ``rows.npy``    (N,) int64, the ``scores.npy`` row of each sorted id;
- ``table.json``  classes, score kind, label list if the source has one, and the sources'
  fingerprint (paths, sizes, mtimes, column names): a table whose fingerprint matches is reused.

A lookup is a binary search over ``ids.npy`` (21 probes for two million ids) and one row read:
no dict of two million Python strings per loader worker, and the memory a worker adds is the
pages it touched, which the kernel shares (benchmarks/RESULTS.md, "Distillation").

pyarrow (parquet) and h5py (HDF5 id order) are the ``containers`` extra, imported when needed.
"""

from __future__ import annotations

import importlib
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import torch

from .labels import LabelError, read_label_set

__all__ = ["TeacherError", "TeacherSource", "TeacherTable", "build_table", "clip_id_from_audio_name",
           "hdf5_clip_ids"]

TABLE_FORMAT = "audioset_dcls.teacher/1"
SCORE_KINDS = ("logits", "probabilities")
_CHUNK = 65536  # rows per read/write when copying a matrix or a parquet file


class TeacherError(ValueError):
    """A teacher source is missing or malformed; the message names the file and the problem."""


@dataclass(frozen=True)
class TeacherSource:
    """Where a teacher's scores come from (the ``distill`` section's keys)."""

    path: str  # parquet file or folder, or a .npy / .pt matrix
    hdf5: tuple[str, ...] = ()  # HDF5 files whose audio_name order the matrix rows follow
    kind: str = "probabilities"  # "logits" or "probabilities"
    id_column: str = "id"
    scores_column: str = "scores"
    labels: str = ""  # class_labels_indices.csv of the teacher's class order, if known

    @property
    def is_matrix(self) -> bool:
        return Path(self.path).suffix.lower() in (".npy", ".pt", ".pth")


def _need(module: str):
    """An optional module of the ``containers`` extra, imported when a teacher needs it."""
    try:
        return importlib.import_module(module)
    except ImportError:
        raise TeacherError(f"reading this teacher needs {module}: pip install 'audioset-dcls[containers]'") from None


# ----------------------------------------------------------------------------------- ids


def clip_id_from_audio_name(name: bytes | str) -> str | None:
    """PANNs ``audio_name`` -> clip id: ``b"Y--PJHxphWEs.wav"`` -> ``"--PJHxphWEs"``; empty -> None."""
    text = name.decode("utf-8") if isinstance(name, (bytes, np.bytes_)) else str(name)
    text = text.strip().rstrip("\x00")
    if not text:
        return None
    stem = os.path.splitext(os.path.basename(text))[0]
    return stem[1:] if stem.startswith("Y") and len(stem) > 1 else stem


def hdf5_clip_ids(paths: Sequence[str | Path]) -> list[str | None]:
    """Clip ids in the concatenated ``audio_name`` order of ``paths`` (None: a row with no clip)."""
    h5py = _need("h5py")
    ids: list[str | None] = []
    for p in paths:
        if not Path(p).is_file():
            raise TeacherError(f"distill.hdf5: {p}: no such file")
        try:
            with h5py.File(p, "r") as f:
                if "audio_name" not in f:
                    raise TeacherError(f"distill.hdf5: {p}: no audio_name dataset (a PANNs-style HDF5 file has one)")
                ids += [clip_id_from_audio_name(n) for n in f["audio_name"][:]]
        except OSError as err:
            raise TeacherError(f"distill.hdf5: {p}: not a readable HDF5 file ({err})") from None
    return ids


# ------------------------------------------------------------------------------- sources


def _parquet_files(path: Path) -> list[Path]:
    """The parquet parts of a file or folder. An archive job's output folder (``tags/`` and
    ``failures/`` beside ``settings.json``) is read through its ``tags/`` parts; hidden names
    (parts still being written) and ``failures/`` parts are skipped."""
    if not path.is_dir():
        return [path]
    root = path / "tags" if (path / "tags").is_dir() else path
    files = sorted(f for f in root.rglob("*.parquet") if not f.name.startswith(".")
                   and "failures" not in f.relative_to(root).parts[:-1])
    if not files:
        raise TeacherError(f"distill.teacher={path}: a folder with no .parquet files")
    return files


def _parquet_labels(files: list[Path]) -> list[str] | None:
    """The class mids a parquet file declares in its key-value metadata, or None: ``labels`` (a
    JSON list of mids, or ``{"mids": [...]}``), or the archive job's ``audioset_dcls.settings``
    (``model.labels``: ``{index, mid, name}`` per class; the name where a class has no mid)."""
    pq = _need("pyarrow.parquet")
    meta = pq.ParquetFile(files[0]).schema_arrow.metadata or {}
    if b"labels" in meta:
        d = json.loads(meta[b"labels"])
        return [str(m) for m in (d.get("mids") if isinstance(d, dict) else d)]
    if b"audioset_dcls.settings" in meta:
        labels = (json.loads(meta[b"audioset_dcls.settings"]).get("model") or {}).get("labels")
        if labels:
            return [str(lab.get("mid") or lab.get("name")) if isinstance(lab, dict) else str(lab) for lab in labels]
    return None


def _scores_array(column: Any, num_classes: int, where: str) -> np.ndarray:
    """A pyarrow list column -> (rows, C) float array; TeacherError when a row is null or not C long."""
    pa, pc = _need("pyarrow"), _need("pyarrow.compute")
    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks()
    if not (pa.types.is_list(column.type) or pa.types.is_large_list(column.type)
            or pa.types.is_fixed_size_list(column.type)):
        raise TeacherError(f"{where}: scores column is {column.type}, expected a list of floats")
    if column.null_count:
        raise TeacherError(f"{where}: {column.null_count} rows have no scores (null)")
    lengths = pc.list_value_length(column).to_numpy(zero_copy_only=False)
    if len(lengths) and (lengths.min() != num_classes or lengths.max() != num_classes):
        bad = int(np.flatnonzero(lengths != num_classes)[0])
        raise TeacherError(f"{where}: row {bad} has {lengths[bad]} scores; the training shards have {num_classes} "
                           "classes (a teacher must score every class of the shards, in their order)")
    flat = pc.list_flatten(column).to_numpy(zero_copy_only=False)
    return flat.reshape(len(lengths), num_classes)


def _read_parquet(src: TeacherSource, num_classes: int) -> Iterator[tuple[list[str], np.ndarray, str]]:
    """(ids, scores (rows, C), file) chunks of every parquet file, in file order."""
    pq = _need("pyarrow.parquet")
    for f in _parquet_files(Path(src.path)):
        try:
            pf = pq.ParquetFile(f)
        except Exception as err:  # noqa: BLE001: pyarrow raises several kinds for a bad file
            raise TeacherError(f"distill.teacher: {f}: not a readable parquet file ({err})") from None
        names = pf.schema_arrow.names
        for col in (src.id_column, src.scores_column):
            if col not in names:
                raise TeacherError(f"distill.teacher: {f}: no column {col!r} (columns: {', '.join(names)}; set "
                                   "distill.id_column / distill.scores_column)")
        for batch in pf.iter_batches(batch_size=_CHUNK, columns=[src.id_column, src.scores_column]):
            ids = batch.column(0).to_pylist()
            if any(i is None for i in ids):
                raise TeacherError(f"distill.teacher: {f}: a row has no clip id (null {src.id_column!r})")
            yield [str(i) for i in ids], _scores_array(batch.column(1), num_classes, f"distill.teacher: {f}"), str(f)


def _load_matrix(path: Path) -> np.ndarray:
    """A (N, C) matrix from .npy (memory-mapped) or .pt (a tensor; memory-mapped where torch can)."""
    if path.suffix.lower() == ".npy":
        try:
            m = np.load(path, mmap_mode="r", allow_pickle=False)
        except (OSError, ValueError) as err:
            raise TeacherError(f"distill.teacher: {path}: not a readable .npy matrix ({err})") from None
    else:
        try:
            try:
                m = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            except RuntimeError:  # old (non-zip) format: no mmap
                m = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as err:  # noqa: BLE001
            raise TeacherError(f"distill.teacher: {path}: not a readable .pt tensor ({err})") from None
        if not isinstance(m, torch.Tensor):
            raise TeacherError(f"distill.teacher: {path}: holds a {type(m).__name__}, expected one (N, C) tensor")
        m = m.float().numpy() if m.dtype == torch.bfloat16 else m.numpy()
    if m.ndim != 2 or not np.issubdtype(m.dtype, np.floating):
        raise TeacherError(f"distill.teacher: {path}: a {m.dtype} array of shape {m.shape}, expected (N, C) floats")
    return m


def _read_matrix(src: TeacherSource, num_classes: int) -> Iterator[tuple[list[str | None], np.ndarray, str]]:
    """(ids, scores, file) chunks of a matrix in HDF5 order; None ids are rows with no clip."""
    path = Path(src.path)
    if not path.is_file():
        raise TeacherError(f"distill.teacher={path}: no such file")
    if not src.hdf5:
        raise TeacherError(f"distill.teacher={path}: a score matrix needs distill.hdf5 (the HDF5 files whose "
                           "audio_name order its rows follow)")
    m = _load_matrix(path)
    ids = hdf5_clip_ids(src.hdf5)
    if m.shape[0] != len(ids):
        raise TeacherError(f"distill.teacher: {path} has {m.shape[0]} rows but distill.hdf5 ({', '.join(src.hdf5)}) "
                           f"names {len(ids)} clips: the rows must follow their audio_name order")
    if m.shape[1] != num_classes:
        raise TeacherError(f"distill.teacher: {path} scores {m.shape[1]} classes; the training shards have "
                           f"{num_classes} (a teacher must score every class of the shards, in their order)")
    for start in range(0, m.shape[0], _CHUNK):
        yield ids[start:start + _CHUNK], np.asarray(m[start:start + _CHUNK]), str(path)


# --------------------------------------------------------------------------------- table


def _fingerprint(src: TeacherSource, num_classes: int) -> dict[str, Any]:
    path = Path(src.path)
    if not path.exists():
        raise TeacherError(f"distill.teacher={path}: no such file or folder")
    files = [path] if src.is_matrix else _parquet_files(path)
    files += [Path(h) for h in src.hdf5]
    stat = [[str(f.resolve()), f.stat().st_size, f.stat().st_mtime_ns] for f in files if f.is_file()]
    return {"format": TABLE_FORMAT, "files": stat, "kind": src.kind, "id_column": src.id_column,
            "scores_column": src.scores_column, "num_classes": num_classes, "labels_file": src.labels}


def _check_values(block: np.ndarray, kind: str, where: str) -> None:
    if not np.isfinite(block).all():
        raise TeacherError(f"{where}: scores that are NaN or infinite")
    if kind == "probabilities" and len(block) and (block.min() < 0 or block.max() > 1):
        raise TeacherError(f"{where}: scores outside [0, 1] ({block.min():.3g} .. {block.max():.3g}) but "
                           "distill.scores=probabilities: are they logits? (distill.scores=logits)")


def _teacher_labels(src: TeacherSource) -> list[str] | None:
    if src.labels:
        try:
            return list(read_label_set(src.labels).mids)
        except LabelError as err:
            raise TeacherError(f"distill.labels: {err}") from None
    return None if src.is_matrix else _parquet_labels(_parquet_files(Path(src.path)))


def _write_rows(src: TeacherSource, num_classes: int, tmp: Path) -> tuple[list[str], list[int]]:
    """Copy every scored row into ``tmp/scores.npy``; returns (ids, their rows)."""
    reader = _read_matrix if src.is_matrix else _read_parquet
    total = _count_rows(src)
    scores = np.lib.format.open_memmap(tmp / "scores.npy", mode="w+", dtype=np.float16, shape=(total, num_classes))
    ids: list[str] = []
    rows: list[int] = []
    at = 0
    for chunk_ids, block, where in reader(src, num_classes):
        block = np.asarray(block, dtype=np.float32)
        _check_values(block, src.kind, f"distill.teacher: {where}")
        scores[at:at + len(block)] = block
        for j, cid in enumerate(chunk_ids):
            if cid is not None:
                ids.append(cid)
                rows.append(at + j)
        at += len(block)
    scores.flush()
    del scores
    return ids, rows


def _count_rows(src: TeacherSource) -> int:
    if src.is_matrix:
        return int(_load_matrix(Path(src.path)).shape[0])
    pq = _need("pyarrow.parquet")
    total = 0
    for f in _parquet_files(Path(src.path)):
        try:
            total += pq.ParquetFile(f).metadata.num_rows
        except Exception as err:  # noqa: BLE001
            raise TeacherError(f"distill.teacher: {f}: not a readable parquet file ({err})") from None
    return total


def build_table(src: TeacherSource, out_dir: str | Path, num_classes: int) -> Path:
    """Build (or reuse, when its fingerprint matches) the memory-mapped table of ``src`` in
    ``out_dir``; returns ``out_dir``. Written to a temporary folder renamed into place, so a
    killed build leaves nothing half-made. TeacherError names the file and the problem."""
    if src.kind not in SCORE_KINDS:
        raise TeacherError(f"distill.scores={src.kind}: must be logits or probabilities")
    out = Path(out_dir)
    fp = _fingerprint(src, num_classes)
    meta_path = out / "table.json"
    if meta_path.is_file():
        try:
            if json.loads(meta_path.read_text()).get("fingerprint") == fp:
                return out
        except ValueError:
            pass
    tmp = out.with_name(f".tmp-{out.name}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    ids, rows = _write_rows(src, num_classes, tmp)
    if not ids:
        raise TeacherError(f"distill.teacher={src.path}: no clip ids in it")
    enc = np.array([i.encode("utf-8") for i in ids])  # fixed-width bytes, as wide as the longest id
    order = np.argsort(enc, kind="stable")
    enc, rows_arr = enc[order], np.asarray(rows, dtype=np.int64)[order]
    dup = np.flatnonzero(enc[1:] == enc[:-1])
    if len(dup):
        raise TeacherError(f"distill.teacher={src.path}: clip id {enc[dup[0]].decode()!r} has two rows "
                           f"({len(dup)} duplicated ids): which one to distil from is ambiguous")
    np.save(tmp / "ids.npy", enc)
    np.save(tmp / "rows.npy", rows_arr)
    meta = {"format": TABLE_FORMAT, "fingerprint": fp, "num_classes": num_classes, "kind": src.kind,
            "clips": len(ids), "rows": len(rows) and int(rows_arr.max()) + 1, "labels": _teacher_labels(src),
            "source": str(src.path), "hdf5": list(src.hdf5)}
    (tmp / "table.json").write_text(json.dumps(meta, indent=1) + "\n")
    if out.exists():
        shutil.rmtree(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    os.replace(tmp, out)
    return out


class TeacherTable:
    """A built table, opened read-only. The arrays are memory-mapped on first use in each process
    (and dropped when pickled), so loader workers share the file's pages instead of copies."""

    def __init__(self, root: str | Path):
        self.root = Path(root)
        try:
            self.meta = json.loads((self.root / "table.json").read_text())
        except (OSError, ValueError) as err:
            raise TeacherError(f"{self.root}: not a teacher table ({err})") from None
        self.num_classes = int(self.meta["num_classes"])
        self.kind = str(self.meta["kind"])
        self.labels: list[str] | None = self.meta.get("labels")
        self._arrays: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None

    def __len__(self) -> int:
        return int(self.meta["clips"])

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_arrays": None}

    def _open(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        if self._arrays is None:
            self._arrays = tuple(np.load(self.root / f"{n}.npy", mmap_mode="r") for n in ("ids", "rows", "scores"))
        return self._arrays

    def row(self, clip_id: str) -> np.ndarray | None:
        """The teacher's (C,) float16 scores of ``clip_id`` (as stored: logits or probabilities), or None."""
        ids, rows, scores = self._open()
        key = clip_id.encode("utf-8")
        if len(key) > ids.dtype.itemsize:
            return None  # longer than every id in the table (and a fixed-width compare would truncate it)
        i = int(np.searchsorted(ids, np.array(key, dtype=ids.dtype)))
        if i < len(ids) and ids[i] == key:
            return np.asarray(scores[rows[i]])
        return None

    def lookup(self, clip_ids: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """(scores (B, C) float32, zero where missing; found (B,) bool) for ``clip_ids``."""
        out = np.zeros((len(clip_ids), self.num_classes), dtype=np.float32)
        found = np.zeros(len(clip_ids), dtype=bool)
        for j, cid in enumerate(clip_ids):
            r = self.row(cid)
            if r is not None:
                out[j], found[j] = r, True
        return out, found
