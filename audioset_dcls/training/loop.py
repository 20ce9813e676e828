"""The training engine: config -> Accelerator -> data -> model -> optimizer -> loop -> checkpoints.

:func:`train` reads top to bottom; each phase is one function of a :class:`TrainState`::

    setup_training      open_data -> find_resume_checkpoint -> create_accelerator -> seed ->
                        build_model -> EMA -> build_optimizer -> build_scheduler -> one prepare
                        -> resume_training (load_state)
    train_one_epoch     per micro-batch train_micro_step (augment, forward, compute_loss,
                        backward); per optimizer step optimizer_step -> log_step -> end_step
                        (the step boundary: checkpoint when due, stop at train.max_steps or
                        when a rank got a stop signal: poll_stop)
    end_epoch           evaluate_epoch (audioset_dcls.training.evaluate) -> count the epoch -> save_checkpoint
    finish_training     corrupt-sample report -> export_model (model.safetensors) -> summary.json

Stop signals (train.checkpoint_on_signal, audioset_dcls.preemption): every rank finishes its
optimizer step, all agree at the step boundary, one checkpoint is written and train.py exits
with status 75. A write that fails (disk full) on any rank fails on every rank with one line
(OutputError), and the previous checkpoint stays the one --resume continues from.

Order follows accelerate's ``complete_cv_example``: Accelerator -> trackers -> seed -> data ->
model -> param groups / optimizer / scheduler -> one ``prepare`` (model, optimizer, scheduler
only: the WebDataset loaders split by node themselves; see data.py) -> loop with
``accelerator.backward`` -> ``save_state`` / ``load_state`` -> gathered evaluation ->
``end_training``.

Reproducibility and exact resume: the data stream of an epoch is a function of (seed, epoch,
rank, worker) and is replayed up to the saved position on resume; every micro-step reseeds the
global torch RNG (drop path) and builds its augmentation generator from (seed, rank, micro-step),
so no hidden RNG history is needed. Model, optimizer, scheduler, grad scaler, EMA, RNG states
and the progress counters go through ``accelerator.save_state`` into a temporary directory that
is renamed into place once complete.

Steps are optimizer steps: one step = ``optim.batch_size`` clips over all processes
(per-device batch x processes x accumulation).
"""

from __future__ import annotations

import contextlib
import copy
import itertools
import json
import math
import os
import pickle
import shutil
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
import yaml
from accelerate import Accelerator
from accelerate.logging import get_logger
from accelerate.utils import broadcast_object_list, gather_object, set_seed
from torch import nn
from tqdm.auto import tqdm

from ..augment import augment_batch
from ..hub.checkpoint import CheckpointError, CheckpointInfo, save_inference_checkpoint
from ..config import Config, ConfigError, config_to_dict, to_yaml
from ..data import (
    DataError,
    ShardSet,
    build_train_loader,
    derive_seed,
    labels_per_clip,
    move_batch,
    open_shard_set,
    resolve_normalization,
    train_batches_per_rank,
)
from .evaluate import append_jsonl, evaluate, format_result, summarize, thresholds_record, write_per_class_csv
from ..features import Normalization
from .finetune import InitReport, freeze_backbone, init_from_checkpoint, set_train_mode, write_report
from ..files import write_text
from ..preemption import StopSignals, agree_to_stop, parse_stop_signals

__all__ = [
    "lr_at",
    "gradient_accumulation_steps",
    "build_model",
    "build_optimizer",
    "build_scheduler",
    "compute_loss",
    "ModelEma",
    "TrainProgress",
    "TrainState",
    "find_checkpoint",
    "OutputError",
    "train",
]

CHECKPOINTS = "checkpoints"
LATEST = "latest"

log = get_logger("audioset_dcls.train")  # logs on the main process only unless told otherwise


class OutputError(RuntimeError):
    """The run directory could not be written (disk full, quota, permissions). Raised on every
    rank; the message names the file and the checkpoint a ``--resume`` continues from."""


def lr_at(step: int, *, peak: float, total_steps: int, warmup_steps: int, warmup_lr: float = 0.0,
          min_lr: float = 0.0) -> float:
    """Learning rate for optimizer step ``step`` (0-based): linear warmup from ``warmup_lr`` to
    ``peak`` over ``warmup_steps``, then half a cosine from ``peak`` down to ``min_lr`` at
    ``total_steps``."""
    if step < warmup_steps:
        return warmup_lr + (peak - warmup_lr) * step / warmup_steps
    if step >= total_steps:
        return min_lr
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return min_lr + 0.5 * (peak - min_lr) * (1.0 + math.cos(math.pi * progress))


def gradient_accumulation_steps(global_batch: int, per_device_batch: int, num_processes: int) -> int:
    """Micro-steps per optimizer step so that per_device_batch x processes x accum == global_batch."""
    per_step = per_device_batch * num_processes
    if global_batch % per_step:
        raise ConfigError(
            f"optim.batch_size={global_batch} is not a multiple of data.batch_size x processes = "
            f"{per_device_batch} x {num_processes} = {per_step}; change data.batch_size or optim.batch_size"
        )
    return global_batch // per_step


