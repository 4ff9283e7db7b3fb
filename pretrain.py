"""Full-precision training of any registry model or torchvision classifier on any supported dataset.

Makes the "pretrained" model the search starts from when no checkpoint can be
downloaded (the embedded default: a reduced-width MobileNet-V2 on mnist5k).
SGD + cosine schedule, TensorBoard + log.txt, checkpoint/resume, runs under
``torchrun`` (DDP; rank 0 writes).

    python pretrain.py --arch mobilenetv2 --dataset mnist5k
    torchrun --nproc_per_node 2 pretrain.py --arch mobilenetv2 --dataset mnist5k --device cpu
"""
import argparse
import contextlib
import logging
import math
import os
import time

import torch
import torch.nn as nn
from torch.optim.swa_utils import AveragedModel

from lib.utils.checkpoint import (load_checkpoint, load_state_dict, remove_stale_tmp,
                                  save_checkpoint)
from lib.utils import cli
from lib.utils.cli import ArgumentParser
from lib.utils.data_utils import data_generators, get_dataset, list_datasets
from lib.utils.distributed import (all_gather_json, check_same_args, cleanup, get_rank,
                                   get_world_size, init_distributed, is_distributed,
                                   model_tensors, ranks_agree, sync_buffers)
from lib.utils.errors import UserError, error_reason, run_cli
from lib.utils.lock import FolderLock
from lib.utils.logger import setup_logging, trim_log
from lib.utils.lr_schedule import make_lr_schedule
from lib.utils.run_utils import (lr_setter, memory_format, model_kwargs_for, open_run_logs,
                                 seed_everything)
from lib.utils.lr_schedule import LR_TYPES
from lib.utils.train import HALF_TYPES, autocast_dtype, evaluate, train_one_epoch
from models import default_pretrained_path, get_model, list_models

log = logging.getLogger("pretrain")


def get_args_parser():
    p = ArgumentParser(description="Full-precision training (HAQ's pretrained models)")
    p.add_argument("-a", "--arch", default="mobilenetv2", choices=list_models(include_torchvision=True),
                   metavar="ARCH",
                   help="model to train: a registry name or a torchvision classifier")
    p.add_argument("--dataset", default="mnist5k",
                   help=f"{', '.join(list_datasets())} or an ImageFolder root")
    p.add_argument("--dataset_root", default=None, help="dataset folder (default data/<dataset>)")
    p.add_argument("--width_mult", type=cli.width_mult, default=None,
                   help="MobileNet width (default: the dataset's, 0.5 on mnist5k)")
    p.add_argument("--input_size", type=cli.input_size, default=None,
                   help="image size in pixels (default: the dataset's, 224 or 32 for mnist5k); "
                        "<= 64 px gets small-image transforms and the CIFAR-style stem")
    p.add_argument("--epochs", type=cli.positive_int, default=15)
    p.add_argument("-b", "--batch_size", type=cli.positive_int, default=32, help="per process")
    p.add_argument("--lr", type=cli.learning_rate, default=0.05)
    p.add_argument("--momentum", type=cli.below_one, default=0.9)
    p.add_argument("--wd", "--weight-decay", dest="wd", type=cli.below_one, default=1e-4)
    p.add_argument("--warmup_epochs", type=cli.nonneg_float, default=0.5,
                   help="epochs of linear lr warmup (at most --epochs)")
    p.add_argument("--label_smoothing", type=cli.below_one, default=0.1)
    p.add_argument("--ema_decay", type=cli.below_one, default=0.995,
                   help="per-step decay of an exponential moving average of the weights and BN "
                        "statistics; when > 0 the average is evaluated and saved (0 = off)")
    cli.bool_flag(p, "--channels_last", True,
                  "channels-last memory format (about 1.3x faster MobileNet steps on CPU)")
    p.add_argument("-j", "--workers", type=cli.workers_int, default=0)
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    cli.add_threads_argument(p)
    p.add_argument("--output", default=None,
                   help="checkpoint path (default checkpoints/pretrained/<arch>_<dataset>.pth.tar)")
    cli.bool_flag(p, "--resume", False, "continue from --output if it exists")
    p.add_argument("--seed", type=cli.seed_int, default=2019,
                   help="fixes the initial weights, the data order and the augmentation")
    cli.bool_flag(p, "--deterministic", True,
                  "torch's deterministic algorithms where they exist (warns where not)")
    p.add_argument("--train_subset", type=cli.positive_int, default=None,
                   help="use only the first N images of each split (smoke tests)")
    cli.bool_flag(p, "--progress", True, "progress bars (shown only on a terminal)")
    # the released ImageNet recipe (run/run_pretrain.sh): --lr_type cos --half, no warmup,
    # label smoothing or averaging
    p.add_argument("--lr_type", default="cos", choices=LR_TYPES,
                   help="lr schedule (as finetune.py's; step/exp take --gamma per milestone/epoch)")
    p.add_argument("--schedule", type=cli.positive_int, nargs="+", default=[31, 61, 91],
                   help="epochs where --lr_type step multiplies the lr by --gamma")
    p.add_argument("--gamma", type=cli.fraction, default=0.1, help="lr factor of step/exp")
    cli.bool_flag(p, "--nesterov", True, "Nesterov momentum")
    cli.bool_flag(p, "--half", False, "mixed precision via torch autocast (see --half_type); "
                  "fp16 on a GPU uses a gradient scaler")
    p.add_argument("--half_type", default="O1", choices=sorted(HALF_TYPES),
                   help="with --half: as finetune.py's (O1-O3: fp16 on GPU, bf16 on CPU; or "
                        "fp16, bf16)")
    return p


