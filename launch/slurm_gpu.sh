#!/usr/bin/env bash
# Train on GPUs under SLURM: one process per GPU (srun), process 0's node is the coordinator.
#
#   sbatch --nodes=2 launch/slurm_gpu.sh --config configs/imagenet_var.py:depth=16,data_path=/data/imagenet/train \
#       --workdir /shared/runs/var_d16 --config.tokenizer_checkpoint=/shared/checkpoints/vae_ch160v4096z32
#
# The coordinator address, process count and process id come from SLURM's environment and are passed to
# jax.distributed.initialize via --coordinator_address / --num_processes / --process_id. Each process sees
# its own GPU (CUDA_VISIBLE_DEVICES=$SLURM_LOCALID). --signal=TERM@120 asks SLURM to send SIGTERM two minutes
# before the time limit: the trainer checkpoints and exits; resubmitting the same command resumes.
#SBATCH --job-name=var-jax
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=8
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=12
#SBATCH --time=48:00:00
#SBATCH --signal=TERM@120
set -euo pipefail
COORDINATOR_HOST=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
export COORDINATOR_ADDRESS="$COORDINATOR_HOST:${COORDINATOR_PORT:-12355}"
PYTHON=${PYTHON:-python}

srun --kill-on-bad-exit=1 bash -c '
    export CUDA_VISIBLE_DEVICES=$SLURM_LOCALID
    exec '"$PYTHON"' -m var_jax train --coordinator_address "$COORDINATOR_ADDRESS" \
        --num_processes "$SLURM_NTASKS" --process_id "$SLURM_PROCID" "$@"' bash "$@"
