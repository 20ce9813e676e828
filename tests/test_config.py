"""Typed config: defaults are the reference recipe, YAML and dotted overrides, errors name keys."""

from __future__ import annotations

import dataclasses
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from audioset_dcls.config import Config, ConfigError, apply_overrides, config_from_dict, load_config, to_yaml
from audioset_dcls.models import list_models

REPO = Path(__file__).resolve().parents[1]
PAPER = list_models(paper=True)


def test_defaults_are_the_reference_recipe():
    c = Config()
    assert (c.schedule.epochs, c.schedule.warmup_epochs, c.schedule.min_lr) == (60, 20.0, 1e-6)
    assert (c.optim.lr, c.optim.batch_size, c.optim.weight_decay, c.optim.dcls_lr_scale) == (4e-3, 4096, 0.05, 5.0)
    assert c.model.drop_path_rate == 0.4
    a = c.augment
    assert (a.mixup_alpha, a.label_smoothing, a.time_roll, a.time_stretch_prob, a.erase_prob) == (0.8, 0.1, True, 0.5, 0.25)
    assert (c.train.ema_decay, c.optim.clip_grad_norm, c.train.mixed_precision) == (0.0, 0.0, "no")
    assert (c.data.class_balanced, c.data.norm_mean) == (False, None)


def test_dotted_overrides_are_coerced_to_the_field_type():
    c = apply_overrides(Config(), ["optim.lr=1e-3", "data.batch_size=64", "augment.time_roll=false",
                                   "optim.betas=[0.9, 0.95]", "data.norm_mean=-20", "data.norm_std=10",
                                   "model.kwargs.head_dropout=0.1", "data.train=/x/y"])
    assert c.optim.lr == 0.001 and isinstance(c.optim.lr, float)  # YAML 1.1 reads 1e-3 as a string
    assert c.data.batch_size == 64 and c.augment.time_roll is False
    assert c.optim.betas == (0.9, 0.95)
    assert (c.data.norm_mean, c.data.norm_std) == (-20.0, 10.0)
    assert c.model.kwargs == {"head_dropout": 0.1} and c.data.train == "/x/y"


@pytest.mark.parametrize("override,needle", [
    ("optim.lrr=1", "optim.lrr"),
    ("optimizer.lr=1", "optimizer"),
    ("data.batch_size=abc", "data.batch_size"),
    ("data.batch_size=1.5", "data.batch_size"),
    ("augment.time_roll=maybe", "augment.time_roll"),
    ("optim.name=sgd", "optim.name"),
    ("lr=1", "section.key"),
    ("optim.lr", "section.key=value"),
    ("train.checkpoint_on_signal=SIGKILL", "train.checkpoint_on_signal: 'SIGKILL' is not one of"),
    ("data.verify_shards=md5", "data.verify_shards"),
])
def test_bad_overrides_name_the_key(override, needle):
    with pytest.raises(ConfigError, match=needle.replace(".", r"\.")):
        apply_overrides(Config(), [override])


def test_stop_signals_are_parsed_by_name():
    from audioset_dcls.preemption import parse_stop_signals

    assert parse_stop_signals(Config().train.checkpoint_on_signal) == (signal.SIGTERM, signal.SIGUSR1)
    assert parse_stop_signals("usr2, TERM,SIGTERM") == (signal.SIGUSR2, signal.SIGTERM)
    assert parse_stop_signals("none") == parse_stop_signals("") == ()


def test_unknown_yaml_key_is_an_error_naming_file_and_key(tmp_path):
    p = tmp_path / "bad.yaml"
    p.write_text("optim:\n  lr: 1.0e-3\n  warmup: 5\n")
    with pytest.raises(ConfigError, match=r"bad\.yaml.*optim\.warmup"):
        load_config(p)


def test_yaml_then_overrides_and_round_trip(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("model:\n  name: convnext_atto\noptim:\n  lr: 2.0e-3\n")
    c = load_config(p, ["optim.lr=5e-4"])
    assert c.model.name == "convnext_atto" and c.optim.lr == 5e-4
    assert c.model.drop_path_rate == Config().model.drop_path_rate  # untouched keys keep defaults
    assert config_from_dict(yaml.safe_load(to_yaml(c))) == c
    with pytest.raises(dataclasses.FrozenInstanceError):
        c.optim.lr = 1.0  # type: ignore[misc]


def test_every_config_file_loads_and_paper_configs_follow_the_recipe():
    files = sorted((REPO / "configs").glob("*.yaml"))
    assert {f.stem for f in files} >= set(PAPER) | {"tiny"}
    for f in files:
        load_config(f)
    for name in PAPER:
        c = load_config(REPO / "configs" / f"{name}.yaml")
        assert c.model.name == name
        assert c.optim.name == ("lamb" if name.startswith("convformer") else "adamw")
        # Only the model (and its output dir / layer scale) differs from the reference defaults.
        assert (c.data, c.schedule, c.augment, c.eval) == (Config().data, Config().schedule, Config().augment, Config().eval)
        assert dataclasses.replace(c.optim, name="adamw") == Config().optim


def test_train_py_print_config_and_bad_key_exit_code():
    out = subprocess.run([sys.executable, "train.py", "--config", "configs/tiny.yaml", "optim.lr=1e-3",
                          "--print-config"], cwd=REPO, capture_output=True, text=True, check=True).stdout
    assert yaml.safe_load(out)["optim"]["lr"] == 0.001
    bad = subprocess.run([sys.executable, "train.py", "optim.nope=1"], cwd=REPO, capture_output=True, text=True)
    assert bad.returncode == 2 and "optim.nope" in bad.stderr


def test_string_overrides_are_taken_as_typed_not_as_yaml_booleans():
    cfg = apply_overrides(Config(), ["train.mixed_precision=no", "train.output_dir=runs/on", 'data.train=""',
                                     "train.resume=1e3"])
    assert cfg.train.mixed_precision == "no" and cfg.train.output_dir == "runs/on"
    assert cfg.data.train == "" and cfg.train.resume == "1e3"
    with pytest.raises(ConfigError, match="quote"):
        config_from_dict({"train": {"mixed_precision": False}})  # `mixed_precision: no` in a YAML file
