"""Shards from AudioSet containers: clips/s per source against a folder of the same audio, and
the peak memory of a build from a large parquet file against a small one.

    python -m benchmarks.containers --clips 120 --workers 2     (from the repository root)

Writes ``--clips`` 10 s clips (tones + noise) in the forms AudioSet travels in, all holding the
same audio:

- 44.1 kHz stereo 16-bit FLAC (a typical download) as a folder of files, in a Hugging Face-style
  parquet file (the FLAC bytes, row groups of 100) and in an audio WebDataset tar;
- 32 kHz mono int16 as a folder of FLAC files and as a PANNs HDF5 file (no decoding, no
  resampling).

Each build runs in a fresh process (``--workers`` workers; the files were just written, so the
page cache is warm); clips/s is ``BuildResult.clips_per_second`` (pool start to last shard). Then
the peak RSS (VmHWM of the main process, and of its largest child process) of a build from a parquet file of ``--large`` rows
against one of ``--small`` rows (48 kHz 24-bit stereo FLAC, like the Hugging Face copy), with the
same row-group size: it should not grow with the file.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import subprocess
import sys
import tarfile
import tempfile
import threading
from pathlib import Path

import numpy as np
import soundfile as sf

MIDS = ["/m/09x0r", "/m/04rlf", "/m/0jbk"]


def _clip(i: int, rate: int, channels: int) -> np.ndarray:
    """10 s of tones + noise as int16: (N,) or (N, channels)."""
    rng = np.random.default_rng(i)
    t = np.arange(10 * rate) / rate
    x = 0.2 * np.sin(2 * np.pi * rng.uniform(200, 3000) * t) + 0.05 * rng.standard_normal(t.size)
    x = np.stack([x, 0.6 * x[::-1]], axis=1) if channels == 2 else x
    return np.round(x * 32767).astype(np.int16)


def _flac(data: np.ndarray, rate: int, subtype: str = "PCM_16") -> bytes:
    buf = io.BytesIO()
    sf.write(buf, data, rate, format="FLAC", subtype=subtype)
    return buf.getvalue()


def _csv(path: Path, ids: list[str]) -> Path:
    path.write_text("".join(f'{y},0,10,"{MIDS[i % 3]}"\n' for i, y in enumerate(ids)))
    return path


def _parquet(path: Path, ids: list[str], flacs: list[bytes], group: int = 100) -> Path:
    import pyarrow as pa  # benchmark-only imports of the optional extra
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"video_id": ids, "audio": [{"bytes": b, "path": f"{y}.flac"} for y, b in zip(ids, flacs)],
                             "labels": [[MIDS[i % 3]] for i in range(len(ids))]}), path, row_group_size=group)
    return path


def write_forms(root: Path, n: int) -> dict[str, list[str]]:
    """The same n clips in every form; returns build arguments per form."""
    import h5py  # benchmark-only import of the optional extra

    ids = [f"{i:011d}" for i in range(n)]
    (root / "folder44").mkdir(parents=True)
    (root / "folder32").mkdir()
    flacs, waves = [], []
    for i, y in enumerate(ids):
        flacs.append(_flac(_clip(i, 44100, 2), 44100))
        (root / "folder44" / f"Y{y}.flac").write_bytes(flacs[-1])
        waves.append(_clip(i, 32000, 1))
        (root / "folder32" / f"Y{y}.flac").write_bytes(_flac(waves[-1], 32000))
    with tarfile.open(root / "audio.tar", "w") as tar:
        for y, b in zip(ids, flacs):
            for ext, data in (("flac", b), ("json", json.dumps({"labels": [MIDS[ids.index(y) % 3]]}).encode())):
                info = tarfile.TarInfo(f"Y{y}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    with h5py.File(root / "audio.h5", "w") as f:
        f.create_dataset("audio_name", data=np.array([f"Y{y}.wav".encode() for y in ids], dtype="S20"))
        f.create_dataset("waveform", data=np.stack(waves))
        target = np.zeros((n, 527), bool)
        target[np.arange(n), [[0, 137, 72][i % 3] for i in range(n)]] = True
        f.create_dataset("target", data=target)
        f.attrs.create("sample_rate", data=32000, dtype=np.int32)
    seg = str(_csv(root / "segments.csv", ids))
    return {
        "folder 44.1 kHz stereo FLAC": ["--segments", seg, "--audio-dir", str(root / "folder44")],
        "parquet (same FLAC bytes)": ["--parquet", str(_parquet(root / "audio.parquet", ids, flacs))],
        "wds-audio tar (same FLAC bytes)": ["--wds-audio", str(root / "audio.tar")],
        "folder 32 kHz mono FLAC": ["--segments", seg, "--audio-dir", str(root / "folder32")],
        "hdf5 32 kHz int16 (same audio)": ["--hdf5", str(root / "audio.h5")],
    }


def _status_kb(pid: int, field: str) -> int:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def _descendants(pid: int) -> list[int]:
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            kids = [int(x) for x in f.read().split()]
    except OSError:
        return []
    return kids + [d for k in kids for d in _descendants(k)]


class PeakRSS:
    """Peak RSS (VmHWM, MB) of this process and of each descendant (workers, forkserver),
    sampled every 0.1 s while a build runs. (ru_maxrss would not do: Linux carries it over from
    the parent across fork + exec.)"""

    def __init__(self):
        self.peaks: dict[int, int] = {}
        self.done = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self.done.wait(0.1):
            for pid in _descendants(os.getpid()):
                self.peaks[pid] = max(self.peaks.get(pid, 0), _status_kb(pid, "VmHWM"))

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.done.set()
        self.thread.join()

    @property
    def main_mb(self) -> float:
        return _status_kb(os.getpid(), "VmHWM") / 1024

    @property
    def child_mb(self) -> float:
        return max(self.peaks.values(), default=0) / 1024


def run_one(argv: list[str]) -> dict:
    """One build in this process: clips/s and peak RSS (MB) of this process and its largest child."""
    from audioset_dcls.shards.build import build_shards
    from audioset_dcls.shards.cli import build_parser
    from audioset_dcls.shards.worker import keep_freed_memory

    from audioset_dcls.shards.plan import BuildOptions

    args = build_parser().parse_args(argv)
    opts = BuildOptions(segments=tuple(args.segments or ()), audio_dir=args.audio_dir, hdf5=tuple(args.hdf5 or ()),
                        parquet=tuple(args.parquet or ()), wds_audio=tuple(args.wds_audio or ()), out=args.out,
                        split="train", workers=args.workers, shard_size=args.shard_size, progress=False)
    keep_freed_memory()
    with PeakRSS() as rss:
        result = build_shards(opts)
    return {"clips_per_s": result.clips_per_second, "clips": result.clips_written,
            "rss_main_mb": rss.main_mb, "rss_worker_mb": rss.child_mb}


def measure(args: list[str], out: Path, workers: int) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "benchmarks.containers", "--one", *args, "--out", str(out),
                           "--split", "train", "--workers", str(workers), "--shard-size", "100"],
                          capture_output=True, text=True, env=env, check=True)
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--clips", type=int, default=120)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--large", type=int, default=600, help="rows of the large parquet file")
    p.add_argument("--small", type=int, default=100, help="rows of the small parquet file")
    p.add_argument("--memory-only", action="store_true", help="only the parquet peak-RSS builds")
    if sys.argv[1:2] == ["--one"]:  # one build, in the fresh process measure() starts
        print(json.dumps(run_one(sys.argv[2:])))
        return
    a = p.parse_args()
    print(f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, load {os.getloadavg()}")
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        forms = {} if a.memory_only else write_forms(root / "forms", a.clips)
        for name, args in forms.items():
            r = measure(args, root / "out" / name.split()[0] / str(len(name)), a.workers)
            print(f"{name:34s} {r['clips_per_s']:7.1f} clips/s ({r['clips']} clips, {a.workers} workers)")
        for rows in (a.small, a.large):
            ids = [f"{i:011d}" for i in range(rows)]
            flacs = [_flac(_clip(i, 48000, 2), 48000, "PCM_24") for i in range(rows)]  # unique: no dictionary
            path = _parquet(root / f"hf-{rows}.parquet", ids, flacs)
            r = measure(["--parquet", str(path)], root / "out" / f"hf{rows}", a.workers)
            print(f"parquet {rows:4d} rows ({path.stat().st_size / 1e6:6.0f} MB, 48 kHz 24-bit stereo, groups of 100): "
                  f"{r['clips_per_s']:6.1f} clips/s, peak RSS main {r['rss_main_mb']:.0f} MB, "
                  f"largest child (worker or forkserver) {r['rss_worker_mb']:.0f} MB")
            path.unlink()


if __name__ == "__main__":
    main()
