"""Typed training configuration: frozen dataclasses, YAML files that override them, and dotted
command-line overrides (``optim.lr=1e-3 data.train=/x``).

The dataclass defaults are the one source of defaults: they are the reference recipe for
ConvNeXt-T-DCLS (docs/method.md says where each number comes from; docs/configuration.md lists
every key and is checked against this file). A YAML file lists only what differs; unknown keys
are errors that name the key; values are checked against and coerced to the field's type
(so ``optim.lr=1e-3`` is a float although YAML 1.1 reads ``1e-3`` as a string). The resolved
config is written to every run directory and checkpoint (``to_yaml``) and into the inference
checkpoint's ``extra``.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import yaml

from .preemption import parse_stop_signals

__all__ = [
    "DataConfig",
    "ModelConfig",
    "OptimConfig",
    "ScheduleConfig",
    "AugmentConfig",
    "TrainConfig",
    "EvalConfig",
    "DistillConfig",
    "Config",
    "ConfigError",
    "load_config",
    "apply_overrides",
    "config_from_dict",
    "config_to_dict",
    "to_yaml",
]


class ConfigError(ValueError):
    """A config file or override is wrong; the message names the key."""


@dataclass(frozen=True)
class DataConfig:
    train: str = ""  # shard directory of the training split (manifest.json + tars)
    eval: str = ""  # shard directory of the evaluation split
    batch_size: int = 32  # per device and per micro-step
    num_workers: int = 4  # loader processes per rank for training
    samples_per_epoch: int = 0  # global samples per epoch; 0 = the train manifest's clip count
    shuffle_buffer: int = 2000  # samples held by each worker's shuffle buffer
    shuffle_initial: int = 500  # samples gathered before the buffer starts yielding
    normalization: str = "reference"  # "reference" (-18.2696 / 30.5735) or "manifest" (train shard stats)
    norm_mean: Optional[float] = None  # explicit mean/std override both of the above
    norm_std: Optional[float] = None
    class_balanced: bool = False  # rejection-sample by inverse label frequency (reference: off)
    balance_power: float = 1.0  # acceptance ~ (1 / freq) ** power; 0.5 is a milder balance
    verify_shards: str = "size"  # before the first step: "size" (every listed shard, cheap), "sha256" or "none"


@dataclass(frozen=True)
class ModelConfig:
    name: str = "convnext_tiny_dcls"
    drop_path_rate: float = 0.4
    # None = the family's own default (ConvNeXt: 1e-6, the reference's; FastViT: 1e-5; ConvFormer
    # has res-scale instead and ignores it).
    layer_scale_init_value: Optional[float] = None
    kwargs: dict = field(default_factory=dict)  # anything else for models.create_model
    # start from these weights: an inference checkpoint, a training checkpoint or run directory, or a
    # published name (convnext_tiny_dcls); every tensor whose name and shape fit, the head re-initialised
    init: str = ""
    freeze_backbone: bool = False  # train the classifier only (a linear probe); needs model.init


@dataclass(frozen=True)
class OptimConfig:
    name: str = "adamw"  # "adamw" or "lamb"
    lr: float = 4e-3  # peak learning rate at the effective batch below
    batch_size: int = 4096  # effective (global) batch: per-device batch x processes x accumulation
    weight_decay: float = 0.05
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    dcls_lr_scale: float = 5.0  # DCLS positions/widths: lr x this, no weight decay
    clip_grad_norm: float = 0.0  # 0 = off (the reference does not clip)
    # the classifier head's lr = lr x this (a new head learns from zero: AST/BEATs fine-tuning)
    head_lr_scale: float = 1.0
    # layer-wise lr decay (BEiT, BEATs): a block n blocks below the head trains at lr x decay**n; 1 = off
    layer_decay: float = 1.0


@dataclass(frozen=True)
class ScheduleConfig:
    epochs: int = 60
    warmup_epochs: float = 20.0
    warmup_steps: int = 0  # > 0: warm up over this many optimizer steps instead (short fine-tunes)
    warmup_fraction: float = 0.0  # > 0 (and warmup_steps 0): warm up over this fraction of all steps
    warmup_lr: float = 0.0  # lr at step 0, rising linearly to optim.lr
    min_lr: float = 1e-6  # cosine floor


@dataclass(frozen=True)
class AugmentConfig:
    label_smoothing: float = 0.1  # targets y*(1-e) + e/C, before mixup (timm convention)
    mixup_alpha: float = 0.8  # 0 = off; one Beta(a, a) lambda per batch, mixed with the flipped batch
    time_roll: bool = True  # random circular shift along time, per clip
    time_stretch_prob: float = 0.5  # stand-in for waveform speed perturbation
    time_stretch_min: float = 0.5  # length factor r ~ U(min, max): the clip's length x r (reference)
    time_stretch_max: float = 1.5
    erase_prob: float = 0.25  # random erasing of one rectangle per clip (timm-style area/aspect)
    freq_masks: int = 0  # SpecAugment: number of frequency masks per clip (0 = off)
    freq_mask_width: int = 0  # max bins per mask
    time_masks: int = 0  # SpecAugment: number of time masks per clip (0 = off)
    time_mask_width: int = 0  # max frames per mask
    # > 0: with fewer training clips than this, every augmentation above (stretch and erase
    # probabilities, mixup alpha, label smoothing, mask counts) and model.drop_path_rate is scaled
    # by clips / full_strength_clips (training.finetune.scale_for_small_set); 0 = as configured
    full_strength_clips: int = 0


@dataclass(frozen=True)
class TrainConfig:
    output_dir: str = "runs/default"
    seed: int = 0
    mixed_precision: str = "no"  # "no", "bf16" or "fp16" (through accelerate)
    ema_decay: float = 0.0  # 0 = no EMA (the reference has none)
    checkpoint_every_steps: int = 500  # also saved at every epoch end and at the end
    keep_checkpoints: int = 2
    resume: str = ""  # "" = fresh start (refuses a non-empty run), "auto" = latest checkpoint, or a path
    max_steps: int = 0  # stop (with a checkpoint) after this optimizer step; schedule unchanged. 0 = run all
    log_every_steps: int = 20
    tracker: str = "tensorboard"  # accelerate tracker name, or "none"
    progress_bar: bool = True
    # finish the step, checkpoint and exit 75 on these (comma-separated; "none": die as usual)
    checkpoint_on_signal: str = "SIGTERM,SIGUSR1"
    # "multilabel" (sigmoid + binary cross-entropy, AudioSet), "singlelabel" (softmax + cross-entropy,
    # accuracy), or "auto": singlelabel when every training clip has exactly one label
    task: str = "auto"


@dataclass(frozen=True)
class EvalConfig:
    every_epochs: int = 5  # also after the last epoch
    batch_size: int = 64
    num_workers: int = 2
    use_ema: bool = True  # evaluate (and export) the EMA weights when train.ema_decay > 0


@dataclass(frozen=True)
class DistillConfig:
    """Knowledge distillation from a teacher's stored scores (docs/training.md, "Distillation from a
    teacher's scores"): loss = (1 - weight) * label loss + weight * distillation loss; off while
    ``teacher`` is empty."""

    teacher: str = ""  # parquet file/folder (id + scores columns), or a .npy/.pt matrix in distill.hdf5 order
    hdf5: str = ""  # comma-separated HDF5 files whose audio_name order the .npy/.pt rows follow
    scores: str = "probabilities"  # what the teacher stores: "logits" or "probabilities" (sigmoid/softmax)
    weight: float = 0.9  # lambda; 0.9 = EfficientAT's kd_lambda 0.1 on the label loss
    temperature: float = 1.0  # teacher targets sigmoid(z / T) (multi-label) or softmax(z / T) with T^2 KL
    id_column: str = "id"  # parquet column of clip ids (the shards' ytid)
    scores_column: str = "scores"  # parquet column of per-class score lists
    labels: str = ""  # class_labels_indices.csv of the teacher's class order (checked against the shards)
    table_dir: str = ""  # where the memory-mapped table is built; "" = <train.output_dir>/teacher_table


@dataclass(frozen=True)
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)

    def validate(self) -> "Config":
        """Check value ranges that types cannot express; returns self."""
        checks = [
            (self.optim.name in ("adamw", "lamb"), "optim.name", "must be 'adamw' or 'lamb'"),
            (self.train.mixed_precision in ("no", "bf16", "fp16"), "train.mixed_precision", "must be no, bf16 or fp16"),
            (self.data.normalization in ("reference", "manifest"), "data.normalization", "must be reference or manifest"),
            ((self.data.norm_mean is None) == (self.data.norm_std is None), "data.norm_mean", "set norm_mean and norm_std together"),
            (self.data.batch_size > 0, "data.batch_size", "must be > 0"),
            (self.optim.batch_size > 0, "optim.batch_size", "must be > 0"),
            (self.schedule.epochs > 0, "schedule.epochs", "must be > 0"),
            (0 <= self.schedule.warmup_epochs <= self.schedule.epochs, "schedule.warmup_epochs", "must be in [0, epochs]"),
            (self.schedule.warmup_steps >= 0, "schedule.warmup_steps", "must be >= 0"),
            (0 <= self.schedule.warmup_fraction <= 1, "schedule.warmup_fraction", "must be in [0, 1]"),
            (self.optim.head_lr_scale > 0, "optim.head_lr_scale", "must be > 0"),
            (0 < self.optim.layer_decay <= 1, "optim.layer_decay", "must be in (0, 1]"),
            (self.augment.full_strength_clips >= 0, "augment.full_strength_clips", "must be >= 0"),
            (0 <= self.augment.label_smoothing < 1, "augment.label_smoothing", "must be in [0, 1)"),
            (0 <= self.augment.time_stretch_min <= self.augment.time_stretch_max, "augment.time_stretch_min",
             "must be >= 0 and <= time_stretch_max"),
            (0 <= self.train.ema_decay < 1, "train.ema_decay", "must be in [0, 1)"),
            (self.eval.every_epochs > 0, "eval.every_epochs", "must be > 0"),
            (self.train.checkpoint_every_steps > 0, "train.checkpoint_every_steps", "must be > 0"),
            (self.model.init or not self.model.freeze_backbone, "model.freeze_backbone",
             "needs model.init (a probe of randomly initialised features learns nothing useful)"),
            (self.train.task in ("auto", "multilabel", "singlelabel"), "train.task",
             "must be auto, multilabel or singlelabel"),
            (self.data.verify_shards in ("size", "sha256", "none"), "data.verify_shards", "must be size, sha256 or none"),
            (self.distill.scores in ("logits", "probabilities"), "distill.scores", "must be logits or probabilities"),
            (0 <= self.distill.weight <= 1, "distill.weight", "must be in [0, 1]"),
            (self.distill.temperature > 0, "distill.temperature", "must be > 0"),
        ]
        for ok, key, why in checks:
            if not ok:
                raise ConfigError(f"{key}: {why}")
        try:
            parse_stop_signals(self.train.checkpoint_on_signal)
        except ValueError as err:
            raise ConfigError(f"train.checkpoint_on_signal: {err}") from None
        return self


# --------------------------------------------------------------------------- (de)serialisation


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check ``value`` against the annotation ``tp`` and convert where it is unambiguous."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null")):
            if type(None) in args:
                return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(value, inner[0], key)
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "yes", "no", "1", "0", "on", "off"):
            return value.lower() in ("true", "yes", "1", "on")
        raise ConfigError(f"{key}: expected true/false, got {value!r}")
    if tp is int:
        if isinstance(value, bool):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                f = float(value)
            except ValueError:
                f = None
            if f is not None and f.is_integer():
                return int(f)
        raise ConfigError(f"{key}: expected an integer, got {value!r}")
    if tp is float:
        if isinstance(value, bool):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        if isinstance(value, (int, float)):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{key}: expected a number, got {value!r}")
    if tp is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        hint = " (YAML reads no/yes/on/off as booleans: quote the value)" if isinstance(value, bool) else ""
        raise ConfigError(f"{key}: expected a string, got {value!r}{hint}")
    if origin is tuple:
        args = typing.get_args(tp)
        if isinstance(value, str):
            value = yaml.safe_load(value)
        if not isinstance(value, (list, tuple)) or len(value) != len(args):
            raise ConfigError(f"{key}: expected a list of {len(args)} values, got {value!r}")
        return tuple(_coerce(v, a, f"{key}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
    if tp is dict or origin is dict:
        if isinstance(value, str):
            value = yaml.safe_load(value)
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        return dict(value)
    raise ConfigError(f"{key}: unsupported field type {tp!r}")


def _section_from_dict(cls: type, d: dict[str, Any], prefix: str) -> Any:
    if not isinstance(d, dict):
        raise ConfigError(f"{prefix}: expected a mapping, got {d!r}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    for k in d:
        if k not in names:
            raise ConfigError(f"unknown config key {prefix}.{k} (known: {', '.join(sorted(names))})")
    return cls(**{k: _coerce(v, hints[k], f"{prefix}.{k}") for k, v in d.items()})


def config_from_dict(d: dict[str, Any] | None) -> Config:
    """Nested dict (as in a YAML file) -> validated Config; missing keys keep their defaults."""
    d = d or {}
    if not isinstance(d, dict):
        raise ConfigError(f"config must be a mapping of sections, got {type(d).__name__}")
    hints = typing.get_type_hints(Config)
    sections = {f.name for f in dataclasses.fields(Config)}
    for k in d:
        if k not in sections:
            raise ConfigError(f"unknown config section {k!r} (known: {', '.join(sorted(sections))})")
    return Config(**{k: _section_from_dict(hints[k], v or {}, k) for k, v in d.items()}).validate()


def config_to_dict(cfg: Config) -> dict[str, Any]:
    """Config -> plain nested dict (tuples become lists) for YAML/JSON."""

    def plain(x: Any) -> Any:
        if isinstance(x, tuple):
            return [plain(v) for v in x]
        if isinstance(x, dict):
            return {k: plain(v) for k, v in x.items()}
        return x

    return {k: plain(v) for k, v in dataclasses.asdict(cfg).items()}


def to_yaml(cfg: Config) -> str:
    return yaml.safe_dump(config_to_dict(cfg), sort_keys=False)


def _is_str_field(section: str, name: str) -> bool:
    section_type = typing.get_type_hints(Config)[section]
    return typing.get_type_hints(section_type).get(name) is str


def apply_overrides(cfg: Config, overrides: list[str]) -> Config:
    """Apply ``section.key=value`` strings in order. Values are parsed as YAML, then coerced.

    >>> apply_overrides(Config(), ["optim.lr=1e-3"]).optim.lr
    0.001
    """
    d = config_to_dict(cfg)
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not of the form section.key=value")
        key, raw = item.split("=", 1)
        parts = key.strip().split(".")
        if len(parts) < 2:
            raise ConfigError(f"override {item!r}: key must be section.key (e.g. optim.lr=1e-3)")
        section, name = parts[0], parts[1]
        if section not in d:
            raise ConfigError(f"unknown config section {section!r} in override {item!r}")
        if name not in d[section]:
            raise ConfigError(f"unknown config key {section}.{name} in override {item!r}")
        try:
            value = yaml.safe_load(raw) if raw.strip() else ""
            # A string field takes unquoted text as typed: `train.mixed_precision=no` means "no",
            # not YAML's boolean False (quoted text, `data.train=""`, still parses as YAML).
            if _is_str_field(section, name) and not isinstance(value, str):
                value = raw
        except yaml.YAMLError:
            # Not YAML (e.g. a path like "..." or "a: b"): the text itself; the field's type check
            # below still rejects it where a number or list is expected.
            value = raw
        if len(parts) > 2:  # into a dict field, e.g. model.kwargs.foo=1
            target = d[section][name]
            if not isinstance(target, dict):
                raise ConfigError(f"{section}.{name} is not a mapping; cannot set {key}")
            for p in parts[2:-1]:
                target = target.setdefault(p, {})
            target[parts[-1]] = value
        else:
            d[section][name] = value
    return config_from_dict(d)


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Defaults <- YAML file (optional) <- dotted overrides; validated."""
    d: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {path} not found")
        with open(path) as f:
            d = yaml.safe_load(f) or {}
        try:
            cfg = config_from_dict(d)
        except ConfigError as err:
            raise ConfigError(f"{path}: {err}") from None
    else:
        cfg = Config()
    return apply_overrides(cfg, list(overrides or []))
