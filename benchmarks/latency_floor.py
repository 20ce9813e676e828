"""Baked DCLS vs plain latency on the CPU, measured interleaved, next to the floor a dense 23x23
depthwise conv allows.

The baked DCLS model is the plain model with every 7x7 depthwise conv replaced by a 23x23 one:
the rest of the network is identical. So

    T_baked >= T_plain - t_7x7 + MAC_23x23 / peak

where t_7x7 is the time the plain model spends in those convs (timed with hooks), MAC_23x23 the
multiply-adds of the 23x23 convs counting only taps that land inside the feature map (oneDNN skips
the zero padding), and ``peak`` the machine's fp32 multiply-add rate (a large GEMM, which runs near
the FMA peak). No implementation of the dense kernel can beat that floor; the printed
``dw GMAC/s`` says how close oneDNN gets.

Timing: plain and baked forward passes alternate (pairs), so load changes on a shared machine hit
both; the ratio is the median over pairs.

    python benchmarks/latency_floor.py --threads 2 --batch 1 --repeats 30
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without install

from audioset_dcls.models import create_model, to_inference  # noqa: E402

FAMILIES = ["convnext_tiny", "convformer_s18", "fastvit_sa24"]


def _valid_taps(size: int, kernel: int, pad: int) -> int:
    """Sum over output positions (stride 1) of the kernel taps that fall inside the input."""
    out = size + 2 * pad - kernel + 1
    return sum(min(i - pad + kernel, size) - max(i - pad, 0) for i in range(out))


def _depthwise(model: nn.Module) -> list[nn.Conv2d]:
    return [m for m in model.modules() if isinstance(m, nn.Conv2d) and m.groups == m.in_channels > 1
            and m.kernel_size in ((7, 7), (23, 23))]


def depthwise_profile(model: nn.Module, x: torch.Tensor, repeats: int = 5) -> tuple[float, float]:
    """(seconds per forward spent in the 7x7/23x23 depthwise convs, their valid MACs)."""
    spent, macs, starts = [0.0], [0], {}

    def pre(mod, inputs):
        starts[mod] = time.perf_counter()

    def post(mod, inputs, output):
        spent[0] += time.perf_counter() - starts[mod]
        b, c, h, w = inputs[0].shape
        (kh, kw), (ph, pw) = mod.kernel_size, mod.padding
        macs[0] += b * c * _valid_taps(h, kh, ph) * _valid_taps(w, kw, pw)

    handles = [h for m in _depthwise(model) for h in (m.register_forward_pre_hook(pre), m.register_forward_hook(post))]
    try:
        with torch.inference_mode():
            model(x)
            spent[0], macs[0] = 0.0, 0
            for _ in range(repeats):
                model(x)
    finally:
        for h in handles:
            h.remove()
    return spent[0] / repeats, macs[0] / repeats


def fma_peak(threads: int, n: int = 2048, repeats: int = 10) -> float:
    """fp32 multiply-adds per second of a large GEMM: the practical FMA peak of this CPU."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    for _ in range(2):
        a @ b
    t0 = time.perf_counter()
    for _ in range(repeats):
        a @ b
    return n**3 * repeats / (time.perf_counter() - t0)


def paired(plain: nn.Module, baked: nn.Module, x: torch.Tensor, repeats: int) -> tuple[float, float, float]:
    """(median plain s, median baked s, median of per-pair ratios), alternating the two models."""
    tp, tb = [], []
    with torch.inference_mode():
        for _ in range(2):
            plain(x), baked(x)
        for _ in range(repeats):
            t0 = time.perf_counter()
            plain(x)
            t1 = time.perf_counter()
            baked(x)
            t2 = time.perf_counter()
            tp.append(t1 - t0)
            tb.append(t2 - t1)
    return statistics.median(tp), statistics.median(tb), statistics.median(b / p for p, b in zip(tp, tb))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--families", default=",".join(FAMILIES), help="plain model names; <name>_dcls is the pair")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=30, help="timed pairs per model (median)")
    ap.add_argument("--frames", type=int, default=1001)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    peak = fma_peak(args.threads)
    print(f"# CPU, {args.threads} threads, fp32, eager; batch {args.batch}; torch {torch.__version__}")
    print(f"# fp32 GEMM peak: {peak / 1e9:.1f} GMAC/s; {args.repeats} interleaved pairs per model")
    print(f"{'model':16s} {'plain ms':>9s} {'baked ms':>9s} {'ratio':>6s} {'floor':>6s} "
          f"{'7x7 ms':>7s} {'23x23 ms':>8s} {'23x23 GMAC':>10s} {'dw GMAC/s':>9s}")
    x = torch.randn(args.batch, 1, 128, args.frames)
    for fam in [f.strip() for f in args.families.split(",") if f.strip()]:
        torch.manual_seed(0)
        plain = create_model(fam).eval()
        baked = to_inference(create_model(f"{fam}_dcls")).eval()
        t_plain, t_baked, ratio = paired(plain, baked, x, args.repeats)
        t7, _ = depthwise_profile(plain, x)
        t23, mac23 = depthwise_profile(baked, x)
        floor = (t_plain - t7 + mac23 / peak) / t_plain
        print(f"{fam:16s} {t_plain * 1e3:9.1f} {t_baked * 1e3:9.1f} {ratio:6.3f} {floor:6.3f} "
              f"{t7 * 1e3:7.2f} {t23 * 1e3:8.2f} {mac23 / 1e9:10.3f} {mac23 / t23 / 1e9:9.1f}", flush=True)
    print("\nratio: baked DCLS / plain latency (median of pairs); floor: the lowest ratio a dense 23x23\n"
          "depthwise conv at the GEMM peak allows with everything else unchanged.")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