def check_args(args):
    """Cross-flag and output checks, before any data or model is loaded."""
    if args.warmup_epochs > args.epochs:
        raise UserError(f"--warmup_epochs {args.warmup_epochs:g} is longer than the run; expected "
                        f"at most --epochs ({args.epochs})")
    output = args.output or default_pretrained_path(args.arch, args.dataset)
    cli.check_output_file(output, "--output")
    cli.check_output_dir(log_folder(output), "--output (its _log folder)")
    return output


def log_folder(output):
    """Where log.txt and the TensorBoard events of ``output`` go: <output without .pth.tar>_log."""
    stem = output[:-len(".pth.tar")] if output.endswith(".pth.tar") else os.path.splitext(output)[0]
    return stem + "_log"


def make_reproducible(args):
    """Fix what makes two runs of the same command differ; returns the CPU thread count.

    The seed fixes the weights and (through generators of their own) the data order and
    augmentation; deterministic algorithms fix kernel choice on CUDA; the thread count
    (--threads or OMP_NUM_THREADS) is the user's and is recorded, since it changes the
    rounding of CPU reductions. Runs agree bit for bit only at the same thread count, on
    the same CPU type and torch build.
    """
    threads = cli.apply_threads(args)
    if args.deterministic:
        # cuBLAS needs this set before its first call to pick reproducible kernels.
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False
    seed_everything(args.seed)
    return threads


def thread_source(args):
    """Where the thread count came from, for the log."""
    if getattr(args, "threads", None) is not None:
        return "--threads"
    omp = os.environ.get("OMP_NUM_THREADS")
    return f"OMP_NUM_THREADS={omp}" if omp else "torch's default; --threads N fixes it"


def ema_update(decay):
    """``multi_avg_fn`` for AveragedModel: avg <- d * avg + (1 - d) * current.

    d = min(decay, (1 + n) / (10 + n)) after n updates, so the random initial
    weights fade within a few dozen steps instead of lingering for 1 / (1 - decay).
    Integer buffers (BN's step counters) take the current value.
    """
    def update(averaged, current, num_averaged):
        n = float(num_averaged)
        d = min(decay, (1.0 + n) / (10.0 + n))
        for avg, cur in zip(averaged, current):
            if avg.is_floating_point():
                avg.lerp_(cur, 1.0 - d)
            else:
                avg.copy_(cur)
    return update


def random_streams(loader):
    """The generators an epoch draws from, by name: the loader's own (data order, mnist5k's
    augmentation) and torch's global ones (dropout, torchvision's transforms; CUDA's on a
    GPU). Python's and NumPy's generators are not drawn from while training."""
    gens = data_generators(loader)
    gens["torch"] = torch.default_generator
    if torch.cuda.is_available():
        gens.update({f"cuda:{i}": g for i, g in enumerate(torch.cuda.default_generators)})
    return gens


def stream_states(loader):
    """Every rank's generator states, in rank order (the checkpoint's "rng")."""
    mine = {name: g.get_state().tolist() for name, g in random_streams(loader).items()}
    return [{name: torch.tensor(state, dtype=torch.uint8) for name, state in rank.items()}
            for rank in all_gather_json(mine)]


