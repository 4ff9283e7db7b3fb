"""Quantization-aware fine-tuning (and evaluation) of one HAQ policy.

The policy comes from a search (its strategy.json) or a preset (the paper's published
policies); K-Means mode shares weights by cluster (``--free_high_bit`` leaves layers
above 6 bits free until the last epoch), linear mode trains with fake-quantized weights
and activations. Only a fully quantized model is scored or saved as model_best: before
the last epoch the free layers are clustered for each measurement, then trained on in
float. The checkpoint records everything needed to evaluate it again. The script parses
and wires; the run itself is lib.finetune.

    python finetune.py --strategy save/strategy.json --epochs 5          # embedded default
    python finetune.py -a qmobilenetv2 --linear_quantization --strategy mobilenetv2_linear_0.6 \
        --data_name imagenet -d data/imagenet --epochs 30 --lr 0.01 --wd 4e-5
    python finetune.py -e --resume checkpoints/<run>/model_best.pth.tar  # evaluate; nothing else
    torchrun --nproc_per_node 2 finetune.py --strategy save/strategy.json --device cpu
"""
import argparse
import logging
import math
import os
import time

from lib.finetune import (Finetune, check_output, default_run_name, lock_output,
                          output_folder, resolve_setup)
from lib.quantize.linear import DEFAULT_KL_MAX_BIT, RELEASED_KL_MAX_BIT
from lib.quantize.options import add_flags as add_quant_flags
from lib.utils import cli
from lib.utils.data_utils import list_datasets
from lib.utils.distributed import check_same_args, cleanup, init_distributed
from lib.utils.errors import UserError, run_cli
from lib.utils.logger import setup_logging
from lib.utils.lr_schedule import LR_TYPES
from lib.utils.run_utils import seed_everything
from lib.utils.strategy import list_presets
from lib.utils.train import HALF_TYPES
from models import list_models, resolve_weights_flag, weights_help

log = logging.getLogger("finetune")
# tests and scripts reach the run's pieces through this script
__all__ = ["Finetune", "default_run_name", "get_args_parser", "main", "resolve_setup"]


