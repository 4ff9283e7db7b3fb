#!/usr/bin/env bash
# Full-precision MobileNet-V2 with the released recipe (mit-han-lab/haq run/run_pretrain.sh):
# 150 epochs, lr 0.05 cosine (per iteration here), weight decay 4e-5, batch 256 in total,
# mixed precision, plain momentum SGD, no warmup, label smoothing or weight averaging. The paper's MobileNet-V2
# (72.05% top-1 on ImageNet) is the release's 150-epoch checkpoint (mobilenetv2-150.pth.tar);
# the linear search needs the same recipe on ImageNet-100.
#
#   bash run/run_pretrain.sh imagenet        # -> checkpoints/pretrained/mobilenetv2.pth.tar
#   bash run/run_pretrain.sh imagenet100     # -> checkpoints/pretrained/mobilenetv2_imagenet100.pth.tar
#   NPROC=8 bash run/run_pretrain.sh imagenet               # torchrun, 8 GPUs (256 / 8 per GPU)
#   DATA=/data/imagenet OUT=ckpt.pth.tar bash run/run_pretrain.sh imagenet --resume
#
# Extra arguments go to pretrain.py (they override the ones here).
set -euo pipefail
cd "$(dirname "$0")/.."
DATASET=${1:-}
case "$DATASET" in
    imagenet|imagenet100) shift ;;
    *) echo "error: run_pretrain.sh: expected imagenet or imagenet100 as the first argument (got '${DATASET}')" >&2
       exit 2 ;;
esac
NPROC=${NPROC:-1}
DATA=${DATA:-data/$DATASET}
OUT=${OUT:-$("${PYTHON:-python}" -c "from models import default_pretrained_path as p; print(p('mobilenetv2', '$DATASET'))")}
BATCH=$((256 / NPROC))   # --batch_size is per process; the released 256 in total
source run/launch.sh   # LAUNCH: python, or torchrun when NPROC > 1
exec "${LAUNCH[@]}" pretrain.py \
    --arch mobilenetv2 \
    --dataset "$DATASET" \
    --dataset_root "$DATA" \
    --output "$OUT" \
    --epochs 150 \
    --lr 0.05 \
    --lr_type cos \
    --wd 4e-5 \
    --momentum 0.9 \
    --no-nesterov \
    --batch_size "$BATCH" \
    --warmup_epochs 0 \
    --label_smoothing 0 \
    --ema_decay 0 \
    --workers 32 \
    --half \
    --half_type O1 \
    "$@"
