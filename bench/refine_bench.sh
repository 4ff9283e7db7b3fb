#!/usr/bin/env bash
# The integer program's policy against its measured refinement (--refine N) on the embedded
# default, under a weights-size budget with 8-bit activations (issue 34's setting), one thread:
# for each budget, top-1 on the mnist5k test split right after quantization (finetune.py -e),
# the allocation time (rl_quantize.py's "search time": scores + solve [+ refinement] + one
# evaluated episode) and top-1 after the demo's 2-epoch fine-tune (docs/results.md).
#   bash bench/refine_bench.sh                          # budgets 0.5 0.375, --refine 0 and 200
#   BUDGETS=0.375 REFINES="0 400" FT_EPOCHS=0 bash bench/refine_bench.sh
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-outputs/refine_bench}
BUDGETS=${BUDGETS:-"0.5 0.375"}
REFINES=${REFINES:-"0 200"}
FT_EPOCHS=${FT_EPOCHS:-2}
export OMP_NUM_THREADS=1
PY=${PYTHON:-python}
SEARCH=(--arch qmobilenetv2 --dataset mnist5k --linear_quantization --cost size --min_bit 2
        --min_bit_a 8 --max_bit_a 8 --method ilp --finetune_flag False --threads 1
        --train_size 600 --val_size 500 --data_bsize 100 --n_worker 0 --device cpu)
FT=(--test_batch 500 --device cpu --no-progress)
mkdir -p "$OUT"
echo -e "budget\trefine\tsearch_s\tquantized_top1\tfinetuned_top1\tcost_ratio" > "$OUT/table.tsv"
for budget in $BUDGETS; do
    for refine in $REFINES; do
        name="b${budget}_r${refine}"
        rm -rf "${OUT:?}/$name" "$OUT/${name}_ft"
        "$PY" rl_quantize.py "${SEARCH[@]}" --preserve_ratio "$budget" --refine "$refine" \
            --output "$OUT/$name" > "$OUT/$name.path" 2> "$OUT/$name.log"
        strategy=$(cat "$OUT/$name.path")
        seconds=$(grep -o "search time [0-9.]*" "$OUT/$name.log" | tail -n 1 | awk '{print $3}')
        ratio=$("$PY" -c "import json,sys; print(json.load(open(sys.argv[1]))['cost_ratio'])" "$strategy")
        quant=$("$PY" finetune.py --strategy "$strategy" -e "${FT[@]}" 2>&1 \
            | grep -o "evaluate: top1 [0-9.]*" | tail -n 1 | awk '{print $3}')
        tuned=-
        if [ "$FT_EPOCHS" -gt 0 ]; then
            "$PY" finetune.py --strategy "$strategy" --epochs "$FT_EPOCHS" --train_batch 64 \
                --lr 0.01 "${FT[@]}" -c "$OUT/${name}_ft" > /dev/null 2> "$OUT/${name}_ft.log"
            tuned=$("$PY" -c "import json,sys; print(json.load(open(sys.argv[1]))['best_top1'])" \
                "$OUT/${name}_ft/results.json")
        fi
        echo -e "$budget\t$refine\t$seconds\t$quant\t$tuned\t$ratio" | tee -a "$OUT/table.tsv"
    done
done
