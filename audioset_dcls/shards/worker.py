"""Clips -> encoded samples, in worker processes: the CPU-heavy half of a build.

Each worker (one torch thread) decodes, resamples, pads/trims and transforms batches of clips with
the ``features`` front end and sends back encoded samples (``shards.encode_logmel``: ~75 kB each
as uint8, ~256 kB as float16) or the reason a clip was skipped. Clip-sized tasks keep every worker
busy to the end; results come back in task order, so the bytes of a shard do not depend on the
number of workers.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import multiprocessing as mp
from collections import deque
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from typing import Any, Iterable, Iterator

import numpy as np
import torch

from .. import features
from ..audio.containers import ClipRef, MissingExtra, read_clip_mono
from ..audio.decode import AudioDecodeError, resample
from ..features import FeatureConfig
from .format import LogmelEncoding, encode_logmel, encode_sample
from .plan import BuildError

__all__ = ["ClipTask", "ClipResult", "process_clip", "keep_freed_memory", "run_clips"]


@dataclass(frozen=True)
class ClipTask:
    """What a worker needs for one clip (small, so cheap to send)."""

    key: str
    ref: ClipRef | None  # where the audio is (a file, a cut of one, a container row); None: not found
    labels: tuple[int, ...]
    ytid: str
    start: float
    end: float | None

    @property
    def group(self) -> tuple[str, int] | None:
        """Clips read at once (a parquet row group): sent to one worker together."""
        return None if self.ref is None else self.ref.block


@dataclass
class ClipResult:
    """A worker's answer for one clip: ``kind == "ok"`` with an encoded sample, or a skip.

    ``sample``: the dict of ``shards.encode_sample`` (encoded (n_mels, T) log-mel + json);
    ``value_sum`` / ``value_sum_sq`` / ``num_values``: float64 sums over its stored values (as
    readers decode them); ``clipped``: values the encoding clipped to its range.
    Skip kinds: ``missing``, ``empty``, ``silent``, ``unreadable``; ``reason`` is one line.
    ``rate``: the audio's own sample rate (0 for a skip).
    """

    kind: str
    path: str | None
    reason: str = ""
    rate: int = 0
    sample: dict[str, Any] | None = None
    duration: float = 0.0
    value_sum: float = 0.0
    value_sum_sq: float = 0.0
    num_values: int = 0
    clipped: int = 0


def process_clip(task: ClipTask, cfg: FeatureConfig, encoding: LogmelEncoding = LogmelEncoding()) -> ClipResult:
    """Decode, resample, pad/trim and transform one clip with the ``features`` front end.

    Never raises for a bad file: returns a skip result with the reason instead. A bad clip is
    never turned into a zero-filled sample.
    """
    if task.ref is None:
        return ClipResult("missing", None, "no audio found for this segment")
    where = task.ref.describe()
    try:
        mono, sr = read_clip_mono(task.ref)
        wave = resample(mono, sr, cfg.sample_rate)
        if not wave.any():
            return ClipResult("silent", where, f"{where}: every sample is zero")
        duration = wave.shape[0] / cfg.sample_rate
        encoded = encode_logmel(features.compute_logmel(wave, cfg), encoding)  # (n_mels, T)
    except AudioDecodeError as err:  # missing, empty or unreadable: the front end says which
        return ClipResult(err.kind, where, str(err))
    except MissingExtra:  # not the clip's fault: every clip would fail the same way
        raise
    except Exception as err:  # a bad clip must never stop the run
        text = " ".join(str(err).split()) or type(err).__name__
        return ClipResult("unreadable", where, f"{where}: {type(err).__name__}: {text}")
    values = encoded.values.double().view(-1)
    end = task.end if task.end is not None else round(task.start + mono.shape[0] / sr, 6)
    meta = {"ytid": task.ytid, "start": task.start, "end": end, "source": where,
            "duration": round(duration, 6)}
    return ClipResult(
        "ok", where, rate=sr, sample=encode_sample(task.key, encoded, task.labels, meta),
        duration=duration, value_sum=float(values.sum()), value_sum_sq=float(torch.dot(values, values)),
        num_values=values.numel(), clipped=encoded.clipped,
    )


def keep_freed_memory() -> bool:
    """Ask glibc malloc to reuse freed memory instead of handing it back to the kernel.

    Each clip allocates ~20 MB in buffers of 0.3-4 MB (decoded samples, spectrogram, ...). With
    glibc's defaults most of them are mmap'ed and unmapped again, or trimmed off the heap, so
    every clip page-faults ~1,200-1,900 fresh zeroed pages: 2.5-3.5 ms of a ~13 ms clip. Serving
    buffers up to 32 MB from the heap and trimming it only above 256 MB keeps a worker's memory
    flat (tens of MB) and those faults gone. Returns False where there is no glibc (no effect).
    """
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    m_trim_threshold, m_mmap_threshold = -1, -3
    return bool(mallopt(m_mmap_threshold, 32 << 20)) and bool(mallopt(m_trim_threshold, 256 << 20))


# The front-end settings and the encoding of this worker process, set once by _init_worker.
_WORKER_CFG: FeatureConfig | None = None
_WORKER_ENCODING = LogmelEncoding()


def _init_worker(cfg_dict: dict[str, Any], encoding: dict[str, Any]) -> None:
    global _WORKER_CFG, _WORKER_ENCODING
    torch.set_num_threads(1)  # one process per core; torch threads would fight over them
    keep_freed_memory()
    _WORKER_CFG = FeatureConfig.from_dict(cfg_dict)
    _WORKER_ENCODING = LogmelEncoding.from_dict(encoding)
    features.compute_logmel(np.zeros(16, np.float32), _WORKER_CFG)  # build the filterbank once


def _process_batch(tasks: list[ClipTask]) -> list[ClipResult]:
    return [process_clip(t, _WORKER_CFG, _WORKER_ENCODING) for t in tasks]


def _mp_context():
    # forkserver: workers fork from a clean server that has imported this module (and torch)
    # once (fast start, no fork of a threaded parent); spawn where it does not exist.
    if "forkserver" in mp.get_all_start_methods():
        ctx = mp.get_context("forkserver")
        ctx.set_forkserver_preload([__name__])
        return ctx
    return mp.get_context("spawn")


def run_clips(tasks: Iterable[ClipTask], cfg: FeatureConfig, workers: int, clips_per_task: int = 4,
              encoding: LogmelEncoding = LogmelEncoding()) -> Iterator[ClipResult]:
    """Results of ``process_clip`` in task order, computed by ``workers`` processes (0: here).

    Raises BuildError if a worker process dies.
    """
    if workers == 0:
        # One thread, like the workers: the bytes of a shard do not depend on --workers.
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            for t in tasks:
                yield process_clip(t, cfg, encoding)
        finally:
            torch.set_num_threads(threads)
        return
    batches = _batched(tasks, clips_per_task)
    window = 4 * workers  # batches in flight: bounded memory, workers never idle
    with ProcessPoolExecutor(workers, mp_context=_mp_context(), initializer=_init_worker,
                             initargs=(cfg.to_dict(), encoding.to_dict())) as pool:
        pending: deque = deque()
        try:
            # submit() raises too once a worker has died: both are the same one-line error
            pending.extend(pool.submit(_process_batch, b) for b in _take(batches, window))
            while pending:
                results = pending.popleft().result()
                for b in _take(batches, 1):
                    pending.append(pool.submit(_process_batch, b))
                yield from results
        except BrokenProcessPool:
            raise BuildError(
                "a worker process died (out of memory, or a decoder crashed on a file); "
                "finished shards are kept: re-run the same command to resume"
            ) from None
        finally:
            for fut in pending:
                fut.cancel()


# Most clips of one row group sent to one worker at once (a Hugging Face row group holds 100).
MAX_GROUP_BATCH = 256


def _batched(tasks: Iterable[ClipTask], n: int) -> Iterator[list[ClipTask]]:
    """Batches of ``n`` tasks; consecutive tasks of one ``group`` go in one batch (up to
    MAX_GROUP_BATCH), so one worker reads that group once."""
    batch: list[ClipTask] = []
    for task in tasks:
        if batch and (task.group != batch[-1].group or
                      len(batch) >= (MAX_GROUP_BATCH if task.group is not None else n)):
            yield batch
            batch = []
        batch.append(task)
    if batch:
        yield batch


def _take(it: Iterator, n: int) -> list:
    out = []
    for _ in range(n):
        try:
            out.append(next(it))
        except StopIteration:
            break
    return out
