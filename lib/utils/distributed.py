"""Device selection and torchrun (DistributedDataParallel) setup.

Library code takes a ``torch.device``; only the CLIs turn ``--device`` into one.
"""
import os

import torch
import torch.distributed as dist

from .errors import UserError


def resolve_device(name="auto", local_rank=None):
    """'auto' -> cuda when available else cpu; 'cuda' picks the local rank's GPU."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise UserError("--device cuda was requested but no CUDA device is available; "
                            "expected --device cpu or auto")
        if name == "cuda" and local_rank is not None:
            name = f"cuda:{local_rank}"
    try:
        return torch.device(name)
    except RuntimeError as exc:
        raise UserError(f"bad --device '{name}'; expected auto, cpu or cuda") from exc


def init_distributed(device_name="auto"):
    """Initialise torch.distributed when launched by torchrun.

    Returns (device, rank, world_size); a plain run gets rank 0 of 1 and no process
    group. gloo on CPU, nccl on GPUs.
    """
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        return resolve_device(device_name), 0, 1
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    device = resolve_device(device_name, local_rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return device, dist.get_rank(), dist.get_world_size()


def is_distributed():
    return dist.is_available() and dist.is_initialized()


def all_reduce_mean(value, device):
    """Average a float across ranks (identity when not distributed)."""
    if not is_distributed():
        return value
    t = torch.tensor([value], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return (t / dist.get_world_size()).item()


def cleanup():
    if is_distributed():
        dist.destroy_process_group()
