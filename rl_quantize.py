"""HAQ's search: a DDPG agent picks a bit width per layer under a hardware budget.

    # linear quantization (weights + activations) under a latency budget on BISMO (cloud)
    python rl_quantize.py --arch qmobilenetv2 --dataset mnist5k --linear_quantization \
        --cost latency --hardware bismo_cloud --preserve_ratio 0.5 --min_bit 2 --float_bit 8
    # K-Means weight sharing under a model-size budget (10% of fp32)
    python rl_quantize.py --arch mobilenetv2 --dataset mnist5k --preserve_ratio 0.1

``--method random`` replaces the agent by uniform random actions (its warmup
distribution) and ``--method ilp`` by the policy of an exact integer program over
per-layer sensitivity scores (DESIGN.md section 14); both play the same episodes.
The ilp run also leaves its scores (sensitivity.json, reused on resume) and their
heat map (sensitivity.png) in the output folder.

Every flag of the released tool is kept (DESIGN.md section 8). The output folder
(``--output/<arch>_<dataset>[_<suffix>]-runN``) receives strategy.json (the best
policy), log.txt (one line per episode), TensorBoard events, agent.pth.tar (DDPG only),
best_policy.png, accuracy_vs_cost.png and search_state.pth.tar, saved after every
episode so ``--resume_search`` continues exactly where a killed search stopped.
"""
import argparse
import json
import logging
import os
import random
import re
import time

import numpy as np
import torch

from lib.simulator.hardware import list_hardware
from lib.utils.train import HALF_TYPES, autocast_dtype
from lib.utils.checkpoint import remove_stale_tmp
from lib.utils import cli
from lib.utils.cli import ArgumentParser
from lib.utils.distributed import cleanup, init_distributed, is_distributed
from lib.utils.errors import UserError, error_reason, run_cli
from lib.utils.run_utils import (freeze_startup_objects, list_runs, memory_format, new_run_folder,
                                 seed_everything)

log = logging.getLogger("rl_quantize")

STATE_FILE = "search_state.pth.tar"
PLOT_INTERVAL_S = 60
LOG_COLUMNS = ["episode", "reward", "accuracy", "cost_ratio", "cost", "nonfinite", "policy"]
FLOAT_BIT = cli.number(int, 1, 32)
HIDDEN = cli.number(int, 1, 4096)       # released 300; 65536 asked for ~70 GB of weights
SIGMA = cli.number(float, 0.0, 10.0)                  # exploration sigma; 0 = none
INIT_W = cli.number(float, 0.0, 1.0, lo_open=True)    # uniform(-w, w) init of the last layers
# Every flag that changes what the search does (the environment, the agent, the short
# fine-tune); --train_episode may grow, the rest (output, workers, logging) may change.
RESUME_KEYS = ("arch", "dataset", "linear_quantization", "preserve_ratio", "min_bit", "max_bit",
               "float_bit", "cost", "hardware", "train_size", "val_size", "seed", "warmup",
               "hidden1", "hidden2", "rmsize", "is_pruned", "use_top5", "width_mult",
               "free_high_bit", "reuse_codebooks", "method", "sensitivity", "input_size", "lr_c",
               "lr_a", "discount", "bsize", "tau", "init_delta", "delta_decay", "n_update", "init_w",
               "data_bsize",
               "finetune_epoch", "finetune_gamma", "finetune_lr", "finetune_flag", "cost_batch")
# Flags added after states were first saved: a state without one ran with this value.
RESUME_DEFAULTS = {"reuse_codebooks": False}
BEST_KEYS = {"episode", "reward", "accuracy", "cost_ratio", "cost", "policy"}
STATE_KEYS = {"args", "agent", "env", "episode", "best", "history", "rng"}


