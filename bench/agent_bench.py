"""The DDPG agent's update: compiled passes, hand-written backward passes, flat buffers and
the fast kernels against autograd and ``torch.optim.Adam``, side by side.

    OMP_NUM_THREADS=1 python bench/agent_bench.py [--hidden 300] [--updates 106]

Four agents from the same seed and the same replay memory (the released sizes: 300-unit
layers, minibatch 64) run, in alternating rounds, :meth:`DDPG.update_policy` as compiled
passes around the products (:class:`~lib.rl.compiled.CompiledUpdate`, the default), the
same in torch with the fast kernels (oneDNN products, fused Adam:
:class:`~lib.rl.kernels.AgentKernels`), the same with the reference kernels, and the
straightforward :meth:`DDPG.autograd_update`. Prints ms per update for each and the ratios,
that the reference kernels still agree with autograd bit for bit, how far the others'
networks are from a float64 run (rounding, amplified by training), and the floor set by the
ten 64 x hidden x hidden products of an update (timed alone, with torch's ``mm`` and with
the kernel the fast update uses).
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


def make_agent(hidden, state_dim=10, n_layers=53, fast_kernels=True, compiled=True):
    torch.manual_seed(0)
    agent = DDPG(state_dim, n_layers, DDPGConfig(hidden1=hidden, hidden2=hidden, warmup=0),
                 seed=0, fast_kernels=fast_kernels, compiled=compiled)
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
    compiled, fast = make_agent(a.hidden), make_agent(a.hidden, compiled=False)
    exact, ref = (make_agent(a.hidden, fast_kernels=False) for _ in range(2))
    f64 = float64_reference(make_agent(a.hidden, fast_kernels=False))
    names = ("compiled passes", "torch, fast kernels", "torch, reference kernels", "autograd")
    runs = [(agent.update_policy, []) for agent in (compiled, fast, exact)]
    runs.append((ref.autograd_update, []))
    for r in range(a.rounds + 1):   # round 0 warms up (and compiles) and is dropped
        for fn, times in runs:
            t = timed(fn, a.updates)
            if r:
                times.append(t)
        if r == 0:
            timed(f64.autograd_update, a.updates)
            drift = [distance(agent, f64) for agent in (compiled, fast, ref)]
    same = all(torch.equal(x, y) for part in NETWORKS
               for x, y in zip(getattr(exact, part).parameters(), getattr(ref, part).parameters()))
    x, w = torch.randn(64, a.hidden), torch.randn(a.hidden, a.hidden)
    mm = statistics.median(timed(lambda: x.mm(w), 200) for _ in range(3))
    fast_mm = statistics.median(timed(lambda: fast.kernels.mm(x, w), 200) for _ in range(3))
    med = [statistics.median(times) for _, times in runs]
    span = lambda num, den: (f"{min(x / y for x, y in zip(num, den)):.2f}-"  # noqa: E731
                             f"{max(x / y for x, y in zip(num, den)):.2f}")
    k = fast.kernels
    print(f"{torch.get_num_threads()} thread(s), hidden {a.hidden}, median of {a.rounds} rounds "
          f"of {a.updates} updates; fast kernels: oneDNN products {k.onednn}, "
          f"fused Adam {k.fused_adam}; compiled passes {compiled._compiled is not None}")
    print(f"  {names[0]:26s} {med[0]:.3f} ms per update")
    for name, m, (_, times) in zip(names[1:], med[1:], runs[1:]):
        print(f"  {name:26s} {m:.3f} ms per update, {m / med[0]:.2f}x that "
              f"(per round {span(times, runs[0][1])})")
    print(f"  reference kernels identical to autograd: {same}; after the first {a.updates} updates "
          f"the largest relative difference from a float64 run is {drift[0]:.2e} for the "
          f"compiled passes, {drift[1]:.2e} for the fast kernels, {drift[2]:.2e} for the "
          f"reference (float32 rounding, amplified by training)")
    print(f"  floor: ten 64x{a.hidden}x{a.hidden} products = {10 * mm:.3f} ms with torch.mm "
          f"({2 * 64 * a.hidden ** 2 / mm / 1e6:.0f} GFLOP/s each), {10 * fast_mm:.3f} ms with "
          f"the fast kernel ({2 * 64 * a.hidden ** 2 / fast_mm / 1e6:.0f} GFLOP/s)")


if __name__ == "__main__":
    main()
