"""The sample schema inside a shard tar, and the manifest beside the shards.

One sample per AudioSet segment, two tar members sharing the key ``<ytid>_<start_ms>``:

- the log-mel in dB, shape (n_mels, num_frames), not normalised, in one of two encodings (chosen
  per shard set, recorded in its manifest as ``encoding``; see :class:`LogmelEncoding`):

  - ``<key>.logmel.u8.zst`` (``uint8``, the default): a zstd frame holding a 17-byte header
    (``b"LMU8"``, version 1, n_mels and frames as uint16, min_db and step_db as float32, little
    endian) and then the (n_mels, T) levels ``round((x - min_db) / step_db)`` in 0..255, stored
    as their time-frequency second difference mod 256, row-major. 0.625 dB steps from -100 dB
    (the log floor) to 59.375 dB: at most 0.3125 dB from the float log-mel; ~75 kB per 10 s clip;
  - ``<key>.logmel.npy`` (``float16``): the float16 array as ``numpy.save`` writes it (~256 kB).
    Shard sets built before encodings existed are of this kind (their manifest has no
    ``encoding``) and read unchanged.

- ``<key>.json``: {"ytid", "start", "end", "labels": [class indices], "source", "duration"}

:func:`decode_sample` reads either into the same float32 (n_mels, T) array, so nothing after
it knows how a set was stored. Keys never contain dots (WebDataset splits the member name at the
first dot); YouTube ids use only ``[A-Za-z0-9_-]``. Beside the tars: ``sizes.json`` ({shard file
name: sample count}, the WebDataset/open_clip convention) and ``manifest.json`` (feature config,
encoding, label list, per-shard count and sha256, feature mean/std, hash of the clip-id list,
values clipped by the encoding, and every skipped clip with its reason).
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import struct
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

import numpy as np
import torch
import zstandard

from ..files import sha256_file  # noqa: F401  (part of this module's API: shard checksums)

LOGMEL_EXT = "logmel.npy"  # float16 encoding (and every shard set built before encodings)
LOGMEL_U8_EXT = "logmel.u8.zst"  # uint8 encoding
META_EXT = "json"
MANIFEST_NAME = "manifest.json"
SIZES_NAME = "sizes.json"
MANIFEST_FORMAT = "audioset_dcls.shards.format/1"
ENCODINGS = ("uint8", "float16")
DEFAULT_ENCODING = "uint8"

_U8_HEADER = struct.Struct("<4sBHHff")  # magic, version, n_mels, frames, min_db, step_db
_U8_MAGIC, _U8_VERSION = b"LMU8", 1


@dataclass(frozen=True)
class LogmelEncoding:
    """How a shard set stores its log-mels: ``uint8`` (default) or ``float16``.

    ``uint8``: levels of ``step_db`` dB from ``min_db`` (256 of them), so a value is stored to
    within ``step_db / 2`` (0.3125 dB; the data's std is ~20-30 dB, augmentations change values
    by several dB). Values more than half a step outside ``[min_db, max_db]`` are clipped to it
    and counted (with the default front end nothing is below -100 dB, the log floor, and a
    full-scale signal stays under ~56 dB). The levels' time-frequency second difference
    (``q[f, t] - q[f, t-1] - q[f-1, t] + q[f-1, t-1]``, mod 256) is what zstd compresses:
    neighbouring bins and frames predict a value well, and undoing it is two cumulative sums.
    ``float16``: the float16 array, ``numpy.save`` format (11 significant bits: 0.03 dB at -100).
    """

    name: str = DEFAULT_ENCODING
    min_db: float = -100.0
    step_db: float = 0.625
    zstd_level: int = 1  # 1 is both the fastest and, on these residuals, the smallest (RESULTS.md)

    def __post_init__(self) -> None:
        if self.name not in ENCODINGS:
            raise ValueError(f"unknown log-mel encoding {self.name!r}: use one of {', '.join(ENCODINGS)}")
        if not self.step_db > 0:
            raise ValueError(f"log-mel encoding step_db must be > 0, not {self.step_db}")

    @property
    def member(self) -> str:
        """The tar member extension of the log-mel: ``logmel.u8.zst`` or ``logmel.npy``."""
        return LOGMEL_U8_EXT if self.name == "uint8" else LOGMEL_EXT

    @property
    def max_db(self) -> float:
        return self.min_db + 255 * self.step_db

    def to_dict(self) -> dict[str, Any]:
        """What the build plan and the manifest record (informational keys included)."""
        if self.name == "float16":
            return {"name": "float16", "member": LOGMEL_EXT}
        return {"name": "uint8", "member": LOGMEL_U8_EXT, "min_db": self.min_db, "step_db": self.step_db,
                "max_db": self.max_db, "max_error_db": self.step_db / 2,
                "prediction": "time-frequency second difference, mod 256", "codec": "zstd",
                "zstd_level": self.zstd_level}

    @classmethod
    def from_dict(cls, d: dict[str, Any] | None) -> "LogmelEncoding":
        """Inverse of to_dict; None (a manifest or plan from before encodings) is float16."""
        if d is None:
            return cls("float16")
        if d.get("name") == "float16":
            return cls("float16")
        return cls(str(d.get("name")), float(d["min_db"]), float(d["step_db"]), int(d["zstd_level"]))

    @classmethod
    def from_name(cls, encoding: "str | LogmelEncoding") -> "LogmelEncoding":
        return encoding if isinstance(encoding, LogmelEncoding) else cls(str(encoding))


@dataclass
class EncodedLogmel:
    """One encoded log-mel. ``values``: (n_mels, T) float32, what decode_sample will return."""

    member: str
    data: bytes
    values: torch.Tensor
    clipped: int  # values more than half a step outside the encoding's range


def encode_logmel(logmel: np.ndarray | torch.Tensor, encoding: str | LogmelEncoding = DEFAULT_ENCODING) -> EncodedLogmel:
    """Encode a (n_mels, T) float log-mel in dB as a tar member of ``encoding``."""
    enc = LogmelEncoding.from_name(encoding)
    x = torch.as_tensor(logmel).float()
    if x.ndim != 2:
        raise ValueError(f"log-mel must be (n_mels, T), not {tuple(x.shape)}")
    if enc.name == "float16":
        half = x.half()
        buf = io.BytesIO()
        np.save(buf, half.numpy(), allow_pickle=False)
        return EncodedLogmel(LOGMEL_EXT, buf.getvalue(), half.float(), 0)
    step, lo = float(np.float32(enc.step_db)), float(np.float32(enc.min_db))  # as the header stores them
    levels = (x - lo).div_(step).round_()
    low, high = torch.aminmax(levels)
    clipped = 0
    if not (low >= 0 and high <= 255):  # rare (and NaN): one pass less for every other clip
        if torch.isnan(levels).any():
            raise ValueError("log-mel has NaN values")
        clipped = int((levels < 0).sum() + (levels > 255).sum())
        levels.clamp_(0, 255)
    q = levels.to(torch.uint8)
    values = q.float().mul_(step).add_(lo)
    qn = q.numpy()
    diff = qn.copy()  # uint8 arithmetic wraps mod 256, which the cumulative sums undo exactly
    diff[:, 1:] -= qn[:, :-1]
    diff[1:] -= diff[:-1].copy()
    header = _U8_HEADER.pack(_U8_MAGIC, _U8_VERSION, qn.shape[0], qn.shape[1], lo, step)
    data = zstandard.ZstdCompressor(level=enc.zstd_level).compress(header + diff.tobytes())
    return EncodedLogmel(LOGMEL_U8_EXT, data, values, clipped)


def _decode_uint8(data: bytes) -> np.ndarray:
    raw = zstandard.decompress(data)
    if len(raw) < _U8_HEADER.size:
        raise ValueError("uint8 log-mel shorter than its header")
    magic, version, n_mels, frames, lo, step = _U8_HEADER.unpack_from(raw)
    if magic != _U8_MAGIC or version != _U8_VERSION:
        raise ValueError(f"uint8 log-mel header {magic!r} version {version} (expected {_U8_MAGIC!r} version "
                         f"{_U8_VERSION}: written by another audioset_dcls version?)")
    if len(raw) != _U8_HEADER.size + n_mels * frames:
        raise ValueError(f"uint8 log-mel of {len(raw) - _U8_HEADER.size} bytes for shape ({n_mels}, {frames})")
    diff = np.frombuffer(raw, np.uint8, offset=_U8_HEADER.size).reshape(n_mels, frames)
    # torch's uint8 cumsum wraps mod 256 and is ~6x faster than numpy's here (0.14 vs 0.9 ms)
    q = torch.from_numpy(diff.copy()).cumsum(0, dtype=torch.uint8).cumsum(1, dtype=torch.uint8)
    return q.float().mul_(float(step)).add_(float(lo)).numpy()


def _decode_npy(data: bytes) -> np.ndarray:
    arr = np.load(io.BytesIO(data), allow_pickle=False)
    return torch.from_numpy(arr).float().numpy()  # torch's float16 cast is ~20x faster than numpy's


@dataclass
class ShardSample:
    """One decoded sample. ``logmel``: (n_mels, T) float32 dB, whatever the encoding; ``labels``: class indices."""

    key: str
    logmel: np.ndarray
    labels: list[int]
    meta: dict[str, Any]


def encode_sample(
    key: str, logmel: np.ndarray | torch.Tensor | EncodedLogmel, labels: Iterable[int], meta: dict[str, Any],
    encoding: str | LogmelEncoding = DEFAULT_ENCODING,
) -> dict[str, Any]:
    """Build the dict that ``webdataset.TarWriter.write`` takes.

    ``logmel``: (n_mels, T) float dB, encoded here with ``encoding``, or an EncodedLogmel.
    """
    if "." in key:
        raise ValueError(f"sample key {key!r} contains a dot")
    encoded = logmel if isinstance(logmel, EncodedLogmel) else encode_logmel(logmel, encoding)
    record = dict(meta)
    record["labels"] = sorted(int(i) for i in labels)
    return {
        "__key__": key,
        encoded.member: encoded.data,
        META_EXT: json.dumps(record, sort_keys=True).encode("utf-8"),
    }


def decode_sample(sample: dict[str, Any]) -> ShardSample:
    """Inverse of encode_sample for a raw WebDataset sample (bytes values), either encoding.

    Raises ValueError naming the key when a member is missing or malformed.
    """
    key = sample.get("__key__", "?")
    try:
        if LOGMEL_U8_EXT in sample:
            logmel = _decode_uint8(sample[LOGMEL_U8_EXT])
        elif LOGMEL_EXT in sample:
            logmel = _decode_npy(sample[LOGMEL_EXT])
        else:
            raise KeyError(f"{LOGMEL_U8_EXT} or {LOGMEL_EXT}")
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


def manifest_encoding(manifest: dict[str, Any]) -> LogmelEncoding:
    """The encoding a manifest records; float16 for sets built before encodings existed."""
    return LogmelEncoding.from_dict(manifest.get("encoding"))


def list_shards(shard_dir: str | Path) -> list[Path]:
    """Complete shards named in the manifest, in order. Raises if one is missing."""
    shard_dir = Path(shard_dir)
    manifest = read_manifest(shard_dir)
    paths = [shard_dir / s["name"] for s in manifest["shards"]]
    missing = [str(p) for p in paths if not p.is_file()]
    if missing:
        raise FileNotFoundError(f"{shard_dir}: shards listed in the manifest are missing: {missing[:3]}")
    return paths


def check_shard_files(shard_dir: str | Path, manifest: dict[str, Any], verify: str = "size",
                      threads: int | None = None) -> list[tuple[str, str]]:
    """``(shard name, problem)`` for every shard the manifest lists that is missing, or whose
    size (``verify="size"``) or also sha256 (``"sha256"``, hashed in ``threads`` threads) is not
    the one recorded; ``[]`` when all are intact (or ``verify="none"``). Manifests that record no
    size or hash for a shard get only the existence check for it."""
    if verify == "none":
        return []
    if verify not in ("size", "sha256"):
        raise ValueError(f"verify={verify!r}: expected size, sha256 or none")
    shard_dir = Path(shard_dir)

    def check(record: dict[str, Any]) -> str | None:
        path = shard_dir / record["name"]
        try:
            size = path.stat().st_size
        except FileNotFoundError:
            return "is missing"
        except OSError as err:
            return f"cannot be read ({err.strerror})"
        if "bytes" in record and size != int(record["bytes"]):
            return f"has {size} bytes, the manifest says {record['bytes']} (cut short or replaced)"
        if verify == "sha256" and "sha256" in record:
            try:
                if sha256_file(path) != record["sha256"]:
                    return "has another sha256 than the manifest's (damaged or replaced)"
            except OSError as err:
                return f"cannot be read ({err.strerror})"
        return None

    records = manifest["shards"]
    if verify == "sha256":
        with ThreadPoolExecutor(threads or min(16, os.cpu_count() or 1)) as pool:  # hashlib releases the GIL
            problems = list(pool.map(check, records))
    else:
        problems = [check(r) for r in records]
    return [(r["name"], p) for r, p in zip(records, problems) if p is not None]


def rebuild_command(shard_dir: str | Path, manifest: dict[str, Any]) -> str:
    """The ``build_shards`` command that (re)builds ``shard_dir`` as its manifest records it; the
    labels file and audio folder are not recorded and appear as placeholders. Run on a finished
    folder, the builder checks every shard, keeps the intact ones and rebuilds the others."""
    build = manifest.get("build") or {}
    parts = ["python -m preprocessing.build_shards", f"--split {manifest.get('split', 'SPLIT')}"]
    segments = build.get("segment_files") or ["SEGMENTS.csv"]
    parts.append("--segments " + " ".join(str(s) for s in segments))
    parts.append("--labels CLASS_LABELS_INDICES.csv --audio-dir AUDIO_DIR")
    if "shard_size" in build:
        parts.append(f"--shard-size {build['shard_size']} --seed {build.get('seed', 0)}")
    if build.get("shuffle") is False:
        parts.append("--no-shuffle")
    # the builder refuses to resume with another encoding; a manifest without one predates them (float16)
    parts.append(f"--encoding {(manifest.get('encoding') or {}).get('name', 'float16')}")
    parts.append(f"--out {shard_dir}")
    return " ".join(parts)
