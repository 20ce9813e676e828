"""Evaluation: score every clip of a shard set exactly once over all processes; mAP, mAUC, d'.

The one definition of evaluation: the training loop calls :func:`evaluate` at the end of an
epoch, and an evaluation of a saved checkpoint goes through the same functions, so both give the
same numbers for the same weights and shards.

- :func:`predict_clips`: every rank scores its share of the ordered shard list
  (``data.build_eval_loader``: shard i -> rank i % world, never resampled or padded) and the
  main process gathers ``(keys, scores, targets)``; a clip seen twice is a loader bug and fails.
- :func:`compute_metrics`: the numbers (``metrics.tagging_metrics``) plus what names the eval set
  (number of clips and the SHA-256 of their ids, as in the shard manifest).
- :func:`evaluate`: both.
- :func:`summarize`, :func:`format_result`, :func:`write_per_class_csv`, :func:`append_jsonl`:
  the summary kept in results files and checkpoints, its log line, the per-class table.
- :func:`thresholds_record`: the per-class operating thresholds calibrated on the clips
  (``metrics.calibrate_thresholds``, max F1) as an inference checkpoint stores them; the training
  run's exported checkpoint gets those of its final evaluation, ``--calibrate`` writes them into
  the evaluated checkpoint.

Functions here take a model, a :class:`~audioset_dcls.data.ShardSet`, the normalisation and the
loader settings, and an ``accelerate.Accelerator`` (rank, world size, device, autocast, gather):
no training config.

The command line evaluates a saved inference checkpoint, or a published model by name, on a
shard folder, with these same functions::

    python -m audioset_dcls evaluate --checkpoint FILE_OR_PUBLISHED_NAME --shards EVAL_DIR
        [--per-class per_class.csv] [--output results.json] [--segments eval_segments.csv]
        [--batch-size 64] [--workers 2] [--precision auto|fp32|bf16|fp16] [--offline]
        [--calibrate [--min-positives 5]]
    accelerate launch --multi_gpu --num_processes 8 -m audioset_dcls evaluate ...

Every clip is scored once over all processes; bf16 autocast on GPUs by default. The checkpoint's
feature config and classes must be the shards' (:func:`check_compatible`). ``--segments`` adds
coverage (:func:`segment_coverage`): how many of the listed segments the shards hold, and the
metrics on exactly those, so a smaller eval copy is told apart from a front-end or conversion
problem.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.utils import gather_object
from torch import nn

from ..data import DataError, ShardSet, build_eval_loader, move_batch, open_shard_set
from ..features import Normalization
from ..files import atomic_open, write_json, write_text
from ..hub.checkpoint import (
    CheckpointError,
    load_model,
    probabilities,
    read_checkpoint_info,
    store_thresholds,
)
from ..hub.pretrained import PretrainedError
from ..hub.references import resolve_reference_on_main_first
from ..labels import LabelError, read_segments
from ..metrics import (
    MIN_POSITIVES,
    calibrate_thresholds,
    classification_metrics,
    tagging_metrics,
)
from ..shards.format import hash_ids

__all__ = [
    "ClipScores",
    "predict_clips",
    "compute_metrics",
    "evaluate",
    "SUMMARY_KEYS",
    "SINGLE_LABEL_KEYS",
    "summarize",
    "format_result",
    "write_per_class_csv",
    "thresholds_record",
    "append_jsonl",
    "EvaluationError",
    "check_compatible",
    "segment_coverage",
    "main",
]

# What a results line, a checkpoint's "eval" entry and the training summary keep of a result.
SUMMARY_KEYS = ("mAP", "mAUC", "d_prime", "num_clips", "clip_ids_sha256", "num_classes_scored", "corrupt",
                "manifest_clips")
# ... and of a single-label (train.task=singlelabel) result, besides those.
SINGLE_LABEL_KEYS = ("accuracy", "top5")


@dataclass
class ClipScores:
    """Every evaluated clip's scores, gathered from all processes (in rank order)."""

    keys: list[str]  # N clip keys (``<ytid>_<start_ms>``)
    scores: np.ndarray  # (N, C) float32 probabilities: sigmoid (multilabel) or softmax (singlelabel)
    targets: np.ndarray  # (N, C) uint8 multi-hot ground truth
    corrupt: int  # samples skipped as unreadable, over all ranks and loader workers


