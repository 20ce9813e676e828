"""An independent forward pass of the DCLS-Audio REFERENCE models, for parity tests.

Written from the reference's layout (K-H-Ismail/DCLS-Audio: models/convnext.py, metaformer.py,
fastvit.py, modules/mobileone.py, modules/replknet.py, and the ``dcls`` package's Gauss kernel
construction), as plain functions over a reference-layout state_dict. It imports nothing from
``audioset_dcls``: when our converted model and this oracle agree, two separate implementations
of the reference agree, not one implementation with itself.

Everything runs in eval mode (BatchNorm uses running statistics, no dropout / drop path).

    reference_logits(state_dict, x) -> (B, num_classes)    x: (B, 1, 128, T) normalised log-mel
"""

from __future__ import annotations

import re

import torch
import torch.nn.functional as F

__all__ = ["reference_logits", "reference_family", "gauss_kernel", "DILATED_KERNEL_SIZE"]

DILATED_KERNEL_SIZE = 23  # every DCLS layer of the six audio models: 23x23, 26 elements
PATCH = (2, 16)  # the audio patch stem: 2 mel bins x 16 frames


def gauss_kernel(weight: torch.Tensor, P: torch.Tensor, SIG: torch.Tensor, size: int = DILATED_KERNEL_SIZE) -> torch.Tensor:
    """Dense DCLS-Gauss depthwise kernel, built the direct (non-separable) way the reference does.

    weight (C, 1, K), P and SIG (2, C, 1, K) with P[0] moving along width (columns, time) and
    P[1] along height (rows, frequency) -> (C, 1, size, size).
    Element k: a 2D Gaussian centred at P + size // 2 with sigma |SIG| + 0.27, divided by its sum
    over the whole grid plus 1e-7, times its weight; the kernel is the sum over k.
    """
    C, _, K = weight.shape
    centre = P.reshape(2, C, K, 1, 1) + size // 2
    sigma = SIG.reshape(2, C, K, 1, 1).abs() + 0.27
    rows = torch.arange(size, dtype=weight.dtype).view(size, 1)  # height index
    cols = torch.arange(size, dtype=weight.dtype).view(1, size)  # width index
    d2 = ((cols - centre[0]) / sigma[0]) ** 2 + ((rows - centre[1]) / sigma[1]) ** 2  # (C, K, S, S)
    g = torch.exp(-0.5 * d2)
    g = g / (g.sum(dim=(-2, -1), keepdim=True) + 1e-7)
    kernel = (g * weight.reshape(C, K, 1, 1)).sum(1)  # (C, S, S)
    return kernel.unsqueeze(1)


