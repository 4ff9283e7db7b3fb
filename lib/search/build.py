"""The pieces of a search built from rl_quantize.py's flags: data, model, cost model, env."""
import logging
import os

import torch

from lib.quantize.options import LINEAR_ONLY, QuantOptions, prepare_model
from lib.utils.distributed import is_distributed
from lib.utils.errors import UserError
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
    # torchvision's weights (--weights NAME) record nothing; a local file there is not used
    record = {} if getattr(args, "weights", None) else pretrained_record(path)
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
    # recorded with the flags (search_state), in strategy.json and checked on resume
    args.weights_source = load_pretrained_weights(
        model, args.arch, args.dataset, args.pretrained_path, getattr(args, "weights", None))
    options = search_quant_options(args)
    if args.linear_quantization:   # before the env keeps the pretrained (now prepared) weights
        prepare_model(model, options)
    return memory_format(model.to(device), args.channels_last), info


def search_quant_options(args):
    """The linear quantizer options of the search's flags; UserError when K-Means mode is asked
    for any (they are options of the linear quantizer)."""
    options = QuantOptions.from_args(args)
    if not args.linear_quantization and not options.is_default():
        raise UserError(f"{LINEAR_ONLY}; expected --linear_quantization with them")
    return options


def build_cost(args, model):
    """Linear mode's cost model: the simulator's table (cached) or the user's."""
    from lib.simulator import linear_cost_model
    # the table covers every width a step may take (activation range, width sets)
    widest = max([args.max_bit, getattr(args, "max_bit_a", None) or 0,
                  *(getattr(args, "bits", None) or []), *(getattr(args, "bits_a", None) or [])])
    return linear_cost_model(model, args.arch, args.dataset, args.hardware, args.cost,
                             batch=args.cost_batch, min_bit=args.min_bit, max_bit=widest,
                             cost_table=args.cost_table, width_mult=args.width_mult,
                             input_size=args.input_size)


def build_loaders(args, device="cpu"):
    """The search's two disjoint subsets of the train split (missing data fails here, first).

    Under torchrun each rank gets its shard (--data_bsize is the global batch). With
    --data_cache the batches come out on ``device``.
    """
    from lib.utils.data_utils import get_search_data
    from lib.utils.subset_cache import CachedLoader
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    n_worker = min(args.n_worker, cores or 1)
    data = get_search_data(args.dataset, args.data_bsize, n_worker, val_size=args.val_size,
                           train_size=args.train_size, data_root=args.dataset_root,
                           input_size=args.input_size, distributed=is_distributed(),
                           data_cache=getattr(args, "data_cache", None), device=device)
    # the stores' training crops are not the JPEGs': recorded with the flags, checked on resume
    args.cached_training = isinstance(data.train, CachedLoader)
    return data


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
                                 device, kl_max_bit=getattr(args, "kl_max_bit", 0),
                                 bn_reestimate=getattr(args, "bn_reestimate", 0) or 0)
    return KMeansQuantizeEnv(model, evaluator, cfg, is_pruned=args.is_pruned,
                             free_high_bit=args.free_high_bit,
                             reuse_codebooks=args.reuse_codebooks)
