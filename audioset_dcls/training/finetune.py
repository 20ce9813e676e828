"""Start training from trained weights: ``model.init`` and ``model.freeze_backbone``.

``model.init`` is any checkpoint reference (:mod:`audioset_dcls.hub.references`: a published
name, an inference checkpoint, a run folder or a step folder). :func:`init_from_checkpoint` loads every tensor of the new model
whose name and shape the source has. The classifier head (timm's ``pretrained_cfg["classifier"]``)
is left at its fresh init when the source's has another shape (another class count) or other
label names; any other tensor the source lacks or has in another shape (stem, backbone: another
architecture) is an error naming them, never a silent partial load. :class:`InitReport` says
exactly what was loaded and what was re-initialised (logged, and written to the run directory).

``model.freeze_backbone`` trains the head only (a linear probe, :func:`freeze_backbone`): the rest
stops taking gradients and stays in eval mode (no drop path, no batch-norm updates).

Small sets (issue 22, docs/finetune.md "Small sets"): :func:`lr_param_groups` gives the new head
``optim.head_lr_scale`` x the lr and, with ``optim.layer_decay`` < 1, each block ``decay**n`` of
it, n blocks below the head (layer-wise lr decay of BEiT, arXiv:2106.08254, and BEATs,
arXiv:2212.09058; the head scale as in AST, arXiv:2104.01778); :func:`scale_for_small_set` scales
augmentation and drop path with the clip count (``augment.full_strength_clips``);
:func:`resolve_warmup` reads ``schedule.warmup_fraction``.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch
from safetensors.torch import load_file
from torch import nn

from ..config import Config, OptimConfig, ScheduleConfig
from ..files import write_text
from ..hub.checkpoint import CheckpointError, load_checkpoint
from ..hub.references import CheckpointRef

__all__ = ["InitReport", "read_init_weights", "init_from_checkpoint", "head_prefix", "freeze_backbone",
           "set_train_mode", "write_report", "lr_param_groups", "layer_ids", "scale_for_small_set",
           "resolve_warmup", "small_set_line"]


@dataclass
class InitReport:
    """What :func:`init_from_checkpoint` did, by state-dict key."""

    source: str  # model.init as given
    path: str  # the file read
    source_model: str | None  # the model name the source describes (inference checkpoints)
    source_classes: int | None
    loaded: list[str] = field(default_factory=list)
    reinitialised: list[str] = field(default_factory=list)  # the head, left at its fresh init
    why_head: str = ""  # why the head was re-initialised ("" when it was loaded)

    def summary(self) -> str:
        """One log line."""
        head = (f"re-initialised the classifier ({', '.join(self.reinitialised)}): {self.why_head}"
                if self.reinitialised else "classifier loaded too (same classes)")
        return (f"model.init={self.source} ({self.path}): loaded {len(self.loaded)} of "
                f"{len(self.loaded) + len(self.reinitialised)} tensors; {head}")

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def head_prefix(model: nn.Module) -> str:
    """State-dict prefix of the classifier (``"head.fc."``), from timm's pretrained config."""
    classifier = getattr(model, "pretrained_cfg", {}).get("classifier")
    if not classifier:
        raise CheckpointError(f"{type(model).__name__}: no classifier named in its pretrained_cfg")
    return classifier + "."


def read_init_weights(ref: CheckpointRef) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """``(state_dict, description)`` of a resolved checkpoint reference. The description has
    ``model``, ``num_classes`` and ``labels`` when the source says (inference checkpoints), else
    it is empty (training checkpoints)."""
    if ref.kind == "training":
        return _read_training_weights(ref.weights_file), {}
    state, info = load_checkpoint(ref.path)
    return state, {"model": info.model_name, "num_classes": info.num_classes, "labels": info.label_names}


def _read_training_weights(path: Path) -> dict[str, torch.Tensor]:
    try:
        if path.suffix == ".safetensors":
            return load_file(str(path), device="cpu")
        return torch.load(str(path), map_location="cpu", weights_only=True)  # never runs code
    except Exception as err:
        reason = " ".join(str(err).split())[:300] or type(err).__name__
        raise CheckpointError(f"{path}: cannot read the weights: {reason}") from None


