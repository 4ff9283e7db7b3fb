#!/usr/bin/env bash
# Reproduce one of the paper's two headline results: search -> fine-tune -> evaluate with the
# released settings, then the published figures beside the measured ones (docs/reproduce.md).
#
#   bash run/reproduce_paper.sh resnet50-kmeans-0.1       # K-Means, 10% of the fp32 size
#   bash run/reproduce_paper.sh mobilenetv2-linear-0.6    # linear, 0.6x the released latency
#   NPROC=8 bash run/reproduce_paper.sh resnet50-kmeans-0.1   # every step under torchrun
#
# Needs ImageNet in ImageFolder layout (data/imagenet/{train,val}/<wnid>/); the linear search
# runs on ImageNet-100, made from it by symlinks when data/imagenet100 is missing. Weights:
#   resnet50-kmeans-0.1     torchvision's IMAGENET1K_V1 (fetched once into torch's cache)
#   mobilenetv2-linear-0.6  checkpoints/pretrained/mobilenetv2.pth.tar (the released
#                           mobilenetv2-150.pth.tar, or `bash run/run_pretrain.sh imagenet`)
#                           and checkpoints/pretrained/mobilenetv2_imagenet100.pth.tar
#                           (`bash run/run_pretrain.sh imagenet100`) for the search, and the
#                           released latency table (mit-han-lab/haq,
#                           lib/simulator/lookup_tables/qmobilenetv2_imagenet100_batch16_latency_table.npy)
# Anything missing is refused in one line before any work starts.
#
# Environment (defaults: the released settings; smaller values make a smoke test):
#   HAQ_IMAGENET, HAQ_IMAGENET100, HAQ_IMAGENET100_CLASSES   data roots and the class list
#   HAQ_WEIGHTS         ImageNet weights: a torchvision name or a file
#   HAQ_SEARCH_WEIGHTS  linear only: the ImageNet-100 MobileNet-V2 file
#   HAQ_COST_TABLE      linear only: the released latency table (.npy)
#   HAQ_EPISODES, HAQ_WARMUP                 search episodes (600) and warmup episodes (20)
#   HAQ_TRAIN_SIZE, HAQ_VAL_SIZE, HAQ_DATA_BSIZE   the search's subsets and batch
#   HAQ_FT_EPOCHS       fine-tune epochs (100 K-Means, 30 linear)
#   HAQ_FT_SUBSET       fine-tune and evaluate on the first N images of each split (unset: all)
#   HAQ_FT_BATCH        fine-tune batch in total (256)
#   HAQ_WORKERS         data loader workers (32); HAQ_DEVICE auto|cpu|cuda (auto)
#   NPROC               torchrun processes (1: plain python); OUT  output folder
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}

die() { echo "error: reproduce_paper.sh: $*" >&2; exit 2; }

SETTING=${1:-}
case "$SETTING" in
    resnet50-kmeans-0.1)
        DEFAULT_WEIGHTS=IMAGENET1K_V1; DEFAULT_FT_EPOCHS=100; DEFAULT_DATA_BSIZE=256
        PUBLISHED="76.15 92.87 75.48 92.42 0.1" ;;
    mobilenetv2-linear-0.6)
        DEFAULT_WEIGHTS=checkpoints/pretrained/mobilenetv2.pth.tar; DEFAULT_FT_EPOCHS=30
        DEFAULT_DATA_BSIZE=128
        PUBLISHED="72.05 90.49 71.23 90.00 0.6" ;;
    *) die "expected a setting, resnet50-kmeans-0.1 or mobilenetv2-linear-0.6 (got '$SETTING')" ;;
esac
shift

IMAGENET=${HAQ_IMAGENET:-data/imagenet}
IMAGENET100=${HAQ_IMAGENET100:-data/imagenet100}
CLASSES=${HAQ_IMAGENET100_CLASSES:-lib/utils/imagenet100.txt}
WEIGHTS=${HAQ_WEIGHTS:-$DEFAULT_WEIGHTS}
SEARCH_WEIGHTS=${HAQ_SEARCH_WEIGHTS:-checkpoints/pretrained/mobilenetv2_imagenet100.pth.tar}
COST_TABLE=${HAQ_COST_TABLE:-lib/simulator/lookup_tables/qmobilenetv2_imagenet100_batch16_latency_table.npy}
EPISODES=${HAQ_EPISODES:-600}
WARMUP=${HAQ_WARMUP:-20}
TRAIN_SIZE=${HAQ_TRAIN_SIZE:-20000}
VAL_SIZE=${HAQ_VAL_SIZE:-10000}
DATA_BSIZE=${HAQ_DATA_BSIZE:-$DEFAULT_DATA_BSIZE}
FT_EPOCHS=${HAQ_FT_EPOCHS:-$DEFAULT_FT_EPOCHS}
FT_BATCH=${HAQ_FT_BATCH:-256}
WORKERS=${HAQ_WORKERS:-32}
DEVICE=${HAQ_DEVICE:-auto}
NPROC=${NPROC:-1}
OUT=${OUT:-outputs/paper/$SETTING}
export NPROC

