"""Inference speed and memory: per-clip latency, batch throughput, baked vs unbaked DCLS, and a
long file tagged end to end.

For each model (random weights, 527 classes, written to a temporary checkpoint and loaded the
way the tagger loads it):

* latency of one 10 s clip at batch 1 (model only, on a (1, 1, 128, 1001) log-mel; median of
  ``--repeats`` runs after warm-up), and clips/s at batch ``--batch``;
* for DCLS models both the baked form (plain depthwise conv, what the tagger runs) and the
  training form (kernel built on every forward);
* the front end alone (log-mel of one 10 s window).

Then a generated ``--long-seconds`` file (default 10 min, 44.1 kHz stereo FLAC) is tagged with
``--long-model`` in a fresh process (``Tagger``, streamed, hop 10 s) and its wall time and peak
RSS are printed, next to a 2-minute file for the memory comparison: if memory is bounded, the
two peaks are about equal (glibc heap fragmentation adds a few tens of MB that plateau; see
benchmarks/RESULTS.md).

    python benchmarks/infer.py --threads 2 --models convnext_tiny convnext_tiny_dcls
    python benchmarks/infer.py --device cuda --precision bf16 --skip-models --batch 32   # the long file on a GPU

With ``--stdin-seconds S`` (and ``--skip-models --skip-long``): live tagging from a pipe. ``infer.py
--stdin`` runs in a fresh process with ``--long-model``; once it has loaded, S seconds of 32 kHz
mono s16le PCM are written into its standard input **in real time** (20 ms chunks, paced by the
clock, as ``arecord`` delivers them), and the latency of each window is the time from the moment
the window's last sample entered the pipe to the moment its JSONL line came out (median, 90th
percentile, max), with the hop ``--hop``:

    python benchmarks/infer.py --skip-models --skip-long --stdin-seconds 40 --hop 1 --threads 2
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def _peak_rss_mb() -> float:
    """Peak resident memory of this process in MB. VmHWM, not ru_maxrss: Linux carries
    ru_maxrss over fork + exec, so a worker started by a big parent would report the parent's."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024  # kB
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def _current_rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def _write_checkpoint(model_name: str, folder: Path, num_classes: int = 527) -> Path:
    import torch

    from audioset_dcls.hub.checkpoint import CheckpointInfo, save_inference_checkpoint
    from audioset_dcls.models import create_model

    torch.manual_seed(0)
    model = create_model(model_name, num_classes=num_classes)
    labels = [{"index": i, "mid": f"/x/{i}", "name": f"class {i}"} for i in range(num_classes)]
    return save_inference_checkpoint(folder / f"{model_name}.safetensors", model.state_dict(),
                                     CheckpointInfo(model_name, num_classes, labels=labels))


def _timed(fn, x) -> tuple[float, float]:
    """(wall seconds, process CPU seconds) of one call. CPU time counts every thread, so on a
    machine shared with other jobs cpu_s / threads estimates the wall time of an idle one."""
    c0, t0 = time.process_time(), time.perf_counter()
    fn(x)
    return time.perf_counter() - t0, time.process_time() - c0


