"""The training engine: config -> Accelerator -> data -> model -> optimizer -> loop -> checkpoints.

:func:`train` reads top to bottom; each phase is one function of a :class:`.state.TrainState`
(the recipe's pieces are in :mod:`.recipe`, checkpoints and resume in :mod:`.checkpointing`)::

    setup_training      open_data -> find_resume_checkpoint -> create_accelerator -> the
                        distill.teacher table (.distill) -> seed -> build_model -> EMA ->
                        build_optimizer -> build_scheduler -> one prepare -> resume_training (load_state)
    train_one_epoch     per micro-batch train_micro_step (augment, forward, compute_loss or, with
                        a teacher, distill.distillation_loss, backward); per optimizer step optimizer_step -> log_step -> end_step
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
import json
import math
import os
import signal
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.logging import get_logger
from accelerate.utils import gather_object, set_seed
from torch import nn
from tqdm.auto import tqdm

from ..augment import augment_batch
from ..config import Config, ConfigError, config_to_dict, to_yaml
from ..data import (
    DataError,
    ShardSet,
    build_train_loader,
    derive_seed,
    move_batch,
    open_shard_set,
    resolve_normalization,
    train_batches_per_rank,
)
from ..features import Normalization
from ..files import write_text
from ..hub.checkpoint import CheckpointError
from ..hub.pretrained import PretrainedError
from ..hub.references import (
    RUN_CONFIG,
    RUN_MODEL,
    RUN_SUMMARY,
    CheckpointRef,
    find_checkpoint,
    resolve_reference_on_main_first,
)
from ..preemption import StopSignals, agree_to_stop, parse_stop_signals
from ..shards.manifest import short_clips_warning
from . import distill as kd
from .checkpointing import (
    export_model,
    find_resume_checkpoint,
    flat_config,
    resume_training,
    save_checkpoint,
    write_everywhere,
)
from .evaluate import (
    append_jsonl,
    evaluate,
    format_result,
    summarize,
    thresholds_record,
    write_per_class_csv,
)
from .finetune import (
    InitReport,
    freeze_backbone,
    init_from_checkpoint,
    resolve_warmup,
    scale_for_small_set,
    set_train_mode,
    small_set_line,
    write_report,
)
from .recipe import (
    ModelEma,
    build_model,
    build_optimizer,
    build_scheduler,
    compute_loss,
    gradient_accumulation_steps,
    resolve_task,
)
from .state import TrainState

__all__ = ["train", "setup_training"]

log = get_logger("audioset_dcls.train")  # logs on the main process only unless told otherwise


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
    cfg, small_set = scale_for_small_set(cfg, train_set.num_samples)  # augment.full_strength_clips
    task = resolve_task(cfg.train.task, train_set)
    resume_from = find_resume_checkpoint(cfg)
    accelerator = create_accelerator(cfg)
    teacher = kd.open_teacher(cfg, accelerator, train_set)
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
    warmup_steps = resolve_warmup(cfg.schedule, total_steps, steps_per_epoch)
    scheduler = build_scheduler(optimizer, cfg, total_steps, warmup_steps)
    model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)
    pad_value = norm.apply(torch.tensor(10.0 * math.log10(train_set.features.amin))).item()
    state = TrainState(cfg, accelerator, train_set, eval_set, norm, model, optimizer, scheduler, ema, accum,
                       per_rank_batches, total_steps, warmup_steps, pad_value)
    state.init, state.task, state.teacher = init, task, teacher
    state.teacher_eval = kd.log_teacher_eval(teacher, eval_set, task, accelerator)
    if signals is not None:
        state.signals = signals
    if ema is not None:
        ema.to(accelerator.device)
        accelerator.register_for_checkpointing(ema)
    state.progress.processes = world
    accelerator.register_for_checkpointing(state.progress)
    log_plan(state)
    if small_set < 1:
        log.info(small_set_line(cfg, train_set.num_samples, small_set))
    resume_training(state, resume_from)
    state.bar = tqdm(total=total_steps, initial=state.progress.step, dynamic_ncols=True, desc="train",
                     disable=not (accelerator.is_main_process and cfg.train.progress_bar))
    train_mode(state)
    return state


def load_init_weights(accelerator: Accelerator, cfg: Config, model: nn.Module, train_set: ShardSet) -> InitReport:
    """Load ``cfg.model.init`` into ``model`` (every rank; a published name is fetched by the main
    process first), log what was loaded and re-initialised and write it to ``init.json``."""
    ref = resolve_init(cfg.model.init, accelerator)
    report = init_from_checkpoint(model, ref, [lab["name"] for lab in train_set.labels])
    if accelerator.is_main_process:
        write_report(Path(cfg.train.output_dir) / "init.json", report)
    log.info(report.summary() + f"; every tensor by name: {Path(cfg.train.output_dir) / 'init.json'}")
    return report


def resolve_init(name_or_path: str, accelerator: Accelerator) -> CheckpointRef:
    """The checkpoint ``model.init`` names (any reference: :mod:`..hub.references`); a published
    name is fetched once, by the main process, while the others wait. CheckpointError (one line,
    on every rank) when it cannot be had."""
    try:
        return resolve_reference_on_main_first(name_or_path, accelerator, need="weights")
    except (CheckpointError, PretrainedError) as err:
        raise CheckpointError(f"model.init={err}") from None  # the message starts with the reference


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
        write_text(out_dir / RUN_CONFIG, to_yaml(cfg))
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
    for line in short_clips_warning(t.manifest):
        log.warning(f"{t.root}: {line}")
    log.info(f"{state.accelerator.num_processes} process(es) x batch {cfg.data.batch_size} x accumulation "
             f"{state.accum} = {cfg.optim.batch_size} clips/step; {state.per_rank_batches // state.accum} steps/epoch, "
             f"{state.total_steps} steps, warmup {state.warmup_steps}; normalisation mean {state.norm.mean} std "
             f"{state.norm.std}; mixed precision {cfg.train.mixed_precision}")


def _flat_hparams(cfg: Config) -> dict[str, Any]:
    return {k: v if isinstance(v, (int, float, str, bool)) else str(v) for k, v in flat_config(config_to_dict(cfg)).items()}


# ---------------------------------------------------------------------------------- epoch


def train_one_epoch(state: TrainState) -> bool:
    """Train on what is left of the current epoch. True when the epoch is complete, False when
    training stopped inside it (train.max_steps)."""
    cfg, p = state.cfg, state.progress
    train_mode(state)  # evaluation put the model in eval mode and back
    loader, _ = build_train_loader(state.train_set, cfg.data, state.norm, epoch=p.epoch, seed=cfg.train.seed,
                                   rank=state.accelerator.process_index, world_size=state.accelerator.num_processes,
                                   accum=state.accum, skip_batches=p.batches_in_epoch, teacher=state.teacher)
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
    if state.teacher is None:
        x, y = augment_batch(x, y, cfg.augment, gen, pad_value=state.pad_value)
    else:
        x, y, t, h = kd.augment_with_teacher(batch, x, y, cfg, gen, state.pad_value, state.task)
        state.teacher_missing_local += int((~batch["has_teacher"]).sum())
    # Only the last micro-step of an optimizer step all-reduces gradients.
    with acc.no_sync(state.model) if not last_micro else contextlib.nullcontext():
        logits = state.model(x)
        loss = compute_loss(logits, y, state.task) if state.teacher is None else kd.distillation_loss(
            logits, y, t, h, cfg.distill.weight, cfg.distill.temperature, state.task)
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
    kd.count_teacher_missing(state)
    state.bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}", sps=f"{sps:.0f}")
    state.accelerator.log({"train/loss": loss, "train/lr": lr, "train/samples_per_s": sps,
                           "train/epoch": p.epoch + p.batches_in_epoch / state.per_rank_batches}
                          | ({"train/teacher_missing": p.teacher_missing} if state.teacher is not None else {}),
                          step=p.step)
    if not cfg.train.progress_bar:
        missing = f"; {p.teacher_missing} clips without teacher scores" if state.teacher is not None else ""
        log.info(f"epoch {p.epoch} step {p.step}/{state.total_steps} loss {loss:.4f} lr {lr:.3e} {sps:.1f} samples/s"
                 + missing)


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


# ---------------------------------------------------------------------------------- finish


def finish_training(state: TrainState) -> dict[str, Any]:
    """Report skipped samples, export the inference checkpoint (finished runs), write
    ``summary.json`` and close the trackers. Returns the summary (see :func:`train`)."""
    acc, p = state.accelerator, state.progress
    state.bar.close()
    kd.count_teacher_missing(state)
    corrupt = acc.reduce(torch.tensor(float(sum(state.corrupt.values())), device=acc.device), reduction="sum").item()
    if corrupt:
        log.warning(f"skipped {int(corrupt)} corrupt training samples in the last epoch")
    finished = p.epoch >= state.cfg.schedule.epochs
    main = acc.is_main_process
    checkpoint = state.out_dir / RUN_MODEL if finished and main else None
    write_everywhere(state, (lambda: export_model(state)) if checkpoint else None,
                     f"the inference checkpoint {state.out_dir / RUN_MODEL}")
    # Every rank's parameter checksum: equal values prove the replicas stayed in sync.
    checksum = float(sum(w.detach().double().sum().item() for w in acc.unwrap_model(state.model).parameters()))
    summary = {"step": p.step, "epoch": p.epoch, "samples_seen": p.samples_seen, "loss_first": state.meter.first,
               "loss_last": state.meter.last, "eval": state.final_eval,
               "checkpoint": str(checkpoint) if checkpoint else None, "finished": finished,
               "stopped_by": "" if finished else state.stopped_by, "processes": acc.num_processes, "task": state.task,
               "param_checksums": gather_object([checksum]), "teacher": kd.teacher_summary(state)}
    summary_path = state.out_dir / RUN_SUMMARY
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
