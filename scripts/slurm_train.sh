#!/usr/bin/env bash
# Multi-node training on SLURM: one `accelerate launch` per node, each starting one process per GPU.
#
#   sbatch --nodes 4 scripts/slurm_train.sh configs/convnext_tiny_dcls.yaml \
#       data.train=/shared/shards/train data.eval=/shared/shards/eval
#
# Every run passes --resume, so the job continues from its latest checkpoint. Five minutes before
# the time limit SLURM sends this script SIGUSR1 (--signal below); it passes the signal to every
# process of the training step, each rank finishes its optimizer step, one checkpoint is written
# and the ranks exit with status 75; the script then requeues the job (same job id, same
# command), which resumes. Preemption (SIGTERM to everything) takes the same path. A failure
# (any other exit) is not requeued. train.output_dir (default runs/<model>) must be on a file
# system every node can write to: all ranks write their RNG state into the checkpoint directory.
#SBATCH --job-name=audioset-dcls
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=64
#SBATCH --time=48:00:00
#SBATCH --requeue
#SBATCH --signal=B:USR1@300
#SBATCH --open-mode=append
#SBATCH --output=%x-%j.out
set -uo pipefail

config=${1:?usage: sbatch --nodes N scripts/slurm_train.sh CONFIG [key=value ...]}
shift
gpus_per_node=${SLURM_GPUS_ON_NODE:-8}
nodes=${SLURM_NNODES:-1}
main_addr=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
main_port=${MAIN_PORT:-29500}
# Leave a few cores per GPU to the data loader workers (data.num_workers per process).
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-4}
# accelerate launch runs torchrun's agent: make it pass SIGUSR1 on to the ranks (by default it
# dies of it and leaves them running), and give them time to finish the step and write the
# checkpoint before it kills them (its default is 30 s; keep this under the --signal lead above).
export PET_SIGNALS_TO_HANDLE=${PET_SIGNALS_TO_HANDLE:-SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1}
export TORCH_ELASTIC_SHUTDOWN_TIMEOUT=${TORCH_ELASTIC_SHUTDOWN_TIMEOUT:-270}

stop_signal=""
# --signal=B:USR1 reaches this shell only: pass it to the training step (not to this shell).
trap 'stop_signal=USR1; echo "[slurm] SIGUSR1: time limit near, the ranks checkpoint and stop"; scancel --signal=USR1 "$SLURM_JOB_ID"' USR1
# Preemption and scancel signal every process, this shell included: keep going to requeue.
trap 'stop_signal=TERM; echo "[slurm] SIGTERM: the ranks checkpoint and stop"' TERM

echo "[slurm] job $SLURM_JOB_ID (restart ${SLURM_RESTART_COUNT:-0}) on $nodes node(s) x $gpus_per_node GPU(s)"
# srun starts one task per node; each task's accelerate launch gets that node's rank. `exec`:
# no shell between srun and the launcher to die of a signal meant for the ranks.
srun --kill-on-bad-exit=1 bash -c "
  exec accelerate launch \
    --multi_gpu \
    --num_machines $nodes \
    --num_processes $((nodes * gpus_per_node)) \
    --machine_rank \$SLURM_NODEID \
    --main_process_ip $main_addr \
    --main_process_port $main_port \
    --mixed_precision no \
    --dynamo_backend no \
    train.py --config $config --resume $*
" &
step=$!
# A trapped signal interrupts `wait` (status > 128) while srun runs on: wait until it is gone.
while :; do
  wait "$step"
  status=$?
  kill -0 "$step" 2>/dev/null || break
done

# 75: the ranks stopped on a signal with a checkpoint (train.py). Through accelerate launch the
# step reports 1 instead, so a stop this script passed on counts as well; a run that finished
# exits 0 and is never requeued.
if [ "$status" -eq 75 ] || { [ -n "$stop_signal" ] && [ "$status" -ne 0 ]; }; then
  echo "[slurm] stopped with a checkpoint (exit status $status): requeueing job $SLURM_JOB_ID to resume"
  scontrol requeue "$SLURM_JOB_ID"
  exit 0
fi
echo "[slurm] training exited with status $status"
exit "$status"
