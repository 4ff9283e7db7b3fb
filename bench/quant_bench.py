"""Benchmarks of lib/quantize, each measured side by side in one run (docs/performance.md).

(a) K-Means of a whole ResNet-50 (54 layers, the published 10% policy): the fast path at its
    defaults vs scikit-learn KMeans at the released settings (k-means++, n_init=1, max_iter=3):
    total wall time ratio and the per-layer objective (inertia) ratio fast / sklearn.
(b) one centroid-shared update of all 54 layers: CentroidSharer.step() vs the per-centroid
    masked loop.
(c) peak extra memory of K-Means-quantizing ResNet-50 (fast path), as a multiple of the fp32
    weight size: peak RSS (VmHWM, reset through /proc/self/clear_refs) minus the RSS before,
    in a fresh child process; the result (labels, 1 byte per weight) counts as extra.
(d) one QAT training step (forward + backward) of qmobilenetv2 at w4a4 vs mobilenetv2 fp32,
    same batch, on the CPU.
(e) the centroids a sensitivity scan needs (every layer of a MobileNetV2 at widths 2-8, the
    fast path layer by layer): the wall time.

    python bench/quant_bench.py                       # everything, the issue's settings
    python bench/quant_bench.py --only a,b --qat-batch 4
"""
import argparse
import copy
import os
import statistics
import subprocess
import sys
import time

import numpy as np
import torch
import torch.nn as nn

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from lib.quantize.kmeans import (FAST_MIN_ITER, CentroidSharer, inertia,  # noqa: E402
                                 kmeans_centroids, kmeans_quantize_model)
from lib.quantize.linear import calibrate  # noqa: E402
from lib.quantize.policy import apply_linear_policy  # noqa: E402
from lib.utils.layers import quantizable_layers  # noqa: E402

# The released ResNet-50 K-Means policy at preserve ratio 0.1 (docs/results.md).
RESNET50_10PCT = [6, 6, 6, 6, 5, 5, 6, 5, 5, 6, 5, 5, 6, 5, 5, 5, 5, 5, 4, 5, 4, 4, 5, 4, 4, 4, 3,
                  4, 4, 4, 3, 4, 4, 3, 4, 4, 3, 4, 4, 3, 4, 4, 3, 4, 3, 3, 2, 3, 2, 3, 3, 2, 3, 4]


def build(name, **kw):
    """Our registry's model if models/ is importable, else torchvision's of the same name."""
    try:
        from models import get_model
        return get_model(name, **kw), "models.get_model"
    except ImportError:
        import torchvision
        return torchvision.models.get_model(name, weights=None, **kw), "torchvision"


def resnet50(seed=0):
    torch.manual_seed(seed)
    model, source = build("resnet50")
    assert len(quantizable_layers(model)) == len(RESNET50_10PCT)
    return model, source


def weights_bytes(model):
    return sum(m.weight.numel() * 4 for _, m in quantizable_layers(model))


# ------------------------------------------------------------------------------------ (a)

def bench_kmeans(args):
    model, source = resnet50()
    print(f"(a) K-Means of ResNet-50 ({source}, random init), 54 layers, published 10% policy")
    originals = {n: m.weight.detach().clone() for n, m in quantizable_layers(model)}
    kmeans_centroids(torch.randn(64), 4, method="sklearn", seed=0)   # its import, not timed
    runs = {}
    for label, kw in [("fast", dict(method="fast")),
                      ("sklearn", dict(method="sklearn")),
                      # the fast path on the reference's exact schedule, for transparency
                      ("fast, 3 iters", dict(method="fast", min_iter=0))]:
        m = copy.deepcopy(model)
        start = time.perf_counter()
        books = kmeans_quantize_model(m, RESNET50_10PCT, n_iter=3, seed=0, **kw)
        runs[label] = (time.perf_counter() - start, books)
    ref = {n: inertia(originals[n], b.centroids, b.labels) for n, b in runs["sklearn"][1].items()}
    t_sk = runs["sklearn"][0]
    for label in ("fast", "fast, 3 iters"):
        t, books = runs[label]
        ratios = np.array([inertia(originals[n], b.centroids, b.labels) / ref[n]
                           for n, b in books.items()])
        print(f"    {label:14s} {t:7.2f} s vs sklearn {t_sk:7.2f} s  -> {t_sk / t:5.1f}x faster;"
              f"  inertia fast/sklearn: mean {ratios.mean():.3f}  max {ratios.max():.3f}"
              f"  min {ratios.min():.3f}  (layers > 1.05: {(ratios > 1.05).sum()})")
    print(f"    fast defaults: greedy k-means++ (as sklearn) + max(n_iter, {FAST_MIN_ITER}) Lloyd "
          f"iterations; sklearn on {torch.get_num_threads()} threads; goal >= 10x, "
          f"mean <= 1.01, max <= 1.05")