def get_args_parser():
    p = ArgumentParser(description="HAQ: hardware-aware automated quantization (RL search)")
    p.add_argument("--suffix", default=None, type=cli.name_part,
                   help="suffix of the output folder name (letters, digits, '.', '_', '-')")
    # environment
    p.add_argument("--dataset", default="imagenet", type=str,
                   help="imagenet, imagenet100, mnist5k or an ImageFolder root")
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
    p.add_argument("--pretrained_path", default=None, type=str,
                   help="pretrained weights (default checkpoints/pretrained/<arch>[_<dataset>].pth.tar)")
    p.add_argument("--width_mult", default=None, type=cli.width_mult,
                   help="MobileNet width (default: the dataset's, 0.5 on mnist5k)")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--resume_search", nargs="?", const="latest", default=None, metavar="DIR",
                   help="continue a stopped search: its output folder, or the latest run of "
                        "these flags when no folder is given")
    cli.bool_flag(p, "--progress", False, "progress bars of the fine-tune/validate passes")
    add_method_args(p)
    p.add_argument("--input_size", default=None, type=cli.input_size,
                   help="image size in pixels (default: the dataset's, 224 or 32 for mnist5k); "
                        "the cost table is traced at it")
    return p


def add_method_args(p):
    """--method and the integer program's sensitivity settings (DESIGN.md section 14)."""
    p.add_argument("--method", default="ddpg", choices=["ddpg", "ilp", "random", "replay"],
                   help="ddpg: the RL search; random: uniform random actions, same episodes; "
                        "ilp: sensitivity scores + exact integer program, one evaluated episode; "
                        "replay: every episode evaluates the --policy strategy again (the "
                        "reward's noise: same policy, a new fine-tune data order each time)")
    p.add_argument("--policy", default=None, metavar="STRATEGY_JSON",
                   help="--method replay: the strategy.json whose policy every episode plays")
    p.add_argument("--sensitivity", default="loss", choices=["loss", "hessian"],
                   help="ilp's per-layer score: loss increase, or Hessian trace x quant. error")
    p.add_argument("--sensitivity_images", default=100, type=cli.positive_int,
                   help="ilp: validation-subset images the scores are measured on")
    p.add_argument("--hessian_iters", default=16, type=cli.positive_int,
                   help="ilp --sensitivity hessian: Hutchinson samples of each trace")


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
    if args.max_bit > args.float_bit:
        raise UserError(f"--max_bit {args.max_bit} > --float_bit {args.float_bit}; expected the "
                        "reference model at least as wide as any policy")
    cli.check_output_dir(args.output, "--output")


def check_method_args(args):
    if args.method != "ddpg" and args.resume != "default":
        raise UserError(f"--resume loads DDPG agent weights; expected --method ddpg "
                        f"(got --method {args.method})")
    if (args.method == "replay") != (args.policy is not None):
        raise UserError("--policy goes with --method replay (and replay needs it); expected "
                        "both or neither")
    if args.method == "ilp" and args.train_episode != 1:
        log.info("--method ilp evaluates one policy: one episode (--train_episode ignored)")
        args.train_episode = 1


def build_model(args, device):
    """The pretrained model (Q archs and swapped models start from the float checkpoint)."""
    from lib.utils.data_utils import dataset_defaults
    from lib.utils.run_utils import has_default_width
    from models import get_model, load_pretrained_weights
    info = dataset_defaults(args.dataset, args.dataset_root)
    if args.width_mult is None and has_default_width(args.arch):
        args.width_mult = info.width_mult
    args.input_size = args.input_size or info.input_size
    # linear mode: any model without a Q twin gets its layers swapped (lib/quantize/swap.py)
    model = get_model(args.arch, num_classes=info.num_classes, input_size=args.input_size,
                      width_mult=args.width_mult, linear=args.linear_quantization)
    load_pretrained_weights(model, args.arch, args.dataset, args.pretrained_path)
    return memory_format(model.to(device), args.channels_last), info


def build_cost(args, model):
    """Linear mode's cost model: the simulator's table (cached) or the user's."""
    from lib.simulator import linear_cost_model
    return linear_cost_model(model, args.arch, args.dataset, args.hardware, args.cost,
                             batch=args.cost_batch, min_bit=args.min_bit, max_bit=args.max_bit,
                             cost_table=args.cost_table, width_mult=args.width_mult,
                             input_size=args.input_size)