def build_optimizer(model: nn.Module, cfg: Config) -> torch.optim.Optimizer:
    """AdamW or LAMB over models.param_groups (DCLS positions/widths: lr x dcls_lr_scale, no decay)."""
    from ..models import param_groups

    o = cfg.optim
    groups = param_groups(model, lr=o.lr, weight_decay=o.weight_decay, dcls_lr_scale=o.dcls_lr_scale)
    if o.name == "adamw":
        return torch.optim.AdamW(groups, lr=o.lr, betas=o.betas, eps=o.eps, weight_decay=o.weight_decay)
    # timm's LAMB (what the reference trains ConvFormer with): per-layer trust ratio, and a
    # global grad-norm clip at 1.0 built in, as in timm's defaults.
    from timm.optim import Lamb

    return Lamb(groups, lr=o.lr, betas=o.betas, eps=o.eps, weight_decay=o.weight_decay)


class ModelEma(nn.Module):
    """Exponential moving average of a model's parameters and buffers (kept in fp32)."""

    def __init__(self, model: nn.Module, decay: float):
        super().__init__()
        self.decay = decay
        self.module = copy.deepcopy(model).eval().requires_grad_(False)

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        # parameters()/buffers() list each tensor once; state_dict() would repeat the DCLS
        # positions and widths shared by a stage under every layer's key, and average them
        # several times per step.
        mine = itertools.chain(self.module.parameters(), self.module.buffers())
        theirs = itertools.chain(model.parameters(), model.buffers())
        for e, m in zip(mine, theirs, strict=True):
            if e.dtype.is_floating_point:
                e.lerp_(m.detach().to(e.dtype), 1.0 - self.decay)
            else:
                e.copy_(m)


@dataclass
class TrainProgress:
    """Where training stands; saved with every checkpoint (accelerate custom object)."""

    epoch: int = 0  # current epoch (0-based)
    step: int = 0  # optimizer steps done
    batches_in_epoch: int = 0  # micro-batches of ``epoch`` this rank has trained on
    samples_seen: int = 0  # clips over all processes
    processes: int = 0  # the run's process count (checked on resume: it shapes the data stream)

    def state_dict(self) -> dict[str, int]:
        return dict(self.__dict__)

    def load_state_dict(self, d: dict[str, int]) -> None:
        self.__dict__.update({k: int(v) for k, v in d.items()})


def build_model(cfg: Config, num_classes: int) -> nn.Module:
    """The network ``cfg.model`` describes, freshly initialised from the global torch RNG (seed
    first for identical replicas). Maps (B, 1, n_mels, T) log-mels to (B, num_classes) logits."""
    from ..models import create_model

    return create_model(cfg.model.name, num_classes=num_classes, drop_path_rate=cfg.model.drop_path_rate,
                        **_model_kwargs(cfg))


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: Config, total_steps: int,
                    warmup_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    """``lr_at`` per optimizer step, as a factor of each param group's own lr (DCLS x5 kept)."""
    peak, s = cfg.optim.lr, cfg.schedule

    def lr_factor(step: int) -> float:
        return lr_at(step, peak=peak, total_steps=total_steps, warmup_steps=warmup_steps, warmup_lr=s.warmup_lr,
                     min_lr=s.min_lr) / peak

    return torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor)


def compute_loss(logits: torch.Tensor, targets: torch.Tensor, task: str = "multilabel") -> torch.Tensor:
    """Mean binary cross-entropy of (B, C) logits against (B, C) soft multi-hot targets, or, for
    ``task="singlelabel"``, softmax cross-entropy against (B, C) soft one-hot targets (label
    smoothing and mixup keep each row a distribution); in fp32 whatever the autocast dtype.
    Returns a scalar."""
    if task == "singlelabel":
        return F.cross_entropy(logits.float(), targets)
    return F.binary_cross_entropy_with_logits(logits.float(), targets)


def resolve_task(task: str, train_set: ShardSet) -> str:
    """``train.task`` -> "multilabel" or "singlelabel" ("auto": singlelabel when every training
    clip has exactly one label). ConfigError for singlelabel on clips with several labels."""
    if task == "multilabel":
        return task
    fewest, most = labels_per_clip(train_set)
    if task == "auto":
        return "singlelabel" if fewest == most == 1 else "multilabel"
    if most > 1:
        raise ConfigError(f"train.task=singlelabel, but {train_set.root} has clips with up to {most} labels; "
                          "use train.task=multilabel (or auto)")
    return task


# ------------------------------------------------------------------------------ run state


@dataclass
class StepMeter:
    """Loss and throughput since the last log line (this rank), and the first and last logged
    mean losses (the summary's ``loss_first`` / ``loss_last``)."""

    loss_sum: torch.Tensor  # on the device: adding to it needs no host sync per micro-step
    count: int = 0
    samples: int = 0  # clips over all processes
    since: float = field(default_factory=time.perf_counter)
    first: float | None = None
    last: float | None = None

    def add(self, loss: torch.Tensor) -> None:
        self.loss_sum += loss.detach()
        self.count += 1

    def read(self, accelerator: Accelerator) -> tuple[float, float]:
        """(mean loss over every rank's micro-steps, samples/s) since the last read; every rank
        must call it (all-reduce). Starts the next window."""
        mean = accelerator.reduce(self.loss_sum / max(1, self.count), reduction="mean").item()
        dt = time.perf_counter() - self.since
        sps = self.samples / dt if dt > 0 else float("nan")
        self.first = mean if self.first is None else self.first
        self.last = mean
        self.loss_sum.zero_()
        self.count, self.samples, self.since = 0, 0, time.perf_counter()
        return mean, sps


