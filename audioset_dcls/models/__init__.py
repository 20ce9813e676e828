"""Audio backbones: registry (timm style), patch stem, DCLS-Gauss layer, surgery.

API (stable)::

    create_model(name, num_classes=527, drop_path_rate=0.0, **kwargs) -> nn.Module
        input (B, 1, 128, T) log-mel -> logits (B, num_classes)
    list_models(paper=False) -> list[str]      paper=True: the paper's six models
    model_info(name) -> ModelInfo             e.g. the paper's AudioSet mAP
    to_inference(model) -> nn.Module   DCLS layers baked into plain depthwise convs (in place, returned)
    param_groups(model, lr, weight_decay, dcls_lr_scale=5.0) -> list[dict]
"""

from __future__ import annotations

from . import convformer, convnext, fastvit  # noqa: F401  (register the variants)
from .dcls import DclsConv2d, build_gauss_kernel
from .registry import (
    ModelInfo,
    create_model,
    is_model,
    list_models,
    model_info,
    register_model,
)
from .surgery import (
    dcls_layers,
    find_depthwise_convs,
    load_timm_checkpoint,
    param_groups,
    replace_depthwise_with_dcls,
    shared_dcls_parameters,
    to_inference,
)

__all__ = [
    "create_model",
    "list_models",
    "is_model",
    "model_info",
    "ModelInfo",
    "register_model",
    "to_inference",
    "param_groups",
    "DclsConv2d",
    "build_gauss_kernel",
    "dcls_layers",
    "shared_dcls_parameters",
    "find_depthwise_convs",
    "replace_depthwise_with_dcls",
    "load_timm_checkpoint",
]
