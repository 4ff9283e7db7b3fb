"""Full-precision training of any registry model on any supported dataset.

Makes the "pretrained" model the search starts from when no checkpoint can be
downloaded (the embedded default: a reduced-width MobileNet-V2 on mnist5k).
SGD + cosine schedule, TensorBoard + log.txt, checkpoint/resume, runs under
``torchrun`` (DDP; rank 0 writes).

    python pretrain.py --arch mobilenetv2 --dataset mnist5k
    torchrun --nproc_per_node 2 pretrain.py --arch mobilenetv2 --dataset mnist5k --device cpu
"""
import argparse
import logging
import os
import time

import torch
import torch.nn as nn
from torch.optim.swa_utils import AveragedModel

from lib.utils.checkpoint import load_checkpoint, load_state_dict, save_checkpoint
from lib.utils.cli import ArgumentParser
from lib.utils.data_utils import get_dataset, list_datasets
from lib.utils.distributed import (cleanup, init_distributed, is_distributed, model_tensors,
                                   ranks_agree, sync_buffers)
from lib.utils.errors import UserError, run_cli
from lib.utils.logger import setup_logging
from lib.utils.lr_schedule import make_lr_schedule
from lib.utils.run_utils import (check_input_size, lr_setter, model_kwargs_for, open_run_logs,
                                 seed_everything)
from lib.utils.train import evaluate, train_one_epoch
from models import default_pretrained_path, get_model, list_models

log = logging.getLogger("pretrain")


def get_args_parser():
    p = ArgumentParser(description="Full-precision training (HAQ's pretrained models)")
    p.add_argument("-a", "--arch", default="mobilenetv2", choices=list_models(),
                   help="model to train")
    p.add_argument("--dataset", default="mnist5k",
                   help=f"{', '.join(list_datasets())} or an ImageFolder root")
    p.add_argument("--dataset_root", default=None, help="dataset folder (default data/<dataset>)")
    p.add_argument("--width_mult", type=float, default=None,
                   help="MobileNet width (default: the dataset's, 0.5 on mnist5k)")
    p.add_argument("--input_size", type=int, default=None,
                   help="image size in pixels (default: the dataset's, 224 or 32 for mnist5k); "
                        "<= 64 px gets small-image transforms and the CIFAR-style stem")
    p.add_argument("--epochs", type=int, default=15)
    p.add_argument("-b", "--batch_size", type=int, default=32, help="per process")
    p.add_argument("--lr", type=float, default=0.05)
    p.add_argument("--momentum", type=float, default=0.9)
    p.add_argument("--wd", "--weight-decay", dest="wd", type=float, default=1e-4)
    p.add_argument("--warmup_epochs", type=float, default=0.5)
    p.add_argument("--label_smoothing", type=float, default=0.1)
    p.add_argument("--ema_decay", type=float, default=0.995,
                   help="per-step decay of an exponential moving average of the weights and BN "
                        "statistics; when > 0 the average is evaluated and saved (0 = off)")
    p.add_argument("--channels_last", action=argparse.BooleanOptionalAction, default=True,
                   help="channels-last memory format (about 1.3x faster MobileNet steps on CPU)")
    p.add_argument("-j", "--workers", type=int, default=0)
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--output", default=None,
                   help="checkpoint path (default checkpoints/pretrained/<arch>_<dataset>.pth.tar)")
    p.add_argument("--resume", action="store_true", help="continue from --output if it exists")
    p.add_argument("--seed", type=int, default=2019)
    p.add_argument("--train_subset", type=int, default=None,
                   help="use only the first N images of each split (smoke tests)")
    p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True,
                   help="progress bars (shown only on a terminal)")
    return p


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


def main(argv=None):
    args = argv if isinstance(argv, argparse.Namespace) else get_args_parser().parse_args(argv)
    device, rank, world = init_distributed(args.device)
    setup_logging(rank=rank)
    seed_everything(args.seed)
    check_input_size(args.input_size)
    model_kwargs = model_kwargs_for(args.arch, args.dataset, args.dataset_root, args.width_mult,
                                    args.input_size)
    model = get_model(args.arch, **model_kwargs).to(device)
    if args.channels_last:
        model = model.to(memory_format=torch.channels_last)
    train_loader, val_loader, _ = get_dataset(args.dataset, args.batch_size, args.workers,
                                              args.dataset_root, distributed=is_distributed(),
                                              train_subset=args.train_subset, val_batch_size=256,
                                              input_size=model_kwargs["input_size"])
    output = args.output or default_pretrained_path(args.arch, args.dataset)
    log_dir = output.replace(".pth.tar", "") + "_log"
    optimizer = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=args.momentum,
                                weight_decay=args.wd, nesterov=True)
    # The average starts as a copy of the weights and is updated after every step.
    ema = (AveragedModel(model, multi_avg_fn=ema_update(args.ema_decay), use_buffers=True)
           if args.ema_decay > 0 else None)
    kept = [model] if ema is None else [model, ema.module]   # must match across ranks
    start_epoch, best_acc = 0, 0.0
    if args.resume and os.path.isfile(output):
        ckpt = load_checkpoint(output)
        load_state_dict(model, ckpt.get("train_state_dict", ckpt["state_dict"]), source=output)
        optimizer.load_state_dict(ckpt["optimizer"])
        if ema is not None and "ema" in ckpt:
            ema.load_state_dict(ckpt["ema"])
        start_epoch, best_acc = ckpt["epoch"], ckpt.get("best_acc", 0.0)
        log.info("resumed from %s at epoch %d", output, start_epoch)
    elif args.resume:
        raise UserError(f"--resume given but '{output}' does not exist; expected a checkpoint "
                        "written by an earlier pretrain.py run")
    net = nn.parallel.DistributedDataParallel(model) if is_distributed() else model
    criterion = nn.CrossEntropyLoss(label_smoothing=args.label_smoothing)
    lr_at = make_lr_schedule("cos", args.lr, args.epochs, args.warmup_epochs)
    writer = logger = None
    if rank == 0:
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
                             progress=args.progress and rank == 0)
        if tr["nonfinite"]:
            raise UserError(f"training diverged (NaN/inf loss) in epoch {epoch}; expected a "
                            "smaller --lr")
        if is_distributed():
            sync_buffers(*kept)
        scored = net if ema is None else ema.module
        va = evaluate(scored, val_loader, criterion, device, progress=args.progress and rank == 0)
        best_acc = max(best_acc, va["top1"])
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
                     "arch": args.arch, "dataset": args.dataset, "model_kwargs": model_kwargs}
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
        log.info("wrote %s (val top1 %.2f, %.0fs)", output, best_acc, time.time() - start)
    cleanup()
    return output


if __name__ == "__main__":
    run_cli(main)
