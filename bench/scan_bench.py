"""The sensitivity scan of --method ilp with its passes side by side (lanes) vs one at a time.

    python bench/scan_bench.py [--mode linear|kmeans|both] [--repeat 3]

On the embedded default (the demo's search settings, the pretrained checkpoint of
pretrain.py), ``layer_scores`` is timed with lib.allocate.staged's lanes (on a CPU with
n >= 2 threads: min(n, 4) passes side by side, n // lanes threads each) and with one lane
(every pass on all n threads), alternating, in one run; the median of ``--repeat`` rounds
and the largest difference between the two score tables are printed.
"""
import argparse
import os
import statistics
import sys
import time

import numpy as np
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import rl_quantize  # noqa: E402  (the CLI's builders: same model, data and env as a search)
from lib.allocate import layer_scores, staged  # noqa: E402


def search_args(mode, a):
    argv = ["--dataset", "mnist5k", "--train_size", "600", "--val_size", "500", "--data_bsize",
            "100", "--n_worker", "0", "--device", "cpu", "--method", "ilp"]
    if mode == "linear":
        argv += ["--arch", "qmobilenetv2", "--linear_quantization", "--cost", "latency",
                 "--hardware", "bismo_cloud", "--preserve_ratio", "0.5", "--min_bit", "3"]
    else:
        argv += ["--arch", "mobilenetv2", "--cost", "size", "--preserve_ratio", "0.1",
                 "--min_bit", "2"]
    if a.pretrained_path:
        argv += ["--pretrained_path", a.pretrained_path]
    args = rl_quantize.get_args_parser().parse_args(argv)
    rl_quantize.check_args(args)
    return args


def timed_scores(env, max_lanes):
    saved, staged.MAX_LANES = staged.MAX_LANES, max_lanes
    try:
        start = time.perf_counter()
        scores = layer_scores(env)
        return time.perf_counter() - start, scores
    finally:
        staged.MAX_LANES = saved


def bench_mode(mode, a):
    args = search_args(mode, a)
    device = torch.device("cpu")
    loaders = rl_quantize.build_loaders(args)
    model, info = rl_quantize.build_model(args, device)
    env = rl_quantize.build_env(args, model, info, loaders, device)
    env.measure_original()
    timings = {1: [], staged.MAX_LANES: []}
    tables = {}
    for r in range(a.repeat + 1):   # the first round warms caches and is dropped
        for lanes in timings:
            seconds, tables[lanes] = timed_scores(env, lanes)
            if r > 0:
                timings[lanes].append(seconds)
    one, many = (statistics.median(timings[k]) for k in timings)
    kinds = [k for k in ("weight", "activation") if k in tables[1]]
    diff = max(float(np.abs(np.asarray(tables[1][k]) - np.asarray(tables[staged.MAX_LANES][k]))
                     .max()) for k in kinds)
    top = max(float(np.abs(np.asarray(tables[1][k])).max()) for k in kinds)
    threads = torch.get_num_threads()
    with staged.scan_lanes(device) as lanes:
        pass
    print(f"{mode}: {len(env.layers)} layers x {len(tables[1]['bits'])} widths, "
          f"{threads} thread(s), median of {a.repeat}")
    print(f"  one lane ({threads} threads a pass)    {one:6.2f} s")
    print(f"  {lanes} lanes ({threads // lanes} thread(s) a pass)  {many:6.2f} s  -> {one / many:.2f}x"
          f"  (rounds: {' '.join(f'{x:.2f}' for x in timings[1])} vs "
          f"{' '.join(f'{x:.2f}' for x in timings[staged.MAX_LANES])})")
    print(f"  largest score difference {diff:.1e} (scores up to {top:.3f})")
    return one / many


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--mode", default="both", choices=["kmeans", "linear", "both"])
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--pretrained_path", default=None,
                   help="default checkpoints/pretrained/mobilenetv2_mnist5k.pth.tar (pretrain.py)")
    a = p.parse_args(argv)
    modes = ["linear", "kmeans"] if a.mode == "both" else [a.mode]
    return {m: bench_mode(m, a) for m in modes}


if __name__ == "__main__":
    from lib.utils.errors import run_cli
    run_cli(main)
