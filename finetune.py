"""Quantization-aware fine-tuning (and evaluation) of one HAQ policy.

The policy comes from a search (its strategy.json) or a preset (the paper's published
policies); K-Means mode shares weights by cluster (``--free_high_bit`` leaves layers
above 6 bits free until the last epoch), linear mode trains with fake-quantized weights
and activations. Only a fully quantized model is scored or saved as model_best: before
the last epoch the free layers are clustered for each measurement, then trained on in
float. The checkpoint records everything needed to evaluate it again.

    python finetune.py --strategy save/strategy.json --epochs 5          # embedded default
    python finetune.py -a qmobilenetv2 --linear_quantization --strategy mobilenetv2_linear_0.6 \
        --data_name imagenet -d data/imagenet --epochs 30 --lr 0.01 --wd 4e-5
    python finetune.py -e --resume checkpoints/<run>/model_best.pth.tar  # evaluate; nothing else
    torchrun --nproc_per_node 2 finetune.py --strategy save/strategy.json --device cpu
"""
import argparse
import glob
import logging
import math
import os
import time
from dataclasses import dataclass, field

import torch
import torch.nn as nn

from lib.quantize import (CentroidSharer, apply_kmeans_policy, apply_linear_policy, calibrate,
                          codebooks_state_dict, fully_quantized, load_codebooks)
from lib.quantize.linear import DEFAULT_KL_MAX_BIT, RELEASED_KL_MAX_BIT
from lib.utils.checkpoint import (atomic_write_json, extract_state_dict, finite_or_none,
                                  load_checkpoint, load_state_dict, remove_stale_tmp,
                                  save_checkpoint)
from lib.utils import cli
from lib.utils.cli import ArgumentParser, check_output_dir
from lib.utils.data_utils import dataset_label, get_dataset, list_datasets
from lib.utils.distributed import cleanup, init_distributed, is_distributed, sync_buffers
from lib.utils.errors import UserError, run_cli
from lib.utils.layers import quantizable_layers
from lib.utils.logger import setup_logging, trim_log
from lib.utils.lr_schedule import LR_TYPES, make_lr_schedule
from lib.utils.run_utils import (freeze_startup_objects, lr_setter, memory_format,
                                 model_kwargs_for, new_run_folder, open_run_logs, seed_everything)
from lib.utils.strategy import list_presets, load_strategy, validate_strategy
from lib.utils.train import HALF_TYPES, autocast_dtype, evaluate, train_one_epoch
from models import float_twin, get_model, list_models, load_pretrained_weights

log = logging.getLogger("finetune")

KMEANS_ITERS = 50   # Lloyd iterations when fine-tuning (the search uses 3)
DEFAULT_ARCH = {"kmeans": "mobilenetv2", "linear": "qmobilenetv2"}
CHECKPOINT_PARENT = "checkpoints"
RESULT_FILES = ("checkpoint.pth.tar", "model_best.pth.tar", "results.json", "log.txt")
LOG_COLUMNS = ["epoch", "lr", "train_loss", "train_top1", "val_loss", "val_top1", "val_top5",
               "best_top1"]


def get_args_parser():
    p = ArgumentParser(description="HAQ: fine-tune or evaluate a quantization policy")
    p.add_argument("-d", "--data", default=None, help="dataset root (default data/<data_name>)")
    p.add_argument("--data_name", default=None,
                   help=f"{', '.join(list_datasets())} or an ImageFolder root (default: the "
                        "strategy's or checkpoint's dataset, else mnist5k)")
    p.add_argument("-j", "--workers", type=cli.workers_int, default=0, help="data loading workers")
    p.add_argument("--epochs", type=cli.positive_int, default=30)
    p.add_argument("--start_epoch", type=cli.nonneg_int, default=0,
                   help="first epoch (a resume overrides it); below --epochs")
    p.add_argument("--warmup_epoch", type=cli.nonneg_float, default=0,
                   help="epochs of linear lr warmup (at most --epochs)")
    p.add_argument("--train_batch", type=cli.positive_int, default=256, help="per process")
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
    p.add_argument("--kl_max_bit", type=cli.number(int, 0, 8), default=DEFAULT_KL_MAX_BIT,
                   help="linear: calibrate weights/inputs of at most this many bits with the released "
                        f"divergence clip, the rest with max|x|; {RELEASED_KL_MAX_BIT} = the released "
                        "rule, 0 = max everywhere (default %(default)s; ranges are then fixed and saved)")
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
                   help="MobileNet width (default: the strategy's, else the dataset's: 0.5 on mnist5k)")
    p.add_argument("--input_size", type=cli.input_size, default=None,
                   help="image size in pixels (default: the strategy's, else the dataset's: 224, "
                        "32 for mnist5k)")
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
    return p


