"""Does starting from trained weights help? A fine-tune on a small own-label set from a source
checkpoint vs from scratch (and a linear probe), same recipe, same steps.

    python benchmarks/finetune.py [--out DIR] [--per-class 24] [--epochs 6] [--clip-seconds 5]

1. source: configs/tiny.yaml (convnext_atto) trained on the synthetic mini AudioSet (8 classes,
   multi-label, ``--source-clips`` clips) through the real builder and train.py;
2. target: ``audioset_dcls.synthetic.make_own_dataset``: five single-label classes of their own
   names (made of some of the source's sounds, as real targets share sounds with AudioSet),
   ``--per-class`` clips per class, fold 1 trains and fold 2 evaluates;
3. three runs of configs/finetune.yaml (scaled to convnext_atto and a CPU: ``--epochs`` epochs,
   batch 16, warmup 4 steps) on the target: ``model.init=<source>``, the same with
   ``model.freeze_backbone=true``, and from scratch (same lr: the recipe's). Prints each epoch's
   eval accuracy / top-5 / mAP per run, as a Markdown table, and the machine.
Everything runs in this process's machine with ``--threads`` torch threads (default 2).
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

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from audioset_dcls.features import FeatureConfig  # noqa: E402
from audioset_dcls.shards.build import BuildOptions, build_shards  # noqa: E402
from audioset_dcls.synthetic import make_mini_audioset, make_own_dataset  # noqa: E402


def cpu_name() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def train(args: list[str], threads: int) -> float:
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "train.py", *args], cwd=REPO, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.exit(f"train.py failed:\n{proc.stderr[-3000:]}")
    return time.perf_counter() - t0


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", type=Path, default=None, help="work folder (default: a temp dir)")
    p.add_argument("--per-class", type=int, default=24, help="target clips per class (both folds)")
    p.add_argument("--source-clips", type=int, default=240)
    p.add_argument("--source-epochs", type=int, default=4)
    p.add_argument("--epochs", type=int, default=6, help="fine-tuning epochs")
    p.add_argument("--clip-seconds", type=float, default=5.0, help="front-end clip length of all shards")
    p.add_argument("--threads", type=int, default=2)
    a = p.parse_args(argv)
    root = a.out or Path(tempfile.mkdtemp(prefix="finetune_bench_"))
    features = FeatureConfig(clip_seconds=a.clip_seconds)

    def build(out: Path, **inputs) -> Path:
        if not (out / "manifest.json").is_file():
            build_shards(BuildOptions(out=out, split=out.name, workers=a.threads, shard_size=64, progress=False,
                                      feature_config=features, **inputs))
        return out

    mini = make_mini_audioset(root / "mini", num_train=a.source_clips, num_eval=48, broken=False)
    src_train = build(root / "src_shards" / "train", segments=(mini.segments["train"],), labels=mini.labels_csv,
                      audio_dir=mini.audio_dir)
    src_eval = build(root / "src_shards" / "eval", segments=(mini.segments["eval"],), labels=mini.labels_csv,
                     audio_dir=mini.audio_dir)
    own = make_own_dataset(root / "own", per_class=a.per_class, folds=2, seconds=5.0, broken=False)
    tgt_train = build(root / "own_shards" / "train", lists=(own.folds[0],))
    tgt_eval = build(root / "own_shards" / "eval", lists=(own.folds[1],), classes=tgt_train)

    source = root / "runs" / "source"
    if not (source / "model.safetensors").is_file():
        secs = train(["--config", "configs/tiny.yaml", f"data.train={src_train}", f"data.eval={src_eval}",
                      f"train.output_dir={source}", f"schedule.epochs={a.source_epochs}",
                      f"eval.every_epochs={a.source_epochs}", "train.progress_bar=false", "train.tracker=none"],
                     a.threads)
        print(f"source trained in {secs:.0f} s", file=sys.stderr)
    src_eval_result = json.loads((source / "summary.json").read_text())["eval"]

    common = ["--config", "configs/finetune.yaml", "model.name=convnext_atto", f"data.train={tgt_train}",
              f"data.eval={tgt_eval}", f"schedule.epochs={a.epochs}", "schedule.warmup_steps=4",
              "data.batch_size=16", "optim.batch_size=16", "data.num_workers=1", "eval.num_workers=1",
              "train.progress_bar=false", "train.tracker=none"]
    runs = {"from the source (model.init)": [f"model.init={source / 'model.safetensors'}"],
            "linear probe (freeze_backbone)": [f"model.init={source / 'model.safetensors'}",
                                               "model.freeze_backbone=true"],
            "from scratch": []}
    results, seconds = {}, {}
    for i, (name, extra) in enumerate(runs.items()):
        out = root / "runs" / f"target{i}"
        if not (out / "summary.json").is_file():
            seconds[name] = train(common + extra + [f"train.output_dir={out}"], a.threads)
        results[name] = [json.loads(line) for line in (out / "eval" / "results.jsonl").read_text().splitlines()]

    n_train = json.loads((tgt_train / "manifest.json").read_text())["num_samples"]
    n_eval = json.loads((tgt_eval / "manifest.json").read_text())["num_samples"]
    print(f"machine: {cpu_name()}, {os.cpu_count()} cores visible, torch threads {a.threads}")
    print(f"source: convnext_atto, {a.source_clips} synthetic AudioSet-format clips (8 classes, multi-label), "
          f"{a.source_epochs} epochs: eval mAP {src_eval_result['mAP']:.3f}")
    print(f"target: 5 single-label classes, {n_train} train / {n_eval} eval clips ({a.clip_seconds:g} s front end), "
          f"configs/finetune.yaml scaled: batch 16, {a.epochs} epochs, warmup 4 steps\n")
    print("| run | " + " | ".join(f"epoch {r['epoch']} (step {r['step']})" for r in next(iter(results.values())))
          + " | wall |")
    print("|---|" + "---|" * (len(next(iter(results.values()))) + 1))
    for name, rows in results.items():
        cells = [f"acc {r['accuracy']:.3f} / top-5 {r['top5']:.3f} / mAP {r['mAP']:.3f}" for r in rows]
        wall = f"{seconds[name]:.0f} s" if name in seconds else "(cached)"
        print(f"| {name} | " + " | ".join(cells) + f" | {wall} |")


if __name__ == "__main__":
    main()