@dataclass
class TrainState:
    """What the phases of one run share. ``progress`` (with the model, optimizer, scheduler, EMA
    and RNG states) is what checkpoints save; everything else is rebuilt from the config."""

    cfg: Config
    accelerator: Accelerator
    train_set: ShardSet
    eval_set: ShardSet | None
    norm: Normalization
    model: nn.Module  # as accelerator.prepare returned it (DDP-wrapped on several processes)
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    ema: ModelEma | None
    accum: int  # micro-steps per optimizer step
    per_rank_batches: int  # micro-batches per epoch on each rank
    total_steps: int  # optimizer steps of the whole schedule
    warmup_steps: int
    pad_value: float  # the normalised log-mel floor (silence): what time stretch pads with
    progress: TrainProgress = field(default_factory=TrainProgress)
    meter: StepMeter = field(init=False)
    bar: Any = None  # tqdm over optimizer steps (disabled off the main process)
    corrupt: dict[int, int] = field(default_factory=dict)  # loader worker -> its count of skipped samples
    final_eval: dict[str, Any] | None = None  # summary of the latest evaluation (main process)
    final_thresholds: dict[str, Any] | None = None  # per-class thresholds calibrated by it (main process)
    signals: StopSignals = field(default_factory=lambda: StopSignals(()))  # this rank's stop-signal flag
    init: InitReport | None = None  # what model.init loaded (fresh fine-tunes; None otherwise)
    task: str = "multilabel"  # train.task resolved: "multilabel" or "singlelabel"
    stopped_by: str = ""  # the signal all ranks agreed to stop on ("SIGTERM"), "" while running

    def __post_init__(self) -> None:
        self.meter = StepMeter(torch.zeros((), device=self.accelerator.device))

    @property
    def out_dir(self) -> Path:
        return Path(self.cfg.train.output_dir)

    @property
    def stop_at(self) -> int:
        """The optimizer step training stops after: train.max_steps, else the schedule's end."""
        return self.cfg.train.max_steps or self.total_steps

    @property
    def eval_model(self) -> nn.Module:
        """The weights evaluated and exported: the EMA with eval.use_ema, else the trained model."""
        if self.ema is not None and self.cfg.eval.use_ema:
            return self.ema.module
        return self.accelerator.unwrap_model(self.model)


# ---------------------------------------------------------------------------------- train


def train(cfg: Config) -> dict[str, Any]:
    """Run (or resume) training as ``cfg`` says. Returns the final summary (also written to
    ``<output_dir>/summary.json``): ``{"step", "epoch", "samples_seen", "loss_first", "loss_last",
    "eval": last eval summary or None, "checkpoint": inference checkpoint path (main process),
    "finished", "stopped_by", "processes", "param_checksums": one float per rank}``.

    On a stop signal (train.checkpoint_on_signal) it returns early with a checkpoint and
    ``"stopped_by": "SIGTERM"`` (else ``""``) in the summary.

    Raises DataError (shards), ConfigError (a config that does not fit the launch),
    CheckpointError (nothing to resume, a run that would be overwritten, an unreadable checkpoint)
    and OutputError (a checkpoint or result that could not be written: disk full).
    """
    with StopSignals(parse_stop_signals(cfg.train.checkpoint_on_signal)) as signals:
        state = setup_training(cfg, signals)
        while state.progress.epoch < cfg.schedule.epochs and state.progress.step < state.stop_at:
            if not train_one_epoch(state):
                break  # stopped inside the epoch (train.max_steps, a signal): no eval of a partial epoch
            end_epoch(state)
            if poll_stop(state):
                break  # end_epoch has just saved the checkpoint
        return finish_training(state)


# ---------------------------------------------------------------------------------- setup


def setup_training(cfg: Config, signals: StopSignals | None = None) -> TrainState:
    """Everything a run needs, in accelerate's order, resumed from its checkpoint if asked.
    Bad data or a bad resume request fail before any process group or model is built.
    ``signals``: this rank's stop-signal flag (installed by :func:`train`)."""
    train_set, eval_set, norm = open_data(cfg)
    task = resolve_task(cfg.train.task, train_set)
    resume_from = find_resume_checkpoint(cfg)
    accelerator = create_accelerator(cfg)
    world = accelerator.num_processes
    accum = gradient_accumulation_steps(cfg.optim.batch_size, cfg.data.batch_size, world)
    start_run_dir(accelerator, cfg)
    set_seed(cfg.train.seed)  # same initial weights on every rank
    model = build_model(cfg, train_set.num_classes)
    # model.init: a fresh run starts from those weights; a resumed one has its own in the checkpoint.
    init = load_init_weights(accelerator, cfg, model, train_set) if cfg.model.init and resume_from is None else None
    if cfg.model.freeze_backbone:
        freeze_backbone(model)
    ema = ModelEma(model, cfg.train.ema_decay) if cfg.train.ema_decay > 0 else None
    optimizer = build_optimizer(model, cfg)
    samples_per_epoch = cfg.data.samples_per_epoch or train_set.num_samples
    per_rank_batches = train_batches_per_rank(samples_per_epoch, cfg.data.batch_size, world, cfg.data.num_workers,
                                              accum)
    steps_per_epoch = per_rank_batches // accum
    total_steps = cfg.schedule.epochs * steps_per_epoch
    warmup_steps = min(cfg.schedule.warmup_steps, total_steps) or round(cfg.schedule.warmup_epochs * steps_per_epoch)
    scheduler = build_scheduler(optimizer, cfg, total_steps, warmup_steps)
    model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)
    pad_value = norm.apply(torch.tensor(10.0 * math.log10(train_set.features.amin))).item()
    state = TrainState(cfg, accelerator, train_set, eval_set, norm, model, optimizer, scheduler, ema, accum,
                       per_rank_batches, total_steps, warmup_steps, pad_value)
    state.init, state.task = init, task
    if signals is not None:
        state.signals = signals
    if ema is not None:
        ema.to(accelerator.device)
        accelerator.register_for_checkpointing(ema)
    state.progress.processes = world
    accelerator.register_for_checkpointing(state.progress)
    log_plan(state)
    resume_training(state, resume_from)
    state.bar = tqdm(total=total_steps, initial=state.progress.step, dynamic_ncols=True, desc="train",
                     disable=not (accelerator.is_main_process and cfg.train.progress_bar))
    train_mode(state)
    return state


