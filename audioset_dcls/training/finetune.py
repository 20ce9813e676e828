"""Start training from trained weights: ``model.init`` and ``model.freeze_backbone``.

``model.init`` names an inference checkpoint (``model.safetensors``), a training checkpoint
(``checkpoints/step_N``, or a run directory: its ``model.safetensors`` when finished, else its
latest checkpoint) or a published model name (``convnext_tiny_dcls``, fetched and cached by
:mod:`audioset_dcls.hub.pretrained`). :func:`init_from_checkpoint` loads every tensor of the new model
whose name and shape the source has. The classifier head (timm's ``pretrained_cfg["classifier"]``)
is left at its fresh init when the source's has another shape (another class count) or other
label names; any other tensor the source lacks or has in another shape (stem, backbone: another
architecture) is an error naming them, never a silent partial load. :class:`InitReport` says
exactly what was loaded and what was re-initialised (logged, and written to the run directory).

``model.freeze_backbone`` trains the head only (a linear probe, :func:`freeze_backbone`): the rest
stops taking gradients and stays in eval mode (no drop path, no batch-norm updates).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import nn

from ..hub.checkpoint import CheckpointError, load_checkpoint

__all__ = ["InitReport", "read_init_weights", "init_from_checkpoint", "head_prefix", "freeze_backbone",
           "set_train_mode", "write_report"]

# What accelerate's save_state names the (first) model's weights in a training checkpoint.
_TRAINING_WEIGHTS = ("model.safetensors", "pytorch_model.bin")


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


def read_init_weights(path: str | Path) -> tuple[dict[str, torch.Tensor], Path, dict[str, Any]]:
    """``(state_dict, file read, description)`` of an inference checkpoint file or a training
    checkpoint / run directory. The description has ``model`` and ``labels`` when the source
    says (inference checkpoints), else it is empty."""
    path = Path(path)
    if path.is_dir():
        if (path / "model.safetensors").is_file() and (path / "summary.json").is_file():
            path = path / "model.safetensors"  # a finished run: its exported (eval) weights
        else:
            if (path / "checkpoints").is_dir():
                from .loop import find_checkpoint

                found = find_checkpoint(path)
                if found is None:
                    raise CheckpointError(f"{path}: a run directory without a checkpoint")
                path = found
            files = [path / n for n in _TRAINING_WEIGHTS if (path / n).is_file()]
            if not files:
                raise CheckpointError(f"{path}: no {' or '.join(_TRAINING_WEIGHTS)}: not a training checkpoint")
            return _read_training_weights(files[0]), files[0], {}
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint file or directory")
    state, info = load_checkpoint(path)
    return state, path, {"model": info.model_name, "num_classes": info.num_classes, "labels": info.label_names}


def _read_training_weights(path: Path) -> dict[str, torch.Tensor]:
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(str(path), device="cpu")
        return torch.load(str(path), map_location="cpu", weights_only=True)  # never runs code
    except Exception as err:
        reason = " ".join(str(err).split())[:300] or type(err).__name__
        raise CheckpointError(f"{path}: cannot read the weights: {reason}") from None


def init_from_checkpoint(model: nn.Module, source: str, path: str | Path,
                         label_names: Sequence[str] | None = None) -> InitReport:
    """Load into ``model`` every tensor of the checkpoint at ``path`` whose name and shape fit.

    The classifier is kept at its init when the source's has another shape, or other
    ``label_names`` (when both sides have names). CheckpointError, one line naming the tensors,
    when anything else does not fit. ``source`` is ``model.init`` as given, for messages.
    """
    state, read, desc = read_init_weights(path)
    state = {k.removeprefix("module."): v for k, v in state.items()}
    own = model.state_dict()
    head = head_prefix(model)
    report = InitReport(source, str(read), desc.get("model"), desc.get("num_classes"))
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
        where = "" if str(read) == str(source) else f" ({read})"
        what = f" (a {report.source_model})" if report.source_model else ""
        hint = f"model.name={report.source_model}" if report.source_model else "model.name to the source's model"
        raise CheckpointError(
            f"model.init={source}{where}{what} does not fit this model's stem/backbone: "
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
    from ..files import write_text

    write_text(path, json.dumps(report.to_dict(), indent=1) + "\n")
