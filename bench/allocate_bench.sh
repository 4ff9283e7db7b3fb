#!/usr/bin/env bash
# Wall time of --method ilp (scores + solve + one evaluated episode) against one DDPG search with
# the demo's settings (run/run_demo.sh), measured one after the other in one run on the same
# machine, for both modes; then the demo's fine-tune of each method's policy (docs/design.md, allocators).
# Two ratios: the whole process (start-up, data, model and the original-accuracy pass included,
# which every method pays alike) and the method's own time (rl_quantize.py's "search time" line:
# ilp's scores + solve + episode against DDPG's episodes).
#   bash bench/allocate_bench.sh                    # both modes, 40 DDPG episodes, 2 fine-tune epochs
#   MODES=kmeans METHODS="ddpg ilp ilp:hessian random" FT_EPOCHS=0 bash bench/allocate_bench.sh
# A method entry "ilp:hessian" runs --method ilp --sensitivity hessian.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-outputs/allocate_bench}
MODES=${MODES:-"linear kmeans"}
EPISODES=${EPISODES:-40}
WARMUP=${WARMUP:-12}
FT_EPOCHS=${FT_EPOCHS:-2}
METHODS=${METHODS:-"ddpg ilp ilp:hessian"}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-2}
PY=${PYTHON:-python}
SEARCH_DATA=(--dataset mnist5k --train_size 600 --val_size 500 --data_bsize 100 --n_worker 0)
FT=(--epochs "$FT_EPOCHS" --train_batch 64 --test_batch 500 --lr 0.01 --device cpu --no-progress)
mkdir -p "$OUT"
TIMES="$OUT/times.tsv"
echo -e "mode\tmethod\tseconds" > "$TIMES"

flags() {  # mode -> the demo's search flags of that mode
    if [ "$1" = linear ]; then
        echo "--arch qmobilenetv2 --linear_quantization --cost latency --hardware bismo_cloud --preserve_ratio 0.5 --min_bit 3"
    else
        echo "--arch mobilenetv2 --cost size --preserve_ratio 0.1 --min_bit 2"
    fi
}

for mode in $MODES; do
    for entry in $METHODS; do
        method=${entry%%:*}
        sens=loss
        [ "$entry" != "$method" ] && sens=${entry#*:}
        name=${entry/:/_}
        dir="$OUT/${mode}_${name}"
        rm -rf "$dir" "${dir}_ft"   # finetune.py refuses a -c folder holding results
        echo "== $mode: --method $method --sensitivity $sens"
        start=$(date +%s.%N)
        # shellcheck disable=SC2046
        "$PY" rl_quantize.py $(flags "$mode") "${SEARCH_DATA[@]}" --train_episode "$EPISODES" \
            --warmup "$WARMUP" --device cpu --output "$dir" --method "$method" --sensitivity "$sens" \
            > "$dir.strategy_path" 2> "$dir.log"
        end=$(date +%s.%N)
        echo -e "$mode\t$name\t$(echo "$end - $start" | bc)" >> "$TIMES"
        tail -n 2 "$dir.log"
    done
done

if [ "$FT_EPOCHS" -gt 0 ]; then
    for mode in $MODES; do
        for entry in $METHODS; do
            name=${entry/:/_}
            echo "== $mode: fine-tuning the $name policy ($FT_EPOCHS epochs)"
            "$PY" finetune.py --strategy "$(cat "$OUT/${mode}_${name}.strategy_path")" "${FT[@]}" \
                -c "$OUT/${mode}_${name}_ft" 2> "$OUT/${mode}_${name}_ft.log" > /dev/null
            tail -n 1 "$OUT/${mode}_${name}_ft.log"
        done
    done
fi

"$PY" - "$OUT" $MODES <<'PYEOF'
import json, os, sys
out, modes = sys.argv[1], sys.argv[2:]
times = {}
with open(os.path.join(out, "times.tsv")) as f:
    for line in f.read().splitlines()[1:]:
        mode, method, sec = line.split("\t")
        times[(mode, method)] = float(sec)
def search_seconds(mode, method):
    """The method's own time, from rl_quantize.py's last "search time" log line."""
    found = None
    with open(os.path.join(out, f"{mode}_{method}.log")) as f:
        for line in f:
            if "search time " in line:
                found = float(line.split("search time ")[1].split("s")[0])
    return found

print("| mode | method | wall (s) | search time (s) | short fine-tune top-1 (%) | cost ratio | "
      "fine-tuned top-1 (%) |")
print("|---|---|---|---|---|---|---|")
for mode in modes:
    for method in ("ddpg", "ilp", "ilp_hessian", "random"):
        if (mode, method) not in times:
            continue
        with open(open(os.path.join(out, f"{mode}_{method}.strategy_path")).read().strip()) as f:
            s = json.load(f)
        res = os.path.join(out, f"{mode}_{method}_ft", "results.json")
        ft = json.load(open(res))["best_top1"] if os.path.isfile(res) else None
        print(f"| {mode} | {method} | {times[(mode, method)]:.1f} | "
              f"{search_seconds(mode, method):.1f} | {s['accuracy']:.2f} | "
              f"{s['cost_ratio']:.4f} | {'-' if ft is None else f'{ft:.2f}'} |")
    for ilp in ("ilp", "ilp_hessian"):
        if (mode, "ddpg") in times and (mode, ilp) in times:
            print(f"{mode}: DDPG / {ilp}: whole process "
                  f"{times[(mode, 'ddpg')] / times[(mode, ilp)]:.1f}x, search time "
                  f"{search_seconds(mode, 'ddpg') / search_seconds(mode, ilp):.1f}x (goal >= 10x)")
PYEOF