def load_init_weights(accelerator: Accelerator, cfg: Config, model: nn.Module, train_set: ShardSet) -> InitReport:
    """Load ``cfg.model.init`` into ``model`` (every rank; a published name is fetched by the main
    process first), log what was loaded and re-initialised and write it to ``init.json``."""
    path = resolve_init(cfg.model.init, accelerator)
    report = init_from_checkpoint(model, cfg.model.init, path, [lab["name"] for lab in train_set.labels])
    if accelerator.is_main_process:
        write_report(Path(cfg.train.output_dir) / "init.json", report)
    log.info(report.summary() + f"; every tensor by name: {Path(cfg.train.output_dir) / 'init.json'}")
    return report


def resolve_init(name_or_path: str, accelerator: Accelerator) -> Path:
    """The file or directory ``model.init`` names; a published model name is fetched (once, by
    the main process, while the others wait) and read from the cache. CheckpointError on every
    rank when it cannot be had."""
    from ..hub.pretrained import PUBLISHED_MODELS, PretrainedError, resolve_checkpoint_on_main_first

    path = Path(name_or_path)
    if path.exists() or name_or_path not in PUBLISHED_MODELS:
        if not path.exists():
            raise CheckpointError(f"model.init={name_or_path}: no such file or directory, and not a published "
                                  f"model ({', '.join(PUBLISHED_MODELS)})")
        return path
    try:
        return resolve_checkpoint_on_main_first(name_or_path, accelerator)
    except PretrainedError as err:
        raise CheckpointError(f"model.init={name_or_path}: {err}") from None


def train_mode(state: TrainState) -> None:
    """The model in training mode; with model.freeze_backbone, only its classifier."""
    state.model.train()
    set_train_mode(state.accelerator.unwrap_model(state.model), state.cfg.model.freeze_backbone)


def open_data(cfg: Config) -> tuple[ShardSet, ShardSet | None, Normalization]:
    """(train shards, eval shards or None, normalisation); DataError when they are missing, damaged
    (data.verify_shards) or do not fit together."""
    verify = cfg.data.verify_shards
    if verify == "sha256" and int(os.environ.get("LOCAL_RANK", "0")) != 0:
        verify = "size"  # one hashing process per machine; its DataError stops the whole launch
    train_set = open_shard_set(cfg.data.train, "data.train", verify)
    eval_set = open_shard_set(cfg.data.eval, "data.eval", verify) if cfg.data.eval else None
    if eval_set is not None and eval_set.num_classes != train_set.num_classes:
        raise DataError(f"data.eval has {eval_set.num_classes} classes, data.train {train_set.num_classes}")
    if eval_set is not None and eval_set.labels != train_set.labels:
        i, a, b = next((i, a, b) for i, (a, b) in enumerate(zip(eval_set.labels, train_set.labels)) if a != b)
        raise DataError(f"data.eval's class {i} is {a['name']!r}, data.train's {b['name']!r}: the eval shards need "
                        f"the train class list (build them with --classes {train_set.root})")
    if eval_set is not None and eval_set.features != train_set.features:
        raise DataError("data.train and data.eval were built with different feature configs")
    return train_set, eval_set, resolve_normalization(cfg.data, train_set)


def create_accelerator(cfg: Config) -> Accelerator:
    """The run's Accelerator; ConfigError when it does not see the processes that were launched."""
    launched = int(os.environ.get("WORLD_SIZE", "1"))
    # accelerate runs a multi-process launch without CUDA as N independent single-process runs
    # unless the CPU is forced: force it (gloo) when there is no GPU.
    force_cpu = launched > 1 and not torch.cuda.is_available()
    # step_scheduler_with_optimizer=False: our schedule is in optimizer steps; accelerate would
    # otherwise step it num_processes times per step.
    accelerator = Accelerator(mixed_precision=cfg.train.mixed_precision,
                              log_with=None if cfg.train.tracker == "none" else cfg.train.tracker, cpu=force_cpu,
                              project_dir=str(Path(cfg.train.output_dir)), step_scheduler_with_optimizer=False)
    if accelerator.num_processes != launched:
        raise ConfigError(f"launched as {launched} processes but accelerate sees {accelerator.num_processes}; on "
                          "CPUs set ACCELERATE_USE_CPU=1")
    return accelerator


