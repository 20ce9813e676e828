"""k-fold cross-validation in one command (ESC-50 style): every fold is evaluated once by a
model trained on the other folds; mean and standard deviation of accuracy and mAP over folds.

    # one list per fold (path,labels)
    python -m audioset_dcls crossval --folds fold1.csv fold2.csv fold3.csv fold4.csv fold5.csv \\
        --out runs/cv --config configs/finetune.yaml -- model.init=convnext_tiny_dcls
    # one list with a fold column: ESC-50's own metadata, as it comes
    python -m audioset_dcls crossval --list ESC-50/meta/esc50.csv --fold-column fold \\
        --path-column filename --label-column category --audio-root ESC-50/audio --clip-seconds 5 \\
        --out runs/esc50 --config configs/finetune.yaml -- model.init=convnext_tiny_dcls
    # one folder per class, folds drawn by a hash of each file's path
    python -m audioset_dcls crossval --class-folders my_clips --k 5 --out runs/cv ...

Layout under ``--out``: ``lists/foldK.csv`` (every fold's clips as ``path,labels``, absolute
paths; ``start,end`` kept), ``classes.txt`` (the sorted class list, shared by every fold), and per fold
``foldK/shards/{train,eval}`` (built with the shard builder, reused when complete), ``foldK/
config.yaml`` and ``foldK/run`` (the training run). Resumable per fold: a finished fold (its
``summary.json``) is read, not retrained; an interrupted one continues from its latest
checkpoint (``train.resume=auto``). Results: ``crossval.json`` (every fold, mean and sample
standard deviation) and ``crossval.md`` (the same as a table), printed at the end.

Each fold trains in its own process (``--launcher``, default this Python; e.g. ``--launcher
"accelerate launch --multi_gpu --num_processes 2"`` for several GPUs).
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import json
import logging
import math
import shlex
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..config import ConfigError, load_config, to_yaml
from ..features import FeatureConfig
from ..files import write_text
from ..labels import LabelError
from ..shards.sources import LabelledRow, read_clip_lists
from ..shards.sources import read_class_folders as read_class_folders_rows
from ..shards.cli import clip_seconds_arg
from ..shards.format import read_manifest
from ..shards.manifest import short_clips_warning

__all__ = ["FoldSet", "read_folds", "run_crossval", "summarize_folds", "main"]

METRICS = ("accuracy", "top5", "mAP")


class CrossvalError(ValueError):
    """The folds cannot be read or do not make a cross-validation; the message says why."""


@dataclass(frozen=True)
class FoldSet:
    """Every fold's clips as ``(absolute path, labels joined by ';', start, end)`` rows (start
    and end in seconds, "" for the whole file), folds in order."""

    names: tuple[str, ...]
    rows: tuple[tuple[tuple[str, str, str, str], ...], ...]

    @property
    def classes(self) -> list[str]:
        return sorted({lab for fold in self.rows for row in fold for lab in row[1].split(";") if lab})


def _read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def _absolute(p: str, root: Path) -> str:
    return str(Path(p) if Path(p).is_absolute() else (root / p).resolve())


def _row(r: LabelledRow) -> tuple[str, str, str, str]:
    """A row of the builder's readers as ``(absolute path, labels, start, end)``."""
    whole = r.start == 0 and r.end is None
    return (str(Path(r.path).resolve()), ";".join(r.names), "" if whole else f"{r.start:g}",
            "" if r.end is None else f"{r.end:g}")


def read_fold_lists(paths: list[Path]) -> FoldSet:
    """One ``path,labels[,start,end]`` CSV per fold (paths relative to the CSV's folder), read by
    the shard builder's ``--list`` reader (its checks and one-line errors)."""
    return FoldSet(tuple(p.stem for p in paths), tuple(tuple(map(_row, read_clip_lists([p]))) for p in paths))


def read_fold_column(path: Path, fold_column: str, path_column: str, label_column: str,
                     audio_root: Path | None) -> FoldSet:
    """One CSV with a fold column (ESC-50's ``meta/esc50.csv``: filename, fold, category)."""
    table = _read_csv(path)
    missing = [c for c in (fold_column, path_column, label_column) if table and c not in table[0]]
    if missing:
        raise CrossvalError(f"{path}: no column {', '.join(missing)} (has {', '.join(table[0])})")
    root = audio_root or path.parent
    folds: dict[str, list[tuple[str, str, str, str]]] = {}
    for r in table:
        folds.setdefault(r[fold_column], []).append((_absolute(r[path_column], root), r[label_column], "", ""))
    names = sorted(folds, key=lambda s: (len(s), s))  # 1, 2, ..., 10
    return FoldSet(tuple(f"fold{n}" for n in names), tuple(tuple(folds[n]) for n in names))