def get_args_parser():
    p = cli.ArgumentParser(description="HAQ: fine-tune or evaluate a quantization policy")
    p.add_argument("-d", "--data", default=None, help="dataset root (default data/<data_name>)")
    p.add_argument("--data_name", default=None,
                   help=f"{', '.join(list_datasets())} or an ImageFolder root (default: the "
                        "strategy's or checkpoint's dataset, else mnist5k; may differ from the "
                        "strategy's, not from the pretrained checkpoint's)")
    p.add_argument("-j", "--workers", type=cli.workers_int, default=0, help="data loading workers")
    p.add_argument("--epochs", type=cli.positive_int, default=30)
    p.add_argument("--start_epoch", type=cli.nonneg_int, default=0,
                   help="first epoch (a resume overrides it); below --epochs")
    p.add_argument("--warmup_epoch", type=cli.nonneg_float, default=0,
                   help="epochs of linear lr warmup (at most --epochs)")
    p.add_argument("--train_batch", type=cli.positive_int, default=None,
                   help="per process (default: 256, as released; 32 on the CPU above 64 px, "
                        "where 256 needs about 20 GB; --lr is not rescaled)")
    p.add_argument("--test_batch", type=cli.positive_int, default=512)
    p.add_argument("--lr", "--learning-rate", type=cli.learning_rate, default=0.01)
    p.add_argument("--lr_type", default="cos", choices=LR_TYPES)
    p.add_argument("--schedule", type=cli.positive_int, nargs="+", default=[31, 61, 91],
                   help="epochs where --lr_type step multiplies the lr by --gamma")
    p.add_argument("--gamma", type=cli.fraction, default=0.1,
                   help="lr factor in (0, 1] (step: per milestone, exp: per epoch)")
    p.add_argument("--momentum", type=cli.below_one, default=0.9)
    p.add_argument("--weight-decay", "--wd", dest="wd", type=cli.below_one, default=4e-5)
    p.add_argument("-c", "--checkpoint", default=None,
                   help="output folder (default checkpoints/<arch>_<data_name>_<mode>_finetune-runN, "
                        "a new N per run; a --resume continues in the checkpoint's own folder)")
    cli.bool_flag(p, "--overwrite", False,
                  "allow a fresh run into a -c folder that holds an earlier run's results")
    p.add_argument("--resume", default="", help="a finetune.py checkpoint to continue or evaluate")
    cli.bool_flag(p, "--pretrained", True, "start from the pretrained weights (--pretrained_path)")
    p.add_argument("--pretrained_path", default=None,
                   help="pretrained weights (default checkpoints/pretrained/<arch>[_<data_name>].pth.tar)")
    p.add_argument("--strategy", default=None,
                   help=f"strategy.json of a search, or a preset: {', '.join(list_presets())}")
    cli.bool_flag(p, ["--linear_quantization", "--linear_quantize"], None,
                  "linear (weights + activations) instead of K-Means (unset: the strategy's mode)")
    cli.bool_flag(p, "--free_high_bit", True,
                  "K-Means: leave layers above 6 bits free, cluster them at the last epoch")
    p.add_argument("--kl_max_bit", type=cli.number(int, 0, 8), default=None,
                   help="linear: calibrate weights/inputs of at most this many bits with the released "
                        f"divergence clip, the rest with max|x|; {RELEASED_KL_MAX_BIT} = the released "
                        "rule, 0 = max everywhere (default: the strategy's, as its search calibrated, "
                        f"else {DEFAULT_KL_MAX_BIT}; ranges are then fixed and saved)")
    add_quant_flags(p, default=None)    # linear: quantizer options; unset = the strategy's
    cli.bool_flag(p, "--is_pruned", False,
                  "K-Means: zero weights are pruned (kept out of clustering, stay zero)")
    cli.bool_flag(p, "--half", False, "mixed precision via torch autocast (see --half_type)")
    cli.bool_flag(p, "--channels_last", False,
                  "channels-last memory format (as pretrain.py): on the CPU about 1.5x sooner per "
                  "epoch for the embedded MobileNet-V2; off by default because convolutions then "
                  "round differently from runs without it")
    cli.bool_flag(p, "--compile", False,
                  "train through torch.compile (measured on the CPU, batch 16 at 224: a w4a4 step "
                  "1.01-1.11x the compiled fp32 one, 1.3-1.5x eager; compiling takes minutes, so "
                  "for long runs)")
    p.add_argument("--half_type", default="O1", choices=sorted(HALF_TYPES),
                   help="with --half: the released apex levels (O0: fp32; O1/O2/O3: autocast, fp16 "
                        "on GPU and bf16 on CPU) or an autocast dtype (fp16, bf16)")
    p.add_argument("-a", "--arch", default=None, metavar="ARCH",
                   help=f"model: {', '.join(list_models())}, or a torchvision classifier by name "
                        "(linear mode swaps in QConv2d/QLinear where no Q twin exists); "
                        "default: the strategy's arch")
    p.add_argument("--width_mult", type=cli.width_mult, default=None,
                   help="MobileNet width (default: the strategy's, else the pretrained "
                        "checkpoint's, else the dataset's: 0.5 on mnist5k); one that disagrees "
                        "with them is refused")
    p.add_argument("--input_size", type=cli.input_size, default=None,
                   help="image size in pixels (default: the strategy's, else the pretrained "
                        "checkpoint's, else the dataset's: 224, 32 for mnist5k); one that "
                        "disagrees with them is refused")
    p.add_argument("--min_bit", type=cli.bit_width, default=1, help="lowest bit width a policy may use")
    p.add_argument("--max_bit", type=cli.bit_width, default=8, help="highest bit width a policy may use")
    p.add_argument("--manualSeed", type=cli.seed_int, default=2019, help="seed (set once, here)")
    cli.bool_flag(p, ["-e", "--evaluate", "--eval"], False, "evaluate only, no training")
    cli.bool_flag(p, "--eval_fp32", True, "also measure the accuracy before quantization")
    p.add_argument("--gpu_id", default=None, help="CUDA_VISIBLE_DEVICES for this run, e.g. 0,1")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--train_subset", type=cli.positive_int, default=None,
                   help="use only the first N images of each split (smoke tests)")
    cli.bool_flag(p, "--progress", True, "progress bars (shown only on a terminal)")
    cli.add_threads_argument(p)
    p.add_argument("--weights", default=None, metavar="NAME|PATH", help=weights_help())
    return p


