"""HAQ's search: a DDPG agent picks a bit width per layer under a hardware budget.

    # linear quantization (weights + activations) under a latency budget on BISMO (cloud)
    python rl_quantize.py --arch qmobilenetv2 --dataset mnist5k --linear_quantization \
        --cost latency --hardware bismo_cloud --preserve_ratio 0.5 --min_bit 2 --float_bit 8
    # K-Means weight sharing under a model-size budget (10% of fp32)
    python rl_quantize.py --arch mobilenetv2 --dataset mnist5k --preserve_ratio 0.1

``--method random`` replaces the agent by uniform random actions (its warmup
distribution) and ``--method ilp`` by the policy of an exact integer program over
per-layer sensitivity scores (docs/design.md, "allocation methods"); both play the same
episodes. The ilp run also leaves its scores (sensitivity.json, reused on resume) and
their heat map (sensitivity.png) in the output folder.

Every flag of the released tool is kept (docs/design.md, "command lines"). The output
folder (``--output/<arch>_<dataset>[_<suffix>]-runN``) receives strategy.json (the best
policy), log.txt (one line per episode), TensorBoard events, agent.pth.tar (DDPG only),
best_policy.png, accuracy_vs_cost.png and search_state.pth.tar, saved after every
episode so ``--resume_search`` continues exactly where a killed search stopped. The
script parses and wires; the search itself is lib.search.
"""
import argparse
import json
import logging
import os
import re

import torch

from lib.search import (METHODS, STATE_FILE, Search, build_agent, build_env, build_loaders,
                        build_model, check_method_args, follow_search, load_agent_weights,
                        load_search_state, methods_help, output_folder, play_episode, run_search,
                        settle_from_pretrained)
from lib.search.state import base_name
from lib.quantize.options import add_flags as add_quant_flags
from lib.quantize.linear import DEFAULT_KL_MAX_BIT, RELEASED_KL_MAX_BIT
from lib.simulator.hardware import list_hardware
from lib.utils import cli
from lib.utils.cli import ArgumentParser
from lib.utils.distributed import check_same_args, cleanup, init_distributed
from lib.utils.errors import UserError, run_cli
from lib.utils.lock import FolderLock
from lib.utils.run_utils import seed_everything
from lib.utils.train import HALF_TYPES
from models import resolve_weights_flag, weights_help

log = logging.getLogger("rl_quantize")

FLOAT_BIT = cli.number(int, 1, 32)
HIDDEN = cli.number(int, 1, 4096)       # released 300; 65536 asked for ~70 GB of weights
SIGMA = cli.number(float, 0.0, 10.0)                  # exploration sigma; 0 = none
INIT_W = cli.number(float, 0.0, 1.0, lo_open=True)    # uniform(-w, w) init of the last layers
# bench/ and the tests reach the search's builders through this script
__all__ = ["STATE_FILE", "Search", "base_name", "build_agent", "build_env", "build_loaders",
           "build_model", "check_args", "get_args_parser", "main", "play_episode"]


