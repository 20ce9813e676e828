"""Checkpoints of a run: resume (which checkpoint, load it on every rank, which settings
changed), save (temp folder -> rename -> ``latest``, on every rank's agreement), the final
inference checkpoint, and writes that fail the same way on every rank (a full disk).

The folder layout and its file names are :mod:`audioset_dcls.hub.references`'."""

from __future__ import annotations

import os
import pickle
import shutil
from pathlib import Path
from typing import Any

import yaml
from accelerate.logging import get_logger
from accelerate.utils import broadcast_object_list, gather_object

from ..config import Config, config_to_dict, to_yaml
from ..files import write_text
from ..hub.checkpoint import CheckpointError, CheckpointInfo, save_inference_checkpoint
from ..hub.references import (
    CHECKPOINTS,
    LATEST,
    RUN_CONFIG,
    RUN_MODEL,
    find_checkpoint,
    resolve_reference,
    step_name,
)
from .distill import count_teacher_missing
from .recipe import model_kwargs
from .state import OutputError, TrainState

__all__ = ["flat_config", "find_resume_checkpoint", "resume_training", "changed_settings", "save_checkpoint", "write_everywhere", "describe_write_error", "export_model"]

log = get_logger("audioset_dcls.train")  # logs on the main process only unless told otherwise


# --------------------------------------------------------------------------------- resume


def find_resume_checkpoint(cfg: Config) -> Path | None:
    """The checkpoint ``train.resume`` asks for ("auto": the run's latest, if any; a run or
    checkpoint directory), or None for a fresh start. CheckpointError when there is none where
    one was named, or when a fresh start would overwrite a run's checkpoints."""
    r = cfg.train.resume
    if r == "auto":
        return find_checkpoint(cfg.train.output_dir)
    if r:
        try:
            return resolve_reference(r, need="training").path
        except CheckpointError as err:
            raise CheckpointError(f"train.resume={err}") from None  # the message starts with the reference
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
    changed = changed_settings(path / RUN_CONFIG, state.cfg)
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
                "train.checkpoint_on_signal", "data.verify_shards", "eval.batch_size", "eval.num_workers",
                "distill.table_dir")


def changed_settings(saved_yaml: Path, cfg: Config) -> list[str]:
    """``key old -> new`` for every setting of ``cfg`` that differs from the config saved with a
    checkpoint, except those in ``_RESUME_FREE``. Nothing when the checkpoint has no config."""
    if not saved_yaml.is_file():
        return []
    saved = flat_config(yaml.safe_load(saved_yaml.read_text()) or {})
    now = flat_config(config_to_dict(cfg))
    return [f"{k} {saved.get(k)!r} -> {v!r}" for k, v in now.items() if k not in _RESUME_FREE and saved.get(k) != v]


def flat_config(d: dict[str, Any]) -> dict[str, Any]:
    """``{section: {key: value}}`` -> ``{"section.key": value}``."""
    return {f"{section}.{k}": v for section, values in d.items() for k, v in (values or {}).items()}


# ------------------------------------------------------------------------------ checkpoints


def save_checkpoint(state: TrainState) -> Path:
    """accelerate state -> ``checkpoints/.tmp-step_N`` -> renamed to ``step_N``; then the
    ``latest`` pointer is replaced atomically and old checkpoints pruned. A job killed at any
    moment leaves the previous checkpoint intact; a write that fails on any rank (disk full)
    removes the partial one and raises OutputError on every rank. The directory must be on a
    file system every process can write to (shared across nodes). Every rank must call it."""
    acc, cfg = state.accelerator, state.cfg
    count_teacher_missing(state)  # the saved progress holds every clip trained so far
    main = acc.is_main_process
    ckpt_dir = state.out_dir / CHECKPOINTS
    name = step_name(state.progress.step)
    final, tmp, aside = ckpt_dir / name, ckpt_dir / f".tmp-{name}", ckpt_dir / f".old-{name}"
    previous = find_checkpoint(state.out_dir)

    def start() -> None:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        write_text(tmp / RUN_CONFIG, to_yaml(cfg))

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
        model_kwargs={k: v for k, v in model_kwargs(cfg).items() if k != "pretrained_path"}, task=state.task,
        extra={"config": config_to_dict(cfg), "eval": state.final_eval,
               "train": {"steps": p.step, "epochs": p.epoch, "samples_seen": p.samples_seen,
                         "train_clips": t.num_samples, "processes": state.accelerator.num_processes,
                         "ema": state.ema is not None},
               "init": None if state.init is None else {
                   "source": state.init.source, "path": state.init.path, "loaded": len(state.init.loaded),
                   "reinitialised": state.init.reinitialised}},
        thresholds=state.final_thresholds,
    )
    path = save_inference_checkpoint(state.out_dir / RUN_MODEL, state.eval_model.state_dict(), info)
    log.info(f"inference checkpoint: {path}")
    return path