# ------------------------------------------------------------------------------------ (b)

def masked_loop_update(model, codebooks):
    """The straightforward per-centroid update, one masked pass per centroid: the baseline of
    CentroidSharer.step()."""
    modules = dict(model.named_modules())
    with torch.no_grad():
        for name, cb in codebooks.items():
            flat = modules[name].weight.data.view(-1)
            labels = cb.labels.to(flat.device)
            for j in range(cb.n_clusters):
                mask = labels == j
                members = flat[mask]
                if members.numel():
                    mean = members.double().mean()
                    cb.centroids[j] = mean
                    flat.masked_fill_(mask, mean.to(flat.dtype))
            if cb.pruned:
                flat.masked_fill_(labels == cb.n_clusters, 0.0)


def bench_update(args):
    model, _ = resnet50()
    books = kmeans_quantize_model(model, RESNET50_10PCT, seed=0)
    sharer = CentroidSharer(model, books)
    layers = quantizable_layers(model)
    gen = torch.Generator().manual_seed(1)
    steps = [[torch.randn(m.weight.shape, generator=gen) * 1e-4 for _, m in layers]
             for _ in range(args.update_reps)]

    def perturb(delta):  # what an optimizer step does to the weights
        with torch.no_grad():
            for (_, m), d in zip(layers, delta):
                m.weight.add_(d)

    base = copy.deepcopy(model.state_dict())
    times = {"shared": [], "masked": []}
    results = {}
    for rep in range(args.update_reps):
        for label, fn in [("shared", sharer.step),
                          ("masked", lambda: masked_loop_update(model, books))]:
            model.load_state_dict(base)
            perturb(steps[rep])
            start = time.perf_counter()
            fn()
            times[label].append(time.perf_counter() - start)
            results[label] = [m.weight.detach().clone() for _, m in layers]
    diff = max((a - b).abs().max().item() for a, b in zip(results["shared"], results["masked"]))
    t_new, t_old = min(times["shared"]), min(times["masked"])
    print(f"(b) centroid-shared update of all {len(layers)} ResNet-50 layers (best of "
          f"{args.update_reps}): index_add_/gather {t_new * 1e3:.1f} ms vs per-centroid "
          f"masked loop {t_old * 1e3:.1f} ms -> {t_old / t_new:.1f}x  (max |diff| {diff:.1e};"
          f" goal >= 10x)")


# ------------------------------------------------------------------------------------ (c)

def _rss_kib(field):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def memory_child():
    """Runs in a fresh process: prints 'weights_bytes baseline_kib peak_kib'."""
    model, _ = resnet50()
    kmeans_quantize_model(nn.Linear(64, 64), [2])  # warm up the code paths before measuring
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset VmHWM to the current RSS
    base = _rss_kib("VmRSS")
    books = kmeans_quantize_model(model, RESNET50_10PCT, seed=0)
    peak = _rss_kib("VmHWM")
    labels = sum(b.labels.numel() * b.labels.element_size() for b in books.values())
    print(weights_bytes(model), base, peak, labels)


def bench_memory(args):
    out = subprocess.run([sys.executable, os.path.abspath(__file__), "--memory-child"],
                         capture_output=True, text=True, check=True).stdout.split()
    wbytes, base, peak, labels = (int(v) for v in out[-4:])
    extra = (peak - base) * 1024
    print(f"(c) peak extra memory of K-Means-quantizing ResNet-50 (fast path; peak RSS - RSS "
          f"before, fresh process): {extra / 2**20:.1f} MiB = {extra / wbytes:.2f}x the fp32 "
          f"weights ({wbytes / 2**20:.1f} MiB), of which {labels / 2**20:.1f} MiB are the kept "
          f"labels (goal <= 1x)")


# ------------------------------------------------------------------------------------ (d)

