#!/usr/bin/env bash
# The whole HAQ pipeline on the embedded default (mnist5k, width-0.5 MobileNet-V2), on the CPU,
# with no downloads:
#   pretrain (if no checkpoint) -> per mode (linear latency on bismo_cloud, K-Means size):
#   DDPG search -> the reward's noise (its best policy replayed) -> the integer program (ILP)
#   -> the best uniform policy within the same budget -> each policy fine-tuned alike
#   -> summary table (markdown + JSON) and plots in $OUT.
# The budgets are tight enough that the policies differ (README, "Demo settings").
# Shorter or longer: EPISODES=20 WARMUP=5 FT_EPOCHS=1 bash run/run_demo.sh
set -euo pipefail
cd "$(dirname "$0")/.."
bash run/setup.sh

OUT=${OUT:-outputs/demo}
EPISODES=${EPISODES:-40}        # search episodes per mode
WARMUP=${WARMUP:-12}            # of which random (warmup) episodes
FT_EPOCHS=${FT_EPOCHS:-2}       # fine-tune epochs of each policy
LINEAR_RATIO=${LINEAR_RATIO:-0.22}
KMEANS_RATIO=${KMEANS_RATIO:-0.07}
REPLAYS=${REPLAYS:-5}           # evaluations of the searched policy: the reward's noise
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-2}
PY=${PYTHON:-python}
CKPT=checkpoints/pretrained/mobilenetv2_mnist5k.pth.tar
SEARCH_DATA=(--dataset mnist5k --train_size 600 --val_size 500 --data_bsize 100 --n_worker 0)
FT=(--epochs "$FT_EPOCHS" --train_batch 64 --test_batch 500 --lr 0.01 --device cpu --no-progress
    --overwrite)   # a rerun replaces the previous demo's fine-tunes

start=$(date +%s)
mkdir -p "$OUT"
if [ ! -f "$CKPT" ]; then
    echo "== pretraining the embedded MobileNet-V2 (no checkpoint at $CKPT)"
    "$PY" pretrain.py --arch mobilenetv2 --dataset mnist5k --no-progress
fi

search() {  # mode arch extra-flags...
    local mode=$1 arch=$2; shift 2
    rm -rf "$OUT/${mode}_search" "$OUT/${mode}_noise" "$OUT/${mode}_ilp_search"
    echo "== $mode search ($EPISODES episodes, $WARMUP warmup)"
    local haq ilp
    haq=$("$PY" rl_quantize.py --arch "$arch" "${SEARCH_DATA[@]}" --train_episode "$EPISODES" \
        --warmup "$WARMUP" --device cpu --output "$OUT/${mode}_search" "$@")
    echo "== $mode: the searched policy evaluated $REPLAYS times more (the reward's noise)"
    "$PY" rl_quantize.py --arch "$arch" "${SEARCH_DATA[@]}" --train_episode "$REPLAYS" \
        --device cpu --output "$OUT/${mode}_noise" "$@" --method replay --policy "$haq" > /dev/null
    echo "== $mode: sensitivity + integer program within the same budget"
    ilp=$("$PY" rl_quantize.py --arch "$arch" "${SEARCH_DATA[@]}" --device cpu \
        --output "$OUT/${mode}_ilp_search" "$@" --method ilp)
    echo "== $mode: best uniform policy within the same budget"
    "$PY" -m lib.env.summary uniform "$haq" "$OUT/${mode}_uniform.json"
    for name in haq ilp uniform; do
        local strategy=$haq
        [ "$name" = ilp ] && strategy=$ilp
        [ "$name" = uniform ] && strategy=$OUT/${mode}_uniform.json
        echo "== $mode: fine-tuning the $name policy ($FT_EPOCHS epochs)"
        "$PY" finetune.py --strategy "$strategy" "${FT[@]}" --eval_fp32 -c "$OUT/${mode}_${name}"
    done
}

search linear qmobilenetv2 --linear_quantization --cost latency --hardware bismo_cloud \
    --preserve_ratio "$LINEAR_RATIO" --min_bit 3
search kmeans mobilenetv2 --cost size --preserve_ratio "$KMEANS_RATIO" --min_bit 2 --reuse_codebooks

echo "== summary"
"$PY" -m lib.env.summary report "$OUT"
echo "== demo finished in $(( $(date +%s) - start ))s; results in $OUT (summary.md, summary.json, *.png)"