# ------------------------------------------------------------------ checks, before any work
has_imagenet_layout() {
    [ -d "$1/train" ] && [ -d "$1/val" ] && [ -n "$(ls -A "$1/train" 2>/dev/null)" ]
}
has_imagenet_layout "$IMAGENET" || die "ImageNet not found at '$IMAGENET'; expected" \
    "$IMAGENET/{train,val}/<wnid>/*.JPEG (or HAQ_IMAGENET=PATH)"
case "$WEIGHTS" in
    IMAGENET1K_V1|IMAGENET1K_V2|DEFAULT)
        [ "$SETTING" = resnet50-kmeans-0.1 ] || die "HAQ_WEIGHTS=$WEIGHTS: the paper's" \
            "MobileNet-V2 is the released 150-epoch checkpoint; expected a file"
        # fetched here (quietly, into torch's cache) so a missing network is one line now,
        # not a failure after the search
        "$PY" -c "import sys, torchvision
w = torchvision.models.get_model_weights('resnet50')['$WEIGHTS']
try:
    w.get_state_dict(progress=False)
except Exception as exc:
    sys.exit(f'{type(exc).__name__}')" >/dev/null 2>&1 \
            || die "torchvision's $WEIGHTS weights for resnet50 could not be fetched; expected" \
                   "network access once (torch's cache keeps them) or HAQ_WEIGHTS=FILE" ;;
    *) [ -f "$WEIGHTS" ] || die "weights '$WEIGHTS' not found; expected the paper's starting" \
           "weights there (see docs/reproduce.md) or HAQ_WEIGHTS=FILE" ;;
esac
if [ "$SETTING" = mobilenetv2-linear-0.6 ]; then
    [ -f "$SEARCH_WEIGHTS" ] || die "ImageNet-100 weights '$SEARCH_WEIGHTS' not found; expected" \
        "'bash run/run_pretrain.sh imagenet100' first or HAQ_SEARCH_WEIGHTS=FILE"
    [ -f "$COST_TABLE" ] || die "latency table '$COST_TABLE' not found; expected the released" \
        "qmobilenetv2_imagenet100_batch16_latency_table.npy (mit-han-lab/haq) or HAQ_COST_TABLE=FILE"
    if ! has_imagenet_layout "$IMAGENET100"; then
        [ -e "$IMAGENET100" ] && die "'$IMAGENET100' is not ImageNet-100 in ImageFolder" \
            "layout; expected {train,val}/<wnid>/ (or HAQ_IMAGENET100=PATH)"
        "$PY" -m lib.utils.make_data --src "$IMAGENET" --dst "$IMAGENET100" --classes "$CLASSES"
    fi
fi
[ -e "$OUT/finetune" ] && die "'$OUT' holds an earlier run; expected a new OUT=PATH"
mkdir -p "$OUT"

if [ "$NPROC" -gt 1 ]; then
    LAUNCH=(torchrun --standalone --nproc_per_node "$NPROC")
else
    LAUNCH=("$PY")
fi
SUBSET=()
[ -n "${HAQ_FT_SUBSET:-}" ] && SUBSET=(--train_subset "$HAQ_FT_SUBSET")
SEARCH_ARGS=(--output "$OUT/search" --train_episode "$EPISODES" --warmup "$WARMUP"
             --train_size "$TRAIN_SIZE" --val_size "$VAL_SIZE" --data_bsize "$DATA_BSIZE"
             --n_worker "$WORKERS" --device "$DEVICE")
FT_ARGS=(--epochs "$FT_EPOCHS" --workers "$WORKERS" --device "$DEVICE"
         --train_batch "$((FT_BATCH / NPROC))" "${SUBSET[@]}" --weights "$WEIGHTS")

