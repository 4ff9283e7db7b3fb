"""The DDPG agent's update: hand-written backward passes and flat-buffer Adam against autograd
and ``torch.optim.Adam``, side by side.

    OMP_NUM_THREADS=1 python bench/agent_bench.py [--hidden 300] [--updates 318]

Two agents from the same seed and the same replay memory (the released sizes: 300-unit
layers, minibatch 64) run :meth:`DDPG.update_policy` and the straightforward
:meth:`DDPG.autograd_update` in alternating rounds; prints ms per update for each, the
ratio, that the networks still agree bit for bit, and the floor set by the ten
64 x hidden x hidden matmuls of an update (timed alone).
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


def make_agent(hidden, state_dim=10, n_layers=53):
    torch.manual_seed(0)
    agent = DDPG(state_dim, n_layers, DDPGConfig(hidden1=hidden, hidden2=hidden, warmup=0),
                 seed=0)
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
    fast, ref = make_agent(a.hidden), make_agent(a.hidden)
    t_fast, t_ref = [], []
    for r in range(a.rounds + 1):   # round 0 warms up and is dropped
        tf = timed(fast.update_policy, a.updates)
        tr = timed(ref.autograd_update, a.updates)
        if r:
            t_fast.append(tf)
            t_ref.append(tr)
    same = all(torch.equal(x, y) for part in ("actor", "critic", "actor_target", "critic_target")
               for x, y in zip(getattr(fast, part).parameters(), getattr(ref, part).parameters()))
    x, w = torch.randn(64, a.hidden), torch.randn(a.hidden, a.hidden)
    mm = statistics.median(timed(lambda: x.mm(w), 200) for _ in range(3))
    f, r = statistics.median(t_fast), statistics.median(t_ref)
    print(f"{torch.get_num_threads()} thread(s), hidden {a.hidden}, median of {a.rounds} rounds "
          f"of {a.updates} updates")
    print(f"  hand-written update {f:.3f} ms, autograd {r:.3f} ms: {r / f:.2f}x "
          f"(per-round ratios {min(x / y for x, y in zip(t_ref, t_fast)):.2f}-"
          f"{max(x / y for x, y in zip(t_ref, t_fast)):.2f}); networks identical: {same}")
    print(f"  floor: ten 64x{a.hidden}x{a.hidden} matmuls = {10 * mm:.3f} ms "
          f"({2 * 64 * a.hidden ** 2 / mm / 1e6:.0f} GFLOP/s each)")


if __name__ == "__main__":
    main()
