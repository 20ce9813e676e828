"""Knowledge distillation from a teacher's stored scores: the table, the targets and the loss.

With ``distill.teacher`` set, every training clip's loss is

    (1 - lambda * h) * label_loss + lambda * h * distillation_loss          lambda = distill.weight

where ``h`` is 1 for a clip the teacher scored and 0 for one it did not (that clip falls back to
its labels alone; mixup mixes ``h`` with the clip's partner, as it mixes the targets). Multi-label:
binary cross-entropy of the student's logits against the teacher's ``sigmoid(z / T)`` (EfficientAT,
Schmid et al. 2023, arXiv:2211.04772: the temperature acts on the teacher only). Single-label:
``T^2 * KL(softmax(z_t / T) || softmax(z_s / T))`` (Hinton et al. 2015, arXiv:1503.02531). Label
smoothing acts on the labels only; mixup mixes the teacher's targets with the labels' lambda.

The table (audioset_dcls.teacher) is built once by the main process (reused when its sources are
unchanged) while the other ranks wait, then every rank and loader worker maps it read-only.
"""

from __future__ import annotations

import json
import tarfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from accelerate import Accelerator
from accelerate.logging import get_logger

from ..augment import augment_batch
from ..config import Config, DistillConfig
from ..data import DataError, ShardSet, teacher_row
from ..metrics import classification_metrics, tagging_metrics
from ..shards.format import META_EXT
from ..teacher import TeacherError, TeacherSource, TeacherTable, build_table

__all__ = ["open_teacher", "teacher_targets", "distillation_loss", "teacher_eval_metrics", "table_dir"]

log = get_logger("audioset_dcls.train")
_EPS = 1e-6


def table_dir(cfg: Config) -> Path:
    """Where the run's teacher table lives: distill.table_dir, else <train.output_dir>/teacher_table."""
    return Path(cfg.distill.table_dir or Path(cfg.train.output_dir) / "teacher_table")


def _source(d: DistillConfig) -> TeacherSource:
    return TeacherSource(path=d.teacher, hdf5=tuple(h.strip() for h in d.hdf5.split(",") if h.strip()),
                         kind=d.scores, id_column=d.id_column, scores_column=d.scores_column, labels=d.labels)


def check_labels(table: TeacherTable, train_set: ShardSet) -> None:
    """DataError when the teacher's class count, or its class order where the source declares
    one, differs from the training shards'."""
    if table.num_classes != train_set.num_classes:
        raise DataError(f"distill.teacher scores {table.num_classes} classes; data.train has {train_set.num_classes}")
    if table.labels is None:
        return
    mids = [lab["mid"] for lab in train_set.labels]
    if list(table.labels) != mids:
        i, a, b = next((i, a, b) for i, (a, b) in enumerate(zip(table.labels, mids)) if a != b)
        raise DataError(f"distill.teacher's class {i} is {a!r}, data.train's {b!r}: the teacher's label order differs "
                        "from the shards' (re-export its scores in the shards' class order)")


def open_teacher(cfg: Config, accelerator: Accelerator, train_set: ShardSet) -> TeacherTable | None:
    """The run's teacher table (None without distill.teacher): built by the main process first,
    then opened on every rank. DataError (one line naming the file) for a bad source."""
    if not cfg.distill.teacher:
        return None
    where = table_dir(cfg)
    failure = None
    with accelerator.main_process_first():
        try:
            if accelerator.is_main_process:
                build_table(_source(cfg.distill), where, train_set.num_classes)
            table = TeacherTable(where)
        except TeacherError as err:
            failure, table = str(err), None
    if failure is not None:
        raise DataError(failure)
    check_labels(table, train_set)
    order = "its declared class order matches the shards'" if table.labels else \
        "no class list declared (distill.labels): assumed to be the shards' order"
    log.info(f"teacher {cfg.distill.teacher}: {len(table)} clips x {table.num_classes} {table.kind}, memory-mapped "
             f"from {where}; {order}; weight {cfg.distill.weight}, temperature {cfg.distill.temperature}")
    return table


# --------------------------------------------------------------------------------- targets


def teacher_targets(scores: torch.Tensor, has: torch.Tensor, labels: torch.Tensor, kind: str, temperature: float,
                    task: str) -> torch.Tensor:
    """The teacher's soft targets (B, C) from its stored scores (B, C): multi-label
    ``sigmoid(z / T)``, single-label ``softmax(z / T)``; probabilities are first taken back to
    logits (``log(p / (1 - p))``, or ``log p`` for a single-label distribution). Rows without
    teacher scores (``has`` (B,) False) get ``labels`` (B, C) instead."""
    s = scores.float()
    if task == "singlelabel":
        z = s if kind == "logits" else torch.log(s.clamp_min(_EPS))
        t = torch.softmax(z / temperature, dim=1)
    elif kind == "probabilities" and temperature == 1.0:
        t = s.clamp(0.0, 1.0)
    else:
        z = s if kind == "logits" else torch.logit(s.clamp(_EPS, 1 - _EPS))
        t = torch.sigmoid(z / temperature)
    return torch.where(has[:, None], t, labels.float())