def get_args_parser():
    p = ArgumentParser(description="HAQ: hardware-aware automated quantization (RL search)")
    p.add_argument("--suffix", default=None, type=cli.name_part,
                   help="suffix of the output folder name (letters, digits, '.', '_', '-')")
    # environment
    p.add_argument("--dataset", default=None, type=str,
                   help="imagenet, imagenet100, mnist5k or an ImageFolder root (default: the "
                        "pretrained checkpoint's, else imagenet)")
    p.add_argument("--dataset_root", default=None, type=str,
                   help="dataset folder (default data/<dataset>, i.e. data/imagenet)")
    p.add_argument("--preserve_ratio", default=0.1, type=cli.fraction,
                   help="budget: cost / reference cost (size vs fp32; latency/energy vs 8-bit)")
    p.add_argument("--min_bit", default=1, type=cli.bit_width, help="smallest bit width")
    p.add_argument("--max_bit", default=8, type=cli.bit_width, help="largest bit width")
    p.add_argument("--float_bit", default=32, type=FLOAT_BIT,
                   help="bits of the reference model in size mode (linear mode's reference is 8-bit)")
    cli.bool_flag(p, "--linear_quantization", False, "linear (weight+activation) instead of K-Means")
    cli.bool_flag(p, "--is_pruned", False, "keep zero weights out of K-Means and at zero; the size "
                  "counts only non-zero weights")
    cli.bool_flag(p, "--free_high_bit", True, "K-Means: layers above 6 bits train freely during the "
                  "short fine-tune (as released) and are clustered again before validating; "
                  "--free_high_bit False keeps them centroid-shared")
    cli.bool_flag(p, "--reuse_codebooks", False, "K-Means: cluster each (layer, bits) once per "
                  "search with --seed and reuse it in later episodes (released: a new k-means "
                  "seed every episode, so one policy scores differently each time)")
    # DDPG
    p.add_argument("--hidden1", default=300, type=HIDDEN, help="actor/critic first hidden layer")
    p.add_argument("--hidden2", default=300, type=HIDDEN, help="actor/critic second hidden layer")
    p.add_argument("--lr_c", default=1e-3, type=cli.learning_rate, help="critic learning rate")
    p.add_argument("--lr_a", default=1e-4, type=cli.learning_rate, help="actor learning rate")
    p.add_argument("--warmup", default=20, type=cli.nonneg_int,
                   help="episodes of random actions that only fill the replay memory")
    p.add_argument("--discount", default=1.0, type=cli.unit_interval, help="reward discount")
    p.add_argument("--bsize", default=64, type=cli.positive_int,
                   help="minibatch size of an agent update")
    p.add_argument("--rmsize", default=128, type=cli.positive_int,
                   help="replay memory size per quantizable layer: the agent keeps the last "
                        "rmsize x #layers transitions (as released)")
    p.add_argument("--window_length", default=1, type=cli.positive_int,
                   help="states per observation (only 1)")
    p.add_argument("--tau", default=0.01, type=cli.fraction, help="soft target update rate")
    p.add_argument("--init_delta", default=0.5, type=SIGMA,
                   help="initial sigma of the truncated-normal exploration noise")
    p.add_argument("--delta_decay", default=0.99, type=cli.fraction, help="sigma decay per episode")
    p.add_argument("--n_update", default=1, type=cli.positive_int,
                   help="agent updates per stored transition")
    # training
    p.add_argument("--max_episode_length", default=int(1e9), type=cli.positive_int,
                   help="kept for compatibility: an episode is always one pass over the layers")
    p.add_argument("--output", default="save", type=str, help="parent folder of the search outputs")
    cli.bool_flag(p, "--debug", False, "debug logging")
    p.add_argument("--init_w", default=0.003, type=INIT_W, help="init range of the last layers")
    p.add_argument("--train_episode", default=600, type=cli.positive_int,
                   help="episodes of the search")
    p.add_argument("--epsilon", default=50000, type=cli.nonneg_int,
                   help="kept for compatibility (exploration is --init_delta/--delta_decay)")
    p.add_argument("--seed", default=234, type=cli.seed_int, help="random seed")
    p.add_argument("--n_worker", default=32, type=cli.workers_int,
                   help="data loader workers (capped at the CPU cores available)")
    p.add_argument("--data_bsize", default=256, type=cli.positive_int,
                   help="batch size of fine-tune/validate")
    p.add_argument("--finetune_epoch", default=1, type=cli.positive_int,
                   help="short fine-tune epochs per episode")
    p.add_argument("--finetune_gamma", default=0.8, type=cli.fraction,
                   help="lr decay per fine-tune epoch")
    p.add_argument("--finetune_lr", default=0.001, type=cli.learning_rate,
                   help="short fine-tune learning rate")
    cli.bool_flag(p, "--finetune_flag", True, "fine-tune before validating each episode")
    cli.bool_flag(p, "--half", False, "mixed precision (torch autocast) in the episodes' "
                  "fine-tune and validation, as finetune.py's --half (see --half_type)")
    p.add_argument("--half_type", default="O1", choices=sorted(HALF_TYPES),
                   help="with --half: as finetune.py's --half_type (O1-O3: fp16 on GPU, bf16 on "
                        "CPU; or fp16, bf16)")
    cli.bool_flag(p, "--channels_last", False,
                  "channels-last memory format for the model and batches (as pretrain.py): on the "
                  "CPU an episode of the embedded default runs about 1.5x sooner "
                  "(bench/episode_bench.py --channels_last); off by default because convolutions "
                  "then round differently, so a search no longer repeats one run without it")
    cli.bool_flag(p, "--compile", False,
                  "run the episodes' fine-tune and validation through torch.compile, one graph "
                  "for every policy (bit widths are tensors); off by default: compiling takes "
                  "minutes, and the GPU speed-up is not measured yet (docs/performance.md)")
    cli.bool_flag(p, "--use_top5", False, "reward on top-5 instead of top-1 accuracy")
    p.add_argument("--train_size", default=20000, type=cli.positive_int,
                   help="search training subset size")
    p.add_argument("--val_size", default=10000, type=cli.positive_int,
                   help="search validation subset size")
    p.add_argument("--resume", default="default", type=str,
                   help="agent weights (agent.pth.tar of an earlier search) to start from")
    p.add_argument("-a", "--arch", default="mobilenetv2", type=str,
                   help="registry model (see models.list_models()) or a torchvision classifier "
                        "name; linear mode uses a Q twin where one exists, else swaps the "
                        "model's Conv2d/Linear for QConv2d/QLinear")
    p.add_argument("--gpu_id", default="1", type=str,
                   help="GPU index used with --device cuda (falls back to 0 if absent)")
    # additions
    p.add_argument("--cost", default=None, choices=["latency", "energy", "size"],
                   help="budgeted cost (default: size for K-Means, latency for linear)")
    p.add_argument("--hardware", default="bismo_cloud",
                   choices=list_hardware(), help="cost model preset")
    p.add_argument("--cost_table", default=None, type=str,
                   help="your own .npy table (n_layers, 8, 8), [layer, w-1, a-1]")
    p.add_argument("--cost_batch", default=16, type=cli.positive_int,
                   help="batch of the hardware cost table")
    add_quant_flags(p, default=False)   # linear: quantizer options (lib.quantize.options)
    p.add_argument("--pretrained_path", default=None, type=str,
                   help="pretrained weights (default checkpoints/pretrained/<arch>[_<dataset>].pth.tar)")
    p.add_argument("--width_mult", default=None, type=cli.width_mult,
                   help="MobileNet width (default: the pretrained checkpoint's, else the "
                        "dataset's, 0.5 on mnist5k)")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--resume_search", nargs="?", const="latest", default=None, metavar="DIR",
                   help="continue a stopped search: its output folder, or the latest run of "
                        "these flags when no folder is given")
    cli.bool_flag(p, "--progress", False, "progress bars of the fine-tune/validate passes")
    cli.add_threads_argument(p)
    add_method_args(p)
    add_width_args(p)
    p.add_argument("--input_size", default=None, type=cli.input_size,
                   help="image size in pixels (default: the pretrained checkpoint's, else the "
                        "dataset's, 224 or 32 for mnist5k); the cost table is traced at it")
    p.add_argument("--data_cache", default=None, metavar="DIR",
                   help="folder ImageFolder datasets' search subsets are decoded into once and "
                        "read from by every episode, run and rank (off by default: training "
                        "crops are then drawn on stored tensors, not the JPEGs; docs/performance.md)")
    p.add_argument("--weights", default=None, metavar="NAME|PATH", help=weights_help())
    p.add_argument("--kl_max_bit", default=DEFAULT_KL_MAX_BIT, type=cli.number(int, 0, 8),
                   help="linear: calibrate weights/inputs of at most this many bits with the "
                        f"released divergence clip, the rest with max|x|; {RELEASED_KL_MAX_BIT} = "
                        "the released rule (the paper's), 0 = max everywhere (default "
                        "%(default)s); recorded in strategy.json, which finetune.py follows")
    return p