def init_from_checkpoint(model: nn.Module, ref: CheckpointRef,
                         label_names: Sequence[str] | None = None) -> InitReport:
    """Load into ``model`` every tensor of the checkpoint ``ref`` names whose name and shape fit.

    The classifier is kept at its init when the source's has another shape, or other
    ``label_names`` (when both sides have names). CheckpointError, one line naming the tensors,
    when anything else does not fit.
    """
    state, desc = read_init_weights(ref)
    state = {k.removeprefix("module."): v for k, v in state.items()}
    own = model.state_dict()
    head = head_prefix(model)
    report = InitReport(ref.given, str(ref.weights_file), desc.get("model"), desc.get("num_classes"))
    head_keys = [k for k in own if k.startswith(head)]
    src_head = {k: v for k, v in state.items() if k.startswith(head)}
    if report.source_classes is None and head + "weight" in src_head:  # training checkpoints: from the head
        report.source_classes = int(src_head[head + "weight"].shape[0])
    fits = all(k in state and state[k].shape == own[k].shape for k in head_keys)
    if not fits:
        report.why_head = f"{report.source_classes} classes in the source, {own[head_keys[0]].shape[0]} here"
    elif label_names and desc.get("labels") and list(desc["labels"]) != list(label_names):
        report.why_head = "the same number of classes, but other label names"
    problems = []
    for k, v in own.items():
        if k.startswith(head):
            continue
        if k not in state:
            problems.append(f"{k} missing")
        elif state[k].shape != v.shape:
            problems.append(f"{k} {tuple(state[k].shape)} in the source, {tuple(v.shape)} here")
    problems += [f"{k} not in this model" for k in state if k not in own and not k.startswith(head)]
    if problems:
        where = "" if str(ref.weights_file) == ref.given else f" ({ref.weights_file})"
        what = f" (a {report.source_model})" if report.source_model else ""
        hint = f"model.name={report.source_model}" if report.source_model else "model.name to the source's model"
        raise CheckpointError(
            f"model.init={ref.given}{where}{what} does not fit this model's stem/backbone: "
            f"{'; '.join(problems[:4])}" + (f"; and {len(problems) - 4} more" if len(problems) > 4 else "")
            + f"; set {hint}")
    load = {k: state[k] for k in own if not (k.startswith(head) and report.why_head)}
    model.load_state_dict(load, strict=False)
    report.loaded = sorted(load)
    report.reinitialised = sorted(k for k in head_keys if k not in load)
    return report


def freeze_backbone(model: nn.Module) -> list[str]:
    """Stop gradients everywhere but the classifier; returns the names still trained."""
    head = head_prefix(model)
    trained = []
    for name, p in model.named_parameters():
        p.requires_grad_(name.startswith(head))
        if p.requires_grad:
            trained.append(name)
    return trained


def set_train_mode(model: nn.Module, frozen_backbone: bool) -> None:
    """Training mode; with a frozen backbone, only the classifier's modules train (the rest in
    eval mode: no drop path, batch norms keep their statistics)."""
    if not frozen_backbone:
        model.train()
        return
    model.eval()
    model.get_submodule(head_prefix(model)[:-1]).train()


def write_report(path: Path, report: InitReport) -> None:
    """``init.json``: the report with every tensor by name, written atomically."""
    write_text(path, json.dumps(report.to_dict(), indent=1) + "\n")


# --------------------------------------------------------------------------- small sets (issue 22)


def layer_ids(model: nn.Module) -> tuple[dict[str, int], int]:
    """``({parameter name: depth}, number of depths)``: timm's fine-grained ``group_matcher``
    (stem 0, one per block, the head last); a model without one is a single depth."""
    names = [n for n, _ in model.named_parameters()]
    matcher = getattr(model, "group_matcher", None)
    if matcher is None:
        return {n: 0 for n in names}, 1
    from timm.models import group_parameters

    groups = group_parameters(model, matcher(coarse=False))
    ids = {n: i for i, (_, members) in enumerate(sorted(groups.items())) for n in members}
    return {n: ids.get(n, len(groups) - 1) for n in names}, len(groups)


