"""The training engine: config -> Accelerator -> data -> model -> optimizer -> loop -> checkpoints.

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
import csv
import itertools
import json
import math
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from .augment import augment_batch
from .config import Config, ConfigError, config_to_dict, to_yaml
from .data import (
    DataError,
    train_batches_per_rank,
    ShardSet,
    build_eval_loader,
    build_train_loader,
    move_batch,
    open_shard_set,
    resolve_normalization,
)
from .metrics import tagging_metrics
from .shards import hash_ids

__all__ = [
    "lr_at",
    "gradient_accumulation_steps",
    "build_optimizer",
    "ModelEma",
    "TrainProgress",
    "evaluate",
    "find_checkpoint",
    "train",
]

CHECKPOINTS = "checkpoints"
LATEST = "latest"


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
    from .models import param_groups

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

    def state_dict(self) -> dict[str, int]:
        return dict(self.__dict__)

    def load_state_dict(self, d: dict[str, int]) -> None:
        self.__dict__.update({k: int(v) for k, v in d.items()})


# ------------------------------------------------------------------------------- evaluation


@torch.no_grad()
def evaluate(model: nn.Module, shards: ShardSet, cfg: Config, norm, accelerator) -> dict[str, Any] | None:
    """Score every eval clip exactly once over all ranks; metrics on the main process.

    ``model`` is the unwrapped module (no DDP: ranks may see different numbers of batches).
    Returns (main process; None elsewhere) ``{"mAP", "mAUC", "d_prime", "num_clips",
    "clip_ids_sha256", "num_classes_scored", "corrupt", "per_class_ap", "per_class_auc",
    "positives"}``.
    """
    from accelerate.utils import gather_object

    was_training = model.training
    model.eval()
    loader = build_eval_loader(shards, cfg.eval.batch_size, cfg.eval.num_workers, norm,
                               rank=accelerator.process_index, world_size=accelerator.num_processes)
    keys: list[str] = []
    scores, targets = [], []
    corrupt: dict[int, int] = {}
    for batch in loader:
        x, y = move_batch(batch, accelerator.device)
        with accelerator.autocast():
            logits = model(x)
        scores.append(torch.sigmoid(logits.float()).cpu().numpy())
        targets.append(y.cpu().numpy().astype(np.uint8))
        keys.extend(batch["keys"])
        corrupt[batch["worker"]] = batch["corrupt"]
    c = shards.num_classes
    local = (keys, np.concatenate(scores) if scores else np.zeros((0, c), np.float32),
             np.concatenate(targets) if targets else np.zeros((0, c), np.uint8), sum(corrupt.values()))
    parts = gather_object([local])  # one tuple per process, variable lengths: no padding
    model.train(was_training)
    if not accelerator.is_main_process:
        return None
    all_keys = [k for p in parts for k in p[0]]
    if len(set(all_keys)) != len(all_keys):
        raise RuntimeError(f"evaluation saw {len(all_keys) - len(set(all_keys))} clips twice: loader bug")
    result = tagging_metrics(np.concatenate([p[2] for p in parts]), np.concatenate([p[1] for p in parts]))
    result.update(num_clips=len(all_keys), clip_ids_sha256=hash_ids(all_keys),
                  corrupt=int(sum(p[3] for p in parts)), manifest_clips=shards.num_samples)
    return result


def _write_eval(result: dict[str, Any], labels: tuple[dict, ...], out_dir: Path, epoch: int, step: int) -> Path:
    """Per-class CSV (with label names) + one JSON line of the summary."""
    out_dir.mkdir(parents=True, exist_ok=True)
    csv_path = out_dir / f"per_class_ap_epoch{epoch:03d}.csv"
    with open(csv_path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["index", "mid", "name", "ap", "auc", "positives"])
        for i, lab in enumerate(labels):
            w.writerow([i, lab["mid"], lab["name"], f"{result['per_class_ap'][i]:.6f}",
                        f"{result['per_class_auc'][i]:.6f}", int(result["positives"][i])])
    with open(out_dir / "results.jsonl", "a") as f:
        f.write(json.dumps({"epoch": epoch, "step": step, **_summary(result)}) + "\n")
    return csv_path


def _summary(result: dict[str, Any]) -> dict[str, Any]:
    keys = ("mAP", "mAUC", "d_prime", "num_clips", "clip_ids_sha256", "num_classes_scored", "corrupt", "manifest_clips")
    return {k: result[k] for k in keys}


# ------------------------------------------------------------------------------ checkpoints


def find_checkpoint(output_dir: str | Path) -> Path | None:
    """The latest complete checkpoint directory of a run, or None."""
    ckpt_dir = Path(output_dir) / CHECKPOINTS
    latest = ckpt_dir / LATEST
    if latest.is_file():
        path = ckpt_dir / latest.read_text().strip()
        if path.is_dir():
            return path
    return None


def _save_training_state(accelerator, cfg: Config, progress: TrainProgress) -> Path:
    """accelerate state -> ``checkpoints/.tmp-step_N`` -> renamed to ``step_N``; then the
    ``latest`` pointer is replaced atomically and old checkpoints pruned. A job killed at any
    moment leaves the previous checkpoint intact. The directory must be on a file system every
    process can write to (shared across nodes)."""
    ckpt_dir = Path(cfg.train.output_dir) / CHECKPOINTS
    name = f"step_{progress.step:08d}"
    final, tmp = ckpt_dir / name, ckpt_dir / f".tmp-{name}"
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        (tmp / "config.yaml").write_text(to_yaml(cfg))
    accelerator.wait_for_everyone()
    # Shared DCLS positions appear under several keys: safetensors refuses that, so pickle.
    accelerator.save_state(str(tmp), safe_serialization=False)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        pointer = ckpt_dir / (LATEST + ".tmp")
        pointer.write_text(name + "\n")
        os.replace(pointer, ckpt_dir / LATEST)
        done = sorted(p for p in ckpt_dir.glob("step_*") if p.is_dir())
        for old in done[: max(0, len(done) - cfg.train.keep_checkpoints)]:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def _resume_path(cfg: Config) -> Path | None:
    r = cfg.train.resume
    if r == "auto":
        return find_checkpoint(cfg.train.output_dir)
    if r:
        p = Path(r)
        if (p / CHECKPOINTS / LATEST).is_file():  # a run directory
            p = find_checkpoint(p)
        if p is None or not p.is_dir():
            raise DataError(f"train.resume={r}: no checkpoint there")
        return p
    if find_checkpoint(cfg.train.output_dir) is not None:
        raise DataError(
            f"{cfg.train.output_dir} already holds checkpoints: pass --resume (train.resume=auto) to continue "
            "it, or choose another train.output_dir"
        )
    return None


# ------------------------------------------------------------------------------------- loop


def _flat_hparams(cfg: Config) -> dict[str, Any]:
    out = {}
    for section, d in config_to_dict(cfg).items():
        for k, v in d.items():
            out[f"{section}.{k}"] = v if isinstance(v, (int, float, str, bool)) else str(v)
    return out


def _model_kwargs(cfg: Config) -> dict[str, Any]:
    kw = {} if cfg.model.layer_scale_init_value is None else {"layer_scale_init_value": cfg.model.layer_scale_init_value}
    kw.update(cfg.model.kwargs)
    return kw


def train(cfg: Config) -> dict[str, Any]:
    """Run (or resume) training as ``cfg`` says. Returns the final summary (also written to
    ``<output_dir>/summary.json``): ``{"step", "epoch", "samples_seen", "loss_first", "loss_last",
    "eval": last eval summary or None, "checkpoint": inference checkpoint path (main process),
    "finished", "processes", "param_checksums": one float per rank}``."""
    from accelerate import Accelerator
    from accelerate.logging import get_logger
    from accelerate.utils import set_seed
    from tqdm.auto import tqdm

    from .checkpoint import CheckpointInfo, save_inference_checkpoint
    from .models import create_model

    log = get_logger("audioset_dcls.train")
    out_dir = Path(cfg.train.output_dir)
    tracker = None if cfg.train.tracker == "none" else cfg.train.tracker
    # Data first: a missing path should fail before any process group or model is built.
    train_set = open_shard_set(cfg.data.train, "data.train")
    eval_set = open_shard_set(cfg.data.eval, "data.eval") if cfg.data.eval else None
    if eval_set is not None and eval_set.num_classes != train_set.num_classes:
        raise DataError(f"data.eval has {eval_set.num_classes} classes, data.train {train_set.num_classes}")
    if eval_set is not None and eval_set.features != train_set.features:
        raise DataError("data.train and data.eval were built with different feature configs")
    norm = resolve_normalization(cfg.data, train_set)
    resume_from = _resume_path(cfg)
    launched = int(os.environ.get("WORLD_SIZE", "1"))
    # accelerate runs a multi-process launch without CUDA as N independent single-process runs
    # unless the CPU is forced: force it (gloo) when there is no GPU.
    force_cpu = launched > 1 and not torch.cuda.is_available()
    # step_scheduler_with_optimizer=False: our schedule is in optimizer steps; accelerate would
    # otherwise step it num_processes times per step.
    accelerator = Accelerator(mixed_precision=cfg.train.mixed_precision, log_with=tracker, cpu=force_cpu,
                              project_dir=str(out_dir), step_scheduler_with_optimizer=False)
    rank, world = accelerator.process_index, accelerator.num_processes
    if world != launched:
        raise ConfigError(f"launched as {launched} processes but accelerate sees {world}; on CPUs set "
                          "ACCELERATE_USE_CPU=1")

    accum = gradient_accumulation_steps(cfg.optim.batch_size, cfg.data.batch_size, world)

    if accelerator.is_main_process:
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "config.yaml").write_text(to_yaml(cfg))
    if tracker:
        accelerator.init_trackers("tensorboard", config=_flat_hparams(cfg))
    set_seed(cfg.train.seed)  # same initial weights on every rank

    model = create_model(cfg.model.name, num_classes=train_set.num_classes,
                         drop_path_rate=cfg.model.drop_path_rate, **_model_kwargs(cfg))
    ema = ModelEma(model, cfg.train.ema_decay) if cfg.train.ema_decay > 0 else None
    optimizer = build_optimizer(model, cfg)
    samples_per_epoch = cfg.data.samples_per_epoch or train_set.num_samples
    per_rank_batches = train_batches_per_rank(samples_per_epoch, cfg.data.batch_size, world, cfg.data.num_workers, accum)
    steps_per_epoch = per_rank_batches // accum
    total_steps = cfg.schedule.epochs * steps_per_epoch
    warmup_steps = round(cfg.schedule.warmup_epochs * steps_per_epoch)
    peak = cfg.optim.lr

    def lr_factor(step: int) -> float:  # LambdaLR scales every group's own lr (DCLS x5 kept)
        return lr_at(step, peak=peak, total_steps=total_steps, warmup_steps=warmup_steps,
                     warmup_lr=cfg.schedule.warmup_lr, min_lr=cfg.schedule.min_lr) / peak

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor)
    model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)
    if ema is not None:
        ema.to(accelerator.device)
        accelerator.register_for_checkpointing(ema)
    progress = TrainProgress()
    accelerator.register_for_checkpointing(progress)

    n_params = sum(p.numel() for p in accelerator.unwrap_model(model).parameters())
    log.info(f"model {cfg.model.name}: {n_params:,} parameters, {train_set.num_classes} classes; "
             f"train {train_set.num_samples} clips in {len(train_set.urls)} shards"
             + (f", eval {eval_set.num_samples} clips" if eval_set else ", no eval set"), main_process_only=True)
    log.info(f"{world} process(es) x batch {cfg.data.batch_size} x accumulation {accum} = {cfg.optim.batch_size} "
             f"clips/step; {steps_per_epoch} steps/epoch, {total_steps} steps, warmup {warmup_steps}; "
             f"normalisation mean {norm.mean} std {norm.std}; mixed precision {cfg.train.mixed_precision}",
             main_process_only=True)
    if world > 1:
        # Every rank must load the same checkpoint: on a shared file system another writer (a
        # straggler of the killed job, a slow metadata cache) can move `latest` between two
        # ranks' reads, and ranks resumed at different steps deadlock or mismatch collectives.
        from accelerate.utils import broadcast_object_list

        chosen = broadcast_object_list([str(resume_from) if resume_from is not None else None], from_process=0)[0]
        resume_from = Path(chosen) if chosen is not None else None
    if resume_from is not None:
        accelerator.load_state(str(resume_from))
        log.info(f"resumed from {resume_from}: epoch {progress.epoch}, step {progress.step}, "
                 f"{progress.batches_in_epoch} batches into the epoch", main_process_only=True)

    criterion = nn.BCEWithLogitsLoss()
    pad_value = norm.apply(torch.tensor(10.0 * math.log10(train_set.features.amin))).item()
    stop_at = cfg.train.max_steps or total_steps
    loss_first = loss_last = None
    final_eval = None
    loss_sum = torch.zeros((), device=accelerator.device)
    loss_count = 0
    corrupt: dict[int, int] = {}
    t_log, samples_log = time.perf_counter(), 0
    bar = tqdm(total=total_steps, initial=progress.step, disable=not (accelerator.is_main_process and cfg.train.progress_bar),
               dynamic_ncols=True, desc="train")
    model.train()

    while progress.epoch < cfg.schedule.epochs and progress.step < stop_at:
        epoch = progress.epoch
        loader, _ = build_train_loader(train_set, cfg.data, norm, epoch=epoch, seed=cfg.train.seed, rank=rank,
                                       world_size=world, accum=accum, skip_batches=progress.batches_in_epoch)
        for batch in loader:
            micro = epoch * per_rank_batches + progress.batches_in_epoch  # this rank's micro-step index
            last_micro = (progress.batches_in_epoch + 1) % accum == 0
            corrupt[batch["worker"]] = batch["corrupt"]
            x, y = move_batch(batch, accelerator.device)
            torch.manual_seed(_step_seed(cfg.train.seed, rank, micro, 0))  # drop path
            gen = torch.Generator(device=accelerator.device).manual_seed(_step_seed(cfg.train.seed, rank, micro, 1))
            x, y = augment_batch(x, y, cfg.augment, gen, pad_value=pad_value)
            # Only the last micro-step of an optimizer step all-reduces gradients.
            ctx = accelerator.no_sync(model) if not last_micro else contextlib.nullcontext()
            with ctx:
                logits = model(x)
                loss = criterion(logits.float(), y)
                accelerator.backward(loss / accum)
            loss_sum += loss.detach()
            loss_count += 1
            progress.batches_in_epoch += 1
            if not last_micro:
                continue
            if cfg.optim.clip_grad_norm > 0:
                accelerator.clip_grad_norm_(model.parameters(), cfg.optim.clip_grad_norm)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            if ema is not None:
                ema.update(accelerator.unwrap_model(model))
            progress.step += 1
            progress.samples_seen += cfg.optim.batch_size
            samples_log += cfg.optim.batch_size
            bar.update(1)
            if progress.step % cfg.train.log_every_steps == 0 or progress.step == 1 or progress.step == stop_at:
                mean_loss = accelerator.reduce(loss_sum / max(1, loss_count), reduction="mean").item()
                dt = time.perf_counter() - t_log
                sps = samples_log / dt if dt > 0 else float("nan")
                lr = scheduler.get_last_lr()[0]
                loss_first = mean_loss if loss_first is None else loss_first
                loss_last = mean_loss
                bar.set_postfix(loss=f"{mean_loss:.4f}", lr=f"{lr:.2e}", sps=f"{sps:.0f}")
                accelerator.log({"train/loss": mean_loss, "train/lr": lr, "train/samples_per_s": sps,
                                 "train/epoch": epoch + progress.batches_in_epoch / per_rank_batches},
                                step=progress.step)
                if not cfg.train.progress_bar:
                    log.info(f"epoch {epoch} step {progress.step}/{total_steps} loss {mean_loss:.4f} "
                             f"lr {lr:.3e} {sps:.1f} samples/s", main_process_only=True)
                loss_sum.zero_()
                loss_count, t_log, samples_log = 0, time.perf_counter(), 0
            # The epoch's last step is saved after its evaluation (below), not here as well.
            epoch_done = progress.batches_in_epoch == per_rank_batches
            if not epoch_done and (progress.step % cfg.train.checkpoint_every_steps == 0 or progress.step == stop_at):
                _save_training_state(accelerator, cfg, progress)
            if progress.step >= stop_at:
                break
        if progress.batches_in_epoch < per_rank_batches:
            if progress.step < stop_at:
                raise DataError(f"epoch {epoch}: the train loader ended after {progress.batches_in_epoch} of "
                                f"{per_rank_batches} batches (every shard unreadable?)")
            break  # stopped early (train.max_steps): no eval of a partial epoch
        # End of epoch: evaluate, then count the epoch done (a checkpoint taken on the epoch's
        # last step, before this point, makes a resumed run evaluate it).
        last_epoch = epoch + 1 == cfg.schedule.epochs
        if eval_set is not None and ((epoch + 1) % cfg.eval.every_epochs == 0 or last_epoch):
            eval_model = ema.module if (ema is not None and cfg.eval.use_ema) else accelerator.unwrap_model(model)
            result = evaluate(eval_model, eval_set, cfg, norm, accelerator)
            if accelerator.is_main_process:
                csv_path = _write_eval(result, eval_set.labels, out_dir / "eval", epoch, progress.step)
                final_eval = _summary(result)
                accelerator.log({"eval/mAP": result["mAP"], "eval/mAUC": result["mAUC"],
                                 "eval/d_prime": result["d_prime"]}, step=progress.step)
                log.info(f"eval epoch {epoch}: mAP {result['mAP']:.4f} AUC {result['mAUC']:.4f} "
                         f"d' {result['d_prime']:.3f} on {result['num_clips']} clips "
                         f"(ids sha256 {result['clip_ids_sha256'][:12]}, {result['corrupt']} corrupt skipped); "
                         f"per-class AP: {csv_path}", main_process_only=True)
        progress.epoch += 1
        progress.batches_in_epoch = 0
        _save_training_state(accelerator, cfg, progress)
    bar.close()

    total_corrupt = accelerator.reduce(torch.tensor(float(sum(corrupt.values())), device=accelerator.device),
                                       reduction="sum").item()
    if total_corrupt:
        log.warning(f"skipped {int(total_corrupt)} corrupt training samples in the last epoch", main_process_only=True)
    finished = progress.epoch >= cfg.schedule.epochs
    ckpt_path = None
    unwrapped = accelerator.unwrap_model(model)
    export = ema.module if (ema is not None and cfg.eval.use_ema) else unwrapped
    if finished and accelerator.is_main_process:
        info = CheckpointInfo(
            model_name=cfg.model.name, num_classes=train_set.num_classes, features=train_set.features,
            normalization=norm, labels=[dict(lab) for lab in train_set.labels],
            model_kwargs={k: v for k, v in _model_kwargs(cfg).items() if k != "pretrained_path"},
            extra={"config": config_to_dict(cfg), "eval": final_eval,
                   "train": {"steps": progress.step, "epochs": progress.epoch, "samples_seen": progress.samples_seen,
                             "train_clips": train_set.num_samples, "processes": world, "ema": ema is not None}},
        )
        ckpt_path = str(save_inference_checkpoint(out_dir / "model.safetensors", export.state_dict(), info))
        log.info(f"inference checkpoint: {ckpt_path}", main_process_only=True)
    # Every rank's parameter checksum: equal values prove the replicas stayed in sync.
    from accelerate.utils import gather_object

    checksum = float(sum(p.detach().double().sum().item() for p in unwrapped.parameters()))
    summary = {"step": progress.step, "epoch": progress.epoch, "samples_seen": progress.samples_seen,
               "loss_first": loss_first, "loss_last": loss_last, "eval": final_eval, "checkpoint": ckpt_path,
               "finished": finished, "processes": world, "param_checksums": gather_object([checksum])}
    if accelerator.is_main_process:
        (out_dir / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return summary


def _step_seed(seed: int, rank: int, micro: int, stream: int) -> int:
    return hash((seed, rank, micro, stream)) & 0x7FFFFFFFFFFFFFFF

