"""Shared by the shard-builder tests: run the real command and kill it mid-build."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]


def kill_build_after_first_shard(argv: list[str], out: Path, timeout: float = 120.0) -> None:
    """Start the build command ``argv`` and SIGKILL it, workers included, as soon as its first
    shard is finished (its record in ``out/_build``); the run must not have finished by then."""
    proc = subprocess.Popen(argv, cwd=REPO_ROOT, start_new_session=True, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)
    deadline = time.monotonic() + timeout
    try:
        while not list((out / "_build").glob("train-*.json")):
            assert proc.poll() is None, proc.stderr.read().decode()
            assert time.monotonic() < deadline, f"no shard finished in {timeout:g} s"
            time.sleep(0.005)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # the command and its workers
        proc.wait()
    assert not (out / "manifest.json").exists(), "the run finished before it could be killed"
