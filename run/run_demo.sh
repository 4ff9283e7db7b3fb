#!/usr/bin/env bash
# The whole HAQ pipeline on the embedded default (mnist5k, width-0.5 MobileNet-V2), on the CPU,
# with no downloads:
#   pretrain (if no checkpoint) -> per mode (linear latency on bismo_cloud, K-Means size):
#   DDPG search -> the reward's noise (its best policy replayed) -> the integer program (ILP)
#   -> the best uniform policy within the same budget -> each policy fine-tuned alike
#   -> summary table (markdown + JSON) and plots in $OUT.
# The budgets are tight enough that the policies differ (docs/results.md, "Why the demo and the frontier use these settings").
# Shorter or longer: EPISODES=20 WARMUP=5 FT_EPOCHS=1 bash run/run_demo.sh
set -euo pipefail
cd "$(dirname "$0")/.."
bash run/setup.sh

OUT=${OUT:-outputs/demo}
EPISODES=${EPISODES:-60}        # search episodes per mode
WARMUP=${WARMUP:-12}            # of which random (warmup) episodes
FT_EPOCHS=${FT_EPOCHS:-2}       # fine-tune epochs of each policy
LINEAR_RATIO=${LINEAR_RATIO:-0.22}
KMEANS_RATIO=${KMEANS_RATIO:-0.07}
REPLAYS=${REPLAYS:-5}           # evaluations of the searched policy: the reward's noise
source run/embedded_settings.sh

start=$(date +%s)
mkdir -p "$OUT"
ensure_pretrained

search() {  # mode extra-flags...
    local mode=$1; shift
    rm -rf "$OUT/${mode}_search" "$OUT/${mode}_noise" "$OUT/${mode}_ilp_search"
    echo "== $mode search ($EPISODES episodes, $WARMUP warmup)"
    local haq ilp
    haq=$("$PY" rl_quantize.py "${SEARCH_DATA[@]}" --train_episode "$EPISODES" \
        --warmup "$WARMUP" --output "$OUT/${mode}_search" "${DDPG[@]}" "$@")
    echo "== $mode: the searched policy evaluated $REPLAYS times more (the reward's noise)"
    "$PY" rl_quantize.py "${SEARCH_DATA[@]}" --train_episode "$REPLAYS" \
        --output "$OUT/${mode}_noise" "$@" --method replay --policy "$haq" > /dev/null
    echo "== $mode: sensitivity + integer program within the same budget"
    ilp=$("$PY" rl_quantize.py "${SEARCH_DATA[@]}" --output "$OUT/${mode}_ilp_search" "$@" \
        --method ilp)
    echo "== $mode: best uniform policy within the same budget"
    "$PY" -m lib.report uniform "$haq" "$OUT/${mode}_uniform.json"
    for name in haq ilp uniform; do
        local strategy=$haq
        [ "$name" = ilp ] && strategy=$ilp
        [ "$name" = uniform ] && strategy=$OUT/${mode}_uniform.json
        echo "== $mode: fine-tuning the $name policy ($FT_EPOCHS epochs)"
        "$PY" finetune.py --strategy "$strategy" "${FT[@]}" -c "$OUT/${mode}_${name}"
    done
}

# shellcheck disable=SC2046
search linear $(mode_flags linear) --preserve_ratio "$LINEAR_RATIO"
# shellcheck disable=SC2046
search kmeans $(mode_flags kmeans) --preserve_ratio "$KMEANS_RATIO"

echo "== summary"
"$PY" -m lib.report report "$OUT"
echo "== demo finished in $(( $(date +%s) - start ))s; results in $OUT (summary.md, summary.json, *.png)"
