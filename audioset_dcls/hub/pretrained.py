"""The authors' published AudioSet weights by name: downloaded once, converted, cached.

    model, info = audioset_dcls.load_pretrained("convnext_tiny_dcls")   # (model, CheckpointInfo)
    tagger = Tagger.from_pretrained("convnext_tiny_dcls")
    python infer.py dog.wav                                             # the default model
    python -m audioset_dcls pretrained --list                           # table, cache state
    python -m audioset_dcls pretrained convnext_tiny_dcls               # fetch now (before going offline)

:data:`.published.PUBLISHED_MODELS` records, like timm's pretrained configs, where each model's
weights come from (the files of Zenodo record 8370979).

First use of a name downloads the file into ``<cache>/downloads/<file>.part`` (progress bar,
timeouts, retries with exponential backoff, a partial file resumed with an HTTP Range request;
a server that ignores Range sends the whole file again and it is rewritten from the start), checks
the size against Content-Length, converts it with the strict converter
(:mod:`audioset_dcls.hub.convert_reference`, AudioSet's label names included) into
``<cache>/<file stem>.safetensors``, whose description records the source URL and SHA-256, and
deletes the download. Later uses read the cache and touch no network. A file that does not
convert exactly (truncated, an HTML error page, another model) is deleted, nothing is cached, and
the next call downloads again. Concurrent first uses (several ranks or jobs) take a lock file per
model: one downloads, the others wait and then read the cache.

Environment:

- ``AUDIOSET_DCLS_CACHE``: the cache folder (default ``$XDG_CACHE_HOME/audioset_dcls``, else
  ``~/.cache/audioset_dcls``).
- ``AUDIOSET_DCLS_WEIGHTS_URL``: an ``http(s)://`` or ``file://`` base URL, or a local folder,
  holding the files under their Zenodo names; used instead of Zenodo (mirrors, clusters without
  internet). Local files are converted where they lie, without a copy.
- ``AUDIOSET_DCLS_OFFLINE=1``: never download; the cache or a one-line error.

Every failure is one line naming the model, the URL and what to do (download by hand and
convert with ``python -m audioset_dcls convert FILE CACHE_DIR``, which writes exactly
the file the cache looks for).
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import json
import os
import re
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any, Iterator

from tqdm.auto import tqdm

from .checkpoint import load_model, read_checkpoint_info
from .convert_reference import ConversionError, convert_reference_checkpoint
from .published import DEFAULT_MODEL, PUBLISHED_MODELS, SOURCE, PublishedModel

__all__ = [
    "PublishedModel",
    "PUBLISHED_MODELS",
    "DEFAULT_MODEL",
    "PretrainedError",
    "DownloadError",
    "cache_dir",
    "cached_path",
    "weights_source",
    "download_file",
    "fetch_pretrained",
    "load_pretrained",
    "format_model_list",
    "main",
]


# Download behaviour (keyword arguments of fetch_pretrained / download_file override them).
TIMEOUT_S = 30.0  # per connect / read: a stalled connection fails instead of hanging
RETRIES = 4  # attempts after the first; waits 2, 4, 8, 16 s in between
RETRY_WAIT_S = 2.0
CHUNK = 1 << 20


class PretrainedError(RuntimeError):
    """A published model cannot be provided. One line: the model, the URL, what to do."""


class DownloadError(OSError):
    """A download failed after its retries (or at once, for an error that retrying cannot fix)."""


class _Retryable(Exception):
    """A failed attempt worth repeating (connection dropped, timeout, HTTP 5xx / 429)."""


# --------------------------------------------------------------------------------------------
# Where things are


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def cache_dir() -> Path:
    """``$AUDIOSET_DCLS_CACHE``, else ``$XDG_CACHE_HOME/audioset_dcls``, else ``~/.cache/audioset_dcls``."""
    if os.environ.get("AUDIOSET_DCLS_CACHE"):
        return Path(os.environ["AUDIOSET_DCLS_CACHE"]).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg).expanduser() if xdg else Path.home() / ".cache") / "audioset_dcls"


def get_published(name: str) -> PublishedModel:
    """The table entry of ``name``; PretrainedError (one line, the choices) if there is none."""
    if name not in PUBLISHED_MODELS:
        raise PretrainedError(f"{name!r} is not a published model: choose from {', '.join(PUBLISHED_MODELS)}")
    return PUBLISHED_MODELS[name]


def cached_path(name: str) -> Path:
    """Where the converted checkpoint of ``name`` lives in the cache (whether or not it is there)."""
    return cache_dir() / get_published(name).cache_name


def weights_source(name: str) -> tuple[str, Path | None]:
    """``(url, local_path)`` of the file of ``name``: Zenodo, or ``$AUDIOSET_DCLS_WEIGHTS_URL``.

    ``local_path`` is set for ``file://`` URLs and plain folders (read in place), None for http(s).
    """
    model = get_published(name)
    base = os.environ.get("AUDIOSET_DCLS_WEIGHTS_URL", "").strip()
    if not base:
        return model.url, None
    scheme = urllib.parse.urlsplit(base).scheme.lower()
    if scheme in ("http", "https"):
        return f"{base.rstrip('/')}/{urllib.parse.quote(model.file)}", None
    if scheme == "file":
        folder = Path(urllib.request.url2pathname(urllib.parse.urlsplit(base).path))
    else:
        folder = Path(base).expanduser()
    path = folder / model.file
    return (f"{base.rstrip('/')}/{model.file}" if scheme == "file" else str(path)), path


def _by_hand(model: PublishedModel) -> str:
    return (f"download {model.url} by hand and convert it into the cache: "
            f"python -m audioset_dcls convert {model.file} {cache_dir()}")


# --------------------------------------------------------------------------------------------
# Downloading


def _parse_content_range(value: str | None) -> tuple[int | None, int | None]:
    """``bytes START-END/TOTAL`` (or ``bytes */TOTAL``) -> (START or None, TOTAL or None)."""
    m = re.fullmatch(r"\s*bytes\s+(?:(\d+)-\d+|\*)/(\d+|\*)\s*", value or "")
    if not m:
        return None, None
    return (int(m.group(1)) if m.group(1) else None), (int(m.group(2)) if m.group(2) != "*" else None)


def _read_part_state(state_path: Path, url: str) -> tuple[bool, str | None]:
    """Whether the partial download beside ``state_path`` is of ``url``, and the validator
    (ETag / Last-Modified) it was started with."""
    try:
        state = json.loads(state_path.read_text())
    except (OSError, ValueError):
        return False, None
    return state.get("url") == url, state.get("validator")


def _download_attempt(url: str, part: Path, state_path: Path, *, timeout: float, progress: bool,
                      desc: str) -> None:
    """One request: append to ``part`` (206) or rewrite it (200); raise _Retryable / DownloadError."""
    have = part.stat().st_size if part.is_file() else 0
    same_file, validator = _read_part_state(state_path, url) if have else (False, None)
    if not same_file:
        have = 0  # a partial download of another URL (or of unknown origin): start again
    request = urllib.request.Request(url, headers={"User-Agent": "audioset-dcls"})
    if have:
        request.add_header("Range", f"bytes={have}-")
        if validator:  # the server sends the whole file (200) if it changed since
            request.add_header("If-Range", validator)
    try:
        response = urllib.request.urlopen(request, timeout=timeout)
    except urllib.error.HTTPError as err:
        if err.code == 416 and have:  # nothing left to send: the part may already be complete
            _, total = _parse_content_range(err.headers.get("Content-Range"))
            if total == have:
                return
            part.unlink(missing_ok=True)
            raise _Retryable(f"the server refused to resume at byte {have}") from None
        if err.code in (408, 425, 429) or err.code >= 500:
            raise _Retryable(f"HTTP {err.code} {err.reason}") from None
        raise DownloadError(f"HTTP {err.code} {err.reason}") from None
    with response:
        status = response.status
        if status == 206:
            start, total = _parse_content_range(response.headers.get("Content-Range"))
            if start != have:
                part.unlink(missing_ok=True)
                raise _Retryable(f"the server resumed at byte {start}, not {have}")
            mode = "ab"
        else:  # 200: the whole file (first request, a server that ignores Range, or a changed file)
            have, mode = 0, "wb"
            length = response.headers.get("Content-Length")
            total = int(length) if length and length.isdigit() else None
            validator = response.headers.get("ETag") or response.headers.get("Last-Modified")
            state_path.write_text(json.dumps({"url": url, "validator": validator}))
        with open(part, mode) as f, tqdm(total=total, initial=have, unit="B", unit_scale=True, unit_divisor=1024,
                                         desc=desc, file=sys.stderr, disable=None if progress else True,
                                         leave=False) as bar:
            try:
                while chunk := response.read(CHUNK):
                    f.write(chunk)
                    bar.update(len(chunk))
            except (OSError, http.client.HTTPException) as err:  # dropped / timed out mid-body
                raise _Retryable(f"connection lost after {have + bar.n} bytes ({type(err).__name__}: {err})") from None
    size = part.stat().st_size
    if total is not None and size != total:
        raise _Retryable(f"connection closed after {size} of {total} bytes")


def download_file(url: str, dest: str | Path, *, timeout: float = TIMEOUT_S, retries: int = RETRIES,
                  retry_wait: float = RETRY_WAIT_S, progress: bool = True, desc: str | None = None) -> Path:
    """Download ``url`` to ``dest``, appearing there only once complete.

    The bytes go to ``dest.part`` first (with ``dest.part.json``: the URL and its ETag /
    Last-Modified, so a later call resumes only the same file); a dropped connection is resumed
    with ``Range`` up to ``retries`` times, waiting ``retry_wait * 2**i`` seconds. The size must
    equal Content-Length (or Content-Range's total). A partial file stays for the next call to
    resume. Raises :class:`DownloadError` with the reason (one line).
    """
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + ".part")
    state_path = dest.with_name(dest.name + ".part.json")
    reason = "no attempt made"
    for attempt in range(retries + 1):
        if attempt:
            time.sleep(retry_wait * 2 ** (attempt - 1))
        try:
            _download_attempt(url, part, state_path, timeout=timeout, progress=progress, desc=desc or dest.name)
        except _Retryable as err:
            reason = str(err)
            continue
        except DownloadError:
            raise
        except urllib.error.URLError as err:  # refused, unreachable, DNS, TLS: the server may come back
            reason = str(err.reason)
            continue
        except (OSError, http.client.HTTPException) as err:  # timeouts, resets before the body
            reason = f"{type(err).__name__}: {err}"
            continue
        os.replace(part, dest)
        state_path.unlink(missing_ok=True)
        return dest
    tries = f"{retries + 1} attempts" if retries else "1 attempt"
    raise DownloadError(f"{reason} ({tries})")


# --------------------------------------------------------------------------------------------
# The cache


@contextlib.contextmanager
def _locked(lock_path: Path, what: str, progress: bool) -> Iterator[None]:
    """An exclusive lock file (fcntl.flock; released when the process dies). Where fcntl is
    missing (Windows), no lock: concurrent first uses may then download twice, but each writes
    its own temp file and renames it, so the cache still never holds half a file."""
    try:  # POSIX only
        import fcntl
    except ImportError:  # pragma: no cover - not POSIX
        yield
        return
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    with open(lock_path, "a") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            if progress:
                print(f"waiting for another process that is fetching {what} ({lock_path})", file=sys.stderr)
            fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _check_cached(path: Path, model: PublishedModel) -> Path:
    try:
        info = read_checkpoint_info(path)
    except (OSError, ValueError) as err:
        raise PretrainedError(f"{model.name}: the cached {path} is unreadable ({err}); delete it to download "
                              "it again") from None
    if info.model_name != model.name:
        raise PretrainedError(f"{model.name}: the cached {path} holds {info.model_name}; delete it to download "
                              f"{model.name} again")
    return path


def fetch_pretrained(name: str, *, offline: bool | None = None, progress: bool = True, timeout: float = TIMEOUT_S,
                     retries: int = RETRIES, retry_wait: float = RETRY_WAIT_S) -> Path:
    """The converted checkpoint of published model ``name`` in the cache, fetched on first use.

    ``offline`` (default: ``$AUDIOSET_DCLS_OFFLINE``) forbids downloading. ``progress`` shows what
    happens on stderr. Raises :class:`PretrainedError` (one line) when the model cannot be had.
    """
    model = get_published(name)
    target = cached_path(name)
    if target.is_file():
        return _check_cached(target, model)
    url, local = weights_source(name)
    if offline if offline is not None else _env_flag("AUDIOSET_DCLS_OFFLINE"):
        raise PretrainedError(f"{name}: not in the cache ({target}) and downloads are off "
                              f"(--offline / AUDIOSET_DCLS_OFFLINE=1); run once online, or {_by_hand(model)}")
    downloads = target.parent / "downloads"
    with _locked(downloads / f"{model.file}.lock", name, progress):
        if target.is_file():  # another process fetched it while we waited
            return _check_cached(target, model)
        if local is not None:
            if not local.is_file():
                raise PretrainedError(f"{name}: {url} does not exist (AUDIOSET_DCLS_WEIGHTS_URL="
                                      f"{os.environ.get('AUDIOSET_DCLS_WEIGHTS_URL')}); put {model.file} there, or "
                                      f"{_by_hand(model)}")
            source = local
        else:
            if progress:
                print(f"{name}: downloading {model.file} from {url} into {target.parent}", file=sys.stderr)
            try:
                source = download_file(url, downloads / model.file, timeout=timeout, retries=retries,
                                       retry_wait=retry_wait, progress=progress, desc=model.file)
            except DownloadError as err:
                raise PretrainedError(f"{name}: could not download {url} ({err}); try again, set "
                                      f"AUDIOSET_DCLS_WEIGHTS_URL to a mirror, or {_by_hand(model)}") from None
        try:
            _convert(model, source, url, target, progress)
        finally:
            if local is None:
                source.unlink(missing_ok=True)  # converted, or refused: either way not kept
    return target


def _convert(model: PublishedModel, source: Path, url: str, target: Path, progress: bool) -> None:
    if progress:
        print(f"{model.name}: converting {source.name}", file=sys.stderr)
    try:
        result = convert_reference_checkpoint(source, target.parent, model_name=model.reference_model,
                                              source_url=url)
    except ConversionError as err:
        raise PretrainedError(f"{model.name}: {url} is not the published {model.file} ({err}); nothing cached; "
                              f"try again, or {_by_hand(model)}") from None
    if result.num_classes != model.num_classes:
        result.path.unlink(missing_ok=True)
        raise PretrainedError(f"{model.name}: {url} has {result.num_classes} classes, not {model.num_classes}; "
                              f"nothing cached; {_by_hand(model)}")
    if progress:
        print(f"{model.name}: cached {result.path}", file=sys.stderr)


def load_pretrained(name: str = DEFAULT_MODEL, *, bake: bool = True, device: str = "cpu",
                    offline: bool | None = None, progress: bool = True) -> tuple[Any, Any]:
    """Published model ``name``, fetched on first use: ``(model, CheckpointInfo)``, eval mode.

    The model takes (B, 1, 128, 1001) normalised log-mel (``info.normalization``) and returns
    (B, 527) logits; ``info.label_names`` are AudioSet's. ``bake=False`` keeps the DCLS
    positions and widths (for fine-tuning).
    """
    return load_model(fetch_pretrained(name, offline=offline, progress=progress), bake=bake, device=device)


def format_model_list() -> str:
    """The published models, their paper mAP, and whether (where) each is cached."""
    rows = [("model", "paper mAP", "cached", "file (" + SOURCE.split(",")[0] + ")")]
    for m in PUBLISHED_MODELS.values():
        path = cache_dir() / m.cache_name
        rows.append((m.name + (" (default)" if m.name == DEFAULT_MODEL else ""), m.paper_map,
                     "yes" if path.is_file() else "no", m.file))
    widths = [max(len(r[i]) for r in rows) for i in range(3)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r[:3], widths)) + "  " + r[3] for r in rows]
    base = os.environ.get("AUDIOSET_DCLS_WEIGHTS_URL")
    lines += [
        f"cache: {cache_dir()} (AUDIOSET_DCLS_CACHE)",
        f"weights from: {base} (AUDIOSET_DCLS_WEIGHTS_URL)" if base else
        f"weights from: {SOURCE}; set AUDIOSET_DCLS_WEIGHTS_URL for a mirror or a local folder",
        "paper mAP: the paper's AudioSet eval mAP, mean ± std over its runs, on the authors' copy of the eval set",
    ]
    if _env_flag("AUDIOSET_DCLS_OFFLINE"):
        lines.append("offline: AUDIOSET_DCLS_OFFLINE is set, nothing will be downloaded")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Command line: list the published models, or fetch some into the cache (before going offline)."""
    p = argparse.ArgumentParser(prog="audioset-dcls pretrained",
                                description="List the published DCLS-Audio models, or download and convert "
                                            "them into the cache.")
    p.add_argument("names", nargs="*", metavar="NAME", help=f"models to fetch: {', '.join(PUBLISHED_MODELS)}")
    p.add_argument("--all", action="store_true", help="fetch every published model")
    p.add_argument("--list", action="store_true", help="print the models and their cache state (the default)")
    p.add_argument("--offline", action="store_true", help="never download (check the cache only)")
    args = p.parse_args(argv)
    names = list(PUBLISHED_MODELS) if args.all else args.names
    if args.list or not names:
        print(format_model_list())
        return 0
    status = 0
    for name in names:
        try:
            print(fetch_pretrained(name, offline=True if args.offline else None))
        except PretrainedError as err:
            print(f"error: {err}", file=sys.stderr)
            status = 1
    return status


if __name__ == "__main__":
    sys.exit(main())
