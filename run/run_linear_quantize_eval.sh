#!/usr/bin/env bash
# Evaluate a linear-quantized MobileNet-V2 on the ImageNet validation split.
#
#   bash run/run_linear_quantize_eval.sh [CHECKPOINT] [finetune.py args...]
#
# CHECKPOINT (default checkpoints/qmobilenetv2_linear_0.6/model_best.pth.tar) is either a
# finetune.py checkpoint (it records arch, policy and ranges; nothing else is needed) or
# other Q-model weights, e.g. the released qmobilenetv2_0.6_71.23.pth.tar, evaluated under the
# published 0.6 latency policy.
set -euo pipefail
cd "$(dirname "$0")/.."
CKPT=${1:-checkpoints/qmobilenetv2_linear_0.6/model_best.pth.tar}
shift || true
exec "${PYTHON:-python}" finetune.py \
    --evaluate \
    --resume "$CKPT" \
    -a qmobilenetv2 \
    --linear_quantization \
    --strategy "${STRATEGY:-mobilenetv2_linear_0.6}" \
    --data_name imagenet \
    -d "${DATA:-data/imagenet}" \
    --test_batch 512 \
    --workers 32 \
    "$@"