def start_run_dir(accelerator: Accelerator, cfg: Config) -> None:
    """The output folder with the resolved ``config.yaml``; trackers (TensorBoard) log under it."""
    out_dir = Path(cfg.train.output_dir)
    if accelerator.is_main_process:
        out_dir.mkdir(parents=True, exist_ok=True)
        write_text(out_dir / "config.yaml", to_yaml(cfg))
    if cfg.train.tracker != "none":
        accelerator.init_trackers("tensorboard", config=_flat_hparams(cfg))


def log_plan(state: TrainState) -> None:
    """Two lines: what is trained on what, and how the batch and schedule come out."""
    cfg, t, e = state.cfg, state.train_set, state.eval_set
    n_params = sum(p.numel() for p in state.accelerator.unwrap_model(state.model).parameters())
    n_trained = sum(p.numel() for p in state.accelerator.unwrap_model(state.model).parameters() if p.requires_grad)
    trained = f" ({n_trained:,} trained: model.freeze_backbone)" if n_trained < n_params else ""
    log.info(f"model {cfg.model.name}: {n_params:,} parameters{trained}, {t.num_classes} classes, {state.task}; "
             f"train {t.num_samples} clips in {len(t.urls)} shards"
             + (f", eval {e.num_samples} clips" if e else ", no eval set"))
    log.info(f"{state.accelerator.num_processes} process(es) x batch {cfg.data.batch_size} x accumulation "
             f"{state.accum} = {cfg.optim.batch_size} clips/step; {state.per_rank_batches // state.accum} steps/epoch, "
             f"{state.total_steps} steps, warmup {state.warmup_steps}; normalisation mean {state.norm.mean} std "
             f"{state.norm.std}; mixed precision {cfg.train.mixed_precision}")


def _flat_hparams(cfg: Config) -> dict[str, Any]:
    return {k: v if isinstance(v, (int, float, str, bool)) else str(v) for k, v in _flat(config_to_dict(cfg)).items()}


def _model_kwargs(cfg: Config) -> dict[str, Any]:
    kw = {} if cfg.model.layer_scale_init_value is None else {"layer_scale_init_value": cfg.model.layer_scale_init_value}
    kw.update(cfg.model.kwargs)
    return kw


# --------------------------------------------------------------------------------- resume


def find_checkpoint(output_dir: str | Path) -> Path | None:
    """The latest complete checkpoint directory of a run (the one ``latest`` names; without a
    usable ``latest``, the highest ``step_*``: only complete ones are ever renamed to that), or None."""
    ckpt_dir = Path(output_dir) / CHECKPOINTS
    latest = ckpt_dir / LATEST
    if latest.is_file():
        path = ckpt_dir / latest.read_text().strip()
        if path.is_dir():
            return path
    done = sorted(p for p in ckpt_dir.glob("step_*") if p.is_dir())
    return done[-1] if done else None


def find_resume_checkpoint(cfg: Config) -> Path | None:
    """The checkpoint ``train.resume`` asks for ("auto": the run's latest, if any; a run or
    checkpoint directory), or None for a fresh start. CheckpointError when there is none where
    one was named, or when a fresh start would overwrite a run's checkpoints."""
    r = cfg.train.resume
    if r == "auto":
        return find_checkpoint(cfg.train.output_dir)
    if r:
        p = Path(r)
        if (p / CHECKPOINTS / LATEST).is_file():  # a run directory
            p = find_checkpoint(p)
        if p is None or not p.is_dir():
            raise CheckpointError(f"train.resume={r}: no checkpoint there")
        return p
    if find_checkpoint(cfg.train.output_dir) is not None:
        raise CheckpointError(
            f"{cfg.train.output_dir} already holds checkpoints: pass --resume (train.resume=auto) to continue "
            "it, or choose another train.output_dir"
        )
    return None


def resume_training(state: TrainState, path: Path | None) -> None:
    """Load the checkpoint at ``path`` (model, optimizer, scheduler, EMA, RNG states, progress)
    on every rank; nothing when no rank has one."""
    if state.accelerator.num_processes > 1:
        # Every rank must load the same checkpoint: on a shared file system another writer (a
        # straggler of the killed job, a slow metadata cache) can move `latest` between two
        # ranks' reads, and ranks resumed at different steps deadlock or mismatch collectives.
        chosen = broadcast_object_list([str(path) if path is not None else None], from_process=0)[0]
        path = Path(chosen) if chosen is not None else None
    if path is None:
        return
    try:
        state.accelerator.load_state(str(path))
    except (OSError, EOFError, RuntimeError, KeyError, ValueError, pickle.UnpicklingError) as err:
        reason = " ".join(str(err).split())[:300] or type(err).__name__  # one line, whatever torch says
        raise CheckpointError(f"{path}: cannot resume from this checkpoint: {reason}") from err
    p = state.progress
    log.info(f"resumed from {path}: epoch {p.epoch}, step {p.step}, {p.batches_in_epoch} batches into the epoch")
    changed = changed_settings(path / "config.yaml", state.cfg)
    if p.processes != state.accelerator.num_processes:
        changed.append(f"processes {p.processes} -> {state.accelerator.num_processes}")
        p.processes = state.accelerator.num_processes
    if changed:
        log.warning(f"resuming with settings that differ from the checkpoint's: {'; '.join(changed)}; the run does not "
                    "continue exactly as it would have")


