"""scripts/gpu_check.sh, the check a GPU machine runs (benchmarks/gpu_check.py): without CUDA it
stops at once with one line saying why, before running anything. (Its steps, shrunk, run on a
CPU with `--device cpu --quick`: a few minutes, so not part of the suite.)"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from conftest import REPO_ROOT


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA: the check would run")
def test_gpu_check_fails_fast_and_clearly_without_cuda(tmp_path):
    out = tmp_path / "results.md"
    proc = subprocess.run(["bash", "scripts/gpu_check.sh", "--out", str(out)], cwd=REPO_ROOT, capture_output=True,
                          text=True, timeout=120, env=dict(os.environ, PYTHON=sys.executable))
    assert proc.returncode == 2, proc.stdout + proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "no CUDA device" in errors[0] and "--device cpu --quick" in errors[0]
    assert "Traceback" not in proc.stderr and not out.exists()
