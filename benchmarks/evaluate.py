"""Is evaluation model-bound? Clips/s of the eval loader alone vs the model alone vs a whole evaluation.

    python benchmarks/evaluate.py [--shards DIR] [--models convnext_tiny_dcls convnext_atto]
        [--batch-size 32] [--workers 1 2] [--repeats 2] [--threads N]

- loader: the evaluation pipeline alone (data.build_eval_loader: ordered shards -> tar -> decode ->
  normalise -> batch, ``--workers`` processes), every clip once, batches moved to the device.
- model: forward passes (training form, as evaluation runs it) on one batch already on the device.
- evaluate: ``evaluate.evaluate`` end to end (loader + model under autocast + sigmoid + metrics),
  what ``python -m audioset_dcls evaluate`` and the training loop run.
The loader is not the bottleneck when loader clips/s is well above evaluate clips/s (ratio > 1).
Without ``--shards`` a synthetic eval set (10 s clips) is built in a temp dir with the real shard
builder. Timings alternate between the measurements and repeat, so a shared machine's noise shows
as spread rather than as a bias.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from audioset_dcls.data import build_eval_loader, move_batch, open_shard_set  # noqa: E402
from audioset_dcls.features import REFERENCE_NORMALIZATION  # noqa: E402


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def build_synthetic_eval_shards(root: Path, num_clips: int) -> Path:
    from audioset_dcls.shards.build import BuildOptions, build_shards
    from audioset_dcls.synthetic import make_mini_audioset

    ds = make_mini_audioset(root / "audio", num_train=1, num_eval=num_clips, broken=False)
    out = root / "shards"
    build_shards(BuildOptions(segments=(ds.segments["eval"],), labels=ds.labels_csv, audio_dir=ds.audio_dir,
                              out=out, split="eval", workers=min(4, os.cpu_count() or 1), shard_size=16,
                              progress=False))
    return out


def bench_loader(shards, batch_size: int, workers: int, device: torch.device) -> float:
    """Clips/s of one full pass of the eval loader (worker start-up included: evaluation pays it)."""
    t0 = time.perf_counter()
    n = 0
    for batch in build_eval_loader(shards, batch_size, workers, REFERENCE_NORMALIZATION, rank=0, world_size=1):
        move_batch(batch, device)
        n += batch["x"].shape[0]
    return n / (time.perf_counter() - t0)


@torch.no_grad()
def bench_model(model: torch.nn.Module, frames: int, batch_size: int, batches: int, accelerator) -> float:
    device = accelerator.device
    x = torch.randn(batch_size, 1, 128, frames, device=device)
    with accelerator.autocast():  # as evaluation runs it
        model(x)  # warm-up (allocator, oneDNN primitives)
        t0 = time.perf_counter()
        for _ in range(batches):
            model(x)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return batch_size * batches / (time.perf_counter() - t0)


def bench_evaluate(model: torch.nn.Module, shards, batch_size: int, workers: int, accelerator) -> tuple[float, dict]:
    from audioset_dcls.training.evaluate import evaluate

    t0 = time.perf_counter()
    result = evaluate(model, shards, REFERENCE_NORMALIZATION, batch_size=batch_size, num_workers=workers,
                      accelerator=accelerator)
    return result["num_clips"] / (time.perf_counter() - t0), result


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shards", type=Path, help="an eval shard folder (default: a synthetic one)")
    p.add_argument("--clips", type=int, default=64, help="synthetic eval clips (default 64)")
    p.add_argument("--models", nargs="+", default=["convnext_tiny_dcls", "convnext_atto"])
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--model-batches", type=int, default=2, help="timed batches of the model-alone measurement")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: PyTorch's)")
    p.add_argument("--mixed-precision", choices=("no", "bf16", "fp16"), default="no",
                   help="autocast of the model (python -m audioset_dcls evaluate uses bf16 on CUDA)")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    from accelerate import Accelerator

    from audioset_dcls.models import create_model

    accelerator = Accelerator(cpu=not torch.cuda.is_available(), mixed_precision=args.mixed_precision)
    device = accelerator.device
    with tempfile.TemporaryDirectory() as tmp:
        shards_dir = args.shards or build_synthetic_eval_shards(Path(tmp), args.clips)
        shards = open_shard_set(shards_dir, "--shards")
        frames = shards.features.num_frames
        print(f"machine: {cpu_name()}, {os.cpu_count()} CPUs, "
              f"{torch.get_num_threads()} torch threads, device {device}; {shards.num_samples} clips of "
              f"{shards.features.clip_seconds:g} s in {len(shards.urls)} shards; batch {args.batch_size}; "
              f"mixed precision {args.mixed_precision}")
        models = {n: create_model(n, num_classes=shards.num_classes).to(device).eval() for n in args.models}
        loader: dict[int, list[float]] = {w: [] for w in args.workers}
        model_sps: dict[str, list[float]] = {n: [] for n in models}
        evaluate_sps: dict[tuple[str, int], list[float]] = {(n, w): [] for n in models for w in args.workers}
        for _ in range(args.repeats):
            for w in args.workers:
                loader[w].append(bench_loader(shards, args.batch_size, w, device))
            for n, m in models.items():
                model_sps[n].append(bench_model(m, frames, args.batch_size, args.model_batches, accelerator))
                for w in args.workers:
                    evaluate_sps[(n, w)].append(bench_evaluate(m, shards, args.batch_size, w, accelerator)[0])
    best = lambda xs: max(xs)  # noqa: E731 - the least-disturbed run on a shared machine
    spread = lambda xs: f"{min(xs):.1f}-{max(xs):.1f}"  # noqa: E731
    print(f"\n{'what':<40} {'clips/s (best)':>15} {'range':>14}")
    for w, xs in loader.items():
        print(f"{'loader alone, ' + str(w) + ' worker(s)':<40} {best(xs):>15.1f} {spread(xs):>14}")
    for n, xs in model_sps.items():
        print(f"{'model alone, ' + n:<40} {best(xs):>15.1f} {spread(xs):>14}")
    for (n, w), xs in evaluate_sps.items():
        print(f"{'evaluate, ' + n + f', {w} worker(s)':<40} {best(xs):>15.1f} {spread(xs):>14}")
    print("\nratios (> 1: the loader outruns the whole evaluation; evaluate/model near 1: model-bound)")
    for (n, w), xs in evaluate_sps.items():
        print(f"  {n}, {w} worker(s): loader/evaluate {best(loader[w]) / best(xs):.2f}x, "
              f"evaluate/model {best(xs) / best(model_sps[n]):.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