def check_args(args):
    """Cross-flag checks the types cannot make; UserError before anything is loaded or written."""
    cli.check_bit_range(args.min_bit, args.max_bit)
    if args.evaluate:
        return
    if args.start_epoch >= args.epochs:
        raise UserError(f"--start_epoch {args.start_epoch} leaves nothing to train; expected "
                        f"--start_epoch < --epochs ({args.epochs}), or -e to evaluate only")
    if args.warmup_epoch > args.epochs:
        raise UserError(f"--warmup_epoch {args.warmup_epoch:g} is longer than the run; expected "
                        f"at most --epochs ({args.epochs})")


@dataclass
class Setup:
    """What is fine-tuned: resolved from the flags, the strategy and any --resume checkpoint."""
    arch: str
    mode: str                   # 'kmeans' or 'linear'
    dataset: str
    model_kwargs: dict
    strategy: dict              # as loaded; validated once the model exists
    ckpt: dict = None           # a finetune.py checkpoint being resumed or evaluated
    foreign: dict = None        # other weights to evaluate (-e --resume of e.g. a released file)
    layer_names: list = field(default_factory=list)


def _arch_for_mode(arch, mode):
    """Linear mode needs the Q twin of a float arch; K-Means mode uses the float twin."""
    if mode == "linear" and not arch.startswith("q") and "q" + arch in list_models():
        log.info("linear mode: using '%s' (the quantized twin of '%s')", "q" + arch, arch)
        return "q" + arch
    if mode == "kmeans" and float_twin(arch) != arch:
        log.info("K-Means mode: using '%s' (the float twin of '%s')", float_twin(arch), arch)
        return float_twin(arch)
    return arch


CKPT_EXPECTED = "expected a checkpoint written by finetune.py"


def _positive_int(value):
    return type(value) is int and value > 0


def check_finetune_checkpoint(path, ckpt, evaluate):
    """UserError unless ``ckpt`` has the fields of a finetune.py checkpoint, well typed.

    Checked before any model is built, so an edited or older file is a one-line error
    naming the field, not a KeyError or TypeError deep in model construction or logging.
    """
    def bad(field, value):
        raise UserError(f"--resume '{path}': '{field}' is {value!r}; {CKPT_EXPECTED}")
    if ckpt.get("mode") not in ("kmeans", "linear"):
        bad("mode", ckpt.get("mode"))
    kwargs = ckpt.get("model_kwargs")
    if not isinstance(kwargs, dict) or not _positive_int(kwargs.get("num_classes")) or not (
            kwargs.get("input_size") is None or _positive_int(kwargs.get("input_size"))):
        bad("model_kwargs", kwargs)
    width = kwargs.get("width_mult")
    if width is not None and (type(width) not in (int, float) or not 0 < width <= 8):
        bad("model_kwargs", kwargs)
    if not isinstance(ckpt.get("arch"), str):
        bad("arch", ckpt.get("arch"))
    epoch = ckpt.get("epoch")
    if type(epoch) is not int or epoch < 0:
        bad("epoch", epoch)
    codebooks = ckpt.get("codebooks")
    if codebooks is not None and not (isinstance(codebooks, dict) and all(
            isinstance(c, dict) for c in codebooks.values())):
        bad("codebooks", type(codebooks).__name__ if not isinstance(codebooks, dict)
            else "a dict with non-dict entries")
    if not evaluate and not isinstance(ckpt.get("optimizer"), dict):
        raise UserError(f"--resume '{path}' holds no optimizer state, so training cannot "
                        f"continue from it; {CKPT_EXPECTED}, or -e to evaluate it")


