#!/usr/bin/env bash
# HAQ search, K-Means weight sharing under a model-size budget (paper section 4.3):
# ResNet-50 on ImageNet at 10% of the fp32 size, the released settings.
# Extra arguments override/extend the flags, e.g.
#   bash run/run_kmeans_quantize_search.sh --dataset mnist5k --arch mobilenetv2 --train_episode 40
# The paper's ResNet-50 is torchvision's IMAGENET1K_V1 (76.15% top-1); WEIGHTS=PATH takes a file.
# Resume a stopped search with the same command plus --resume_search.
set -euo pipefail
cd "$(dirname "$0")/.."
NPROC=${NPROC:-1}   # torchrun processes (--data_bsize is the global batch)
source run/launch.sh   # LAUNCH: python, or torchrun when NPROC > 1
exec "${LAUNCH[@]}" rl_quantize.py \
    --arch resnet50 \
    --dataset imagenet \
    --dataset_root data/imagenet \
    --suffix ratio010 \
    --preserve_ratio 0.1 \
    --cost size \
    --min_bit 1 \
    --max_bit 8 \
    --float_bit 32 \
    --warmup 20 \
    --train_episode 600 \
    --train_size 20000 \
    --val_size 10000 \
    --data_bsize 256 \
    --n_worker 32 \
    --finetune_epoch 1 \
    --finetune_lr 0.001 \
    --seed 234 \
    --weights "${WEIGHTS:-IMAGENET1K_V1}" \
    "$@"