@torch.no_grad()
def predict_clips(model: nn.Module, shards: ShardSet, norm: Normalization, *, batch_size: int, num_workers: int,
                  accelerator, task: str = "multilabel") -> ClipScores | None:
    """Score this rank's share of ``shards`` and gather every rank's on the main process.

    ``model`` maps (B, 1, n_mels, T) log-mels to (B, C) logits; pass the unwrapped module (no
    DDP: ranks may run different numbers of batches). It runs under ``accelerator.autocast()``
    and is put back in its previous train/eval mode. Scores are sigmoid probabilities, or softmax
    ones for ``task="singlelabel"``. Returns ClipScores on the main process and None on the
    others; every rank must call it (it gathers).
    """
    was_training = model.training
    model.eval()
    loader = build_eval_loader(shards, batch_size, num_workers, norm, rank=accelerator.process_index,
                               world_size=accelerator.num_processes)
    keys: list[str] = []
    scores, targets = [], []
    corrupt: dict[int, int] = {}  # loader worker -> its running count of skipped samples
    for batch in loader:
        x, y = move_batch(batch, accelerator.device)
        with accelerator.autocast():
            logits = model(x)
        scores.append(probabilities(logits, task).cpu().numpy())
        targets.append(y.cpu().numpy().astype(np.uint8))
        keys.extend(batch["keys"])
        corrupt[batch["worker"]] = batch["corrupt"]
    model.train(was_training)
    c = shards.num_classes
    local = ClipScores(keys, np.concatenate(scores) if scores else np.zeros((0, c), np.float32),
                       np.concatenate(targets) if targets else np.zeros((0, c), np.uint8), sum(corrupt.values()))
    parts = gather_object([local])  # one object per process, variable lengths: no padding
    if not accelerator.is_main_process:
        return None
    merged = ClipScores([k for p in parts for k in p.keys], np.concatenate([p.scores for p in parts]),
                        np.concatenate([p.targets for p in parts]), int(sum(p.corrupt for p in parts)))
    if len(set(merged.keys)) != len(merged.keys):
        raise RuntimeError(f"evaluation saw {len(merged.keys) - len(set(merged.keys))} clips twice: loader bug")
    return merged


def compute_metrics(clips: ClipScores, task: str = "multilabel", min_positives: int = MIN_POSITIVES) -> dict[str, Any]:
    """``metrics.tagging_metrics`` of the clips plus ``num_clips``, ``clip_ids_sha256`` (order-
    independent, comparable with a shard manifest's), ``corrupt`` and ``calibration`` (the
    per-class max-F1 thresholds, ``metrics.calibrate_thresholds``); single-label: also
    ``metrics.classification_metrics`` (``accuracy``, ``top5``, ``per_class_accuracy``)."""
    result = tagging_metrics(clips.targets, clips.scores)
    if task == "singlelabel":
        result.update(classification_metrics(clips.targets, clips.scores))
    result.update(num_clips=len(clips.keys), clip_ids_sha256=hash_ids(clips.keys), corrupt=clips.corrupt,
                  calibration=calibrate_thresholds(clips.targets, clips.scores, min_positives))
    return result


def evaluate(model: nn.Module, shards: ShardSet, norm: Normalization, *, batch_size: int, num_workers: int,
             accelerator, task: str = "multilabel") -> dict[str, Any] | None:
    """Score every clip of ``shards`` exactly once over all ranks; metrics on the main process.

    Arguments as :func:`predict_clips`. Returns (main process; None elsewhere) ``{"mAP", "mAUC",
    "d_prime", "num_clips", "clip_ids_sha256", "num_classes_scored", "corrupt", "manifest_clips",
    "per_class_ap" (C,), "per_class_auc" (C,), "positives" (C,)}``; with ``task="singlelabel"``
    also ``"accuracy"``, ``"top5"`` and ``"per_class_accuracy"`` (C,).
    """
    clips = predict_clips(model, shards, norm, batch_size=batch_size, num_workers=num_workers,
                          accelerator=accelerator, task=task)
    if clips is None:
        return None
    result = compute_metrics(clips, task)
    result["manifest_clips"] = shards.num_samples  # differs from num_clips when clips were corrupt
    return result


def summarize(result: dict[str, Any]) -> dict[str, Any]:
    """The scalar part of an :func:`evaluate` result (``SUMMARY_KEYS``, and ``SINGLE_LABEL_KEYS``
    when it has them), JSON-ready."""
    return {k: result[k] for k in SUMMARY_KEYS + SINGLE_LABEL_KEYS if k in result}