def _setup_from_checkpoint(args, ckpt):
    check_finetune_checkpoint(args.resume, ckpt, args.evaluate)
    mode = ckpt["mode"]
    if args.linear_quantization is not None and args.linear_quantization != (mode == "linear"):
        raise UserError(f"--resume '{args.resume}' holds a {mode}-mode model; expected "
                        f"{'no ' if mode == 'kmeans' else ''}--linear_quantization")
    if args.strategy and load_strategy(args.strategy)["strategy"] != ckpt["policy"]["strategy"]:
        log.warning("--strategy differs from the policy recorded in %s; using the recorded one",
                    args.resume)
    dataset = args.data_name or ckpt.get("dataset") or "mnist5k"
    # the data flags default to the run's own, so -e --resume reproduces its accuracy
    saved = ckpt.get("args") or {}
    for key in ("data", "train_subset"):
        if getattr(args, key) is None:
            setattr(args, key, saved.get(key))
    return Setup(ckpt["arch"], mode, dataset, ckpt["model_kwargs"], ckpt["policy"], ckpt=ckpt)


def resolve_setup(args):
    """Arch, mode, dataset, model kwargs and policy of this run (UserError if underdetermined)."""
    ckpt = load_checkpoint(args.resume) if args.resume else None
    if ckpt is not None and isinstance(ckpt, dict) and "policy" in ckpt:
        return _setup_from_checkpoint(args, ckpt)
    if ckpt is not None and not args.evaluate:
        raise UserError(f"--resume '{args.resume}' was not written by finetune.py (it records no "
                        "policy); expected a finetune.py checkpoint, or start from other weights "
                        "with --pretrained_path")
    if not args.strategy:
        raise UserError("no policy to fine-tune; expected --strategy PATH|PRESET (presets: "
                        f"{', '.join(list_presets())}) or --resume of a finetune.py checkpoint")
    strategy = load_strategy(args.strategy)
    if args.linear_quantization is None:
        mode = strategy["mode"]
    else:
        mode = "linear" if args.linear_quantization else "kmeans"
    arch = _arch_for_mode(args.arch or strategy.get("arch") or DEFAULT_ARCH[mode], mode)
    dataset = args.data_name or strategy.get("dataset") or "mnist5k"
    width = args.width_mult if args.width_mult is not None else strategy.get("width_mult")
    kwargs = model_kwargs_for(arch, dataset, args.data, width,
                              args.input_size or strategy.get("input_size"))
    return Setup(arch, mode, dataset, kwargs, strategy, foreign=ckpt)


def build_model(setup, args, device):
    """The model of ``setup`` with its policy validated against the model's layers."""
    linear = setup.mode == "linear"
    # linear mode: a Q twin as is, any other model swapped to QConv2d/QLinear
    model = memory_format(get_model(setup.arch, linear=linear, **setup.model_kwargs).to(device),
                          args.channels_last)
    names = [name for name, _ in quantizable_layers(model, linear=linear)]
    if not names:
        raise UserError(f"arch '{setup.arch}' has no Conv2d/Linear layers to quantize; expected "
                        "a CNN classifier")
    setup.strategy = validate_strategy(setup.strategy, names, setup.mode, args.min_bit, args.max_bit)
    setup.layer_names = names
    return model


def quantize(model, setup, args, calib_loader, device):
    """Apply the policy to float weights; return the K-Means codebooks (None in linear mode)."""
    policy = setup.strategy["strategy"]
    if setup.mode == "linear":
        apply_linear_policy(model, policy)
        calibrate(model, calib_loader, device, kl_max_bit=args.kl_max_bit)
        return None
    start = time.time()
    # --evaluate scores the whole policy, so no layer is left free there
    free = args.free_high_bit and not args.evaluate
    codebooks = apply_kmeans_policy(model, policy, n_iter=KMEANS_ITERS, is_pruned=args.is_pruned,
                                    free_high_bit=free, seed=args.manualSeed)
    log.info("K-Means (%d iterations) of %d layers took %.1fs", KMEANS_ITERS, len(codebooks),
             time.time() - start)
    return codebooks


