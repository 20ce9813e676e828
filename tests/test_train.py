"""The training engine end to end: real 2-process CPU runs (gloo) on shards built by the real
builder from the synthetic mini AudioSet, exact resume, the inference checkpoint, learnability.

Resume is checked BITWISE: the interrupted+resumed run's final weights equal the uninterrupted
run's exactly. That holds because a resumed run replays its epoch's data stream to the saved
position, every micro-step's randomness is seeded from (seed, rank, micro-step), the optimizer,
scheduler and model states are restored exactly, and CPU kernels and gloo all-reduce of two
ranks are deterministic. (On GPUs, non-deterministic kernels make it ~1e-6 instead.)
"""

from __future__ import annotations

import csv
import json
import math
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from audioset_dcls.hub.checkpoint import load_model, read_checkpoint_info
from audioset_dcls.config import Config, ConfigError, apply_overrides
from audioset_dcls.shards.format import read_manifest
from audioset_dcls.synthetic import CLASSES
from audioset_dcls.hub.references import find_checkpoint
from audioset_dcls.training.recipe import build_optimizer, gradient_accumulation_steps, lr_at
from train_shards import session_shards, train_tiny_run

REPO = Path(__file__).resolve().parents[1]


def free_port() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return str(s.getsockname()[1])


def train_command(launcher: str, threads: int = 1) -> tuple[list[str], dict[str, str]]:
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads), PYTHONUNBUFFERED="1")
    if launcher == "accelerate":  # --multi_gpu with the CPU forced: two real processes (gloo)
        env["ACCELERATE_USE_CPU"] = "1"
        cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
               "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
               "--main_process_port", free_port(), "train.py"]
    elif launcher == "torchrun":
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
               "--master_port", free_port(), "train.py"]
    else:
        cmd = [sys.executable, "train.py"]
    return cmd, env


def run_train(launcher: str, args: list[str], threads: int = 1) -> subprocess.CompletedProcess:
    cmd, env = train_command(launcher, threads)
    return subprocess.run(cmd + args, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)


def check(proc: subprocess.CompletedProcess) -> str:
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return proc.stdout + proc.stderr


# ---------------------------------------------------------------------------------- units


def test_lr_schedule_warmup_then_cosine():
    kw = dict(peak=4e-3, total_steps=100, warmup_steps=20, warmup_lr=0.0, min_lr=1e-6)
    lrs = [lr_at(s, **kw) for s in range(101)]
    assert lrs[0] == 0.0 and lrs[10] == pytest.approx(2e-3) and lrs[20] == pytest.approx(4e-3)
    assert all(a < b for a, b in zip(lrs[:20], lrs[1:21]))
    assert all(a >= b for a, b in zip(lrs[20:], lrs[21:]))
    assert lrs[60] == pytest.approx(1e-6 + 0.5 * (4e-3 - 1e-6))  # half-way down the cosine
    assert lrs[100] == pytest.approx(1e-6)


def test_gradient_accumulation_reaches_the_effective_batch():
    assert gradient_accumulation_steps(4096, 32, 8) == 16
    assert gradient_accumulation_steps(4096, 64, 64) == 1
    with pytest.raises(ConfigError, match="optim.batch_size=4096"):
        gradient_accumulation_steps(4096, 48, 8)


@pytest.mark.parametrize("opt", ["adamw", "lamb"])
def test_optimizer_groups_give_dcls_positions_5x_lr_and_no_decay(opt):
    from audioset_dcls.models import create_model, shared_dcls_parameters

    model = create_model("convnext_atto_dcls", num_classes=8)
    cfg = apply_overrides(Config(), [f"optim.name={opt}", "optim.lr=1e-3"])
    o = build_optimizer(model, cfg)
    assert type(o).__name__ == ("AdamW" if opt == "adamw" else "Lamb")
    dcls_ids = {id(p) for p in shared_dcls_parameters(model)}
    (group,) = [g for g in o.param_groups if any(id(p) in dcls_ids for p in g["params"])]
    assert group["lr"] == pytest.approx(5e-3) and group["weight_decay"] == 0.0
    assert {id(p) for p in group["params"]} == dcls_ids
    n_opt = sum(p.numel() for g in o.param_groups for p in g["params"])
    assert n_opt == sum(p.numel() for p in model.parameters())


