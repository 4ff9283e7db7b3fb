"""The one training loop and the one validation loop of the project.

The search's short fine-tune, finetune.py and pretrain.py all call these
(torchvision-reference style ``train_one_epoch`` / ``evaluate``).
"""
import contextlib
import math

import torch

from .distributed import is_distributed
from .meters import AverageMeter, accuracy


def _bar(desc, n, enabled):
    if not enabled:
        return None
    from progress.bar import Bar  # writes only when stderr is a terminal
    return Bar(desc or "progress", max=n, suffix="%(index)d/%(max)d %(elapsed_td)s eta %(eta_td)s")


def _autocast(device, amp):
    """``amp``: False/None (full precision), True (fp16 on GPU, bf16 on CPU) or a torch dtype."""
    if not amp:
        return contextlib.nullcontext()
    if isinstance(amp, torch.dtype):
        return torch.autocast(device.type, dtype=amp)
    dtype = torch.float16 if device.type == "cuda" else torch.bfloat16
    return torch.autocast(device.type, dtype=dtype)


def _reduce(meters, device):
    """Turn the per-rank meters into global averages under torchrun."""
    if not is_distributed():
        return {k: m.avg for k, m in meters.items()}
    t = torch.tensor([[m.sum, m.count] for m in meters.values()], dtype=torch.float64, device=device)
    torch.distributed.all_reduce(t)
    return {k: (t[i, 0] / t[i, 1].clamp(min=1)).item() for i, k in enumerate(meters)}


def input_format(model):
    """The memory format batches should take: channels-last when the model's convs use it."""
    for p in model.parameters():
        if p.dim() == 4 and not p.is_contiguous():  # 1x1 kernels are both, so skip those
            return torch.channels_last
    return torch.contiguous_format


def _batches(model, loader, device, n, bar):
    """(index, images, target) for the first ``n`` batches, on ``device`` in the model's memory format."""
    fmt = input_format(model)
    try:
        for i, (images, target) in enumerate(loader):
            if i >= n:
                break
            yield (i, images.to(device, non_blocking=True, memory_format=fmt),
                   target.to(device, non_blocking=True))
            if bar is not None:
                bar.next()
    finally:
        if bar is not None:
            bar.finish()


def _new_meters():
    return {k: AverageMeter() for k in ("loss", "top1", "top5")}


def _record(meters, loss, output, target):
    """Add one batch to the meters; ``loss`` is the batch's mean loss as a float."""
    top1, top5 = accuracy(output.float(), target, (1, 5))
    bs = target.size(0)
    meters["loss"].update(loss, bs)
    meters["top1"].update(top1, bs)
    meters["top5"].update(top5, bs)


def train_one_epoch(model, loader, criterion, optimizer, device, epoch=0, step_hook=None,
                    lr_fn=None, max_batches=None, progress=True, desc="", amp=False, scaler=None):
    """One pass over ``loader``; returns dict(loss, top1, top5, nonfinite, batches).

    ``lr_fn(batch_index, n_batches)`` (optional) sets the learning rate before each
    step; ``step_hook()`` runs after every optimizer step (K-Means centroid sharing).
    A NaN/inf loss stops the epoch early with ``nonfinite=True`` instead of raising,
    so a search episode can be scored rather than crash.
    """
    model.train()
    meters = _new_meters()
    n = len(loader) if max_batches is None else min(len(loader), max_batches)
    nonfinite, done = False, 0
    for i, images, target in _batches(model, loader, device, n,
                                      _bar(desc or f"train {epoch}", n, progress)):
        if lr_fn is not None:
            lr_fn(i, n)
        with _autocast(device, amp):
            output = model(images)
            loss = criterion(output, target)
        loss_value = loss.item()  # one host sync per step, shared with the meters
        if not math.isfinite(loss_value):
            nonfinite = True
            break
        optimizer.zero_grad(set_to_none=True)
        if scaler is not None:
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
        else:
            loss.backward()
            optimizer.step()
        if step_hook is not None:
            step_hook()
        _record(meters, loss_value, output, target)
        done += 1
    stats = _reduce(meters, device)
    stats.update(nonfinite=nonfinite, batches=done)
    return stats


@torch.no_grad()
def evaluate(model, loader, criterion, device, progress=True, desc="", max_batches=None, amp=False):
    """Top-1/top-5 accuracy (%) and mean loss of ``model`` on ``loader``."""
    model.eval()
    meters = _new_meters()
    n = len(loader) if max_batches is None else min(len(loader), max_batches)
    for _, images, target in _batches(model, loader, device, n, _bar(desc or "eval", n, progress)):
        with _autocast(device, amp):
            output = model(images)
            loss = criterion(output, target)
        _record(meters, loss.item(), output, target)
    return _reduce(meters, device)
