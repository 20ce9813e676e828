"""Tag and embed a whole archive: many processes, GPUs and nodes, each input exactly once, resumable,
parquet out (``audioset-dcls tag-archive``; :func:`tag_archive` in a notebook; docs/archive.md).

**Work split, with no coordinator.** The inputs (:func:`.archive_inputs.list_inputs`: a stable
order, a stable id each) are cut into chunks of ``chunk_size``; chunk k belongs to process
``k mod P`` where the P processes are every rank of every ``--part i/N``: rank r of a launch of W
processes (``torchrun`` / ``accelerate launch``, read from ``RANK`` / ``WORLD_SIZE``) in part i is
process ``i * W + r`` of ``N * W``. Each chunk is written once by its process, so every input is
tagged exactly once across the job, whatever the number of GPUs, nodes or SLURM array tasks.

**Pipeline of one process.** Loader workers (``--workers``) decode, resample and window inputs
ahead of the model (:class:`.archive_inputs.InputDataset`, in order); the main process batches
windows of many files together, runs the model (bf16 and channels_last on a GPU; ``--compile``)
with one batch in flight while the previous batch's scores are copied back and finished files
become records, and writes each finished chunk (:mod:`.archive_parquet`).

**Resume.** Rerunning the same command skips chunks whose parts read back and hold exactly the
chunk's inputs (anything else is redone); a kill -9 loses the chunks in flight only. SIGTERM /
SIGUSR1 (``--stop-signals``) abandon the chunk in flight at the next batch, keep the chunks
already written, write the process's summary and exit 75 (``preemption.EXIT_PREEMPTED``:
"requeue me"). A rerun against a folder made with another model, other options or other inputs
is refused in one line naming what changed.
"""

from __future__ import annotations

import argparse
import collections
import datetime
import json
import os
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np
import torch
import torch.distributed
from tqdm import tqdm

from ..files import sha256_file, write_json
from ..hub.published import DEFAULT_MODEL
from ..hub.references import resolve_reference
from ..preemption import EXIT_PREEMPTED, StopSignals, ignore_stop_signals, parse_stop_signals
from .archive_inputs import ArchiveInput, InputDataset, iter_decoded, list_inputs
from .archive_parquet import SettingsMismatch, check_settings, chunk_done, ids_digest, require_pyarrow, write_chunk
from .results import TagResult
from .tagger import Tagger

__all__ = ["ArchiveOptions", "tag_archive", "chunks_of_process", "process_index", "main"]

FORMAT = "audioset_dcls.archive/1"


@dataclass
class ArchiveOptions:
    """What the job computes (``results_key``: the options that change the results, kept in the
    settings file) and how it runs (the rest)."""

    top_k: int = 10
    all_scores: bool = False
    per_window: bool = False
    events: bool = False
    event_threshold: float | str | None = None  # None: the calibrated thresholds, else 0.5
    embeddings: str | None = None  # None, "clip" or "window"
    sha256: bool = False
    hop_seconds: float | None = None
    aggregate: str | None = None
    precision: str = "auto"
    chunk_size: int = 1000
    # how it runs
    batch_size: int = 64
    workers: int = 2
    device: str = "auto"
    threads: int | None = None
    compile: bool = False
    stop_signals: str = "SIGTERM,SIGUSR1"
    progress: bool = True

    def results_key(self, tagger: Tagger) -> dict[str, Any]:
        return {"top_k": self.top_k, "all_scores": self.all_scores, "per_window": self.per_window,
                "events": self.events, "event_threshold": self.event_threshold if self.events else None,
                "embeddings": self.embeddings, "sha256": self.sha256, "hop_seconds": tagger.hop_seconds,
                "aggregate": tagger.aggregate, "precision": tagger.precision, "chunk_size": self.chunk_size}


# ---- the split ----------------------------------------------------------------------------


def process_index(part: tuple[int, int] = (0, 1)) -> tuple[int, int, int]:
    """``(process, processes, local rank)`` of this process in the whole job (module doc), from
    ``--part i/N`` and the launcher's ``RANK`` / ``WORLD_SIZE`` / ``LOCAL_RANK``."""
    i, n = part
    if not 0 <= i < n:
        raise ValueError(f"--part must be i/N with 0 <= i < N, got {i}/{n}")
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    return i * world + rank, n * world, int(os.environ.get("LOCAL_RANK", 0))