# Settings a resumed run may change without changing what it computes: where it writes, how it
# reports, when it stops or checkpoints, and how the evaluation is batched.
_RESUME_FREE = ("train.resume", "train.output_dir", "train.max_steps", "train.log_every_steps", "train.tracker",
                "train.progress_bar", "train.checkpoint_every_steps", "train.keep_checkpoints",
                "train.checkpoint_on_signal", "data.verify_shards", "eval.batch_size", "eval.num_workers")


def changed_settings(saved_yaml: Path, cfg: Config) -> list[str]:
    """``key old -> new`` for every setting of ``cfg`` that differs from the config saved with a
    checkpoint, except those in ``_RESUME_FREE``. Nothing when the checkpoint has no config."""
    if not saved_yaml.is_file():
        return []
    saved = _flat(yaml.safe_load(saved_yaml.read_text()) or {})
    now = _flat(config_to_dict(cfg))
    return [f"{k} {saved.get(k)!r} -> {v!r}" for k, v in now.items() if k not in _RESUME_FREE and saved.get(k) != v]


def _flat(d: dict[str, Any]) -> dict[str, Any]:
    return {f"{section}.{k}": v for section, values in d.items() for k, v in (values or {}).items()}


# ---------------------------------------------------------------------------------- epoch


def train_one_epoch(state: TrainState) -> bool:
    """Train on what is left of the current epoch. True when the epoch is complete, False when
    training stopped inside it (train.max_steps)."""
    cfg, p = state.cfg, state.progress
    train_mode(state)  # evaluation put the model in eval mode and back
    loader, _ = build_train_loader(state.train_set, cfg.data, state.norm, epoch=p.epoch, seed=cfg.train.seed,
                                   rank=state.accelerator.process_index, world_size=state.accelerator.num_processes,
                                   accum=state.accum, skip_batches=p.batches_in_epoch)
    for batch in loader:
        state.corrupt[batch["worker"]] = batch["corrupt"]
        if not train_micro_step(state, batch):
            continue  # gradients accumulate until the optimizer step's last micro-batch
        optimizer_step(state)
        log_step(state)
        if end_step(state):
            break
    if state.stopped_by:
        return False
    if p.batches_in_epoch < state.per_rank_batches:
        if p.step < state.stop_at:
            raise DataError(f"epoch {p.epoch}: the train loader ended after {p.batches_in_epoch} of "
                            f"{state.per_rank_batches} batches (every shard unreadable?)")
        return False
    return True


def train_micro_step(state: TrainState, batch: dict) -> bool:
    """Augment, forward, loss and backward of one micro-batch (x (B, 1, n_mels, T), y (B, C)).
    True when it is the last micro-batch of an optimizer step."""
    cfg, p, acc = state.cfg, state.progress, state.accelerator
    micro = p.epoch * state.per_rank_batches + p.batches_in_epoch  # this rank's micro-step index
    last_micro = (p.batches_in_epoch + 1) % state.accum == 0
    x, y = move_batch(batch, acc.device)
    torch.manual_seed(derive_seed(cfg.train.seed, acc.process_index, micro, 0))  # drop path
    gen = torch.Generator(device=acc.device).manual_seed(derive_seed(cfg.train.seed, acc.process_index, micro, 1))
    x, y = augment_batch(x, y, cfg.augment, gen, pad_value=state.pad_value)
    # Only the last micro-step of an optimizer step all-reduces gradients.
    with acc.no_sync(state.model) if not last_micro else contextlib.nullcontext():
        loss = compute_loss(state.model(x), y, state.task)
        acc.backward(loss / state.accum)
    state.meter.add(loss)
    p.batches_in_epoch += 1
    return last_micro


def optimizer_step(state: TrainState) -> None:
    """Apply the accumulated gradients (clipped if asked), advance the schedule and the EMA."""
    cfg, acc = state.cfg, state.accelerator
    if cfg.optim.clip_grad_norm > 0:
        acc.clip_grad_norm_(state.model.parameters(), cfg.optim.clip_grad_norm)
    state.optimizer.step()
    state.scheduler.step()
    state.optimizer.zero_grad(set_to_none=True)
    if state.ema is not None:
        state.ema.update(acc.unwrap_model(state.model))
    state.progress.step += 1
    state.progress.samples_seen += cfg.optim.batch_size
    state.meter.samples += cfg.optim.batch_size
    state.bar.update(1)


def log_step(state: TrainState) -> None:
    """On the first and last step and every train.log_every_steps: mean loss over all ranks, lr
    and samples/s to the progress bar (or the log) and the tracker."""
    cfg, p = state.cfg, state.progress
    if not (p.step % cfg.train.log_every_steps == 0 or p.step == 1 or p.step == state.stop_at):
        return
    loss, sps = state.meter.read(state.accelerator)
    lr = state.scheduler.get_last_lr()[0]
    state.bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}", sps=f"{sps:.0f}")
    state.accelerator.log({"train/loss": loss, "train/lr": lr, "train/samples_per_s": sps,
                           "train/epoch": p.epoch + p.batches_in_epoch / state.per_rank_batches}, step=p.step)
    if not cfg.train.progress_bar:
        log.info(f"epoch {p.epoch} step {p.step}/{state.total_steps} loss {loss:.4f} lr {lr:.3e} {sps:.1f} samples/s")


