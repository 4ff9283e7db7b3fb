#!/usr/bin/env bash
# Accuracy against cost on the embedded default (docs/design.md section 14): for both modes, the
# uniform policy at every bit width, and at each budget DDPG, random search (same episodes) and the
# integer program, every policy fine-tuned exactly as the demo does; plus the reward's noise (the
# best random policy replayed). Writes $OUT/frontier.{png,md,json} and $OUT/learning.png.
#   bash run/run_frontier.sh                 # 2 budgets per mode, 3 seeds (about 1 h on 2 cores)
#   QUICK=1 bash run/run_frontier.sh         # 1 budget per mode, 1 seed (under 15 min)
#   SEEDS="0 1" LINEAR_BUDGETS="0.25" KMEANS_BUDGETS="0.08" bash run/run_frontier.sh
# A rerun skips every search and fine-tune whose results are already there (delete $OUT to redo).
set -euo pipefail
cd "$(dirname "$0")/.."
bash run/setup.sh

QUICK=${QUICK:-0}
OUT=${OUT:-outputs/frontier}
EPISODES=${EPISODES:-60}
WARMUP=${WARMUP:-12}
FT_EPOCHS=${FT_EPOCHS:-2}
REPLAYS=${REPLAYS:-5}
if [ "$QUICK" = 1 ]; then
    SEEDS=${SEEDS:-"0"}
    LINEAR_BUDGETS=${LINEAR_BUDGETS:-"0.22"}
    KMEANS_BUDGETS=${KMEANS_BUDGETS:-"0.07"}
    LINEAR_UNIFORM=${LINEAR_UNIFORM:-"3 4 5"}
    KMEANS_UNIFORM=${KMEANS_UNIFORM:-"2 3 4"}
else
    SEEDS=${SEEDS:-"0 1 2"}
    LINEAR_BUDGETS=${LINEAR_BUDGETS:-"0.22 0.3"}
    KMEANS_BUDGETS=${KMEANS_BUDGETS:-"0.07 0.1"}
    LINEAR_UNIFORM=${LINEAR_UNIFORM:-"3 4 5 6 7 8"}
    KMEANS_UNIFORM=${KMEANS_UNIFORM:-"2 3 4 5 6 7 8"}
fi
source run/embedded_settings.sh
SEARCH_DATA+=(--train_episode "$EPISODES" --warmup "$WARMUP")

start=$(date +%s)
mkdir -p "$OUT"
ensure_pretrained

search() {  # mode budget name extra-flags... ; leaves the strategy path in $dir.strategy
    local mode=$1 budget=$2 name=$3; shift 3
    local dir=$OUT/$mode/b$budget/$name
    if [ ! -s "$dir.strategy" ]; then
        rm -rf "$dir"
        echo "== $mode <= $budget: $name"
        # shellcheck disable=SC2046
        "$PY" rl_quantize.py $(mode_flags "$mode") "${SEARCH_DATA[@]}" --preserve_ratio "$budget" \
            --output "$dir" "$@" > "$dir.strategy.tmp" 2> "$dir.log"
        mv "$dir.strategy.tmp" "$dir.strategy"
        grep "best:" "$dir.log" | cut -c1-110
    fi
}

finetune() {  # strategy.json output-folder
    if [ ! -f "$2/results.json" ]; then
        "$PY" finetune.py --strategy "$1" "${FT[@]}" -c "$2" 2> "$2.log" > /dev/null
        tail -n 1 "$2.log" | cut -c1-110
    fi
}

for mode in linear kmeans; do
    budgets=$LINEAR_BUDGETS; widths=$LINEAR_UNIFORM
    [ "$mode" = kmeans ] && budgets=$KMEANS_BUDGETS && widths=$KMEANS_UNIFORM
    for budget in $budgets; do
        mkdir -p "$OUT/$mode/b$budget"
        search "$mode" "$budget" ilp --method ilp
        for seed in $SEEDS; do
            search "$mode" "$budget" "ddpg_s$seed" --method ddpg --seed "$seed" "${DDPG[@]}"
            search "$mode" "$budget" "random_s$seed" --method random --seed "$seed"
        done
        # The reward's noise: the first seed's best random policy, evaluated $REPLAYS times.
        first=$(echo "$SEEDS" | awk '{print $1}')
        search "$mode" "$budget" noise --method replay --train_episode "$REPLAYS" \
            --policy "$(cat "$OUT/$mode/b$budget/random_s$first.strategy")"
        for run in "$OUT/$mode/b$budget"/*.strategy; do
            name=$(basename "$run" .strategy)
            [ "$name" = noise ] || finetune "$(cat "$run")" "$OUT/$mode/b$budget/${name}_ft"
        done
    done
    template=$(cat "$OUT/$mode/b$(echo "$budgets" | awk '{print $1}')/ilp.strategy")
    mkdir -p "$OUT/$mode/uniform"
    for bits in $widths; do
        u=$OUT/$mode/uniform/w$bits
        [ -f "$u.json" ] || "$PY" -m lib.report uniform "$template" "$u.json" --bits "$bits" 2> "$u.log"
        echo "== $mode: uniform $bits bits"
        finetune "$u.json" "${u}_ft"
    done
done

echo "== frontier"
"$PY" -m lib.report frontier "$OUT" --warmup "$WARMUP"
echo "== frontier finished in $(( $(date +%s) - start ))s; results in $OUT (frontier.md, frontier.png)"
