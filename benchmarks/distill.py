"""Distillation: what a two-million-row teacher table costs the loader, and what a teacher buys.

    python benchmarks/distill.py loader [--rows 2000000] [--workers 2] [--batches 24] [--rounds 3]
    python benchmarks/distill.py student [--teacher-epochs 8] [--student-epochs 3]

``loader``: a teacher of ``--rows`` clips x 527 classes (random float16 probabilities; the shard
clips' ids placed at random rows among random YouTube-like ids) written as a ``.npy`` matrix in
the order of a real HDF5 file's ``audio_name`` and turned into the memory-mapped table by the
project's own ``teacher.build_table`` (timed). Then the training loader
(``data.build_train_loader``, ``--workers`` processes) on real shards built by the project's
builder (synthetic 10 s clips, 527 classes so rows are full size), with and without the table,
alternating ``--rounds`` times (median samples/s), and every worker's peak RSS (VmHWM) and
private / file-backed resident memory (RssAnon / RssFile) read from /proc while the workers
run. Also: random lookups per second over the whole table in one process, and the memory a
plain dict of the ids would cost each worker instead.

``student``: configs/tiny.yaml (convnext_atto) on the synthetic mini AudioSet (``--clip-seconds``
of each clip, so its labels are noisy: a sound may lie outside the crop): a teacher trained
``--teacher-epochs``; its probabilities on every train and eval clip written as a parquet folder
(``id``, ``scores``: the archive job's layout); then the same student budget
(``--student-epochs``) without and with ``distill.teacher`` (configs/convnext_tiny_dcls_kd.yaml's
weight 0.9, T 1). Prints eval mAP of the teacher and both students.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from audioset_dcls.config import DataConfig  # noqa: E402
from audioset_dcls.data import build_train_loader, open_shard_set, resolve_normalization  # noqa: E402
from audioset_dcls.teacher import TeacherSource, TeacherTable, build_table  # noqa: E402


def build_527_class_shards(root: Path, clips: int) -> Path:
    """Real shards (project builder) of synthetic 10 s clips, labelled with AudioSet's 527 classes."""
    from audioset_dcls.labels import audioset_label_set
    from audioset_dcls.shards.build import BuildOptions, build_shards
    from audioset_dcls.synthetic import CLASSES, make_mini_audioset

    ds = make_mini_audioset(root / "audio", num_train=clips, num_eval=1, broken=False)
    labels = audioset_label_set()
    csv = root / "classes.csv"
    csv.write_text("index,mid,display_name\n" + "".join(f'{i},{m},"{n}"\n' for i, (m, n) in
                                                         enumerate(zip(labels.mids, labels.names))))
    mids = list(labels.mids)
    seg = ds.segments["train"].read_text().splitlines()
    out = []
    for line in seg:  # the synthetic classes' /x/ mids -> the first eight AudioSet mids
        for k, (m, _) in enumerate(CLASSES):
            line = line.replace(m, mids[k])
        out.append(line)
    (root / "train.csv").write_text("\n".join(out) + "\n")
    build_shards(BuildOptions(segments=(root / "train.csv",), labels=csv, audio_dir=ds.audio_dir, out=root / "shards",
                              split="train", workers=0, shard_size=16, progress=False))
    return root / "shards"


def shard_ytids(shard_dir: Path) -> list[str]:
    import tarfile

    ids = []
    for url in open_shard_set(shard_dir, "shards").urls:
        with tarfile.open(url) as tar:
            ids += [json.load(tar.extractfile(m))["ytid"] for m in tar if m.name.endswith(".json")]
    return ids