def end_step(state: TrainState) -> bool:
    """The optimizer-step boundary, where every rank stands at the same step: save a checkpoint
    when one is due or a stop signal came. True when training stops here."""
    cfg, p = state.cfg, state.progress
    stop = poll_stop(state)
    # The epoch's last step is saved after its evaluation (end_epoch), not here as well, unless
    # a signal stops the run first: the resumed run then evaluates the epoch.
    epoch_done = p.batches_in_epoch == state.per_rank_batches
    if stop or (not epoch_done and (p.step % cfg.train.checkpoint_every_steps == 0 or p.step == state.stop_at)):
        save_checkpoint(state)
    return stop or p.step >= state.stop_at


def poll_stop(state: TrainState) -> bool:
    """True on every rank once any rank has received a stop signal (one all-reduce per call when
    train.checkpoint_on_signal is set; every rank must call it at the same point)."""
    if state.stopped_by:
        return True
    if not state.signals.signals:
        return False
    agreed = agree_to_stop(state.signals.received, state.accelerator)
    if agreed:
        p = state.progress
        state.stopped_by = signal.Signals(agreed).name
        log.warning(f"{state.stopped_by} received: stopping after step {p.step} (epoch {p.epoch}, batch "
                    f"{p.batches_in_epoch} of {state.per_rank_batches}) with a checkpoint")
    return bool(agreed)


def end_epoch(state: TrainState) -> None:
    """Evaluate when due, then count the epoch done and save it. (A checkpoint taken on the
    epoch's last step, before this point, makes a resumed run evaluate the epoch.)"""
    cfg, p = state.cfg, state.progress
    last_epoch = p.epoch + 1 == cfg.schedule.epochs
    if state.eval_set is not None and ((p.epoch + 1) % cfg.eval.every_epochs == 0 or last_epoch):
        evaluate_epoch(state)
    p.epoch += 1
    p.batches_in_epoch = 0
    save_checkpoint(state)


def evaluate_epoch(state: TrainState) -> None:
    """Evaluate the eval weights on every eval clip (all ranks); the main process writes
    ``eval/per_class_ap_epochNNN.csv``, appends to ``eval/results.jsonl``, logs and tracks."""
    cfg, acc, p = state.cfg, state.accelerator, state.progress
    result = evaluate(state.eval_model, state.eval_set, state.norm, batch_size=cfg.eval.batch_size,
                      num_workers=cfg.eval.num_workers, accelerator=acc, task=state.task)
    eval_dir = state.out_dir / "eval"
    csv_path = eval_dir / f"per_class_ap_epoch{p.epoch:03d}.csv"

    def write_results() -> None:
        write_per_class_csv(csv_path, result, state.eval_set.labels)
        append_jsonl(eval_dir / "results.jsonl", {"epoch": p.epoch, "step": p.step, **summarize(result)}, replace="step")

    write_everywhere(state, write_results if acc.is_main_process else None, f"eval results in {eval_dir}")
    if not acc.is_main_process:
        return
    state.final_eval = summarize(result)
    state.final_thresholds = thresholds_record(result)
    acc.log({f"eval/{k}": result[k] for k in ("mAP", "mAUC", "d_prime", "accuracy", "top5") if k in result},
            step=p.step)
    log.info(f"eval epoch {p.epoch}: {format_result(result)}; per-class AP: {csv_path}")


# ------------------------------------------------------------------------------ checkpoints


def save_checkpoint(state: TrainState) -> Path:
    """accelerate state -> ``checkpoints/.tmp-step_N`` -> renamed to ``step_N``; then the
    ``latest`` pointer is replaced atomically and old checkpoints pruned. A job killed at any
    moment leaves the previous checkpoint intact; a write that fails on any rank (disk full)
    removes the partial one and raises OutputError on every rank. The directory must be on a
    file system every process can write to (shared across nodes). Every rank must call it."""
    acc, cfg = state.accelerator, state.cfg
    main = acc.is_main_process
    ckpt_dir = state.out_dir / CHECKPOINTS
    name = f"step_{state.progress.step:08d}"
    final, tmp, aside = ckpt_dir / name, ckpt_dir / f".tmp-{name}", ckpt_dir / f".old-{name}"
    previous = find_checkpoint(state.out_dir)

    def start() -> None:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        write_text(tmp / "config.yaml", to_yaml(cfg))

    def publish() -> None:
        if final.exists():  # the same step saved again (a resumed run ending its epoch): swap, never delete first
            shutil.rmtree(aside, ignore_errors=True)
            os.replace(final, aside)
        os.replace(tmp, final)
        write_text(ckpt_dir / LATEST, name + "\n")

    def clean_up() -> None:  # after a failure: free the space; `latest` keeps naming the previous checkpoint
        shutil.rmtree(tmp, ignore_errors=True)
        latest = ckpt_dir / LATEST
        if not (latest.is_file() and latest.read_text().strip() == name):
            shutil.rmtree(final, ignore_errors=True)
            if aside.is_dir():
                os.replace(aside, final)

    what = f"checkpoint {final}"
    resume = f"--resume continues from {previous}" if previous else "no earlier checkpoint to resume from"
    write_everywhere(state, start if main else None, what, clean_up if main else None, resume)
    # Shared DCLS positions appear under several keys: safetensors refuses that, so pickle.
    write_everywhere(state, lambda: acc.save_state(str(tmp), safe_serialization=False), what,
                     clean_up if main else None, resume)
    write_everywhere(state, publish if main else None, what, clean_up if main else None, resume)
    if main:
        shutil.rmtree(aside, ignore_errors=True)
        done = sorted(p for p in ckpt_dir.glob("step_*") if p.is_dir())
        for old in done[: max(0, len(done) - cfg.train.keep_checkpoints)]:
            shutil.rmtree(old, ignore_errors=True)
    acc.wait_for_everyone()
    return final


