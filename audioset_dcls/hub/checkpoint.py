"""Self-describing inference checkpoints: one ``.safetensors`` file that needs nothing else.

The weights are stored in training form (DCLS positions and widths kept, so the file can be
fine-tuned); the JSON description sits in the safetensors header under the key
``audioset_dcls``::

    {"format": "audioset_dcls.inference/1",
     "model": {"name": "convnext_tiny_dcls", "num_classes": 527, "kwargs": {}},
     "features": FeatureConfig.to_dict(),
     "normalization": {"mean": -18.2696, "std": 30.5735},
     "labels": [{"index": 0, "mid": "/m/09x0r", "name": "Speech"}, ...],
     "task": "multilabel",   # or "singlelabel": scores are softmax probabilities (absent: multilabel)
     "thresholds": {"values": [0.31, ...], ...},    # optional: calibrated per-class thresholds
     "extra": {... anything else: training config, eval results ...}}

``thresholds`` (present once a training run's final evaluation or ``evaluate --calibrate`` has
calibrated them) holds one operating threshold per class and where they come from
(``evaluate.thresholds_record``); ``infer.py --threshold auto`` uses them.

Loading never unpickles: safetensors holds tensors only.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from ..features import FeatureConfig, Normalization
from ..files import atomic_path

FORMAT = "audioset_dcls.inference/1"
TASKS = ("multilabel", "singlelabel")
METADATA_KEY = "audioset_dcls"

__all__ = ["TASKS", "probabilities", "CheckpointError", "CheckpointInfo", "save_inference_checkpoint",
           "read_checkpoint_info", "load_checkpoint", "load_model", "store_thresholds"]


class CheckpointError(ValueError):
    """A checkpoint (inference file or training state) is missing, unreadable or does not fit;
    the message names the path and what to do."""


@dataclass
class CheckpointInfo:
    """Everything a checkpoint says about itself, besides the weights."""

    model_name: str
    num_classes: int
    features: FeatureConfig = field(default_factory=FeatureConfig)
    normalization: Normalization = field(default_factory=Normalization)
    labels: list[dict[str, Any]] = field(default_factory=list)  # [{"index", "mid", "name"}]
    model_kwargs: dict[str, Any] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)
    task: str = "multilabel"  # "singlelabel": one class per clip, scores are softmax probabilities
    thresholds: dict[str, Any] | None = None  # {"values": [C floats], ...}: calibrated per class

    @property
    def label_names(self) -> list[str]:
        return [lab["name"] for lab in self.labels]

    @property
    def class_thresholds(self) -> list[float] | None:
        """The calibrated per-class thresholds (C values), or None when there are none."""
        return None if self.thresholds is None else [float(v) for v in self.thresholds["values"]]

    def to_dict(self) -> dict[str, Any]:
        d = {
            "format": FORMAT,
            "model": {"name": self.model_name, "num_classes": self.num_classes, "kwargs": self.model_kwargs},
            "features": self.features.to_dict(),
            "normalization": self.normalization.to_dict(),
            "labels": self.labels,
            "task": self.task,
            "extra": self.extra,
        }
        if self.thresholds is not None:
            d["thresholds"] = self.thresholds
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any], source: str = "checkpoint") -> "CheckpointInfo":
        if d.get("format") != FORMAT:
            raise CheckpointError(f"{source}: not an audioset_dcls inference checkpoint (format {d.get('format')!r})")
        info = cls(
            model_name=d["model"]["name"],
            num_classes=int(d["model"]["num_classes"]),
            model_kwargs=dict(d["model"].get("kwargs", {})),
            features=FeatureConfig.from_dict(d["features"]),
            normalization=Normalization.from_dict(d["normalization"]),
            labels=list(d.get("labels", [])),
            extra=dict(d.get("extra", {})),
            task=d.get("task", "multilabel"),
            thresholds=d.get("thresholds"),
        )
        if info.task not in TASKS:
            raise CheckpointError(f"{source}: unknown task {info.task!r} (multilabel or singlelabel)")
        if info.labels and len(info.labels) != info.num_classes:
            raise CheckpointError(f"{source}: {len(info.labels)} label names for {info.num_classes} classes")
        if info.thresholds is not None and len(info.thresholds.get("values", ())) != info.num_classes:
            raise CheckpointError(f"{source}: {len(info.thresholds.get('values', ()))} calibrated thresholds for "
                                  f"{info.num_classes} classes")
        return info


def probabilities(logits: torch.Tensor, task: str = "multilabel") -> torch.Tensor:
    """(B, C) logits -> float32 scores as a checkpoint of ``task`` means them: sigmoid per class
    (multilabel), or softmax over the classes (singlelabel: each row sums to 1)."""
    if task not in TASKS:
        raise ValueError(f"task must be one of {TASKS}, not {task!r}")
    return torch.softmax(logits.float(), dim=-1) if task == "singlelabel" else torch.sigmoid(logits.float())


def save_inference_checkpoint(path: str | Path, state_dict: dict[str, torch.Tensor], info: CheckpointInfo) -> Path:
    """Write weights + description atomically (temp file, then rename)."""
    path = Path(path)
    # safetensors refuses shared storage; DCLS layers of a stage share one positions tensor,
    # which appears under several keys: store each key's own contiguous copy.
    tensors = {k: v.detach().cpu().contiguous().clone() for k, v in state_dict.items()}
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata={METADATA_KEY: json.dumps(info.to_dict())})
        # safetensors creates files 0600 whatever the umask; a model is meant to be shared.
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
    return path


def read_checkpoint_info(path: str | Path) -> CheckpointInfo:
    """Read only the description (cheap: the safetensors header)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such checkpoint")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
    except Exception as err:
        raise CheckpointError(
            f"{path}: not a safetensors file ({err}); convert other checkpoints with "
            "`python -m audioset_dcls convert`"
        ) from None
    if METADATA_KEY not in meta:
        raise CheckpointError(f"{path}: safetensors file without an audioset_dcls description")
    return CheckpointInfo.from_dict(json.loads(meta[METADATA_KEY]), source=str(path))


