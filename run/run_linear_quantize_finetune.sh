#!/usr/bin/env bash
# Linear (weights + activations) quantization-aware fine-tuning with the paper's settings:
# MobileNet-V2 at 0.6x the 8-bit latency (published policy, 71.23% top-1 after fine-tuning vs
# 72.05% fp32), 30 epochs, lr 0.01 cosine, weight decay 4e-5, batch 256.
#
#   bash run/run_linear_quantize_finetune.sh                          # 1 process (GPU if any)
#   NPROC=4 bash run/run_linear_quantize_finetune.sh                  # torchrun, 4 GPUs
#   STRATEGY=save/qmobilenetv2_linear/strategy.json bash run/run_linear_quantize_finetune.sh
#
# Starts from checkpoints/pretrained/mobilenetv2.pth.tar: the released mobilenetv2-150.pth.tar,
# or run/run_pretrain.sh imagenet. --kl_max_bit 4: the released calibration.
# Extra arguments go to finetune.py (they override the ones here).
set -euo pipefail
cd "$(dirname "$0")/.."
NPROC=${NPROC:-1}
DATA=${DATA:-data/imagenet}
STRATEGY=${STRATEGY:-mobilenetv2_linear_0.6}
OUT=${OUT:-checkpoints/qmobilenetv2_linear_0.6}
BATCH=$((256 / NPROC))   # --train_batch is per process; the paper's 256 in total
source run/launch.sh   # LAUNCH: python, or torchrun when NPROC > 1
exec "${LAUNCH[@]}" finetune.py \
    -a qmobilenetv2 \
    --linear_quantization \
    --data_name imagenet \
    -d "$DATA" \
    --strategy "$STRATEGY" \
    -c "$OUT" \
    --epochs 30 \
    --lr 0.01 \
    --lr_type cos \
    --wd 4e-5 \
    --train_batch "$BATCH" \
    --test_batch 512 \
    --workers 32 \
    --pretrained \
    --kl_max_bit 4 \
    "$@"
