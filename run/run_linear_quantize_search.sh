#!/usr/bin/env bash
# HAQ search, linear quantization of weights and activations under a latency budget
# (paper sections 4.1-4.2): MobileNet-V2 on ImageNet at 0.6x the all-8-bit latency of the
# BISMO cloud accelerator model; the first layer stays [8, -1] and the last [8, 8].
# Extra arguments override/extend the flags, e.g. energy on BitFusion:
#   bash run/run_linear_quantize_search.sh --cost energy --hardware bitfusion
# Resume a stopped search with the same command plus --resume_search.
set -euo pipefail
cd "$(dirname "$0")/.."
exec "${PYTHON:-python}" rl_quantize.py \
    --arch qmobilenetv2 \
    --dataset imagenet \
    --dataset_root data/imagenet \
    --suffix ratio060 \
    --linear_quantization \
    --cost latency \
    --hardware bismo_cloud \
    --preserve_ratio 0.6 \
    --min_bit 2 \
    --max_bit 8 \
    --float_bit 8 \
    --warmup 20 \
    --train_episode 600 \
    --train_size 20000 \
    --val_size 10000 \
    --data_bsize 128 \
    --n_worker 32 \
    --finetune_epoch 1 \
    --finetune_lr 0.001 \
    --seed 234 \
    "$@"
