"""Quantization-aware fine-tuning (and evaluation) of one HAQ policy.

The policy comes from a search (its strategy.json) or a preset (the paper's published
policies); K-Means mode shares weights by cluster (``--free_high_bit`` leaves layers
above 6 bits free until the last epoch), linear mode trains with fake-quantized weights
and activations. The checkpoint records everything needed to evaluate it again.

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
from dataclasses import dataclass, field

import torch
import torch.nn as nn

from lib.quantize import (CentroidSharer, apply_kmeans_policy, apply_linear_policy, calibrate,
                          codebooks_state_dict, load_codebooks)
from lib.utils.checkpoint import (atomic_write_json, extract_state_dict, load_checkpoint,
                                  load_state_dict, save_checkpoint)
from lib.utils.cli import ArgumentParser
from lib.utils.data_utils import get_dataset, list_datasets
from lib.utils.distributed import cleanup, init_distributed, is_distributed, sync_buffers
from lib.utils.errors import UserError, run_cli
from lib.utils.layers import quantizable_layers
from lib.utils.logger import setup_logging
from lib.utils.lr_schedule import LR_TYPES, make_lr_schedule
from lib.utils.run_utils import (check_input_size, lr_setter, model_kwargs_for, open_run_logs,
                                 seed_everything)
from lib.utils.strategy import list_presets, load_strategy, validate_strategy
from lib.utils.train import evaluate, train_one_epoch
from models import float_twin, get_model, list_models, load_pretrained_weights

log = logging.getLogger("finetune")

KMEANS_ITERS = 50   # Lloyd iterations when fine-tuning (the search uses 3)
DEFAULT_ARCH = {"kmeans": "mobilenetv2", "linear": "qmobilenetv2"}
LOG_COLUMNS = ["epoch", "lr", "train_loss", "train_top1", "val_loss", "val_top1", "val_top5",
               "best_top1"]


def get_args_parser():
    p = ArgumentParser(description="HAQ: fine-tune or evaluate a quantization policy")
    bool_flag = argparse.BooleanOptionalAction
    p.add_argument("-d", "--data", default=None, help="dataset root (default data/<data_name>)")
    p.add_argument("--data_name", default=None,
                   help=f"{', '.join(list_datasets())} or an ImageFolder root (default: the "
                        "strategy's or checkpoint's dataset, else mnist5k)")
    p.add_argument("-j", "--workers", type=int, default=0, help="data loading workers")
    p.add_argument("--epochs", type=int, default=30)
    p.add_argument("--start_epoch", type=int, default=0, help="first epoch (a resume overrides it)")
    p.add_argument("--warmup_epoch", type=float, default=0, help="epochs of linear lr warmup")
    p.add_argument("--train_batch", type=int, default=256, help="per process")
    p.add_argument("--test_batch", type=int, default=512)
    p.add_argument("--lr", "--learning-rate", type=float, default=0.01)
    p.add_argument("--lr_type", default="cos", choices=LR_TYPES)
    p.add_argument("--schedule", type=int, nargs="+", default=[31, 61, 91],
                   help="epochs where --lr_type step multiplies the lr by --gamma")
    p.add_argument("--gamma", type=float, default=0.1, help="lr factor (step: per milestone, exp: per epoch)")
    p.add_argument("--momentum", type=float, default=0.9)
    p.add_argument("--weight-decay", "--wd", dest="wd", type=float, default=4e-5)
    p.add_argument("-c", "--checkpoint", default=None,
                   help="output folder (default checkpoints/<arch>_<data_name>_<mode>_finetune)")
    p.add_argument("--resume", default="", help="a finetune.py checkpoint to continue or evaluate")
    p.add_argument("--pretrained", action=bool_flag, default=True,
                   help="start from the pretrained weights (--pretrained_path)")
    p.add_argument("--pretrained_path", default=None,
                   help="pretrained weights (default checkpoints/pretrained/<arch>[_<data_name>].pth.tar)")
    p.add_argument("--strategy", default=None,
                   help=f"strategy.json of a search, or a preset: {', '.join(list_presets())}")
    p.add_argument("--linear_quantization", action=bool_flag, default=None,
                   help="linear (weights + activations) instead of K-Means (default: the strategy's mode)")
    p.add_argument("--free_high_bit", action=bool_flag, default=True,
                   help="K-Means: leave layers above 6 bits free, cluster them at the last epoch")
    p.add_argument("--is_pruned", action=bool_flag, default=False,
                   help="K-Means: zero weights are pruned (kept out of clustering, stay zero)")
    p.add_argument("--half", action=bool_flag, default=False,
                   help="mixed precision via torch autocast (fp16 on GPU, bf16 on CPU)")
    p.add_argument("-a", "--arch", default=None, metavar="ARCH",
                   help=f"model: {', '.join(list_models())}, or a torchvision classifier by name "
                        "(K-Means mode); default: the strategy's arch")
    p.add_argument("--width_mult", type=float, default=None,
                   help="MobileNet width (default: the strategy's, else the dataset's: 0.5 on mnist5k)")
    p.add_argument("--input_size", type=int, default=None,
                   help="image size in pixels (default: the strategy's, else the dataset's: 224, "
                        "32 for mnist5k)")
    p.add_argument("--min_bit", type=int, default=1, help="lowest bit width a policy may use")
    p.add_argument("--max_bit", type=int, default=8, help="highest bit width a policy may use")
    p.add_argument("--manualSeed", type=int, default=2019, help="seed (set once, here)")
    p.add_argument("-e", "--evaluate", action="store_true", help="evaluate only, no training")
    p.add_argument("--eval_fp32", action=bool_flag, default=True,
                   help="also measure the accuracy before quantization")
    p.add_argument("--gpu_id", default=None, help="CUDA_VISIBLE_DEVICES for this run, e.g. 0,1")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--train_subset", type=int, default=None,
                   help="use only the first N images of each split (smoke tests)")
    p.add_argument("--progress", action=bool_flag, default=True,
                   help="progress bars (shown only on a terminal)")
    return p


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


def _setup_from_checkpoint(args, ckpt):
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
    model = get_model(setup.arch, **setup.model_kwargs).to(device)
    linear = setup.mode == "linear"
    names = [name for name, _ in quantizable_layers(model, linear=linear)]
    if not names:
        raise UserError(f"arch '{setup.arch}' has no {'QConv2d/QLinear' if linear else 'Conv2d/Linear'} "
                        "layers; linear mode expects a quantized arch (qmobilenet, qmobilenetv2, "
                        "qresnet50)")
    setup.strategy = validate_strategy(setup.strategy, names, setup.mode, args.min_bit, args.max_bit)
    setup.layer_names = names
    return model


def quantize(model, setup, args, calib_loader, device):
    """Apply the policy to float weights; return the K-Means codebooks (None in linear mode)."""
    policy = setup.strategy["strategy"]
    if setup.mode == "linear":
        apply_linear_policy(model, policy)
        calibrate(model, calib_loader, device)
        return None
    start = time.time()
    # --evaluate scores the whole policy, so no layer is left free there
    free = args.free_high_bit and not args.evaluate
    codebooks = apply_kmeans_policy(model, policy, n_iter=KMEANS_ITERS, is_pruned=args.is_pruned,
                                    free_high_bit=free, seed=args.manualSeed)
    log.info("K-Means (%d iterations) of %d layers took %.1fs", KMEANS_ITERS, len(codebooks),
             time.time() - start)
    return codebooks


def deferred_layers(setup, codebooks):
    """{name: bits} of the K-Means layers --free_high_bit has left float so far."""
    return {n: b for n, b in zip(setup.layer_names, setup.strategy["strategy"])
            if n not in codebooks}


def default_output(setup):
    return os.path.join("checkpoints", f"{setup.arch}_{setup.dataset}_{setup.mode}_finetune")


class Finetune:
    """One run: the model, its data, its quantization state and the epoch loop."""

    def __init__(self, args, setup, device, rank):
        self.args, self.setup, self.device, self.rank = args, setup, device, rank
        self.folder = args.checkpoint or default_output(setup)
        self.criterion = nn.CrossEntropyLoss()
        self.model = build_model(setup, args, device)
        self.train_loader, self.val_loader, _ = get_dataset(
            setup.dataset, args.train_batch, args.workers, args.data, distributed=is_distributed(),
            train_subset=args.train_subset, val_batch_size=args.test_batch,
            input_size=setup.model_kwargs.get("input_size"))
        self.codebooks = None
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
        va = self.validate()
        self.results["quant_top1"] = va["top1"]
        deferred = deferred_layers(setup, self.codebooks) if self.codebooks is not None else {}
        note = (f" ({len(deferred)} layers above 6 bits float until the last epoch: "
                "--free_high_bit)") if deferred else ""
        log.info("acc after quantization: top1 %.2f top5 %.2f%s", va["top1"], va["top5"], note)
        return va

    def prepare_resumed(self):
        """Weights, bits and codebooks of a finetune.py checkpoint."""
        ckpt = self.setup.ckpt
        load_state_dict(self.model, extract_state_dict(ckpt), source=self.args.resume)
        if self.setup.mode == "linear":
            apply_linear_policy(self.model, self.setup.strategy["strategy"])
        elif ckpt.get("codebooks") is not None:
            self.codebooks = load_codebooks(ckpt["codebooks"])
        for key in ("fp32_top1", "quant_top1"):
            self.results[key] = ckpt.get(key)
        self.results["best_top1"] = ckpt.get("best_acc", 0.0)
        self.wrap_ddp()
        log.info("loaded %s (epoch %d, recorded top1 %.2f)", self.args.resume, ckpt["epoch"],
                 ckpt.get("acc", float("nan")))

    def prepare_foreign(self):
        """Evaluation of other weights (e.g. a released checkpoint) under the given policy."""
        load_state_dict(self.model, extract_state_dict(self.setup.foreign), self.args.resume)
        if self.setup.mode == "linear":
            apply_linear_policy(self.model, self.setup.strategy["strategy"])
            ranges = [m.weight_range for _, m in quantizable_layers(self.model, linear=True)]
            if all(float(r.max()) < 0 for r in ranges):   # never calibrated
                calibrate(self.model, self.train_loader, self.device)

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
        deferred = deferred_layers(self.setup, self.codebooks)
        if deferred and epoch == self.args.epochs - 1:
            log.info("last epoch: clustering the %d layers above 6 bits (%d iterations)",
                     len(deferred), KMEANS_ITERS)
            self.codebooks.update(apply_kmeans_policy(self.model, deferred, n_iter=KMEANS_ITERS,
                                                      is_pruned=self.args.is_pruned,
                                                      seed=self.args.manualSeed))
            sharer = None
        return sharer or CentroidSharer(self.model, self.codebooks)

    def checkpoint_dict(self, epoch, acc, optimizer):
        s = self.setup
        return {"state_dict": self.model.state_dict(), "epoch": epoch, "acc": acc,
                "best_acc": self.results["best_top1"], "optimizer": optimizer.state_dict(),
                "arch": s.arch, "dataset": s.dataset, "model_kwargs": s.model_kwargs,
                "mode": s.mode, "policy": s.strategy,
                "codebooks": None if self.codebooks is None else codebooks_state_dict(self.codebooks),
                "fp32_top1": self.results["fp32_top1"], "quant_top1": self.results["quant_top1"],
                "args": vars(self.args)}

    def train(self, writer, logger):
        args = self.args
        optimizer = self.optimizer()
        start_epoch = args.start_epoch
        if self.setup.ckpt is not None:
            optimizer.load_state_dict(self.setup.ckpt["optimizer"])
            start_epoch = self.setup.ckpt["epoch"]
        lr_at = make_lr_schedule(args.lr_type, args.lr, args.epochs, args.warmup_epoch,
                                 args.gamma, args.schedule)
        scaler = torch.amp.GradScaler("cuda") if args.half and self.device.type == "cuda" else None
        sharer, final = None, None
        for epoch in range(start_epoch, args.epochs):
            if is_distributed():
                self.train_loader.sampler.set_epoch(epoch)
            sharer = self.sharer_for_epoch(epoch, sharer)
            tr = train_one_epoch(self.net, self.train_loader, self.criterion, optimizer,
                                 self.device, epoch, step_hook=sharer and sharer.step,
                                 lr_fn=lr_setter(optimizer, lr_at, epoch), amp=args.half,
                                 scaler=scaler, progress=args.progress and self.rank == 0)
            if tr["nonfinite"]:
                raise UserError(f"training diverged (NaN/inf loss) in epoch {epoch + 1}; "
                                "expected a smaller --lr")
            final = self.validate()
            is_best = final["top1"] > self.results["best_top1"]
            self.results["best_top1"] = max(self.results["best_top1"], final["top1"])
            if self.rank == 0:
                self.report_epoch(epoch, optimizer, tr, final, writer, logger)
                self.save(epoch + 1, final["top1"], optimizer, is_best)
        return final

    def report_epoch(self, epoch, optimizer, tr, va, writer, logger):
        lr = optimizer.param_groups[0]["lr"]
        log.info("epoch %d/%d  lr %.5f  train loss %.4f top1 %.2f  val loss %.4f top1 %.2f top5 "
                 "%.2f  best %.2f", epoch + 1, self.args.epochs, lr, tr["loss"], tr["top1"],
                 va["loss"], va["top1"], va["top5"], self.results["best_top1"])
        logger.append([epoch + 1, lr, tr["loss"], tr["top1"], va["loss"], va["top1"], va["top5"],
                       self.results["best_top1"]])
        for key, value in (("train/loss", tr["loss"]), ("train/top1", tr["top1"]),
                           ("val/loss", va["loss"]), ("val/top1", va["top1"]),
                           ("val/top5", va["top5"]), ("lr", lr)):
            writer.add_scalar(key, value, epoch + 1)

    def save(self, epoch, acc, optimizer, is_best):
        state = self.checkpoint_dict(epoch, acc, optimizer)
        save_checkpoint(state, os.path.join(self.folder, "checkpoint.pth.tar"))
        if is_best:
            save_checkpoint(state, os.path.join(self.folder, "model_best.pth.tar"))

    def write_results(self, final, elapsed):
        s, r = self.setup, self.results
        out = {"arch": s.arch, "dataset": s.dataset, "mode": s.mode,
               "strategy_source": s.strategy.get("source"), "layers": len(s.layer_names),
               "fp32_top1": r["fp32_top1"], "quant_top1": r["quant_top1"],
               "best_top1": r["best_top1"], "final_top1": final["top1"] if final else None,
               "epochs": self.args.epochs, "seconds": round(elapsed, 1),
               "checkpoint": os.path.join(self.folder, "checkpoint.pth.tar"),
               "best_checkpoint": os.path.join(self.folder, "model_best.pth.tar")}
        atomic_write_json(os.path.join(self.folder, "results.json"), out)
        return out


def evaluate_model(model, loader, criterion, device, args):
    return evaluate(model, loader, criterion, device, progress=args.progress and _rank0(),
                    amp=args.half)


def _rank0():
    return not is_distributed() or torch.distributed.get_rank() == 0


def run_evaluation(run):
    """-e: evaluate a finetune.py checkpoint, other weights, or the freshly quantized policy."""
    if run.setup.ckpt is not None:
        run.prepare_resumed()
        va = run.validate()
        recorded = run.setup.ckpt.get("acc")
        log.info("evaluate: top1 %.4f top5 %.4f (checkpoint recorded top1 %s)", va["top1"],
                 va["top5"], "n/a" if recorded is None else f"{recorded:.4f}")
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
    writer = logger = None
    resumed = run.setup.ckpt is not None
    if run.rank == 0:
        writer, logger = open_run_logs(run.folder, LOG_COLUMNS, resume=resumed)
        if not resumed:   # epoch 0 = right after quantization, before any training
            q = run.results["quant_top1"]
            logger.append([0, 0.0, math.nan, math.nan, math.nan, q, math.nan, math.nan])
            writer.add_scalar("val/top1", q, 0)
            if run.results["fp32_top1"] is not None:
                writer.add_scalar("val/fp32_top1", run.results["fp32_top1"], 0)
    final = run.train(writer, logger)
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
    if args.gpu_id is not None:   # before anything touches CUDA
        os.environ["CUDA_VISIBLE_DEVICES"] = args.gpu_id
    device, rank, world = init_distributed(args.device)
    setup_logging(rank=rank)
    check_input_size(args.input_size)
    seed_everything(args.manualSeed)
    if args.gpu_id and "," in args.gpu_id and world == 1:
        log.info("--gpu_id lists several GPUs; this process uses one (run under torchrun "
                 "--nproc_per_node N to use N)")
    start = time.time()
    try:
        setup = resolve_setup(args)
        run = Finetune(args, setup, device, rank)
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
