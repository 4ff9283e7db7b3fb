"""The sensitivity scan of --method ilp: the stage cache against a whole-model pass per change.

    python bench/scan_bench.py [--mode linear|kmeans|both] [--repeat 3] [--device auto]

On the embedded default (the demo's search settings, the pretrained checkpoint of
pretrain.py), ``layer_scores`` is timed as the search runs it (lib.allocate.staged: each
stage's float input cached, BatchNorm folded, only the stages from the changed layer's
on recomputed) and with the model's ``stages()`` hidden, so that every scored change runs
the whole model, alternating, in one run on one device. Printed: the median of
``--repeat`` rounds of each, their ratio, the time per layer, and the largest difference
between the two score tables (float rounding of the fold only).
"""
import argparse
import contextlib
import os
import statistics
import sys
import time

import numpy as np
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import rl_quantize  # noqa: E402  (the CLI's builders: same model, data and env as a search)
from lib.allocate import layer_scores  # noqa: E402


def search_args(mode, a):
    argv = ["--dataset", "mnist5k", "--train_size", "600", "--val_size", "500", "--data_bsize",
            "100", "--n_worker", "0", "--device", a.device, "--method", "ilp"]
    if mode == "linear":
        argv += ["--arch", "qmobilenetv2", "--linear_quantization", "--cost", "latency",
                 "--hardware", "bismo_cloud", "--preserve_ratio", "0.5", "--min_bit", "3"]
    else:
        argv += ["--arch", "mobilenetv2", "--cost", "size", "--preserve_ratio", "0.1",
                 "--min_bit", "2"]
    if a.pretrained_path:
        argv += ["--pretrained_path", a.pretrained_path]
    if a.width_mult:
        argv += ["--width_mult", str(a.width_mult)]
    args = rl_quantize.get_args_parser().parse_args(argv)
    rl_quantize.check_args(args)
    return args


@contextlib.contextmanager
def whole_passes(model):
    """The model without its ``stages()``: StagedLoss then scores each change with a whole
    pass of the model as it is (its documented fallback)."""
    model.stages = None
    try:
        yield
    finally:
        del model.stages


def timed_scores(env, n_images, staged):
    """(seconds, scores) of one scan; the losses come back as Python floats, so an
    accelerator's queue is drained when the clock stops."""
    with contextlib.nullcontext() if staged else whole_passes(env.model):
        start = time.perf_counter()
        scores = layer_scores(env, "loss", n_images=n_images)
        return time.perf_counter() - start, scores


def bench_mode(mode, a):
    args = search_args(mode, a)
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available()
                          else "cpu" if args.device == "auto" else args.device)
    loaders = rl_quantize.build_loaders(args)
    model, info = rl_quantize.build_model(args, device)
    env = rl_quantize.build_env(args, model, info, loaders, device)
    env.measure_original()
    timings, tables = {True: [], False: []}, {}
    for r in range(a.repeat + 1):   # the first round warms caches and is dropped
        for staged in timings:
            seconds, tables[staged] = timed_scores(env, args.sensitivity_images, staged)
            if r > 0:
                timings[staged].append(seconds)
    cached, whole = (statistics.median(timings[k]) for k in (True, False))
    kinds = [k for k in ("weight", "activation") if k in tables[True]]
    diff = max(float(np.abs(np.asarray(tables[True][k]) - np.asarray(tables[False][k])).max())
               for k in kinds)
    top = max(float(np.abs(np.asarray(tables[False][k])).max()) for k in kinds)
    n_layers, n_widths = len(env.layers), len(tables[True]["bits"])
    where = f"{device.type}" + (f", {torch.get_num_threads()} thread(s)"
                                if device.type == "cpu" else "")
    print(f"{mode}: {n_layers} layers x {n_widths} widths on {tables[True]['n_images']} images, "
          f"{where}, median of {a.repeat}")
    for name, key in (("whole model per change", False), ("stage cache + BN fold ", True)):
        rounds = " ".join(f"{x:.2f}" for x in timings[key])
        print(f"  {name}  {statistics.median(timings[key]):7.2f} s  "
              f"{1000 * statistics.median(timings[key]) / n_layers:7.1f} ms/layer  ({rounds})")
    print(f"  -> {whole / cached:.2f}x; largest score difference {diff:.1e} "
          f"(scores up to {top:.3f})")
    return whole / cached


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--mode", default="both", choices=["kmeans", "linear", "both"])
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--pretrained_path", default=None,
                   help="default checkpoints/pretrained/mobilenetv2_mnist5k.pth.tar (pretrain.py)")
    p.add_argument("--width_mult", type=float, default=None,
                   help="the checkpoint's MobileNet width (default: the dataset's)")
    a = p.parse_args(argv)
    modes = ["linear", "kmeans"] if a.mode == "both" else [a.mode]
    return {m: bench_mode(m, a) for m in modes}


if __name__ == "__main__":
    from lib.utils.errors import run_cli
    run_cli(main)
