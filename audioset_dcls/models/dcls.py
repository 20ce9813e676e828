"""DCLS-Gauss depthwise convolution (Khalfaoui-Hassani et al., "Dilated Convolution with Learnable
Spacings", ICLR 2023; "Audio classification with DCLS", 2023).

Each output channel has ``kernel_count`` elements with a weight ``w``, a position ``p`` and a width
``s``. Element ``k`` contributes ``w_k * g_k`` to a dense ``S x S`` kernel, where ``g_k`` is an
axis-aligned Gaussian centred at ``p_k + S // 2`` with ``sigma = |s_k| + 0.27``, divided by its sum
over the grid plus 1e-7. The kernel is then used by an ordinary depthwise ``conv2d``.

The reference implementation (the ``dcls`` package) materialises a ``(S, S, 2, C, 1, K)`` index
tensor and a ``(S, S, C, 1, K)`` Gaussian tensor on every forward pass. The Gaussian factorises:
``g_k(i, j) = gy_k(i) * gx_k(j)`` and its grid sum is ``sum(gy_k) * sum(gx_k)``, so the kernel is one
batched matmul ``(C, S, K) @ (C, K, S)`` with the normalised weights folded into one factor.
That is ``C * K * S`` exponentials instead of ``C * K * S * S`` and no large intermediate.

Conventions (kept from the reference so its checkpoints load unchanged):
``weight`` (C, 1, K); ``positions`` and ``widths`` (2, C, 1, K) where index 0 moves along the
width (time) axis and index 1 along the height (frequency) axis.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["DclsConv2d", "build_gauss_kernel", "make_shared_dcls_parameters", "SIGMA_OFFSET", "NORM_EPS"]

SIGMA_OFFSET = 0.27  # sigma = |s| + 0.27: keeps every Gaussian at least ~a quarter pixel wide
NORM_EPS = 1e-7  # added to each element's grid sum, exactly as the reference does
EXP_CUTOFF = -40.0  # 1D Gaussian factors below exp(-40) are exactly 0 (see build_gauss_kernel)


def build_gauss_kernel(
    weight: torch.Tensor, positions: torch.Tensor, widths: torch.Tensor, dilated_kernel_size: int
) -> torch.Tensor:
    """Construct the dense DCLS-Gauss depthwise kernel.

    Args:
        weight: (C, 1, K) element weights.
        positions: (2, C, 1, K) element offsets from the kernel centre; [0] along width, [1] along height.
        widths: (2, C, 1, K) raw widths; sigma = |widths| + 0.27.
        dilated_kernel_size: S, the side of the square dense kernel.

    Returns:
        (C, 1, S, S) kernel in float32 (or float64 if the parameters are float64), rows = height.
    """
    channels, _, count = weight.shape
    size = dilated_kernel_size
    # Autocast would run the matmul in bf16/fp16; the normalisation and the sums of up to 26
    # Gaussians need full precision, so build in fp32 (or the parameters' wider dtype).
    dtype = torch.float64 if weight.dtype == torch.float64 else torch.float32
    with torch.autocast(device_type=weight.device.type, enabled=False):
        w = weight.to(dtype).reshape(channels, count)
        centre = positions.to(dtype).reshape(2, channels, count) + (size // 2)
        sigma = widths.to(dtype).reshape(2, channels, count).abs() + SIGMA_OFFSET
        grid = torch.arange(size, device=weight.device, dtype=dtype)
        # (2, C, K, S): 1D Gaussians; [0] along width (columns), [1] along height (rows)
        arg = -0.5 * ((grid - centre.unsqueeze(-1)) / sigma.unsqueeze(-1)).square()
        # exp() of arguments below ~-87 underflows through subnormals, 10-20x slower on x86, and
        # subnormal factors slow the matmul too: factors below exp(-40) = 4e-18 are set to 0
        # (and get no gradient). Their products with the other axis stay below 4e-18 / 1e-7 in the
        # normalised kernel, far under float32 resolution of any non-vanishing kernel.
        g = torch.exp(arg.clamp_min(EXP_CUTOFF)).masked_fill(arg <= EXP_CUTOFF, 0.0)
        gx, gy = g[0], g[1]
        norm = gx.sum(-1) * gy.sum(-1) + NORM_EPS  # (C, K): the 2D grid sum, separably
        kernel = torch.bmm(gy.transpose(1, 2), gx * (w / norm).unsqueeze(-1))  # (C, S_h, S_w)
    return kernel.unsqueeze(1)


def make_shared_dcls_parameters(
    channels: int, kernel_count: int = 26, dilated_kernel_size: int = 23
) -> tuple[nn.Parameter, nn.Parameter]:
    """New (positions, widths) Parameters of shape (2, C, 1, K), initialised as in the reference:
    positions N(0, 0.5) clamped to +-(S // 2), widths 0.23 (sigma 0.5)."""
    positions = nn.Parameter(torch.empty(2, channels, 1, kernel_count))
    widths = nn.Parameter(torch.empty(2, channels, 1, kernel_count))
    reset_positions_widths_(positions, widths, dilated_kernel_size)
    return positions, widths


@torch.no_grad()
def reset_positions_widths_(positions: torch.Tensor, widths: torch.Tensor, dilated_kernel_size: int) -> None:
    """In-place reference init of positions (N(0, 0.5), clamped to +-S//2) and widths (0.23)."""
    lim = dilated_kernel_size // 2
    positions.normal_(0.0, 0.5).clamp_(-lim, lim)
    widths.fill_(0.23)


class DclsConv2d(nn.Module):
    """Depthwise DCLS-Gauss convolution: (B, C, H, W) -> (B, C, H', W').

    ``positions`` / ``widths`` may be passed in to share one Parameter between several layers
    (the paper shares them across all DCLS layers of a stage). A shared Parameter is registered
    in every layer that uses it: ``parameters()`` yields it once (so counts and optimisers see it
    once and its gradient accumulates from every layer), while ``state_dict()`` stores it under
    every layer's key, like the reference checkpoints do.
    """

    def __init__(
        self,
        channels: int,
        kernel_count: int = 26,
        dilated_kernel_size: int = 23,
        padding: int | None = None,
        stride: int = 1,
        bias: bool = True,
        positions: nn.Parameter | None = None,
        widths: nn.Parameter | None = None,
    ) -> None:
        super().__init__()
        self.channels = channels
        self.kernel_count = kernel_count
        self.dilated_kernel_size = dilated_kernel_size
        self.padding = dilated_kernel_size // 2 if padding is None else padding
        self.stride = stride
        self.weight = nn.Parameter(torch.empty(channels, 1, kernel_count))
        self.bias = nn.Parameter(torch.zeros(channels)) if bias else None
        if (positions is None) != (widths is None):
            raise ValueError("pass both positions and widths to share them, or neither")
        if positions is None:
            positions, widths = make_shared_dcls_parameters(channels, kernel_count, dilated_kernel_size)
        expected = (2, channels, 1, kernel_count)
        if tuple(positions.shape) != expected or tuple(widths.shape) != expected:
            raise ValueError(f"positions/widths must have shape {expected}, got {tuple(positions.shape)}")
        self.positions = positions
        self.widths = widths
        self.reset_weight()

    @torch.no_grad()
    def reset_weight(self) -> None:
        """Reference init of this layer's own tensors: weight N(0, 0.02), bias 0 (shared
        positions/widths are left alone: they belong to the stage)."""
        nn.init.normal_(self.weight, 0.0, 0.02)
        if self.bias is not None:
            self.bias.zero_()

    def construct_kernel(self) -> torch.Tensor:
        """The dense kernel (C, 1, S, S) in float32 (see :func:`build_gauss_kernel`)."""
        return build_gauss_kernel(self.weight, self.positions, self.widths, self.dilated_kernel_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> (B, C, H', W'); any memory format."""
        kernel = self.construct_kernel()
        # Under autocast conv2d casts the kernel itself; outside it, match the input (a model
        # converted with .half()/.bfloat16() feeds half inputs).
        if not torch.is_autocast_enabled(x.device.type):
            kernel = kernel.to(x.dtype)
        return F.conv2d(x, kernel, self.bias, self.stride, self.padding, 1, self.channels)

    @torch.no_grad()
    def to_conv2d(self) -> nn.Conv2d:
        """A plain depthwise ``nn.Conv2d`` with the constructed kernel: same outputs, no
        construction cost, exportable (ONNX, TorchScript)."""
        size = self.dilated_kernel_size
        conv = nn.Conv2d(
            self.channels, self.channels, size, stride=self.stride, padding=self.padding,
            groups=self.channels, bias=self.bias is not None,
            device=self.weight.device, dtype=self.weight.dtype,
        )
        conv.weight.copy_(self.construct_kernel())
        if self.bias is not None:
            conv.bias.copy_(self.bias)
        return conv

    def extra_repr(self) -> str:
        s = (f"{self.channels}, kernel_count={self.kernel_count}, dilated_kernel_size={self.dilated_kernel_size}, "
             f"padding={self.padding}, version=gauss")
        if self.stride != 1:
            s += f", stride={self.stride}"
        if self.bias is None:
            s += ", bias=False"
        return s

