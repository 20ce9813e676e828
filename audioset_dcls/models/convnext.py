"""ConvNeXt for audio (Liu et al., "A ConvNet for the 2020s", CVPR 2022), with the DCLS variant of
Khalfaoui-Hassani et al. ("Audio classification with Dilated Convolution with Learnable Spacings",
2023).

timm's ConvNeXt already computes what the reference (facebookresearch ConvNeXt, as used by
DCLS-Audio) computes: LayerNorm eps 1e-6 everywhere, conv biases, layer-scale gamma (init 1e-6),
global average pool -> LayerNorm -> Linear head. Only the stem changes: ``stem.0`` becomes the
(2, 16) patch conv (with bias), its LayerNorm is kept. Parameter counts equal the reference's
exactly (28,223,855 / 28,221,263 for T with 527 classes).
"""

from __future__ import annotations

import timm
import torch
from timm.models.convnext import checkpoint_filter_fn
from torch import nn

from .registry import register_model
from .surgery import find_depthwise_convs, load_timm_checkpoint, make_patch_stem, replace_depthwise_with_dcls, replace_module

__all__ = ["create_convnext"]


def create_convnext(
    timm_name: str,
    *,
    dcls: bool,
    num_classes: int = 527,
    drop_path_rate: float = 0.0,
    pretrained_path: str | None = None,
    layer_scale_init_value: float | None = 1e-6,
    kernel_count: int = 26,
    dilated_kernel_size: int = 23,
    **kwargs,
) -> nn.Module:
    """The timm ConvNeXt ``timm_name`` with the patch stem, and DCLS in place of every 7x7
    depthwise conv if ``dcls``: (B, 1, 128, T) -> (B, num_classes).

    ``pretrained_path``: a local timm (or original FB) ImageNet checkpoint of ``timm_name``; every
    tensor but the stem conv and the classifier is loaded (with ``dcls`` the 7x7 depthwise
    kernels are then discarded too).
    """
    model = timm.create_model(
        timm_name, pretrained=False, in_chans=1, num_classes=num_classes, drop_path_rate=drop_path_rate,
        ls_init_value=layer_scale_init_value, **kwargs,
    )
    if pretrained_path is not None:
        load_timm_checkpoint(model, pretrained_path, filter_fn=checkpoint_filter_fn)
    stem = model.get_submodule("stem.0")
    replace_module(model, "stem.0", make_patch_stem(1, stem.out_channels, bias=True))
    if dcls:
        replace_depthwise_with_dcls(model, find_depthwise_convs(model, 7), kernel_count, dilated_kernel_size)
    return model.to(memory_format=torch.channels_last)  # see surgery.PatchStem


@register_model
def convnext_atto(**kwargs) -> nn.Module:
    """Tiny ConvNeXt (3.7M params at 1000 classes) for CPU tests and smoke runs."""
    return create_convnext("convnext_atto", dcls=False, **kwargs)


@register_model
def convnext_atto_dcls(**kwargs) -> nn.Module:
    """convnext_atto with DCLS-Gauss (12 layers replaced), for CPU tests and smoke runs."""
    return create_convnext("convnext_atto", dcls=True, **kwargs)


@register_model
def convnext_tiny(**kwargs) -> nn.Module:
    """ConvNeXt-T baseline of the paper (7x7 depthwise)."""
    return create_convnext("convnext_tiny", dcls=False, **kwargs)


@register_model
def convnext_tiny_dcls(**kwargs) -> nn.Module:
    """ConvNeXt-T with DCLS-Gauss (18 layers, 26 elements in 23x23), the paper's best model."""
    return create_convnext("convnext_tiny", dcls=True, **kwargs)
