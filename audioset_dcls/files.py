"""Writing files so that a reader never sees half of one: temp name beside the target, then rename.

A process killed (or a disk that fills up) in the middle of a write leaves the previous file
intact and at most a ``*.tmp`` file, which is removed when the write fails with an exception.
The temp name carries the process id, so several processes may write the same target (the
last rename wins, and each rename installs a complete file).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from pathlib import Path
from typing import IO, Any, Iterator

__all__ = ["atomic_path", "atomic_open", "write_json", "write_text", "sha256_file"]


def _tmp_name(path: Path, hidden: bool = False) -> Path:
    return path.with_name(f"{'.' if hidden else ''}{path.name}.{os.getpid()}.tmp")


@contextlib.contextmanager
def atomic_path(path: str | Path, *, hidden: bool = False) -> Iterator[Path]:
    """Yield a temp path beside ``path`` for a writer that wants a file name (safetensors, torch);
    on success the temp file replaces ``path``, on an exception it is removed.

    ``hidden=True`` starts the temp name with a dot, so that readers of a whole folder (a
    pyarrow/pandas parquet dataset skips names starting with ``.`` or ``_``) never see the
    leftover of a killed writer."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _tmp_name(path, hidden)
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


@contextlib.contextmanager
def atomic_open(path: str | Path, mode: str = "w", **kwargs: Any) -> Iterator[IO]:
    """``open`` for writing whose result appears at ``path`` only once complete (flushed and
    fsynced, so a power cut after the rename cannot leave an empty file behind)."""
    with atomic_path(path) as tmp:
        with open(tmp, mode, **kwargs) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())


def write_json(path: str | Path, obj: Any, *, indent: int | None = 1) -> None:
    """Write ``obj`` as JSON (sorted keys, trailing newline) atomically."""
    with atomic_open(path) as f:
        json.dump(obj, f, indent=indent, sort_keys=True)
        f.write("\n")


def write_text(path: str | Path, text: str) -> None:
    """Write ``text`` atomically."""
    with atomic_open(path) as f:
        f.write(text)


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    """Hex sha256 of a file's bytes, read in ``chunk``-sized blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()