def test_interrupted_save_leaves_the_previous_checkpoint(tmp_path):
    ck = tmp_path / "checkpoints"
    (ck / "step_00000004").mkdir(parents=True)
    (ck / ".tmp-step_00000008").mkdir()  # a save killed half-way
    (ck / "latest").write_text("step_00000004\n")
    assert find_checkpoint(tmp_path) == ck / "step_00000004"
    assert find_checkpoint(tmp_path / "other") is None


# ------------------------------------------------------------------ 2-process runs + resume

COMMON = ["--config", "configs/tiny.yaml", "schedule.epochs=3", "schedule.warmup_epochs=1", "optim.batch_size=32",
          "data.num_workers=2", "eval.every_epochs=1", "train.progress_bar=false", "train.log_every_steps=1",
          "train.checkpoint_every_steps=2",
          # every augmentation and drop path on: resume must reproduce their randomness too
          "augment.mixup_alpha=0.8", "augment.time_stretch_prob=0.5", "augment.erase_prob=0.25",
          "augment.freq_masks=1", "augment.freq_mask_width=8", "model.drop_path_rate=0.1"]
STOP_AT = 5  # mid-epoch 1 (4 steps of 2 micro-batches per epoch): exercises the in-worker skip


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    train_dir, eval_dir = session_shards(tmp_path_factory, 2.0)
    root = tmp_path_factory.mktemp("runs")
    data = [f"data.train={train_dir}", f"data.eval={eval_dir}"]
    full = check(run_train("accelerate", COMMON + data + [f"train.output_dir={root / 'full'}"]))
    part1 = check(run_train("torchrun", COMMON + data + [f"train.output_dir={root / 'resumed'}",
                                                         f"train.max_steps={STOP_AT}"]))
    part2 = check(run_train("torchrun", COMMON + data + [f"train.output_dir={root / 'resumed'}", "--resume"]))
    return {"root": root, "train": train_dir, "eval": eval_dir, "logs": (full, part1, part2)}


def summary(run_dir: Path) -> dict:
    return json.loads((run_dir / "summary.json").read_text())


def test_two_processes_learn_and_stay_in_sync(runs):
    s = summary(runs["root"] / "full")
    assert s["processes"] == 2 and s["finished"] and s["step"] == 12
    assert s["loss_last"] < s["loss_first"] - 0.05, s
    a, b = s["param_checksums"]
    assert a == b  # replicas identical to the last bit after 12 all-reduced steps
    # tiny.yaml's batch of 8 per process: 2 x 8 x accumulation 2 = the configured 32
    assert "2 process(es) x batch 8 x accumulation 2 = 32 clips/step" in runs["logs"][0]


def test_eval_counts_every_clip_exactly_once(runs):
    manifest = read_manifest(runs["eval"])
    lines = [json.loads(x) for x in (runs["root"] / "full" / "eval" / "results.jsonl").read_text().splitlines()]
    assert [x["epoch"] for x in lines] == [0, 1, 2]
    for x in lines:
        assert x["num_clips"] == manifest["num_samples"] == x["manifest_clips"]
        assert x["clip_ids_sha256"] == manifest["clip_ids_sha256"]
        assert x["corrupt"] == 0 and x["num_classes_scored"] == len(CLASSES)
        assert 0.0 < x["mAP"] <= 1.0 and math.isfinite(x["d_prime"])
    with open(runs["root"] / "full" / "eval" / "per_class_ap_epoch002.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["name"] for r in rows] == [name for _, name in CLASSES]
    assert sum(int(r["positives"]) for r in rows) > manifest["num_samples"]  # multi-label


def test_resume_after_interrupt_is_bitwise_exact(runs):
    root = runs["root"]
    full_log, part1_log, part2_log = runs["logs"]
    assert summary(root / "resumed")["step"] == 12
    assert f"resumed from {root / 'resumed' / 'checkpoints' / f'step_{STOP_AT:08d}'}: epoch 1, step {STOP_AT}" in part2_log
    assert "differ from the checkpoint's" not in part2_log  # only train.max_steps and train.resume changed
    a = load_file(str(root / "full" / "model.safetensors"))
    b = load_file(str(root / "resumed" / "model.safetensors"))
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a), "resumed weights differ from the uninterrupted run"
    ev_full = (root / "full" / "eval" / "results.jsonl").read_text().splitlines()
    ev_res = (root / "resumed" / "eval" / "results.jsonl").read_text().splitlines()
    assert ev_full == ev_res
    assert summary(root / "full")["param_checksums"] == summary(root / "resumed")["param_checksums"]


