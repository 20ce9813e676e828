"""Our separable DCLS-Gauss construction against the reference `dcls` package (dev-only)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from audioset_dcls.models.dcls import DclsConv2d, build_gauss_kernel

C, K, S = 12, 26, 23


def _reference_modules():
    modules = pytest.importorskip("DCLS.construct.modules")  # logs to the root logger on import
    return modules


def _random_params(dtype, seed=0, far=False):
    g = torch.Generator().manual_seed(seed)
    weight = torch.randn(C, 1, K, generator=g, dtype=dtype)
    positions = torch.randn(2, C, 1, K, generator=g, dtype=dtype) * 4.0
    if far:  # some elements with most of their mass outside the grid: the +1e-7 matters there
        positions[:, :, :, :4] = torch.tensor([14.0, -15.5, 19.0, -25.0], dtype=dtype)
    widths = torch.randn(2, C, 1, K, generator=g, dtype=dtype) * 1.5
    return weight, positions, widths


def _relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("far", [False, True])
def test_kernel_and_gradients_match_dcls_package(dtype, far):
    modules = _reference_modules()
    construct = modules.ConstructKernel2d(C, C, C, K, (S, S), "gauss")
    ours_in = [t.requires_grad_() for t in _random_params(dtype, far=far)]
    ref_in = [t.detach().clone().requires_grad_() for t in ours_in]

    ours = build_gauss_kernel(*ours_in, S)
    ref = construct(*ref_in)
    assert ours.shape == ref.shape == (C, 1, S, S)
    assert ours.dtype == dtype
    tol = 1e-5 if dtype == torch.float32 else 1e-12
    assert _relative_error(ours, ref) < tol

    upstream = torch.randn(C, 1, S, S, generator=torch.Generator().manual_seed(1), dtype=dtype)
    (ours * upstream).sum().backward()
    (ref * upstream).sum().backward()
    for name, a, b in zip(("weight", "positions", "widths"), ours_in, ref_in):
        assert _relative_error(a.grad, b.grad) < tol, name


def test_far_elements_keep_reference_normalisation():
    """An element far outside the grid: the kernel is w * g / (sum g + 1e-7), far from w * g / sum g."""
    weight = torch.ones(1, 1, 1, dtype=torch.float64)
    positions = torch.tensor([30.0, 0.0], dtype=torch.float64).reshape(2, 1, 1, 1)
    widths = torch.full((2, 1, 1, 1), 2.0, dtype=torch.float64)
    kernel = build_gauss_kernel(weight, positions, widths, S)
    # without the 1e-7 the kernel would sum to exactly 1
    assert kernel.sum().item() < 0.5


def test_layer_matches_dcls2d_forward_and_backward():
    modules = _reference_modules()
    torch.manual_seed(0)
    ref = modules.Dcls2d(C, C, kernel_count=K, dilated_kernel_size=S, padding=S // 2, groups=C,
                         bias=True, version="gauss", use_implicit_gemm=False)
    ours = DclsConv2d(C, K, S, padding=S // 2, bias=True)
    with torch.no_grad():
        ours.weight.copy_(ref.weight)
        ours.positions.copy_(ref.P)
        ours.widths.copy_(ref.SIG * 3.0)
        ref.SIG.copy_(ours.widths)
        ours.bias.copy_(torch.randn(C))
        ref.bias.copy_(ours.bias)
    x = torch.randn(2, C, 20, 17)
    y_ours, y_ref = ours(x), ref(x)
    assert _relative_error(y_ours, y_ref) < 1e-5
    g = torch.randn_like(y_ref)
    (y_ours * g).sum().backward()
    (y_ref * g).sum().backward()
    for a, b in ((ours.weight, ref.weight), (ours.positions, ref.P), (ours.widths, ref.SIG), (ours.bias, ref.bias)):
        assert _relative_error(a.grad, b.grad) < 1e-4


def test_position_axes_follow_reference_convention():
    """positions[0] moves the kernel along width (time), positions[1] along height (frequency)."""
    weight = torch.ones(1, 1, 1)
    widths = torch.zeros(2, 1, 1, 1)
    shift_w = build_gauss_kernel(weight, torch.tensor([5.0, 0.0]).reshape(2, 1, 1, 1), widths, S)[0, 0]
    shift_h = build_gauss_kernel(weight, torch.tensor([0.0, -4.0]).reshape(2, 1, 1, 1), widths, S)[0, 0]
    assert divmod(int(shift_w.argmax()), S) == (11, 16)
    assert divmod(int(shift_h.argmax()), S) == (7, 11)


def test_autocast_builds_kernel_in_float32_and_runs():
    torch.manual_seed(0)
    layer = DclsConv2d(8)
    x = torch.randn(1, 8, 16, 16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        kernel = layer.construct_kernel()
        y = layer(x)
    assert kernel.dtype == torch.float32
    assert y.dtype == torch.bfloat16
    ref = layer(x)
    assert (y.float() - ref).abs().max() < 0.05 * ref.abs().max()


def test_half_model_and_float64_model():
    torch.manual_seed(0)
    layer = DclsConv2d(8)
    x = torch.randn(1, 8, 12, 12)
    ref = layer(x)
    y64 = layer.to(torch.float64)(x.double())
    assert y64.dtype == torch.float64 and torch.allclose(y64.float(), ref, atol=1e-5)
    ybf = layer.to(torch.bfloat16)(x.bfloat16())
    assert ybf.dtype == torch.bfloat16


def test_to_conv2d_equals_layer():
    torch.manual_seed(0)
    layer = DclsConv2d(6, bias=False)
    conv = layer.to_conv2d()
    assert conv.kernel_size == (S, S) and conv.groups == 6 and conv.bias is None
    x = torch.randn(2, 6, 30, 9)
    torch.testing.assert_close(conv(x), layer(x), rtol=1e-5, atol=1e-6)


def test_torch_compile_matches_eager():
    torch.manual_seed(0)
    layer = DclsConv2d(4)
    x = torch.randn(1, 4, 10, 10)
    compiled = torch.compile(layer, backend="eager", fullgraph=True)
    torch.testing.assert_close(compiled(x), layer(x))


def test_conv_is_plain_depthwise_conv_with_constructed_kernel():
    torch.manual_seed(0)
    layer = DclsConv2d(5)
    x = torch.randn(1, 5, 9, 11)
    expected = F.conv2d(x, layer.construct_kernel(), layer.bias, padding=S // 2, groups=5)
    torch.testing.assert_close(layer(x), expected)
