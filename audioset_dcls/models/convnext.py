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

from timm.models.convnext import checkpoint_filter_fn
from torch import nn

from .registry import register_model
from .surgery import build_audio_model

__all__ = ["create_convnext"]


def create_convnext(
    timm_name: str,
    *,
    dcls: bool,
    layer_scale_init_value: float | None = 1e-6,
    **kwargs,
) -> nn.Module:
    """The timm ConvNeXt ``timm_name`` with the patch stem (with bias, at ``stem.0``; its
    LayerNorm kept), and DCLS in place of every 7x7 depthwise conv if ``dcls``:
    (B, 1, 128, T) -> (B, num_classes).

    Other keyword arguments: see :func:`surgery.build_audio_model` (``num_classes``,
    ``drop_path_rate``, ``pretrained_path``: a local timm or original FB ImageNet checkpoint of
    ``timm_name``, whose stem conv, classifier and, with ``dcls``, 7x7 kernels are not used).
    """
    return build_audio_model(timm_name, dcls=dcls, stem_path="stem.0", stem_bias=True,
                             filter_fn=checkpoint_filter_fn, ls_init_value=layer_scale_init_value, **kwargs)


@register_model
def convnext_atto(**kwargs) -> nn.Module:
    """Tiny ConvNeXt (3.7M params at 1000 classes) for CPU tests and smoke runs."""
    return create_convnext("convnext_atto", dcls=False, **kwargs)


@register_model
def convnext_atto_dcls(**kwargs) -> nn.Module:
    """convnext_atto with DCLS-Gauss (12 layers replaced), for CPU tests and smoke runs."""
    return create_convnext("convnext_atto", dcls=True, **kwargs)


@register_model(paper_map="44.83 ± 0.14")
def convnext_tiny(**kwargs) -> nn.Module:
    """ConvNeXt-T baseline of the paper (7x7 depthwise)."""
    return create_convnext("convnext_tiny", dcls=False, **kwargs)


@register_model(paper_map="45.52 ± 0.05")
def convnext_tiny_dcls(**kwargs) -> nn.Module:
    """ConvNeXt-T with DCLS-Gauss (18 layers, 26 elements in 23x23), the paper's best model."""
    return create_convnext("convnext_tiny", dcls=True, **kwargs)