def format_result(result: dict[str, Any]) -> str:
    """One log line's worth: ``mAP 0.4512 AUC 0.9712 d' 2.681 on 17000 clips (ids sha256 ..., 0 corrupt skipped)``."""
    accuracy = (f"accuracy {result['accuracy']:.4f} top-5 {result['top5']:.4f} " if "accuracy" in result else "")
    return (f"{accuracy}mAP {result['mAP']:.4f} AUC {result['mAUC']:.4f} d' {result['d_prime']:.3f} on {result['num_clips']} "
            f"clips (ids sha256 {result['clip_ids_sha256'][:12]}, {result['corrupt']} corrupt skipped)")


def write_per_class_csv(path: str | Path, result: dict[str, Any], labels: tuple[dict, ...] | list[dict]) -> Path:
    """Per-class table ``index, mid, name, ap, auc, positives``, ``accuracy`` (of the class's
    clips) for a single-label result, then ``threshold, precision, recall, f1`` (one row per label
    record ``{"index", "mid", "name"}``; AP/AUC ``nan`` for classes without positives; the
    calibrated threshold, and precision/recall/F1 of ``score >= threshold`` on these clips, ``nan``
    where undefined), written atomically."""
    single = "per_class_accuracy" in result
    cal = result["calibration"]
    with atomic_open(path, newline="") as f:
        w = csv.writer(f)
        w.writerow(["index", "mid", "name", "ap", "auc", "positives"] + (["accuracy"] if single else [])
                   + ["threshold", "precision", "recall", "f1"])
        for i, lab in enumerate(labels):
            w.writerow([i, lab["mid"], lab["name"], f"{result['per_class_ap'][i]:.6f}",
                        f"{result['per_class_auc'][i]:.6f}", int(result["positives"][i])]
                       + ([f"{result['per_class_accuracy'][i]:.6f}"] if single else [])
                       + [f"{cal[k][i]:.6f}" for k in ("thresholds", "precision", "recall", "f1")])
    return Path(path)


def thresholds_record(result: dict[str, Any]) -> dict[str, Any]:
    """The calibration of an :func:`evaluate` result as a checkpoint stores it
    (``CheckpointInfo.thresholds``): ``{"method": "max_f1", "values" (C floats), "global",
    "min_positives", "fallback" (indices of the classes given the global value), "num_clips",
    "clip_ids_sha256"}``."""
    cal = result["calibration"]
    return {"method": "max_f1", "values": [round(float(v), 6) for v in cal["thresholds"]],
            "global": round(cal["global_threshold"], 6), "min_positives": cal["min_positives"],
            "fallback": [int(i) for i in np.flatnonzero(cal["fallback"])], "num_clips": result["num_clips"],
            "clip_ids_sha256": result["clip_ids_sha256"]}


def append_jsonl(path: str | Path, record: dict[str, Any], replace: str | None = None) -> None:
    """Append one JSON line to ``path`` (created with its folder if missing). The file is
    rewritten atomically (it holds one line per evaluation): a full disk leaves it as it was,
    never with half a line. ``replace``: a key; earlier lines with the same value for it are
    dropped (a resumed run that evaluates the same step again leaves one line for it)."""
    path = Path(path)
    lines = path.read_text().splitlines() if path.is_file() else []
    if replace is not None:
        lines = [line for line in lines if json.loads(line).get(replace) != record[replace]]
    write_text(path, "".join(line + "\n" for line in lines) + json.dumps(record) + "\n")


# --------------------------------------------------------------------------------------------
# Evaluating a saved checkpoint: python -m audioset_dcls evaluate


class EvaluationError(ValueError):
    """A checkpoint and a shard set that cannot be evaluated together. One line."""


def check_compatible(info, shards: ShardSet, checkpoint: str) -> None:
    """The model must see the shards' features and score their classes, in their order.

    ``info``: the checkpoint's :class:`~audioset_dcls.hub.checkpoint.CheckpointInfo`. Raises
    :class:`EvaluationError` naming the differing feature settings or the first differing class.
    """
    where = shards.root / "manifest.json"
    ours, theirs = info.features.to_dict(), shards.features.to_dict()
    diff = [f"{k} {ours.get(k)} vs {theirs.get(k)}" for k in sorted(set(ours) | set(theirs)) if ours.get(k) != theirs.get(k)]
    if diff:
        raise EvaluationError(f"{checkpoint}: its feature config is not the shards' ({where}): {'; '.join(diff)} "
                              "(checkpoint vs shards); build eval shards with the model's front end")
    if info.num_classes != shards.num_classes:
        raise EvaluationError(f"{checkpoint}: {info.num_classes} classes, but the shards ({where}) have "
                              f"{shards.num_classes}")
    mids = [(i, a["mid"], b["mid"]) for i, (a, b) in enumerate(zip(info.labels, shards.labels)) if a["mid"] != b["mid"]]
    if mids:
        i, a, b = mids[0]
        raise EvaluationError(f"{checkpoint}: its classes are not the shards' ({where}): {len(mids)} differ, "
                              f"the first is class {i}: {a} vs {b}")


