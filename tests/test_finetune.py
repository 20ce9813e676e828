"""Fine-tuning (issue 13): a model trained on the synthetic AudioSet-format set initialises a
model for another label set (model.init), a linear probe (model.freeze_backbone), single-label
training with accuracy, the tagger on the fine-tuned checkpoint, and a 2-process fine-tune."""

from __future__ import annotations

import csv
import json
import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from audioset_dcls.hub.checkpoint import CheckpointError, read_checkpoint_info
from audioset_dcls.config import ConfigError, load_config
from audioset_dcls.hub.references import resolve_reference
from audioset_dcls.training.finetune import read_init_weights
from audioset_dcls.shards.format import read_manifest
from test_train import check, run_train
from train_shards import own_shards, session_shards

HEAD = ("head.fc.weight", "head.fc.bias")  # convnext_atto's classifier


@pytest.fixture(scope="module")
def source(tmp_path_factory) -> Path:
    """A run on the synthetic AudioSet-format set (8 classes): 4 steps, exported."""
    train_dir, eval_dir = session_shards(tmp_path_factory, 2.0)
    out = tmp_path_factory.mktemp("source")
    check(run_train("single", ["--config", "configs/tiny.yaml", f"data.train={train_dir}", f"data.eval={eval_dir}",
                               f"train.output_dir={out}", "schedule.epochs=1", "schedule.warmup_epochs=0",
                               "data.samples_per_epoch=32", "train.progress_bar=false", "train.tracker=none"],
                    threads=2))
    return out


@pytest.fixture
def fresh_accelerate_state():
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)
    yield
    AcceleratorState._reset_state(reset_partial_state=True)


def fine_tune_config(tmp_path_factory, out: Path, *overrides: str):
    train_dir, eval_dir = own_shards(tmp_path_factory)
    return load_config("configs/tiny.yaml", [f"data.train={train_dir}", f"data.eval={eval_dir}",
                                             f"train.output_dir={out}", "train.tracker=none",
                                             "train.progress_bar=false", "data.num_workers=1", *overrides])


def test_init_loads_the_backbone_and_reinitialises_the_head(source, tmp_path_factory, tmp_path,
                                                            fresh_accelerate_state):
    from audioset_dcls.training.loop import setup_training

    src = load_file(str(source / "model.safetensors"))
    for init in (source / "model.safetensors", source / "checkpoints"):  # inference / training checkpoint
        init = init if init.suffix else sorted(init.glob("step_*"))[-1]
        out = tmp_path / init.name
        state = setup_training(fine_tune_config(tmp_path_factory, out, f"model.init={init}"))
        weights = state.accelerator.unwrap_model(state.model).state_dict()
        assert weights["head.fc.weight"].shape == (5, src["head.fc.weight"].shape[1])  # 8 classes -> 5
        backbone = [k for k in weights if k not in HEAD]
        assert backbone and all(torch.equal(weights[k], src[k]) for k in backbone)
        report = json.loads((out / "init.json").read_text())
        assert report["loaded"] == sorted(backbone) and report["reinitialised"] == sorted(HEAD)
        assert report["source_classes"] == 8 and "8 classes in the source, 5 here" in report["why_head"]
        state.accelerator.end_training()


