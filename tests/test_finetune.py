"""Fine-tuning (issue 13): a model trained on the synthetic AudioSet-format set initialises a
model for another label set (model.init), a linear probe (model.freeze_backbone), single-label
training with accuracy, the tagger on the fine-tuned checkpoint, and a 2-process fine-tune."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from audioset_dcls.checkpoint import CheckpointError, read_checkpoint_info
from audioset_dcls.config import ConfigError, load_config
from audioset_dcls.finetune import read_init_weights
from audioset_dcls.shards import read_manifest
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
    from audioset_dcls.training import setup_training

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
    from audioset_dcls.training import setup_training

    cfg = fine_tune_config(tmp_path_factory, tmp_path / "a", f"model.init={source / 'model.safetensors'}",
                           "model.name=convnext_atto_dcls")
    with pytest.raises(CheckpointError, match="does not fit this model.s stem/backbone: .*conv_dw.weight") as info:
        setup_training(cfg)
    assert str(info.value).endswith("set model.name=convnext_atto") and "\n" not in str(info.value)
    with pytest.raises(CheckpointError, match="no such file or directory, and not a published model"):
        setup_training(fine_tune_config(tmp_path_factory, tmp_path / "b", f"model.init={tmp_path / 'nope'}"))
    # a published name resolves through audioset_dcls.pretrained (here: offline, empty cache)
    with pytest.raises(CheckpointError, match=r"^model.init=convnext_tiny_dcls: .*offline") as info:
        setup_training(fine_tune_config(tmp_path_factory, tmp_path / "d", "model.init=convnext_tiny_dcls"))
    assert "\n" not in str(info.value)
    with pytest.raises(ConfigError, match="model.freeze_backbone: needs model.init"):
        fine_tune_config(tmp_path_factory, tmp_path / "c", "model.freeze_backbone=true")


def test_linear_probe_trains_only_the_head(source, tmp_path_factory, tmp_path, fresh_accelerate_state):
    from audioset_dcls.training import train

    out = tmp_path / "probe"
    summary = train(fine_tune_config(tmp_path_factory, out, f"model.init={source / 'model.safetensors'}",
                                     "model.freeze_backbone=true", "train.max_steps=2", "data.eval="))
    assert summary["step"] == 2
    src = load_file(str(source / "model.safetensors"))
    after, _, _ = read_init_weights(out)  # the run's latest training checkpoint
    assert all(torch.equal(after[k], src[k]) for k in after if k not in HEAD)
    assert after["head.fc.bias"].abs().sum() > 0  # the head trained (timm initialises its bias to 0)
    init = json.loads((out / "init.json").read_text())
    head0 = torch.load(out / "checkpoints" / "step_00000002" / "pytorch_model.bin", weights_only=True)
    assert head0["head.fc.weight"].shape == (5, src["head.fc.weight"].shape[1]) and init["reinitialised"] == sorted(HEAD)
    assert read_manifest(own_shards(tmp_path_factory)[0])["labels_per_clip"] == {"min": 1, "max": 1}