def chunks_of_process(num_inputs: int, chunk_size: int, process: int, processes: int) -> list[int]:
    """The chunks (0-based) that ``process`` of ``processes`` tags: k with k mod processes == process."""
    if chunk_size < 1:
        raise ValueError(f"chunk size must be >= 1, got {chunk_size}")
    return list(range(process, -(-num_inputs // chunk_size), processes))


# ---- model and settings -------------------------------------------------------------------


def load_tagger(checkpoint: str | Path | None, model: str | None, options: ArchiveOptions, local_rank: int
                ) -> tuple[Tagger, Path]:
    """The tagger on this process's device (cuda:LOCAL_RANK when CUDA is there and ``device`` is
    auto), channels_last on CUDA, ``forward_features`` compiled with ``compile``; and its file."""
    # Any checkpoint reference (a file, a finished run folder, a published name: hub.references);
    # each rank resolves it (a published name is fetched under the cache's lock).
    path = resolve_reference(checkpoint if checkpoint is not None else model or DEFAULT_MODEL, need="inference").path
    device = options.device
    if device == "auto":
        device = f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu"
    tagger = Tagger.from_checkpoint(path, device=device, batch_size=options.batch_size,
                                    hop_seconds=options.hop_seconds, aggregate=options.aggregate,
                                    threads=options.threads, precision=options.precision)
    if tagger.device.type == "cuda":
        tagger.model = tagger.model.to(memory_format=torch.channels_last)
    if options.compile:
        tagger.model.forward_features = torch.compile(tagger.model.forward_features)  # type: ignore[method-assign]
    return tagger, path


def job_settings(tagger: Tagger, path: Path, options: ArchiveOptions, items: Sequence[ArchiveInput]
                 ) -> dict[str, Any]:
    """What an output folder is made of: the model (its file's SHA-256), labels, options, inputs."""
    return {"format": FORMAT,
            "model": {"name": tagger.info.model_name, "sha256": sha256_file(path), "num_classes": tagger.info.num_classes,
                      "task": tagger.info.task, "labels": tagger.labels},
            "options": options.results_key(tagger),
            "inputs": {"count": len(items), "ids_sha256": ids_digest([i.id for i in items])}}


def event_thresholds(tagger: Tagger, spec: float | str | None) -> np.ndarray | float:
    """``auto`` -> the checkpoint's calibrated thresholds (ValueError without); None -> those, else 0.5."""
    calibrated = tagger.info.class_thresholds
    if spec == "auto" and calibrated is None:
        raise ValueError("--event-threshold auto: the checkpoint has no calibrated thresholds (give a number)")
    if spec in ("auto", None):
        return np.asarray(calibrated) if calibrated is not None else 0.5
    return float(spec)


# ---- records ------------------------------------------------------------------------------


def make_record(result: TagResult, decoded: dict[str, Any], chunk: int, options: ArchiveOptions,
                thresholds: np.ndarray | float) -> dict[str, Any]:
    """One row of the tags table (column meanings: :mod:`.archive_parquet`)."""
    tags = result.top(options.top_k)
    rec: dict[str, Any] = {
        "id": decoded["id"], "path": decoded["path"], "chunk": chunk, "duration": result.duration,
        "sample_rate": None if decoded["sample_rate"] < 0 else int(decoded["sample_rate"]),
        "num_windows": result.num_windows, "sha256": decoded["sha256"] or None, "warning": result.warning,
        "top_index": [t.index for t in tags], "top_mid": [t.mid for t in tags], "top_name": [t.name for t in tags],
        "top_score": [t.score for t in tags]}
    if options.all_scores:
        rec["scores"] = result.scores
    if options.per_window:
        rec.update(window_start=result.starts.astype(np.float32), window_end=result.ends.astype(np.float32),
                   window_scores=list(result.window_scores))
    if options.events:
        rec["events"] = [{"onset": e.onset, "offset": e.offset, "index": e.index, "mid": e.mid, "name": e.name,
                          "peak": e.peak, "mean": e.mean} for e in result.events(thresholds)]
    if options.embeddings:
        rec["embedding"] = result.embedding
    if options.embeddings == "window":
        rec["window_embeddings"] = list(result.window_embeddings)
    return rec


# ---- scoring ------------------------------------------------------------------------------


@dataclass
class _File:
    """One decoded input while its windows are scored."""

    decoded: dict[str, Any]
    chunk: int
    scores: list[np.ndarray | None]
    embeddings: list[np.ndarray | None]
    pending: int

    @property
    def done(self) -> bool:
        return self.pending == 0


class _Scorer:
    """Batches windows of many files; keeps one batch on the device while the previous one's
    scores come back (on a GPU the copy and the record-making overlap the next batch)."""

    def __init__(self, tagger: Tagger, embeddings: bool):
        self.tagger, self.embeddings = tagger, embeddings
        self.waves: list[torch.Tensor] = []
        self.rows: list[tuple[_File, int]] = []
        self.in_flight: tuple[torch.Tensor, torch.Tensor | None, list[tuple[_File, int]]] | None = None
        self.windows = 0

    def add(self, f: _File) -> None:
        """Queue the windows of ``f`` ((W, clip) tensor), scoring every full batch."""
        waves = f.decoded["windows"]
        for i in range(waves.shape[0]):
            self.waves.append(waves[i])
            self.rows.append((f, i))
            if len(self.rows) >= self.tagger.batch_size:
                self.submit()

    def submit(self) -> None:
        if self.rows:
            batch = torch.stack(self.waves)
            if self.tagger.device.type == "cuda":
                batch = batch.pin_memory()
            scores, emb = self.tagger.forward_windows(batch, self.embeddings)
            launched = (scores, emb, self.rows)
            self.waves, self.rows = [], []
            self.windows += batch.shape[0]
        else:
            launched = None
        self.collect()
        self.in_flight = launched

    def collect(self) -> None:
        """Bring the batch in flight back to the host and give each window its scores."""
        if self.in_flight is None:
            return
        scores, emb, rows = self.in_flight
        self.in_flight = None
        s = scores.float().cpu().numpy()
        e = emb.float().cpu().numpy() if emb is not None else None
        for row, (f, i) in enumerate(rows):
            f.scores[i] = s[row]
            if e is not None:
                f.embeddings[i] = e[row]
            f.pending -= 1

    def flush(self) -> None:
        self.submit()
        self.collect()


# ---- one process's run --------------------------------------------------------------------


@dataclass
class _Chunk:
    ids: list[str]
    results: list[dict[str, Any]] = field(default_factory=list)
    failures: list[dict[str, Any]] = field(default_factory=list)
    audio_seconds: float = 0.0
    started: float = field(default_factory=time.perf_counter)


@dataclass
class RankStats:
    """What one process did in this run (its file in ``ranks/``)."""

    process: int
    processes: int
    device: str
    workers: int
    chunks_assigned: int = 0
    chunks_already_done: int = 0
    chunks_written: int = 0
    inputs: int = 0
    tagged: int = 0
    failed: int = 0
    failures_by_kind: dict[str, int] = field(default_factory=dict)
    audio_seconds: float = 0.0
    windows: int = 0
    wall_seconds: float = 0.0
    stopped_by: str = ""

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["audio_hours"] = self.audio_seconds / 3600
        d["files_per_second"] = self.inputs / self.wall_seconds if self.wall_seconds else 0.0
        d["audio_seconds_per_second"] = self.audio_seconds / self.wall_seconds if self.wall_seconds else 0.0
        return d


class _Run:
    """Tag this process's pending chunks in order and write each as it completes."""

    def __init__(self, tagger: Tagger, out: Path, options: ArchiveOptions, settings: dict[str, Any],
                 stats: RankStats):
        self.tagger, self.out, self.options, self.settings, self.stats = tagger, out, options, settings, stats
        self.thresholds = event_thresholds(tagger, options.event_threshold) if options.events else 0.5
        self.scorer = _Scorer(tagger, options.embeddings is not None)
        self.files: collections.deque[_File] = collections.deque()
        self.chunks: dict[int, _Chunk] = {}
        self.bar: Any = None

    def decoded_stream(self, items: list[ArchiveInput]) -> Iterable[dict[str, Any]]:
        cfg = self.tagger.features
        dataset = InputDataset(items, cfg.sample_rate, cfg.clip_samples, self.tagger.hop_samples,
                               sha256=self.options.sha256, block_seconds=self.tagger.block_seconds)
        if self.options.workers == 0:
            return iter_decoded(dataset)
        return torch.utils.data.DataLoader(dataset, batch_size=None, shuffle=False, num_workers=self.options.workers,
                                           worker_init_fn=ignore_stop_signals, prefetch_factor=4,
                                           pin_memory=False)

    def run(self, work: list[tuple[int, list[ArchiveInput]]], signals: StopSignals) -> bool:
        """``work``: (chunk, its inputs) in order. Stops at the next file once a signal came
        (the chunks not written yet are abandoned). True when every chunk was written."""
        flat = [(k, item) for k, items in work for item in items]
        for k, items in work:
            self.chunks[k] = _Chunk([i.id for i in items])
        self.bar = tqdm(total=len(flat), unit="file", file=sys.stderr, dynamic_ncols=True,
                        desc=f"process {self.stats.process}/{self.stats.processes}",
                        disable=None if self.options.progress else True)
        stream = self.decoded_stream([item for _, item in flat])
        try:
            for (k, _), decoded in zip(flat, stream):
                if signals.received:
                    return False
                self.add(k, decoded)
                self.drain()
            self.scorer.flush()
            self.drain()
            return True
        finally:
            del stream  # shuts the loader's workers down
            self.bar.close()

    def add(self, chunk: int, decoded: dict[str, Any]) -> None:
        w = int(decoded["windows"].shape[0])
        f = _File(decoded, chunk, [None] * w, [None] * w, w)
        self.files.append(f)
        self.scorer.add(f)

    def drain(self) -> None:
        """Finished files (in order) -> records; finished chunks -> parts."""
        while self.files and self.files[0].done:
            f = self.files.popleft()
            self.finish_file(f)
            chunk = self.chunks[f.chunk]
            if len(chunk.results) + len(chunk.failures) == len(chunk.ids):
                self.write(f.chunk, self.chunks.pop(f.chunk))

    def finish_file(self, f: _File) -> None:
        d, chunk = f.decoded, self.chunks[f.chunk]
        self.stats.inputs += 1
        if d["error_kind"]:
            chunk.failures.append({"id": d["id"], "path": d["path"], "chunk": f.chunk, "kind": d["error_kind"],
                                   "reason": d["error"]})
            self.stats.failed += 1
            self.stats.failures_by_kind[d["error_kind"]] = self.stats.failures_by_kind.get(d["error_kind"], 0) + 1
        else:
            emb = np.stack(f.embeddings) if self.scorer.embeddings else None  # type: ignore[arg-type]
            result = self.tagger.make_result(d["path"], d["starts"].numpy(), np.stack(f.scores),  # type: ignore[arg-type]
                                             d["num_samples"], emb)
            chunk.results.append(make_record(result, d, f.chunk, self.options, self.thresholds))
            chunk.audio_seconds += result.duration
            self.stats.tagged += 1
            self.stats.audio_seconds += result.duration
        self.bar.update(1)
        self.bar.set_postfix_str(f"{self.stats.audio_seconds / 3600:.2f} h audio", refresh=False)

    def write(self, k: int, chunk: _Chunk) -> None:
        kinds: dict[str, int] = {}
        for fail in chunk.failures:
            kinds[fail["kind"]] = kinds.get(fail["kind"], 0) + 1
        stats = {"process": self.stats.process, "audio_seconds": chunk.audio_seconds, "failures_by_kind": kinds,
                 "seconds": time.perf_counter() - chunk.started}
        write_chunk(self.out, k, chunk.ids, chunk.results, chunk.failures, self.settings["options"], self.settings,
                    stats)
        self.stats.chunks_written += 1
        self.bar.write(f"process {self.stats.process}: chunk {k} written ({len(chunk.ids)} inputs, "
                       f"{len(chunk.failures)} failed)", file=sys.stderr)


# ---- the job ------------------------------------------------------------------------------


def pending_work(items: Sequence[ArchiveInput], out: Path, chunk_size: int, process: int, processes: int,
                 stats: RankStats) -> list[tuple[int, list[ArchiveInput]]]:
    """This process's chunks that are not done yet (each checked by reading it back), with their
    inputs; the leftovers of a killed writer of those chunks are removed."""
    work = []
    for k in chunks_of_process(len(items), chunk_size, process, processes):
        chunk = list(items[k * chunk_size:(k + 1) * chunk_size])
        stats.chunks_assigned += 1
        if chunk_done(out, k, [i.id for i in chunk]) is not None:
            stats.chunks_already_done += 1
            continue
        for folder in ("tags", "failures"):
            for tmp in (out / folder).glob(f".part-{k:06d}.parquet.*.tmp"):
                tmp.unlink(missing_ok=True)
        work.append((k, chunk))
    return work


def tag_archive(inputs: Sequence[str], out: str | Path, *, checkpoint: str | Path | None = None,
                model: str | None = None, part: tuple[int, int] = (0, 1), options: ArchiveOptions | None = None,
                containers: dict[str, Sequence[str]] | None = None) -> dict[str, Any]:
    """Tag (and embed) ``inputs`` (and the clips of ``containers``: ``{"hdf5" | "parquet" |
    "wds_audio": file patterns}``) into the output folder ``out``: this process's share of the job
    (all of it when launched alone). Returns this process's stats (``RankStats.to_dict``);
    ``stopped_by`` names the signal when one stopped it; the launch's rank 0 waits for the others
    and adds ``job``, the ``summary.json`` it writes. Raises SettingsMismatch, ValueError,
    OSError or RuntimeError (one line) before any tagging when the job cannot run."""
    options = options or ArchiveOptions()
    require_pyarrow()
    out = Path(out)
    process, processes, local_rank = process_index(part)
    items = list_inputs(inputs, containers)
    tagger, path = load_tagger(checkpoint, model, options, local_rank)
    settings = job_settings(tagger, path, options, items)
    check_settings(out, settings)
    stats = RankStats(process, processes, str(tagger.device), options.workers)
    work = pending_work(items, out, options.chunk_size, process, processes, stats)
    started = time.perf_counter()
    with StopSignals(parse_stop_signals(options.stop_signals)) as signals:
        run = _Run(tagger, out, options, settings, stats)
        if not run.run(work, signals):
            stats.stopped_by = signals.name
    stats.windows = run.scorer.windows
    stats.wall_seconds = time.perf_counter() - started
    result = stats.to_dict()
    write_json(out / "ranks" / f"part{part[0]}-rank{os.environ.get('RANK', 0)}.json", result)
    if not stats.stopped_by and _barrier():
        result["job"] = write_summary(out, len(items), options.chunk_size)
    return result


def write_summary(out: Path, items_count: int, chunk_size: int) -> dict[str, Any]:
    """``summary.json`` from the parts' metadata (totals over every chunk done so far) and the
    processes' files (``ranks/``)."""
    import pyarrow.parquet as pq  # optional dependency (the archive extra): imported where it is needed

    chunks = -(-items_count // chunk_size)
    total: dict[str, Any] = {"inputs": 0, "tagged": 0, "failed": 0, "audio_seconds": 0.0, "failures_by_kind": {}}
    done = 0
    for part in sorted((out / "tags").glob("part-*.parquet")):
        try:
            meta = json.loads(pq.read_schema(part).metadata[b"audioset_dcls.chunk"])
        except Exception:  # a part that does not read is redone by the next run
            continue
        done += 1
        for key in ("inputs", "tagged", "failed", "audio_seconds"):
            total[key] += meta[key]
        for kind, n in meta["failures_by_kind"].items():
            total["failures_by_kind"][kind] = total["failures_by_kind"].get(kind, 0) + n
    ranks = [json.loads(p.read_text()) for p in sorted((out / "ranks").glob("*.json"))]
    wall = max((r["wall_seconds"] for r in ranks), default=0.0)
    summary = {"complete": done == chunks, "chunks": chunks, "chunks_done": done, **total,
               "audio_hours": total["audio_seconds"] / 3600, "wall_seconds_last_run": wall,
               "files_per_second_last_run": sum(r["files_per_second"] for r in ranks),
               "audio_seconds_per_second_last_run": sum(r["audio_seconds_per_second"] for r in ranks),
               "per_rank": ranks}
    write_json(out / "summary.json", summary)
    return summary


def _barrier() -> bool:
    """Wait for the other ranks of this launch (gloo; none when launched alone). True when this
    process then writes the summary (the launch's rank 0)."""
    if int(os.environ.get("WORLD_SIZE", 1)) == 1:
        return True
    dist = torch.distributed
    if not dist.is_initialized():
        dist.init_process_group("gloo", timeout=datetime.timedelta(days=7))
    dist.barrier()
    rank = dist.get_rank()
    dist.destroy_process_group()
    return rank == 0


# ---- command line -------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="audioset-dcls tag-archive",
        description="Tag and embed a whole archive into parquet: resumable, split over processes, GPUs, "
                    "nodes (torchrun / accelerate launch) and SLURM array tasks (--part), each input once.",
        epilog="Examples:\n"
               "  python -m audioset_dcls.tagging.archive --checkpoint model.safetensors clips/ --out tags/\n"
               "  torchrun --nproc_per_node 8 -m audioset_dcls.tagging.archive clips/ --out tags/ --embeddings\n"
               "  python -m audioset_dcls.tagging.archive @files.csv --out tags/ --part $SLURM_ARRAY_TASK_ID/100\n"
               "Read back: pandas.read_parquet('tags/tags'), pandas.read_parquet('tags/failures').",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("inputs", nargs="*", metavar="INPUT",
                   help="folder (recursive), audio file, @list.txt (a path per line) or @list.csv (a path column)")
    p.add_argument("--hdf5", nargs="+", default=[], metavar="FILE_OR_GLOB", help="PANNs HDF5 waveform files")
    p.add_argument("--parquet", nargs="+", default=[], metavar="FILE_OR_DIR_OR_GLOB",
                   help="Hugging Face AudioSet parquet files (video_id, audio)")
    p.add_argument("--wds-audio", nargs="+", default=[], metavar="TAR_OR_GLOB", help="audio WebDataset tars")
    p.add_argument("--out", type=Path, required=True, help="output folder (rerun the same command to resume)")
    which = p.add_mutually_exclusive_group()
    which.add_argument("--checkpoint", metavar="CHECKPOINT",
                       help="your model: a .safetensors inference checkpoint, a finished run folder or a published name")
    which.add_argument("--model", default=None, metavar="NAME", help=f"published model (default: {DEFAULT_MODEL})")
    d = ArchiveOptions()
    p.add_argument("--top-k", type=int, default=d.top_k, help=f"labels kept per input (default: {d.top_k})")
    p.add_argument("--all-scores", action="store_true", help="also every class's score (column scores, float16)")
    p.add_argument("--per-window", action="store_true", help="also the windows' times and scores (float16)")
    p.add_argument("--events", action="store_true", help="also sound events (tagging.events)")
    p.add_argument("--event-threshold", default=None, metavar="T|auto",
                   help="events' threshold (default: calibrated per class when the checkpoint has them, else 0.5)")
    p.add_argument("--embeddings", action="store_true", help="also the pooled pre-logit embedding of each input")
    p.add_argument("--window-embeddings", action="store_true", help="also one embedding per window (implies --embeddings)")
    p.add_argument("--sha256", action="store_true", help="also each input file's SHA-256")
    p.add_argument("--hop", type=float, default=None, help="seconds between 10 s windows (default: 10)")
    p.add_argument("--aggregate", choices=("max", "mean"), default=None, help="clip score from window scores")
    p.add_argument("--precision", choices=("auto", "fp32", "bf16", "fp16"), default="auto",
                   help="auto: bf16 on CUDA, fp32 on the CPU")
    p.add_argument("--chunk-size", type=int, default=d.chunk_size, help=f"inputs per part file (default: {d.chunk_size})")
    p.add_argument("--part", default="0/1", metavar="i/N", help="this task's share of the job (SLURM arrays)")
    p.add_argument("--batch-size", type=int, default=d.batch_size, help=f"windows per forward pass (default: {d.batch_size})")
    p.add_argument("--workers", type=int, default=d.workers,
                   help=f"decoding processes per rank (0: decode in the main process; default: {d.workers})")
    p.add_argument("--device", default="auto", help="auto (cuda:LOCAL_RANK if CUDA, else cpu), cpu, cuda:N")
    p.add_argument("--threads", type=int, default=None, help="PyTorch CPU threads of the main process")
    p.add_argument("--compile", action="store_true", help="torch.compile the model's feature extractor")
    p.add_argument("--stop-signals", default=d.stop_signals, help=f"signals that stop cleanly (default: {d.stop_signals})")
    p.add_argument("--quiet", "-q", action="store_true", help="no progress bar")
    return p


def _part(text: str) -> tuple[int, int]:
    try:
        i, n = (int(x) for x in text.split("/"))
    except ValueError:
        raise ValueError(f"--part must be i/N (e.g. 3/100: task 3 of 100, counted from 0), got {text!r}") from None
    return i, n


def _options(args: argparse.Namespace) -> ArchiveOptions:
    threshold = args.event_threshold
    if threshold not in (None, "auto"):
        threshold = float(threshold)
    return ArchiveOptions(top_k=args.top_k, all_scores=args.all_scores, per_window=args.per_window, events=args.events,
                          event_threshold=threshold, embeddings="window" if args.window_embeddings else "clip" if args.embeddings else None, sha256=args.sha256,
                          hop_seconds=args.hop, aggregate=args.aggregate, precision=args.precision,
                          chunk_size=args.chunk_size, batch_size=args.batch_size, workers=args.workers,
                          device=args.device, threads=args.threads, compile=args.compile,
                          stop_signals=args.stop_signals, progress=not args.quiet)


def _summary_line(stats: dict[str, Any], summary: dict[str, Any] | None) -> str:
    line = (f"process {stats['process']}/{stats['processes']}: {stats['inputs']} inputs ({stats['failed']} failed), "
            f"{stats['audio_hours']:.3f} h of audio in {stats['wall_seconds']:.1f} s: "
            f"{stats['files_per_second']:.2f} files/s, {stats['audio_seconds_per_second']:.1f} audio s/s; "
            f"{stats['chunks_already_done']} of {stats['chunks_assigned']} chunks were already done")
    if summary is not None:
        kinds = ", ".join(f"{k} {n}" for k, n in sorted(summary["failures_by_kind"].items())) or "none"
        line += (f"\njob: {summary['chunks_done']} of {summary['chunks']} chunks done, {summary['inputs']} inputs, "
                 f"{summary['audio_hours']:.3f} h of audio, failures: {kinds}")
    return line


def main(argv: list[str] | None = None) -> int:
    """Run the job; 0 when this process's share is done (failed inputs are in the failures table),
    75 when a stop signal ended it early (rerun to resume), 2 when it cannot run (one line)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    containers = {"hdf5": args.hdf5, "parquet": args.parquet, "wds_audio": args.wds_audio}
    if not args.inputs and not any(containers.values()):
        parser.error("give at least one INPUT (folder, file, @list) or --hdf5 / --parquet / --wds-audio")
    try:
        i, n = _part(args.part)
        options = _options(args)
        stats = tag_archive(args.inputs, args.out, checkpoint=args.checkpoint, model=args.model, part=(i, n),
                            options=options, containers=containers)
    except (SettingsMismatch, ValueError, OSError, RuntimeError, ImportError) as err:  # ImportError: a missing extra
        print(f"error: {err}", file=sys.stderr)
        return 2
    if stats["stopped_by"]:
        print(f"{stats['stopped_by']} received: stopped; the chunk in flight is redone by the next run",
              file=sys.stderr)
        print(_summary_line(stats, None), file=sys.stderr)
        return EXIT_PREEMPTED
    print(_summary_line(stats, stats.get("job")), file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
