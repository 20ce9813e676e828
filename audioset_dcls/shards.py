"""The sample schema inside a shard tar, and the manifest beside the shards.

One sample per AudioSet segment, three tar members sharing the key ``<ytid>_<start_ms>``:

- ``<key>.logmel.npy``  float16 log-mel in dB, shape (n_mels, num_frames), not normalised
- ``<key>.json``        {"ytid", "start", "end", "labels": [class indices], "source", "duration"}

Keys never contain dots (WebDataset splits the member name at the first dot); YouTube ids use
only ``[A-Za-z0-9_-]``. Beside the tars: ``sizes.json`` ({shard file name: sample count}, the
WebDataset/open_clip convention) and ``manifest.json`` (feature config, label list, per-shard
count and sha256, feature mean/std, hash of the clip-id list, and every skipped clip with its
reason).
"""

from __future__ import annotations

import hashlib
import io
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

import numpy as np

LOGMEL_EXT = "logmel.npy"
META_EXT = "json"
MANIFEST_NAME = "manifest.json"
SIZES_NAME = "sizes.json"
MANIFEST_FORMAT = "audioset_dcls.shards/1"


def clip_key(ytid: str, start: float) -> str:
    """Sample key of one segment: ``<ytid>_<start in integer milliseconds>``."""
    return f"{ytid}_{int(round(float(start) * 1000))}"


@dataclass
class ShardSample:
    """One decoded sample. ``logmel``: (n_mels, T) float16; ``labels``: class indices."""

    key: str
    logmel: np.ndarray
    labels: list[int]
    meta: dict[str, Any]


def encode_sample(
    key: str, logmel: np.ndarray, labels: Iterable[int], meta: dict[str, Any]
) -> dict[str, Any]:
    """Build the dict that ``webdataset.TarWriter.write`` takes. ``logmel``: (n_mels, T)."""
    if "." in key:
        raise ValueError(f"sample key {key!r} contains a dot")
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(logmel, dtype=np.float16), allow_pickle=False)
    record = dict(meta)
    record["labels"] = sorted(int(i) for i in labels)
    return {
        "__key__": key,
        LOGMEL_EXT: buf.getvalue(),
        META_EXT: json.dumps(record, sort_keys=True).encode("utf-8"),
    }


def decode_sample(sample: dict[str, Any]) -> ShardSample:
    """Inverse of encode_sample for a raw WebDataset sample (bytes values).

    Raises ValueError naming the key when a member is missing or malformed.
    """
    key = sample.get("__key__", "?")
    try:
        logmel = np.load(io.BytesIO(sample[LOGMEL_EXT]), allow_pickle=False)
        meta = json.loads(sample[META_EXT])
        labels = [int(i) for i in meta.pop("labels")]
    except KeyError as err:
        raise ValueError(f"sample {key} in {sample.get('__url__', '?')}: missing member {err}") from None
    except Exception as err:
        raise ValueError(f"sample {key} in {sample.get('__url__', '?')}: malformed ({err})") from None
    if logmel.ndim != 2:
        raise ValueError(f"sample {key}: log-mel has shape {logmel.shape}, expected (n_mels, T)")
    return ShardSample(key=key, logmel=logmel, labels=labels, meta=meta)


def hash_ids(ids: Iterable[str]) -> str:
    """Order-independent sha256 of a set of clip ids (sorted, newline-joined): names an eval set."""
    h = hashlib.sha256()
    for i in sorted(ids):
        h.update(i.encode("utf-8"))
        h.update(b"\n")
    return h.hexdigest()


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def read_manifest(shard_dir: str | Path) -> dict[str, Any]:
    """Read ``manifest.json`` of a shard directory; clear error if absent."""
    path = Path(shard_dir) / MANIFEST_NAME
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no shard manifest (build shards with preprocessing.build_shards)")
    with open(path) as f:
        manifest = json.load(f)
    if manifest.get("format") != MANIFEST_FORMAT:
        raise ValueError(f"{path}: unknown manifest format {manifest.get('format')!r}")
    return manifest


def list_shards(shard_dir: str | Path) -> list[Path]:
    """Complete shards named in the manifest, in order. Raises if one is missing."""
    shard_dir = Path(shard_dir)
    manifest = read_manifest(shard_dir)
    paths = [shard_dir / s["name"] for s in manifest["shards"]]
    missing = [str(p) for p in paths if not p.is_file()]
    if missing:
        raise FileNotFoundError(f"{shard_dir}: shards listed in the manifest are missing: {missing[:3]}")
    return paths
