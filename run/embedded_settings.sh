# Settings the demo (run/run_demo.sh) and the frontier (run/run_frontier.sh) share, so that the
# frontier's policies are searched and fine-tuned exactly as the demo's (docs/results.md, "Why the demo and
# the frontier use these settings"). Sourced, not run; expects FT_EPOCHS set.
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-2}
PY=${PYTHON:-python}
CKPT=checkpoints/pretrained/mobilenetv2_mnist5k.pth.tar
SEARCH_DATA=(--dataset mnist5k --train_size 600 --val_size 500 --data_bsize 100 --n_worker 0
             --device cpu)
# DDPG's exploration decays within the searches' 60 episodes: sigma 0.5 -> 0.015 by the last one;
# the released 0.99 suits ~600 episodes and still explores at 0.31 after 60 (docs/results.md,
# "Why the demo and the frontier use these settings")
DDPG=(--delta_decay 0.93)
# --overwrite: a rerun replaces the previous run's fine-tune of the same policy
FT=(--epochs "$FT_EPOCHS" --train_batch 64 --test_batch 500 --lr 0.01 --device cpu --no-progress
    --overwrite --eval_fp32)

mode_flags() {  # mode -> the search flags of that mode (budget not included)
    if [ "$1" = linear ]; then
        echo "--arch qmobilenetv2 --linear_quantization --cost latency --hardware bismo_cloud --min_bit 3"
    else
        echo "--arch mobilenetv2 --cost size --min_bit 2 --reuse_codebooks"
    fi
}

ensure_pretrained() {
    if [ ! -f "$CKPT" ]; then
        echo "== pretraining the embedded MobileNet-V2 (no checkpoint at $CKPT)"
        "$PY" pretrain.py --arch mobilenetv2 --dataset mnist5k --no-progress
    fi
}
