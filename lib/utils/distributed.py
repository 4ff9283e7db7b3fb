"""Device selection and torchrun (DistributedDataParallel) setup.

Library code takes a ``torch.device``; only the CLIs turn ``--device`` into one.
Besides the process group, this holds the few collectives the training CLIs and
the search share: rank/world queries, broadcasts of plain tensors (no pickling:
every message is a tensor of a shape both sides know), the copy of rank 0's
buffers, exact agreement checks (of tensors, and of every rank's parsed flags), and
:class:`ShardSampler`, the validation
sampler that gives every image to exactly one rank.
"""
import json
import math
import os

import torch
import torch.distributed as dist
from torch.utils.data import Sampler

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


def init_distributed(device_name="auto", gpu_index=None):
    """Initialise torch.distributed when launched by torchrun.

    Returns (device, rank, world_size); a plain run gets rank 0 of 1, no process
    group, and GPU ``gpu_index`` (default 0) for ``cuda``. gloo on CPU, nccl on GPUs.
    """
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        return resolve_device(device_name, gpu_index), 0, 1
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    device = resolve_device(device_name, local_rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return device, dist.get_rank(), dist.get_world_size()


def is_distributed():
    return dist.is_available() and dist.is_initialized()


def get_rank():
    return dist.get_rank() if is_distributed() else 0


def get_world_size():
    return dist.get_world_size() if is_distributed() else 1


def _comm_device(device=None):
    """Where collective buffers live: nccl needs the process's GPU, gloo the CPU."""
    if device is not None:
        return torch.device(device)
    return torch.device("cuda", torch.cuda.current_device()) \
        if dist.get_backend() == "nccl" else torch.device("cpu")


def all_reduce_mean(value, device):
    """Average a float across ranks (identity when not distributed)."""
    if not is_distributed():
        return value
    t = torch.tensor([value], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return (t / dist.get_world_size()).item()


def all_reduce_sum(tensor):
    """Sum ``tensor`` over ranks in place (identity when not distributed); returns it."""
    if is_distributed():
        dist.all_reduce(tensor)
    return tensor


def broadcast_tensors(tensors, src=0):
    """Copy rank ``src``'s values of ``tensors`` into every rank's (in place).

    Each tensor goes through the communication device and back, so CPU tensors
    work under nccl and GPU tensors under gloo.
    """
    if not is_distributed():
        return tensors
    dev = _comm_device()
    for t in tensors:
        buf = t.detach()
        if buf.device != dev or not buf.is_contiguous():
            buf = buf.to(dev).contiguous()
        dist.broadcast(buf, src)
        if buf.data_ptr() != t.data_ptr():
            t.data.copy_(buf)
    return tensors


def broadcast_values(values, src=0, dtype=torch.float64):
    """Rank ``src``'s list of numbers on every rank (each rank passes a list of the same length)."""
    if not is_distributed():
        return list(values)
    t = torch.tensor(list(values), dtype=dtype)
    broadcast_tensors([t], src)
    return t.tolist()


def sync_buffers(*modules):
    """Copy rank 0's buffers (BN statistics) to every rank, as DDP does before each forward.

    After the last training step each rank holds the statistics of its own last
    batch; the copy makes the evaluated (and saved) model the same on every rank.
    """
    if is_distributed():
        for module in modules:
            broadcast_tensors(list(module.buffers()))


def ranks_agree(tensors, device=None):
    """True when every rank holds exactly the same ``tensors`` (floating point ones compared).

    Rank 0's values are broadcast and the largest difference is all-reduced, so
    every rank gets the same answer. Always True without a process group.
    """
    if not is_distributed():
        return True
    dev = _comm_device(device)
    flat = torch.cat([t.detach().to(dev, torch.float64).flatten() for t in tensors
                      if t.is_floating_point()] or [torch.zeros(1, dtype=torch.float64,
                                                                device=dev)])
    ref = flat.clone()
    dist.broadcast(ref, 0)
    diff = torch.tensor([float((flat - ref).abs().max())], dtype=torch.float64, device=dev)
    dist.all_reduce(diff, op=dist.ReduceOp.MAX)
    return diff.item() == 0.0


# Flags that may differ between the ranks of one run: the launcher's per-process index,
# and the CPU thread count (speed only; it may come from each process's environment).
RANK_SPECIFIC_ARGS = frozenset({"local_rank", "threads"})


def all_gather_json(obj):
    """Every rank's ``obj`` (anything JSON can hold), in rank order; ``[obj]`` without torchrun.

    Sent as bytes in one uint8 tensor per rank (its length in the first 8), padded to the
    longest, so nothing is unpickled.
    """
    data = json.dumps(obj, sort_keys=True, default=repr).encode()
    if not is_distributed():
        return [json.loads(data)]
    dev = _comm_device()
    size = torch.tensor([len(data)], dtype=torch.int64, device=dev)
    dist.all_reduce(size, op=dist.ReduceOp.MAX)
    buf = torch.zeros(int(size.item()) + 8, dtype=torch.uint8)
    buf[:8] = torch.tensor(list(len(data).to_bytes(8, "little")), dtype=torch.uint8)
    buf[8:8 + len(data)] = torch.tensor(list(data), dtype=torch.uint8)
    parts = [torch.empty_like(buf, device=dev) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, buf.to(dev))
    out = []
    for part in parts:
        raw = bytes(part.cpu().tolist())
        out.append(json.loads(raw[8:8 + int.from_bytes(raw[:8], "little")]))
    return out


def check_same_args(args, ignore=RANK_SPECIFIC_ARGS):
    """UserError on every rank unless all ranks parsed the same flags (no-op without torchrun).

    torchrun starts every rank with one command line, but a hand-made launch (or a script
    that varies one flag per rank) can differ; the ranks would then train or search
    different things in one collective run. The message names each differing flag.
    """
    if not is_distributed():
        return
    ranks = all_gather_json({k: v for k, v in vars(args).items() if k not in ignore})
    differ = []
    for key in sorted(set().union(*ranks)):
        values = [r.get(key) for r in ranks]
        if any(v != values[0] for v in values):
            shown = ", ".join(f"rank {i}: {v}" for i, v in enumerate(values))
            differ.append(f"--{key} ({shown})")
    if differ:
        raise UserError(f"the ranks were started with different flags: {'; '.join(differ)}; "
                        "expected every rank launched with the same command line")


def model_tensors(model):
    """A model's parameters and buffers (what must match across ranks)."""
    return list(model.parameters()) + list(model.buffers())


class ShardSampler(Sampler):
    """Indices ``rank, rank + world, ...`` of a dataset: each index on exactly one rank.

    torch's DistributedSampler pads the shards to equal length by repeating
    indices, so summed validation counts would count some images twice. Uneven
    shards are fine for evaluation, which has no per-batch collective: the counts
    are all-reduced once at the end (lib.utils.train.evaluate).
    """

    def __init__(self, dataset, rank=None, world_size=None):
        self.n = len(dataset)
        self.rank = get_rank() if rank is None else rank
        self.world = get_world_size() if world_size is None else world_size

    def __iter__(self):
        return iter(range(self.rank, self.n, self.world))

    def __len__(self):
        return max(0, math.ceil((self.n - self.rank) / self.world))


def cleanup():
    if is_distributed():
        dist.destroy_process_group()