def restore_streams(output, loader, states):
    """Continue every generator where the checkpoint's run left it, so a resumed run draws
    the data order and augmentation an uninterrupted one would.

    A checkpoint of an older version, or of a run on another number of ranks or devices,
    records no states that fit: the run goes on with a warning (its data order then differs).
    """
    gens, rank = random_streams(loader), get_rank()
    mine = states[rank] if isinstance(states, list) and len(states) == get_world_size() else None
    if not isinstance(mine, dict) or set(mine) != set(gens):
        log.warning("--resume: '%s' records no generator states that fit %d rank(s) with "
                    "generators %s; the resumed epochs draw another data order than an "
                    "uninterrupted run would", output, get_world_size(), ", ".join(sorted(gens)))
        return
    if not all(isinstance(t, torch.Tensor) and t.dtype == torch.uint8 for t in mine.values()):
        raise UserError(f"--resume: the generator states in '{output}' are not byte tensors; "
                        f"{RESUME_EXPECTED}")
    try:
        for name, gen in gens.items():
            gen.set_state(mine[name])
    except RuntimeError as exc:
        raise UserError(f"--resume: the generator states in '{output}' do not fit "
                        f"({error_reason(exc)}); {RESUME_EXPECTED}") from exc


RESUME_EXPECTED = "expected a checkpoint written by an earlier pretrain.py run of this --arch"


def _resume_fields(output, ckpt):
    """(weights, epoch, best_acc) of a pretrain.py checkpoint; UserError naming what is wrong."""
    if not isinstance(ckpt, dict) or not isinstance(ckpt.get("optimizer"), dict):
        raise UserError(f"--resume: '{output}' holds no optimizer state (a weights-only file?); "
                        f"{RESUME_EXPECTED}")
    epoch, best = ckpt.get("epoch"), ckpt.get("best_acc", 0.0)
    if type(epoch) is not int or epoch < 0:
        raise UserError(f"--resume: '{output}' records epoch {epoch!r}; {RESUME_EXPECTED}")
    if type(best) not in (int, float) or not math.isfinite(best):
        raise UserError(f"--resume: '{output}' records best_acc {best!r}; {RESUME_EXPECTED}")
    weights = ckpt.get("train_state_dict", ckpt.get("state_dict"))
    if not isinstance(weights, dict):
        raise UserError(f"--resume: '{output}' holds no state_dict; {RESUME_EXPECTED}")
    return weights, epoch, float(best)


def resume_from(output, model, optimizer, ema, epochs, loader):
    """Load the training state of ``output`` (``loader``'s generators too); returns
    (start_epoch, best_acc).

    Everything is checked before training starts, so a file that does not fit is a
    one-line error and is left as it was.
    """
    ckpt = load_checkpoint(output)
    weights, start_epoch, best_acc = _resume_fields(output, ckpt)
    if start_epoch >= epochs:
        raise UserError(f"--resume: '{output}' has already trained {start_epoch} epochs; "
                        "expected --epochs above that to continue")
    load_state_dict(model, weights, source=output)
    try:
        optimizer.load_state_dict(ckpt["optimizer"])
        if ema is not None and "ema" in ckpt:
            ema.load_state_dict(ckpt["ema"])
    except (KeyError, TypeError, ValueError, RuntimeError) as exc:
        raise UserError(f"--resume: the optimizer or averaged-weights state in '{output}' does "
                        f"not fit ({error_reason(exc)}); {RESUME_EXPECTED}") from exc
    restore_streams(output, loader, ckpt.get("rng"))
    log.info("resumed from %s at epoch %d", output, start_epoch)
    return start_epoch, best_acc


def main(argv=None):
    args = argv if isinstance(argv, argparse.Namespace) else get_args_parser().parse_args(argv)
    output = check_args(args)
    device, rank, world = init_distributed(args.device)
    check_same_args(args)
    setup_logging(rank=rank)
    # one run per --output: rank 0 holds its log folder's lock until the run ends
    lock = (FolderLock(log_folder(output), "--output (its _log folder)") if rank == 0
            else contextlib.nullcontext())
    with lock:
        return train(args, output, device, rank, world)