def test_init_refuses_another_backbone_and_a_missing_source(source, tmp_path_factory, tmp_path,
                                                           fresh_accelerate_state):
    from audioset_dcls.training.loop import setup_training

    cfg = fine_tune_config(tmp_path_factory, tmp_path / "a", f"model.init={source / 'model.safetensors'}",
                           "model.name=convnext_atto_dcls")
    with pytest.raises(CheckpointError, match="does not fit this model.s stem/backbone: .*conv_dw.weight") as info:
        setup_training(cfg)
    assert str(info.value).endswith("set model.name=convnext_atto") and "\n" not in str(info.value)
    with pytest.raises(CheckpointError, match="model.init=.*/nope: no such checkpoint file or folder, and not a published model"):
        setup_training(fine_tune_config(tmp_path_factory, tmp_path / "b", f"model.init={tmp_path / 'nope'}"))
    # a published name resolves through audioset_dcls.hub.pretrained (here: offline, empty cache)
    with pytest.raises(CheckpointError, match=r"^model.init=convnext_tiny_dcls: .*offline") as info:
        setup_training(fine_tune_config(tmp_path_factory, tmp_path / "d", "model.init=convnext_tiny_dcls"))
    assert "\n" not in str(info.value)
    # eval shards built without the train class list: caught before any training
    from audioset_dcls.data import DataError

    other = tmp_path / "other_eval"
    from audioset_dcls.shards.build import BuildOptions, build_shards

    train_dir, _ = own_shards(tmp_path_factory)
    clips = tmp_path_factory.getbasetemp() / "own_data" / "audio" / "clips"
    lst = tmp_path / "reordered.csv"
    lst.write_text("path,labels\n" + "".join(f"{clips / c / '000.wav'},{c}\n" for c in
                                                ("alarm", "clicks", "hum", "siren", "whistle")))
    classes = tmp_path / "classes.txt"
    classes.write_text("whistle\nsiren\nhum\nclicks\nalarm\n")
    build_shards(BuildOptions(lists=(lst,), classes=classes, out=other, split="eval", workers=0, progress=False,
                              feature_config=read_checkpoint_info(source / "model.safetensors").features))
    with pytest.raises(DataError, match=f"class 0 is 'whistle', data.train's 'alarm'.*--classes {train_dir}"):
        setup_training(fine_tune_config(tmp_path_factory, tmp_path / "e", f"data.eval={other}"))
    with pytest.raises(ConfigError, match="model.freeze_backbone: needs model.init"):
        fine_tune_config(tmp_path_factory, tmp_path / "c", "model.freeze_backbone=true")


def test_linear_probe_trains_only_the_head(source, tmp_path_factory, tmp_path, fresh_accelerate_state):
    from audioset_dcls.training.loop import train

    out = tmp_path / "probe"
    summary = train(fine_tune_config(tmp_path_factory, out, f"model.init={source / 'model.safetensors'}",
                                     "model.freeze_backbone=true", "train.max_steps=2", "data.eval="))
    assert summary["step"] == 2
    src = load_file(str(source / "model.safetensors"))
    after, _ = read_init_weights(resolve_reference(out, need="weights"))  # the run's latest training checkpoint
    assert all(torch.equal(after[k], src[k]) for k in after if k not in HEAD)
    assert after["head.fc.bias"].abs().sum() > 0  # the head trained (timm initialises its bias to 0)
    init = json.loads((out / "init.json").read_text())
    head0 = torch.load(out / "checkpoints" / "step_00000002" / "pytorch_model.bin", weights_only=True)
    assert head0["head.fc.weight"].shape == (5, src["head.fc.weight"].shape[1]) and init["reinitialised"] == sorted(HEAD)
    assert read_manifest(own_shards(tmp_path_factory)[0])["labels_per_clip"] == {"min": 1, "max": 1}


def test_single_label_loss_is_cross_entropy_on_soft_targets_and_auto_task(tmp_path_factory):
    from audioset_dcls.data import open_shard_set
    from audioset_dcls.training.recipe import compute_loss, resolve_task

    logits = torch.randn(4, 5, generator=torch.Generator().manual_seed(0))
    y = torch.eye(5)[[0, 3, 1, 1]] * 0.9 + 0.1 / 5  # label smoothing keeps rows distributions
    manual = -(y * torch.log_softmax(logits, -1)).sum(-1).mean()
    assert torch.allclose(compute_loss(logits, y, "singlelabel"), manual)
    assert not torch.allclose(compute_loss(logits, y, "multilabel"), manual)
    own, _ = own_shards(tmp_path_factory)
    audioset, _ = session_shards(tmp_path_factory, 2.0)
    assert resolve_task("auto", open_shard_set(own, "own")) == "singlelabel"
    assert resolve_task("auto", open_shard_set(audioset, "audioset")) == "multilabel"
    with pytest.raises(ConfigError, match="train.task=singlelabel, but .* clips with up to 3 labels"):
        resolve_task("singlelabel", open_shard_set(audioset, "audioset"))