def default_run_name(setup):
    """Base name of the default output folders: checkpoints/<this>-runN."""
    return f"{setup.arch}_{dataset_label(setup.dataset)}_{setup.mode}_finetune"


def output_folder(args, setup):
    """The folder this run writes to; None means a new ``-runN`` folder under checkpoints/.

    A resumed run continues in its checkpoint's folder (as released) unless -c says otherwise.
    """
    if args.checkpoint:
        return args.checkpoint
    if setup.ckpt is not None:
        return os.path.dirname(os.path.abspath(args.resume))
    return None


def earlier_results(folder):
    """Result files of an earlier run in ``folder`` (TensorBoard events included)."""
    if not os.path.isdir(folder):
        return []
    paths = [os.path.join(folder, n) for n in RESULT_FILES]
    events = glob.glob(os.path.join(glob.escape(folder), "events.out.tfevents.*"))
    return [p for p in paths if os.path.exists(p)] + sorted(events)


def check_output(args, setup, folder):
    """Before any work: something left to train, a writable folder, no other run's results in it.

    Returns the earlier result files that --overwrite will replace (removed when training
    starts, so bad input later on loses nothing).
    """
    if args.evaluate:
        return []
    if setup.ckpt is not None and setup.ckpt.get("epoch", 0) >= args.epochs:
        raise UserError(f"--resume '{args.resume}' has already trained {setup.ckpt['epoch']} "
                        f"epochs; expected --epochs above that to continue, or -e to evaluate")
    if folder is None:
        check_output_dir(CHECKPOINT_PARENT, f"-c (default: a new folder under {CHECKPOINT_PARENT}/)")
        return []
    check_output_dir(folder, "-c/--checkpoint")
    continuing = (setup.ckpt is not None and os.path.abspath(folder)
                  == os.path.dirname(os.path.abspath(args.resume)))
    found = [] if continuing else earlier_results(folder)
    if found and not args.overwrite:
        raise UserError(f"-c '{folder}' already holds an earlier fine-tune's results "
                        f"({os.path.basename(found[0])}); expected a new folder (leave -c out for a "
                        "new -runN folder), --resume of its checkpoint to continue it, or "
                        "--overwrite to replace them")
    return found


