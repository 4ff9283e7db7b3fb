"""The pieces of a search built from rl_quantize.py's flags: data, model, cost model, env."""
import logging
import os

import torch

from lib.utils.distributed import is_distributed
from lib.utils.run_utils import memory_format
from lib.utils.train import autocast_dtype

from .config import config_from_args

log = logging.getLogger("rl_quantize")


def settle_from_pretrained(args):
    """--dataset, --width_mult and --input_size from the pretrained checkpoint when not given.

    The checkpoint (--pretrained_path, else the default path of --arch and --dataset)
    is the source of truth (docs/design.md, "source of truth"): a flag that disagrees
    with it, or a dataset with another number of classes, is a UserError naming both.
    Weights that record nothing leave the flags to the dataset's defaults.
    """
    from lib.utils.data_utils import dataset_defaults
    from lib.utils.recorded import pretrained_record, settle
    from models import default_pretrained_path, float_twin
    path = args.pretrained_path or default_pretrained_path(args.arch, args.dataset or "imagenet")
    record = pretrained_record(path)
    source = f"the pretrained checkpoint '{path}'"
    settle("--arch", float_twin(args.arch), record.get("arch") and float_twin(record["arch"]),
           source)
    args.dataset = settle("--dataset", args.dataset, record.get("dataset"), source) or "imagenet"
    args.width_mult = settle("--width_mult", args.width_mult, record.get("width_mult"), source)
    args.input_size = settle("--input_size", args.input_size, record.get("input_size"), source)
    if "num_classes" in record:
        n = dataset_defaults(args.dataset, args.dataset_root).num_classes
        settle(f"--dataset {args.dataset} (its number of classes)", n, record["num_classes"],
               source)


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
    """The mode's env, scoring each policy by the short fine-tune on ``loaders``."""
    from lib.env import (EnvConfig, FinetuneConfig, KMeansQuantizeEnv, LinearQuantizeEnv,
                         ShortFinetune)
    amp = autocast_dtype(args, torch.device(device))
    evaluator = ShortFinetune(loaders.train, loaders.val, device,
                              config_from_args(FinetuneConfig, args, amp=amp,
                                               compiled=args.compile))
    cfg = config_from_args(EnvConfig, args)
    if args.linear_quantization:
        return LinearQuantizeEnv(model, evaluator, cfg, build_cost(args, model), loaders.calib,
                                 device)
    return KMeansQuantizeEnv(model, evaluator, cfg, is_pruned=args.is_pruned,
                             free_high_bit=args.free_high_bit,
                             reuse_codebooks=args.reuse_codebooks)