def build_loaders(args):
    """The search's two disjoint subsets of the train split (missing data fails here, first).

    Under torchrun each rank gets its shard (--data_bsize is the global batch).
    """
    from lib.utils.data_utils import get_search_data
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    n_worker = min(args.n_worker, cores or 1)
    return get_search_data(args.dataset, args.data_bsize, n_worker, val_size=args.val_size,
                           train_size=args.train_size, data_root=args.dataset_root,
                           input_size=args.input_size, distributed=is_distributed())


def build_env(args, model, info, loaders, device):
    from lib.env import (EnvConfig, FinetuneConfig, KMeansQuantizeEnv, LinearQuantizeEnv,
                         ShortFinetune)
    evaluator = ShortFinetune(loaders.train, loaders.val, device, FinetuneConfig(
        finetune_flag=args.finetune_flag, finetune_epoch=args.finetune_epoch,
        finetune_lr=args.finetune_lr, finetune_gamma=args.finetune_gamma, progress=args.progress,
        amp=autocast_dtype(args, torch.device(device))))
    cfg = EnvConfig(preserve_ratio=args.preserve_ratio, min_bit=args.min_bit, max_bit=args.max_bit,
                    float_bit=args.float_bit, input_size=args.input_size, use_top5=args.use_top5,
                    seed=args.seed)
    if args.linear_quantization:
        cost = build_cost(args, model)
        return LinearQuantizeEnv(model, evaluator, cfg, cost, loaders.calib, device)
    return KMeansQuantizeEnv(model, evaluator, cfg, is_pruned=args.is_pruned,
                             free_high_bit=args.free_high_bit,
                             reuse_codebooks=args.reuse_codebooks)


def build_agent(args, env, device):
    """The source of each episode's actions: the DDPG agent, or a non-learning one (section 14)."""
    from lib.allocate import FixedActions, UniformActions
    if args.method == "random":
        return UniformActions(args.seed)
    if args.method == "ilp":
        return FixedActions(args.min_bit, args.max_bit)   # planned by plan_ilp
    if args.method == "replay":
        return FixedActions(args.min_bit, args.max_bit, replay_bits(args, env))
    from lib.rl import DDPG, DDPGConfig
    cfg = DDPGConfig(hidden1=args.hidden1, hidden2=args.hidden2, lr_c=args.lr_c, lr_a=args.lr_a,
                     warmup=args.warmup, discount=args.discount, bsize=args.bsize,
                     rmsize=args.rmsize, tau=args.tau, init_delta=args.init_delta,
                     delta_decay=args.delta_decay, init_w=args.init_w)
    # rmsize x #layers transitions, as released (not x steps: linear mode takes 2 per layer)
    try:
        return DDPG(env.state_dim, len(env.layers), cfg, device=device, seed=args.seed)
    except (MemoryError, RuntimeError) as exc:   # numpy's / torch's failed allocation
        if not isinstance(exc, MemoryError) and "allocate" not in str(exc):
            raise
        raise UserError(f"the agent does not fit in memory (--rmsize {args.rmsize} x "
                        f"{len(env.layers)} layers of replay memory, --hidden1 {args.hidden1}, "
                        f"--hidden2 {args.hidden2}); expected smaller values (released: 128, "
                        "300, 300)") from exc


def replay_bits(args, env):
    """Per-step bits of the ``--policy`` strategy, checked against the env's layers and budget."""
    from lib.utils.strategy import load_strategy, validate_strategy
    mode = "linear" if env.linear else "kmeans"
    strategy = validate_strategy(load_strategy(args.policy, "--policy"), env.layer_names, mode,
                                 args.min_bit, args.max_bit)
    policy = strategy["strategy"]
    flat = [b for pair in policy for b in pair] if env.linear else list(policy)
    flat = [env.pins.get(i, b) for i, b in enumerate(flat)]
    if env.policy_from_bits(flat) != policy:
        raise UserError(f"--policy {args.policy}: the first and last layers are pinned to "
                        f"{env.pins} in linear mode; expected a policy that keeps them")
    ratio = env.cost(policy) / env.reference_cost()
    if ratio > args.preserve_ratio + 1e-9:
        raise UserError(f"--policy {args.policy} costs {ratio:.4f} of the reference {args.cost}; "
                        f"expected --preserve_ratio >= {ratio:.4f} so the budget wall keeps it")
    return flat