def bench_models(args: argparse.Namespace, folder: Path) -> None:
    """All forms are loaded first and then timed in turns (form A, B, C, A, B, C, ...), so a
    change in the load from other processes hits every form alike and the ratios stay fair."""
    import torch

    from audioset_dcls.hub.checkpoint import load_model
    from audioset_dcls.features import FeatureConfig, LogMel

    cfg = FeatureConfig()
    forms: dict[tuple[str, str], torch.nn.Module] = {("front end", "log-mel"): LogMel(cfg)}
    for name in args.models:
        ckpt = _write_checkpoint(name, folder)
        for form, bake in ([("baked", True), ("unbaked", False)] if name.endswith("_dcls") else [("plain", True)]):
            forms[(name, form)] = load_model(ckpt, bake=bake)[0]
    inputs = {1: torch.randn(1, 1, cfg.n_mels, cfg.num_frames),
              args.batch: torch.randn(args.batch, 1, cfg.n_mels, cfg.num_frames)}
    wave = {1: torch.randn(1, cfg.clip_samples) * 0.1, args.batch: torch.randn(args.batch, cfg.clip_samples) * 0.1}
    times: dict[tuple[str, str, int], list[tuple[float, float]]] = {}
    bf16 = args.precision == "bf16"  # the models under CPU autocast, as `infer.py --precision bf16`
    print(f"# model precision: {args.precision} (the front end is always float32)")
    with torch.inference_mode():
        for batch, repeats in ((1, args.repeats), (args.batch, max(2, args.repeats // 2))):
            for key, module in forms.items():  # warm-up: oneDNN builds kernels on the first calls of a shape
                for _ in range(2 if batch == 1 else 1):
                    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16 and key[0] != "front end"):
                        module(wave[batch] if key[0] == "front end" else inputs[batch])
            for _ in range(repeats):
                for key, module in forms.items():
                    x = wave[batch] if key[0] == "front end" else inputs[batch]
                    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16 and key[0] != "front end"):
                        times.setdefault((*key, batch), []).append(_timed(module, x))
    med = {k: (statistics.median(w for w, _ in v), statistics.median(c for _, c in v)) for k, v in times.items()}
    print(f"{'model':<22} {'form':<9} {'batch1 ms/clip':>15} {'(cpu ms)':>9} "
          f"{f'batch{args.batch} clips/s':>16} {'(clips/cpu-s x threads)':>24}")
    for name, form in forms:
        w1, c1 = med[(name, form, 1)]
        wb, cb = med[(name, form, args.batch)]
        print(f"{name:<22} {form:<9} {w1 * 1e3:>15.1f} {c1 * 1e3:>9.1f} {args.batch / wb:>16.2f} "
              f"{args.batch / cb * args.threads:>24.2f}")
    for name, form in forms:
        if form == "baked":
            base = name[: -len("_dcls")]
            if (base, "plain", 1) in med:
                for b in (1, args.batch):
                    print(f"ratio {name} baked / {base} at batch {b}: wall {med[(name, 'baked', b)][0] / med[(base, 'plain', b)][0]:.2f}x, "
                          f"cpu {med[(name, 'baked', b)][1] / med[(base, 'plain', b)][1]:.2f}x")
            print(f"ratio {name} unbaked / baked at batch 1: wall {med[(name, 'unbaked', 1)][0] / med[(name, 'baked', 1)][0]:.2f}x")


def long_worker(ckpt: str, audio: str, threads: int, hop: float, batch: int, precision: str,
                device: str = "cpu") -> None:
    """Runs in a fresh process: load, tag one file, print JSON with times and peak RSS (and the
    peak CUDA memory on a GPU)."""
    import torch

    from audioset_dcls.tagging.tagger import Tagger

    t0 = time.perf_counter()
    tagger = Tagger.from_checkpoint(ckpt, device=device, threads=threads, hop_seconds=hop, batch_size=batch,
                                    precision=precision)
    t_load = time.perf_counter() - t0
    rss_loaded = _peak_rss_mb()
    # Sample the current RSS while tagging: a bounded pipeline levels off early, one that holds
    # the signal keeps growing until the end.
    samples: list[tuple[float, float]] = []
    stop = threading.Event()

    def sample() -> None:
        while not stop.wait(0.25):
            samples.append((time.perf_counter(), _current_rss_mb()))

    sampler = threading.Thread(target=sample, daemon=True)
    c0, t0 = time.process_time(), time.perf_counter()
    sampler.start()
    result = tagger.tag(audio)
    t_tag, c_tag = time.perf_counter() - t0, time.process_time() - c0
    stop.set()
    sampler.join()
    quartiles = [max((r for t, r in samples if t - t0 <= q * t_tag), default=rss_loaded) for q in (0.25, 0.5, 0.75, 1.0)]
    cuda_mb = torch.cuda.max_memory_allocated() / 1e6 if tagger.device.type == "cuda" else None
    print(json.dumps({"load_s": t_load, "tag_s": t_tag, "tag_cpu_s": c_tag, "windows": result.num_windows, "duration": result.duration,
                      "rss_after_load_mb": rss_loaded, "peak_rss_mb": _peak_rss_mb(),
                      "max_rss_by_quarter_mb": quartiles, "device": str(tagger.device), "precision": tagger.precision,
                      "peak_cuda_mb": cuda_mb}))


def bench_long(args: argparse.Namespace, folder: Path) -> None:
    import numpy as np
    import soundfile as sf

    ckpt = _write_checkpoint(args.long_model, folder)
    rows = []
    for seconds in sorted({min(120.0, args.long_seconds), args.long_seconds}):
        path = folder / f"long_{int(seconds)}s.flac"
        rng = np.random.default_rng(0)
        with sf.SoundFile(str(path), "w", 44100, 2, format="FLAC", subtype="PCM_16") as f:
            for _ in range(int(seconds // 10)):  # written in 10 s pieces: the generator stays small too
                x = (0.05 * rng.standard_normal((441000, 1))).astype(np.float32)
                f.write(np.concatenate([x, 0.5 * x], axis=1))
        proc = subprocess.run(
            [sys.executable, __file__, "--worker-long", str(ckpt), str(path), "--threads", str(args.threads),
             "--hop", str(args.hop), "--batch", str(args.batch), "--precision", args.precision, "--device", args.device],
            capture_output=True, text=True, check=True,
            env={**os.environ, "OMP_NUM_THREADS": str(args.threads)},
        )
        r = json.loads(proc.stdout.strip().splitlines()[-1])
        rows.append(r)
        if args.json:
            print(json.dumps({"seconds": seconds, "model": args.long_model, "batch": args.batch, **r}), flush=True)
        cuda = f", peak CUDA memory {r['peak_cuda_mb']:.0f} MB" if r.get("peak_cuda_mb") is not None else ""
        print(f"{args.long_model} ({r['precision']} on {r['device']}{cuda}), {seconds / 60:.0f} min 44.1 kHz stereo FLAC, "
              f"hop {args.hop:g} s, "
              f"batch {args.batch}, "
              f"{args.threads} threads: tagged in {r['tag_s']:.1f} s ({r['windows']} windows, "
              f"{r['duration'] / r['tag_s']:.0f}x real time; CPU {r['tag_cpu_s']:.1f} s; load {r['load_s']:.1f} s); "
              f"RSS after load {r['rss_after_load_mb']:.0f} MB, peak {r['peak_rss_mb']:.0f} MB; highest RSS by the end of "
              f"each quarter of the run: {', '.join(f'{q:.0f}' for q in r['max_rss_by_quarter_mb'])} MB", flush=True)
    if len(rows) < 2:
        return
    whole = args.long_seconds * 32000 * 4 / 1e6
    print(f"peak RSS growth from 2 min to {args.long_seconds / 60:.0f} min: "
          f"{rows[1]['peak_rss_mb'] - rows[0]['peak_rss_mb']:+.0f} MB "
          f"(the decoded {args.long_seconds / 60:.0f} min signal alone would be {whole:.0f} MB at 32 kHz float32)")


def bench_stdin(args: argparse.Namespace, folder: Path) -> None:
    """Latency per window of ``infer.py --stdin`` fed in real time (see the module docstring)."""
    import numpy as np

    rate, chunk_s = 32000, 0.02
    ckpt = _write_checkpoint(args.long_model, folder)
    rng = np.random.default_rng(0)
    n = int(args.stdin_seconds * rate)
    t = np.arange(n) / rate
    pcm = (0.2 * np.sin(2 * np.pi * 440 * t) * (np.sin(2 * np.pi * 0.1 * t) > 0)
           + 0.01 * rng.standard_normal(n)) * 32767
    data = pcm.astype("<i2").tobytes()
    # The floor: one window's front end + model in this process, at batch 1, under the same load.
    import torch

    from audioset_dcls.tagging.tagger import Tagger

    tagger = Tagger.from_checkpoint(ckpt, device=args.device, threads=args.threads, precision=args.precision)
    wave = torch.zeros(1, tagger.features.clip_samples)
    tagger.forward_windows(wave)
    compute = []
    for _ in range(5):
        t0 = time.perf_counter()
        tagger.forward_windows(wave)
        compute.append(time.perf_counter() - t0)
    del tagger
    cmd = [sys.executable, str(REPO / "infer.py"), "--checkpoint", str(ckpt), "--stdin", "--rate", str(rate),
           "--hop", str(args.hop), "--threads", str(args.threads), "--top-k", "5", "--events",
           "--precision", args.precision, "--device", args.device]
    proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            env={**os.environ, "OMP_NUM_THREADS": str(args.threads)})
    header = proc.stderr.readline().decode().strip()  # printed once the model is loaded
    written: list[tuple[int, float]] = []  # (samples in the pipe, time)

    def feed() -> None:
        step = int(chunk_s * rate) * 2
        t0 = time.perf_counter()
        for i, k in enumerate(range(0, len(data), step)):
            delay = t0 + i * chunk_s - time.perf_counter()
            if delay > 0:
                time.sleep(delay)
            proc.stdin.write(data[k : k + step])
            proc.stdin.flush()
            written.append((min(len(data), k + step) // 2, time.perf_counter()))
        proc.stdin.close()

    feeder = threading.Thread(target=feed)
    feeder.start()
    latencies = []
    for line in proc.stdout:
        arrived = time.perf_counter()
        rec = json.loads(line)
        if "window" not in rec:
            continue
        end = int(round(rec["end"] * rate))
        entered = next(t for samples, t in written if samples >= end)
        latencies.append(arrived - entered)
    feeder.join()
    proc.wait()
    lat = sorted(latencies)
    pct = lat[min(len(lat) - 1, int(0.9 * len(lat)))]
    load = os.getloadavg()[0]
    print(f"# {header}")
    print(f"stdin latency, {args.long_model} ({args.precision} on {args.device}), {args.threads} threads, hop "
          f"{args.hop:g} s, {args.stdin_seconds:g} s of 32 kHz mono fed in real time: {len(lat)} windows, "
          f"median {statistics.median(lat) * 1e3:.0f} ms, p90 {pct * 1e3:.0f} ms, max {lat[-1] * 1e3:.0f} ms "
          f"from a window's last sample entering the pipe to its JSONL line (1-min load average {load:.1f} on "
          f"{os.cpu_count()} CPUs); one window's front end + model alone: {statistics.median(compute) * 1e3:.0f} ms "
          "(median of 5, batch 1)")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--models", nargs="+", default=["convnext_tiny", "convnext_tiny_dcls"])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--batch", type=int, default=8, help="batch size for the throughput and long-file runs")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--long-model", default="convnext_tiny_dcls")
    p.add_argument("--long-seconds", type=float, default=600.0)
    p.add_argument("--hop", type=float, default=10.0)
    p.add_argument("--precision", choices=("fp32", "bf16"), default="fp32",
                   help="model arithmetic on the CPU (bf16: torch.autocast, as infer.py --precision bf16)")
    p.add_argument("--device", default="cpu", help="device of the long-file tagging: cpu, cuda (default: cpu)")
    p.add_argument("--json", action="store_true", help="long file: also print each run's JSON record")
    p.add_argument("--skip-models", action="store_true")
    p.add_argument("--skip-long", action="store_true")
    p.add_argument("--stdin-seconds", type=float, default=0.0,
                   help="live tagging: feed this many seconds into infer.py --stdin in real time and measure "
                        "the latency per window (0: skip)")
    p.add_argument("--worker-long", nargs=2, metavar=("CKPT", "AUDIO"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    import torch

    torch.set_num_threads(args.threads)
    if args.worker_long:
        long_worker(*args.worker_long, threads=args.threads, hop=args.hop, batch=args.batch, precision=args.precision,
                    device=args.device)
        return 0
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {os.cpu_count()} CPUs visible")
    with tempfile.TemporaryDirectory() as tmp:
        if not args.skip_models:
            bench_models(args, Path(tmp))
        if not args.skip_long:
            bench_long(args, Path(tmp))
        if args.stdin_seconds > 0:
            bench_stdin(args, Path(tmp))
    return 0


if __name__ == "__main__":
    sys.exit(main())
