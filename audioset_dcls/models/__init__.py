"""Model registry (timm style). PLACEHOLDER written by the lead so other parts can import the API;
the backbone work replaces it with the real registry (stem swap + DCLS surgery).

API (stable):
    create_model(name, num_classes=527, **kwargs) -> nn.Module   input (B, 1, 128, T) -> logits (B, num_classes)
    list_models() -> list[str]
    to_inference(model) -> nn.Module   DCLS layers baked into plain depthwise convs (in place, returned)
    param_groups(model, lr, weight_decay, dcls_lr_scale=5.0) -> list[dict]
"""

from __future__ import annotations

import timm
import torch
from torch import nn

_TIMM_NAMES = {"convnext_atto": "convnext_atto", "convnext_tiny": "convnext_tiny"}


def list_models() -> list[str]:
    return sorted(_TIMM_NAMES)


def create_model(name: str, num_classes: int = 527, drop_path_rate: float = 0.0, **kwargs) -> nn.Module:
    if name not in _TIMM_NAMES:
        raise ValueError(f"unknown model {name!r}; choose from {list_models()}")
    model = timm.create_model(_TIMM_NAMES[name], pretrained=False, in_chans=1, num_classes=num_classes,
                              drop_path_rate=drop_path_rate, **kwargs)
    c0 = model.stem[0].out_channels
    model.stem[0] = nn.Conv2d(1, c0, kernel_size=(2, 16), stride=(2, 16))
    return model


def to_inference(model: nn.Module) -> nn.Module:
    return model


def param_groups(model: nn.Module, lr: float, weight_decay: float, dcls_lr_scale: float = 5.0) -> list[dict]:
    decay, no_decay = [], []
    for n, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.ndim <= 1 else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay, "lr": lr},
            {"params": no_decay, "weight_decay": 0.0, "lr": lr}]
