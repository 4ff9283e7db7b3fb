"""Learning-rate schedules of finetune.py (--lr_type cos / exp / step / fixed, with warmup).

A schedule is a function of the fractional epoch ``e`` (epoch + batch / batches), so the
training loop's ``lr_fn(i, n)`` can set the rate every iteration.
"""
import bisect
import math

LR_TYPES = ("cos", "exp", "step", "fixed")


def make_lr_schedule(lr_type, base_lr, epochs, warmup_epoch=0, gamma=0.1, schedule=()):
    """Return ``lr_at(e)``.

    * warmup (``e < warmup_epoch``): linear ramp from ~0 to ``base_lr``, per iteration;
    * ``cos``: half a cosine from ``base_lr`` to 0 over the epochs after warmup, per iteration;
    * ``exp``: ``base_lr * gamma ** k`` after k whole epochs past warmup (gamma ~0.9-0.98);
    * ``step``: ``base_lr * gamma ** m`` where m = milestones in ``schedule`` already reached;
    * ``fixed``: ``base_lr``.
    """
    if lr_type not in LR_TYPES:
        raise ValueError(f"lr_type must be one of {LR_TYPES}, got {lr_type!r}")
    milestones = sorted(schedule or ())
    span = max(epochs - warmup_epoch, 1e-8)

    def lr_at(e):
        if e < warmup_epoch:
            # never exactly 0: the first step should still move the weights a little
            return base_lr * (e + 1e-3) / warmup_epoch
        if lr_type == "cos":
            return 0.5 * base_lr * (1.0 + math.cos(math.pi * min(e - warmup_epoch, span) / span))
        if lr_type == "exp":
            return base_lr * gamma ** int(math.floor(e - warmup_epoch))
        if lr_type == "step":
            return base_lr * gamma ** bisect.bisect_right(milestones, int(math.floor(e)))
        return base_lr

    return lr_at
