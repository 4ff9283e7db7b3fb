"""Small pieces every training CLI (pretrain.py, finetune.py) needs in the same form."""
import os
import random

import numpy as np
import torch

from .data_utils import dataset_defaults
from .errors import UserError
from .logger import Logger


def seed_everything(seed):
    """Seed Python, NumPy and torch (all devices) once, at the start of a CLI."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def model_kwargs_for(arch, dataset, data_root=None, width_mult=None, input_size=None):
    """``get_model`` keyword arguments for ``arch`` trained on ``dataset``.

    The MobileNets take the dataset's default width (0.5 on mnist5k) unless
    ``width_mult`` says otherwise; other archs have no width. ``input_size``
    (``--input_size``) defaults to the dataset's (224, or 32 for mnist5k).
    """
    info = dataset_defaults(dataset, data_root)
    width = width_mult if width_mult is not None else info.width_mult
    if "mobilenet" not in arch:
        width = None
    return dict(num_classes=info.num_classes, input_size=input_size or info.input_size,
                width_mult=width)


def check_input_size(input_size):
    """``--input_size`` must be None (the dataset's) or a positive size the models accept."""
    if input_size is not None and not 8 <= input_size <= 1024:
        raise UserError(f"--input_size {input_size}: expected a size in pixels between 8 and "
                        "1024 (default: the dataset's, 224 for ImageNet, 32 for mnist5k)")


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
