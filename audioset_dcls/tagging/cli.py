"""Command line of the tagger (``python infer.py``): inputs -> Tagger -> table/JSON/JSONL/CSV.

The model is ``--checkpoint FILE``, or a published model by name (``--model``, default
``convnext_tiny_dcls``), downloaded and converted into the cache on first use
(``audioset_dcls/pretrained.py``; ``--list-models`` shows them).

Output goes to stdout (or ``--output``), one record per input as soon as it is tagged, so a
folder of 10,000 clips streams out; failures go to stderr as ``error: PATH: REASON`` and make the
exit status 1: files that cannot be decoded, and what a folder holds but cannot be tagged
(dangling symbolic links, unreadable files and sub-folders). A file shorter than one analysis
window is tagged with ``warning: PATH: ...`` (its tags mean little). The progress bar (stderr) shows when there are several inputs and stderr is a
terminal.

``--threshold auto`` uses the per-class thresholds calibrated into the checkpoint (by a training
run's final evaluation or ``evaluate --calibrate``). ``--events`` adds sound events (onset, offset,
label, peak and mean score: ``audioset_dcls/events.py``) from the window scores; ``--format
audacity`` writes them as an Audacity label track.
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
from contextlib import ExitStack
from pathlib import Path
from typing import IO, Any

import numpy as np

from .events import EVENT_CSV_COLUMNS, HYSTERESIS, MIN_GAP, audacity_labels, events_table, write_events_csv
from ..hub.pretrained import DEFAULT_MODEL, PUBLISHED_MODELS

FORMATS = ("table", "json", "jsonl", "csv", "audacity")
CSV_COLUMNS = ["path", "window", "start", "end", "rank", "index", "mid", "name", "score"]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="infer.py",
        description="Tag audio files (any format, rate, length) with a published AudioSet model or an "
                    "audioset-dcls checkpoint.",
        epilog="Examples:\n"
               "  python infer.py dog.wav                                  (published convnext_tiny_dcls)\n"
               "  python infer.py --model fastvit_sa24_dcls dog.wav\n"
               "  python infer.py --list-models\n"
               "  python infer.py --checkpoint model.safetensors dog.wav\n"
               "  python infer.py --checkpoint model.safetensors podcast.mp3 --hop 5 --per-window\n"
               "  python infer.py --checkpoint model.safetensors clips/ --format csv --output tags.csv\n"
               "  python infer.py --checkpoint model.safetensors @files.txt --format jsonl --embeddings emb.npy",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("inputs", nargs="*", metavar="INPUT",
                   help="audio file, folder (searched recursively by audio extension) or @list.txt "
                        "(one path per line)")
    which = p.add_mutually_exclusive_group()
    which.add_argument("--checkpoint", type=Path, help="inference checkpoint (.safetensors)")
    which.add_argument("--model", choices=list(PUBLISHED_MODELS), default=None, metavar="NAME",
                       help=f"published model ({', '.join(PUBLISHED_MODELS)}), downloaded and cached on first "
                            f"use (default: {DEFAULT_MODEL})")
    p.add_argument("--list-models", action="store_true",
                   help="print the published models (paper mAP, cached or not, the cache folder) and exit")
    p.add_argument("--offline", action="store_true",
                   help="never download a published model: use the cache (also AUDIOSET_DCLS_OFFLINE=1)")
    p.add_argument("--format", choices=FORMATS, default="table",
                   help="output format (default: table); audacity: the events as an Audacity label track "
                        "(implies --events, one input)")
    p.add_argument("--output", "-o", type=Path, help="write results to this file instead of stdout")
    p.add_argument("--top-k", type=int, default=10, help="tags per file (and per window); 0 = all (default: 10)")
    p.add_argument("--threshold", type=_threshold_arg, default=None, metavar="T|auto",
                   help="keep only tags with score >= this (applied after --top-k); auto = the per-class "
                        "thresholds calibrated into the checkpoint (evaluate --calibrate, or a training run)")
    p.add_argument("--events", action="store_true",
                   help="also output sound events (onset, offset, label, peak/mean score) from the window "
                        "scores; use a small --hop (e.g. 1) for fine times; threshold: --threshold, else auto "
                        "when the checkpoint is calibrated, else 0.5")
    p.add_argument("--hysteresis", type=float, default=HYSTERESIS, metavar="R",
                   help=f"an event goes on while its score stays >= R x threshold (default: {HYSTERESIS})")
    p.add_argument("--min-gap", type=float, default=MIN_GAP, metavar="SECONDS",
                   help=f"dips below that lasting at most this long do not end an event (default: {MIN_GAP:g})")
    p.add_argument("--hop", type=float, default=None,
                   help="seconds between 10 s windows of long files (default: 10, no overlap)")
    p.add_argument("--aggregate", choices=("max", "mean"), default=None,
                   help="clip score from window scores (default: max; mean for a single-label checkpoint, "
                        "whose softmax scores then sum to 1)")
    p.add_argument("--per-window", action="store_true", help="also output the tags of every window (tags over time)")
    p.add_argument("--embeddings", type=Path, metavar="FILE.npy",
                   help="save the pooled embeddings (files x D, float32) of the tagged files; their "
                        "paths go to FILE.paths.txt in the same order")
    p.add_argument("--plot", type=Path, metavar="OUT.png",
                   help="draw the spectrogram with the top tags over time, and with --events the events as "
                        "bars under it (needs matplotlib); with several inputs OUT_0001.png, OUT_0002.png, ...")
    live = p.add_argument_group("live input")
    live.add_argument("--stdin", action="store_true",
                      help="read raw s16le PCM from standard input as it arrives (arecord -f S16_LE, ffmpeg -f "
                           "s16le -) and write one JSONL line per window as soon as it is scored")
    live.add_argument("--rate", type=int, default=None, help="with --stdin: the sample rate of the PCM (required)")
    live.add_argument("--channels", type=int, default=1, help="with --stdin: interleaved channels (default: 1)")
    p.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda or cuda:N (default: auto)")
    p.add_argument("--batch-size", type=int, default=8, help="windows per forward pass (default: 8)")
    p.add_argument("--threads", type=int, default=None,
                   help="CPU threads for PyTorch ops (torch.set_num_threads; default: PyTorch's own choice)")
    p.add_argument("--precision", choices=("auto", "fp32", "bf16", "fp16"), default="auto",
                   help="model arithmetic: auto = bf16 on CUDA, fp32 on the CPU; bf16 on a CPU with "
                        "AVX512-BF16/AMX is 1.25-3x faster than fp32 (scores within ~1e-2); fp16: CUDA only")
    p.add_argument("--no-bake", action="store_true", help="keep DCLS layers in training form (slower; for checks)")
    p.add_argument("--quiet", "-q", action="store_true", help="no progress bar or header on stderr")
    return p


def _threshold_arg(text: str) -> float | str:
    if text == "auto":
        return text
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"a number or 'auto', got {text!r}") from None


def resolve_threshold(args: argparse.Namespace, info: Any, name: str) -> None:
    """``--threshold auto`` -> the checkpoint's (C,) calibrated values; the events' threshold:
    --threshold, else the calibrated values, else 0.5. Raises ValueError (one line) for auto
    without calibration."""
    calibrated = info.class_thresholds
    spec = args.threshold
    if spec == "auto":
        if calibrated is None:
            raise ValueError(f"{name} has no calibrated thresholds for --threshold auto: calibrate them with "
                             f"python -m audioset_dcls.training.evaluate --checkpoint {name} --shards EVAL_DIR --calibrate, "
                             "or give a number")
        args.threshold = np.asarray(calibrated)
    if spec is None and args.events:
        spec = "auto" if calibrated is not None else 0.5
        args.threshold_note = ("calibrated per class" if calibrated is not None else
                               "0.5 (the checkpoint has no calibrated thresholds; --threshold sets one)")
    else:
        args.threshold_note = "calibrated per class" if spec == "auto" else f"{spec:g}" if spec is not None else ""
    args.threshold_spec = spec
    args.event_threshold = np.asarray(calibrated) if spec == "auto" else spec


def _fmt_time(seconds: float) -> str:
    m, s = divmod(float(seconds), 60.0)
    h, m = divmod(int(m), 60)
    return f"{h}:{m:02d}:{s:04.1f}" if h else f"{m}:{s:04.1f}"


class _Writer:
    def __init__(self, stream: IO[str], args: argparse.Namespace, header: dict[str, Any]):
        self.stream, self.args, self.header = stream, args, header

    def write(self, result: Any, events: list | None = None) -> None: ...

    def close(self) -> None: ...


class TableWriter(_Writer):
    """Readable per-file table; per-window lines show the top 3 tags of each window."""

    def write(self, result: Any, events: list | None = None) -> None:
        if not result.ok:
            return  # failures are reported on stderr
        a = self.args
        lines = [f"{result.source}  ({result.duration:.1f} s, {result.num_windows} window"
                 f"{'s' if result.num_windows != 1 else ''}, {result.aggregate} over windows)"]
        tags = result.top(a.top_k, a.threshold)
        width = max([len(t.name) for t in tags] + [4])
        for rank, t in enumerate(tags, 1):
            lines.append(f"  {rank:>3}  {t.score:6.3f}  {t.name:<{width}}  {t.mid}")
        if not tags:
            lines.append("  (no tag above the threshold)")
        if a.per_window:
            lines.append("  tags over time:")
            for i in range(result.num_windows):
                wt = result.window_top(i, min(3, a.top_k) if a.top_k > 0 else 3, a.threshold)
                span = f"{_fmt_time(result.starts[i])}-{_fmt_time(result.ends[i])}"
                lines.append(f"    {span:>17}  " + (", ".join(f"{t.name} {t.score:.2f}" for t in wt) or "-"))
        if events is not None:
            lines += ["  events:"] + ["  " + line for line in events_table(events)]
        self.stream.write("\n".join(lines) + "\n\n")
        self.stream.flush()


class JsonLinesWriter(_Writer):
    """One JSON object per input and line: {path, duration, num_windows, aggregate, tags[, windows]}
    or {path, error}."""

    def write(self, result: Any, events: list | None = None) -> None:
        a = self.args
        self.stream.write(json.dumps(result.to_dict(a.top_k, a.threshold, a.per_window, events)) + "\n")
        self.stream.flush()


class JsonWriter(_Writer):
    """One JSON document {checkpoint, model, ..., results: [...]}, written incrementally."""

    def __init__(self, *args: Any):
        super().__init__(*args)
        head = json.dumps(self.header, indent=1)[:-2]  # drop the closing "\n}"
        self.stream.write(head + ',\n "results": [')
        self.first = True

    def write(self, result: Any, events: list | None = None) -> None:
        a = self.args
        self.stream.write(("\n  " if self.first else ",\n  ")
                          + json.dumps(result.to_dict(a.top_k, a.threshold, a.per_window, events)))
        self.first = False

    def close(self) -> None:
        self.stream.write("\n ]\n}\n")


class CsvWriter(_Writer):
    """Long format, one row per tag: path, window ("clip" or 0..W-1), start, end, rank, index,
    mid, name, score; with --events one row per event instead (``events.EVENT_CSV_COLUMNS``).
    Failed inputs have no rows (they are reported on stderr)."""

    def __init__(self, *args: Any):
        super().__init__(*args)
        self.csv = csv.writer(self.stream, lineterminator="\n")
        self.csv.writerow(EVENT_CSV_COLUMNS if self.args.events else CSV_COLUMNS)

    def write(self, result: Any, events: list | None = None) -> None:
        if not result.ok:
            return
        if events is not None:
            write_events_csv(self.csv, result.source, events)
            self.stream.flush()
            return
        a = self.args
        for rank, t in enumerate(result.top(a.top_k, a.threshold), 1):
            self.csv.writerow([result.source, "clip", 0.0, round(result.duration, 4), rank, t.index, t.mid,
                               t.name, f"{t.score:.6f}"])
        if a.per_window:
            for i in range(result.num_windows):
                for rank, t in enumerate(result.window_top(i, a.top_k, a.threshold), 1):
                    self.csv.writerow([result.source, i, round(float(result.starts[i]), 4),
                                       round(float(result.ends[i]), 4), rank, t.index, t.mid, t.name,
                                       f"{t.score:.6f}"])
        self.stream.flush()


class AudacityWriter(_Writer):
    """The events of one input as an Audacity label track: ``onset<TAB>offset<TAB>label``."""

    def write(self, result: Any, events: list | None = None) -> None:
        if result.ok and events is not None:
            audacity_labels(events, self.stream)
            self.stream.flush()


WRITERS = {"table": TableWriter, "json": JsonWriter, "jsonl": JsonLinesWriter, "csv": CsvWriter,
           "audacity": AudacityWriter}


def main(argv: list[str] | None = None) -> int:
    """Run the CLI; returns the exit status (0 all tagged, 1 some input failed, 2 bad usage)."""
    parser = build_parser()
    args = parser.parse_intermixed_args(argv)  # files may follow options: infer.py -q a.wav --hop 5 b.wav
    if args.list_models:
        from ..hub.pretrained import format_model_list

        print(format_model_list())
        return 0
    if args.stdin:
        if args.inputs or args.rate is None:
            parser.error("--stdin reads standard input: give --rate (and --channels), and no INPUT")
        if args.format not in ("table", "jsonl") or args.plot or args.embeddings or args.per_window:
            parser.error("--stdin writes JSONL lines (one per window): --format, --plot, --embeddings and "
                         "--per-window do not apply")
        if args.rate < 1 or args.channels < 1:
            parser.error("--rate and --channels must be >= 1")
        if sys.stdin.isatty():
            parser.error("--stdin reads raw s16le PCM from a pipe, not a terminal: "
                         "arecord -f S16_LE -r 32000 - | python infer.py --stdin --rate 32000 ...")
    elif not args.inputs:
        parser.error("give at least one INPUT (audio file, folder or @list.txt)")
    if args.batch_size < 1 or (args.threads is not None and args.threads < 1) or (args.hop is not None and args.hop <= 0):
        print("error: --batch-size and --threads must be >= 1 and --hop > 0", file=sys.stderr)
        return 2
    if not 0 < args.hysteresis <= 1 or args.min_gap < 0:
        print("error: --hysteresis must be in (0, 1] and --min-gap >= 0", file=sys.stderr)
        return 2
    if args.format == "audacity":
        args.events = True

    from tqdm import tqdm

    from .tagger import TagFailure, Tagger, cpu_has_native_bf16, expand_inputs, plot_tags

    skipped: list[TagFailure] = []  # in the folders: dangling links, unreadable files and sub-folders
    try:
        files = ["<stdin>"] if args.stdin else expand_inputs(args.inputs, problems=skipped)
    except OSError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if args.format == "audacity" and len(files) + len(skipped) > 1:
        print(f"error: --format audacity writes one label track: give one input, not {len(files) + len(skipped)}",
              file=sys.stderr)
        return 2
    if not files:
        for failure in skipped:
            print(f"error: {failure.source}: {failure.reason}", file=sys.stderr)
        print(f"error: no audio files {'could be read' if skipped else 'found'} in {' '.join(args.inputs)}",
              file=sys.stderr)
        return 1
    options = dict(device=args.device, batch_size=args.batch_size, hop_seconds=args.hop, aggregate=args.aggregate,
                   threads=args.threads, bake=not args.no_bake, precision=args.precision)
    try:
        if args.checkpoint is not None:
            tagger = Tagger.from_checkpoint(args.checkpoint, **options)
        else:
            tagger = Tagger.from_pretrained(args.model or DEFAULT_MODEL, offline=True if args.offline else None,
                                            progress=not args.quiet, **options)
        resolve_threshold(args, tagger.info, str(args.checkpoint or args.model or DEFAULT_MODEL))
    except (OSError, ValueError, RuntimeError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2

    import torch

    if tagger.precision == "bf16" and tagger.device.type == "cpu" and cpu_has_native_bf16() is False and not args.quiet:
        print("warning: this CPU has no native bf16 (avx512_bf16/amx_bf16): bf16 is emulated and likely "
              "slower than --precision fp32", file=sys.stderr)
    header = {
        "checkpoint": str(args.checkpoint) if args.checkpoint is not None else args.model or DEFAULT_MODEL,
        "model": tagger.info.model_name,
        "num_classes": tagger.info.num_classes,
        "task": tagger.info.task,
        "hop_seconds": tagger.hop_seconds,
        "window_seconds": tagger.features.clip_seconds,
        "aggregate": tagger.aggregate,
        "precision": tagger.precision,
        "threshold": args.threshold_spec,
    }
    if not args.quiet:
        threads = f", {torch.get_num_threads()} CPU threads" if tagger.device.type == "cpu" else ""
        source = (f"standard input (s16le, {args.rate} Hz, {args.channels} channel(s))" if args.stdin
                  else f"{len(files)} input(s)")
        print(f"{tagger.info.model_name} ({'training form' if args.no_bake else 'baked'}), "
              f"{tagger.info.num_classes} labels, device {tagger.device}{threads}, {tagger.precision}, "
              f"batch {1 if args.stdin else tagger.batch_size}, "
              f"{tagger.features.clip_seconds:g} s windows every {tagger.hop_seconds:g} s; {source}", file=sys.stderr)
        if args.events:
            print(f"events: threshold {args.threshold_note}, hysteresis {args.hysteresis:g}, min gap {args.min_gap:g} s",
                  file=sys.stderr)

    if args.stdin:
        return run_stdin(args, tagger)
    failed = len(skipped)
    embeddings: list[np.ndarray] = []
    embedded_paths: list[str] = []
    with ExitStack() as stack:
        stream = stack.enter_context(open(args.output, "w", newline="")) if args.output else sys.stdout
        writer = WRITERS[args.format](stream, args, header)
        for failure in skipped:
            print(f"error: {failure.source}: {failure.reason}", file=sys.stderr)
            writer.write(failure)
        bar = stack.enter_context(tqdm(total=len(files), unit="file", file=sys.stderr,
                                       disable=True if args.quiet or len(files) < 2 else None))
        for n, result in enumerate(tagger.tag_many(files, embeddings=args.embeddings is not None), 1):
            with tqdm.external_write_mode(file=sys.stderr):
                if not result.ok:
                    failed += 1
                    print(f"error: {result.source}: {result.reason}", file=sys.stderr)
                elif result.warning:
                    print(f"warning: {result.source}: {result.warning}", file=sys.stderr)
                events = None
                if args.events and result.ok:
                    events = result.events(args.event_threshold, hysteresis=args.hysteresis, min_gap=args.min_gap)
                writer.write(result, events)
                if result.ok and args.plot is not None:
                    out = args.plot if len(files) == 1 else args.plot.with_name(
                        f"{args.plot.stem}_{n:04d}{args.plot.suffix or '.png'}")
                    try:
                        plot_tags(result, out, k=min(5, args.top_k or 5), features=tagger.features, events=events)
                    except RuntimeError as err:
                        print(f"error: {err}", file=sys.stderr)
                        return 2
            if result.ok and result.embedding is not None:
                embeddings.append(result.embedding)
                embedded_paths.append(result.source)
            bar.update(1)
        writer.close()
    if args.embeddings is not None:
        dim = embeddings[0].shape[0] if embeddings else 0
        np.save(args.embeddings, np.stack(embeddings) if embeddings else np.zeros((0, dim), np.float32))
        Path(str(args.embeddings.with_suffix("")) + ".paths.txt").write_text(
            "".join(p + "\n" for p in embedded_paths))
    if not args.quiet or failed:
        total = len(files) + len(skipped)
        print(f"tagged {total - failed} of {total} input(s)" + (f"; {failed} failed" if failed else ""),
              file=sys.stderr)
    return 1 if failed else 0


def run_stdin(args: argparse.Namespace, tagger: Any) -> int:
    """--stdin: PCM from standard input -> one flushed JSONL line per window as it is scored,
    ``{"window", "start", "end", "tags"[, "events"]}`` (``events``: those that closed with this
    window), then ``{"end_of_input": true, "duration", "num_windows"[, "events"]}``. Exit 0 at the
    end of input or when the reader goes away (broken pipe), 1 when no audio came, 130 on Ctrl-C."""
    import os

    from .events import EventTracker
    from .tagger import SlidingWindows, stream_pcm, top_tags

    import torch

    cfg = tagger.features
    # One window of silence first: the first forward pass sets up the kernels (several times the
    # cost of the next ones), which would otherwise delay the first live window.
    tagger.forward_windows(torch.zeros(1, cfg.clip_samples))
    blocks = stream_pcm(sys.stdin.buffer, args.rate, args.channels, cfg.sample_rate)
    sliding = SlidingWindows(blocks, cfg.clip_samples, tagger.hop_samples)
    tracker = EventTracker(args.event_threshold, tagger.labels, hop_seconds=tagger.hop_seconds,
                           hysteresis=args.hysteresis, min_gap=args.min_gap) if args.events else None
    stream = open(args.output, "w") if args.output else sys.stdout
    n = 0
    try:
        for start, end, scores in tagger.tag_live(sliding):
            record: dict[str, Any] = {"window": n, "start": round(start, 4), "end": round(end, 4),
                                      "tags": [t.to_dict() for t in top_tags(scores, tagger.labels, args.top_k,
                                                                             args.threshold)]}
            if tracker is not None:
                record["events"] = [e.to_dict() for e in tracker.push(start, end, scores)]
            stream.write(json.dumps(record) + "\n")
            stream.flush()
            n += 1
        duration = sliding.num_samples / cfg.sample_rate
        final: dict[str, Any] = {"end_of_input": True, "duration": round(duration, 4), "num_windows": n}
        if tracker is not None:
            final["events"] = [e.to_dict() for e in tracker.finish(duration)]
        stream.write(json.dumps(final) + "\n")
        stream.flush()
    except BrokenPipeError:
        # The reader went away (``| head``): nothing more to say; keep Python from complaining
        # about the unflushable stdout at exit.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except KeyboardInterrupt:
        return 130
    finally:
        if stream is not sys.stdout:
            stream.close()
    if n == 0:
        print("error: <stdin>: no audio samples", file=sys.stderr)
        return 1
    if sliding.num_samples < cfg.n_fft:
        print(f"warning: <stdin>: only {sliding.num_samples} samples, less than one {cfg.n_fft}-sample analysis "
              "window: its tags mean little", file=sys.stderr)
    if not args.quiet:
        print(f"tagged {duration:.1f} s of standard input in {n} window(s)", file=sys.stderr)
    return 0
