"""Does the GPU starve? Samples/s of the training data loader alone vs the training step alone.

    python benchmarks/train.py [--shards DIR] [--models convnext_atto convnext_tiny_dcls ...]
        [--batch-size 32] [--workers 4] [--steps 20] [--mixed-precision bf16] [--encoding-clips 48]

- loader: the real training pipeline (data.build_train_loader: resampled shards -> tar ->
  shuffle -> decode -> normalise -> batch, ``--workers`` processes), batches moved to the device.
- step: forward + BCE + backward + AdamW step + the on-device augmentations of the reference
  recipe, on one batch already on the device, per model (what the loop costs without data).
- encodings: the same ``--encoding-clips`` full-length real-world-like clips (benchmarks/clips.py)
  built as uint8 and as float16 shards; the loader's samples/s with ONE worker process (per
  worker; wall clock, and per CPU second of the worker and the main process, which other
  processes' load does not change), the two encodings alternating ``--rounds`` times (median),
  and bytes per clip.
If the loader's samples/s is below a model's step samples/s, that model waits for data: add
loader workers (per GPU) or CPU cores. Without ``--shards`` a small synthetic shard set (10 s
clips) is built in a temp dir with the real shard builder.

``--sync-model NAME`` also times that model's step with one host synchronisation per step (a
``.item()`` of a device scalar): what the stop-signal poll of a multi-process run adds to each
optimizer step (training.poll_stop: an all-reduce of one integer, then ``.item()``).
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
from audioset_dcls.models import list_models  # noqa: E402


def build_synthetic_shards(root: Path, num_train: int) -> Path:
    from audioset_dcls.shards.build import BuildOptions, build_shards
    from audioset_dcls.synthetic import make_mini_audioset

    ds = make_mini_audioset(root / "audio", num_train=num_train, num_eval=1, broken=False)
    out = root / "shards"
    build_shards(BuildOptions(segments=(ds.segments["train"],), labels=ds.labels_csv, audio_dir=ds.audio_dir,
                              out=out, split="train", workers=min(4, os.cpu_count() or 1), shard_size=16,
                              progress=False))
    return out


def compare_encodings(root: Path, clips: int, batch_size: int, batches: int, rounds: int,
                      device: torch.device) -> dict:
    """uint8 vs float16 shards of the same clips: bytes per clip and loader samples/s per worker."""
    from statistics import median

    from audioset_dcls.shards.build import BuildOptions, build_shards
    from benchmarks.clips import write_realistic_dataset

    segments, labels, audio, _, espeak = write_realistic_dataset(root / "real", clips)
    sets, size = {}, {}
    for encoding in ("uint8", "float16"):
        out = root / f"shards_{encoding}"
        build_shards(BuildOptions(segments=(segments,), labels=labels, audio_dir=audio, out=out, split="train",
                                  workers=min(2, os.cpu_count() or 1), shard_size=8, encoding=encoding,
                                  progress=False))
        sets[encoding] = open_shard_set(out, encoding)
        size[encoding] = sum(s["bytes"] for s in sets[encoding].manifest["shards"]) / sets[encoding].num_samples
    speed = {e: [] for e in sets}
    cpu = {e: [] for e in sets}
    for _ in range(rounds):  # alternate, so load changes on a shared machine hit both alike
        for encoding, shards in sets.items():
            speed[encoding].append(bench_loader(shards, batch_size, 1, batches, device))
            cpu[encoding].append(bench_loader_cpu(shards, batch_size, batches))
    sps = {e: median(v) for e, v in speed.items()}
    sps_cpu = {e: median(v) for e, v in cpu.items()}
    return {"clips": clips, "speech_by": "espeak-ng" if espeak else "formant babble", "bytes_per_clip": size,
            "loader_samples_per_s_1_worker": sps, "runs": speed, "uint8_over_float16": sps["uint8"] / sps["float16"],
            "loader_samples_per_cpu_s": sps_cpu, "uint8_over_float16_cpu": sps_cpu["uint8"] / sps_cpu["float16"]}


def bench_loader_cpu(shards, batch_size: int, batches: int) -> float:
    """Samples per CPU second of a one-worker training loader: the worker process's CPU time
    (counted once it has exited) plus this process's, so other processes' load does not count."""
    import resource

    cfg = DataConfig(batch_size=batch_size, num_workers=1, samples_per_epoch=batch_size * batches,
                     shuffle_buffer=200, shuffle_initial=50)

    def cpu() -> float:
        child = resource.getrusage(resource.RUSAGE_CHILDREN)
        return time.process_time() + child.ru_utime + child.ru_stime

    t0 = cpu()
    it, per_rank = build_train_loader(shards, cfg, Normalization(), epoch=0, seed=0, rank=0, world_size=1, accum=1)
    n = sum(b["x"].shape[0] for b in it)  # the whole epoch: the worker exits and is reaped
    del it
    return n / (cpu() - t0)


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
               mixed_precision: str, sync_every_step: bool = False) -> float:
    from audioset_dcls.models import create_model, param_groups

    model = create_model(name, num_classes=num_classes, drop_path_rate=0.4).to(device).train()
    opt = torch.optim.AdamW(param_groups(model, 1e-4, 0.05), lr=1e-4)
    x = torch.randn(batch_size, 1, 128, frames, device=device)
    y = (torch.rand(batch_size, num_classes, device=device) < 0.05).float()
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(mixed_precision)
    crit = torch.nn.BCEWithLogitsLoss()
    flag = torch.zeros((), dtype=torch.int32, device=device)

    def step(i: int) -> None:
        g = torch.Generator(device=device).manual_seed(i)
        xa, ya = augment_batch(x, y, AugmentConfig(), g)
        with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            loss = crit(model(xa).float(), ya)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if sync_every_step:
            flag.item()  # waits for the step's kernels, as the stop poll's all-reduce result does

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
    p.add_argument("--encoding-clips", type=int, default=48,
                   help="clips for the uint8 vs float16 loader comparison (0: skip it)")
    p.add_argument("--rounds", type=int, default=5, help="alternating rounds of that comparison")
    p.add_argument("--clips", type=int, default=None, help="synthetic training clips (default: max(64, 4 x batch))")
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda if available)")
    p.add_argument("--sync-model", default=None, metavar="NAME",
                   help="also time NAME's step with a host sync per step (the stop-signal poll's cost)")
    p.add_argument("--json", action="store_true", help="print one JSON line instead of a table")
    args = p.parse_args(argv)

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    gpu = device.type == "cuda"
    models = args.models or (list_models(paper=True) if gpu else ["convnext_atto"])
    batch = args.batch_size or (64 if gpu else 8)
    steps = args.steps or (20 if gpu else 3)
    workers = args.workers if args.workers is not None else min(8, os.cpu_count() or 1)
    mp = args.mixed_precision or ("bf16" if gpu else "no")
    if gpu:
        torch.backends.cudnn.benchmark = True

    with tempfile.TemporaryDirectory() as tmp:
        shard_dir = args.shards or build_synthetic_shards(Path(tmp), num_train=args.clips or max(64, batch * 4))
        shards = open_shard_set(shard_dir, "--shards")
        loader_sps = bench_loader(shards, batch, workers, args.loader_batches, device)
        encodings = (compare_encodings(Path(tmp), args.encoding_clips, batch, args.loader_batches, args.rounds, device)
                     if args.encoding_clips else None)
        results = {"device": torch.cuda.get_device_name() if gpu else f"CPU ({os.cpu_count()} cores, {platform.processor() or platform.machine()})",
                   "torch_threads": torch.get_num_threads(), "batch_size": batch, "loader_workers": workers,
                   "mixed_precision": mp, "frames": shards.features.num_frames,
                   "loader_samples_per_s": round(loader_sps, 1), "loader_encoding": shards.manifest.get("encoding", {}).get("name", "float16"),
                   "encodings": encodings, "step_samples_per_s": {}}
        for name in models:
            sps = bench_step(name, shards.num_classes if not gpu else 527, shards.features.num_frames, batch, steps,
                             device, mp)
            results["step_samples_per_s"][name] = round(sps, 1)
        if args.sync_model:
            classes = shards.num_classes if not gpu else 527
            plain, synced = (bench_step(args.sync_model, classes, shards.features.num_frames, batch, steps, device, mp,
                                        sync_every_step=sync) for sync in (False, True))
            results["host_sync_per_step"] = {"model": args.sync_model, "samples_per_s": round(plain, 1),
                                             "samples_per_s_with_sync": round(synced, 1),
                                             "ratio": round(synced / plain, 3)}
    if args.json:
        print(json.dumps(results))
        return 0
    print(f"device: {results['device']}; torch threads {results['torch_threads']}; batch {batch}; "
          f"mixed precision {mp}; {results['frames']} frames")
    print(f"loader ({workers} workers, {results['loader_encoding']} shards): {loader_sps:8.1f} samples/s")
    if encodings:
        e = encodings
        print(f"encodings, {e['clips']} real-world-like 10 s clips (speech by {e['speech_by']}), loader with 1 worker, "
              f"median of {args.rounds} alternating runs:")
        for name in ("uint8", "float16"):
            runs = " ".join(f"{v:.0f}" for v in e["runs"][name])
            print(f"  {name:8s} {e['bytes_per_clip'][name] / 1e3:7.1f} kB per clip   "
                  f"{e['loader_samples_per_s_1_worker'][name]:8.1f} samples/s per worker (runs: {runs}); "
                  f"{e['loader_samples_per_cpu_s'][name]:8.1f} samples per CPU second (worker + main process)")
        print(f"  uint8 / float16 loader speed: {e['uint8_over_float16']:.2f} per worker, "
              f"{e['uint8_over_float16_cpu']:.2f} per CPU second  (target >= 0.9)")
    for name, sps in results["step_samples_per_s"].items():
        verdict = "loader keeps up" if loader_sps >= sps else f"STARVES: loader gives {loader_sps / sps:.0%} of what it needs"
        print(f"step {name:22s} {sps:8.1f} samples/s   {verdict}")
    if "host_sync_per_step" in results:
        h = results["host_sync_per_step"]
        print(f"step {h['model']} with a host sync per step: {h['samples_per_s_with_sync']:.1f} vs "
              f"{h['samples_per_s']:.1f} samples/s without ({h['ratio']:.3f}x)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
