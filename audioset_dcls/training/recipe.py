"""The recipe's parts as plain functions: the model, param groups and optimizer, the learning-rate
schedule (a pure function of the step), gradient accumulation, EMA and the loss.

Everything here is a function of the config (and the model); the loop in :mod:`.loop` calls them.
"""

from __future__ import annotations

import copy
import itertools
import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..config import Config, ConfigError
from ..data import (
    ShardSet,
    labels_per_clip,
)
from ..models import create_model
from .finetune import lr_param_groups

__all__ = ["lr_at", "gradient_accumulation_steps", "build_model", "build_optimizer", "build_scheduler", "compute_loss", "resolve_task", "ModelEma", "model_kwargs"]

def lr_at(step: int, *, peak: float, total_steps: int, warmup_steps: int, warmup_lr: float = 0.0,
          min_lr: float = 0.0) -> float:
    """Learning rate for optimizer step ``step`` (0-based): linear warmup from ``warmup_lr`` to
    ``peak`` over ``warmup_steps``, then half a cosine from ``peak`` down to ``min_lr`` at
    ``total_steps``."""
    if step < warmup_steps:
        return warmup_lr + (peak - warmup_lr) * step / warmup_steps
    if step >= total_steps:
        return min_lr
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return min_lr + 0.5 * (peak - min_lr) * (1.0 + math.cos(math.pi * progress))


def gradient_accumulation_steps(global_batch: int, per_device_batch: int, num_processes: int) -> int:
    """Micro-steps per optimizer step so that per_device_batch x processes x accum == global_batch."""
    per_step = per_device_batch * num_processes
    if global_batch % per_step:
        raise ConfigError(
            f"optim.batch_size={global_batch} is not a multiple of data.batch_size x processes = "
            f"{per_device_batch} x {num_processes} = {per_step}; change data.batch_size or optim.batch_size"
        )
    return global_batch // per_step


def build_optimizer(model: nn.Module, cfg: Config) -> torch.optim.Optimizer:
    """AdamW or LAMB over models.param_groups (DCLS positions/widths: lr x dcls_lr_scale, no decay),
    split by the head's lr scale and layer-wise decay (finetune.lr_param_groups)."""
    o = cfg.optim
    groups = lr_param_groups(model, o)
    if o.name == "adamw":
        return torch.optim.AdamW(groups, lr=o.lr, betas=o.betas, eps=o.eps, weight_decay=o.weight_decay)
    # timm's LAMB (what the reference trains ConvFormer with): per-layer trust ratio, and a
    # global grad-norm clip at 1.0 built in, as in timm's defaults.
    from timm.optim import Lamb  # only the LAMB recipes need timm's optimizers

    return Lamb(groups, lr=o.lr, betas=o.betas, eps=o.eps, weight_decay=o.weight_decay)


class ModelEma(nn.Module):
    """Exponential moving average of a model's parameters and buffers (kept in fp32)."""

    def __init__(self, model: nn.Module, decay: float):
        super().__init__()
        self.decay = decay
        self.module = copy.deepcopy(model).eval().requires_grad_(False)

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        # parameters()/buffers() list each tensor once; state_dict() would repeat the DCLS
        # positions and widths shared by a stage under every layer's key, and average them
        # several times per step.
        mine = itertools.chain(self.module.parameters(), self.module.buffers())
        theirs = itertools.chain(model.parameters(), model.buffers())
        for e, m in zip(mine, theirs, strict=True):
            if e.dtype.is_floating_point:
                e.lerp_(m.detach().to(e.dtype), 1.0 - self.decay)
            else:
                e.copy_(m)


def build_model(cfg: Config, num_classes: int) -> nn.Module:
    """The network ``cfg.model`` describes, freshly initialised from the global torch RNG (seed
    first for identical replicas). Maps (B, 1, n_mels, T) log-mels to (B, num_classes) logits."""
    return create_model(cfg.model.name, num_classes=num_classes, drop_path_rate=cfg.model.drop_path_rate,
                        **model_kwargs(cfg))


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: Config, total_steps: int,
                    warmup_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    """``lr_at`` per optimizer step, as a factor of each param group's own lr (DCLS x5 kept)."""
    peak, s = cfg.optim.lr, cfg.schedule

    def lr_factor(step: int) -> float:
        return lr_at(step, peak=peak, total_steps=total_steps, warmup_steps=warmup_steps, warmup_lr=s.warmup_lr,
                     min_lr=s.min_lr) / peak

    return torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor)


def compute_loss(logits: torch.Tensor, targets: torch.Tensor, task: str = "multilabel") -> torch.Tensor:
    """Mean binary cross-entropy of (B, C) logits against (B, C) soft multi-hot targets, or, for
    ``task="singlelabel"``, softmax cross-entropy against (B, C) soft one-hot targets (label
    smoothing and mixup keep each row a distribution); in fp32 whatever the autocast dtype.
    Returns a scalar."""
    if task == "singlelabel":
        return F.cross_entropy(logits.float(), targets)
    return F.binary_cross_entropy_with_logits(logits.float(), targets)


def resolve_task(task: str, train_set: ShardSet) -> str:
    """``train.task`` -> "multilabel" or "singlelabel" ("auto": singlelabel when every training
    clip has exactly one label). ConfigError for singlelabel on clips with several labels."""
    if task == "multilabel":
        return task
    fewest, most = labels_per_clip(train_set)
    if task == "auto":
        return "singlelabel" if fewest == most == 1 else "multilabel"
    if most > 1:
        raise ConfigError(f"train.task=singlelabel, but {train_set.root} has clips with up to {most} labels; "
                          "use train.task=multilabel (or auto)")
    return task


def model_kwargs(cfg: Config) -> dict[str, Any]:
    kw = {} if cfg.model.layer_scale_init_value is None else {"layer_scale_init_value": cfg.model.layer_scale_init_value}
    kw.update(cfg.model.kwargs)
    return kw