def add_method_args(p):
    """--method (lib.search.METHODS) and the integer program's sensitivity settings."""
    p.add_argument("--method", default="ddpg", choices=list(METHODS), help=methods_help())
    p.add_argument("--policy", default=None, metavar="STRATEGY_JSON",
                   help="--method replay: the strategy.json whose policy every episode plays")
    p.add_argument("--sensitivity", default="loss", choices=["loss", "hessian"],
                   help="ilp's per-layer score: loss increase, or Hessian trace x quant. error")
    p.add_argument("--sensitivity_images", default=100, type=cli.positive_int,
                   help="ilp: validation-subset images the scores are measured on")
    p.add_argument("--hessian_iters", default=16, type=cli.positive_int,
                   help="ilp --sensitivity hessian: Hutchinson samples of each trace")


def width_set(text):
    """argparse ``type=`` of --bits/--bits_a: comma-separated widths in 1..8, e.g. '2,4,8'."""
    try:
        widths = sorted({int(v) for v in text.split(",")})
    except ValueError:
        widths = []
    if not widths or not all(1 <= w <= 8 for w in widths):
        raise argparse.ArgumentTypeError(f"'{text}' is not a width set; expected comma-separated "
                                         "integers in [1, 8], e.g. 2,4,8")
    return widths


