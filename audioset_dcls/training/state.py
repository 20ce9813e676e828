"""What a training run holds while it runs: :class:`TrainState` (model, optimizer, data,
counters, the run folder), the progress counters that go into every checkpoint, and the
per-step loss meter."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from torch import nn

from ..config import Config
from ..data import (
    ShardSet,
)
from ..features import Normalization
from ..preemption import StopSignals
from .finetune import InitReport
from .recipe import ModelEma

__all__ = ["OutputError", "TrainProgress", "StepMeter", "TrainState"]

class OutputError(RuntimeError):
    """The run directory could not be written (disk full, quota, permissions). Raised on every
    rank; the message names the file and the checkpoint a ``--resume`` continues from."""


@dataclass
class TrainProgress:
    """Where training stands; saved with every checkpoint (accelerate custom object)."""

    epoch: int = 0  # current epoch (0-based)
    step: int = 0  # optimizer steps done
    batches_in_epoch: int = 0  # micro-batches of ``epoch`` this rank has trained on
    samples_seen: int = 0  # clips over all processes
    processes: int = 0  # the run's process count (checked on resume: it shapes the data stream)
    teacher_missing: int = 0  # clips trained on (all processes) that had no teacher scores (distill.teacher)

    def state_dict(self) -> dict[str, int]:
        return dict(self.__dict__)

    def load_state_dict(self, d: dict[str, int]) -> None:
        self.__dict__.update({k: int(v) for k, v in d.items()})


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
    teacher: Any = None  # the distill.teacher table (audioset_dcls.teacher.TeacherTable), None without one
    teacher_eval: dict[str, Any] | None = None  # the teacher's own eval metrics (main process)
    teacher_missing_local: int = 0  # this rank's clips without teacher scores since the last count

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