def distillation_loss(logits: torch.Tensor, labels: torch.Tensor, teacher: torch.Tensor, has: torch.Tensor,
                      weight: float, temperature: float, task: str = "multilabel") -> torch.Tensor:
    """Scalar loss of (B, C) logits: per clip ``(1 - w h) label_loss + w h kd_loss``, averaged.

    labels, teacher: (B, C) soft targets (after smoothing and mixup); has: (B,) float in [0, 1],
    the clip's (mixed) share of teacher scores. With h = 0 everywhere this is exactly the label
    loss of ``loop.compute_loss``."""
    z = logits.float()
    if task == "singlelabel":
        label_loss = F.cross_entropy(z, labels, reduction="none")
        log_p = F.log_softmax(z / temperature, dim=1)
        kd = (teacher * (torch.log(teacher.clamp_min(1e-12)) - log_p)).sum(1) * temperature**2
    else:
        label_loss = F.binary_cross_entropy_with_logits(z, labels, reduction="none").mean(1)
        kd = F.binary_cross_entropy_with_logits(z, teacher, reduction="none").mean(1)
    w = weight * has.float()
    return ((1.0 - w) * label_loss + w * kd).mean()


# ------------------------------------------------------------------------------ teacher eval


def _eval_clips(shards: ShardSet) -> tuple[list[str], list[dict], list[list[int]]]:
    """(keys, metas, label lists) of every eval clip, from the shards' JSON members only."""
    keys, metas, labels = [], [], []
    for url in shards.urls:
        with tarfile.open(url, "r") as tar:
            for member in tar:
                if member.name.endswith("." + META_EXT):
                    meta = json.load(tar.extractfile(member))
                    keys.append(member.name[: -len(META_EXT) - 1].split("/")[-1])
                    labels.append(meta.pop("labels"))
                    metas.append(meta)
    return keys, metas, labels


def teacher_eval_metrics(table: TeacherTable, eval_set: ShardSet, task: str) -> dict[str, Any] | None:
    """The teacher's own mAP (multi-label) or accuracy (single-label) on the eval clips it
    scored: ``{"mAP" | "accuracy", "clips_scored", "clips"}``, or None when it scored none."""
    keys, metas, labels = _eval_clips(eval_set)
    rows, targets = [], []
    for key, meta, labs in zip(keys, metas, labels):
        r = teacher_row(table, key, meta)
        if r is not None:
            rows.append(np.asarray(r, np.float32))
            y = np.zeros(table.num_classes, np.float32)
            y[labs] = 1.0
            targets.append(y)
    if not rows:
        return None
    scores, y = np.stack(rows), np.stack(targets)
    out: dict[str, Any] = {"clips_scored": len(rows), "clips": len(keys)}
    if task == "singlelabel":
        out["accuracy"] = float(classification_metrics(y, scores)["accuracy"])
    else:
        out["mAP"] = float(tagging_metrics(y, scores)["mAP"])
    return out


def log_teacher_eval(table: TeacherTable | None, eval_set: ShardSet | None, task: str,
                     accelerator: Accelerator) -> dict[str, Any] | None:
    """Compute and log the teacher's eval metrics once (main process); None elsewhere or without scores."""
    if table is None or eval_set is None or not accelerator.is_main_process:
        return None
    result = teacher_eval_metrics(table, eval_set, task)
    if result is None:
        log.info("teacher: no scores for any eval clip (its own eval metrics are not known)")
        return None
    what = f"accuracy {result['accuracy']:.4f}" if "accuracy" in result else f"mAP {result['mAP']:.4f}"
    log.info(f"teacher on the eval shards: {what} over the {result['clips_scored']} of {result['clips']} eval clips "
             "it scored (what the student distils from)")
    return result


# ------------------------------------------------------------------------------ train step


def augment_with_teacher(batch: dict, x: torch.Tensor, y: torch.Tensor, cfg: Config, generator: torch.Generator,
                         pad_value: float, task: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The step's augmentation (same randomness as without a teacher) with the teacher's targets
    mixed like the labels: (x (B, 1, M, T), labels (B, C), teacher targets (B, C), h (B,))."""
    has = batch["has_teacher"].to(y.device)
    t = teacher_targets(batch["teacher"].to(y.device), has, y, cfg.distill.scores, cfg.distill.temperature, task)
    x, y, mixed = augment_batch(x, y, cfg.augment, generator, pad_value=pad_value,
                                mix_also=torch.cat([t, has.float()[:, None]], dim=1))
    return x, y, mixed[:, :-1], mixed[:, -1]


# ------------------------------------------------------------------------------ run counters


def count_teacher_missing(state: Any) -> None:
    """Add every rank's clips trained without teacher scores since the last call to
    ``state.progress.teacher_missing`` (one all-reduce; every rank must call it at the same point:
    at each log step and before each checkpoint, so a resumed run continues the count exactly).
    ``state``: the run's TrainState."""
    if state.teacher is None:
        return
    acc = state.accelerator
    n = acc.reduce(torch.tensor(float(state.teacher_missing_local), device=acc.device), reduction="sum").item()
    state.progress.teacher_missing += int(n)
    state.teacher_missing_local = 0


def teacher_summary(state: Any) -> dict[str, Any] | None:
    """The summary's ``teacher``: source, table, clips, the clips trained without its scores
    (also logged as a warning), and its own eval metrics. None without a teacher."""
    if state.teacher is None:
        return None
    p = state.progress
    if p.teacher_missing:
        log.warning(f"{p.teacher_missing} of {p.samples_seen} clips trained on had no teacher scores (labels only)")
    return {"source": state.cfg.distill.teacher, "table": str(state.teacher.root), "clips": len(state.teacher),
            "missing_clips_trained": p.teacher_missing, "clips_trained": p.samples_seen, "eval": state.teacher_eval}