def pin_spec(text):
    """argparse ``type=`` of --pin: 'NAME=W' or 'NAME=W,A' (the layer is checked by the env)."""
    name, sep, value = text.partition("=")
    parts = value.split(",")
    if not (name and sep and 1 <= len(parts) <= 2
            and all(re.fullmatch(r"-?\d+", v) for v in parts)):
        raise argparse.ArgumentTypeError(f"'{text}' is not a pin; expected NAME=W or NAME=W,A "
                                         "(a named_modules() name, weight and activation bits)")
    return f"{name}={','.join(str(int(v)) for v in parts)}"


def add_width_args(p):
    """The widths a search may give (beside --min_bit/--max_bit) and the integer program's
    refinement (docs/design.md, allocators)."""
    p.add_argument("--min_bit_a", default=None, type=cli.bit_width,
                   help="linear mode: smallest activation width (default --min_bit)")
    p.add_argument("--max_bit_a", default=None, type=cli.bit_width,
                   help="linear mode: largest activation width (default --max_bit)")
    p.add_argument("--bits", default=None, type=width_set,
                   help="only these weight widths, e.g. 2,4,8 (every allocator; default the "
                        "range --min_bit..--max_bit)")
    p.add_argument("--bits_a", default=None, type=width_set,
                   help="linear mode: only these activation widths (default the activation range)")
    p.add_argument("--pin", default=None, type=pin_spec, action="append", metavar="LAYER=W[,A]",
                   help="fix a layer's widths (named_modules() name; repeat for more layers); "
                        "overrides linear mode's first/last-layer pins")
    p.add_argument("--refine", default=0, type=cli.nonneg_int, metavar="N",
                   help="--method ilp: up to N evaluations of a local search that swaps widths "
                        "between layers while the loss of the whole quantized model falls")


def check_width_args(args):
    """The cross-flag rules of the width options (UserError)."""
    linear_only = [f for f in ("min_bit_a", "max_bit_a", "bits_a")
                   if getattr(args, f) is not None]
    if linear_only and not args.linear_quantization:
        raise UserError(f"--{linear_only[0]} sets activation widths; expected "
                        "--linear_quantization with it")
    lo_a = args.min_bit if args.min_bit_a is None else args.min_bit_a
    hi_a = args.max_bit if args.max_bit_a is None else args.max_bit_a
    if lo_a > hi_a:
        raise UserError(f"activation range {lo_a}..{hi_a} (--min_bit_a/--max_bit_a, defaulting "
                        "to --min_bit/--max_bit) is empty; expected min_bit_a <= max_bit_a")
    if args.refine and args.method != "ilp":
        raise UserError(f"--refine refines the integer program's policy; expected --method ilp "
                        f"(got --method {args.method})")