def write_teacher(root: Path, rows: int, classes: int, known: list[str]) -> TeacherSource:
    """A (rows, classes) float16 .npy in the audio_name order of one real HDF5 file."""
    import h5py

    rng = np.random.default_rng(0)
    alphabet = np.frombuffer(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_", np.uint8)
    ids = alphabet[rng.integers(0, len(alphabet), (rows, 11))].view("S11").ravel()
    place = rng.choice(rows, len(known), replace=False)
    ids[place] = np.array([k.encode() for k in known], "S11")
    names = np.char.add(np.char.add(b"Y", ids), b".wav")
    with h5py.File(root / "packed.h5", "w") as f:
        f.create_dataset("audio_name", data=names)
    m = np.lib.format.open_memmap(root / "teacher.npy", mode="w+", dtype=np.float16, shape=(rows, classes))
    for a in range(0, rows, 100_000):
        m[a:a + 100_000] = rng.random((min(100_000, rows - a), classes), dtype=np.float32)
    m.flush()
    del m
    return TeacherSource(str(root / "teacher.npy"), hdf5=(str(root / "packed.h5"),))


def proc_mem(pid: int) -> dict[str, float]:
    """VmHWM / RssAnon / RssFile of a process, MB."""
    out = {}
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return out
    for line in text.splitlines():
        key = line.split(":")[0]
        if key in ("VmHWM", "RssAnon", "RssFile"):
            out[key] = int(line.split()[1]) / 1024
    return out


def children(pid: int) -> list[int]:
    path = Path(f"/proc/{pid}/task/{pid}/children")
    return [int(p) for p in path.read_text().split()] if path.is_file() else []


def time_loader(shards, table, workers: int, batches: int) -> tuple[float, list[dict]]:
    cfg = DataConfig(batch_size=16, num_workers=workers, shuffle_buffer=64, shuffle_initial=16,
                     samples_per_epoch=16 * batches * max(1, workers))
    it, n = build_train_loader(shards, cfg, resolve_normalization(cfg, shards), epoch=0, seed=0, rank=0,
                               world_size=1, accum=1, teacher=table)
    next(it)  # workers started and warm
    t0, seen, mem = time.perf_counter(), 0, []
    for i, batch in enumerate(it):
        seen += len(batch["keys"])
        if table is not None:
            assert batch["has_teacher"].all()
        if i == 2:  # every worker alive and past its start
            mem = [m for m in (proc_mem(c) for c in children(os.getpid())) if m]
    return seen / (time.perf_counter() - t0), mem


def random_lookups(table: TeacherTable, n: int) -> tuple[float, float]:
    """(lookups/s, RssAnon growth MB) of ``n`` lookups of random ids of the table, in this process."""
    ids = np.load(table.root / "ids.npy", mmap_mode="r")
    pick = [ids[i].decode() for i in np.random.default_rng(1).integers(0, len(ids), n)]
    before = proc_mem(os.getpid())["RssAnon"]
    t0 = time.perf_counter()
    for cid in pick:
        table.row(cid)
    return n / (time.perf_counter() - t0), proc_mem(os.getpid())["RssAnon"] - before


def dict_cost(table: TeacherTable) -> float:
    """RssAnon growth (MB) of the alternative: a dict of every id -> row, as each worker would hold."""
    before = proc_mem(os.getpid())["RssAnon"]
    ids, rows = np.load(table.root / "ids.npy"), np.load(table.root / "rows.npy")
    d = {i.decode(): int(r) for i, r in zip(ids, rows)}
    grown = proc_mem(os.getpid())["RssAnon"] - before
    del d
    return grown


def loader_bench(args) -> None:
    root = Path(args.out or tempfile.mkdtemp(prefix="kd-bench-"))
    shards_dir = root / "shards"
    if not (shards_dir / "manifest.json").is_file():
        build_527_class_shards(root, args.clips)
    shards = open_shard_set(shards_dir, "shards")
    if not (root / "table" / "table.json").is_file():
        src = write_teacher(root, args.rows, shards.num_classes, shard_ytids(shards_dir))
        t0 = time.perf_counter()
        build_table(src, root / "table", shards.num_classes)
        print(f"table: {args.rows} rows x {shards.num_classes} built in {time.perf_counter() - t0:.1f} s; "
              f"{sum(f.stat().st_size for f in (root / 'table').iterdir()) / 1e9:.2f} GB")
    table = TeacherTable(root / "table")
    results = {"without": [], "with": []}
    mems = {}
    for _ in range(args.rounds):
        for name, t in (("without", None), ("with", table)):
            sps, mem = time_loader(shards, t, args.workers, args.batches)
            results[name].append(sps)
            mems[name] = [{k: round(v) for k, v in m.items()} for m in mem]
    for name in results:
        print(f"loader {name} teacher: median {statistics.median(results[name]):.1f} samples/s "
              f"({', '.join(f'{x:.1f}' for x in results[name])}); workers' memory (MB): {mems[name]}")
    lps, grown = random_lookups(table, 200_000)
    print(f"random lookups over all {len(table)} ids: {lps:.0f}/s, RssAnon +{grown:.1f} MB")
    print(f"a dict of every id -> row instead: RssAnon +{dict_cost(table):.0f} MB per process")


def student_bench(args) -> None:
    """Teacher (longer), then two students of the same budget, without and with the teacher."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    import torch

    from audioset_dcls.data import build_eval_loader
    from audioset_dcls.hub.checkpoint import load_model

    sys.path.insert(0, str(REPO / "tests"))
    from train_shards import build_shards

    root = Path(args.out or tempfile.mkdtemp(prefix="kd-student-"))
    train_dir, eval_dir = build_shards(root / "mini", args.train_clips, args.eval_clips, args.clip_seconds)
    data = [f"data.train={train_dir}", f"data.eval={eval_dir}"]
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), PYTHONUNBUFFERED="1")
    base = [sys.executable, "train.py", "--config", "configs/tiny.yaml", "train.progress_bar=false", *data]

    def run(out: str, epochs: int, extra: list[str]) -> dict:
        if not (root / out / "summary.json").is_file():
            t0 = time.perf_counter()
            subprocess.run(base + [f"train.output_dir={root / out}", f"schedule.epochs={epochs}",
                                   f"eval.every_epochs={epochs}", *extra], cwd=REPO, env=env, check=True,
                           capture_output=True)
            print(f"{out}: {time.perf_counter() - t0:.0f} s")
        return json.loads((root / out / "summary.json").read_text())

    teacher = run("teacher", args.teacher_epochs, [])
    model, info = load_model(root / "teacher" / "model.safetensors")
    model.eval()
    ids, scores = [], []
    for split in (train_dir, eval_dir):
        s = open_shard_set(split, "x")
        with torch.no_grad():
            for batch in build_eval_loader(s, 32, 1, resolve_normalization(DataConfig(), s), rank=0, world_size=1):
                scores += torch.sigmoid(model(batch["x"])).numpy().astype(np.float16).tolist()
                ids += [k.rsplit("_", 1)[0] for k in batch["keys"]]
    (root / "teacher_scores").mkdir(exist_ok=True)
    pq.write_table(pa.table({"id": pa.array(ids, pa.string()), "scores": pa.array(scores, pa.list_(pa.float16()))}),
                   root / "teacher_scores" / "part-00000.parquet")
    plain = run("student_plain", args.student_epochs, [])
    kd = run("student_kd", args.student_epochs, [f"distill.teacher={root / 'teacher_scores'}", "distill.weight=0.9",
                                                 "distill.temperature=1"])
    print(f"teacher ({args.teacher_epochs} epochs): eval mAP {teacher['eval']['mAP']:.3f}; teacher table's own "
          f"eval mAP {kd['teacher']['eval']['mAP']:.3f}")
    print(f"student, {args.student_epochs} epochs, labels only: mAP {plain['eval']['mAP']:.3f}")
    print(f"student, {args.student_epochs} epochs, distilled:   mAP {kd['eval']['mAP']:.3f} "
          f"(missing {kd['teacher']['missing_clips_trained']} of {kd['teacher']['clips_trained']})")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("what", choices=["loader", "student"])
    p.add_argument("--out", help="work folder (reused: shards, table, runs)")
    p.add_argument("--rows", type=int, default=2_000_000)
    p.add_argument("--clips", type=int, default=64)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--batches", type=int, default=24, help="batches per worker per timed pass")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--train-clips", type=int, default=128)
    p.add_argument("--eval-clips", type=int, default=48)
    p.add_argument("--clip-seconds", type=float, default=2.0, help="front-end clip length of the student set")
    p.add_argument("--teacher-epochs", type=int, default=12)
    p.add_argument("--student-epochs", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    loader_bench(args) if args.what == "loader" else student_bench(args)


if __name__ == "__main__":
    main()