def load_agent_weights(agent, path):
    """--resume: actor/critic weights of an earlier search; UserError when they do not fit."""
    from lib.utils.checkpoint import load_checkpoint
    state = load_checkpoint(path)
    expected = ("expected agent.pth.tar of a search with the same model, --hidden1 and "
                "--hidden2")
    if not isinstance(state, dict) or not all(isinstance(state.get(k), dict)
                                              for k in ("actor", "critic")):
        raise UserError(f"--resume '{path}' holds no 'actor' and 'critic' weights; {expected}")
    try:
        agent.load_weights(state)
    except (RuntimeError, KeyError, TypeError, ValueError) as exc:
        raise UserError(f"--resume '{path}' does not fit this agent ({error_reason(exc, 200)}); "
                        f"{expected}") from exc
    log.info("agent weights from %s", path)


# ------------------------------------------------------------ output folder
def base_name(args):
    from lib.utils.data_utils import dataset_label
    return f"{args.arch}_{dataset_label(args.dataset)}" + (f"_{args.suffix}" if args.suffix else "")


def output_folder(args):
    """A new ``-runN`` folder, or (``--resume_search``) the folder to continue."""
    if args.resume_search is None:
        return new_run_folder(args.output, base_name(args))
    if args.resume_search != "latest":
        path = args.resume_search
    else:
        done = [p for _, p in list_runs(args.output, base_name(args))
                if os.path.isfile(os.path.join(p, STATE_FILE))]
        if not done:
            raise UserError(f"--resume_search: no search of {base_name(args)} under "
                            f"'{args.output}' has saved state; expected a folder holding "
                            f"{STATE_FILE}")
        path = done[-1]
    if not os.path.isfile(os.path.join(path, STATE_FILE)):
        raise UserError(f"--resume_search: '{path}' holds no {STATE_FILE}; expected the output "
                        "folder of a stopped search")
    remove_stale_tmp(path)
    return path


def cost_table_of(env):
    """``{"path", "sha256"}`` of the user's --cost_table the env costs with, or None."""
    return getattr(getattr(env, "cost_model", None), "source", None)


def check_same_cost_table(path, recorded, current):
    """Refuse to continue a search under another cost model than the one it started with.

    ``recorded``/``current``: the ``{"path", "sha256"}`` of the user table, or None for
    the simulator's table. Tables are the same when their content is (a moved file is fine).
    """
    if recorded is None and current is None:
        return
    if recorded is not None and current is not None and recorded["sha256"] == current["sha256"]:
        return
    if recorded is None:
        raise UserError(f"--resume_search: '{path}' was searched with the simulator's cost "
                        f"table; expected no --cost_table (got {current['path']})")
    got = f"'{current['path']}' with other content" if current else "no --cost_table"
    raise UserError(f"--resume_search: '{path}' was searched with --cost_table "
                    f"{recorded['path']} (sha256 {recorded['sha256'][:12]}...); expected that "
                    f"table, got {got}")


def load_search_state(path, args, env):
    """The saved state of the search in ``path``, refused if its flags or cost table differ."""
    from lib.utils.checkpoint import load_checkpoint
    file = os.path.join(path, STATE_FILE)
    state = load_checkpoint(file)
    if (not isinstance(state, dict) or not STATE_KEYS <= set(state)
            or not isinstance(state["args"], dict)):
        raise UserError(f"--resume_search: '{file}' is not a search state of this version; "
                        "expected the file rl_quantize.py saves")
    saved = dict(RESUME_DEFAULTS, **state["args"])
    unrecorded = [k for k in RESUME_KEYS if k not in saved]
    if unrecorded:   # an older version's state: whether its flags match cannot be checked
        raise UserError(f"--resume_search: '{file}' records no --{unrecorded[0]} (written by an "
                        "older version?); expected a state that records every flag of its "
                        "search, or start a new search")
    diff = [k for k in RESUME_KEYS if saved[k] != getattr(args, k)]
    if diff:
        k = diff[0]
        raise UserError(f"--resume_search: '{path}' was searched with --{k} {saved[k]}; "
                        f"expected the same flags as that search (got {getattr(args, k)})")
    check_same_cost_table(path, state.get("cost_table"), cost_table_of(env))
    return state


