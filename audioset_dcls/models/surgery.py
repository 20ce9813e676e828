"""Model surgery shared by all families: the patch stem, depthwise -> DCLS replacement (by module
path, never ``eval``), baking DCLS for inference, optimiser parameter groups, and loading a local
timm ImageNet checkpoint."""

from __future__ import annotations

from collections import OrderedDict
from pathlib import Path
from typing import Callable, Iterable

import timm
import torch
from torch import nn

from .dcls import DclsConv2d, make_shared_dcls_parameters

__all__ = [
    "PATCH_STEM_KERNEL",
    "PatchStem",
    "make_patch_stem",
    "replace_module",
    "find_depthwise_convs",
    "replace_depthwise_with_dcls",
    "dcls_layers",
    "shared_dcls_parameters",
    "to_inference",
    "param_groups",
    "load_timm_checkpoint",
    "build_audio_model",
]

# 128 mel x 1001 frames -> 64 x 62 patches: 2 mel bins x 16 frames (160 ms) per patch.
PATCH_STEM_KERNEL = (2, 16)


class PatchStem(nn.Conv2d):
    """The shared patch stem, a Conv2d(in_chs, out_chs, (2, 16), stride (2, 16)) whose output is
    channels_last: (B, in_chs, 128, T) -> (B, out_chs, 64, floor(T / 16)).

    Why channels_last: with one input channel neither the input nor the (C0, 1, 2, 16) weight
    says which layout to use, so the stem would emit NCHW and the whole network would follow;
    on the CPU oneDNN's NCHW depthwise path for 23x23 kernels is ~10-50x slower than its NHWC
    one (7x7 kernels are fast either way). Same state_dict keys as a plain Conv2d.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x).contiguous(memory_format=torch.channels_last)


def make_patch_stem(in_chs: int, out_chs: int, bias: bool) -> PatchStem:
    """The (2, 16) patch stem (see :class:`PatchStem`), trunc-normal(0.02) init, bias 0:
    (B, in_chs, 128, T) -> (B, out_chs, 64, floor(T / 16)), channels_last."""
    conv = PatchStem(in_chs, out_chs, PATCH_STEM_KERNEL, stride=PATCH_STEM_KERNEL, bias=bias)
    nn.init.trunc_normal_(conv.weight, std=0.02)
    if conv.bias is not None:
        nn.init.zeros_(conv.bias)
    return conv


def replace_module(model: nn.Module, path: str, new: nn.Module) -> nn.Module:
    """Put ``new`` at dotted ``path`` (e.g. ``stages.0.blocks.1.conv_dw``); return the old module."""
    parent_path, _, name = path.rpartition(".")
    parent = model.get_submodule(parent_path) if parent_path else model
    old = parent.get_submodule(name)
    setattr(parent, name, new)
    return old


def find_depthwise_convs(model: nn.Module, kernel_size: int = 7) -> list[str]:
    """Paths of every depthwise ``nn.Conv2d`` (groups == in == out channels) with a square
    ``kernel_size`` kernel, in module order."""
    found = []
    for path, m in model.named_modules():
        if (
            type(m) is nn.Conv2d
            and m.groups == m.in_channels == m.out_channels
            and m.kernel_size == (kernel_size, kernel_size)
        ):
            found.append(path)
    return found


def stage_of(path: str) -> str:
    """Sharing group of a layer: its ``stages.N`` prefix (FastViT's ``stages.3.pos_emb`` shares
    with the blocks of stage 3, as in the reference)."""
    parts = path.split(".")
    if len(parts) < 2 or parts[0] != "stages":
        raise ValueError(f"{path}: cannot tell its stage (expected 'stages.N....')")
    return ".".join(parts[:2])


def replace_depthwise_with_dcls(
    model: nn.Module,
    paths: Iterable[str],
    kernel_count: int = 26,
    dilated_kernel_size: int = 23,
    share_key: Callable[[str], str] = stage_of,
) -> list[str]:
    """Replace the depthwise convs at ``paths`` by :class:`DclsConv2d` (same channels, stride and
    bias setting; padding ``dilated_kernel_size // 2``). Layers with the same ``share_key`` share
    one positions and one widths Parameter. Returns the replaced paths."""
    shared: dict[str, tuple[nn.Parameter, nn.Parameter]] = {}
    replaced = []
    for path in paths:
        conv = model.get_submodule(path)
        if not (isinstance(conv, nn.Conv2d) and conv.groups == conv.in_channels == conv.out_channels):
            raise TypeError(f"{path}: not a depthwise Conv2d ({conv!r})")
        channels = conv.out_channels
        key = share_key(path)
        if key not in shared:
            shared[key] = make_shared_dcls_parameters(channels, kernel_count, dilated_kernel_size)
        positions, widths = shared[key]
        if positions.shape[1] != channels:
            raise ValueError(f"{path}: {channels} channels, but its group {key} has {positions.shape[1]}")
        layer = DclsConv2d(
            channels, kernel_count, dilated_kernel_size, padding=dilated_kernel_size // 2,
            stride=conv.stride[0], bias=conv.bias is not None, positions=positions, widths=widths,
        ).to(device=conv.weight.device, dtype=conv.weight.dtype)
        replace_module(model, path, layer)
        replaced.append(path)
    return replaced


def dcls_layers(model: nn.Module) -> list[tuple[str, DclsConv2d]]:
    """(path, layer) for every DCLS layer, in module order."""
    return [(p, m) for p, m in model.named_modules() if isinstance(m, DclsConv2d)]


def shared_dcls_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The distinct positions/widths Parameters (one pair per stage when shared)."""
    seen: dict[int, nn.Parameter] = {}
    for _, layer in dcls_layers(model):
        for p in (layer.positions, layer.widths):
            seen.setdefault(id(p), p)
    return list(seen.values())


def to_inference(model: nn.Module) -> nn.Module:
    """Bake every DCLS layer into a plain depthwise ``nn.Conv2d`` holding its constructed kernel
    (in place; returns ``model``). Outputs are unchanged; no kernel construction per forward, and
    the model exports with ``torch.onnx`` / ``torch.jit``. Positions and widths are dropped, so the
    baked model's ``state_dict`` has the dense (C, 1, 23, 23) kernels instead. Never
    reparameterises anything else (FastViT stays as trained)."""
    for path, layer in dcls_layers(model):
        conv = layer.to_conv2d()
        conv.train(layer.training)
        replace_module(model, path, conv)
    return model


def param_groups(model: nn.Module, lr: float, weight_decay: float, dcls_lr_scale: float = 5.0) -> list[dict]:
    """Optimiser parameter groups (a list of dicts for ``torch.optim``):

    - ``decay``: every tensor of two or more dimensions (weight matrices, conv kernels, DCLS
      element weights, FastViT's (C, 1, 1) layer scales): ``weight_decay``, ``lr``;
    - ``no_decay``: 1-D tensors (norms, ConvNeXt layer scales) and biases: no decay, ``lr``.
      This is the reference's rule (DCLS-Audio ``optim_factory.get_parameter_groups``); exempting
      every per-channel gain instead would change FastViT-SA24's training;
    - ``dcls``: DCLS positions and widths (once each, shared per stage): no decay,
      ``lr * dcls_lr_scale``.

    Each dict also has ``name`` and ``lr_scale`` (1 or ``dcls_lr_scale``), so a loop that sets
    ``group["lr"]`` itself can keep the ratio. Empty groups are left out.
    """
    dcls_ids = {id(p) for p in shared_dcls_parameters(model)}
    decay, no_decay, dcls = [], [], []
    for name, p in model.named_parameters():  # shared Parameters are yielded once
        if not p.requires_grad:
            continue
        if id(p) in dcls_ids:
            dcls.append(p)
        elif p.ndim <= 1 or name.endswith(".bias"):
            no_decay.append(p)
        else:
            decay.append(p)
    groups = [
        {"name": "decay", "params": decay, "lr": lr, "weight_decay": weight_decay, "lr_scale": 1.0},
        {"name": "no_decay", "params": no_decay, "lr": lr, "weight_decay": 0.0, "lr_scale": 1.0},
        {"name": "dcls", "params": dcls, "lr": lr * dcls_lr_scale, "weight_decay": 0.0, "lr_scale": dcls_lr_scale},
    ]
    return [g for g in groups if g["params"]]


def _read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path), device="cpu")
    # weights_only: a checkpoint file must never run code on load
    obj = torch.load(str(path), map_location="cpu", weights_only=True)
    for key in ("state_dict", "model", "state_dict_ema"):
        if isinstance(obj, dict) and key in obj and isinstance(obj[key], dict):
            obj = obj[key]
            break
    if not isinstance(obj, dict):
        raise ValueError(f"{path}: no state_dict inside")
    return OrderedDict((k.removeprefix("module."), v) for k, v in obj.items() if isinstance(v, torch.Tensor))


