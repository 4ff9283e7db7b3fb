#!/usr/bin/env bash
# K-Means fine-tuning with the paper's settings: ResNet-50 at 10% of the fp32 size
# (published policy, 75.48% top-1 after fine-tuning vs 76.15% fp32), 100 epochs, lr 0.01 cosine,
# batch 256, layers above 6 bits free until the last epoch.
#
#   bash run/run_kmeans_quantize_finetune.sh                          # 1 process (GPU if any)
#   NPROC=4 bash run/run_kmeans_quantize_finetune.sh                  # torchrun, 4 GPUs
#   STRATEGY=save/resnet50_kmeans/strategy.json bash run/run_kmeans_quantize_finetune.sh
#
# The paper's ResNet-50 is torchvision's IMAGENET1K_V1 (76.15% top-1); WEIGHTS=PATH takes a file.
# Extra arguments go to finetune.py (they override the ones here).
set -euo pipefail
cd "$(dirname "$0")/.."
NPROC=${NPROC:-1}
DATA=${DATA:-data/imagenet}
STRATEGY=${STRATEGY:-resnet50_kmeans_0.1}
OUT=${OUT:-checkpoints/resnet50_kmeans_0.1}
BATCH=$((256 / NPROC))   # --train_batch is per process; the paper's 256 in total
source run/launch.sh   # LAUNCH: python, or torchrun when NPROC > 1
exec "${LAUNCH[@]}" finetune.py \
    -a resnet50 \
    --data_name imagenet \
    -d "$DATA" \
    --strategy "$STRATEGY" \
    -c "$OUT" \
    --epochs 100 \
    --lr 0.01 \
    --lr_type cos \
    --wd 1e-5 \
    --train_batch "$BATCH" \
    --test_batch 512 \
    --workers 32 \
    --pretrained \
    --free_high_bit \
    --weights "${WEIGHTS:-IMAGENET1K_V1}" \
    "$@"