def rng_states():
    """Python, NumPy and torch generator states as tensors, numbers, tuples and dicts.

    NumPy's MT19937 key becomes a list of ints, so the search state holds no
    numpy array and loads with ``torch.load(weights_only=True)``.
    """
    numpy_state = np.random.get_state(legacy=False)
    numpy_state["state"]["key"] = numpy_state["state"]["key"].tolist()
    states = {"python": random.getstate(), "numpy": numpy_state, "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def set_rng_states(states):
    version, internal, gauss = states["python"]
    random.setstate((version, tuple(internal), gauss))
    np.random.set_state(states["numpy"])
    torch.set_rng_state(states["torch"])
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


# ------------------------------------------------------------------ search
def plan_ilp(args, env, search=None):
    """Score the layers (or reuse the cached scores) and plan the integer program's policy.

    Rank 0 passes its ``search``; under torchrun the other ranks call it too (without
    one) and join the scoring, which runs on every rank's shard of the validation subset.
    """
    from lib.allocate import plan_policy
    from lib.utils.distributed import broadcast_values
    pending = search is not None and search.start < search.args.train_episode
    if not broadcast_values([pending])[0]:
        return
    if search is not None:
        search._save_state(search.start)   # a kill while scoring can now be resumed
    bits = plan_policy(env, search.out if search else None, args.sensitivity,
                       args.sensitivity_images, args.hessian_iters, args.seed)
    if search is not None:
        search.agent.plan(bits)


def history_labels(args):
    """(warmup, labels) of the accuracy-vs-cost plot for the search method."""
    if args.method == "random":
        return args.train_episode, ("random", "")
    if args.method == "ilp":
        return 0, ("", "integer program")
    if args.method == "replay":
        return 0, ("", "replayed policy")
    return args.warmup, ("warmup (random)", "DDPG")


def play_episode(env, agent, episode):
    """One pass over the layers; every transition is stored with the episode's final reward."""
    state, transitions, done = env.reset(), [], False
    while not done:
        action = agent.select_action(state, episode)
        next_state, reward, done, info = env.step(action)
        transitions.append((state, action, next_state, done))
        state = next_state
    agent.store_episode(transitions, reward)
    return transitions, info


class Search:
    """The episode loop plus its bookkeeping (log, TensorBoard, best policy, state)."""

    def __init__(self, args, env, agent, out_dir, state=None):
        from lib.utils.logger import Logger, trim_log
        from tensorboardX import SummaryWriter
        self.args, self.env, self.agent, self.out = args, env, agent, out_dir
        self.meta = {"arch": args.arch, "mode": "linear" if args.linear_quantization else "kmeans",
                     "metric": args.cost, "hardware": args.hardware if args.linear_quantization
                     else None, "preserve_ratio": args.preserve_ratio, "dataset": args.dataset,
                     "width_mult": args.width_mult, "min_bit": args.min_bit,
                     "max_bit": args.max_bit, "method": args.method,
                     "input_size": args.input_size}
        if (table := cost_table_of(env)) is not None:   # DESIGN.md section 9
            self.meta["cost_table"] = table
        self.start, self.best, self.history = 0, None, []
        self._last_plot = time.time()
        log_path = os.path.join(out_dir, "log.txt")
        if state is not None:
            self._restore(state)
            trim_log(log_path, self.start)
            log.info("resuming %s at episode %d", out_dir, self.start)
        self.meta["original_accuracy"] = env.org_acc
        self.logger = Logger(log_path, LOG_COLUMNS, resume=state is not None)
        self.writer = SummaryWriter(out_dir, purge_step=self.start if state is not None else None)
        if self.best is not None:   # strategy.json may be newer than the saved state
            self._write_best()
        if state is None:   # so a search killed in its first episode can be resumed
            self._save_state(0)

    def _restore(self, state):
        """Agent, env, progress and generators of a saved state; UserError if they do not fit.

        Nothing is written before this succeeds, so a refused state loses nothing.
        """
        try:
            self.agent.load_state_dict(state["agent"])
            self.env.load_state_dict(state["env"])
            set_rng_states(state["rng"])
            start, best, history = int(state["episode"]), state["best"], list(state["history"])
        except (KeyError, TypeError, ValueError, RuntimeError, IndexError) as exc:
            raise UserError(f"--resume_search: the state in '{self.out}' does not fit this "
                            f"search ({type(exc).__name__}: {error_reason(exc)}); expected the "
                            "state of a search with the same model and flags") from exc
        if start < 0 or len(history) != start or (best is None) != (start == 0) or (
                best is not None and not (isinstance(best, dict) and BEST_KEYS <= set(best))):
            raise UserError(f"--resume_search: the state in '{self.out}' is inconsistent "
                            f"(episode {start}, {len(history)} episodes in its history); expected "
                            "the state rl_quantize.py saves")
        if start > self.args.train_episode:
            raise UserError(f"--resume_search: '{self.out}' has already run {start} episodes; "
                            f"expected --train_episode of at least {start}")
        self.start, self.best, self.history = start, best, history

    def run_episode(self, episode):
        env, agent = self.env, self.agent
        transitions, info = play_episode(env, agent, episode)
        losses = []
        if self.args.method == "ddpg" and episode >= self.args.warmup:
            for _ in range(len(transitions) * self.args.n_update):
                losses.append(agent.update_policy())
        return info, losses

    def run(self):
        total = self.args.train_episode
        t0 = time.time()
        for episode in range(self.start, total):
            start = time.time()
            info, losses = self.run_episode(episode)
            info["episode"] = episode
            self.record(episode, info, losses)
            elapsed = time.time() - start
            left = (time.time() - t0) / (episode - self.start + 1) * (total - episode - 1)
            log.info("episode %d/%d  reward %.3f  acc %.2f  cost %.4f  (best %.2f @ %d, %.4f)  "
                     "%.1fs  eta %dm%02ds", episode + 1, total, info["reward"], info["accuracy"],
                     info["cost_ratio"], self.best["accuracy"], self.best["episode"],
                     self.best["cost_ratio"], elapsed, left // 60, left % 60)
        self.writer.close()
        self.logger.close()
        if self.best is not None:
            self._plots()
        return self.best

    def record(self, episode, info, losses):
        """Log, track the best, then save the state (after the log line, see trim_log)."""
        policy = info["policy"]
        self.logger.append([episode, float(info["reward"]), float(info["accuracy"]),
                            float(info["cost_ratio"]), float(info["cost"]), int(info["nonfinite"]),
                            json.dumps(policy)])
        self.history.append({k: info[k] for k in ("episode", "reward", "accuracy", "cost_ratio")})
        # a NaN best (never expected: diverged episodes score 0%) must not block every later one
        improved = (self.best is None or info["reward"] > self.best["reward"]
                    or not np.isfinite(self.best["reward"]))
        if improved:
            self.best = {k: info[k] for k in BEST_KEYS}
            self._write_best()
        self._tensorboard(episode, info, losses)
        self._save_state(episode + 1)
        # Plots follow the best during long searches (not every time: matplotlib is slow).
        if improved and time.time() - self._last_plot > PLOT_INTERVAL_S:
            self._plots()

    def _tensorboard(self, episode, info, losses):
        w = self.writer
        w.add_scalar("reward/last", info["reward"], episode)
        w.add_scalar("reward/best", self.best["reward"], episode)
        w.add_scalar("info/accuracy", info["accuracy"], episode)
        w.add_scalar("info/cost_ratio", info["cost_ratio"], episode)
        if self.args.method == "ddpg":
            w.add_scalar("info/exploration_sigma", self.agent.sigma(episode)
                         if episode >= self.args.warmup else 1.0, episode)
        for i, bits in enumerate(info["policy"]):
            if isinstance(bits, list):
                w.add_scalar(f"bits_w/{i:03d}", bits[0], episode)
                w.add_scalar(f"bits_a/{i:03d}", bits[1], episode)
            else:
                w.add_scalar(f"bits_w/{i:03d}", bits, episode)
        losses = [lv for lv in losses if lv[0] is not None]
        if losses:
            w.add_scalar("loss/value", float(np.mean([lv[0] for lv in losses])), episode)
            w.add_scalar("loss/policy", float(np.mean([lv[1] for lv in losses])), episode)

    def _write_best(self):
        from lib.utils.strategy import write_strategy
        write_strategy(os.path.join(self.out, "strategy.json"), self.best, self.env.layer_names,
                       self.meta)

    def _save_state(self, next_episode):
        from lib.utils.checkpoint import save_checkpoint
        if self.args.method == "ddpg":
            save_checkpoint(self.agent.weights(), os.path.join(self.out, "agent.pth.tar"))
        save_checkpoint({"episode": next_episode, "agent": self.agent.state_dict(),
                         "env": self.env.state_dict(), "best": self.best,
                         "history": self.history, "rng": rng_states(),
                         "cost_table": cost_table_of(self.env), "args": vars(self.args)},
                        os.path.join(self.out, STATE_FILE))

    def _plots(self):
        from lib.report.plots import plot_history, plot_policy
        self._last_plot = time.time()
        b = self.best
        plot_policy(os.path.join(self.out, "best_policy.png"), b["policy"], self.env.layer_names,
                    f"{self.args.arch} best policy (episode {b['episode']}): "
                    f"acc {b['accuracy']:.2f}%, {self.args.cost} ratio {b['cost_ratio']:.3f}")
        warmup, labels = history_labels(self.args)
        plot_history(os.path.join(self.out, "accuracy_vs_cost.png"), self.history, b["episode"],
                     warmup, self.args.preserve_ratio, self.args.cost, labels=labels)


def main(argv=None):
    from lib.utils.logger import setup_logging
    args = argv if isinstance(argv, argparse.Namespace) else get_args_parser().parse_args(argv)
    setup_logging(verbose=args.debug)
    check_args(args)
    check_method_args(args)
    seed_everything(args.seed)   # the only place seeds are set
    device, rank, _ = init_distributed(args.device, gpu_index(args.gpu_id))
    setup_logging(verbose=args.debug, rank=rank)
    loaders = build_loaders(args)
    model, info = build_model(args, device)
    env = build_env(args, model, info, loaders, device)
    env.check_budget()
    if rank != 0:   # torchrun: one agent and one set of outputs, on rank 0 (DESIGN.md 13)
        env.run_follower(resumed=args.resume_search is not None,
                         prologue=(lambda: plan_ilp(args, env)) if args.method == "ilp" else None)
        return cleanup()
    agent = build_agent(args, env, device)
    if args.resume != "default":
        load_agent_weights(agent, args.resume)
    out_dir = output_folder(args)
    state = load_search_state(out_dir, args, env) if args.resume_search else None
    if state is None:
        acc = env.measure_original()
        log.info("%s on %s: %d layers, %d steps per episode, original accuracy %.2f%%, "
                 "budget %.3f of the reference %s", args.arch, args.dataset, len(env.layers),
                 env.n_steps, acc, args.preserve_ratio, args.cost)
    log.info("output folder %s (%s)", out_dir, device)
    search = Search(args, env, agent, out_dir, state)
    env.sync_from_main()
    freeze_startup_objects()
    started = time.perf_counter()
    if args.method == "ilp":
        plan_ilp(args, env, search)
    best = search.run()
    # the method's own time (ilp: scores + solve + its episode), without the start-up and
    # the original-accuracy pass every method pays; bench/allocate_bench.sh reads this line
    log.info("search time %.1fs (%s, episodes %d-%d)", time.perf_counter() - started,
             args.method, search.start + 1, args.train_episode)
    env.release_followers()
    cleanup()
    log.info("best: episode %d, accuracy %.2f%%, %s ratio %.4f, strategy %s", best["episode"],
             best["accuracy"], args.cost, best["cost_ratio"], json.dumps(best["policy"]))
    # stdout carries only the strategy path, so scripts can hand it to finetune.py.
    print(os.path.join(out_dir, "strategy.json"), flush=True)
    return dict(best, output=out_dir)


if __name__ == "__main__":
    run_cli(main)