def segment_coverage(clips: ClipScores, segment_keys: list[str]) -> dict[str, Any]:
    """How many listed segments were evaluated, and the metrics on exactly those.

    ``segment_keys``: the clip keys (``<ytid>_<start_ms>``, ``labels.Segment.key``) of a segment
    list. Returns ``{"listed", "held", "missing", "not_listed", "mAP", "mAUC", "d_prime",
    "num_clips", "clip_ids_sha256", "num_classes_scored"}``: ``held`` segments were evaluated,
    ``missing`` were not (absent or corrupt), ``not_listed`` clips were evaluated but are not in
    the list; the metrics cover the held ones (NaN when none is).
    """
    listed = set(segment_keys)
    keep = np.array([k in listed for k in clips.keys], dtype=bool)
    held = int(keep.sum())
    report: dict[str, Any] = {"listed": len(listed), "held": held, "missing": len(listed) - held,
                              "not_listed": len(clips.keys) - held}
    if held:
        sub = compute_metrics(ClipScores([k for k, m in zip(clips.keys, keep) if m], clips.scores[keep],
                                         clips.targets[keep], 0))
    else:
        sub = {"mAP": math.nan, "mAUC": math.nan, "d_prime": math.nan, "num_clips": 0,
               "clip_ids_sha256": hash_ids([]), "num_classes_scored": 0}
    report.update({k: sub[k] for k in ("mAP", "mAUC", "d_prime", "num_clips", "clip_ids_sha256", "num_classes_scored")})
    return report


def _mixed_precision(precision: str) -> str:
    """--precision -> accelerate's mixed_precision: auto = bf16 on a CUDA device that has it."""
    if precision == "auto":
        return "bf16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "no"
    if precision == "fp16" and not torch.cuda.is_available():
        raise EvaluationError("--precision fp16 needs a CUDA device; on the CPU use fp32 (or bf16)")
    return {"fp32": "no"}.get(precision, precision)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="audioset-dcls evaluate",
        description="mAP / mAUC / d' of a checkpoint (or a published model) on a shard folder, every clip once; "
                    "the same evaluation as the training loop's. Runs under accelerate launch too.",
    )
    p.add_argument("--checkpoint", required=True,
                   help="an inference checkpoint (.safetensors) or a published model name (convnext_tiny_dcls, ...)")
    p.add_argument("--shards", required=True, type=Path, help="the eval shard folder (with manifest.json)")
    p.add_argument("--per-class", type=Path, metavar="CSV", help="write per-class AP / AUC / positives here")
    p.add_argument("--output", type=Path, metavar="JSON",
                   help="write the results here (mAP, mAUC, d_prime, num_clips, clip_ids_sha256, ...)")
    p.add_argument("--segments", type=Path, metavar="CSV",
                   help="a segment list (eval_segments.csv): report how many of its segments the shards hold "
                        "and the metrics on exactly those")
    p.add_argument("--batch-size", type=int, default=64, help="clips per forward pass and process (default: 64)")
    p.add_argument("--workers", type=int, default=2, help="loader processes per process (default: 2)")
    p.add_argument("--precision", choices=("auto", "fp32", "bf16", "fp16"), default="auto",
                   help="model arithmetic (autocast): auto = bf16 on CUDA, fp32 on the CPU")
    p.add_argument("--offline", action="store_true", help="never download a published model (the cache only)")
    p.add_argument("--calibrate", action="store_true",
                   help="store per-class operating thresholds (max F1 on these clips) in the checkpoint, for "
                        "infer.py --threshold auto (a published model: its cached copy)")
    p.add_argument("--min-positives", type=int, default=MIN_POSITIVES, metavar="N",
                   help=f"classes with fewer positive clips get the global threshold (default: {MIN_POSITIVES})")
    return p


