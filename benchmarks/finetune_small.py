"""What makes a few hundred real clips learn worse under configs/finetune.yaml than under a plain
loop? An ablation on the real drum/percussion set of benchmarks/real_clips.py (issue 22).

    python benchmarks/real_clips.py --out /tmp/real --per-class 40 --folds 5
    python benchmarks/real_clips.py --out /tmp/real_src --per-class 100 --folds 5 --seed 1
    python benchmarks/finetune_small.py --data /tmp/real --source-data /tmp/real_src --work /tmp/ft_small

Folds 1-4 train (320 clips), fold 5 evaluates (80 clips); the source set (``--source-data``,
another seed) contributes its folds 1-4 only, so no eval recording is ever seen in pre-training.
Shards are 5 s, 64 mel bins (a CPU budget; ``--n-mels``). Every run is convnext_atto for
``--epochs`` epochs at batch 16 on one thread; each result is appended to ``<work>/results.jsonl``
as soon as it finishes (a rerun skips the runs already there; several processes on one ``--work``
split the runs between them), and the table is printed at the end. Runs (``--runs`` picks some):

- ``plain``: a sixty-line loop (AdamW lr 2e-3, OneCycle, batch 16, no augmentation) on the same
  shards, outside the trainer;
- ``recipe-old``: configs/finetune.yaml as it was before issue 22 (lr 2e-4, warmup 100 steps,
  drop path 0.1, time stretch, erasing, mixup 0.2, label smoothing 0.1, time roll);
- ``no-stretch``, ``no-erase``, ``no-mixup``, ``no-smooth``, ``no-droppath``, ``short-warmup``: the old recipe
  with one thing off (warmup: 10% of the steps instead of 100 steps);
- ``all-off``: every augmentation, label smoothing and drop path off, warmup 10%;
- ``all-off-lr2e-3``: the same at the plain loop's lr; ``all-off-lr2e-3-noroll``: and no time roll;
- ``recipe``: configs/finetune.yaml as it is now (from scratch); ``recipe-source``: the same from
  the source model; ``recipe-source-head1``: from the source without the head's lr scale;
  ``recipe-source-ld``: with layer decay 0.75; ``recipe-lr2e-3-head1[-source]``: the recipe at
  lr 2e-3 and the head at 1x; ``recipe-head1``: the head at 1x; ``recipe-noroll``: no time roll;
  ``recipe[-source]-seed1``: another seed (the noise); ``recipe-10s``: the recipe on 10 s shards
  (the 5 s clips padded, as a default build makes them), ``-noroll`` and ``-lr2e-3-head1`` of it,
  and ``plain-10s``, the plain loop on them; ``tiny``: configs/tiny.yaml's
  single-label use.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from audioset_dcls.config import DataConfig  # noqa: E402
from audioset_dcls.data import build_eval_loader, open_shard_set, resolve_normalization  # noqa: E402
from audioset_dcls.features import FeatureConfig  # noqa: E402
from audioset_dcls.metrics import classification_metrics, tagging_metrics  # noqa: E402
from audioset_dcls.shards.build import BuildOptions, build_shards  # noqa: E402

OLD = ["optim.lr=2e-4", "schedule.warmup_steps=100", "schedule.warmup_fraction=0", "model.drop_path_rate=0.1",
       "augment.time_stretch_prob=0.5", "augment.erase_prob=0.25", "augment.mixup_alpha=0.2",
       "augment.label_smoothing=0.1", "augment.time_roll=true", "augment.full_strength_clips=0",
       "optim.head_lr_scale=1", "optim.layer_decay=1"]
OFF = ["augment.time_stretch_prob=0", "augment.erase_prob=0", "augment.mixup_alpha=0", "augment.label_smoothing=0",
       "model.drop_path_rate=0", "schedule.warmup_steps=0", "schedule.warmup_fraction=0.1"]
RUNS: dict[str, list[str]] = {
    "recipe-old": OLD,
    "no-stretch": OLD + ["augment.time_stretch_prob=0"],
    "no-erase": OLD + ["augment.erase_prob=0"],
    "no-mixup": OLD + ["augment.mixup_alpha=0"],
    "no-smooth": OLD + ["augment.label_smoothing=0"],
    "no-droppath": OLD + ["model.drop_path_rate=0"],
    "short-warmup": OLD + ["schedule.warmup_steps=0", "schedule.warmup_fraction=0.1"],
    "all-off": OLD + OFF,
    "all-off-lr2e-3": OLD + OFF + ["optim.lr=2e-3"],
    "all-off-lr2e-3-noroll": OLD + OFF + ["optim.lr=2e-3", "augment.time_roll=false"],
    "recipe": [],
    "recipe-source": ["@source"],
    "recipe-source-head1": ["@source", "optim.head_lr_scale=1"],
    "recipe-source-ld": ["@source", "optim.layer_decay=0.75"],
    "recipe-lr2e-3-head1": ["optim.lr=2e-3", "optim.head_lr_scale=1"],
    "recipe-noroll": ["augment.time_roll=false"],
    "recipe-head1": ["optim.head_lr_scale=1"],
    "recipe-seed1": ["train.seed=1"],
    "recipe-source-seed1": ["@source", "train.seed=1"],
    "recipe-lr2e-3-head1-source": ["@source", "optim.lr=2e-3", "optim.head_lr_scale=1"],
    "recipe-10s": ["@10s"],
    "recipe-10s-noroll": ["@10s", "augment.time_roll=false"],
    "recipe-10s-lr2e-3-head1": ["@10s", "optim.lr=2e-3", "optim.head_lr_scale=1"],
    "tiny": ["@tiny"],
}


def cpu_name() -> str:
    for line in open("/proc/cpuinfo"):
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown CPU"


def build(out: Path, lists: list[Path], features: FeatureConfig, classes: Path | None = None) -> Path:
    if not (out / "manifest.json").is_file():
        build_shards(BuildOptions(out=out, split=out.name, lists=tuple(lists), classes=classes, workers=1,
                                  shard_size=64, progress=False, feature_config=features))
    return out


def load_all(path: Path, norm) -> tuple[torch.Tensor, torch.Tensor]:
    shards = open_shard_set(path, "shards")
    xs, ys = [], []
    for batch in build_eval_loader(shards, 64, 0, norm, rank=0, world_size=1):
        xs.append(batch["x"] if "x" in batch else batch["inputs"])
        ys.append(batch["y"] if "y" in batch else batch["targets"])
    return torch.cat(xs), torch.cat(ys)


def plain_loop(train_dir: Path, eval_dir: Path, epochs: int, seed: int = 0) -> dict:
    """The issue's sixty-line loop: convnext_atto from scratch, AdamW 2e-3, OneCycle, batch 16."""
    from audioset_dcls.models import create_model

    norm = resolve_normalization(DataConfig(normalization="manifest"), open_shard_set(train_dir, "train"))
    xt, yt = load_all(train_dir, norm)
    xe, ye = load_all(eval_dir, norm)
    torch.manual_seed(seed)
    model = create_model("convnext_atto", num_classes=yt.shape[1])
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=0.05)
    steps = epochs * (len(xt) // 16)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=2e-3, total_steps=steps)
    for _ in range(epochs):
        model.train()
        order = torch.randperm(len(xt))
        for i in range(len(xt) // 16):
            idx = order[i * 16:(i + 1) * 16]
            loss = torch.nn.functional.cross_entropy(model(xt[idx]), yt[idx].argmax(1))
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
    model.eval()
    with torch.no_grad():
        scores = torch.cat([model(xe[i:i + 64]).softmax(1) for i in range(0, len(xe), 64)]).numpy()
    t = ye.numpy().astype(np.uint8)
    return {**{k: v for k, v in tagging_metrics(t, scores).items() if k == "mAP"},
            "accuracy": classification_metrics(t, scores)["accuracy"]}


def trainer_run(name: str, extra: list[str], a, shards: dict[str, Path], out: Path) -> dict:
    config, data = "configs/finetune.yaml", "5s"
    args = []
    for e in extra:
        if e == "@source":
            args.append(f"model.init={shards['source_run'] / 'model.safetensors'}")
        elif e == "@10s":
            data = "10s"
        elif e == "@tiny":
            config = "configs/tiny.yaml"
            args += [f"schedule.epochs={a.epochs}", "data.batch_size=16", "optim.batch_size=16"]
        else:
            args.append(e)
    base = ["--config", config, "model.name=convnext_atto", f"data.train={shards[data + '_train']}",
            f"data.eval={shards[data + '_eval']}", f"train.output_dir={out}", "data.normalization=manifest",
            "data.num_workers=1", "eval.num_workers=1", "train.progress_bar=false", "train.tracker=none",
            "train.checkpoint_every_steps=100000", "train.keep_checkpoints=1", f"eval.every_epochs={a.epochs}"]
    if config.endswith("finetune.yaml"):
        base += [f"schedule.epochs={a.epochs}", "data.batch_size=16", "optim.batch_size=16"]
    if not _finished(out):
        run_train(base + args, out)
    rows = [json.loads(line) for line in (out / "eval" / "results.jsonl").read_text().splitlines()]
    plan = next((line for line in (out / "train.log").read_text().splitlines() if "steps/epoch" in line), "")
    return {"mAP": rows[-1]["mAP"], "accuracy": rows[-1]["accuracy"], "plan": plan.split("clips/step; ")[-1][:120]}


def _finished(out: Path) -> bool:
    return (out / "summary.json").is_file() and json.loads((out / "summary.json").read_text()).get("finished", False)


def claim(out: Path) -> bool:
    """True when this process may train ``out``: finished (only read), or claimed now (several
    benchmark processes can share one --work folder and split the runs)."""
    if _finished(out):
        return True
    out.parent.mkdir(parents=True, exist_ok=True)
    try:
        (out.parent / f".claim-{out.name}").mkdir()
        return True
    except FileExistsError:
        return False


def run_train(args: list[str], out: Path) -> None:
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONPATH=str(REPO))
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "train.log", "w") as log:
        proc = subprocess.run([sys.executable, "train.py", *args], cwd=REPO, env=env, stdout=log,
                              stderr=subprocess.STDOUT)
    if proc.returncode != 0:
        sys.exit(f"train.py failed, see {out / 'train.log'}")


