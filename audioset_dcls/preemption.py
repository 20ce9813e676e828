"""Stopping on a scheduler's signal: finish the optimizer step, agree, checkpoint, exit 75.

SLURM (preemption, the time limit, or ``sbatch --signal`` ahead of it) and Kubernetes (pod
eviction) send SIGTERM (or the signal asked for) and SIGKILL after a grace period. A run that
dies on the first signal loses everything since its last periodic checkpoint. Here a signal
only raises a flag (:class:`StopSignals`); the training loop looks at it at every optimizer-step
boundary, where all ranks agree with one all-reduce (:func:`agree_to_stop`: a signal may reach
only some ranks, or reach them at different micro-steps), writes one checkpoint and exits with
:data:`EXIT_PREEMPTED` so that a requeue wrapper can tell "preempted, resume me" from a failure.

The handler never raises: a second signal during the save only sets the flag again, so it
cannot leave a half-written checkpoint (which is atomic anyway). Loader worker processes ignore
these signals (:func:`ignore_stop_signals`): a scheduler signals every process of a job, and a
worker killed by it would make its rank fail before the step boundary. Workers end with their
rank.
"""

from __future__ import annotations

import signal
import threading
from types import FrameType

__all__ = ["EXIT_PREEMPTED", "STOP_SIGNAL_CHOICES", "parse_stop_signals", "StopSignals", "agree_to_stop",
           "ignore_stop_signals"]

# sysexits.h EX_TEMPFAIL, "a temporary failure; the user is invited to retry". Nothing else in
# the stack exits with it (Python, torchrun and accelerate use 1 and 2; a signal death 128 + n).
EXIT_PREEMPTED = 75

# The signals a run may checkpoint on: the ones schedulers send (TERM; USR1/USR2 by request,
# e.g. sbatch --signal=USR1@300), and HUP/INT for a lost terminal or Ctrl-C. KILL and STOP
# cannot be caught.
STOP_SIGNAL_CHOICES = ("SIGTERM", "SIGUSR1", "SIGUSR2", "SIGHUP", "SIGINT")


def parse_stop_signals(spec: str) -> tuple[signal.Signals, ...]:
    """``"SIGTERM,SIGUSR1"`` (``SIG`` optional, any case; ``"none"`` or ``""``: none) -> signals.
    ValueError naming the choices for anything else."""
    if spec.strip().lower() in ("", "none"):
        return ()
    out = []
    for part in spec.split(","):
        name = part.strip().upper()
        name = name if name.startswith("SIG") else "SIG" + name
        if name not in STOP_SIGNAL_CHOICES:
            raise ValueError(f"{part.strip()!r} is not one of {', '.join(STOP_SIGNAL_CHOICES)} (or none)")
        sig = signal.Signals[name]
        if sig not in out:
            out.append(sig)
    return tuple(out)


class StopSignals:
    """Record the first of ``signals`` that arrives instead of dying of it (a context manager:
    the previous handlers are put back on exit).

    ``received``: the signal number, 0 while none came. Only the main thread can install
    handlers; elsewhere (a notebook's worker thread) this does nothing.
    """

    def __init__(self, signals: tuple[signal.Signals, ...]):
        self.signals = signals
        self.received = 0
        self._previous: dict[signal.Signals, object] = {}

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        # Nothing else here: no logging (a handler that writes to a stream the interrupted code
        # is writing to raises "reentrant call"), no exception (it could land mid-save).
        if not self.received:
            self.received = signum

    def __enter__(self) -> "StopSignals":
        if threading.current_thread() is threading.main_thread():
            for sig in self.signals:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)
        self._previous.clear()

    @property
    def name(self) -> str:
        return signal.Signals(self.received).name if self.received else ""


def agree_to_stop(received: int, accelerator) -> int:
    """The signal every rank stops on: the largest signal number any rank has received (0:
    none), the same on all ranks. Every rank must call it at the same step (one all-reduce of
    one integer; on CUDA the ``.item()`` waits for the step's kernels)."""
    if accelerator.num_processes == 1:
        return received
    # Imported here: config.py reads stop-signal names from this module without loading torch.
    import torch

    flag = torch.tensor(received, dtype=torch.int32, device=accelerator.device)
    torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
    return int(flag.item())


def ignore_stop_signals(worker_id: int = 0) -> None:
    """``worker_init_fn`` of the data loaders: leave every stop signal to the rank (see above).
    A worker still ends with its rank: the loader shuts it down, or it notices its parent gone."""
    for name in STOP_SIGNAL_CHOICES:
        signal.signal(signal.Signals[name], signal.SIG_IGN)
