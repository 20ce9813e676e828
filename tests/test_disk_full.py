"""A disk that fills up while a run writes its checkpoint or its eval results: one error line, the
previous checkpoint intact and still the one --resume continues from, no rank left waiting.

The 2-process run writes into a real 60 MB tmpfs (one checkpoint of the tiny model is 39 MB, so
the second does not fit): torch.save then fails the way it does on a full disk (an opaque
RuntimeError from its zip writer on one rank only). Mounting needs root (CI runs as root);
elsewhere that test skips. Eval results are tested by failing their write with ENOSPC in process.
"""

from __future__ import annotations

import errno
import os
import subprocess
from pathlib import Path

import pytest

from audioset_dcls.config import load_config
from audioset_dcls.training.evaluate import append_jsonl
from audioset_dcls.hub.references import find_checkpoint
from audioset_dcls.training.state import OutputError
from test_train import REPO, run_train
from train_shards import session_shards

SMALL = ["schedule.epochs=1", "schedule.warmup_epochs=0", "data.num_workers=0", "data.samples_per_epoch=32",
         "train.progress_bar=false", "train.tracker=none"]


@pytest.fixture
def small_disk(tmp_path):
    """A 60 MB tmpfs, unmounted afterwards; skips where mounting is not permitted."""
    mnt = tmp_path / "small_disk"
    mnt.mkdir()
    try:
        proc = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=60m", "tmpfs", str(mnt)], capture_output=True,
                              text=True, timeout=30)
    except FileNotFoundError:
        pytest.skip("no mount command")
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here: {proc.stderr.strip()}")
    yield mnt
    subprocess.run(["umount", "-l", str(mnt)], capture_output=True, timeout=30)


def test_disk_full_while_checkpointing_keeps_the_previous_checkpoint(small_disk, tmp_path_factory):
    train_dir, _ = session_shards(tmp_path_factory, 2.0)
    out = small_disk / "run"
    proc = run_train("torchrun", ["--config", "configs/tiny.yaml", *SMALL, "optim.batch_size=16", "train.max_steps=3",
                                  "train.checkpoint_every_steps=1", f"data.train={train_dir}", f"train.output_dir={out}"])
    assert proc.returncode != 0
    errors = [line for line in proc.stderr.splitlines() if " ERROR audioset_dcls.train" in line]
    # both ranks stop with the same line (the one that could write learns it from the other)
    assert len(errors) == 2 and "Traceback" not in "".join(e for e in errors), proc.stderr[-3000:]
    line = errors[0].split("audioset_dcls.train: ", 1)[1]
    assert line == errors[1].split("audioset_dcls.train: ", 1)[1]
    step1, step2 = out / "checkpoints" / "step_00000001", out / "checkpoints" / "step_00000002"
    assert line.startswith(f"cannot write checkpoint {step2}: ") and "MB free there" in line
    assert line.endswith(f"--resume continues from {step1}")
    assert find_checkpoint(out) == step1
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["latest", "step_00000001"]  # partial one removed
    assert {"pytorch_model.bin", "optimizer.bin", "random_states_0.pkl", "random_states_1.pkl"} <= {
        p.name for p in step1.iterdir()}


def test_results_file_is_never_left_with_half_a_line(small_disk):
    path = small_disk / "eval" / "results.jsonl"
    append_jsonl(path, {"epoch": 0, "mAP": 0.5})
    before = path.read_bytes()
    fd = os.open(small_disk / "filler", os.O_WRONLY | os.O_CREAT)
    try:  # fill the disk to the last byte
        for size in (1 << 20, 1 << 12, 1):
            while os.write(fd, b"\0" * size) == size:
                pass
    except OSError as err:
        assert err.errno == errno.ENOSPC
    finally:
        os.close(fd)
    with pytest.raises(OSError):
        append_jsonl(path, {"epoch": 1, "mAP": 0.6, "pad": "x" * 100_000})
    assert path.read_bytes() == before
    assert [p.name for p in path.parent.iterdir()] == ["results.jsonl"]  # no temp file left


def test_disk_full_while_writing_eval_results_is_one_error_and_resume_keeps_its_checkpoint(
        tmp_path, tmp_path_factory, monkeypatch):
    """In process, one process: the per-class table of the first evaluation fails with ENOSPC."""
    import audioset_dcls.training.loop as training

    def no_space(path, *args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    monkeypatch.setattr(training, "write_per_class_csv", no_space)
    train_dir, eval_dir = session_shards(tmp_path_factory, 2.0)
    out = tmp_path / "run"
    cfg = load_config(REPO / "configs" / "tiny.yaml", SMALL + [
        f"data.train={train_dir}", f"data.eval={eval_dir}", f"train.output_dir={out}", "train.checkpoint_every_steps=2"])
    with pytest.raises(OutputError) as err:
        training.train(cfg)
    line = str(err.value)
    assert line.startswith(f"cannot write eval results in {out / 'eval'}: [Errno 28] No space left on device")
    assert line.endswith(f"--resume continues from {out / 'checkpoints' / 'step_00000002'}")
    assert find_checkpoint(out).name == "step_00000002"
    assert not (out / "eval" / "results.jsonl").exists() and not (out / "summary.json").exists()
    assert Path(out / "checkpoints" / "latest").read_text().strip() == "step_00000002"