def prepare(a) -> dict[str, Path]:
    f5 = FeatureConfig(clip_seconds=5.0, n_mels=a.n_mels)
    f10 = FeatureConfig(clip_seconds=10.0, n_mels=a.n_mels)
    folds = sorted((a.data / "folds").glob("fold*.csv"))
    shards = {"5s_train": build(a.work / "shards5" / "train", folds[:-1], f5)}
    shards["5s_eval"] = build(a.work / "shards5" / "eval", folds[-1:], f5, shards["5s_train"])
    if any("10s" in n for n in a.runs):
        shards["10s_train"] = build(a.work / "shards10" / "train", folds[:-1], f10)
        shards["10s_eval"] = build(a.work / "shards10" / "eval", folds[-1:], f10, shards["10s_train"])
    if a.source_data and any("source" in n for n in a.runs):
        src_folds = sorted((a.source_data / "folds").glob("fold*.csv"))[:-1]
        src = build(a.work / "shards_src" / "train", src_folds, f5, shards["5s_train"])
        run = a.work / "runs" / "source"
        if not (run / "model.safetensors").is_file():
            run_train(["--config", "configs/finetune.yaml", "model.name=convnext_atto", f"data.train={src}",
                       f"data.eval={shards['5s_eval']}", f"train.output_dir={run}", "data.normalization=manifest",
                       f"schedule.epochs={a.source_epochs}", "data.batch_size=16", "optim.batch_size=16",
                       "optim.lr=2e-3", "data.num_workers=1", "eval.num_workers=1", "train.progress_bar=false",
                       "train.tracker=none", f"eval.every_epochs={a.source_epochs}"], run)
        shards["source_run"] = run
    return shards


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data", type=Path, required=True, help="benchmarks/real_clips.py output (5 folds)")
    p.add_argument("--source-data", type=Path, default=None, help="another real_clips.py set for the source model")
    p.add_argument("--work", type=Path, required=True)
    p.add_argument("--epochs", type=int, default=15)
    p.add_argument("--source-epochs", type=int, default=15)
    p.add_argument("--n-mels", type=int, default=64)
    p.add_argument("--runs", nargs="*", default=["plain", "plain-10s", *RUNS],
                   help="run names; NAME@seedK repeats run NAME with seed K")
    a = p.parse_args(argv)
    torch.set_num_threads(1)
    shards = prepare(a)
    results = a.work / "results.jsonl"
    def done() -> set[str]:
        return {json.loads(line)["run"] for line in results.read_text().splitlines()} if results.is_file() else set()

    for name in a.runs:
        # done() again after claim(): another process may have recorded the run in between
        if name in done() or not claim(a.work / "runs" / name) or name in done():
            continue
        t0 = time.perf_counter()
        base, _, seed = name.partition("@seed")  # NAME@seedK: run NAME with seed K (noise between seeds)
        if base in ("plain", "plain-10s"):
            data = "10s" if base.endswith("10s") else "5s"
            r = plain_loop(shards[f"{data}_train"], shards[f"{data}_eval"], a.epochs, seed=int(seed or 0))
        else:
            extra = RUNS[base] + ([f"train.seed={seed}"] if seed else [])
            r = trainer_run(name, extra, a, shards, a.work / "runs" / name)
        r.update(run=name, seconds=round(time.perf_counter() - t0), epochs=a.epochs)
        with open(results, "a") as f:
            f.write(json.dumps(r) + "\n")
        print(json.dumps(r), flush=True)
    print(f"machine: {cpu_name()}, {os.cpu_count()} cores, 1 torch thread; load {os.getloadavg()}")
    print("| run | eval mAP | accuracy | wall |\n|---|---|---|---|")
    for line in results.read_text().splitlines():
        r = json.loads(line)
        print(f"| {r['run']} | {r['mAP']:.3f} | {r['accuracy']:.3f} | {r['seconds']} s |")


if __name__ == "__main__":
    main()