def check_args(args):
    """Cross-flag checks the types cannot make; UserError before anything is loaded or written."""
    cli.check_bit_range(args.min_bit, args.max_bit)
    resolve_weights_flag(args)
    if args.evaluate:
        return
    if args.start_epoch >= args.epochs:
        raise UserError(f"--start_epoch {args.start_epoch} leaves nothing to train; expected "
                        f"--start_epoch < --epochs ({args.epochs}), or -e to evaluate only")
    if args.warmup_epoch > args.epochs:
        raise UserError(f"--warmup_epoch {args.warmup_epoch:g} is longer than the run; expected "
                        f"at most --epochs ({args.epochs})")


def run_evaluation(run):
    """-e: evaluate a finetune.py checkpoint, other weights, or the freshly quantized policy."""
    if run.setup.ckpt is not None:
        run.prepare_resumed()
        with run.policy.all_quantized():   # a mid-run checkpoint may hold float free layers
            va = run.validate()
        recorded = run.setup.ckpt.get("acc")
        log.info("evaluate: top1 %.4f top5 %.4f (checkpoint recorded top1 %s)%s", va["top1"],
                 va["top5"], "n/a" if recorded is None else f"{recorded:.4f}",
                 run.policy.scored_note())
        return va
    if run.setup.foreign is not None:
        run.prepare_foreign()
        va = run.validate()
    else:
        va = run.prepare_fresh()
    log.info("evaluate: top1 %.4f top5 %.4f", va["top1"], va["top5"])
    return va


def run_training(run, start):
    """Prepare (fresh or resumed), open the outputs (rank 0), train, write results.json."""
    if run.setup.ckpt is not None:
        run.prepare_resumed()
    else:
        run.prepare_fresh()
    optimizer = run.optimizer()
    if run.rank == 0:
        run.outputs.open(run.results)
    final = run.train(optimizer)
    if run.rank != 0:
        return None
    out = run.outputs.close(run.results, final, time.time() - start, run.policy.kl_max_bit)
    log.info("fp32 %s  after quantization %.2f  best %.2f  -> %s",
             "n/a" if out["fp32_top1"] is None else f"{out['fp32_top1']:.2f}",
             out["quant_top1"] if out["quant_top1"] is not None else math.nan,
             out["best_top1"], run.outputs.folder)
    return out


def main(argv=None):
    args = argv if isinstance(argv, argparse.Namespace) else get_args_parser().parse_args(argv)
    check_args(args)
    if args.gpu_id is not None:   # before anything touches CUDA
        os.environ["CUDA_VISIBLE_DEVICES"] = args.gpu_id
    device, rank, world = init_distributed(args.device)
    check_same_args(args)
    setup_logging(rank=rank)
    args.threads = cli.apply_threads(args)   # recorded with the flags in results.json
    seed_everything(args.manualSeed)
    if args.gpu_id and "," in args.gpu_id and world == 1:
        log.info("--gpu_id lists several GPUs; this process uses one (run under torchrun "
                 "--nproc_per_node N to use N)")
    start = time.time()
    lock = run = None
    try:
        setup = resolve_setup(args)
        folder = output_folder(args, setup)
        lock = lock_output(args, folder, rank)
        replaced = check_output(args, setup, folder)
        run = Finetune(args, setup, device, rank, folder, replaced)
        run.outputs.lock = lock
        log.info("%s: %s mode, %d layers, policy from %s, dataset %s, %d process(es) on %s",
                 setup.arch, setup.mode, len(setup.layer_names),
                 setup.strategy.get("source", args.resume), setup.dataset, world, device)
        if args.evaluate:
            return run_evaluation(run)
        return run_training(run, start)
    finally:
        if run is not None:
            run.outputs.release()
        elif lock is not None:
            lock.release()
        cleanup()


if __name__ == "__main__":
    run_cli(main)
