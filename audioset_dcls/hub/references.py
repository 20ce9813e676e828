"""Checkpoint references and the run-folder layout: the one place that knows both.

A *checkpoint reference* is what a user types after ``--checkpoint``, ``model.init=`` or
``train.resume=``, and :func:`resolve_reference` is the one function that reads it:

====================================  =========================================================
given                                 resolves to
====================================  =========================================================
a published name (``convnext_tiny_dcls``)  its cached inference checkpoint (fetched on first use)
a file (``model.safetensors``)        that inference checkpoint
a finished run folder                 ``<run>/model.safetensors`` (the exported eval weights)
an unfinished run folder              its latest training checkpoint, ``<run>/checkpoints/step_N``
a step folder (``checkpoints/step_N``)  that training checkpoint
====================================  =========================================================

Inference checkpoints describe themselves (model, features, labels: :mod:`.checkpoint`) and are
what tagging, evaluation and export read; training checkpoints (accelerate state) are what
``--resume`` and ``model.init`` read. Asking for an inference checkpoint where the reference
names a training one is a one-line error that says what to do.

A run folder (``train.output_dir``) holds, by the names defined here: ``config.yaml`` (the
resolved config), ``checkpoints/step_NNNNNNNN/`` (accelerate state + that step's config),
``checkpoints/latest`` (the name of the newest complete one), and, once finished,
``model.safetensors`` and ``summary.json``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .checkpoint import CheckpointError, load_model
from .pretrained import fetch_pretrained
from .published import PUBLISHED_MODELS

__all__ = [
    "RUN_CONFIG",
    "RUN_MODEL",
    "RUN_SUMMARY",
    "CHECKPOINTS",
    "LATEST",
    "TRAINING_WEIGHTS",
    "CheckpointRef",
    "step_name",
    "find_checkpoint",
    "resolve_reference",
    "resolve_reference_on_main_first",
    "load_reference",
]

RUN_CONFIG = "config.yaml"  # the resolved config, in a run folder and in each step folder
RUN_MODEL = "model.safetensors"  # a finished run's inference checkpoint
RUN_SUMMARY = "summary.json"  # written when a run ends (finished or stopped)
CHECKPOINTS = "checkpoints"
LATEST = "latest"
# What accelerate's save_state names the (first) model's weights in a training checkpoint.
TRAINING_WEIGHTS = ("model.safetensors", "pytorch_model.bin")
_ACCEPTED = "a published model name, a .safetensors checkpoint, a run folder or a checkpoints/step_N folder"


@dataclass(frozen=True)
class CheckpointRef:
    """A resolved reference. ``kind``: ``"inference"`` (a self-describing model file) or
    ``"training"`` (an accelerate step folder); ``given``: the reference as typed."""

    given: str
    kind: str
    path: Path

    @property
    def weights_file(self) -> Path:
        """The file holding the model's weights (the step folder's, for a training checkpoint)."""
        if self.kind == "inference":
            return self.path
        return next(self.path / n for n in TRAINING_WEIGHTS if (self.path / n).is_file())


def step_name(step: int) -> str:
    """The folder name of the training checkpoint of optimizer step ``step``."""
    return f"step_{step:08d}"


def find_checkpoint(run_dir: str | Path) -> Path | None:
    """The latest complete training checkpoint of a run (the one ``latest`` names; without a
    usable ``latest``, the highest ``step_*``: only complete ones are ever renamed to that), or None."""
    ckpt_dir = Path(run_dir) / CHECKPOINTS
    latest = ckpt_dir / LATEST
    if latest.is_file():
        path = ckpt_dir / latest.read_text().strip()
        if path.is_dir():
            return path
    done = sorted(p for p in ckpt_dir.glob("step_*") if p.is_dir())
    return done[-1] if done else None


def _is_finished_run(path: Path) -> bool:
    return (path / RUN_MODEL).is_file() and (path / RUN_SUMMARY).is_file()


def _folder_reference(given: str, path: Path, need: str) -> CheckpointRef:
    """A folder: a finished run (its model, unless training state is wanted), an unfinished run
    (its latest step) or a step folder."""
    if _is_finished_run(path) and not (need == "training" and (path / CHECKPOINTS).is_dir()):
        return CheckpointRef(given, "inference", path / RUN_MODEL)
    step = path
    if (path / CHECKPOINTS).is_dir():
        step = find_checkpoint(path)
        if step is None:
            raise CheckpointError(f"{given}: a run folder without a checkpoint yet")
    elif not any((path / n).is_file() for n in TRAINING_WEIGHTS):
        raise CheckpointError(f"{given}: a folder that holds no checkpoint; expected {_ACCEPTED}")
    if need == "inference":
        run = step.parent.parent if step.parent.name == CHECKPOINTS else step
        raise CheckpointError(
            f"{given}: {step} is a training checkpoint (the run has not finished); tagging and evaluation read "
            f"the inference checkpoint a finished run writes ({run / RUN_MODEL}): finish it with --resume, or "
            f"fine-tune from it with model.init={given}")
    return CheckpointRef(given, "training", step)


def resolve_reference(given: str | Path, *, need: str = "inference", **fetch_kwargs: Any) -> CheckpointRef:
    """Read a checkpoint reference (see the module docstring).

    ``need``: ``"inference"`` (tagging, evaluation, export: a self-describing model file),
    ``"weights"`` (``model.init``: either kind) or ``"training"`` (resume: the training state;
    a finished run folder gives its last step). A published name is fetched into the cache on
    first use (``fetch_kwargs`` go to :func:`.pretrained.fetch_pretrained`). Raises
    CheckpointError (one line naming what was given and what is accepted); download failures
    keep their :class:`.pretrained.PretrainedError`."""
    if need not in ("inference", "weights", "training"):
        raise ValueError(f"need must be inference, weights or training, not {need!r}")
    text, path = str(given), Path(given)
    if not path.exists():
        if need == "training":
            raise CheckpointError(f"{text}: no checkpoint there (no such folder); training resumes from a run "
                                  "folder or a checkpoints/step_N folder")
        if text in PUBLISHED_MODELS:
            return CheckpointRef(text, "inference", fetch_pretrained(text, **fetch_kwargs))
        raise CheckpointError(f"{text}: no such checkpoint file or folder, and not a published model "
                              f"({', '.join(PUBLISHED_MODELS)}); expected {_ACCEPTED}")
    if path.is_dir():
        return _folder_reference(text, path, need)
    if need == "training":
        raise CheckpointError(f"{text}: a file; training resumes from a run folder or a checkpoints/step_N folder")
    return CheckpointRef(text, "inference", path)


def resolve_reference_on_main_first(given: str | Path, accelerator: Any, *, need: str = "inference",
                                    **fetch_kwargs: Any) -> CheckpointRef:
    """:func:`resolve_reference` under a launch of several processes: a published name is fetched
    by the main process while the others wait, then read from the cache by all (a node without
    the shared cache fetches under the cache's lock). A failure on the main process is raised on
    every rank as the same one-line CheckpointError, so none waits for ever."""
    outcome: list[str | None] = [None]
    if accelerator.is_main_process:
        try:
            resolve_reference(given, need=need, **{**fetch_kwargs, "progress": True})
        except (OSError, ValueError, RuntimeError) as err:
            outcome = [str(err)]
    if accelerator.num_processes > 1:
        # Imported here: only a launch of several processes needs accelerate's collectives.
        from accelerate.utils import broadcast_object_list

        outcome = broadcast_object_list(outcome, from_process=0)
    if outcome[0] is not None:
        raise CheckpointError(outcome[0])
    return resolve_reference(given, need=need, **{**fetch_kwargs, "progress": False})


def load_reference(given: str | Path, *, bake: bool = True, device: Any = "cpu", **fetch_kwargs: Any) -> tuple[Any, Any]:
    """The model any inference reference names (a published name, a file, a finished run folder):
    ``(model, CheckpointInfo)`` in eval mode; ``audioset_dcls.load_model`` in the Python API."""
    return load_model(resolve_reference(given, **fetch_kwargs).path, bake=bake, device=device)