class Finetune:
    """One run: the model, its data, its quantization state and the epoch loop."""

    def __init__(self, args, setup, device, rank, folder=None, replaced=()):
        self.args, self.setup, self.device, self.rank = args, setup, device, rank
        self.folder = folder            # None: a new -runN folder, made when training starts
        self.replaced = list(replaced)  # an earlier run's files that --overwrite replaces
        self.criterion = nn.CrossEntropyLoss()
        self.model = build_model(setup, args, device)
        self.train_loader, self.val_loader, _ = get_dataset(
            setup.dataset, args.train_batch, args.workers, args.data, distributed=is_distributed(),
            train_subset=args.train_subset, val_batch_size=args.test_batch,
            input_size=setup.model_kwargs.get("input_size"))
        self.codebooks = None
        # the rule that set the weight ranges: this run's, or the resumed checkpoint's
        self.kl_max_bit = args.kl_max_bit if setup.mode == "linear" else None
        self.results = {"fp32_top1": None, "quant_top1": None, "best_top1": 0.0}
        self.net = self.model

    # ------------------------------------------------------------------ preparation
    def validate(self):
        """Accuracy on the validation split, every image counted once over all ranks.

        Rank 0's BN statistics go to every rank first (after an epoch each holds its
        own last batch's), so all ranks score the same model.
        """
        sync_buffers(self.model)
        return evaluate_model(self.model, self.val_loader, self.criterion, self.device, self.args)

    def free_layers(self):
        """{name: bits} of the K-Means layers that --free_high_bit leaves float at this point."""
        if self.codebooks is None:
            return {}
        return {n: b for n, b in zip(self.setup.layer_names, self.setup.strategy["strategy"])
                if n not in self.codebooks}

    def all_quantized(self):
        """Context in which the model is fully quantized, to be scored or saved as the policy's.

        The layers --free_high_bit leaves float are clustered as the last epoch will cluster
        them (same iterations and seed) and get their float weights back afterwards, so
        training goes on unchanged. Yields their temporary codebooks.
        """
        return fully_quantized(self.model, self.free_layers(), n_iter=KMEANS_ITERS,
                               is_pruned=self.args.is_pruned, seed=self.args.manualSeed)

    def scored_note(self):
        """What a logged accuracy was measured on, when layers train float for now."""
        n = len(self.free_layers())
        return (f" (all layers quantized: the {n} layers above 6 bits, float in training until "
                "the last epoch (--free_high_bit), clustered for this measurement)") if n else ""

    def prepare_fresh(self):
        """Pretrained float weights -> fp32 accuracy -> quantize -> accuracy after quantization."""
        args, setup = self.args, self.setup
        if args.pretrained:
            load_pretrained_weights(self.model, setup.arch, setup.dataset, args.pretrained_path)
        else:
            log.warning("--no-pretrained: quantizing randomly initialised weights")
        if args.eval_fp32:
            self.results["fp32_top1"] = self.validate()["top1"]
            log.info("fp32 accuracy: top1 %.2f", self.results["fp32_top1"])
        self.codebooks = quantize(self.model, setup, args, self.train_loader, self.device)
        self.wrap_ddp()
        with self.all_quantized():
            va = self.validate()
        self.results["quant_top1"] = va["top1"]
        log.info("acc after quantization: top1 %.2f top5 %.2f%s", va["top1"], va["top5"],
                 self.scored_note())
        return va

    def prepare_resumed(self):
        """Weights, bits and codebooks of a finetune.py checkpoint."""
        ckpt = self.setup.ckpt
        load_state_dict(self.model, extract_state_dict(ckpt), source=self.args.resume)
        if self.setup.mode == "linear":
            apply_linear_policy(self.model, self.setup.strategy["strategy"])
            self.adopt_recorded_ranges(ckpt)
        elif ckpt.get("codebooks") is not None:
            self.codebooks = self.recorded_codebooks(ckpt["codebooks"])
        for key in ("fp32_top1", "quant_top1"):
            self.results[key] = ckpt.get(key)
        self.results["best_top1"] = ckpt.get("best_acc", 0.0)
        self.wrap_ddp()
        log.info("loaded %s (epoch %d, recorded top1 %.2f)", self.args.resume, ckpt["epoch"],
                 ckpt.get("acc", float("nan")))

    def recorded_codebooks(self, state):
        """The checkpoint's codebooks, each for a layer of this model; UserError otherwise."""
        unknown = [n for n in state if n not in self.setup.layer_names]
        if unknown:
            raise UserError(f"--resume '{self.args.resume}' holds codebooks of layers this "
                            f"model lacks ({', '.join(map(repr, unknown[:4]))}); "
                            f"{CKPT_EXPECTED}")
        try:
            return load_codebooks(state)
        except (KeyError, TypeError, ValueError, RuntimeError) as exc:
            raise UserError(f"--resume '{self.args.resume}' holds codebooks that cannot be "
                            f"read ({type(exc).__name__}: {str(exc)[:120]}); "
                            f"{CKPT_EXPECTED}") from exc

    def prepare_foreign(self):
        """Evaluation of other weights (e.g. a released checkpoint) under the given policy."""
        load_state_dict(self.model, extract_state_dict(self.setup.foreign), self.args.resume)
        if self.setup.mode == "linear":
            apply_linear_policy(self.model, self.setup.strategy["strategy"])
            ranges = [m.weight_range for _, m in quantizable_layers(self.model, linear=True)]
            if all(float(r.max()) < 0 for r in ranges):   # never calibrated
                calibrate(self.model, self.train_loader, self.device,
                          kl_max_bit=self.args.kl_max_bit)
            else:
                self.kl_max_bit = None   # ranges as stored, by a rule not recorded there

    def adopt_recorded_ranges(self, ckpt):
        """The checkpoint's stored ranges are used as they are (never recalibrated)."""
        recorded = ckpt.get("kl_max_bit")
        if recorded is not None and recorded != self.args.kl_max_bit:
            log.warning("--kl_max_bit %d ignored: %s holds ranges calibrated with --kl_max_bit %d",
                        self.args.kl_max_bit, self.args.resume, recorded)
        self.kl_max_bit = recorded

    def claim_folder(self):
        """Rank 0, as training starts: make the new -runN folder, or clear what --overwrite replaces."""
        if self.folder is None:
            self.folder = new_run_folder(CHECKPOINT_PARENT, default_run_name(self.setup))
        for path in self.replaced:
            log.warning("--overwrite: removing %s of an earlier run", path)
            os.remove(path)
        log.info("output folder %s", self.folder)

    def wrap_ddp(self):
        """DDP wrapper; its construction broadcasts rank 0's weights and calibrated ranges."""
        if is_distributed():
            self.net = nn.parallel.DistributedDataParallel(self.model)

    # ------------------------------------------------------------------ training
    def optimizer(self):
        a = self.args
        return torch.optim.SGD(self.model.parameters(), lr=a.lr, momentum=a.momentum,
                               weight_decay=a.wd)

    def sharer_for_epoch(self, epoch, sharer):
        """K-Means: the centroid sharer; clusters the --free_high_bit layers at the last epoch."""
        if self.codebooks is None:
            return None
        deferred = self.free_layers()
        if deferred and epoch == self.args.epochs - 1:
            log.info("last epoch: clustering the %d layers above 6 bits (%d iterations)",
                     len(deferred), KMEANS_ITERS)
            self.codebooks.update(apply_kmeans_policy(self.model, deferred, n_iter=KMEANS_ITERS,
                                                      is_pruned=self.args.is_pruned,
                                                      seed=self.args.manualSeed))
            sharer = None
        if sharer is None:
            # a pruned model's float layers keep their zeros until they are clustered
            keep_zero = list(self.free_layers()) if self.args.is_pruned else []
            sharer = CentroidSharer(self.model, self.codebooks, keep_zero=keep_zero)
        return sharer

    def checkpoint_dict(self, epoch, acc, optimizer, clustered=None):
        """What a checkpoint holds; ``clustered``: codebooks of free layers clustered for saving."""
        s = self.setup
        codebooks = None if self.codebooks is None else {**self.codebooks, **(clustered or {})}
        return {"state_dict": self.model.state_dict(), "epoch": epoch, "acc": acc,
                "best_acc": self.results["best_top1"], "optimizer": optimizer.state_dict(),
                "arch": s.arch, "dataset": s.dataset, "model_kwargs": s.model_kwargs,
                "mode": s.mode, "policy": s.strategy, "kl_max_bit": self.kl_max_bit,
                "codebooks": None if codebooks is None else codebooks_state_dict(codebooks),
                "fp32_top1": self.results["fp32_top1"], "quant_top1": self.results["quant_top1"],
                "args": vars(self.args)}

    def resumed_optimizer(self):
        """SGD with the resumed checkpoint's state (before any output is written), or fresh."""
        optimizer = self.optimizer()
        if self.setup.ckpt is not None:
            self.load_optimizer(optimizer, self.setup.ckpt["optimizer"])
        return optimizer

    def train(self, writer, logger, optimizer):
        args = self.args
        start_epoch = args.start_epoch
        if self.setup.ckpt is not None:
            start_epoch = self.setup.ckpt["epoch"]
        lr_at = make_lr_schedule(args.lr_type, args.lr, args.epochs, args.warmup_epoch,
                                 args.gamma, args.schedule)
        amp = autocast_dtype(args, self.device)
        scaler = (torch.amp.GradScaler("cuda") if amp == torch.float16 and self.device.type == "cuda"
                  else None)
        sharer, final = None, None
        # the compiled module shares self.net's parameters; checkpoints still save self.model
        net = torch.compile(self.net) if args.compile else self.net
        for epoch in range(start_epoch, args.epochs):
            if is_distributed():
                self.train_loader.sampler.set_epoch(epoch)
            sharer = self.sharer_for_epoch(epoch, sharer)
            tr = train_one_epoch(net, self.train_loader, self.criterion, optimizer,
                                 self.device, epoch, step_hook=sharer and sharer.step,
                                 lr_fn=lr_setter(optimizer, lr_at, epoch), amp=amp,
                                 scaler=scaler, progress=args.progress and self.rank == 0)
            if tr["nonfinite"]:
                raise UserError(f"training diverged (NaN/inf loss) in epoch {epoch + 1}; "
                                "expected a smaller --lr")
            note = self.scored_note()
            # Only a fully quantized model is scored and saved as the best (--free_high_bit).
            with self.all_quantized() as clustered:
                final = self.validate()
                is_best = final["top1"] > self.results["best_top1"]
                self.results["best_top1"] = max(self.results["best_top1"], final["top1"])
                if self.rank == 0 and is_best:
                    self.save_best(epoch + 1, final["top1"], optimizer, clustered)
            if self.rank == 0:
                self.report_epoch(epoch, optimizer, tr, final, writer, logger, note)
                self.save(epoch + 1, final["top1"], optimizer)
        return final

    def load_optimizer(self, optimizer, state):
        """The resumed checkpoint's SGD state; UserError when it belongs to another model."""
        try:
            optimizer.load_state_dict(state)
        except (KeyError, TypeError, ValueError, RuntimeError) as exc:
            raise UserError(f"--resume '{self.args.resume}': its optimizer state does not fit "
                            f"this model ({str(exc)[:120]}); {CKPT_EXPECTED}") from exc

    def report_epoch(self, epoch, optimizer, tr, va, writer, logger, note=""):
        lr = optimizer.param_groups[0]["lr"]
        log.info("epoch %d/%d  lr %.5f  train loss %.4f top1 %.2f  val loss %.4f top1 %.2f top5 "
                 "%.2f  best %.2f%s", epoch + 1, self.args.epochs, lr, tr["loss"], tr["top1"],
                 va["loss"], va["top1"], va["top5"], self.results["best_top1"], note)
        logger.append([epoch + 1, lr, tr["loss"], tr["top1"], va["loss"], va["top1"], va["top5"],
                       self.results["best_top1"]])
        for key, value in (("train/loss", tr["loss"]), ("train/top1", tr["top1"]),
                           ("val/loss", va["loss"]), ("val/top1", va["top1"]),
                           ("val/top5", va["top5"]), ("lr", lr)):
            writer.add_scalar(key, value, epoch + 1)

    def save(self, epoch, acc, optimizer):
        """checkpoint.pth.tar: the training state (free layers float) to resume from."""
        state = self.checkpoint_dict(epoch, acc, optimizer)
        save_checkpoint(state, os.path.join(self.folder, "checkpoint.pth.tar"))

    def save_best(self, epoch, acc, optimizer, clustered):
        """model_best.pth.tar: the fully quantized model that scored ``acc`` (call it inside
        :meth:`all_quantized`, whose codebooks are ``clustered``)."""
        state = self.checkpoint_dict(epoch, acc, optimizer, clustered)
        save_checkpoint(state, os.path.join(self.folder, "model_best.pth.tar"))

    def write_results(self, final, elapsed):
        s, r = self.setup, self.results
        out = {"arch": s.arch, "dataset": s.dataset, "mode": s.mode,
               "strategy_source": s.strategy.get("source"), "layers": len(s.layer_names),
               "kl_max_bit": self.kl_max_bit,
               "fp32_top1": finite_or_none(r["fp32_top1"]),
               "quant_top1": finite_or_none(r["quant_top1"]),
               "best_top1": finite_or_none(r["best_top1"]),
               "final_top1": finite_or_none(final["top1"]) if final else None,
               "epochs": self.args.epochs, "seconds": round(elapsed, 1),
               "checkpoint": os.path.join(self.folder, "checkpoint.pth.tar"),
               "best_checkpoint": os.path.join(self.folder, "model_best.pth.tar")}
        atomic_write_json(os.path.join(self.folder, "results.json"), out)
        return out


