"""The output folder of an archive job (:mod:`.archive`): parquet parts, failures, settings, summary.

Layout of ``--out DIR``::

    settings.json             the model (name, file SHA-256, labels) and every option that changes
                              the results; a rerun with other settings is refused
    tags/part-000007.parquet  the tagged inputs of chunk 7 (one row per input)
    failures/part-000007.parquet  the inputs of chunk 7 that could not be tagged: id, path, kind, reason
    ranks/part0-rank0.json    what one process did in its last run (wall time, files/s, ...)
    summary.json              the whole job (totals over every chunk, and per rank)

``pyarrow.dataset.dataset(DIR / "tags")``, ``pandas.read_parquet(DIR / "tags")`` or
``polars.read_parquet(DIR / "tags/*.parquet")`` read the parts as one table. Parts are written to a
hidden temp name (``.part-....tmp``, skipped by those readers) and renamed; the failures part of a
chunk first, then its tags part, whose metadata (``audioset_dcls.chunk``) records the chunk's
ids, so a chunk counts as done only when both read back and hold exactly its inputs.

Tags columns (see :func:`tags_schema`): ``id``, ``path``, ``chunk``, ``duration`` (s),
``sample_rate`` (native; null when unknown), ``num_windows``, ``sha256`` (null unless asked),
``warning``, the top-k as ``top_index``/``top_mid``/``top_name``/``top_score`` lists; with options
``scores`` (list<float16>, the model's probabilities in the checkpoint's class order),
``window_start``/``window_end``/``window_scores`` (list<list<float16>>), ``events`` (list of
structs: onset, offset, index, mid, name, peak, mean), ``embedding`` (list<float32>) and
``window_embeddings``. The schema metadata holds the settings (labels, model, options).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from ..files import atomic_path, write_json

__all__ = ["require_pyarrow", "tags_schema", "failures_schema", "write_chunk", "chunk_done", "part_name",
           "ids_digest", "read_chunk_meta", "SettingsMismatch", "check_settings"]

META_KEY = b"audioset_dcls.chunk"
SETTINGS_KEY = b"audioset_dcls.settings"


def require_pyarrow() -> Any:
    """The pyarrow module, or RuntimeError with one line naming the extra that installs it."""
    try:  # optional dependency (the archive extra): imported where it is needed
        import pyarrow
        import pyarrow.parquet  # noqa: F401
    except ImportError:
        raise RuntimeError("the archive job writes parquet and needs pyarrow: pip install 'audioset-dcls[archive]' "
                           "(or pip install pyarrow)") from None
    return pyarrow


def part_name(chunk: int) -> str:
    return f"part-{chunk:06d}.parquet"


def ids_digest(ids: Sequence[str]) -> str:
    """SHA-256 of ids in order (one per line): names a chunk's or a job's inputs."""
    h = hashlib.sha256()
    for i in ids:
        h.update(i.encode("utf-8", "surrogateescape") + b"\n")
    return h.hexdigest()


# ---- schemas ------------------------------------------------------------------------------


def tags_schema(options: dict[str, Any]) -> Any:
    """The tags table's schema for these options (``archive.ArchiveOptions.results_key()``)."""
    pa = require_pyarrow()
    f16, f32 = pa.float16(), pa.float32()
    fields = [("id", pa.string()), ("path", pa.string()), ("chunk", pa.int32()), ("duration", pa.float64()),
              ("sample_rate", pa.int32()), ("num_windows", pa.int32()), ("sha256", pa.string()),
              ("warning", pa.string()), ("top_index", pa.list_(pa.int32())), ("top_mid", pa.list_(pa.string())),
              ("top_name", pa.list_(pa.string())), ("top_score", pa.list_(f32))]
    if options["all_scores"]:
        fields.append(("scores", pa.list_(f16)))
    if options["per_window"]:
        fields += [("window_start", pa.list_(f32)), ("window_end", pa.list_(f32)),
                   ("window_scores", pa.list_(pa.list_(f16)))]
    if options["events"]:
        event = pa.struct([("onset", f32), ("offset", f32), ("index", pa.int32()), ("mid", pa.string()),
                           ("name", pa.string()), ("peak", f32), ("mean", f32)])
        fields.append(("events", pa.list_(event)))
    if options["embeddings"]:
        fields.append(("embedding", pa.list_(f32)))
    if options["embeddings"] == "window":
        fields.append(("window_embeddings", pa.list_(pa.list_(f32))))
    return pa.schema(fields)


def failures_schema() -> Any:
    pa = require_pyarrow()
    return pa.schema([("id", pa.string()), ("path", pa.string()), ("chunk", pa.int32()), ("kind", pa.string()),
                      ("reason", pa.string())])