# ------------------------------------------------ a 2-process fine-tune with the fine-tuning recipe

@pytest.fixture(scope="module")
def finetuned(source, tmp_path_factory) -> tuple[Path, str]:
    """configs/finetune.yaml, scaled down: convnext_atto from the source run, on the own-label
    shards (five single-label classes), 2 processes (torchrun, gloo), 3 epochs."""
    train_dir, eval_dir = own_shards(tmp_path_factory)
    out = tmp_path_factory.mktemp("finetuned")
    log = check(run_train("torchrun", [
        "--config", "configs/finetune.yaml", "model.name=convnext_atto", f"model.init={source / 'model.safetensors'}",
        f"data.train={train_dir}", f"data.eval={eval_dir}", f"train.output_dir={out}", "schedule.epochs=3",
        "schedule.warmup_steps=2", "data.batch_size=8", "optim.batch_size=16", "data.num_workers=1",
        "eval.num_workers=1", "train.progress_bar=false", "train.tracker=none", "train.log_every_steps=1"]))
    return out, log


def test_two_process_fine_tune_is_single_label_with_accuracy(finetuned):
    out, log = finetuned
    s = json.loads((out / "summary.json").read_text())
    assert s["finished"] and s["processes"] == 2 and s["task"] == "singlelabel"
    assert len(set(s["param_checksums"])) == 1  # the replicas stayed in sync
    assert "loaded" in log and "re-initialised the classifier (head.fc.bias, head.fc.weight)" in log
    assert "5 classes, singlelabel" in log and re.search(r"eval epoch 2: accuracy [01]\.\d{4} top-5 [01]\.\d{4}", log)
    results = [json.loads(line) for line in (out / "eval" / "results.jsonl").read_text().splitlines()]
    assert len(results) == 3 and all(0 <= r["accuracy"] <= r["top5"] <= 1 for r in results)
    assert results[-1]["top5"] == 1.0  # five classes: the true one is always among the best five
    with open(out / "eval" / "per_class_ap_epoch002.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [r["name"] for r in rows] == ["alarm", "clicks", "hum", "siren", "whistle"] and "accuracy" in rows[0]
    info = read_checkpoint_info(out / "model.safetensors")
    assert info.task == "singlelabel" and info.label_names == [r["name"] for r in rows]
    assert info.extra["eval"] == {k: v for k, v in results[-1].items() if k not in ("epoch", "step")} and info.extra["init"]["reinitialised"] == sorted(HEAD)


def test_the_tagger_says_the_new_label_names_with_softmax_scores(finetuned, tmp_path_factory, capsys):
    from audioset_dcls.tagging.cli import main as tag_main

    out, _ = finetuned
    clip = tmp_path_factory.getbasetemp() / "own_data" / "audio" / "clips" / "siren" / "001.flac"
    assert tag_main(["--checkpoint", str(out / "model.safetensors"), str(clip), "--format", "json", "--top-k", "0",
                     "-q"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["task"] == "singlelabel" and doc["aggregate"] == "mean"
    (result,) = doc["results"]
    tags = result["tags"]
    assert sorted(t["name"] for t in tags) == ["alarm", "clicks", "hum", "siren", "whistle"]
    assert sum(t["score"] for t in tags) == pytest.approx(1.0, abs=1e-5)  # softmax: a distribution
    assert [t["score"] for t in tags] == sorted((t["score"] for t in tags), reverse=True)  # top class first