def run(args: argparse.Namespace) -> dict[str, Any] | None:
    """Evaluate as ``args`` say (every rank); the results dict on the main process, None elsewhere.
    Raises EvaluationError / CheckpointError / DataError (one line) on bad input."""
    if args.batch_size < 1 or args.workers < 0 or args.min_positives < 1:
        raise EvaluationError("--batch-size and --min-positives must be >= 1 and --workers >= 0")
    shards = open_shard_set(args.shards, "--shards")  # a missing folder fails before any process group
    launched = int(os.environ.get("WORLD_SIZE", "1"))
    # as in training: without CUDA, accelerate runs a multi-process launch as independent
    # single-process runs unless the CPU (gloo) is forced
    accelerator = Accelerator(mixed_precision=_mixed_precision(args.precision),
                              cpu=launched > 1 and not torch.cuda.is_available())
    if accelerator.num_processes != launched:
        raise EvaluationError(f"launched as {launched} processes but accelerate sees {accelerator.num_processes}; "
                              "on CPUs set ACCELERATE_USE_CPU=1")
    try:
        path = resolve_reference_on_main_first(args.checkpoint, accelerator,
                                               offline=True if args.offline else None).path
    except PretrainedError as err:
        raise EvaluationError(str(err)) from None
    info = read_checkpoint_info(path)
    check_compatible(info, shards, str(path))
    segment_keys = None
    if args.segments is not None:
        segment_keys = [seg.key for seg in read_segments(args.segments)]  # LabelError: file and line
    # Training form (not baked), as the training loop evaluates it: the same numbers for the same weights.
    model, info = load_model(path, bake=False, device=accelerator.device)
    if accelerator.is_main_process:
        print(f"evaluating {info.model_name} ({path}) on {shards.num_samples} clips in {len(shards.urls)} shards "
              f"({shards.root}); {accelerator.num_processes} process(es), device {accelerator.device}, "
              f"{'fp32' if accelerator.mixed_precision == 'no' else accelerator.mixed_precision}, "
              f"batch {args.batch_size}", file=sys.stderr)
    clips = predict_clips(model, shards, info.normalization, batch_size=args.batch_size, num_workers=args.workers,
                          accelerator=accelerator, task=info.task)
    out = None if clips is None else report(args, clips, info, shards, path, accelerator, segment_keys)
    # Every rank leaves together, through the process group's own shutdown: a rank that exits
    # while the main process still scores leaves gloo's threads running, and the C++ runtime
    # aborts it at exit ("terminate called without an active exception"), failing the launch.
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return out


def report(args: argparse.Namespace, clips: ClipScores, info, shards, path: Path, accelerator,
           segment_keys: list[str] | None) -> dict[str, Any]:
    """The main process's part of :func:`run`: metrics, the files asked for, the results dict."""
    result = compute_metrics(clips, info.task, args.min_positives)
    result["manifest_clips"] = shards.num_samples
    out = {**summarize(result), "checkpoint": str(path), "model": info.model_name, "shards": str(shards.root),
           "processes": accelerator.num_processes,
           "precision": "fp32" if accelerator.mixed_precision == "no" else accelerator.mixed_precision}
    if segment_keys is not None:
        out["segments"] = {"file": str(args.segments), **segment_coverage(clips, segment_keys)}
    if args.per_class is not None:
        write_per_class_csv(args.per_class, result, shards.labels)
    if args.calibrate:
        record = thresholds_record(result)
        store_thresholds(path, record)
        out["calibrated"] = {"classes": len(record["values"]), "fallback": len(record["fallback"]),
                             "global": record["global"]}
    if args.output is not None:
        write_json(args.output, out)
    return out


def main(argv: list[str] | None = None) -> int:
    """Command line; exit status 0, or 2 with a one-line error for input that cannot be evaluated."""
    args = build_parser().parse_args(argv)
    try:
        out = run(args)
    except (EvaluationError, CheckpointError, DataError, LabelError, OSError) as err:  # OSError: a full disk too
        if int(os.environ.get("RANK", "0")) == 0:
            print(f"error: {str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__}",
                  file=sys.stderr)
        return 2
    if out is None:
        return 0
    print(format_result(out))
    seg = out.get("segments")
    if seg is not None:
        print(f"segments {seg['file']}: {seg['held']} of {seg['listed']} listed segments evaluated "
              f"({seg['missing']} missing, {seg['not_listed']} evaluated clips not listed); on those: "
              f"mAP {seg['mAP']:.4f} AUC {seg['mAUC']:.4f} d' {seg['d_prime']:.3f}")
    cal = out.get("calibrated")
    if cal is not None:
        print(f"thresholds: {cal['classes']} classes calibrated (max F1; {cal['fallback']} with fewer than "
              f"{args.min_positives} positives get the global {cal['global']:.3f}) and stored in {out['checkpoint']}")
    for what, path in (("per-class AP", args.per_class), ("results", args.output)):
        if path is not None:
            print(f"{what}: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
