#!/usr/bin/env bash
# Evaluate a K-Means-quantized ResNet-50 on the ImageNet validation split.
#
#   bash run/run_kmeans_quantize_eval.sh [CHECKPOINT] [finetune.py args...]
#
# CHECKPOINT (default checkpoints/resnet50_kmeans_0.1/model_best.pth.tar) is either a
# finetune.py checkpoint (it records arch, policy and codebooks; nothing else is needed) or
# other already-quantized weights, e.g. the released resnet50_0.1_75.48.pth.tar, evaluated
# under the published 10% policy.
set -euo pipefail
cd "$(dirname "$0")/.."
CKPT=${1:-checkpoints/resnet50_kmeans_0.1/model_best.pth.tar}
shift || true
exec "${PYTHON:-python}" finetune.py \
    --evaluate \
    --resume "$CKPT" \
    -a resnet50 \
    --strategy "${STRATEGY:-resnet50_kmeans_0.1}" \
    --data_name imagenet \
    -d "${DATA:-data/imagenet}" \
    --test_batch 512 \
    --workers 32 \
    "$@"
