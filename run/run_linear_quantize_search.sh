#!/usr/bin/env bash
# HAQ search, linear quantization of weights and activations under a latency budget
# (paper sections 4.1-4.2), with the released settings: MobileNet-V2 searched on ImageNet-100
# (make it with `python -m lib.utils.make_data`) at 0.556x the all-8-bit latency, bits 2..8
# (hence the released suffix ratio0556bit28); the first layer stays [8, -1] and the last [8, 8].
# The released policy (preset mobilenetv2_linear_0.6, "0.6x latency" in the paper) came from
# this search on the released bit-serial cloud latency table (batch 16); to search on that
# table instead of our bismo_cloud model, add
#   --cost_table <released>/lib/simulator/lookup_tables/qmobilenetv2_imagenet100_batch16_latency_table.npy
# Needs a 100-class MobileNet-V2 at checkpoints/pretrained/mobilenetv2_imagenet100.pth.tar
# (python pretrain.py --arch mobilenetv2 --dataset imagenet100) or --pretrained_path.
# Extra arguments override/extend the flags, e.g. energy on BitFusion:
#   bash run/run_linear_quantize_search.sh --cost energy --hardware bitfusion
# --kl_max_bit 4: the released calibration (divergence clip below 5 bits), recorded in
# strategy.json for the fine-tune.
# Resume a stopped search with the same command plus --resume_search.
set -euo pipefail
cd "$(dirname "$0")/.."
NPROC=${NPROC:-1}   # torchrun processes (--data_bsize is the global batch)
source run/launch.sh   # LAUNCH: python, or torchrun when NPROC > 1
exec "${LAUNCH[@]}" rl_quantize.py \
    --arch qmobilenetv2 \
    --dataset imagenet100 \
    --dataset_root data/imagenet100 \
    --suffix ratio0556bit28 \
    --linear_quantization \
    --cost latency \
    --hardware bismo_cloud \
    --cost_batch 16 \
    --preserve_ratio 0.556 \
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
    --kl_max_bit 4 \
    "$@"
