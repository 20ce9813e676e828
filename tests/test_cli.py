"""The installed command (``audioset-dcls``) works outside the repository, and tagging loads
neither accelerate nor TensorBoard (start-up time: benchmarks/RESULTS.md "Start-up")."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from helpers_tagging import write_audio, write_checkpoint

REPO = Path(__file__).resolve().parents[1]


def run_outside(args: list[str], cwd: Path, **kw) -> subprocess.CompletedProcess:
    """Run ``args`` from ``cwd`` (outside the checkout) with no path to the repository."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["OMP_NUM_THREADS"] = "1"
    return subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=300, **kw)


def test_dispatcher_lists_commands_and_refuses_unknown_ones(tmp_path):
    listed = run_outside([sys.executable, "-m", "audioset_dcls", "--help"], tmp_path)
    assert listed.returncode == 0
    for name in ("tag", "train", "evaluate", "build-shards", "export", "pretrained"):
        assert f"\n  {name} " in listed.stdout
    wrong = run_outside([sys.executable, "-m", "audioset_dcls", "tagg"], tmp_path)
    assert wrong.returncode == 2 and "unknown command 'tagg'" in wrong.stderr
    # preprocessing is a folder of the checkout, not an installed package
    assert run_outside([sys.executable, "-c", "import preprocessing"], tmp_path).returncode != 0


def test_installed_command_tags_from_outside_the_repository_without_accelerate_or_tensorboard(tmp_path):
    checkpoint = write_checkpoint(tmp_path / "model.safetensors")
    clip = write_audio(tmp_path / "clip.flac", 3.0)
    probe = ("import sys, json; from audioset_dcls.__main__ import main; code = main(sys.argv[1:]); "
             "print(json.dumps({'code': code, 'loaded': sorted(m for m in ('accelerate', 'tensorboard', "
             "'torch.utils.tensorboard') if m in sys.modules)}), file=sys.stderr)")
    proc = run_outside([sys.executable, "-c", probe, "tag", "--checkpoint", str(checkpoint), str(clip),
                        "--format", "jsonl", "-q"], tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    record = json.loads(proc.stdout)
    assert record["path"] == str(clip) and len(record["tags"]) == 8
    report = json.loads(proc.stderr.strip().splitlines()[-1])
    assert report == {"code": 0, "loaded": []}


def test_console_script_is_installed():
    script = Path(sys.executable).parent / "audioset-dcls"
    if not script.exists():
        pytest.skip("the package is not installed with its scripts in this environment (pip install -e .)")
    proc = subprocess.run([str(script), "--version"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and proc.stdout.startswith("audioset-dcls ")
