"""Model benchmarks: parameters, inference latency (batch 1) and throughput (batch 8), baked and
unbaked, training-step throughput, and DCLS kernel construction (forward + backward) against the
`dcls` package at equal output. Prints ratios DCLS / baseline.

CPU (default): fp32, eager, ``--threads`` torch threads. CUDA (``--device cuda``): bf16 autocast,
channels_last and ``torch.compile`` (``--no-compile`` to skip), the setting we train in.

    python benchmarks/models.py                                    # all paper models
    python benchmarks/models.py --models convnext_tiny,convnext_tiny_dcls --repeats 2
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without install

from audioset_dcls.models import create_model, dcls_layers, list_models, param_groups, to_inference  # noqa: E402

PAPER_MODELS = list_models(paper=True)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_call(fn, repeats: int, warmup: int, device: torch.device) -> float:
    """Median wall time of ``fn()`` in seconds over ``repeats`` calls after ``warmup`` calls."""
    for _ in range(warmup):
        fn()
    _sync(device)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


class Setting:
    """How models run on this device: dtype under autocast, memory format, compilation."""

    def __init__(self, device: torch.device, compile_models: bool) -> None:
        self.device = device
        self.cuda = device.type == "cuda"
        self.compile = compile_models and self.cuda

    def autocast(self):
        if self.cuda:
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def prepare(self, model: nn.Module) -> nn.Module:
        model = model.to(self.device)
        if self.cuda:
            model = model.to(memory_format=torch.channels_last)
        return torch.compile(model) if self.compile else model

    def input(self, batch: int, frames: int) -> torch.Tensor:
        x = torch.randn(batch, 1, 128, frames, device=self.device)
        return x.contiguous(memory_format=torch.channels_last) if self.cuda else x


def bench_inference(model: nn.Module, s: Setting, batch: int, frames: int, repeats: int) -> float:
    """Seconds per forward pass of a (batch, 1, 128, frames) input, eval mode, no grad."""
    model = s.prepare(model.eval())
    x = s.input(batch, frames)

    def step():
        with torch.inference_mode(), s.autocast():
            model(x)

    return time_call(step, repeats, warmup=2 if s.compile else 1, device=s.device)


def bench_train(model: nn.Module, s: Setting, batch: int, frames: int, repeats: int) -> float:
    """Training samples/s: forward, BCE loss, backward, AdamW step with our param groups."""
    model = model.train()
    opt = torch.optim.AdamW(param_groups(model.to(s.device), 1e-4, 0.05))
    run = s.prepare(model)
    x = s.input(batch, frames)
    y = torch.rand(batch, 527, device=s.device)

    def step():
        opt.zero_grad(set_to_none=True)
        with s.autocast():
            loss = nn.functional.binary_cross_entropy_with_logits(run(x).float(), y)
        loss.backward()
        opt.step()

    return batch / time_call(step, repeats, warmup=2 if s.compile else 1, device=s.device)


def bench_kernel_construction(model: nn.Module, s: Setting, repeats: int) -> dict[str, float]:
    """Forward + backward of every DCLS kernel of one model forward pass: ours (all layers) vs the
    `dcls` package (one layer per distinct shape, times its count). Also the worst relative
    difference between the two kernels."""
    layers = [layer.to(s.device) for _, layer in dcls_layers(model)]

    def ours():
        total = sum(layer.construct_kernel().square().sum() for layer in layers)
        total.backward()

    result = {"ours_s": time_call(ours, repeats, warmup=1, device=s.device)}
    try:
        from DCLS.construct.modules import ConstructKernel2d  # dev-only reference
    except ImportError:
        return result
    by_channels: dict[int, list] = {}
    for layer in layers:
        by_channels.setdefault(layer.channels, []).append(layer)
    ref_total, worst = 0.0, 0.0
    for channels, group in by_channels.items():
        layer = group[0]
        construct = ConstructKernel2d(channels, channels, channels, layer.kernel_count,
                                      (layer.dilated_kernel_size,) * 2, "gauss")
        params = [t.detach().clone().requires_grad_() for t in (layer.weight, layer.positions, layer.widths)]

        def ref():
            construct(*params).square().sum().backward()

        ref_total += len(group) * time_call(ref, max(1, repeats // 2), warmup=1, device=s.device)
        with torch.no_grad():
            a, b = layer.construct_kernel(), construct(*params)
            worst = max(worst, ((a - b).abs().max() / b.abs().max()).item())
    result.update(dcls_s=ref_total, speedup=ref_total / result["ours_s"], max_rel_diff=worst)
    return result


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default=",".join(PAPER_MODELS), help="comma-separated registry names")
    ap.add_argument("--repeats", type=int, default=3, help="timed repeats per measurement (median)")
    ap.add_argument("--frames", type=int, default=1001, help="input width (1001 = 10 s)")
    ap.add_argument("--train-batch", type=int, default=None, help="default 8 on CPU, 64 on CUDA")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--threads", type=int, default=2, help="CPU torch threads")
    ap.add_argument("--no-compile", action="store_true", help="CUDA: skip torch.compile")
    ap.add_argument("--skip-train", action="store_true")
    ap.add_argument("--skip-kernel", action="store_true")
    args = ap.parse_args(argv)

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    s = Setting(torch.device(args.device), compile_models=not args.no_compile)
    train_batch = args.train_batch or (64 if s.cuda else 8)
    if s.cuda:
        torch.backends.cudnn.benchmark = True
        print(f"# device: {torch.cuda.get_device_name(s.device)}, bf16 autocast, channels_last, compile={s.compile}")
    else:
        print(f"# device: CPU, {args.threads} threads, fp32, eager; torch {torch.__version__}")
    print(f"# input (B, 1, 128, {args.frames}); median of {args.repeats}; train batch {train_batch}")

    names = [n.strip() for n in args.models.split(",") if n.strip()]
    rows: dict[str, dict[str, float]] = {}
    header = f"{'model':24s} {'params':>11s} {'lat1 ms':>9s} {'lat1 baked':>10s} {'b8 /s':>8s} {'b8 baked/s':>10s} {'train /s':>9s}"
    print(header)
    for name in names:
        model = create_model(name)
        row = {"params": sum(p.numel() for p in model.parameters())}
        baked = to_inference(copy.deepcopy(model)) if dcls_layers(model) else None
        row["lat1"] = bench_inference(copy.deepcopy(model), s, 1, args.frames, args.repeats)
        row["lat1_baked"] = bench_inference(baked, s, 1, args.frames, args.repeats) if baked else row["lat1"]
        row["thr8"] = 8 / bench_inference(copy.deepcopy(model), s, 8, args.frames, args.repeats)
        row["thr8_baked"] = 8 / bench_inference(baked, s, 8, args.frames, args.repeats) if baked else row["thr8"]
        if not args.skip_train:
            row["train"] = bench_train(copy.deepcopy(model), s, train_batch, args.frames, args.repeats)
        if baked is not None and not args.skip_kernel:
            row.update({f"kernel_{k}": v for k, v in bench_kernel_construction(model, s, args.repeats).items()})
        rows[name] = row
        print(
            f"{name:24s} {row['params']:>11,d} {row['lat1'] * 1e3:>9.1f} {row['lat1_baked'] * 1e3:>10.1f} "
            f"{row['thr8']:>8.2f} {row['thr8_baked']:>10.2f} {row.get('train', float('nan')):>9.2f}",
            flush=True,
        )
        del model, baked
        if s.cuda:
            torch.cuda.empty_cache()

    kernel_rows = {n: r for n, r in rows.items() if "kernel_ours_s" in r}
    if kernel_rows:
        print("\n# DCLS kernel construction, all layers of one forward, forward + backward")
        for name, r in kernel_rows.items():
            line = f"{name:24s} ours {r['kernel_ours_s'] * 1e3:8.2f} ms"
            if "kernel_dcls_s" in r:
                line += (f" | dcls package {r['kernel_dcls_s'] * 1e3:9.1f} ms | speed-up {r['kernel_speedup']:6.1f}x"
                         f" | max rel diff {r['kernel_max_rel_diff']:.1e}")
            print(line)

    pairs = [(n[: -len("_dcls")], n) for n in rows if n.endswith("_dcls") and n[: -len("_dcls")] in rows]
    if pairs:
        print("\n# ratios DCLS / baseline (latency: >1 is slower; throughput: <1 is slower)")
        for base, dcls in pairs:
            b, d = rows[base], rows[dcls]
            line = (f"{dcls:24s} params {d['params'] / b['params']:.4f} | lat1 unbaked {d['lat1'] / b['lat1']:.2f}"
                    f" baked {d['lat1_baked'] / b['lat1']:.2f} | b8 thr unbaked {d['thr8'] / b['thr8']:.2f}"
                    f" baked {d['thr8_baked'] / b['thr8']:.2f}")
            if "train" in b and "train" in d:
                line += f" | train thr {d['train'] / b['train']:.2f}"
            print(line)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