def read_class_folders(root: Path, k: int) -> FoldSet:
    """One folder per class (the shard builder's ``--class-folders`` reader); each file goes to
    fold ``sha1(its path under root) % k``."""
    rows: list[list[tuple[str, str, str, str]]] = [[] for _ in range(k)]
    for r in read_class_folders_rows(root):
        rel = Path(r.path).relative_to(root).as_posix()
        rows[int(hashlib.sha1(rel.encode()).hexdigest(), 16) % k].append(_row(r))
    return FoldSet(tuple(f"fold{i + 1}" for i in range(k)), tuple(tuple(r) for r in rows))


def read_folds(a: argparse.Namespace) -> FoldSet:
    """The FoldSet the command line names; CrossvalError for fewer than 2 folds or an empty one."""
    if a.folds:
        folds = read_fold_lists(a.folds)
    elif a.list:
        folds = read_fold_column(a.list, a.fold_column, a.path_column, a.label_column, a.audio_root)
    else:
        folds = read_class_folders(a.class_folders, a.k)
    if len(folds.rows) < 2:
        raise CrossvalError(f"{len(folds.rows)} fold(s): cross-validation needs at least 2")
    empty = [n for n, r in zip(folds.names, folds.rows) if not r]
    if empty:
        raise CrossvalError(f"fold(s) {', '.join(empty)} have no clips")
    return folds


def write_lists(folds: FoldSet, out: Path) -> list[Path]:
    """``lists/<fold>.csv`` per fold and ``classes.txt``; returns the lists."""
    paths = []
    for name, rows in zip(folds.names, folds.rows):
        lines = ["path,labels,start,end"] + [",".join(_csv_cell(c) for c in row) for row in rows]
        write_text(out / "lists" / f"{name}.csv", "\n".join(lines) + "\n")
        paths.append(out / "lists" / f"{name}.csv")
    write_text(out / "classes.txt", "\n".join(folds.classes) + "\n")
    return paths


def _csv_cell(s: str) -> str:
    return '"' + s.replace('"', '""') + '"' if any(c in s for c in ',"\n') else s


def build_fold_shards(lists: list[Path], k: int, fold_dir: Path, classes: Path, features: FeatureConfig,
                      workers: int) -> tuple[Path, Path]:
    """Fold ``k``'s train (every other list) and eval (list k) shards; kept when complete."""
    from ..shards.build import BuildOptions, build_shards

    out = {}
    for split, chosen in (("train", lists[:k] + lists[k + 1:]), ("eval", lists[k:k + 1])):
        d = fold_dir / "shards" / split
        if not (d / "manifest.json").is_file():
            build_shards(BuildOptions(out=d, split=split, lists=tuple(chosen), classes=classes, workers=workers,
                                      progress=False, feature_config=features))
        out[split] = d
    return out["train"], out["eval"]


def train_fold(config: Path, launcher: list[str], log_path: Path) -> None:
    """Train one fold in its own process (the resolved config); CrossvalError when it fails."""
    cmd = [*launcher, "-m", "audioset_dcls.training.crossval", "--train-fold", str(config)]
    with open(log_path, "a") as log:
        proc = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT)
    if proc.returncode != 0:
        raise CrossvalError(f"training {config.parent.name} failed (exit {proc.returncode}): see {log_path}; "
                            "rerun the same command to continue it")


def fold_result(run: Path) -> dict[str, Any] | None:
    """The finished run's final eval (accuracy, top5, mAP, clips), or None when unfinished."""
    path = run / "summary.json"
    if not path.is_file():
        return None
    summary = json.loads(path.read_text())
    if not summary.get("finished") or not summary.get("eval"):
        return None
    e = summary["eval"]
    return {m: e[m] for m in METRICS if m in e} | {"clips": e.get("num_clips"), "steps": summary["step"]}


def summarize_folds(results: list[dict[str, Any]]) -> dict[str, Any]:
    """Mean and sample standard deviation (n - 1; 0 for one fold) of each metric over folds."""
    out: dict[str, Any] = {"mean": {}, "std": {}}
    for m in METRICS:
        vals = [r[m] for r in results if r.get(m) is not None]
        if not vals:
            continue
        mean = sum(vals) / len(vals)
        out["mean"][m] = mean
        out["std"][m] = math.sqrt(sum((v - mean) ** 2 for v in vals) / (len(vals) - 1)) if len(vals) > 1 else 0.0
    return out


