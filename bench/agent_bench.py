"""The DDPG agent's update (:meth:`DDPG.update_policy`): milliseconds per update.

    OMP_NUM_THREADS=1 python bench/agent_bench.py [--hidden 300] [--updates 106] [--device cpu]

An agent with the released sizes (300-unit layers, minibatch 64) and three linear-mode
episodes of transitions in memory runs rounds of one episode's updates (106 on the embedded
default); the first round warms up and is dropped. ``bench/episode_bench.py`` gives the
update's share of a whole episode.
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


def make_agent(hidden, device, state_dim=10, n_layers=53, steps=106):
    torch.manual_seed(0)
    agent = DDPG(state_dim, n_layers, DDPGConfig(hidden1=hidden, hidden2=hidden, warmup=0),
                 device=device, seed=0)
    rng = np.random.default_rng(0)
    for _ in range(3):
        agent.store_episode([(rng.random(state_dim), rng.random(1), rng.random(state_dim),
                              i == steps - 1) for i in range(steps)], float(rng.random()))
    return agent


def ms_per_update(agent, n, device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    for _ in range(n):
        agent.update_policy()   # .item() of the losses waits for the device
    return (time.perf_counter() - start) / n * 1e3


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--hidden", type=int, default=300)
    p.add_argument("--updates", type=int, default=106, help="updates per round (one episode)")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--device", default="cpu")
    a = p.parse_args(argv)
    device = torch.device(a.device)
    agent = make_agent(a.hidden, device)
    times = [ms_per_update(agent, a.updates, device) for _ in range(a.rounds + 1)][1:]
    print(f"{device}, {torch.get_num_threads()} thread(s), hidden {a.hidden}, minibatch "
          f"{agent.cfg.bsize}: {statistics.median(times):.3f} ms per update (median of "
          f"{a.rounds} rounds of {a.updates}; per round {min(times):.3f}-{max(times):.3f})")


if __name__ == "__main__":
    main()