# ------------------------------------------------------------------ set-up
def gpu_index(gpu_id):
    """The first index in the released ``--gpu_id`` (e.g. "1" or "0,1"), used with --device cuda."""
    ids = [int(i) for i in re.findall(r"\d+", gpu_id or "0")] or [0]
    if torch.cuda.is_available() and ids[0] >= torch.cuda.device_count():
        log.warning("--gpu_id %s: no such GPU, using GPU 0", gpu_id)
        return 0
    return ids[0]


def check_args(args):
    from models import is_known_model, list_models
    if not is_known_model(args.arch):
        raise UserError(f"unknown arch '{args.arch}'; expected one of "
                        f"{', '.join(list_models())} or a torchvision classifier")
    if args.window_length != 1:
        raise UserError("--window_length: expected 1 (a state is one layer's embedding)")
    if args.cost is None:
        args.cost = "latency" if args.linear_quantization else "size"
    if not args.linear_quantization and args.cost_table is not None:
        raise UserError(f"--cost_table {args.cost_table} is a latency/energy table, which K-Means "
                        "mode does not use (it budgets the model size); expected "
                        "--linear_quantization with it, or no --cost_table")
    if not args.linear_quantization and args.cost != "size":
        raise UserError(f"--cost {args.cost} needs activation bits; expected --cost size with "
                        "K-Means, or --linear_quantization")
    if args.linear_quantization and not args.arch.startswith("q"):
        if "q" + args.arch in list_models():
            log.info("linear quantization: using %s (the Q twin of %s)", "q" + args.arch, args.arch)
            args.arch = "q" + args.arch
    cli.check_bit_range(args.min_bit, args.max_bit)
    check_width_args(args)
    if args.max_bit > args.float_bit:
        raise UserError(f"--max_bit {args.max_bit} > --float_bit {args.float_bit}; expected the "
                        "reference model at least as wide as any policy")
    cli.check_output_dir(args.output, "--output")
    resolve_weights_flag(args)
    settle_from_pretrained(args)


def main(argv=None):
    from lib.utils.logger import setup_logging
    args = argv if isinstance(argv, argparse.Namespace) else get_args_parser().parse_args(argv)
    setup_logging(verbose=args.debug)
    check_args(args)
    check_method_args(args)
    args.threads = cli.apply_threads(args)   # recorded with the flags in search_state
    seed_everything(args.seed)   # the only place seeds are set
    device, rank, _ = init_distributed(args.device, gpu_index(args.gpu_id))
    check_same_args(args)
    setup_logging(verbose=args.debug, rank=rank)
    loaders = build_loaders(args, device)
    model, info = build_model(args, device)
    env = build_env(args, model, info, loaders, device)
    env.check_budget()
    if rank != 0:   # torchrun: one agent and one set of outputs, on rank 0
        follow_search(args, env)
        return cleanup()
    agent = build_agent(args, env, device)
    if args.resume != "default":
        load_agent_weights(agent, args.resume)
    out_dir = output_folder(args)
    with FolderLock(out_dir, "--resume_search" if args.resume_search else "--output"):
        state = load_search_state(out_dir, args, env) if args.resume_search else None
        best = run_search(args, env, agent, out_dir, state, device)
    cleanup()
    log.info("best: episode %d, accuracy %.2f%%, %s ratio %.4f, strategy %s", best["episode"],
             best["accuracy"], args.cost, best["cost_ratio"], json.dumps(best["policy"]))
    # stdout carries only the strategy path, so scripts can hand it to finetune.py.
    print(os.path.join(out_dir, "strategy.json"), flush=True)
    return dict(best, output=out_dir)


if __name__ == "__main__":
    run_cli(main)
