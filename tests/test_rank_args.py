"""Ranks started with different flags are refused at start (lib.utils.distributed.check_same_args).

Each test forks a 2-process gloo group on the CPU (the environment torchrun would set);
every rank runs the CLI's main with its own argv and records how it ended.
"""
import argparse
import os
import socket

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import finetune
import rl_quantize
from lib.utils.distributed import check_same_args
from lib.utils.errors import UserError


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _outcome(call):
    try:
        call()
        return "ran"
    except UserError as exc:
        return f"UserError: {exc}"
    except BaseException as exc:   # recorded, so the test shows it instead of a hung peer
        return f"{type(exc).__name__}: {exc}"


def _on_rank(rank, world, port, out_dir, target, argvs):
    torch.set_num_threads(1)
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    if target == "check":
        dist.init_process_group("gloo")
        result = _outcome(lambda: check_same_args(argparse.Namespace(**argvs[rank])))
    else:
        main = {"finetune": finetune.main, "rl_quantize": rl_quantize.main}[target]
        result = _outcome(lambda: main(argvs[rank]))
    if dist.is_initialized():
        dist.destroy_process_group()
    with open(os.path.join(out_dir, f"rank{rank}.txt"), "w") as f:
        f.write(result)


def _launch(tmp_path, target, argvs):
    mp.start_processes(_on_rank, args=(2, _free_port(), str(tmp_path), target, argvs), nprocs=2,
                       join=True, start_method="fork")
    return [(tmp_path / f"rank{r}.txt").read_text() for r in range(2)]


def test_rl_quantize_ranks_with_different_preserve_ratio_are_refused(tmp_path):
    base = ["--dataset", "mnist5k", "--width_mult", "0.25", "--device", "cpu",
            "--pretrained_path", str(tmp_path / "missing.pth.tar"), "--output", str(tmp_path)]
    results = _launch(tmp_path, "rl_quantize", [base + ["--preserve_ratio", "0.1"],
                                                base + ["--preserve_ratio", "0.2"]])
    for result in results:   # every rank stops, with the same one-line message
        assert result.startswith("UserError: the ranks were started with different flags"), result
        assert "--preserve_ratio (rank 0: 0.1, rank 1: 0.2)" in result and "\n" not in result
        assert "--output" not in result and "--pretrained_path" not in result
    assert results[0] == results[1]


def test_finetune_ranks_with_different_flags_are_refused(tmp_path):
    base = ["--strategy", str(tmp_path / "missing.json"), "--device", "cpu", "--no-progress"]
    results = _launch(tmp_path, "finetune", [base + ["--epochs", "2"],
                                             base + ["--epochs", "3", "--linear_quantization"]])
    for result in results:
        assert result.startswith("UserError: the ranks were started with different flags"), result
        assert "--epochs (rank 0: 2, rank 1: 3)" in result
        assert "--linear_quantization (rank 0: None, rank 1: True)" in result


def test_same_flags_and_rank_specific_ones_pass(tmp_path):
    flags = {"preserve_ratio": 0.1, "strategy": [2, 3], "output": "save"}
    results = _launch(tmp_path, "check", [dict(flags, local_rank=0, threads=1),
                                          dict(flags, local_rank=1, threads=2)])
    assert results == ["ran", "ran"]
