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
               "r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024\n"
               "c = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024\n"
               "print(json.dumps({'main_mb': r, 'child_mb': c, 'rc': code}), file=sys.stderr)")
    t = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", wrapper, *cmd], env=env, cwd=REPO, capture_output=True, text=True)
    wall = time.perf_counter() - t
    last = proc.stderr.strip().splitlines()[-1]
    info = json.loads(last)
    if info["rc"] not in (0, 1):
        raise RuntimeError(proc.stderr[-3000:])
    return wall, info


def decode_rate(paths: list[Path], sample_rate: int = 32000) -> tuple[float, float]:
    """Files/s and windows/s of decode_input (decode, downmix, resample, window) in this process."""
    from audioset_dcls.tagging.archive_inputs import ArchiveInput, decode_input

    t = time.perf_counter()
    windows = 0
    for p in paths:
        d = decode_input(ArchiveInput(p.name, str(p)), sample_rate, 10 * sample_rate, 10 * sample_rate)
        windows += d["windows"].shape[0]
    dt = time.perf_counter() - t
    return len(paths) / dt, windows / dt


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--files", type=int, default=500)
    p.add_argument("--model", default="convnext_tiny_dcls")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--data", type=Path, default=Path(tempfile.gettempdir()) / "audioset_dcls_archive_bench")
    p.add_argument("--rss-files", default="", help="comma-separated file counts for the peak-RSS runs (e.g. 100,500)")
    p.add_argument("--rss-model", default="convnext_atto_dcls")
    p.add_argument("--skip-compare", action="store_true")
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
    fps, wps = decode_rate(paths[: min(len(paths), 200)])
    print(f"decode alone, 1 process: {fps:.1f} files/s, {wps:.1f} windows/s "
          f"({1000 / fps:.1f} ms per 10 s file, mixed formats)")
    ckpt = make_checkpoint(args.data / f"{args.model}.safetensors", args.model)
    if not args.skip_compare:
        common = ["--checkpoint", str(ckpt), "--batch-size", str(args.batch_size), "--threads", "1", "-q"]
        t_old, r_old = timed([str(REPO / "infer.py"), str(folder), "--format", "jsonl", "--output", os.devnull, *common])
        out = args.data / "out_job"
        subprocess.run(["rm", "-rf", str(out)], check=True)
        t_new, r_new = timed(["audioset_dcls.tagging.archive", str(folder), "--out", str(out), "--workers", "1",
                              "--chunk-size", "100", *common])
        n = args.files
        print(f"infer.py:      {t_old:7.1f} s, {n / t_old:6.2f} files/s, peak RSS {r_old['main_mb']:.0f} MB")
        print(f"archive job:   {t_new:7.1f} s, {n / t_new:6.2f} files/s, peak RSS main {r_new['main_mb']:.0f} MB, "
              f"worker {r_new['child_mb']:.0f} MB")
        print(f"ratio job / infer.py (files/s): {t_old / t_new:.2f}x (wall includes start-up and model load)")
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