def _step(model, x, y):
    model.zero_grad(set_to_none=True)
    start = time.perf_counter()
    nn.functional.cross_entropy(model(x), y).backward()
    return time.perf_counter() - start


def qat_models(size, batch):
    """fp32 and w4a4 MobileNet-V2 (same weights, calibrated) in train mode, a batch, the
    weights' source and the number of quantizable layers: the QAT-step benches' set-up."""
    torch.manual_seed(0)
    kw = dict(num_classes=1000, input_size=size)
    fmodel, source = build("mobilenetv2", **kw)
    qmodel, _ = build("qmobilenetv2", **kw)
    qmodel.load_state_dict(fmodel.state_dict(), strict=False)
    n = len(quantizable_layers(qmodel, linear=True))
    apply_linear_policy(qmodel, [[4, -1]] + [[4, 4]] * (n - 1))  # the image stays unquantized
    x = torch.randn(batch, 3, size, size)
    y = torch.randint(0, 1000, (batch,))
    calibrate(qmodel, x[:4])
    return fmodel.train(), qmodel.train(), x, y, source, n


def bench_qat(args):
    fmodel, qmodel, x, y, source, _ = qat_models(args.qat_size, args.qat_batch)
    if args.compile:
        start = time.perf_counter()
        fmodel, qmodel = torch.compile(fmodel), torch.compile(qmodel)
        for model in (fmodel, qmodel):
            _step(model, x, y)
        print(f"(d) torch.compile of both models (first steps): {time.perf_counter() - start:.0f} s")
    times = {"fp32": [], "w4a4": []}
    for model in (fmodel, qmodel):  # warm-up
        _step(model, x, y)
    for _ in range(args.qat_steps):  # interleaved, so load changes hit both alike
        times["fp32"].append(_step(fmodel, x, y))
        times["w4a4"].append(_step(qmodel, x, y))
    tf, tq = statistics.median(times["fp32"]), statistics.median(times["w4a4"])
    # each w4a4 step over the fp32 step just before it: the spread shows the machine's noise
    pairs = sorted(q / f for f, q in zip(times["fp32"], times["w4a4"]))
    compiled = " compiled" if args.compile else ""
    print(f"(d) QAT step (forward+backward){compiled} MobileNet-V2 ({source}), batch "
          f"{args.qat_batch} at {args.qat_size}, CPU x{torch.get_num_threads()} threads, median of {args.qat_steps}: "
          f"w4a4 {tq:.2f} s vs fp32 {tf:.2f} s -> {tq / tf:.2f}x (per-step ratios "
          f"{pairs[0]:.2f}-{pairs[-1]:.2f}; goal <= 1.2x)")


# ------------------------------------------------------------------------------------ (e)

def bench_scan_centroids(args):
    torch.manual_seed(0)
    model, source = build("mobilenetv2", num_classes=10)
    xs = [m.weight.detach().reshape(-1) for _, m in quantizable_layers(model)]
    widths = range(2, 9)
    start = time.perf_counter()
    for bits in widths:
        for x in xs:
            kmeans_centroids(x, 2 ** bits, 3, "fast", 0)
    print(f"(e) centroids of {len(xs)} MobileNetV2 layers ({source}, random init, "
          f"{sum(x.numel() for x in xs)} weights) at widths 2-8, seed 0 for each, layer by "
          f"layer: {time.perf_counter() - start:.2f} s for {len(xs) * len(widths)} clusterings")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--only", default="a,b,c,d,e", help="comma-separated subset of a,b,c,d,e")
    p.add_argument("--update-reps", type=int, default=3, help="(b) repetitions, best kept")
    p.add_argument("--qat-batch", type=int, default=16)
    p.add_argument("--qat-size", type=int, default=224)
    p.add_argument("--qat-steps", type=int, default=5, help="(d) timed steps, median kept")
    p.add_argument("--compile", action="store_true", help="(d) torch.compile both models first")
    p.add_argument("--threads", type=int, default=None,
                   help="torch intra-op threads (default: torch's own choice)")
    p.add_argument("--memory-child", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.memory_child:
        return memory_child()
    parts = {"a": bench_kmeans, "b": bench_update, "c": bench_memory, "d": bench_qat,
             "e": bench_scan_centroids}
    for key in args.only.split(","):
        parts[key.strip()](args)
        sys.stdout.flush()


if __name__ == "__main__":
    main()