def write_everywhere(state: TrainState, write: Any, what: str, clean_up: Any = None, resume: str = "") -> None:
    """Run ``write()`` on this rank (None: nothing to write here) and agree with every rank on
    the outcome (one gather: it also stands for a barrier). When it failed on any rank, the
    main process runs ``clean_up()`` and every rank raises the same one-line OutputError, so no
    rank is left waiting at the next collective for one that died."""
    failure = None
    if write is not None:
        try:
            write()
        except Exception as err:  # noqa: BLE001: anything a rank cannot write must stop all of them
            failure = describe_write_error(err, state.out_dir)
    if state.accelerator.num_processes > 1:
        failure = next((f for f in gather_object([failure]) if f), None)
    if failure is None:
        return
    if clean_up is not None:
        clean_up()
    if not resume:
        latest = find_checkpoint(state.out_dir)
        resume = f"--resume continues from {latest}" if latest else "no checkpoint to resume from yet"
    raise OutputError(f"cannot write {what}: {failure}; {resume}")


def describe_write_error(err: BaseException, where: Path) -> str:
    """One line: the error (torch.save reports a full disk as an opaque RuntimeError) and the
    space left on the file system of ``where``."""
    reason = " ".join(str(err).split())[:300] or type(err).__name__
    if not isinstance(err, OSError):
        reason = f"{type(err).__name__}: {reason}"
    probe = Path(where)
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    try:
        free = shutil.disk_usage(probe).free
    except OSError:
        return reason
    return f"{reason} ({free / 1e6:.1f} MB free there)"


def export_model(state: TrainState) -> Path:
    """``model.safetensors``: the eval weights with what tagging needs (model, features,
    normalisation, labels; checkpoint.CheckpointInfo), the per-class thresholds calibrated by the
    last evaluation (``--threshold auto``), the config and the last eval summary."""
    cfg, t, p = state.cfg, state.train_set, state.progress
    info = CheckpointInfo(
        model_name=cfg.model.name, num_classes=t.num_classes, features=t.features, normalization=state.norm,
        labels=[dict(lab) for lab in t.labels],
        model_kwargs={k: v for k, v in _model_kwargs(cfg).items() if k != "pretrained_path"}, task=state.task,
        extra={"config": config_to_dict(cfg), "eval": state.final_eval,
               "train": {"steps": p.step, "epochs": p.epoch, "samples_seen": p.samples_seen,
                         "train_clips": t.num_samples, "processes": state.accelerator.num_processes,
                         "ema": state.ema is not None},
               "init": None if state.init is None else {
                   "source": state.init.source, "path": state.init.path, "loaded": len(state.init.loaded),
                   "reinitialised": state.init.reinitialised}},
        thresholds=state.final_thresholds,
    )
    path = save_inference_checkpoint(state.out_dir / "model.safetensors", state.eval_model.state_dict(), info)
    log.info(f"inference checkpoint: {path}")
    return path


# ---------------------------------------------------------------------------------- finish


def finish_training(state: TrainState) -> dict[str, Any]:
    """Report skipped samples, export the inference checkpoint (finished runs), write
    ``summary.json`` and close the trackers. Returns the summary (see :func:`train`)."""
    acc, p = state.accelerator, state.progress
    state.bar.close()
    corrupt = acc.reduce(torch.tensor(float(sum(state.corrupt.values())), device=acc.device), reduction="sum").item()
    if corrupt:
        log.warning(f"skipped {int(corrupt)} corrupt training samples in the last epoch")
    finished = p.epoch >= state.cfg.schedule.epochs
    main = acc.is_main_process
    checkpoint = state.out_dir / "model.safetensors" if finished and main else None
    write_everywhere(state, (lambda: export_model(state)) if checkpoint else None,
                     f"the inference checkpoint {state.out_dir / 'model.safetensors'}")
    # Every rank's parameter checksum: equal values prove the replicas stayed in sync.
    checksum = float(sum(w.detach().double().sum().item() for w in acc.unwrap_model(state.model).parameters()))
    summary = {"step": p.step, "epoch": p.epoch, "samples_seen": p.samples_seen, "loss_first": state.meter.first,
               "loss_last": state.meter.last, "eval": state.final_eval,
               "checkpoint": str(checkpoint) if checkpoint else None, "finished": finished,
               "stopped_by": "" if finished else state.stopped_by, "processes": acc.num_processes, "task": state.task,
               "param_checksums": gather_object([checksum])}
    summary_path = state.out_dir / "summary.json"
    write_everywhere(state, (lambda: write_text(summary_path, json.dumps(summary, indent=1) + "\n")) if main else None,
                     str(summary_path))
    if summary["stopped_by"]:
        log.warning(f"stopped by {state.stopped_by} at step {p.step}: checkpoint {find_checkpoint(state.out_dir)}; "
                    "continue with --resume")
    acc.end_training()
    # The DDP wrapper holds the process group: free it now, while the interpreter is whole. Left to
    # interpreter teardown, gloo's threads can abort the rank ("terminate called without an active
    # exception": seen once in CI, on rank 1 of a 2-process run that had finished its work).
    acc.free_memory()
    state.model = state.optimizer = state.scheduler = None
    return summary