def table(results: list[dict[str, Any]], summary: dict[str, Any]) -> str:
    metrics = [m for m in METRICS if m in summary["mean"]]
    lines = ["| fold | eval clips | " + " | ".join(metrics) + " |", "|---|---|" + "---|" * len(metrics)]
    for r in results:
        lines.append(f"| {r['fold']} | {r['clips']} | " + " | ".join(f"{r[m]:.4f}" for m in metrics) + " |")
    lines.append("| **mean ± std** | | " + " | ".join(
        f"**{summary['mean'][m]:.4f} ± {summary['std'][m]:.4f}**" for m in metrics) + " |")
    return "\n".join(lines) + "\n"


def run_crossval(a: argparse.Namespace) -> dict[str, Any]:
    """Every fold built, trained (or read when finished) and evaluated once; writes and returns
    ``crossval.json``'s content."""
    out: Path = a.out
    folds = read_folds(a)
    lists = write_lists(folds, out)
    features = FeatureConfig(clip_seconds=a.clip_seconds)
    launcher = shlex.split(a.launcher) if a.launcher else [sys.executable]
    results = []
    for k, name in enumerate(folds.names):
        fold_dir = out / name
        run = fold_dir / "run"
        result = fold_result(run)
        if result is None:
            train_dir, eval_dir = build_fold_shards(lists, k, fold_dir, out / "classes.txt", features, a.workers)
            for line in short_clips_warning(read_manifest(train_dir)):  # --clip-seconds, same name here
                print(f"{name}: {line}", file=sys.stderr, flush=True)
            cfg = load_config(a.config, [*a.overrides, f"data.train={train_dir}", f"data.eval={eval_dir}",
                                         f"train.output_dir={run}", "train.resume=auto"])
            write_text(fold_dir / "config.yaml", to_yaml(cfg))
            print(f"{name}: training on {sum(len(r) for r in folds.rows) - len(folds.rows[k])} clips, "
                  f"evaluating on {len(folds.rows[k])}", file=sys.stderr, flush=True)
            train_fold(fold_dir / "config.yaml", launcher, fold_dir / "train.log")
            result = fold_result(run)
            if result is None:
                raise CrossvalError(f"{name}: the run ended without a final evaluation; see {fold_dir / 'train.log'}")
        results.append({"fold": name, **result, "run": str(run)})
    report = {"folds": results, **summarize_folds(results), "classes": folds.classes,
              "config": str(a.config), "overrides": list(a.overrides)}
    write_text(out / "crossval.json", json.dumps(report, indent=1) + "\n")
    write_text(out / "crossval.md", table(results, report))
    return report


def _train_one(config: Path) -> int:
    """``--train-fold``: train the resolved config of one fold (this process, or under a launcher)."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S")
    logging.getLogger("accelerate").setLevel(logging.WARNING)
    from .loop import train

    train(load_config(config))
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="audioset-dcls crossval", description="k-fold cross-validation in one command (ESC-50 style): each fold evaluated once by a model trained on the others; mean ± std accuracy and mAP.")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--folds", type=Path, nargs="+", help="one path,labels CSV per fold")
    src.add_argument("--list", type=Path, help="one CSV with a fold column (--fold-column)")
    src.add_argument("--class-folders", type=Path, help="one folder per class; folds by a hash of the path (--k)")
    p.add_argument("--fold-column", default="fold")
    p.add_argument("--path-column", default="path")
    p.add_argument("--label-column", default="labels")
    p.add_argument("--audio-root", type=Path, default=None, help="--list paths are relative to this (default: its folder)")
    p.add_argument("--k", type=int, default=5, help="folds for --class-folders")
    p.add_argument("--out", type=Path, help="work and result folder (rerun the same command to resume)")
    p.add_argument("--config", default="configs/finetune.yaml", help="training config of every fold")
    p.add_argument("--clip-seconds", type=clip_seconds_arg, default=FeatureConfig.clip_seconds, metavar="S",
                   help="length every clip is padded or trimmed to, as build_shards --clip-seconds")
    p.add_argument("--workers", type=int, default=2, help="shard-builder processes")
    p.add_argument("--launcher", default="", help='runs each fold, e.g. "accelerate launch --num_processes 2"')
    p.add_argument("--train-fold", type=Path, help=argparse.SUPPRESS)
    p.add_argument("overrides", nargs="*", metavar="section.key=value", help="for every fold (after --)")
    return p


def main(argv: list[str] | None = None) -> int:
    p = build_parser()
    a = p.parse_args(argv)
    if a.train_fold:
        return _train_one(a.train_fold)
    if not (a.folds or a.list or a.class_folders) or a.out is None:
        p.error("give --out and one of --folds, --list or --class-folders")
    try:
        report = run_crossval(a)
    except (CrossvalError, ConfigError, LabelError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(table(report["folds"], report), end="")
    print(json.dumps({"mean": report["mean"], "std": report["std"], "json": str(a.out / "crossval.json")}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
