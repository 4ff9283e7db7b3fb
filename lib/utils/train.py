"""The one training loop and the one validation loop of the project.

The search's short fine-tune, finetune.py and pretrain.py all call these
(torchvision-reference style ``train_one_epoch`` / ``evaluate``).
"""
import contextlib
import logging
import math
import time

import torch

from .distributed import all_reduce_sum, is_distributed
from .meters import AverageMeter, correct_counts

log = logging.getLogger(__name__)

# Without a visible progress bar (--no-progress, or stderr not a terminal) a line is
# logged at least this often during an epoch, so a slow run never looks hung.
PROGRESS_INTERVAL_S = 30.0


class _Progress:
    """A progress bar on a terminal, otherwise a log line every PROGRESS_INTERVAL_S seconds."""

    def __init__(self, desc, n, enabled, meters):
        self.desc, self.n, self.meters = desc or "progress", n, meters
        self.bar = None
        if enabled:
            from progress.bar import Bar  # writes only when stderr is a terminal
            bar = Bar(self.desc, max=n, suffix="%(index)d/%(max)d %(elapsed_td)s eta %(eta_td)s")
            self.bar = bar if bar.file is not None and bar.file.isatty() else None
        self.start = self.last = time.monotonic()

    def next(self, done):
        """Batch ``done`` (1-based) has finished."""
        if self.bar is not None:
            self.bar.next()
            return
        now = time.monotonic()
        if now - self.last >= PROGRESS_INTERVAL_S and done < self.n:
            self.last = now
            eta = (now - self.start) / done * (self.n - done)
            m = self.meters
            log.info("%s: batch %d/%d  loss %.4f  top1 %.2f  %.0fs elapsed, eta %.0fs",
                     self.desc, done, self.n, m["loss"].avg, m["top1"].avg, now - self.start, eta)

    def finish(self):
        if self.bar is not None:
            self.bar.finish()


# --half_type: the release's apex levels (O1-O3 = autocast with fp32 master weights here; apex
# O2/O3 also cast the weights to fp16, which autocast has no equivalent of), or a dtype.
HALF_TYPES = {"O0": None, "O1": "auto", "O2": "auto", "O3": "auto", "fp16": torch.float16,
              "bf16": torch.bfloat16}


def autocast_dtype(args, device):
    """The autocast dtype of ``--half``/``--half_type`` on ``device``; None = full precision."""
    if not args.half:
        return None
    choice = HALF_TYPES[args.half_type]
    if choice == "auto":
        return torch.float16 if device.type == "cuda" else torch.bfloat16
    return choice


def _autocast(device, amp):
    """``amp``: False/None (full precision), True (fp16 on GPU, bf16 on CPU) or a torch dtype."""
    if not amp:
        return contextlib.nullcontext()
    if isinstance(amp, torch.dtype):
        return torch.autocast(device.type, dtype=amp)
    dtype = torch.float16 if device.type == "cuda" else torch.bfloat16
    return torch.autocast(device.type, dtype=dtype)


def _reduce(meters, device):
    """Global averages of the per-rank meters (sums and counts all-reduced under torchrun).

    ``count`` is the number of images scored over all ranks. Accuracy sums are
    100 x whole counts, so the result is the same whatever the number of processes.
    """
    if not is_distributed():
        out = {k: m.avg for k, m in meters.items()}
        out["count"] = meters["top1"].count
        return out
    t = torch.tensor([[m.sum, m.count] for m in meters.values()], dtype=torch.float64, device=device)
    torch.distributed.all_reduce(t)
    out = {k: (t[i, 0] / t[i, 1].clamp(min=1)).item() for i, k in enumerate(meters)}
    out["count"] = int(t[0, 1].item())
    return out


def input_format(model):
    """The memory format batches should take: that of the model's first conv kernel that tells.

    1x1 and depthwise kernels are laid out alike in both formats, so they say nothing; a
    model with only such kernels (e.g. a MobileNet's tail) keeps the batches' own format
    rather than copying them into one it cannot tell it wants.
    """
    for p in model.parameters():
        if p.dim() == 4:
            if not p.is_contiguous():
                return torch.channels_last
            if not p.is_contiguous(memory_format=torch.channels_last):
                return torch.contiguous_format
    return torch.preserve_format


def _batches(model, loader, device, n, progress):
    """(index, images, target) for the first ``n`` batches, on ``device`` in the model's memory format."""
    fmt = input_format(model)
    try:
        for i, (images, target) in enumerate(loader):
            if i >= n:
                break
            yield (i, images.to(device, non_blocking=True, memory_format=fmt),
                   target.to(device, non_blocking=True))
            progress.next(i + 1)
    finally:
        progress.finish()


def _all_finite(value, device):
    """Whether ``value`` is finite on every rank: under DDP all ranks must stop together
    (a rank that stopped alone would leave the others waiting in backward)."""
    if not is_distributed():
        return math.isfinite(value)
    flag = torch.tensor([0.0 if math.isfinite(value) else 1.0], device=device)
    return all_reduce_sum(flag).item() == 0.0


def _new_meters():
    return {k: AverageMeter() for k in ("loss", "top1", "top5")}


def _record(meters, loss, output, target):
    """Add one batch to the meters; ``loss`` is the batch's mean loss as a float."""
    top1, top5 = correct_counts(output.float(), target, (1, 5))
    bs = target.size(0)
    meters["loss"].update(loss, bs)
    meters["top1"].add(100.0 * top1, bs)
    meters["top5"].add(100.0 * top5, bs)


def train_one_epoch(model, loader, criterion, optimizer, device, epoch=0, step_hook=None,
                    lr_fn=None, max_batches=None, progress=True, desc="", amp=False, scaler=None):
    """One pass over ``loader``; returns dict(loss, top1, top5, count, nonfinite, batches).

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
                                      _Progress(desc or f"train {epoch}", n, progress, meters)):
        if lr_fn is not None:
            lr_fn(i, n)
        with _autocast(device, amp):
            output = model(images)
            loss = criterion(output, target)
        loss_value = loss.item()  # one host sync per step, shared with the meters
        if not _all_finite(loss_value, device):
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
    """Top-1/top-5 accuracy (%), mean loss and image ``count`` of ``model`` on ``loader``.

    Under torchrun each rank scores its shard and the counts are all-reduced, so
    every rank returns the same numbers; with a :class:`ShardSampler` (no padding)
    every image is counted exactly once.
    """
    model.eval()
    meters = _new_meters()
    n = len(loader) if max_batches is None else min(len(loader), max_batches)
    for _, images, target in _batches(model, loader, device, n,
                                      _Progress(desc or "eval", n, progress, meters)):
        with _autocast(device, amp):
            output = model(images)
            loss = criterion(output, target)
        _record(meters, loss.item(), output, target)
    return _reduce(meters, device)
