"""FastViT for audio (Vasu et al., "FastViT: A Fast Hybrid Vision Transformer using Structural
Reparameterization", ICCV 2023), with the DCLS variant of Khalfaoui-Hassani et al. ("Audio
classification with Dilated Convolution with Learnable Spacings", 2023).

Built on timm's FastVit, which computes what the reference (DCLS-Audio ``models/fastvit.py``, from
apple/ml-fastvit) computes: MobileOne/RepMixer branches with BatchNorm (eps 1e-5), layer scales
(C, 1, 1), ConvFFN with a bias-free 7x7 depthwise conv + BN, RepCPE with bias, no activation after
the large-kernel downsampling conv, final MobileOne conv with SE then avg pool -> Linear.
Differences handled here:

- stem: the whole MobileOne stem (3 blocks) is replaced by the (2, 16) patch conv *without* bias,
  as in the reference;
- the model runs channels_last, like every model here (see ``surgery.PatchStem``);
- it is never reparameterised: the reference trains and evaluates the multi-branch form, and
  reparameterising the RepCPE would read a DCLS layer as a 7x7 kernel. Every module's
  ``reparameterize`` raises instead (timm's ``reparameterize_model`` included).

Parameter counts equal the reference's exactly (21,064,015 / 21,016,655 for SA24, 527 classes).
The DCLS variant replaces the 24 ConvFFN depthwise convs and the RepCPE conv (25); the RepCPE
(with its bias) shares positions with the blocks of stage 4, as in the reference.
"""

from __future__ import annotations

from timm.models.fastvit import checkpoint_filter_fn
from torch import nn

from .registry import register_model
from .surgery import build_audio_model

__all__ = ["create_fastvit", "guard_against_reparameterize"]


class RefuseReparameterize:
    """Stands in for ``module.reparameterize`` on our FastViT models (picklable, deep-copyable)."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __call__(self, *args, **kwargs):
        raise RuntimeError(
            f"{self.path or 'model'}: audioset_dcls FastViT models are never reparameterised (the reference "
            "trains and evaluates the multi-branch form; a DCLS RepCPE cannot be folded); use "
            "audioset_dcls.models.to_inference() to bake the DCLS layers instead"
        )


def guard_against_reparameterize(model: nn.Module) -> int:
    """Make every ``reparameterize`` method of ``model``'s modules raise. Returns how many."""
    count = 0
    for path, module in model.named_modules():
        if callable(getattr(module, "reparameterize", None)):
            module.reparameterize = RefuseReparameterize(path)
            count += 1
    return count


def create_fastvit(timm_name: str, *, dcls: bool, layer_scale_init_value: float = 1e-5, **kwargs) -> nn.Module:
    """The timm FastViT ``timm_name`` with the patch stem (bias-free, in place of the whole
    MobileOne stem), reparameterisation disabled, and DCLS in place of every 7x7 depthwise conv
    if ``dcls``: (B, 1, 128, T) -> (B, num_classes), channels_last.

    Other keyword arguments: see :func:`surgery.build_audio_model` (``pretrained_path``: a local
    timm or original apple ImageNet checkpoint of ``timm_name``, multi-branch, not
    reparameterised; the stem and the classifier are not used).
    """
    model = build_audio_model(
        timm_name, dcls=dcls, stem_path="stem", stem_bias=False, filter_fn=checkpoint_filter_fn,
        stem_channels=lambda m: m.stages[0].blocks[0].mlp.fc2.out_channels,
        layer_scale_init_value=layer_scale_init_value, **kwargs,
    )
    guard_against_reparameterize(model)
    return model


@register_model(paper_map="43.82 ± 0.05")
def fastvit_sa24(**kwargs) -> nn.Module:
    """FastViT-SA24 baseline of the paper (7x7 depthwise ConvFFN and RepCPE)."""
    return create_fastvit("fastvit_sa24", dcls=False, **kwargs)


@register_model(paper_map="44.40 ± 0.07")
def fastvit_sa24_dcls(**kwargs) -> nn.Module:
    """FastViT-SA24 with DCLS-Gauss (24 ConvFFN convs + the RepCPE conv = 25)."""
    return create_fastvit("fastvit_sa24", dcls=True, **kwargs)