def _columns(rows: list[dict[str, Any]], schema: Any) -> dict[str, Any]:
    """Rows -> pyarrow arrays in the schema's types; float16 lists go through numpy (pyarrow
    does not convert Python floats to half floats)."""
    pa = require_pyarrow()
    cols = {}
    for field in schema:
        values = [r.get(field.name) for r in rows]
        t = field.type
        if pa.types.is_list(t) and pa.types.is_float16(t.value_type):
            cols[field.name] = _half_list(values)
        elif (pa.types.is_list(t) and pa.types.is_list(t.value_type)
              and pa.types.is_float16(t.value_type.value_type)):
            offsets = np.cumsum([0] + [len(v) for v in values]).astype(np.int32)
            inner = _half_list([row for v in values for row in v])
            cols[field.name] = pa.ListArray.from_arrays(pa.array(offsets), inner)
        else:
            cols[field.name] = pa.array(values, type=t)
    return cols


def _half_list(values: list[np.ndarray]) -> Any:
    pa = require_pyarrow()
    offsets = np.cumsum([0] + [len(v) for v in values]).astype(np.int32)
    flat = np.concatenate([np.asarray(v, np.float16) for v in values]) if values else np.zeros(0, np.float16)
    return pa.ListArray.from_arrays(pa.array(offsets), pa.array(flat, type=pa.float16()))


# ---- writing and checking chunks ----------------------------------------------------------


def _write(rows: list[dict[str, Any]], schema: Any, path: Path, meta: dict[bytes, bytes]) -> None:
    pa = require_pyarrow()
    import pyarrow.parquet as pq  # optional dependency (the archive extra): imported where it is needed

    table = pa.Table.from_pydict(_columns(rows, schema), schema=schema.with_metadata(meta))
    with atomic_path(path, hidden=True) as tmp:
        pq.write_table(table, tmp, compression="zstd")


def write_chunk(out: Path, chunk: int, ids: Sequence[str], results: list[dict[str, Any]],
                failures: list[dict[str, Any]], options: dict[str, Any], settings: dict[str, Any],
                stats: dict[str, Any]) -> None:
    """Write chunk ``chunk`` (inputs ``ids``): failures part first, then the tags part that marks
    the chunk done; both carry the chunk's metadata (ids digest, counts, ``stats``)."""
    meta = {"chunk": chunk, "ids_sha256": ids_digest(ids), "inputs": len(ids), "tagged": len(results),
            "failed": len(failures), **stats}
    blob = {META_KEY: json.dumps(meta).encode(), SETTINGS_KEY: json.dumps(settings).encode()}
    _write(failures, failures_schema(), out / "failures" / part_name(chunk), blob)
    _write(results, tags_schema(options), out / "tags" / part_name(chunk), blob)


def read_chunk_meta(path: Path) -> dict[str, Any] | None:
    """The chunk metadata of a part that reads back whole (every column), else None."""
    import pyarrow.parquet as pq  # optional dependency (the archive extra): imported where it is needed

    if not path.is_file():
        return None
    try:  # ParquetFile, not read_table: that one imports pyarrow.dataset (seconds of start-up)
        table = pq.ParquetFile(path).read()
        meta = json.loads((table.schema.metadata or {})[META_KEY])
    except Exception:  # truncated, corrupt or foreign: the chunk is redone
        return None
    meta["_rows"] = table.num_rows
    meta["_ids"] = table.column("id").to_pylist()
    return meta


def chunk_done(out: Path, chunk: int, ids: Sequence[str]) -> dict[str, Any] | None:
    """The chunk's metadata when both of its parts read back and hold exactly ``ids``, else None."""
    tags = read_chunk_meta(out / "tags" / part_name(chunk))
    fails = read_chunk_meta(out / "failures" / part_name(chunk))
    if tags is None or fails is None or tags["ids_sha256"] != ids_digest(ids) or fails["ids_sha256"] != tags["ids_sha256"]:
        return None
    if tags["_rows"] != tags["tagged"] or fails["_rows"] != tags["failed"] or sorted(tags["_ids"] + fails["_ids"]) != sorted(ids):
        return None
    return {k: v for k, v in tags.items() if not k.startswith("_")}


# ---- settings -----------------------------------------------------------------------------


class SettingsMismatch(ValueError):
    """An output folder made with another model, other options or other inputs (one line)."""


def _differences(old: dict[str, Any], new: dict[str, Any], prefix: str = "") -> list[str]:
    out = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            out += _differences(a, b, f"{prefix}{key}.")
        elif a != b:
            show = (lambda v: repr(v) if len(repr(v)) <= 40 else repr(v)[:37] + "...")
            out.append(f"{prefix}{key} {show(a)} -> {show(b)}")
    return out


def check_settings(out: Path, settings: dict[str, Any]) -> None:
    """Write ``settings.json`` into a new output folder, or check it against the one there:
    SettingsMismatch naming what changed (the first four differences, values shortened)."""
    path = out / "settings.json"
    if not path.is_file():
        write_json(path, settings)
        return
    old = json.loads(path.read_text())
    changed = _differences(old, settings)
    if changed:
        raise SettingsMismatch(f"{out} holds results made with other settings ({'; '.join(changed[:4])}"
                               f"{'; ...' if len(changed) > 4 else ''}): use another --out, or rerun with the same "
                               "model, options and inputs to resume")
