"""Fine-tuning small sets (issue 22): the head's lr scale and layer-wise lr decay, warmup as a
fraction of the steps, augmentation scaled by the clip count, the recipe in configs/finetune.yaml,
a fine-tune from a source beating the same recipe from scratch on a small real-like set, and the
cross-validation command on three tiny folds."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from audioset_dcls.config import Config, ConfigError, OptimConfig, ScheduleConfig, load_config
from audioset_dcls.models import create_model, param_groups
from audioset_dcls.training.finetune import layer_ids, lr_param_groups, resolve_warmup, scale_for_small_set
from test_train import check, run_train
from train_shards import own_shards, session_shards

REPO = Path(__file__).resolve().parents[1]


def _lr_of(groups: list[dict], model: torch.nn.Module) -> dict[str, float]:
    ids = {id(p): n for n, p in model.named_parameters()}
    out = {}
    for g in groups:
        for p in g["params"]:
            assert ids[id(p)] not in out, f"{ids[id(p)]} in two groups"
            out[ids[id(p)]] = g["lr"]
    return out


def test_head_lr_scale_and_layer_decay():
    model = create_model("convnext_atto", num_classes=5)
    plain = lr_param_groups(model, OptimConfig(lr=1e-3))
    assert [(g["name"], len(g["params"])) for g in plain] == [
        (g["name"], len(g["params"])) for g in param_groups(model, lr=1e-3, weight_decay=0.05)]
    lrs = _lr_of(lr_param_groups(model, OptimConfig(lr=1e-3, head_lr_scale=10.0, layer_decay=0.5)), model)
    assert set(lrs) == {n for n, _ in model.named_parameters()}  # every tensor once
    depth, depths = layer_ids(model)
    assert depths > 4 and depth["stem.0.weight"] == 0
    assert lrs["head.fc.weight"] == pytest.approx(1e-2) and lrs["head.fc.bias"] == pytest.approx(1e-2)
    assert lrs["stem.0.weight"] == pytest.approx(1e-3 * 0.5 ** (depths - 1))
    last_block = max((n for n in lrs if n.startswith("stages.3.")), key=lambda n: depth[n])
    assert lrs[last_block] == pytest.approx(1e-3 * 0.5)
    assert lrs["stem.0.weight"] < lrs["stages.0.blocks.0.conv_dw.weight"] < lrs[last_block] < lrs["head.fc.weight"]


def test_the_schedule_keeps_every_groups_ratio():
    from audioset_dcls.training.recipe import build_optimizer, build_scheduler

    model = create_model("convnext_atto_dcls", num_classes=3)
    cfg = load_config(None, ["optim.lr=1e-3", "optim.head_lr_scale=4", "optim.layer_decay=0.8"])
    opt = build_optimizer(model, cfg)
    sched = build_scheduler(opt, cfg, total_steps=10, warmup_steps=2)
    scales = [g["lr_scale"] for g in opt.param_groups]
    assert any(s == pytest.approx(4.0) for s in scales) and any(s == pytest.approx(0.8 ** 13) for s in scales)
    for _ in range(5):
        opt.step()
        sched.step()
        for g, s in zip(opt.param_groups, scales):
            assert g["lr"] == pytest.approx(opt.param_groups[0]["lr"] * s / scales[0])


def test_warmup_fraction_and_steps():
    assert resolve_warmup(ScheduleConfig(warmup_fraction=0.1), 300, 20) == 30
    assert resolve_warmup(ScheduleConfig(warmup_fraction=0.1, warmup_steps=4), 300, 20) == 4  # steps given: they win
    assert resolve_warmup(ScheduleConfig(warmup_steps=100, warmup_epochs=0), 75, 5) == 75  # capped: all of it
    assert resolve_warmup(ScheduleConfig(warmup_epochs=2), 300, 20) == 40
    with pytest.raises(ConfigError, match="schedule.warmup_fraction"):
        load_config(None, ["schedule.warmup_fraction=1.5"])
    with pytest.raises(ConfigError, match="optim.layer_decay"):
        load_config(None, ["optim.layer_decay=0"])


def test_augmentation_scales_with_the_clip_count():
    cfg = load_config(None, ["augment.full_strength_clips=1000", "augment.freq_masks=2", "augment.freq_mask_width=8"])
    small, f = scale_for_small_set(cfg, 250)
    assert f == 0.25
    a, ref = small.augment, cfg.augment
    assert a.mixup_alpha == pytest.approx(ref.mixup_alpha / 4) and a.label_smoothing == pytest.approx(ref.label_smoothing / 4)
    assert a.time_stretch_prob == pytest.approx(ref.time_stretch_prob / 4) and a.erase_prob == pytest.approx(ref.erase_prob / 4)
    assert a.freq_masks == 0 and small.model.drop_path_rate == pytest.approx(cfg.model.drop_path_rate / 4)
    assert scale_for_small_set(small, 250) == (small, 1.0)  # what was trained: scaling it again is a no-op
    assert scale_for_small_set(cfg, 1000) == (cfg, 1.0) and scale_for_small_set(Config(), 10) == (Config(), 1.0)


def test_finetune_yaml_carries_the_small_set_recipe():
    """The ablation's winners (benchmarks/RESULTS.md, issue 22): at 320 clips the AudioSet
    augmentations and drop path are (almost) off, warmup is a tenth of the run, the head
    learns faster than the body, time roll stays on (off: -0.09 mAP), layer decay stays off
    (0.75: -0.07 mAP)."""
    cfg = load_config(REPO / "configs" / "finetune.yaml")
    small, f = scale_for_small_set(cfg, 320)
    assert f < 0.05
    assert small.augment.mixup_alpha < 0.01 and small.augment.label_smoothing < 0.01
    assert small.augment.time_stretch_prob < 0.02 and small.augment.erase_prob < 0.01
    assert small.model.drop_path_rate < 0.01
    assert resolve_warmup(cfg.schedule, 300, 20) == 30
    assert cfg.optim.head_lr_scale > 1 and cfg.optim.lr >= 5e-4
    assert small.augment.time_roll and cfg.optim.layer_decay == 1.0
    big, f = scale_for_small_set(cfg, 50_000)  # a large set keeps the full augmentations
    assert f == 1 and big.augment.mixup_alpha == cfg.augment.mixup_alpha


# ------------------------------------------------------------------------- training on a small set


def _final_eval(out: Path) -> dict:
    return json.loads((out / "summary.json").read_text())["eval"]


def test_fine_tune_from_a_source_beats_the_same_recipe_from_scratch(tmp_path_factory, tmp_path):
    """Source: convnext_atto trained on the synthetic AudioSet-format set (8 classes of sounds);
    target: five single-label classes made of some of those sounds, 30 training clips. The same
    recipe (configs/finetune.yaml), steps and seed from the source and from scratch."""
    src_train, src_eval = session_shards(tmp_path_factory, 2.0)
    source = tmp_path / "source"
    check(run_train("single", ["--config", "configs/tiny.yaml", f"data.train={src_train}", f"data.eval={src_eval}",
                               f"train.output_dir={source}", "schedule.epochs=8", "eval.every_epochs=8",
                               "train.progress_bar=false", "train.tracker=none"], threads=1))
    train_dir, eval_dir = own_shards(tmp_path_factory)
    common = ["--config", "configs/finetune.yaml", "model.name=convnext_atto", f"data.train={train_dir}",
              f"data.eval={eval_dir}", "schedule.epochs=20", "data.batch_size=6", "optim.batch_size=6",
              "data.num_workers=1", "eval.num_workers=1", "eval.every_epochs=20", "train.progress_bar=false",
              "train.tracker=none"]
    check(run_train("single", common + [f"train.output_dir={tmp_path / 'ft'}",
                                        f"model.init={source / 'model.safetensors'}"], threads=1))
    check(run_train("single", common + [f"train.output_dir={tmp_path / 'scratch'}"], threads=1))
    ft, scratch = _final_eval(tmp_path / "ft"), _final_eval(tmp_path / "scratch")
    assert ft["num_clips"] == scratch["num_clips"] >= 25
    assert ft["mAP"] > scratch["mAP"] + 0.05, (ft, scratch)
    assert ft["accuracy"] >= scratch["accuracy"], (ft, scratch)


# ------------------------------------------------------------------------------ cross-validation


def test_crossval_three_tiny_folds_one_table_one_json_resumable(tmp_path):
    from audioset_dcls.synthetic import make_own_dataset
    from audioset_dcls.training.crossval import main

    ds = make_own_dataset(tmp_path / "own", per_class=4, folds=3, seconds=2.0, broken=False)
    out = tmp_path / "cv"
    argv = ["--folds", *map(str, ds.folds), "--out", str(out), "--config", "configs/tiny.yaml",
            "--clip-seconds", "2", "--workers", "1", "schedule.epochs=1", "schedule.warmup_epochs=0",
            "data.batch_size=4", "optim.batch_size=4", "data.num_workers=1", "eval.num_workers=1",
            "train.progress_bar=false", "train.tracker=none"]
    # Interrupted: fold 1 stops after one step (with a checkpoint); the command says so and fails.
    assert main([*argv, "train.max_steps=1"]) == 2
    assert not (out / "crossval.json").exists() and not (out / "fold2").exists()
    # The same command continues fold 1 from its checkpoint and runs the others.
    assert main(argv) == 0
    assert "resumed from" in (out / "fold1" / "train.log").read_text()
    report = json.loads((out / "crossval.json").read_text())
    assert [f["fold"] for f in report["folds"]] == ["fold1", "fold2", "fold3"]
    for k, fold in enumerate(report["folds"]):
        listed = len((out / "lists" / f"fold{k + 1}.csv").read_text().splitlines()) - 1
        assert fold["clips"] == listed  # each fold evaluated on exactly its own clips
        train = json.loads((out / f"fold{k + 1}" / "shards" / "train" / "manifest.json").read_text())
        assert train["num_samples"] == sum(f["clips"] for f in report["folds"]) - listed
    accs = [f["accuracy"] for f in report["folds"]]
    assert report["mean"]["accuracy"] == pytest.approx(sum(accs) / 3)
    assert report["std"]["accuracy"] == pytest.approx(torch.tensor(accs).std().item(), abs=1e-6)
    assert "mean ± std" in (out / "crossval.md").read_text()
    # Finished folds are read, not retrained.
    stamps = {k: (out / f"fold{k}" / "run" / "summary.json").stat().st_mtime_ns for k in (1, 2, 3)}
    assert main(argv) == 0
    assert all((out / f"fold{k}" / "run" / "summary.json").stat().st_mtime_ns == stamps[k] for k in (1, 2, 3))
    assert json.loads((out / "crossval.json").read_text())["mean"] == report["mean"]


def test_crossval_reads_a_fold_column_and_refuses_one_fold(tmp_path):
    import argparse

    from audioset_dcls.training.crossval import CrossvalError, read_folds

    (tmp_path / "meta.csv").write_text("filename,fold,category\na.wav,1,dog\nb.wav,2,cat\nc.wav,10,dog\nd.wav,2,dog\n")
    a = argparse.Namespace(folds=None, list=tmp_path / "meta.csv", fold_column="fold", path_column="filename",
                           label_column="category", audio_root=tmp_path / "audio", class_folders=None, k=5)
    folds = read_folds(a)
    assert folds.names == ("fold1", "fold2", "fold10") and folds.classes == ["cat", "dog"]
    assert folds.rows[1] == ((str(tmp_path / "audio" / "b.wav"), "cat", "", ""),
                             (str(tmp_path / "audio" / "d.wav"), "dog", "", ""))
    (tmp_path / "one.csv").write_text("filename,fold,category\na.wav,1,dog\n")
    with pytest.raises(CrossvalError, match="at least 2"):
        read_folds(argparse.Namespace(**{**vars(a), "list": tmp_path / "one.csv"}))