# ------------------------------------------------------------------ search -> fine-tune
echo "== search ($SETTING)" >&2
if [ "$SETTING" = resnet50-kmeans-0.1 ]; then
    STRATEGY=$(WEIGHTS="$WEIGHTS" bash run/run_kmeans_quantize_search.sh \
        --dataset_root "$IMAGENET" "${SEARCH_ARGS[@]}" "$@" | tail -n 1)
    echo "== fine-tune $STRATEGY" >&2
    STRATEGY="$STRATEGY" DATA="$IMAGENET" OUT="$OUT/finetune" WEIGHTS="$WEIGHTS" \
        bash run/run_kmeans_quantize_finetune.sh "${FT_ARGS[@]}" >&2
else
    STRATEGY=$(bash run/run_linear_quantize_search.sh --dataset_root "$IMAGENET100" \
        --weights "$SEARCH_WEIGHTS" --cost_table "$COST_TABLE" "${SEARCH_ARGS[@]}" "$@" \
        | tail -n 1)
    echo "== fine-tune $STRATEGY" >&2
    STRATEGY="$STRATEGY" DATA="$IMAGENET" OUT="$OUT/finetune" \
        bash run/run_linear_quantize_finetune.sh "${FT_ARGS[@]}" >&2
fi

# ------------------------------------------------------------------ evaluate, then the table
# model_best exists once an epoch scores above 0% (always, on ImageNet); a smoke test's random
# model may never, and then the last epoch's checkpoint is the result
BEST="$OUT/finetune/model_best.pth.tar"
[ -f "$BEST" ] || BEST="$OUT/finetune/checkpoint.pth.tar"
echo "== evaluate $BEST" >&2
"${LAUNCH[@]}" finetune.py -e --resume "$BEST" --workers "$WORKERS" \
    --device "$DEVICE" --no-progress 2>&1 | tee "$OUT/evaluate.log" >&2

"$PY" - "$SETTING" "$STRATEGY" "$OUT" "$BEST" $PUBLISHED <<'PYEOF' | tee "$OUT/paper_table.md"
import json, os, re, sys
setting, strategy_path, out, best = sys.argv[1:5]
fp32_1, fp32_5, q_1, q_5, budget = sys.argv[5:10]
strategy = json.load(open(strategy_path))
results = json.load(open(os.path.join(out, "finetune", "results.json")))
found = re.findall(r"evaluate: top1 ([\d.]+) top5 ([\d.]+)", open(os.path.join(out, "evaluate.log")).read())
ev1, ev5 = (float(v) for v in found[-1])

def f(v):
    return "-" if v is None else f"{v:.2f}"

def weights(rec):
    if not rec:
        return "-"
    return rec["name"] if "name" in rec else f"{os.path.basename(rec['path'])} (sha256 {rec['sha256'][:12]})"

rows = [("fp32 top-1 (%)", fp32_1, f(results.get("fp32_top1"))),
        ("fp32 top-5 (%)", fp32_5, "-"),
        ("quantized top-1 after fine-tune (%)", q_1, f(ev1)),
        ("quantized top-5 after fine-tune (%)", q_5, f(ev5)),
        ("budget (preserve ratio)", budget if "kmeans" in setting
         else f"{budget} (released search: 0.556)", f"{strategy['preserve_ratio']:g}"),
        ("searched cost ratio", "-", f"{strategy['cost_ratio']:.4f}"),
        ("search accuracy of the policy (%)", "-", f(strategy.get("accuracy"))),
        ("weights (search)", "-", weights(strategy.get("weights"))),
        ("weights (fine-tune)", "-", weights(results.get("weights"))),
        ("kl_max_bit (search / fine-tune)", "4 / 4" if "linear" in setting else "-",
         f"{strategy.get('kl_max_bit', '-')} / {results.get('kl_max_bit') if results.get('kl_max_bit') is not None else '-'}"),
        ("fine-tune epochs", "100" if "kmeans" in setting else "30", str(results["epochs"]))]
print(f"# {setting}: published (HAQ, CVPR 2019) vs measured\n")
print("| | published | measured |")
print("|---|---|---|")
for name, pub, got in rows:
    print(f"| {name} | {pub} | {got} |")
print(f"\nstrategy: {strategy_path}\nevaluated: {best}")
PYEOF
