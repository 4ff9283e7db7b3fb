"""Small pieces every training CLI (pretrain.py, finetune.py, rl_quantize.py) needs in the same form."""
import glob
import os
import re
import random

import numpy as np
import torch

from .data_utils import dataset_defaults
from .logger import Logger


def seed_everything(seed):
    """Seed Python, NumPy and torch (all devices) once, at the start of a CLI."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def memory_format(model, channels_last):
    """``model`` in channels-last memory format if asked (each CLI's ``--channels_last``).

    The train and validate loops give the batches the model's format (lib.utils.train's
    ``input_format``), so nothing else needs to know.
    """
    return model.to(memory_format=torch.channels_last) if channels_last else model


def model_kwargs_for(arch, dataset, data_root=None, width_mult=None, input_size=None):
    """``get_model`` keyword arguments for ``arch`` trained on ``dataset``.

    Our MobileNets (and their Q twins) take the dataset's default width (0.5 on mnist5k)
    unless ``width_mult`` says otherwise; other archs (torchvision's mobilenet_v3_small
    included) get no width unless one is asked for. ``input_size`` (``--input_size``)
    defaults to the dataset's (224, or 32 for mnist5k).
    """
    info = dataset_defaults(dataset, data_root)
    width = width_mult
    if width is None and has_default_width(arch):
        width = info.width_mult
    return dict(num_classes=info.num_classes, input_size=input_size or info.input_size,
                width_mult=width)


WIDTH_ARCHS = ("mobilenet", "qmobilenet", "mobilenetv2", "qmobilenetv2")


def has_default_width(arch):
    """Whether ``arch`` is one of our MobileNets, built at the dataset's default width."""
    return arch in WIDTH_ARCHS


def lr_setter(optimizer, lr_at, epoch):
    """``lr_fn(i, n)`` for the train loop: set every group's lr to ``lr_at(epoch + i / n)``."""
    def set_lr(i, n):
        lr = lr_at(epoch + i / max(n, 1))
        for group in optimizer.param_groups:
            group["lr"] = lr
    return set_lr


def open_run_logs(folder, columns, resume=False):
    """(TensorBoard writer, tab-separated Logger on folder/log.txt); call on rank 0 only."""
    from tensorboardX import SummaryWriter
    os.makedirs(folder, exist_ok=True)
    writer = SummaryWriter(folder)
    logger = Logger(os.path.join(folder, "log.txt"), columns, resume=resume)
    return writer, logger


def list_runs(parent, base):
    """[(N, path)] of the ``<base>-runN`` folders under ``parent``, ordered by N."""
    runs = []
    for path in glob.glob(os.path.join(parent, glob.escape(base) + "-run*")):
        m = re.search(r"-run(\d+)$", path)
        if m and os.path.isdir(path):
            runs.append((int(m.group(1)), path))
    return sorted(runs)


def new_run_folder(parent, base):
    """Create ``parent/<base>-runN`` with N one above the highest existing run; return its path.

    Every run gets its own folder, so no run overwrites another's results; a folder
    made meanwhile by a concurrent run moves N on instead of being shared.
    """
    runs = list_runs(parent, base)
    n = runs[-1][0] + 1 if runs else 1
    while True:
        path = os.path.join(parent, f"{base}-run{n}")
        try:
            os.makedirs(path, exist_ok=False)
            return path
        except FileExistsError:
            n += 1
