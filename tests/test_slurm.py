"""scripts/slurm_train.sh under a stand-in for SLURM: the real script, accelerate launch, two CPU
ranks and train.py; only srun, scancel and scontrol are small fakes that do what SLURM does for
one node (start the step, signal every process of the step, record a requeue).

The time-limit path: SLURM sends the batch shell SIGUSR1 (`--signal=B:USR1@300`); the script
passes it to the step, the ranks finish their step, checkpoint and exit 75, and the script
requeues the job; the requeued job (the same command) resumes and finishes, and is not requeued.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from audioset_dcls.hub.references import find_checkpoint
from test_train import REPO, _alive, _descendants, free_port
from train_shards import session_shards

FAKE_SRUN = """#!/usr/bin/env bash
# one node: start the task here, as slurmd would on node 0, and report its exit status
while [[ "$1" == --* ]]; do shift; done
SLURM_NODEID=0 SLURM_PROCID=0 "$@" &
echo $! > "$FAKE_SLURM_DIR/step.pid"
wait $!
"""

FAKE_SCANCEL = """#!/usr/bin/env bash
# scancel --signal=SIG JOBID: SLURM signals every process of the job's steps (not the batch shell)
exec {python} - "${{1#--signal=}}" "$(cat "$FAKE_SLURM_DIR/step.pid")" <<'EOF'
import os, signal, sys
from pathlib import Path
sig, root = getattr(signal, "SIG" + sys.argv[1]), int(sys.argv[2])
parent = {{}}
for stat in Path("/proc").glob("[0-9]*/stat"):
    try:
        parent[int(stat.parent.name)] = int(stat.read_text().rsplit(")", 1)[1].split()[1])
    except (OSError, ValueError):
        pass
step, frontier = [root], [root]
while frontier:
    frontier = [p for p, pp in parent.items() if pp in frontier]
    step += frontier
for pid in step:
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass
EOF
"""

FAKE_SCONTROL = """#!/usr/bin/env bash
case "$1" in
  show) echo 127.0.0.1 ;;                                       # show hostnames NODELIST
  requeue) echo "requeue $2" >> "$FAKE_SLURM_DIR/requeued" ;;
  *) exit 1 ;;
esac
"""


def test_slurm_script_checkpoints_on_the_time_limit_signal_and_requeues(tmp_path, tmp_path_factory):
    train_dir, _ = session_shards(tmp_path_factory, 2.0)
    shims = tmp_path / "bin"
    shims.mkdir()
    for name, text in (("srun", FAKE_SRUN), ("scancel", FAKE_SCANCEL.format(python=sys.executable)),
                       ("scontrol", FAKE_SCONTROL)):
        (shims / name).write_text(text)
        (shims / name).chmod(0o755)
    env = dict(os.environ, PATH=f"{shims}:{Path(sys.executable).parent}:{os.environ['PATH']}", FAKE_SLURM_DIR=str(tmp_path),
               SLURM_JOB_ID="4242", SLURM_JOB_NODELIST="node[1]", SLURM_NNODES="1", SLURM_GPUS_ON_NODE="2",
               ACCELERATE_USE_CPU="1", OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    out = tmp_path / "run"
    # 1 epoch of 8 steps (2 ranks x 8 clips), no eval: the least that shows the path
    command = ["bash", "scripts/slurm_train.sh", "configs/tiny.yaml", f"data.train={train_dir}", f"train.output_dir={out}",
               "optim.batch_size=16", "schedule.epochs=1", "schedule.warmup_epochs=0", "train.progress_bar=false",
               "train.log_every_steps=1", "train.tracker=none"]

    job = subprocess.Popen(command, cwd=REPO, env=dict(env, MAIN_PORT=free_port()), stdout=subprocess.PIPE,
                           stderr=subprocess.STDOUT, text=True, start_new_session=True)
    lines = []
    for line in job.stdout:
        lines.append(line)
        if " step 1/8 " in line:
            break
    everyone = [job.pid] + _descendants(job.pid)
    os.kill(job.pid, signal.SIGUSR1)  # what `#SBATCH --signal=B:USR1@300` does
    lines += job.stdout.readlines()
    log = "".join(lines)
    assert job.wait(timeout=300) == 0, log[-3000:]
    assert "[slurm] SIGUSR1: time limit near" in log and "requeueing job 4242" in log, log[-3000:]
    assert (tmp_path / "requeued").read_text() == "requeue 4242\n"
    s = json.loads((out / "summary.json").read_text())
    assert s["stopped_by"] == "SIGUSR1" and not s["finished"] and 1 <= s["step"] < 8, s
    stopped_at = out / "checkpoints" / f"step_{s['step']:08d}"
    assert find_checkpoint(out) == stopped_at
    deadline = time.monotonic() + 30
    while any(_alive(pid) for pid in everyone) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not any(_alive(pid) for pid in everyone), "a process of the stopped job is still running"

    # The requeued job runs the same command: it resumes and, ending normally (here one step
    # later, at train.max_steps), is not requeued again.
    again = subprocess.run(command + [f"train.max_steps={s['step'] + 1}"], cwd=REPO,
                           env=dict(env, MAIN_PORT=free_port(), SLURM_RESTART_COUNT="1"), capture_output=True,
                           text=True, timeout=300)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert f"resumed from {stopped_at}" in again.stdout + again.stderr
    assert json.loads((out / "summary.json").read_text())["step"] == s["step"] + 1
    assert "job 4242 (restart 1)" in again.stdout and "training exited with status 0" in again.stdout
    assert (tmp_path / "requeued").read_text() == "requeue 4242\n"
