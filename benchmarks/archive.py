"""Tagging a whole folder: the archive job (decoding in loader workers, overlapped with the model)
against today's ``infer.py`` (decoding between model batches in the main process), same model,
same threads; the decode rate of one worker alone (to size ``--workers`` on a GPU); peak RSS of
the job for growing numbers of files (it should stay flat).

    python benchmarks/archive.py --files 500 --model convnext_tiny_dcls

Files: 10 s synthetic clips in four formats and layouts (44.1 kHz stereo FLAC, 44.1 kHz mono
MP3, 48 kHz stereo Ogg Vorbis, 32 kHz mono 16-bit WAV), written once into ``--data``. Random
weights (527 classes): speed does not depend on them. Each run is a fresh process with
``OMP_NUM_THREADS=1``: infer.py ``--threads 1``, the job ``--threads 1 --workers 1`` (one model
thread and one decoding process: the 2 cores of the reference machine).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import soundfile as sf

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

FORMATS = [("flac", "FLAC", "PCM_16", 44100, 2), ("mp3", "MP3", None, 44100, 1), ("ogg", "OGG", "VORBIS", 48000, 2),
           ("wav", "WAV", "PCM_16", 32000, 1)]


def make_files(folder: Path, count: int, seconds: float = 10.0) -> list[Path]:
    """``count`` clips cycling through FORMATS (kept between runs)."""
    from audioset_dcls.synthetic import synthesize_clip

    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(count):
        ext, fmt, sub, sr, ch = FORMATS[i % len(FORMATS)]
        path = folder / f"clip_{i:05d}.{ext}"
        if not path.is_file():
            rng = np.random.default_rng(i)
            mono = synthesize_clip([i % 10, (i * 7) % 10], seconds, sr, rng)
            sf.write(str(path), np.stack([mono, 0.6 * mono], 1) if ch == 2 else mono, sr, format=fmt, subtype=sub)
        paths.append(path)
    return paths


def make_checkpoint(path: Path, model_name: str) -> Path:
    import torch

    from audioset_dcls.hub.checkpoint import CheckpointInfo, save_inference_checkpoint
    from audioset_dcls.labels import audioset_label_set
    from audioset_dcls.models import create_model

    if not path.is_file():
        torch.manual_seed(0)
        labels = audioset_label_set()
        model = create_model(model_name, num_classes=527)
        info = CheckpointInfo(model_name=model_name, num_classes=527,
                              labels=[{"index": i, "mid": m, "name": n} for i, (m, n) in enumerate(zip(labels.mids, labels.names))])
        save_inference_checkpoint(path, model.state_dict(), info)
    return path


def timed(cmd: list[str]) -> tuple[float, dict]:
    """Wall seconds of a fresh process, and the peak RSS (MB) it and its children report."""
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONPATH=str(REPO))
    wrapper = ("import resource, runpy, sys, json; sys.argv = sys.argv[1:]; code = 0\n"
               "try:\n    (runpy.run_path if sys.argv[0].endswith('.py') else runpy.run_module)(sys.argv[0], run_name='__main__')\n"
               "except SystemExit as e:\n    code = e.code or 0\n"
               "s, ch = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)\n"
               "print(json.dumps({'main_mb': s.ru_maxrss / 1024, 'child_mb': ch.ru_maxrss / 1024, 'rc': code,\n"
               "                  'cpu_s': s.ru_utime + s.ru_stime + ch.ru_utime + ch.ru_stime}), file=sys.stderr)")
    t = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", wrapper, *cmd], env=env, cwd=REPO, capture_output=True, text=True)
    wall = time.perf_counter() - t
    last = proc.stderr.strip().splitlines()[-1]
    info = json.loads(last)
    if info["rc"] not in (0, 1):
        raise RuntimeError(proc.stderr[-3000:])
    return wall, info


def decode_rate(paths: list[Path], sample_rate: int = 32000) -> str:
    """decode_input (decode, downmix, resample, window) in this process: files/s of wall time and
    of CPU time (the steadier figure on a shared machine: what one worker gives on a core of its
    own), and the CPU ms per file by format."""
    from audioset_dcls.tagging.archive_inputs import ArchiveInput, decode_input

    cpu: dict[str, list[float]] = {}
    t, c0 = time.perf_counter(), time.process_time()
    for p in paths:
        c = time.process_time()
        decode_input(ArchiveInput(p.name, str(p)), sample_rate, 10 * sample_rate, 10 * sample_rate)
        cpu.setdefault(p.suffix, []).append(time.process_time() - c)
    wall, total = time.perf_counter() - t, time.process_time() - c0
    by_format = ", ".join(f"{k} {1000 * np.mean(v):.1f}" for k, v in sorted(cpu.items()))
    return (f"decode alone, 1 process, {len(paths)} files: {len(paths) / wall:.1f} files/s wall, "
            f"{len(paths) / total:.1f} files/s of CPU time ({1000 * total / len(paths):.1f} CPU ms per 10 s file; "
            f"by format: {by_format})")


def compare(folder: Path, ckpt: Path, n: int, batch_size: int, repeats: int, data: Path) -> None:
    """infer.py and the job (1 worker) in turns, ``repeats`` times each: load changes hit both."""
    common = ["--checkpoint", str(ckpt), "--batch-size", str(batch_size), "--threads", "1", "-q"]
    old, new = [], []
    for _ in range(repeats):
        old.append(timed([str(REPO / "infer.py"), str(folder), "--format", "jsonl", "--output", os.devnull, *common]))
        out = data / "out_job"
        subprocess.run(["rm", "-rf", str(out)], check=True)
        wall, info = timed(["audioset_dcls.tagging.archive", str(folder), "--out", str(out), "--workers", "1",
                            "--chunk-size", "100", *common])
        info["inner_s"] = json.loads((out / "ranks" / "part0-rank0.json").read_text())["wall_seconds"]
        new.append((wall, info))
    for name, runs in (("infer.py", old), ("archive job, 1 worker", new)):
        for wall, info in runs:
            inner = f", {n / info['inner_s']:.2f} files/s after start-up" if "inner_s" in info else ""
            print(f"{name:22s} {wall:7.1f} s wall, {n / wall:6.2f} files/s{inner}; CPU {info['cpu_s']:.1f} s; "
                  f"peak RSS {info['main_mb']:.0f} MB" + (f" + worker {info['child_mb']:.0f} MB" if inner else ""))
    ratio = [o[0] / w[0] for o, w in zip(old, new)]
    print(f"ratio job / infer.py (files/s, wall incl. start-up), per turn: {', '.join(f'{r:.2f}x' for r in ratio)}; "
          f"best-of: {min(o[0] for o in old) / min(w[0] for w in new):.2f}x")


def rss_trace(folder: Path, ckpt: Path, out: Path, chunk_size: int) -> None:
    """The job in this process over ``folder``: RSS and peak RSS (VmHWM) after each chunk is
    written, to see whether memory grows with the number of files done."""
    import re

    from audioset_dcls.tagging import archive

    def mb(key: str) -> int:
        return int(re.search(rf"{key}:\s+(\d+)", Path("/proc/self/status").read_text()).group(1)) // 1024

    trace = []
    write = archive._Run.write

    def traced(self, k, chunk):  # the job's own chunk writer, plus a memory reading
        write(self, k, chunk)
        trace.append(f"{self.stats.inputs}: {mb('VmRSS')}/{mb('VmHWM')}")

    archive._Run.write = traced
    subprocess.run(["rm", "-rf", str(out)], check=True)
    opts = archive.ArchiveOptions(chunk_size=chunk_size, workers=1, threads=1, progress=False, all_scores=True,
                                  embeddings="clip")
    archive.tag_archive([str(folder)], out, checkpoint=ckpt, options=opts)
    archive._Run.write = write
    print("RSS/peak MB of the main process after N files: " + ", ".join(trace))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--files", type=int, default=500)
    p.add_argument("--model", default="convnext_tiny_dcls")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--data", type=Path, default=Path(tempfile.gettempdir()) / "audioset_dcls_archive_bench")
    p.add_argument("--rss-files", default="", help="comma-separated file counts for the peak-RSS runs (e.g. 100,500)")
    p.add_argument("--rss-model", default="convnext_atto_dcls")
    p.add_argument("--repeats", type=int, default=1, help="turns of infer.py and the job")
    p.add_argument("--skip-compare", action="store_true")
    p.add_argument("--trace", action="store_true", help="RSS after each tenth of the --files files (in this process)")
    args = p.parse_args()
    os.environ["OMP_NUM_THREADS"] = "1"
    import torch

    torch.set_num_threads(1)
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
          f"load {os.getloadavg()[0]:.1f}, torch {torch.__version__}")
    paths = make_files(args.data / "clips", args.files)
    folder = args.data / f"set_{args.files}"
    if not folder.is_dir():  # a folder of exactly these files (links)
        folder.mkdir(parents=True)
        for path in paths:
            (folder / path.name).symlink_to(path)
    print(decode_rate(paths[: min(len(paths), 200)]))
    ckpt = make_checkpoint(args.data / f"{args.model}.safetensors", args.model)
    if not args.skip_compare:
        compare(folder, ckpt, args.files, args.batch_size, args.repeats, args.data)
    if args.trace:
        small = make_checkpoint(args.data / f"{args.rss_model}.safetensors", args.rss_model)
        rss_trace(folder, small, args.data / "out_trace", max(1, args.files // 10))
    for count in [int(c) for c in args.rss_files.split(",") if c]:
        sub = args.data / f"rss_{count}"
        if not sub.is_dir():
            sub.mkdir(parents=True)
            for i in range(count):
                (sub / f"clip_{i:05d}{paths[i % len(paths)].suffix}").symlink_to(paths[i % len(paths)])
        small = make_checkpoint(args.data / f"{args.rss_model}.safetensors", args.rss_model)
        out = args.data / f"out_rss_{count}"
        subprocess.run(["rm", "-rf", str(out)], check=True)
        t, r = timed(["audioset_dcls.tagging.archive", str(sub), "--out", str(out), "--workers", "1",
                      "--chunk-size", "100", "--checkpoint", str(small), "--threads", "1", "-q",
                      "--all-scores", "--embeddings"])
        print(f"peak RSS, {args.rss_model}, {count} files: main {r['main_mb']:.0f} MB, worker {r['child_mb']:.0f} MB "
              f"({count / t:.1f} files/s)")


if __name__ == "__main__":
    main()
