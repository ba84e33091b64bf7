#!/bin/bash
# Multi-node pre-training under SLURM: one torchrun per node, one process per GPU, FSDP2.
#
#   sbatch --nodes=4 scripts/slurm_pretrain.sh hpm_vit_base_800ep --set data.path=/data/imagenet
#
# Every node runs the same torchrun command; they meet at a c10d rendezvous hosted on the first node.
# A restarted job (requeue, or torchrun --max-restarts after a failure) runs the same command again and
# --resume auto continues from the newest complete checkpoint in RUN_DIR (work since it is redone).
#
#SBATCH --job-name=ssl-pretrain
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=64
#SBATCH --time=48:00:00
#SBATCH --requeue
#SBATCH --output=%x-%j.out
set -euo pipefail

CONFIG=${1:?usage: sbatch scripts/slurm_pretrain.sh CONFIG [--set key=value ...]}
shift
GPUS_PER_NODE=${GPUS_PER_NODE:-8}
RUN_DIR=${RUN_DIR:-runs/${SLURM_JOB_NAME}-${SLURM_JOB_ID}}
PORT=${RDZV_PORT:-29500}
HEAD_NODE=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)

export OMP_NUM_THREADS=${OMP_NUM_THREADS:-8}
# export NCCL_SOCKET_IFNAME=...   # name the fast interface if the default one is wrong

srun --kill-on-bad-exit=1 python -m torch.distributed.run \
    --nnodes "$SLURM_JOB_NUM_NODES" \
    --nproc-per-node "$GPUS_PER_NODE" \
    --rdzv-backend c10d \
    --rdzv-endpoint "$HEAD_NODE:$PORT" \
    --rdzv-id "$SLURM_JOB_ID" \
    --max-restarts 3 \
    -m sslpt pretrain "$CONFIG" \
    --run-dir "$RUN_DIR" --resume auto \
    --set train.parallel=fsdp \
    "$@"