def train(args, output, device, rank, world):
    """The run itself: model, data, resume, the epochs and their checkpoints."""
    threads = make_reproducible(args)
    if rank == 0:
        log.info("seed %d, %d CPU thread(s) (%s), deterministic algorithms %s", args.seed,
                 threads, thread_source(args), "on" if args.deterministic else "off")
    model_kwargs = model_kwargs_for(args.arch, args.dataset, args.dataset_root, args.width_mult,
                                    args.input_size)
    model = memory_format(get_model(args.arch, **model_kwargs).to(device), args.channels_last)
    train_loader, val_loader, _ = get_dataset(args.dataset, args.batch_size, args.workers,
                                              args.dataset_root, distributed=is_distributed(),
                                              train_subset=args.train_subset, val_batch_size=256,
                                              seed=args.seed,
                                              input_size=model_kwargs["input_size"])
    log_dir = log_folder(output)
    optimizer = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=args.momentum,
                                weight_decay=args.wd, nesterov=args.nesterov)
    # The average starts as a copy of the weights and is updated after every step.
    ema = (AveragedModel(model, multi_avg_fn=ema_update(args.ema_decay), use_buffers=True)
           if args.ema_decay > 0 else None)
    kept = [model] if ema is None else [model, ema.module]   # must match across ranks
    start_epoch, best_acc, acc = 0, 0.0, None
    if args.resume and os.path.isfile(output):
        start_epoch, best_acc = resume_from(output, model, optimizer, ema, args.epochs,
                                            train_loader)
    elif args.resume:
        raise UserError(f"--resume given but '{output}' does not exist; expected a checkpoint "
                        "written by an earlier pretrain.py run")
    net = nn.parallel.DistributedDataParallel(model) if is_distributed() else model
    criterion = nn.CrossEntropyLoss(label_smoothing=args.label_smoothing)
    lr_at = make_lr_schedule(args.lr_type, args.lr, args.epochs, args.warmup_epochs, args.gamma,
                             args.schedule)
    amp = autocast_dtype(args, torch.device(device))
    scaler = (torch.amp.GradScaler("cuda") if amp == torch.float16
              and torch.device(device).type == "cuda" else None)
    writer = logger = None
    if rank == 0:
        remove_stale_tmp(os.path.dirname(os.path.abspath(output)))
        if start_epoch:   # rows after the checkpoint's epoch are trained again below
            trim_log(os.path.join(log_dir, "log.txt"), start_epoch + 1)
        writer, logger = open_run_logs(
            log_dir, ["epoch", "lr", "train_loss", "train_top1", "val_loss", "val_top1", "val_top5"],
            resume=args.resume)
    start = time.time()
    for epoch in range(start_epoch, args.epochs):
        if is_distributed():
            train_loader.sampler.set_epoch(epoch)
        tr = train_one_epoch(net, train_loader, criterion, optimizer, device, epoch,
                             lr_fn=lr_setter(optimizer, lr_at, epoch),
                             step_hook=None if ema is None else lambda: ema.update_parameters(model),
                             progress=args.progress and rank == 0, amp=amp, scaler=scaler)
        if tr["nonfinite"]:
            raise UserError(f"training diverged (NaN/inf loss) in epoch {epoch}; expected a "
                            "smaller --lr")
        sync_buffers(*kept)   # no-op outside torchrun
        scored = net if ema is None else ema.module
        va = evaluate(scored, val_loader, criterion, device, progress=args.progress and rank == 0,
                      amp=amp)
        acc, best_acc = va["top1"], max(best_acc, va["top1"])
        rng = stream_states(train_loader)   # a collective: every rank sends its own
        if rank == 0:
            lr = optimizer.param_groups[0]["lr"]
            log.info("epoch %d/%d  lr %.4f  train loss %.4f top1 %.2f  val loss %.4f top1 %.2f "
                     "top5 %.2f  (%.0fs)", epoch + 1, args.epochs, lr, tr["loss"], tr["top1"],
                     va["loss"], va["top1"], va["top5"], time.time() - start)
            logger.append([epoch + 1, lr, tr["loss"], tr["top1"], va["loss"], va["top1"], va["top5"]])
            for k, v in (("train/loss", tr["loss"]), ("train/top1", tr["top1"]), ("val/loss", va["loss"]),
                         ("val/top1", va["top1"]), ("val/top5", va["top5"]), ("lr", lr)):
                writer.add_scalar(k, v, epoch + 1)
            state = {"state_dict": model.state_dict(), "epoch": epoch + 1, "best_acc": best_acc,
                     "acc": va["top1"], "optimizer": optimizer.state_dict(),
                     "arch": args.arch, "dataset": args.dataset, "model_kwargs": model_kwargs,
                     "seed": args.seed, "num_threads": threads, "rng": rng}
            if ema is not None:  # the scored (averaged) weights are what later steps load
                state.update(state_dict=ema.module.state_dict(), ema=ema.state_dict(),
                             train_state_dict=model.state_dict())
            save_checkpoint(state, output)
    if is_distributed():
        agree = all(ranks_agree(model_tensors(m), device) for m in kept)
        if rank == 0:
            log.info("weights %s on %d ranks", "identical" if agree else "DIFFER", world)
    if rank == 0:
        writer.close()
        logger.close()
        log.info("wrote %s (last epoch's val top1 %s, best %.2f, %.0fs)", output,
                 "-" if acc is None else f"{acc:.2f}", best_acc, time.time() - start)
    cleanup()
    return output


if __name__ == "__main__":
    run_cli(main)
