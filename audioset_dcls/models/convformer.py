"""ConvFormer for audio (Yu et al., "MetaFormer Baselines for Vision", TPAMI 2023), with the DCLS
variant of Khalfaoui-Hassani et al. ("Audio classification with Dilated Convolution with Learnable
Spacings", 2023).

Built on timm's MetaFormer. Differences from the reference (DCLS-Audio ``models/metaformer.py``)
that change outputs, fixed here:

- stem: ``stem.conv`` becomes the (2, 16) patch conv *without* bias (reference), its bias-free
  LayerNorm (eps 1e-6) is kept;
- classifier: the reference ``MlpHead`` normalises with ``nn.LayerNorm`` at its default eps 1e-5,
  timm's uses 1e-6: set to 1e-5.

Everything else computes the same (bias-free LayerNorms eps 1e-6, StarReLU, res-scale in stages
3-4, SepConv with bias-free 7x7 depthwise on 2x channels, avg pool -> LayerNorm(1e-6) -> MlpHead).
timm's 1x1 convs hold the reference's ``nn.Linear`` weights as (out, in, 1, 1). Parameter counts
equal the reference's exactly (25,797,847 / 25,781,207 for S18 with 527 classes).
"""

from __future__ import annotations

from timm.models.metaformer import checkpoint_filter_fn
from torch import nn

from .registry import register_model
from .surgery import build_audio_model

__all__ = ["create_convformer"]

REFERENCE_HEAD_NORM_EPS = 1e-5  # nn.LayerNorm default, used by the reference MlpHead


def create_convformer(timm_name: str, *, dcls: bool, head_dropout: float = 0.0, **kwargs) -> nn.Module:
    """The timm ConvFormer ``timm_name`` with the patch stem (bias-free, at ``stem.conv``; its
    LayerNorm kept), the reference head norm, and DCLS in place of every 7x7 depthwise conv if
    ``dcls``: (B, 1, 128, T) -> (B, num_classes).

    ``head_dropout``: dropout inside the MLP head (the reference's ``head_dropout``). Other
    keyword arguments: see :func:`surgery.build_audio_model` (``pretrained_path``: a local timm
    or original sail-sg ImageNet checkpoint of ``timm_name``).
    """

    def adapt(model: nn.Module) -> None:
        model.get_submodule("head.fc.norm").eps = REFERENCE_HEAD_NORM_EPS
        # timm's MetaFormer silently ignores unknown kwargs, so set the MLP head's dropout here
        model.get_submodule("head.fc.head_drop").p = head_dropout

    return build_audio_model(timm_name, dcls=dcls, stem_path="stem.conv", stem_bias=False,
                             filter_fn=checkpoint_filter_fn, adapt=adapt, **kwargs)


@register_model(paper_map="43.14 ± 0.03")
def convformer_s18(**kwargs) -> nn.Module:
    """ConvFormer-S18 baseline of the paper (7x7 depthwise in the SepConv token mixer)."""
    return create_convformer("convformer_s18", dcls=False, **kwargs)


@register_model(paper_map="43.68 ± 0.02")
def convformer_s18_dcls(**kwargs) -> nn.Module:
    """ConvFormer-S18 with DCLS-Gauss (18 token-mixer convs, 26 elements in 23x23)."""
    return create_convformer("convformer_s18", dcls=True, **kwargs)
