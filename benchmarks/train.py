"""Does the GPU starve? Samples/s of the training data loader alone vs the training step alone.

    python benchmarks/train.py [--shards DIR] [--models convnext_atto convnext_tiny_dcls ...]
        [--batch-size 32] [--workers 4] [--steps 20] [--mixed-precision bf16]

- loader: the real training pipeline (data.build_train_loader: resampled shards -> tar ->
  shuffle -> decode -> normalise -> batch, ``--workers`` processes), batches moved to the device.
- step: forward + BCE + backward + AdamW step + the on-device augmentations of the reference
  recipe, on one batch already on the device, per model (what the loop costs without data).
If the loader's samples/s is below a model's step samples/s, that model waits for data: add
loader workers (per GPU) or CPU cores. Without ``--shards`` a small synthetic shard set (10 s
clips) is built in a temp dir with the real shard builder.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from audioset_dcls.augment import augment_batch  # noqa: E402
from audioset_dcls.config import AugmentConfig, DataConfig  # noqa: E402
from audioset_dcls.data import build_train_loader, move_batch, open_shard_set  # noqa: E402
from audioset_dcls.features import Normalization  # noqa: E402


def build_synthetic_shards(root: Path, num_train: int) -> Path:
    from audioset_dcls.synthetic import make_mini_audioset
    from preprocessing.build_shards import BuildOptions, build_shards

    ds = make_mini_audioset(root / "audio", num_train=num_train, num_eval=1, broken=False)
    out = root / "shards"
    build_shards(BuildOptions(segments=(ds.segments["train"],), labels=ds.labels_csv, audio_dir=ds.audio_dir,
                              out=out, split="train", workers=min(4, os.cpu_count() or 1), shard_size=16,
                              progress=False))
    return out


def bench_loader(shards, batch_size: int, workers: int, batches: int, device: torch.device) -> float:
    cfg = DataConfig(batch_size=batch_size, num_workers=workers, samples_per_epoch=batch_size * batches * max(1, workers),
                     shuffle_buffer=200, shuffle_initial=50)
    it, _ = build_train_loader(shards, cfg, Normalization(), epoch=0, seed=0, rank=0, world_size=1, accum=1)
    first = next(it)  # worker start-up is not throughput
    move_batch(first, device)
    n, t0 = 0, time.perf_counter()
    for i, b in enumerate(it):
        move_batch(b, device)
        n += b["x"].shape[0]
        if i + 1 >= batches:
            break
    if device.type == "cuda":
        torch.cuda.synchronize()
    return n / (time.perf_counter() - t0)


def bench_step(name: str, num_classes: int, frames: int, batch_size: int, steps: int, device: torch.device,
               mixed_precision: str) -> float:
    from audioset_dcls.models import create_model, param_groups

    model = create_model(name, num_classes=num_classes, drop_path_rate=0.4).to(device).train()
    opt = torch.optim.AdamW(param_groups(model, 1e-4, 0.05), lr=1e-4)
    x = torch.randn(batch_size, 1, 128, frames, device=device)
    y = (torch.rand(batch_size, num_classes, device=device) < 0.05).float()
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(mixed_precision)
    crit = torch.nn.BCEWithLogitsLoss()

    def step(i: int) -> None:
        g = torch.Generator(device=device).manual_seed(i)
        xa, ya = augment_batch(x, y, AugmentConfig(), g)
        with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            loss = crit(model(xa).float(), ya)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    for i in range(2):  # warm-up (allocator, cudnn autotune)
        step(i)
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for i in range(steps):
        step(i)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return batch_size * steps / (time.perf_counter() - t0)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--shards", type=Path, help="training shard directory (default: build a small synthetic one)")
    p.add_argument("--models", nargs="+", default=None, help="default: convnext_atto on CPU, the six paper models on GPU")
    p.add_argument("--batch-size", type=int, default=None, help="default 8 on CPU, 64 on GPU")
    p.add_argument("--workers", type=int, default=None, help="loader processes (default: all cores, max 8)")
    p.add_argument("--loader-batches", type=int, default=20)
    p.add_argument("--steps", type=int, default=None, help="timed training steps (default 3 on CPU, 20 on GPU)")
    p.add_argument("--mixed-precision", choices=["no", "bf16", "fp16"], default=None, help="default bf16 on GPU")
    p.add_argument("--json", action="store_true", help="print one JSON line instead of a table")
    args = p.parse_args(argv)

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    gpu = device.type == "cuda"
    models = args.models or (["convnext_tiny", "convnext_tiny_dcls", "convformer_s18", "convformer_s18_dcls",
                              "fastvit_sa24", "fastvit_sa24_dcls"] if gpu else ["convnext_atto"])
    batch = args.batch_size or (64 if gpu else 8)
    steps = args.steps or (20 if gpu else 3)
    workers = args.workers if args.workers is not None else min(8, os.cpu_count() or 1)
    mp = args.mixed_precision or ("bf16" if gpu else "no")
    if gpu:
        torch.backends.cudnn.benchmark = True

    with tempfile.TemporaryDirectory() as tmp:
        shard_dir = args.shards or build_synthetic_shards(Path(tmp), num_train=max(64, batch * 4))
        shards = open_shard_set(shard_dir, "--shards")
        loader_sps = bench_loader(shards, batch, workers, args.loader_batches, device)
        results = {"device": torch.cuda.get_device_name() if gpu else f"CPU ({os.cpu_count()} cores, {platform.processor() or platform.machine()})",
                   "torch_threads": torch.get_num_threads(), "batch_size": batch, "loader_workers": workers,
                   "mixed_precision": mp, "frames": shards.features.num_frames,
                   "loader_samples_per_s": round(loader_sps, 1), "step_samples_per_s": {}}
        for name in models:
            sps = bench_step(name, shards.num_classes if not gpu else 527, shards.features.num_frames, batch, steps,
                             device, mp)
            results["step_samples_per_s"][name] = round(sps, 1)
    if args.json:
        print(json.dumps(results))
        return 0
    print(f"device: {results['device']}; torch threads {results['torch_threads']}; batch {batch}; "
          f"mixed precision {mp}; {results['frames']} frames")
    print(f"loader ({workers} workers): {loader_sps:8.1f} samples/s")
    for name, sps in results["step_samples_per_s"].items():
        verdict = "loader keeps up" if loader_sps >= sps else f"STARVES: loader gives {loader_sps / sps:.0%} of what it needs"
        print(f"step {name:22s} {sps:8.1f} samples/s   {verdict}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
