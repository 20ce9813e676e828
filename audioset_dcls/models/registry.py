"""Model registry, timm style: variant functions register themselves; one ``create_model``.

A variant may carry the AudioSet result the paper reports for it (``paper_map``), so "the paper's
models" is a query, ``list_models(paper=True)``, not a list copied into every script and test.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from torch import nn

__all__ = ["ModelInfo", "register_model", "create_model", "list_models", "is_model", "model_info"]


@dataclass(frozen=True)
class ModelInfo:
    """What the registry knows about a variant besides how to build it.

    ``paper_map``: AudioSet eval mAP (%) as "mean ± std" from Khalfaoui-Hassani et al. 2023,
    Table 1, or None for models that are not in the paper (the tiny smoke-test ones).
    """

    name: str
    paper_map: str | None = None

    @property
    def in_paper(self) -> bool:
        return self.paper_map is not None


_model_entrypoints: dict[str, Callable[..., nn.Module]] = {}
_model_infos: dict[str, ModelInfo] = {}


def register_model(fn: Callable[..., nn.Module] | None = None, *, paper_map: str | None = None):
    """Decorator: register a variant function under its own name, bare (``@register_model``) or
    with the paper's result (``@register_model(paper_map="45.52 ± 0.05")``)."""

    def register(f: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        name = f.__name__
        if name in _model_entrypoints:
            raise ValueError(f"model {name!r} registered twice")
        _model_entrypoints[name] = f
        _model_infos[name] = ModelInfo(name, paper_map)
        return f

    return register(fn) if fn is not None else register


def list_models(paper: bool = False) -> list[str]:
    """Names accepted by :func:`create_model`, sorted; ``paper=True``: only the paper's six
    (three backbones, each plain and with DCLS)."""
    return sorted(n for n in _model_entrypoints if not paper or _model_infos[n].in_paper)


def is_model(name: str) -> bool:
    return name in _model_entrypoints


def model_info(name: str) -> ModelInfo:
    """Registry metadata of ``name`` (ValueError for an unknown name)."""
    if name not in _model_infos:
        raise ValueError(f"unknown model {name!r}; choose from {list_models()}")
    return _model_infos[name]


def create_model(name: str, num_classes: int = 527, drop_path_rate: float = 0.0, **kwargs) -> nn.Module:
    """Build a registered audio model (random init unless ``pretrained_path=`` is given).

    The model maps a log-mel batch (B, 1, 128, T) to logits (B, num_classes); with T = 1001 the
    patch stem gives a 64 x 62 map. Extra keyword arguments go to the variant function (e.g.
    ``pretrained_path`` for a local timm ImageNet checkpoint, ``layer_scale_init_value``).
    """
    if name not in _model_entrypoints:
        raise ValueError(f"unknown model {name!r}; choose from {list_models()}")
    return _model_entrypoints[name](num_classes=num_classes, drop_path_rate=drop_path_rate, **kwargs)
