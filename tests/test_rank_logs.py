"""A 2-rank search (issue 33.6): rank 0 alone logs the episodes, and DDP is not told to look for
unused parameters when there are none (lib.env.evaluator.skipped_trainable), so it does not warn.

The ranks are a forked 2-process gloo group on the CPU (the environment torchrun would set),
each running rl_quantize.main with its stderr in a file of its own.
"""
import os
import socket
import sys

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn as nn

from lib.env.evaluator import skipped_trainable
from lib.quantize.linear import QConv2d, QLinear

UNUSED_WARNING = "find_unused_parameters"


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _on_rank(rank, port, out_dir, argv):
    import rl_quantize
    torch.set_num_threads(1)
    os.environ.update(RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    with open(os.path.join(out_dir, f"rank{rank}.err"), "w") as err:
        os.dup2(err.fileno(), 2)   # C++ warnings write to the descriptor, Python's to sys.stderr
        sys.stderr = err
        try:
            rl_quantize.main(argv + ["--output", os.path.join(out_dir, "save")])
        finally:
            if dist.is_initialized():
                dist.destroy_process_group()
            err.flush()


def _two_rank_search(tmp_path, argv):
    mp.start_processes(_on_rank, args=(_free_port(), str(tmp_path), argv), nprocs=2, join=True,
                       start_method="fork")
    return [(tmp_path / f"rank{r}.err").read_text() for r in range(2)]


def _argv(weights, debug):
    return ["--dataset", "mnist5k", "--width_mult", "0.25", "--pretrained_path", weights,
            "--linear_quantization", "--preserve_ratio", "0.5", "--min_bit", "2",
            "--train_size", "32", "--val_size", "16", "--data_bsize", "16", "--n_worker", "0",
            "--warmup", "1", "--train_episode", "2", "--seed", "1", "--device", "cpu",
            "--debug", str(debug)]


def test_a_frozen_unquantized_input_range_is_not_unused():
    first, last = QConv2d(3, 4, 3, w_bit=8, a_bit=-1), QLinear(4, 2, w_bit=8, a_bit=8)
    model = nn.Sequential(first, nn.AdaptiveAvgPool2d(1), nn.Flatten(), last)
    assert skipped_trainable(model) == []          # set_bits froze the first layer's range
    first.activation_range.requires_grad_(True)
    assert skipped_trainable(model) == ["0.activation_range"]
    first.set_bits(a_bit=4)                        # quantized now: its range is used
    assert skipped_trainable(model) == []


@pytest.mark.slow
@pytest.mark.parametrize("debug", [False, True], ids=["default", "debug"])
def test_two_rank_search_logs_episodes_once_and_no_ddp_warning(tmp_path, tiny_pretrained, debug):
    """Linear mode with the fine-tune on (DDP), the first layer's input unquantized."""
    rank0, rank1 = _two_rank_search(tmp_path, _argv(tiny_pretrained[0], debug))
    assert rank0.count("INFO rl_quantize: episode ") == 2, rank0[-3000:]
    assert "rl_quantize: episode" not in rank1
    assert rank1.count("rank 1: policy") == (2 if debug else 0), rank1[-3000:]
    assert UNUSED_WARNING not in rank0 + rank1