def load_checkpoint(path: str | Path) -> tuple[dict[str, torch.Tensor], CheckpointInfo]:
    """Return ``(state_dict, info)`` on the CPU."""
    info = read_checkpoint_info(path)
    return load_file(str(path), device="cpu"), info


def load_model(
    path: str | Path, *, bake: bool = True, device: str | torch.device = "cpu"
) -> tuple[torch.nn.Module, CheckpointInfo]:
    """Build the model a checkpoint describes, load its weights, eval mode.

    With ``bake=True`` DCLS layers become plain depthwise convolutions (same outputs, no kernel
    construction per forward). Returns ``(model, info)``.
    """
    # Imported here: the model registry imports timm (seconds of start-up) that reading or
    # writing a checkpoint's description does not need.
    from ..models import create_model, to_inference

    state_dict, info = load_checkpoint(path)
    model = create_model(info.model_name, num_classes=info.num_classes, **info.model_kwargs)
    missing, unexpected = model.load_state_dict(state_dict, strict=False)
    if missing or unexpected:
        raise CheckpointError(
            f"{path}: weights do not fit {info.model_name}: missing {list(missing)[:5]}, "
            f"unexpected {list(unexpected)[:5]}"
        )
    model.eval()
    if bake:
        model = to_inference(model)
    return model.to(device), info


def store_thresholds(path: str | Path, thresholds: dict[str, Any]) -> Path:
    """Rewrite the checkpoint at ``path`` with ``thresholds`` (``{"values": [C floats], ...}``)
    in its description; weights and everything else unchanged. Atomic: a reader sees the old file
    or the new one."""
    state_dict, info = load_checkpoint(path)
    info.thresholds = thresholds
    CheckpointInfo.from_dict(info.to_dict(), source=str(path))  # the values fit the classes
    return save_inference_checkpoint(path, state_dict, info)
