"""The DDPG agent's update: hand-written backward passes, flat buffers and the fast kernels
against autograd and ``torch.optim.Adam``, side by side.

    OMP_NUM_THREADS=1 python bench/agent_bench.py [--hidden 300] [--updates 106]

Three agents from the same seed and the same replay memory (the released sizes: 300-unit
layers, minibatch 64) run, in alternating rounds, :meth:`DDPG.update_policy` with the fast
kernels (oneDNN products, fused Adam: :class:`~lib.rl.kernels.AgentKernels`), the same with
the reference kernels, and the straightforward :meth:`DDPG.autograd_update`. Prints ms per
update for each and the ratios, that the reference kernels still agree with autograd bit
for bit, how far the fast kernels' networks are from them (rounding, amplified by
training), and the floor set by the ten 64 x hidden x hidden products of an update (timed
alone, with torch's ``mm`` and with the kernel the fast update uses).
"""
import argparse
import os
import statistics
import sys
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from lib.rl import DDPG, DDPGConfig  # noqa: E402
from lib.rl.kernels import NETWORKS, distance, float64_reference  # noqa: E402


def make_agent(hidden, state_dim=10, n_layers=53, fast_kernels=True):
    torch.manual_seed(0)
    agent = DDPG(state_dim, n_layers, DDPGConfig(hidden1=hidden, hidden2=hidden, warmup=0),
                 seed=0, fast_kernels=fast_kernels)
    rng = np.random.default_rng(0)
    for _ in range(3):   # three linear-mode episodes of transitions
        tr = [(rng.random(state_dim), rng.random(1), rng.random(state_dim), i == 105)
              for i in range(106)]
        agent.store_episode(tr, float(rng.random()))
    return agent


def timed(fn, n):
    start = time.perf_counter()
    for _ in range(n):
        fn()
    return (time.perf_counter() - start) / n * 1e3


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--hidden", type=int, default=300)
    p.add_argument("--updates", type=int, default=106, help="updates per round (one episode)")
    p.add_argument("--rounds", type=int, default=5)
    a = p.parse_args(argv)
    fast, exact, ref = (make_agent(a.hidden, fast_kernels=f) for f in (True, False, False))
    f64 = float64_reference(make_agent(a.hidden, fast_kernels=False))
    runs = ((fast.update_policy, []), (exact.update_policy, []), (ref.autograd_update, []))
    for r in range(a.rounds + 1):   # round 0 warms up and is dropped
        for fn, times in runs:
            t = timed(fn, a.updates)
            if r:
                times.append(t)
        if r == 0:
            timed(f64.autograd_update, a.updates)
            drift = distance(fast, f64), distance(ref, f64)
    same = all(torch.equal(x, y) for part in NETWORKS
               for x, y in zip(getattr(exact, part).parameters(), getattr(ref, part).parameters()))
    x, w = torch.randn(64, a.hidden), torch.randn(a.hidden, a.hidden)
    mm = statistics.median(timed(lambda: x.mm(w), 200) for _ in range(3))
    fast_mm = statistics.median(timed(lambda: fast.kernels.mm(x, w), 200) for _ in range(3))
    f, e, r = (statistics.median(times) for _, times in runs)
    span = lambda num, den: (f"{min(x / y for x, y in zip(num, den)):.2f}-"  # noqa: E731
                             f"{max(x / y for x, y in zip(num, den)):.2f}")
    k = fast.kernels
    print(f"{torch.get_num_threads()} thread(s), hidden {a.hidden}, median of {a.rounds} rounds "
          f"of {a.updates} updates; fast kernels: oneDNN products {k.onednn}, "
          f"fused Adam {k.fused_adam}")
    print(f"  fast kernels {f:.3f} ms, reference kernels {e:.3f} ms, autograd {r:.3f} ms per "
          f"update: {e / f:.2f}x (per round {span(runs[1][1], runs[0][1])}) and "
          f"{r / f:.2f}x ({span(runs[2][1], runs[0][1])}) the fast update")
    print(f"  reference kernels identical to autograd: {same}; after the first {a.updates} updates "
          f"the largest relative difference from a float64 run is {drift[0]:.1e} for the fast "
          f"kernels, {drift[1]:.1e} for the reference (float32 rounding, amplified by training)")
    print(f"  floor: ten 64x{a.hidden}x{a.hidden} products = {10 * mm:.3f} ms with torch.mm "
          f"({2 * 64 * a.hidden ** 2 / mm / 1e6:.0f} GFLOP/s each), {10 * fast_mm:.3f} ms with "
          f"the fast kernel ({2 * 64 * a.hidden ** 2 / fast_mm / 1e6:.0f} GFLOP/s)")


if __name__ == "__main__":
    main()
