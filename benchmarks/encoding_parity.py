"""Same clips, two shard encodings: does uint8 change what a model learns or how it scores?

    python -m benchmarks.encoding_parity [--train 128] [--eval 48] [--seeds 0 1] [--dir DIR]

Builds the synthetic mini AudioSet (``audioset_dcls.synthetic``, 10 s clips) as uint8 and as
float16 shards from the same audio, trains the tiny model (``configs/tiny.yaml``, ``train.py``) on
each with the same seeds, and evaluates every checkpoint on both eval sets with
``audioset_dcls.training.evaluate`` (``predict_clips`` + ``compute_metrics``, the training loop's own
evaluation). Prints:

- the same checkpoint scored on uint8 vs float16 eval shards of the same clips: the mAP
  difference (target <= 0.002) and the largest score difference;
- uint8-trained vs float16-trained runs of the same seed: final mAP, next to the spread between
  seeds of one encoding (what "within noise" means here).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def build_sets(root: Path, num_train: int, num_eval: int) -> dict[str, dict[str, Path]]:
    """{encoding: {"train": dir, "eval": dir}} of the same mini AudioSet clips."""
    from audioset_dcls.shards.build import BuildOptions, build_shards
    from audioset_dcls.synthetic import make_mini_audioset

    ds = make_mini_audioset(root / "audio", num_train=num_train, num_eval=num_eval, broken=False)
    sets: dict[str, dict[str, Path]] = {}
    for encoding in ("uint8", "float16"):
        for split in ("train", "eval"):
            out = root / encoding / split
            build_shards(BuildOptions(segments=(ds.segments[split],), labels=ds.labels_csv, audio_dir=ds.audio_dir,
                                      out=out, split=split, workers=min(2, os.cpu_count() or 1), shard_size=16,
                                      encoding=encoding, progress=False))
            sets.setdefault(encoding, {})[split] = out
    return sets


def train_tiny(sets: dict[str, Path], out: Path, seed: int) -> Path:
    """``train.py --config configs/tiny.yaml`` on one shard set; returns the inference checkpoint."""
    cmd = [sys.executable, "train.py", "--config", "configs/tiny.yaml", f"data.train={sets['train']}",
           f"data.eval={sets['eval']}", f"train.output_dir={out}", f"train.seed={seed}", "train.progress_bar=false"]
    subprocess.run(cmd, cwd=REPO, check=True, stdout=subprocess.DEVNULL)
    return Path(json.loads((out / "summary.json").read_text())["checkpoint"])


def score(checkpoint: Path, eval_dirs: dict[str, Path]) -> dict[str, dict]:
    """The checkpoint's evaluation on each eval set: {encoding: metrics + per-clip scores}."""
    from accelerate import Accelerator

    from audioset_dcls.hub.checkpoint import load_model
    from audioset_dcls.data import open_shard_set
    from audioset_dcls.training.evaluate import compute_metrics, predict_clips

    accelerator = Accelerator(cpu=True)
    model, info = load_model(checkpoint)
    out = {}
    for encoding, path in eval_dirs.items():  # evaluate.evaluate's two steps, keeping the scores
        clips = predict_clips(model, open_shard_set(path, encoding), info.normalization, batch_size=32,
                              num_workers=1, accelerator=accelerator)
        out[encoding] = {**compute_metrics(clips), "scores": dict(zip(clips.keys, clips.scores))}
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--train", type=int, default=128, help="training clips (default 128)")
    p.add_argument("--eval", type=int, default=48, help="eval clips (default 48)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1], help="training seeds (default 0 1)")
    p.add_argument("--dir", type=Path, help="work folder (default: a temporary one, removed after)")
    args = p.parse_args(argv)
    root = Path(args.dir or tempfile.mkdtemp(prefix="bench_encodings_"))
    try:
        sets = build_sets(root, args.train, args.eval)
        evals = {e: s["eval"] for e, s in sets.items()}
        results = {}
        for seed in args.seeds:
            for encoding in sets:
                ckpt = train_tiny(sets[encoding], root / f"run_{encoding}_{seed}", seed)
                results[(encoding, seed)] = score(ckpt, evals)
                r = results[(encoding, seed)]
                print(f"trained on {encoding:7s} seed {seed}: eval mAP on uint8 shards {r['uint8']['mAP']:.4f}, "
                      f"on float16 shards {r['float16']['mAP']:.4f}", flush=True)
    finally:
        if args.dir is None:
            shutil.rmtree(root, ignore_errors=True)

    print(f"\n{args.train} training / {args.eval} eval clips of the synthetic mini AudioSet (10 s), tiny model "
          f"(configs/tiny.yaml), seeds {args.seeds}")
    print("\nthe same checkpoint on uint8 vs float16 eval shards of the same clips (target |diff| <= 0.002):")
    for (encoding, seed), r in results.items():
        keys = r["uint8"]["scores"].keys()
        worst = max(float(abs(r["uint8"]["scores"][k] - r["float16"]["scores"][k]).max()) for k in keys)
        print(f"  trained on {encoding:7s} seed {seed}: mAP {r['uint8']['mAP']:.4f} vs {r['float16']['mAP']:.4f}, "
              f"diff {r['uint8']['mAP'] - r['float16']['mAP']:+.4f}; largest score difference {worst:.4f}")
    print("\ntrained on uint8 vs on float16 (each scored on its own encoding's eval shards):")
    for seed in args.seeds:
        a, b = results[("uint8", seed)]["uint8"]["mAP"], results[("float16", seed)]["float16"]["mAP"]
        print(f"  seed {seed}: uint8 {a:.4f}, float16 {b:.4f}, diff {a - b:+.4f}")
    for encoding in ("uint8", "float16"):
        maps = [results[(encoding, s)][encoding]["mAP"] for s in args.seeds]
        print(f"  between seeds, {encoding}: {min(maps):.4f}-{max(maps):.4f} (spread {max(maps) - min(maps):.4f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