def _descendants(pid: int) -> list[int]:
    """All processes below ``pid`` (from /proc), children before grandchildren."""
    parent_of = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        parent_of[int(stat.parent.name)] = int(fields[1])
    found, frontier = [], [pid]
    while frontier:
        kids = [p for p, pp in parent_of.items() if pp in frontier]
        found += kids
        frontier = kids
    return found


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def test_resume_after_sigkill_is_bitwise_exact(runs):
    """Kill the whole job (SIGKILL, no clean-up) once its first checkpoint exists, wherever it
    is then (training, evaluating or half-way through the next save), and resume it."""
    root = runs["root"]
    args = COMMON + [f"data.train={runs['train']}", f"data.eval={runs['eval']}", f"train.output_dir={root / 'killed'}"]
    cmd, env = train_command("torchrun")
    job = subprocess.Popen(cmd + args, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                           start_new_session=True)
    latest = root / "killed" / "checkpoints" / "latest"
    deadline = time.monotonic() + 300
    while not latest.is_file() and job.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    # torchrun starts each rank in a session of its own: killing the launcher's process group
    # alone would leave the ranks training (and writing checkpoints) as orphans.
    doomed = [job.pid] + _descendants(job.pid)
    assert job.poll() is not None or len(doomed) >= 3, "expected torchrun and its two ranks"
    for pid in doomed:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    job.wait()
    deadline = time.monotonic() + 30
    while any(_alive(pid) for pid in doomed[1:]) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not any(_alive(pid) for pid in doomed[1:]), "a rank of the killed job survived SIGKILL"
    assert latest.is_file() and not (root / "killed" / "model.safetensors").exists()
    log = check(run_train("torchrun", args + ["--resume"]))
    assert "resumed from" in log
    a = load_file(str(root / "full" / "model.safetensors"))
    b = load_file(str(root / "killed" / "model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a), "resumed weights differ from the uninterrupted run"


def _children(pid: int) -> list[int]:
    kids = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            if int(stat.read_text().rsplit(")", 1)[1].split()[1]) == pid:
                kids.append(int(stat.parent.name))
        except (OSError, IndexError, ValueError):
            continue
    return kids


def _rank_of(pid: int) -> int | None:
    try:
        env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    except OSError:
        return None
    return next((int(e[5:]) for e in env if e.startswith(b"RANK=")), None)


def test_sigterm_to_one_rank_stops_both_at_one_step_with_a_checkpoint_and_resume_is_exact(runs):
    """SIGTERM to rank 1 alone (a signal may reach only some ranks), mid-epoch: both ranks finish
    the step, agree to stop at the same one, write one checkpoint and exit 75; none is left
    running; the resumed run ends with the uninterrupted run's weights, bit for bit."""
    root = runs["root"]
    out = root / "signalled"
    # checkpoint_every_steps=100: the checkpoint can only come from the signal (or an epoch end)
    args = COMMON + [f"data.train={runs['train']}", f"data.eval={runs['eval']}", f"train.output_dir={out}",
                     "train.checkpoint_every_steps=100"]
    cmd, env = train_command("torchrun")
    job = subprocess.Popen(cmd + args, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                           start_new_session=True)
    lines = []
    for line in job.stdout:  # the plan is logged once every rank is set up (handlers installed)
        lines.append(line)
        if "clips/step" in line:
            break
    ranks = {_rank_of(pid): pid for pid in _children(job.pid)}
    assert set(ranks) == {0, 1}, lines[-20:]
    everyone = [job.pid] + _descendants(job.pid)
    os.kill(ranks[1], signal.SIGTERM)
    lines += job.stdout.readlines()
    assert job.wait(timeout=300) != 0  # torchrun reports the ranks' 75 as a failed launch (exit 1)
    log = "".join(lines)
    assert len(re.findall(r"exitcode\s*:\s*75 \(pid", log)) == 2, log[-3000:]  # both ranks
    # rank 0 never got the signal: it stops because the ranks agree, at the first step boundary
    assert "SIGTERM received: stopping after step 1 (epoch 0, batch 2 of 8)" in log, log[-3000:]
    deadline = time.monotonic() + 30
    while any(_alive(pid) for pid in everyone) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not any(_alive(pid) for pid in everyone), "a process of the signalled job is still running"
    assert find_checkpoint(out) == out / "checkpoints" / "step_00000001"
    s = summary(out)
    assert s["stopped_by"] == "SIGTERM" and not s["finished"] and s["step"] == 1
    assert s["param_checksums"][0] == s["param_checksums"][1]

    log = check(run_train("torchrun", args + ["--resume"]))
    assert "resumed from" in log and "step 1, 2 batches into the epoch" in log
    a = load_file(str(root / "full" / "model.safetensors"))
    b = load_file(str(out / "model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a), "resumed weights differ from the uninterrupted run"
    assert (root / "full" / "eval" / "results.jsonl").read_text() == (out / "eval" / "results.jsonl").read_text()


def test_a_stop_signal_only_raises_a_flag_and_the_handlers_are_put_back():
    """A second signal (during the save) changes nothing and raises nothing mid-save."""
    from audioset_dcls.preemption import StopSignals

    before = signal.getsignal(signal.SIGUSR1)
    with StopSignals((signal.SIGTERM, signal.SIGUSR1)) as signals:
        # Sent to this thread, not the process: a process-directed signal may be taken by one of
        # torch's threads and still be pending when the handlers are put back (SIGTERM's default
        # then kills the test run). A thread-directed one is delivered before pthread_kill returns.
        signal.pthread_kill(threading.get_ident(), signal.SIGUSR1)
        signal.pthread_kill(threading.get_ident(), signal.SIGTERM)
        time.sleep(0.01)  # Python runs handlers between bytecodes of the main thread
        assert signals.received == signal.SIGUSR1 and signals.name == "SIGUSR1"
    assert signal.getsignal(signal.SIGUSR1) is before


def test_final_checkpoint_describes_itself(runs):
    path = runs["root"] / "full" / "model.safetensors"
    info = read_checkpoint_info(path)
    manifest = read_manifest(runs["train"])
    assert info.model_name == "convnext_atto" and info.num_classes == len(CLASSES)
    assert info.label_names == [name for _, name in CLASSES]
    assert info.features.to_dict() == manifest["feature_config"] and info.features.clip_seconds == 2.0
    assert (info.normalization.mean, info.normalization.std) == (-18.2696, 30.5735)
    assert info.extra["config"]["model"]["name"] == "convnext_atto"
    assert info.extra["eval"]["num_clips"] == read_manifest(runs["eval"])["num_samples"]
    model, _ = load_model(path)
    x = torch.zeros(2, 1, 128, info.features.num_frames)
    assert model(x).shape == (2, len(CLASSES))
    assert (runs["root"] / "full" / "config.yaml").is_file()
    latest = find_checkpoint(runs["root"] / "full")
    assert (latest / "config.yaml").is_file()


def test_evaluate_on_the_exported_model_reproduces_the_training_eval(runs):
    """audioset_dcls.training.evaluate, the one definition, run in this process on the exported weights,
    gives the 2-process run's final eval to the last bit (same batches: 2 workers here read the
    shards the 2 ranks read there)."""
    from accelerate import Accelerator

    from audioset_dcls.data import open_shard_set
    from audioset_dcls.training.evaluate import evaluate, summarize

    model, info = load_model(runs["root"] / "full" / "model.safetensors", bake=False)
    result = evaluate(model, open_shard_set(runs["eval"], "eval"), info.normalization, batch_size=32, num_workers=2,
                      accelerator=Accelerator(cpu=True))
    assert summarize(result) == summary(runs["root"] / "full")["eval"] == info.extra["eval"]


@pytest.mark.parametrize("launcher", ["single", "accelerate"])
def test_evaluate_command_reproduces_the_training_eval(runs, tmp_path, launcher):
    """``python -m audioset_dcls.training.evaluate`` on the exported model gives the run's final eval to
    the last bit, alone (2 loader workers read the shards the 2 ranks read) and under a 2-process
    launch (every clip once over the ranks); its per-class table is the run's, byte for byte.
    With --calibrate it stores the thresholds the run's final evaluation stored (here in a copy of
    the model that has none), and changes nothing else."""
    from audioset_dcls.hub.checkpoint import load_checkpoint, save_inference_checkpoint

    exported = runs["root"] / "full" / "model.safetensors"
    weights, info = load_checkpoint(exported)
    trained_thresholds, info.thresholds = info.thresholds, None
    copy = save_inference_checkpoint(tmp_path / "model.safetensors", weights, info)
    args = ["--checkpoint", str(copy), "--shards", str(runs["eval"]), "--calibrate",
            "--batch-size", "32", "--output", str(tmp_path / "results.json"),
            "--per-class", str(tmp_path / "per_class.csv")]
    if launcher == "single":  # in this process: the command's main(), as `python -m` runs it
        from accelerate.state import AcceleratorState

        from audioset_dcls.training.evaluate import main as evaluate_main

        AcceleratorState._reset_state(reset_partial_state=True)  # another test's Accelerator(cpu=True)
        try:
            assert evaluate_main(args + ["--workers", "2"]) == 0
        finally:
            AcceleratorState._reset_state(reset_partial_state=True)
    else:
        cmd, env = train_command("accelerate")
        cmd = cmd[:-1] + ["-m", "audioset_dcls.training.evaluate"]
        log = check(subprocess.run(cmd + args + ["--workers", "1"], cwd=REPO, env=env, capture_output=True,
                                   text=True, timeout=600))
        assert "2 process(es)" in log
    results = json.loads((tmp_path / "results.json").read_text())
    final = summary(runs["root"] / "full")["eval"]
    assert {k: results[k] for k in final} == final
    assert results["processes"] == (2 if launcher == "accelerate" else 1) and results["precision"] == "fp32"
    trained = runs["root"] / "full" / "eval" / "per_class_ap_epoch002.csv"
    assert (tmp_path / "per_class.csv").read_bytes() == trained.read_bytes()
    calibrated_weights, calibrated = load_checkpoint(copy)
    assert trained_thresholds["method"] == "max_f1" and calibrated.thresholds == trained_thresholds
    assert calibrated.to_dict() == {**info.to_dict(), "thresholds": trained_thresholds}
    assert all(torch.equal(calibrated_weights[k], weights[k]) for k in weights)


def _one_error_line(proc: subprocess.CompletedProcess) -> str:
    assert proc.returncode == 2, proc.stderr[-3000:]
    errors = [line for line in proc.stderr.splitlines() if " ERROR " in line]
    assert len(errors) == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    return errors[0]


def test_refuses_to_overwrite_a_run_and_reports_missing_data_or_checkpoints(runs, tmp_path):
    data = [f"data.train={runs['train']}", f"data.eval={runs['eval']}"]
    again = run_train("single", ["--config", "configs/tiny.yaml", *data, f"train.output_dir={runs['root'] / 'full'}"])
    assert "already holds checkpoints" in _one_error_line(again)
    missing = run_train("single", ["--config", "configs/tiny.yaml", f"data.train={tmp_path / 'nowhere'}",
                                   f"train.output_dir={tmp_path / 'r'}"])
    line = _one_error_line(missing)
    assert "data.train=" in line and "no such directory" in line
    nothing = run_train("single", ["--config", "configs/tiny.yaml", *data, f"train.output_dir={tmp_path / 'r'}",
                                   f"train.resume={tmp_path / 'nowhere'}"])
    assert "no checkpoint there" in _one_error_line(nothing)
    # a checkpoint whose weights file was cut short (a disk that filled up, a bad copy)
    broken = tmp_path / "broken" / "checkpoints"
    step = find_checkpoint(runs["root"] / "full")
    shutil.copytree(step, broken / step.name)
    (broken / "latest").write_text(step.name + "\n")
    weights = broken / step.name / "pytorch_model.bin"
    os.truncate(weights, weights.stat().st_size // 2)
    cut = run_train("single", ["--config", "configs/tiny.yaml", *data, f"train.output_dir={broken.parent}", "--resume"])
    line = _one_error_line(cut)
    assert f"{broken / step.name}: cannot resume from this checkpoint" in line


# ------------------------------------------------------------------------------ learnability

# Chance level: a scorer that knows nothing has AP ~= the class's prevalence. Clips hold 1-3 of
# the 8 classes (1.65 on average), so chance mAP ~= 0.21 (~0.25 on 48 eval clips, by luck). 0.40
# is about twice that and far outside what an untrained network scores (measured 0.28-0.33).
LEARNABLE_MAP = 0.40


def test_tiny_model_learns_the_synthetic_classes_with_the_real_front_end(tmp_path_factory):
    train_dir, _ = session_shards(tmp_path_factory, 10.0)
    assert read_manifest(train_dir)["feature_config"]["clip_seconds"] == 10.0
    out, log = train_tiny_run(tmp_path_factory)  # the session's trained model (also used by the events tests)
    s = summary(out)
    with open(out / "eval" / "per_class_ap_epoch003.csv") as f:
        chance = sum(int(r["positives"]) for r in csv.DictReader(f)) / (len(CLASSES) * s["eval"]["num_clips"])
    assert LEARNABLE_MAP >= 1.5 * chance  # the threshold really is well above chance on this eval set
    assert s["eval"]["mAP"] >= LEARNABLE_MAP, log[-2000:]
    print(f"learnability: mAP {s['eval']['mAP']:.3f} (threshold {LEARNABLE_MAP}), AUC {s['eval']['mAUC']:.3f}")


def test_ema_averages_shared_dcls_positions_once_per_step():
    from audioset_dcls.models import create_model
    from audioset_dcls.training.recipe import ModelEma

    torch.manual_seed(0)
    model = create_model("convnext_atto_dcls", num_classes=8)
    ema = ModelEma(model, decay=0.9)
    before = {n: p.detach().clone() for n, p in ema.module.named_parameters()}
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    ema.update(model)
    shared = [n for n in before if n.endswith(("positions", "widths"))]
    assert shared, "no DCLS position/width parameters found"
    for n, p in ema.module.named_parameters():
        expected = before[n] * 0.9 + dict(model.named_parameters())[n].detach() * 0.1
        assert torch.allclose(p, expected, atol=1e-6), n


def test_resume_names_the_settings_that_changed(tmp_path):
    from audioset_dcls.config import load_config, to_yaml
    from audioset_dcls.training.checkpointing import changed_settings

    saved = tmp_path / "config.yaml"
    saved.write_text(to_yaml(load_config(None, ["data.num_workers=4", "train.max_steps=10"])))
    now = load_config(None, ["data.num_workers=2", "train.max_steps=20", "train.resume=auto", "optim.lr=0.001"])
    assert changed_settings(saved, now) == ["data.num_workers 4 -> 2", "optim.lr 0.004 -> 0.001"]
    assert changed_settings(tmp_path / "missing.yaml", now) == []


def test_a_run_folder_is_a_checkpoint_reference_for_tagging_evaluation_and_init(runs, tmp_path, capsys):
    """One resolver (hub.references) reads every kind of reference: a finished run folder tags and
    evaluates like its model.safetensors; its step folder is a training checkpoint that init
    accepts and tagging refuses in one line saying what to do."""
    from accelerate.state import AcceleratorState

    from audioset_dcls.hub.checkpoint import CheckpointError
    from audioset_dcls.hub.references import resolve_reference
    from audioset_dcls.tagging.cli import main as infer_main
    from audioset_dcls.training.evaluate import main as evaluate_main
    from helpers_tagging import write_audio

    run_dir = runs["root"] / "full"
    step = find_checkpoint(run_dir)
    assert resolve_reference(run_dir).path == run_dir / "model.safetensors"
    import audioset_dcls

    model, info = audioset_dcls.load_model(run_dir)  # the Python API reads references too
    assert info.model_name == read_checkpoint_info(run_dir / "model.safetensors").model_name and not model.training
    assert resolve_reference(run_dir, need="training").path == step
    ref = resolve_reference(step, need="weights")
    assert ref.kind == "training" and ref.weights_file == step / "pytorch_model.bin"
    with pytest.raises(CheckpointError, match=r"training checkpoint .*model\.init=") as err:
        resolve_reference(step)
    assert "\n" not in str(err.value)

    clip = write_audio(tmp_path / "clip.wav", 4.0, seed=3)
    outputs = []
    for checkpoint in (run_dir, run_dir / "model.safetensors"):
        assert infer_main(["--checkpoint", str(checkpoint), str(clip), "--format", "jsonl", "--top-k", "0", "-q"]) == 0
        outputs.append(json.loads(capsys.readouterr().out))
    assert outputs[0] == outputs[1] and len(outputs[0]["tags"]) == len(CLASSES)
    assert infer_main(["--checkpoint", str(step), str(clip), "-q"]) == 2
    assert "training checkpoint" in capsys.readouterr().err

    AcceleratorState._reset_state(reset_partial_state=True)  # another test's Accelerator(cpu=True)
    try:
        assert evaluate_main(["--checkpoint", str(run_dir), "--shards", str(runs["eval"]), "--batch-size", "32", "--workers", "2",
                              "--output", str(tmp_path / "results.json")]) == 0
    finally:
        AcceleratorState._reset_state(reset_partial_state=True)
    assert json.loads((tmp_path / "results.json").read_text())["mAP"] == summary(run_dir)["eval"]["mAP"]