def load_timm_checkpoint(
    model: nn.Module,
    path: str | Path,
    filter_fn: Callable[[dict, nn.Module], dict] | None = None,
    skip_prefixes: tuple[str, ...] = ("stem.", "head."),
) -> list[str]:
    """Initialise ``model`` (a timm model with ``in_chans=1``, before any surgery) from a local
    timm (or original-layout, via timm's ``filter_fn``) ImageNet checkpoint file.

    Tensors under ``skip_prefixes`` whose shape differs (3-channel stem, 1000-class head) are left
    at their init; any other missing key or mismatch is an error. Returns the skipped keys.
    Nothing is downloaded.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such checkpoint file")
    state = _read_state_dict(path)
    if filter_fn is not None:
        state = filter_fn(state, model)
    own = model.state_dict()
    skipped, problems = [], []
    for k, v in list(state.items()):
        if k in own and own[k].shape != v.shape:
            if k.startswith(skip_prefixes):
                skipped.append(k)
                del state[k]
            else:
                problems.append(f"{k}: {tuple(v.shape)} vs {tuple(own[k].shape)}")
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    problems += [f"missing {k}" for k in missing if not k.startswith(skip_prefixes)]
    problems += [f"unexpected {k}" for k in unexpected]
    if problems:
        raise ValueError(f"{path}: does not fit {type(model).__name__}: {problems[:8]}")
    model.load_state_dict(state, strict=False)
    return sorted(skipped + missing)


def build_audio_model(
    timm_name: str,
    *,
    dcls: bool,
    stem_path: str,
    stem_bias: bool,
    num_classes: int = 527,
    drop_path_rate: float = 0.0,
    pretrained_path: str | None = None,
    filter_fn: Callable[[dict, nn.Module], dict] | None = None,
    kernel_count: int = 26,
    dilated_kernel_size: int = 23,
    stem_channels: Callable[[nn.Module], int] | None = None,
    adapt: Callable[[nn.Module], None] | None = None,
    **timm_kwargs,
) -> nn.Module:
    """The recipe every family shares: (B, 1, 128, T) -> (B, num_classes), channels_last.

    timm's ``timm_name`` with one input channel -> optional local ImageNet weights
    (:func:`load_timm_checkpoint` with the family's ``filter_fn``) -> the family's own changes
    (``adapt``) -> the module at ``stem_path`` replaced by the (2, 16) patch stem (its width
    read from that module's ``out_channels`` unless ``stem_channels`` says) -> every 7x7
    depthwise conv replaced by DCLS-Gauss if ``dcls``. The family files keep only what really
    differs between them.
    """
    model = timm.create_model(timm_name, pretrained=False, in_chans=1, num_classes=num_classes,
                              drop_path_rate=drop_path_rate, **timm_kwargs)
    if pretrained_path is not None:
        load_timm_checkpoint(model, pretrained_path, filter_fn=filter_fn)
    if adapt is not None:
        adapt(model)
    width = stem_channels(model) if stem_channels is not None else model.get_submodule(stem_path).out_channels
    replace_module(model, stem_path, make_patch_stem(1, width, bias=stem_bias))
    if dcls:
        replace_depthwise_with_dcls(model, find_depthwise_convs(model, 7), kernel_count, dilated_kernel_size)
    return model.to(memory_format=torch.channels_last)  # see PatchStem
