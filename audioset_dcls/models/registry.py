"""Model registry, timm style: variant functions register themselves; one ``create_model``."""

from __future__ import annotations

from typing import Callable

from torch import nn

__all__ = ["register_model", "create_model", "list_models", "is_model"]

_model_entrypoints: dict[str, Callable[..., nn.Module]] = {}


def register_model(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
    """Decorator: register a variant function under its own name."""
    name = fn.__name__
    if name in _model_entrypoints:
        raise ValueError(f"model {name!r} registered twice")
    _model_entrypoints[name] = fn
    return fn


def list_models() -> list[str]:
    """Names accepted by :func:`create_model`, sorted."""
    return sorted(_model_entrypoints)


def is_model(name: str) -> bool:
    return name in _model_entrypoints


def create_model(name: str, num_classes: int = 527, drop_path_rate: float = 0.0, **kwargs) -> nn.Module:
    """Build a registered audio model (random init unless ``pretrained_path=`` is given).

    The model maps a log-mel batch (B, 1, 128, T) to logits (B, num_classes); with T = 1001 the
    patch stem gives a 64 x 62 map. Extra keyword arguments go to the variant function (e.g.
    ``pretrained_path`` for a local timm ImageNet checkpoint, ``layer_scale_init_value``).
    """
    if name not in _model_entrypoints:
        raise ValueError(f"unknown model {name!r}; choose from {list_models()}")
    return _model_entrypoints[name](num_classes=num_classes, drop_path_rate=drop_path_rate, **kwargs)