def evaluate_model(model, loader, criterion, device, args):
    return evaluate(model, loader, criterion, device, progress=args.progress and _rank0(),
                    amp=autocast_dtype(args, device))


def _rank0():
    return not is_distributed() or torch.distributed.get_rank() == 0


def run_evaluation(run):
    """-e: evaluate a finetune.py checkpoint, other weights, or the freshly quantized policy."""
    if run.setup.ckpt is not None:
        run.prepare_resumed()
        with run.all_quantized():   # a mid-run checkpoint may hold float --free_high_bit layers
            va = run.validate()
        recorded = run.setup.ckpt.get("acc")
        log.info("evaluate: top1 %.4f top5 %.4f (checkpoint recorded top1 %s)%s", va["top1"],
                 va["top5"], "n/a" if recorded is None else f"{recorded:.4f}", run.scored_note())
        return va
    if run.setup.foreign is not None:
        run.prepare_foreign()
        va = run.validate()
    else:
        va = run.prepare_fresh()
    log.info("evaluate: top1 %.4f top5 %.4f", va["top1"], va["top5"])
    return va


def run_training(run, start):
    """Prepare (fresh or resumed), log the start point, train, write results.json."""
    if run.setup.ckpt is not None:
        run.prepare_resumed()
    else:
        run.prepare_fresh()
    optimizer = run.resumed_optimizer()
    writer = logger = None
    resumed = run.setup.ckpt is not None
    if run.rank == 0:
        run.claim_folder()
        remove_stale_tmp(run.folder)
        if resumed:   # rows after the checkpoint's epoch are trained again below
            trim_log(os.path.join(run.folder, "log.txt"), run.setup.ckpt["epoch"] + 1)
        writer, logger = open_run_logs(run.folder, LOG_COLUMNS, resume=resumed)
        if not resumed:   # epoch 0 = right after quantization, before any training
            q = run.results["quant_top1"]
            logger.append([0, 0.0, math.nan, math.nan, math.nan, q, math.nan, math.nan])
            writer.add_scalar("val/top1", q, 0)
            if run.results["fp32_top1"] is not None:
                writer.add_scalar("val/fp32_top1", run.results["fp32_top1"], 0)
    freeze_startup_objects()
    final = run.train(writer, logger, optimizer)
    out = None
    if run.rank == 0:
        writer.close()
        logger.close()
        out = run.write_results(final, time.time() - start)
        log.info("fp32 %s  after quantization %.2f  best %.2f  -> %s",
                 "n/a" if out["fp32_top1"] is None else f"{out['fp32_top1']:.2f}",
                 out["quant_top1"] if out["quant_top1"] is not None else math.nan,
                 out["best_top1"], run.folder)
    return out


def main(argv=None):
    args = argv if isinstance(argv, argparse.Namespace) else get_args_parser().parse_args(argv)
    check_args(args)
    if args.gpu_id is not None:   # before anything touches CUDA
        os.environ["CUDA_VISIBLE_DEVICES"] = args.gpu_id
    device, rank, world = init_distributed(args.device)
    setup_logging(rank=rank)
    seed_everything(args.manualSeed)
    if args.gpu_id and "," in args.gpu_id and world == 1:
        log.info("--gpu_id lists several GPUs; this process uses one (run under torchrun "
                 "--nproc_per_node N to use N)")
    start = time.time()
    try:
        setup = resolve_setup(args)
        folder = output_folder(args, setup)
        replaced = check_output(args, setup, folder)
        run = Finetune(args, setup, device, rank, folder, replaced)
        log.info("%s: %s mode, %d layers, policy from %s, dataset %s, %d process(es) on %s",
                 setup.arch, setup.mode, len(setup.layer_names),
                 setup.strategy.get("source", args.resume), setup.dataset, world, device)
        if args.evaluate:
            return run_evaluation(run)
        return run_training(run, start)
    finally:
        cleanup()


if __name__ == "__main__":
    run_cli(main)
