#!/usr/bin/env bash
# Multi-node training on SLURM: one `accelerate launch` per node, each starting one process per GPU.
#
#   sbatch --nodes 4 scripts/slurm_train.sh configs/convnext_tiny_dcls.yaml \
#       data.train=/shared/shards/train data.eval=/shared/shards/eval
#
# Resubmitting the same command continues the run from its latest checkpoint (--resume), so the
# job can be requeued or split into several time-limited jobs. train.output_dir (default
# runs/<model>) must be on a file system every node can write to: all ranks write their RNG state
# into the checkpoint directory.
#SBATCH --job-name=audioset-dcls
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=64
#SBATCH --time=48:00:00
#SBATCH --requeue
#SBATCH --output=%x-%j.out
set -euo pipefail

config=${1:?usage: sbatch --nodes N scripts/slurm_train.sh CONFIG [key=value ...]}
shift
gpus_per_node=${SLURM_GPUS_ON_NODE:-8}
nodes=${SLURM_NNODES:-1}
main_addr=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
main_port=${MAIN_PORT:-29500}
# Leave a few cores per GPU to the data loader workers (data.num_workers per process).
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-4}

# srun starts one task per node; each task's accelerate launch gets that node's rank.
srun --kill-on-bad-exit=1 bash -c "
  accelerate launch \
    --multi_gpu \
    --num_machines $nodes \
    --num_processes $((nodes * gpus_per_node)) \
    --machine_rank \$SLURM_NODEID \
    --main_process_ip $main_addr \
    --main_process_port $main_port \
    --mixed_precision no \
    --dynamo_backend no \
    train.py --config $config --resume $*
"
