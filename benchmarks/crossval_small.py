"""The fine-tuning recipe against a plain loop over all five folds of a real small set (issue 22):
ESC-50's protocol through the ``crossval`` command, so each number averages 5 x 80 eval clips
instead of one fold's 80.

    python benchmarks/real_clips.py --out /tmp/real --per-class 40 --folds 5
    python benchmarks/crossval_small.py --data /tmp/real --work /tmp/cv_small --part recipe &
    python benchmarks/crossval_small.py --data /tmp/real --work /tmp/cv_small --part plain
    python benchmarks/crossval_small.py --data /tmp/real --work /tmp/cv_small   # the table

``--part recipe`` runs ``python -m audioset_dcls crossval`` with configs/finetune.yaml from scratch
(convnext_atto, ``--epochs`` epochs, batch 16, one thread; 5 s clips, the reference front end's 128
mel bins) into ``<work>/cv``; ``--part plain`` trains benchmarks/finetune_small.py's sixty-line
loop on the same fold shards as crossval builds them (it waits for each). Both resume: a rerun
reads finished folds. Without ``--part`` the comparison is printed per fold, with the mean ± std
and the paired difference.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

import numpy as np  # noqa: E402

from finetune_small import cpu_name, plain_loop  # noqa: E402


def run_recipe(a) -> None:
    folds = sorted(str(p) for p in (a.data / "folds").glob("fold*.csv"))
    overrides = ["model.name=convnext_atto", f"schedule.epochs={a.epochs}", "data.batch_size=16",
                 "optim.batch_size=16", "data.normalization=manifest", "data.num_workers=1", "eval.num_workers=1",
                 "train.progress_bar=false", "train.tracker=none", "train.checkpoint_every_steps=100000",
                 f"eval.every_epochs={a.epochs}", *a.override]
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONPATH=str(REPO))
    cmd = [sys.executable, "-m", "audioset_dcls", "crossval", "--folds", *folds, "--out", str(a.work / "cv"),
           "--clip-seconds", "5", "--workers", "1", "--config", "configs/finetune.yaml", "--", *overrides]
    subprocess.run(cmd, cwd=REPO, env=env, check=True)


def run_plain(a) -> None:
    import torch

    torch.set_num_threads(1)
    out = a.work / "plain.jsonl"
    done = {json.loads(line)["fold"] for line in out.read_text().splitlines()} if out.is_file() else set()
    for k in range(1, len(list((a.data / "folds").glob("fold*.csv"))) + 1):
        name = f"fold{k}"
        if name in done:
            continue
        shards = a.work / "cv" / name / "shards"
        while not (shards / "eval" / "manifest.json").is_file():  # crossval builds them
            time.sleep(10)
        t0 = time.perf_counter()
        r = plain_loop(shards / "train", shards / "eval", a.epochs)
        r.update(fold=name, seconds=round(time.perf_counter() - t0))
        with open(out, "a") as f:
            f.write(json.dumps(r) + "\n")
        print(json.dumps(r), flush=True)


def report(a) -> None:
    cv = json.loads((a.work / "cv" / "crossval.json").read_text())
    plain = {r["fold"]: r for r in map(json.loads, (a.work / "plain.jsonl").read_text().splitlines())}
    print(f"machine: {cpu_name()}, {os.cpu_count()} cores, 1 torch thread per run; {a.epochs} epochs")
    print("| fold | plain mAP | recipe mAP | plain acc | recipe acc |\n|---|---|---|---|---|")
    rows = []
    for r in cv["folds"]:
        p = plain[r["fold"]]
        rows.append((p["mAP"], r["mAP"], p["accuracy"], r["accuracy"]))
        print(f"| {r['fold']} | {p['mAP']:.3f} | {r['mAP']:.3f} | {p['accuracy']:.3f} | {r['accuracy']:.3f} |")
    m = np.array(rows)
    sd = m.std(0, ddof=1)
    print("| mean ± std | " + " | ".join(f"{mu:.3f} ± {s:.3f}" for mu, s in zip(m.mean(0), sd)) + " |")
    d_map, d_acc = m[:, 1] - m[:, 0], m[:, 3] - m[:, 2]
    print(f"recipe - plain, paired over folds: mAP {d_map.mean():+.3f} ± {d_map.std(ddof=1):.3f}, "
          f"accuracy {d_acc.mean():+.3f} ± {d_acc.std(ddof=1):.3f}")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data", type=Path, required=True, help="benchmarks/real_clips.py output (5 folds)")
    p.add_argument("--work", type=Path, required=True)
    p.add_argument("--epochs", type=int, default=15)
    p.add_argument("--part", choices=["recipe", "plain"], default=None, help="run one side (default: the table)")
    p.add_argument("--override", action="append", default=[], help="extra section.key=value for the recipe")
    a = p.parse_args(argv)
    if a.part == "recipe":
        run_recipe(a)
    elif a.part == "plain":
        run_plain(a)
    else:
        report(a)


if __name__ == "__main__":
    main()
