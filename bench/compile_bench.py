"""torch.compile of the linear fake quantization, measured side by side in one run (issue 30;
docs/performance.md).

(k) kernels per quantizer, forward + backward, from torch.profiler: eager (every aten op that
    computes, called from Python or autograd, not from another aten op; views and allocations
    left out) against compiled (inductor's generated kernels,
    recorded with its kernel profiling switched on).  One PACT input quantizer (half-wave,
    trainable range) and one weight quantizer (signed, straight-through everywhere).
(q) one QAT training step (forward + backward) of qmobilenetv2 at w4a4 over mobilenetv2 fp32,
    same batch: the ratio eager (both eager) and compiled (both compiled), steps interleaved;
    plus the compile time of each model (its first step).  Then a new w4a4 policy (other widths, same
    on/off pattern) runs through the compiled model: the graphs dynamo made for it (0 = the
    compiled graph served it).

    python bench/compile_bench.py --threads 1                 # both parts
    python bench/compile_bench.py --only k
"""
import argparse
import os
import statistics
import sys
import time

import torch
from torch.profiler import ProfilerActivity, profile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from lib.quantize.linear import fake_quantize  # noqa: E402
from lib.quantize.policy import apply_linear_policy  # noqa: E402
from quant_bench import _step, qat_models  # noqa: E402  (the QAT benches' shared set-up)

# aten ops that only describe or allocate memory: no kernel runs for them
_NO_KERNEL = ("empty", "view", "as_strided", "reshape", "expand", "detach", "alias", "t",
              "transpose", "unsqueeze", "squeeze", "select", "slice", "lift_fresh", "result_type",
              "resolve_conj", "resolve_neg", "_unsafe_view", "_reshape_alias", "to", "empty_like",
              "empty_strided")


# ------------------------------------------------------------------------------------ (k)

def _activation_quantizer(x, r, bits):
    return fake_quantize(x, r, bits, signed=False)


def _weight_quantizer(w, r, bits):
    return fake_quantize(w, r, bits, signed=True, clip_grad=False)


def _kernels(fn, x, r, bits):
    """Names of the kernels one forward + backward of ``fn`` runs (see the module docstring)."""
    x = x.clone().requires_grad_()
    inputs = (x, r) if r.requires_grad else (x,)
    grad = torch.ones_like(x)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        # autograd.grad, not backward: no accumulation into .grad counted
        torch.autograd.grad(fn(x, r, bits), inputs, grad)
    return [evt.name for evt in prof.events()
            if "cpp_fused" in evt.name or "triton_" in evt.name
            or _computes(evt) and not _aten_ancestor(evt)]


def _computes(evt):
    return evt.name.startswith("aten::") and evt.name[len("aten::"):] not in _NO_KERNEL


def _aten_ancestor(evt):
    """Whether a computing aten op called ``evt``: then it is part of that op's kernel."""
    parent = evt.cpu_parent
    while parent is not None:
        if _computes(parent):
            return True
        parent = parent.cpu_parent
    return False


def bench_kernels(args):
    import torch._inductor.config as inductor_config
    inductor_config.cpp.enable_kernel_profile = True
    torch.manual_seed(0)
    x = torch.randn(8, 32, 28, 28) * 3
    w = torch.randn(64, 32, 3, 3)
    bits = torch.tensor(4)
    cases = [("PACT input (half-wave)", _activation_quantizer, x,
              torch.tensor([2.0], requires_grad=True)),
             ("weight (signed)", _weight_quantizer, w, torch.tensor([2.5]))]
    for label, fn, t, r in cases:
        eager = _kernels(fn, t, r, bits)
        compiled_fn = torch.compile(fn)
        _kernels(compiled_fn, t, r, bits)   # compiles
        compiled = _kernels(compiled_fn, t, r, bits)
        print(f"(k) {label} quantizer, forward + backward: eager {len(eager)} kernels, compiled "
              f"{len(compiled)} ({', '.join(compiled)})")
        if args.verbose:
            print("    eager:", ", ".join(eager))


# ------------------------------------------------------------------------------------ (q)

def _ratio(models, x, y, steps):
    """Median seconds per step of each model, interleaved; the per-step ratio spread."""
    for m in models:
        _step(m, x, y)
    times = [[], []]
    for _ in range(steps):
        for t, m in zip(times, models):
            t.append(_step(m, x, y))
    pairs = sorted(q / f for f, q in zip(*times))
    return statistics.median(times[0]), statistics.median(times[1]), pairs[0], pairs[-1]


def bench_qat(args):
    from torch._dynamo.utils import counters
    fmodel, qmodel, x, y, _, n = qat_models(args.qat_size, args.qat_batch)
    compiled, cold = [], []
    for m in (fmodel, qmodel):
        c = torch.compile(m)
        start = time.perf_counter()
        _step(c, x, y)
        cold.append(time.perf_counter() - start)
        compiled.append(c)
    where = (f"MobileNet-V2, batch {args.qat_batch} at {args.qat_size}, CPU "
             f"x{torch.get_num_threads()} threads, median of {args.qat_steps}")
    print(f"(q) compile (first training step; cold only the first time, inductor caches on "
          f"disk): fp32 {cold[0]:.0f} s, w4a4 {cold[1]:.0f} s")
    for label, pair in (("eager", (fmodel, qmodel)), ("compiled", compiled)):
        tf, tq, lo, hi = _ratio(pair, x, y, args.qat_steps)
        print(f"(q) QAT step {label:8s} {where}: w4a4 {tq:.3f} s vs fp32 {tf:.3f} s -> "
              f"{tq / tf:.2f}x (per-step {lo:.2f}-{hi:.2f}; goal <= 1.2x compiled)")
    before = counters["stats"]["unique_graphs"]
    apply_linear_policy(qmodel, [[4, -1]] + [[2 + i % 7, 8 - i % 7] for i in range(n - 1)])
    _step(compiled[1], x, y)
    print(f"(q) a new policy through the compiled w4a4 model: "
          f"{counters['stats']['unique_graphs'] - before} new graphs")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--only", default="k,q", help="comma-separated subset of k,q")
    p.add_argument("--qat-batch", type=int, default=16)
    p.add_argument("--qat-size", type=int, default=224)
    p.add_argument("--qat-steps", type=int, default=5, help="(q) timed steps, median kept")
    p.add_argument("--threads", type=int, default=None,
                   help="torch intra-op threads (default: torch's own choice)")
    p.add_argument("--verbose", action="store_true", help="(k) list the eager kernels too")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    parts = {"k": bench_kernels, "q": bench_qat}
    for key in args.only.split(","):
        parts[key.strip()](args)
        sys.stdout.flush()


if __name__ == "__main__":
    main()
