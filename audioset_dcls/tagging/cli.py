"""Command line of the tagger (``python infer.py``): inputs -> Tagger -> table/JSON/JSONL/CSV.

The model is ``--checkpoint FILE``, or a published model by name (``--model``, default
``convnext_tiny_dcls``), downloaded and converted into the cache on first use
(``audioset_dcls/hub/pretrained.py``; ``--list-models`` shows them). ``--checkpoint`` takes any
checkpoint reference (``hub/references.py``): a file, a finished run folder or a published name.

Output goes to stdout (or ``--output``), one record per input as soon as it is tagged, so a
folder of 10,000 clips streams out; failures go to stderr as ``error: PATH: REASON`` and make the
exit status 1: files that cannot be decoded, and what a folder holds but cannot be tagged
(dangling symbolic links, unreadable files and sub-folders). A file shorter than one analysis
window is tagged with ``warning: PATH: ...`` (its tags mean little). The progress bar (stderr) shows when there are several inputs and stderr is a
terminal.

``--threshold auto`` uses the per-class thresholds calibrated into the checkpoint (by a training
run's final evaluation or ``evaluate --calibrate``). ``--events`` adds sound events (onset, offset,
label, peak and mean score: ``tagging/events.py``) from the window scores; ``--format
audacity`` writes them as an Audacity label track. Every format is written by ``tagging/outputs.py``;
this module only reads the command line and runs the tagger. The tagger, torch and tqdm are
imported inside the functions that run them, so that ``--help`` and usage errors answer at once.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..hub.published import DEFAULT_MODEL, PUBLISHED_MODELS
from .events import HYSTERESIS, MIN_GAP
from .outputs import FORMATS, OutputOptions, end_record, open_writer, window_record


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=None,  # infer.py, or "audioset-dcls tag" through the dispatcher
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
    which.add_argument("--checkpoint", metavar="CHECKPOINT",
                       help="your model: a .safetensors inference checkpoint, a finished run folder or a published name")
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


@dataclass(frozen=True)
class Thresholds:
    """What ``--threshold`` (and the checkpoint's calibration) mean for this run: ``tags``, the
    cut on listed tags (None, a number, or (C,) calibrated values); ``events``, the events'
    threshold; ``spec`` and ``note`` say which, for the header and the log."""

    tags: Any
    events: Any
    spec: Any
    note: str


def resolve_thresholds(spec: float | str | None, want_events: bool, info: Any, name: str) -> Thresholds:
    """``--threshold`` -> :class:`Thresholds`: auto = the checkpoint's calibrated per-class values;
    events without a threshold use them too, else 0.5. ValueError (one line) for auto without
    calibration."""
    calibrated = info.class_thresholds
    if spec == "auto" and calibrated is None:
        raise ValueError(f"{name} has no calibrated thresholds for --threshold auto: calibrate them with "
                         f"audioset-dcls evaluate --checkpoint {name} --shards EVAL_DIR --calibrate, or give a number")
    tags = np.asarray(calibrated) if spec == "auto" else spec
    if spec is None and want_events:
        spec = "auto" if calibrated is not None else 0.5
        note = ("calibrated per class" if calibrated is not None else
                "0.5 (the checkpoint has no calibrated thresholds; --threshold sets one)")
    else:
        note = "calibrated per class" if spec == "auto" else f"{spec:g}" if spec is not None else ""
    events = np.asarray(calibrated) if spec == "auto" else spec
    return Thresholds(tags, events, spec, note)


def check_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> str | None:
    """Refuse option combinations that cannot work: usage errors exit through the parser, bad
    values come back as one line (None when all is well)."""
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
        return "--batch-size and --threads must be >= 1 and --hop > 0"
    if not 0 < args.hysteresis <= 1 or args.min_gap < 0:
        return "--hysteresis must be in (0, 1] and --min-gap >= 0"
    return None


def load_tagger(args: argparse.Namespace) -> Any:
    """The Tagger the options name (``--checkpoint`` reference, else ``--model``)."""
    from .tagger import Tagger

    return Tagger.from_checkpoint(args.checkpoint or args.model or DEFAULT_MODEL, offline=True if args.offline else None,
                                  progress=not args.quiet, device=args.device, batch_size=args.batch_size,
                                  hop_seconds=args.hop, aggregate=args.aggregate, threads=args.threads,
                                  bake=not args.no_bake, precision=args.precision)


def describe_run(args: argparse.Namespace, tagger: Any, th: Thresholds, source: str) -> dict[str, Any]:
    """The header of the JSON output; unless ``--quiet``, the same told on stderr."""
    from .tagger import cpu_has_native_bf16

    header = {"checkpoint": str(args.checkpoint or args.model or DEFAULT_MODEL), "model": tagger.info.model_name,
              "num_classes": tagger.info.num_classes, "task": tagger.info.task, "hop_seconds": tagger.hop_seconds,
              "window_seconds": tagger.features.clip_seconds, "aggregate": tagger.aggregate,
              "precision": tagger.precision, "threshold": th.spec}
    if args.quiet:
        return header
    import torch

    if tagger.precision == "bf16" and tagger.device.type == "cpu" and cpu_has_native_bf16() is False:
        print("warning: this CPU has no native bf16 (avx512_bf16/amx_bf16): bf16 is emulated and likely "
              "slower than --precision fp32", file=sys.stderr)
    threads = f", {torch.get_num_threads()} CPU threads" if tagger.device.type == "cpu" else ""
    print(f"{tagger.info.model_name} ({'training form' if args.no_bake else 'baked'}), "
          f"{tagger.info.num_classes} labels, device {tagger.device}{threads}, {tagger.precision}, "
          f"batch {1 if args.stdin else tagger.batch_size}, "
          f"{tagger.features.clip_seconds:g} s windows every {tagger.hop_seconds:g} s; {source}", file=sys.stderr)
    if args.events:
        print(f"events: threshold {th.note}, hysteresis {args.hysteresis:g}, min gap {args.min_gap:g} s",
              file=sys.stderr)
    return header


def main(argv: list[str] | None = None) -> int:
    """Run the CLI; returns the exit status (0 all tagged, 1 some input failed, 2 bad usage)."""
    parser = build_parser()
    args = parser.parse_intermixed_args(argv)  # files may follow options: infer.py -q a.wav --hop 5 b.wav
    if args.list_models:
        from ..hub.pretrained import format_model_list

        print(format_model_list())
        return 0
    problem = check_args(parser, args)
    if problem:
        print(f"error: {problem}", file=sys.stderr)
        return 2
    args.events = args.events or args.format == "audacity"
    from .inputs import expand_inputs

    skipped: list[Any] = []  # in the folders: dangling links, unreadable files and sub-folders
    try:
        files = [] if args.stdin else expand_inputs(args.inputs, problems=skipped)
    except OSError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if args.format == "audacity" and len(files) + len(skipped) > 1:
        print(f"error: --format audacity writes one label track: give one input, not {len(files) + len(skipped)}",
              file=sys.stderr)
        return 2
    if not args.stdin and not files:
        for failure in skipped:
            print(f"error: {failure.source}: {failure.reason}", file=sys.stderr)
        print(f"error: no audio files {'could be read' if skipped else 'found'} in {' '.join(args.inputs)}",
              file=sys.stderr)
        return 1
    try:
        tagger = load_tagger(args)
        th = resolve_thresholds(args.threshold, args.events, tagger.info,
                                str(args.checkpoint or args.model or DEFAULT_MODEL))
    except (OSError, ValueError, RuntimeError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    source = (f"standard input (s16le, {args.rate} Hz, {args.channels} channel(s))" if args.stdin
              else f"{len(files)} input(s)")
    header = describe_run(args, tagger, th, source)
    if args.stdin:
        return run_stdin(args, tagger, th)
    return run_files(args, tagger, th, files, skipped, header)


def run_files(args: argparse.Namespace, tagger: Any, th: Thresholds, files: list[str], skipped: list[Any],
              header: dict[str, Any]) -> int:
    """Tag ``files`` (``skipped``: folder entries already known to fail) into the chosen format;
    plots and embeddings as asked. Exit status 1 when any input failed."""
    from tqdm import tqdm

    from .plot import plot_tags

    options = OutputOptions(args.top_k, th.tags, args.per_window, args.events)
    failed, embeddings, embedded = len(skipped), [], []
    with ExitStack() as stack:
        stream = stack.enter_context(open(args.output, "w", newline="")) if args.output else sys.stdout
        writer = open_writer(args.format, stream, options, header)
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
                events = (result.events(th.events, hysteresis=args.hysteresis, min_gap=args.min_gap)
                          if args.events and result.ok else None)
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
                embedded.append(result.source)
            bar.update(1)
        writer.close()
    if args.embeddings is not None:
        save_embeddings(args.embeddings, embeddings, embedded)
    if not args.quiet or failed:
        total = len(files) + len(skipped)
        print(f"tagged {total - failed} of {total} input(s)" + (f"; {failed} failed" if failed else ""),
              file=sys.stderr)
    return 1 if failed else 0


def save_embeddings(path: Path, embeddings: list[np.ndarray], sources: list[str]) -> None:
    """``path`` (.npy, files x D float32) and ``path`` minus suffix + ``.paths.txt`` in the same order."""
    dim = embeddings[0].shape[0] if embeddings else 0
    np.save(path, np.stack(embeddings) if embeddings else np.zeros((0, dim), np.float32))
    Path(str(path.with_suffix("")) + ".paths.txt").write_text("".join(p + "\n" for p in sources))


def run_stdin(args: argparse.Namespace, tagger: Any, th: Thresholds) -> int:
    """--stdin: PCM from standard input -> one flushed JSONL line per window as it is scored
    (:func:`.outputs.window_record`: the events that closed with this window), then
    :func:`.outputs.end_record`. Exit 0 at the end of input or when the reader goes away
    (broken pipe), 1 when no audio came, 130 on Ctrl-C."""
    import torch

    from ..audio.stream import stream_pcm
    from .events import EventTracker
    from .results import top_tags
    from .windows import SlidingWindows

    cfg = tagger.features
    # One window of silence first: the first forward pass sets up the kernels (several times the
    # cost of the next ones), which would otherwise delay the first live window.
    tagger.forward_windows(torch.zeros(1, cfg.clip_samples))
    blocks = stream_pcm(sys.stdin.buffer, args.rate, args.channels, cfg.sample_rate)
    sliding = SlidingWindows(blocks, cfg.clip_samples, tagger.hop_samples)
    tracker = EventTracker(th.events, tagger.labels, hop_seconds=tagger.hop_seconds,
                           hysteresis=args.hysteresis, min_gap=args.min_gap) if args.events else None
    stream = open(args.output, "w") if args.output else sys.stdout
    n = 0
    try:
        for start, end, scores in tagger.tag_live(sliding):
            events = tracker.push(start, end, scores) if tracker is not None else None
            record = window_record(n, start, end, top_tags(scores, tagger.labels, args.top_k, th.tags), events)
            stream.write(json.dumps(record) + "\n")
            stream.flush()
            n += 1
        duration = sliding.num_samples / cfg.sample_rate
        final = end_record(duration, n, tracker.finish(duration) if tracker is not None else None)
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