def lr_param_groups(model: nn.Module, o: OptimConfig) -> list[dict]:
    """``models.param_groups`` (decay / no decay / DCLS x dcls_lr_scale), each split by the lr
    scale of its tensors: the classifier (``head_prefix``) x ``head_lr_scale``; with
    ``layer_decay`` < 1, every other tensor x ``layer_decay ** (depths - 1 - depth)``
    (:func:`layer_ids`: the stem decays most, the last block least). Each group's ``lr_scale``
    is its ratio to ``optim.lr``; with both scales at 1 the groups are models.param_groups'."""
    from ..models import param_groups

    base = param_groups(model, lr=o.lr, weight_decay=o.weight_decay, dcls_lr_scale=o.dcls_lr_scale)
    if o.head_lr_scale == 1 and o.layer_decay == 1:
        return base
    name_of = {id(p): n for n, p in model.named_parameters()}
    depth, depths = layer_ids(model)
    head = head_prefix(model)
    out = []
    for g in base:
        split: dict[float, list] = {}
        for p in g["params"]:
            n = name_of[id(p)]
            scale = o.head_lr_scale if n.startswith(head) else o.layer_decay ** (depths - 1 - depth[n])
            split.setdefault(scale, []).append(p)
        for scale, params in sorted(split.items()):
            lr_scale = g["lr_scale"] * scale
            out.append({**g, "name": f"{g['name']} x{scale:.4g}", "params": params, "lr": o.lr * lr_scale,
                        "lr_scale": lr_scale})
    return out


def scale_for_small_set(cfg: Config, num_clips: int) -> tuple[Config, float]:
    """``(cfg, factor)``: with ``augment.full_strength_clips`` N > 0 and fewer training clips
    than N, every augmentation strength and ``model.drop_path_rate`` times ``num_clips / N``
    (mask counts rounded down); the result has ``full_strength_clips`` 0, so it is what was
    trained and scaling it again changes nothing. Factor 1 (cfg unchanged) otherwise."""
    a = cfg.augment
    if a.full_strength_clips <= 0 or num_clips >= a.full_strength_clips:
        return cfg, 1.0
    f = num_clips / a.full_strength_clips
    aug = dataclasses.replace(
        a, label_smoothing=a.label_smoothing * f, mixup_alpha=a.mixup_alpha * f,
        time_stretch_prob=a.time_stretch_prob * f, erase_prob=a.erase_prob * f,
        freq_masks=int(a.freq_masks * f), time_masks=int(a.time_masks * f), full_strength_clips=0)
    model = dataclasses.replace(cfg.model, drop_path_rate=cfg.model.drop_path_rate * f)
    return dataclasses.replace(cfg, augment=aug, model=model), f


def small_set_line(cfg: Config, num_clips: int, factor: float) -> str:
    """The log line saying what :func:`scale_for_small_set` did."""
    a = cfg.augment
    return (f"{num_clips} training clips: augmentation and drop path x {factor:.3g} (augment.full_strength_clips): "
            f"mixup_alpha {a.mixup_alpha:.3g}, label_smoothing {a.label_smoothing:.3g}, time_stretch_prob "
            f"{a.time_stretch_prob:.3g}, erase_prob {a.erase_prob:.3g}, drop_path_rate {cfg.model.drop_path_rate:.3g}")


def resolve_warmup(s: ScheduleConfig, total_steps: int, steps_per_epoch: int) -> int:
    """Warmup steps: ``warmup_steps`` (at most all of them) when > 0, else ``warmup_fraction``
    of all steps when > 0, else ``warmup_epochs`` epochs."""
    if s.warmup_steps > 0:
        return min(s.warmup_steps, total_steps)
    if s.warmup_fraction > 0:
        return round(s.warmup_fraction * total_steps)
    return round(s.warmup_epochs * steps_per_epoch)