def _depthwise(sd: dict, prefix: str, x: torch.Tensor, kernel_size: int = 7) -> torch.Tensor:
    """A reference depthwise conv at ``prefix`` (nn.Conv2d 7x7, or Dcls2d when ``prefix.P`` exists)."""
    bias = sd.get(prefix + ".bias")
    if prefix + ".P" in sd:
        k = gauss_kernel(sd[prefix + ".weight"], sd[prefix + ".P"], sd[prefix + ".SIG"])
        return F.conv2d(x, k, bias, padding=DILATED_KERNEL_SIZE // 2, groups=x.shape[1])
    return F.conv2d(x, sd[prefix + ".weight"], bias, padding=kernel_size // 2, groups=x.shape[1])


def _ln_last(x: torch.Tensor, weight, bias, eps: float) -> torch.Tensor:
    """LayerNorm over the last dim, written out (mean / biased variance), as the reference's
    LayerNormGeneral does."""
    mu = x.mean(-1, keepdim=True)
    var = (x - mu).pow(2).mean(-1, keepdim=True)
    y = (x - mu) / torch.sqrt(var + eps) * weight
    return y + bias if bias is not None else y


def _ln_first(x: torch.Tensor, weight, bias, eps: float) -> torch.Tensor:
    """ConvNeXt's channels_first LayerNorm on (B, C, H, W)."""
    mu = x.mean(1, keepdim=True)
    var = (x - mu).pow(2).mean(1, keepdim=True)
    y = (x - mu) / torch.sqrt(var + eps)
    return weight[:, None, None] * y + bias[:, None, None]


def _bn(sd: dict, prefix: str, x: torch.Tensor) -> torch.Tensor:
    """Eval-mode BatchNorm2d (eps 1e-5, PyTorch's default used by the reference)."""
    mean, var = sd[prefix + ".running_mean"], sd[prefix + ".running_var"]
    w, b = sd[prefix + ".weight"], sd[prefix + ".bias"]
    return (x - mean[:, None, None]) / torch.sqrt(var[:, None, None] + 1e-5) * w[:, None, None] + b[:, None, None]


def _count(sd: dict, pattern: str) -> int:
    """Number of distinct integers captured by ``pattern`` (one group) over the keys."""
    rx = re.compile(pattern)
    return len({int(m.group(1)) for k in sd for m in [rx.match(k)] if m})


# --------------------------------------------------------------------------------------------
# ConvNeXt (facebookresearch layout: downsample_layers / stages / norm / head)


def _convnext(sd: dict, x: torch.Tensor) -> torch.Tensor:
    x = F.conv2d(x, sd["downsample_layers.0.0.weight"], sd["downsample_layers.0.0.bias"], stride=PATCH)
    x = _ln_first(x, sd["downsample_layers.0.1.weight"], sd["downsample_layers.0.1.bias"], 1e-6)
    for i in range(4):
        if i > 0:
            p = f"downsample_layers.{i}"
            x = _ln_first(x, sd[p + ".0.weight"], sd[p + ".0.bias"], 1e-6)
            x = F.conv2d(x, sd[p + ".1.weight"], sd[p + ".1.bias"], stride=2)
        for j in range(_count(sd, rf"stages\.{i}\.(\d+)\.")):
            p = f"stages.{i}.{j}"
            y = _depthwise(sd, p + ".dwconv", x)
            y = y.permute(0, 2, 3, 1)
            y = _ln_last(y, sd[p + ".norm.weight"], sd[p + ".norm.bias"], 1e-6)
            y = F.gelu(F.linear(y, sd[p + ".pwconv1.weight"], sd[p + ".pwconv1.bias"]))
            y = F.linear(y, sd[p + ".pwconv2.weight"], sd[p + ".pwconv2.bias"])
            y = sd[p + ".gamma"] * y
            x = x + y.permute(0, 3, 1, 2)
    x = _ln_last(x.mean((-2, -1)), sd["norm.weight"], sd["norm.bias"], 1e-6)
    return F.linear(x, sd["head.weight"], sd["head.bias"])


# --------------------------------------------------------------------------------------------
# ConvFormer (MetaFormer baselines layout; channels-last between layers)


def _star_relu(sd: dict, prefix: str, x: torch.Tensor) -> torch.Tensor:
    return sd[prefix + ".scale"] * F.relu(x) ** 2 + sd[prefix + ".bias"]


def _convformer(sd: dict, x: torch.Tensor) -> torch.Tensor:
    # stem: bias-free patch conv, then bias-free LayerNorm (eps 1e-6) on (B, H, W, C)
    x = F.conv2d(x, sd["downsample_layers.0.conv.weight"], sd.get("downsample_layers.0.conv.bias"), stride=PATCH)
    x = _ln_last(x.permute(0, 2, 3, 1), sd["downsample_layers.0.post_norm.weight"], None, 1e-6)
    for i in range(4):
        if i > 0:
            p = f"downsample_layers.{i}"
            x = _ln_last(x, sd[p + ".pre_norm.weight"], None, 1e-6).permute(0, 3, 1, 2)
            x = F.conv2d(x, sd[p + ".conv.weight"], sd[p + ".conv.bias"], stride=2, padding=1)
            x = x.permute(0, 2, 3, 1)
        for j in range(_count(sd, rf"stages\.{i}\.(\d+)\.")):
            p = f"stages.{i}.{j}"
            # token mixer: SepConv (pw -> StarReLU -> dw 7x7 or DCLS -> pw), all bias-free
            y = _ln_last(x, sd[p + ".norm1.weight"], None, 1e-6)
            y = _star_relu(sd, p + ".token_mixer.act1", F.linear(y, sd[p + ".token_mixer.pwconv1.weight"]))
            y = _depthwise(sd, p + ".token_mixer.dwconv", y.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
            y = F.linear(y, sd[p + ".token_mixer.pwconv2.weight"])
            res = sd.get(p + ".res_scale1.scale")
            x = (x * res if res is not None else x) + y
            # channel MLP: fc1 -> StarReLU -> fc2, bias-free
            y = _ln_last(x, sd[p + ".norm2.weight"], None, 1e-6)
            y = _star_relu(sd, p + ".mlp.act", F.linear(y, sd[p + ".mlp.fc1.weight"]))
            y = F.linear(y, sd[p + ".mlp.fc2.weight"])
            res = sd.get(p + ".res_scale2.scale")
            x = (x * res if res is not None else x) + y
    x = _ln_last(x.mean((1, 2)), sd["norm.weight"], sd["norm.bias"], 1e-6)
    # MlpHead: fc1 -> SquaredReLU -> nn.LayerNorm with torch's default eps 1e-5 -> fc2
    x = F.relu(F.linear(x, sd["head.fc1.weight"], sd["head.fc1.bias"])) ** 2
    x = _ln_last(x, sd["head.norm.weight"], sd["head.norm.bias"], 1e-5)
    return F.linear(x, sd["head.fc2.weight"], sd["head.fc2.bias"])


# --------------------------------------------------------------------------------------------
# FastViT (apple/ml-fastvit layout: patch_embed / network.N / conv_exp / head)


def _conv_bn(sd: dict, prefix: str, x: torch.Tensor, stride: int = 1, groups: int = 1) -> torch.Tensor:
    w = sd[prefix + ".conv.weight"]
    return _bn(sd, prefix + ".bn", F.conv2d(x, w, None, stride=stride, padding=w.shape[-1] // 2, groups=groups))


def _mobileone(sd: dict, prefix: str, x: torch.Tensor, groups: int, act: bool = True, se: bool = False) -> torch.Tensor:
    """Train-time MobileOne block: skip BN + scale (1x1) branch + conv branches; then SE, GELU."""
    out = torch.zeros(())
    if prefix + ".rbr_skip.running_mean" in sd:
        out = out + _bn(sd, prefix + ".rbr_skip", x)
    if prefix + ".rbr_scale.conv.weight" in sd:
        out = out + _conv_bn(sd, prefix + ".rbr_scale", x, groups=groups)
    b = 0
    while f"{prefix}.rbr_conv.{b}.conv.weight" in sd:
        out = out + _conv_bn(sd, f"{prefix}.rbr_conv.{b}", x, groups=groups)
        b += 1
    if se:
        s = out.mean((2, 3), keepdim=True)
        s = F.relu(F.conv2d(s, sd[prefix + ".se.reduce.weight"], sd[prefix + ".se.reduce.bias"]))
        s = torch.sigmoid(F.conv2d(s, sd[prefix + ".se.expand.weight"], sd[prefix + ".se.expand.bias"]))
        out = out * s
    return F.gelu(out) if act else out


def _conv_ffn(sd: dict, prefix: str, x: torch.Tensor) -> torch.Tensor:
    y = _bn(sd, prefix + ".conv.bn", _depthwise(sd, prefix + ".conv.conv", x))
    y = F.gelu(F.conv2d(y, sd[prefix + ".fc1.weight"], sd[prefix + ".fc1.bias"]))
    return F.conv2d(y, sd[prefix + ".fc2.weight"], sd[prefix + ".fc2.bias"])


def _mhsa(sd: dict, prefix: str, x: torch.Tensor, head_dim: int = 32) -> torch.Tensor:
    B, C, H, W = x.shape
    heads = C // head_dim
    t = x.flatten(2).transpose(1, 2)  # (B, N, C)
    qkv = F.linear(t, sd[prefix + ".qkv.weight"]).reshape(B, H * W, 3, heads, head_dim).permute(2, 0, 3, 1, 4)
    q, k, v = qkv[0], qkv[1], qkv[2]
    attn = torch.softmax((q * head_dim ** -0.5) @ k.transpose(-2, -1), dim=-1)
    t = (attn @ v).transpose(1, 2).reshape(B, H * W, C)
    t = F.linear(t, sd[prefix + ".proj.weight"], sd[prefix + ".proj.bias"])
    return t.transpose(1, 2).reshape(B, C, H, W)


def _fastvit(sd: dict, x: torch.Tensor) -> torch.Tensor:
    x = F.conv2d(x, sd["patch_embed.weight"], sd.get("patch_embed.bias"), stride=PATCH)
    for n in range(_count(sd, r"network\.(\d+)\.")):
        p = f"network.{n}"
        if p + ".proj.0.lkb_origin.conv.weight" in sd:
            # PatchEmbed: RepLK (7x7 + 3x3 conv-BN, stride 2, groups = in channels, no activation)
            # then a 1x1 MobileOne block with GELU
            cin = x.shape[1]
            y = _conv_bn(sd, p + ".proj.0.lkb_origin", x, stride=2, groups=cin)
            y = y + _conv_bn(sd, p + ".proj.0.small_conv", x, stride=2, groups=cin)
            x = _mobileone(sd, p + ".proj.1", y, groups=1)
        elif p + ".pe.weight" in sd:
            # RepCPE: depthwise 7x7 (or DCLS) with bias, plus identity
            x = x + _depthwise(sd, p + ".pe", x)
        else:
            for m in range(_count(sd, rf"network\.{n}\.(\d+)\.")):
                b = f"{p}.{m}"
                if b + ".token_mixer.qkv.weight" in sd:  # attention block
                    ls1 = sd[b + ".layer_scale_1"]
                    x = x + ls1 * _mhsa(sd, b + ".token_mixer", _bn(sd, b + ".norm", x))
                    x = x + sd[b + ".layer_scale_2"] * _conv_ffn(sd, b + ".convffn", x)
                else:  # RepMixer block
                    c = x.shape[1]
                    tm = b + ".token_mixer"
                    mixed = _mobileone(sd, tm + ".mixer", x, groups=c, act=False)
                    normed = _mobileone(sd, tm + ".norm", x, groups=c, act=False)
                    x = x + sd[tm + ".layer_scale"] * (mixed - normed)
                    x = x + sd[b + ".layer_scale"] * _conv_ffn(sd, b + ".convffn", x)
    x = _mobileone(sd, "conv_exp", x, groups=x.shape[1], act=True, se=True)
    return F.linear(x.mean((2, 3)), sd["head.weight"], sd["head.bias"])


# --------------------------------------------------------------------------------------------


def reference_family(sd: dict) -> str:
    """'convnext', 'convformer' or 'fastvit', from the reference keys."""
    if "downsample_layers.0.0.weight" in sd:
        return "convnext"
    if "downsample_layers.0.conv.weight" in sd:
        return "convformer"
    if "patch_embed.weight" in sd:
        return "fastvit"
    raise KeyError("not a DCLS-Audio reference state_dict")


@torch.no_grad()
def reference_logits(sd: dict, x: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Logits of the reference model whose (reference-layout) state_dict is ``sd``.

    x: (B, 1, 128, T) normalised log-mel (T = 1001 for 10 s) -> (B, num_classes) in ``dtype``
    (float64 separates real differences from float32 rounding).
    """
    sd = {k: v.to(dtype) if v.is_floating_point() else v for k, v in sd.items()}
    fn = {"convnext": _convnext, "convformer": _convformer, "fastvit": _fastvit}[reference_family(sd)]
    return fn(sd, x.to(dtype))

