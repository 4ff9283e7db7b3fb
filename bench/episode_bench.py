"""Wall time of one search episode on the embedded default, split by phase (docs/performance.md).

    python bench/episode_bench.py [--mode kmeans|linear|both] [--train_size 1000 --val_size 1000]
                                   [--channels_last]

For each mode, one episode (policy -> wall -> quantize -> short fine-tune ->
validate -> agent update) is timed phase by phase and compared, in the same run,
with a plain fp32 pass over the same training and validation subsets (one
``train_one_epoch`` + one ``evaluate`` of the float model, same loaders and batch).
The agent is past warmup with a full minibatch in memory, so "agent update" is
the real per-episode cost (one DDPG update per transition). Each figure is the
median of ``--repeat`` runs. Goals (issue 17): episode / fp32 pass <= 1.15x (linear), <= 1.05x
(K-Means), the agent update <= 3% of the episode.
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
from lib.utils.distributed import resolve_device  # noqa: E402
from lib.utils.train import evaluate, train_one_epoch  # noqa: E402


def search_args(mode, a):
    argv = ["--dataset", "mnist5k", "--train_size", str(a.train_size), "--val_size",
            str(a.val_size), "--data_bsize", str(a.data_bsize), "--n_worker", "0",
            "--device", a.device, "--seed", "234", "--warmup", "0"]
    if mode == "linear":
        argv += ["--arch", "qmobilenetv2", "--linear_quantization", "--cost", "latency",
                 "--preserve_ratio", "0.5", "--min_bit", "2", "--float_bit", "8"]
    else:
        argv += ["--arch", "mobilenetv2", "--preserve_ratio", "0.1"]
    if a.pretrained_path:
        argv += ["--pretrained_path", a.pretrained_path]
    if a.channels_last:
        argv += ["--channels_last"]
    args = rl_quantize.get_args_parser().parse_args(argv)
    rl_quantize.check_args(args)
    return args


def fp32_pass(args, loaders, device):
    """One plain fine-tune epoch + validation of the float model on the same subsets."""
    from models import float_twin
    # The float twin (mobilenetv2 for qmobilenetv2) with the same pretrained weights.
    model, _ = rl_quantize.build_model(argparse.Namespace(**dict(
        vars(args), arch=float_twin(args.arch))), device)
    crit = torch.nn.CrossEntropyLoss()
    opt = torch.optim.SGD(model.parameters(), lr=args.finetune_lr, momentum=0.9,
                          weight_decay=4e-5)
    start = time.perf_counter()
    train_one_epoch(model, loaders.train, crit, opt, device, progress=False)
    mid = time.perf_counter()
    evaluate(model, loaders.val, crit, device, progress=False)
    return {"train": mid - start, "validate": time.perf_counter() - mid,
            "pass": time.perf_counter() - start}


def one_episode(env, agent, episode):
    """Run one episode and return its phase times in seconds."""
    env.timings["quantize"] = 0.0
    env.evaluator.timings.update(finetune=0.0, validate=0.0)
    start = time.perf_counter()
    transitions, _ = rl_quantize.play_episode(env, agent, episode)
    t_update = time.perf_counter()
    for _ in range(len(transitions)):
        agent.update_policy()
    end = time.perf_counter()
    t = {"quantize": env.timings["quantize"], "fine-tune": env.evaluator.timings["finetune"],
         "validate": env.evaluator.timings["validate"], "agent update": end - t_update}
    t["other (act, state, wall)"] = (t_update - start) - t["quantize"] - t["fine-tune"] \
        - t["validate"]
    t["episode"] = end - start
    return t


def bench_mode(mode, a, device):
    args = search_args(mode, a)
    loaders = rl_quantize.build_loaders(args)
    model, info = rl_quantize.build_model(args, device)
    env = rl_quantize.build_env(args, model, info, loaders, device)
    agent = rl_quantize.build_agent(args, env, device)
    env.measure_original()
    runs, fp32 = [], []
    for r in range(a.repeat + 1):          # the first round warms caches and is dropped
        fp = fp32_pass(args, loaders, device)
        ep = one_episode(env, agent, episode=r)
        if r > 0:
            fp32.append(fp)
            runs.append(ep)
    med = {k: statistics.median(run[k] for run in runs) for k in runs[0]}
    fp = {k: statistics.median(f[k] for f in fp32) for k in fp32[0]}
    base = fp["pass"]
    print(f"\n{mode} mode ({args.arch}, {len(env.layers)} layers, {env.n_steps} actions), "
          f"train {a.train_size} / val {a.val_size} images, batch {a.data_bsize}, {device}, "
          f"{torch.get_num_threads()} thread(s), "
          f"{'channels-last' if a.channels_last else 'contiguous'}, median of {a.repeat}")
    print(f"  {'phase':28s} {'seconds':>8s} {'share':>7s}")
    for k, v in med.items():
        if k != "episode":
            print(f"  {k:28s} {v:8.2f} {100 * v / med['episode']:6.1f}%")
    print(f"  {'whole episode':28s} {med['episode']:8.2f}")
    print(f"  {'fp32 train+val pass':28s} {base:8.2f}   (train {fp['train']:.2f}, "
          f"validate {fp['validate']:.2f})")
    excess = {"fine-tune": med["fine-tune"] - fp["train"],
              "validate": med["validate"] - fp["validate"],
              **{k: med[k] for k in ("quantize", "agent update", "other (act, state, wall)")}}
    print("  excess over the fp32 pass: " + ", ".join(f"{k} {v:+.2f}" for k, v in excess.items()))
    shares = sorted(run["agent update"] / run["episode"] for run in runs)
    print(f"  agent update: {1e3 * med['agent update'] / env.n_steps:.3f} ms per update "
          f"({env.n_steps} a round), {100 * med['agent update'] / med['episode']:.2f}% of the "
          f"episode (per round {100 * shares[0]:.2f}-{100 * shares[-1]:.2f}%)")
    ratios = sorted(run["episode"] / f["pass"] for run, f in zip(runs, fp32))
    goal = 1.15 if mode == "linear" else 1.05
    print(f"  episode / fp32 pass = {med['episode'] / base:.2f}x (per-round ratios "
          f"{ratios[0]:.2f}-{ratios[-1]:.2f}; goal <= {goal}x, agent update <= 3%)")
    return med["episode"] / base


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--mode", default="both", choices=["kmeans", "linear", "both"])
    p.add_argument("--train_size", type=int, default=1000)
    p.add_argument("--val_size", type=int, default=1000)
    p.add_argument("--data_bsize", type=int, default=128)
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--device", default="cpu", choices=["auto", "cpu", "cuda"])
    p.add_argument("--channels_last", action="store_true",
                   help="the search's --channels_last (the fp32 pass runs channels-last too)")
    p.add_argument("--pretrained_path", default=None,
                   help="default checkpoints/pretrained/mobilenetv2_mnist5k.pth.tar (pretrain.py)")
    a = p.parse_args(argv)
    np.random.seed(234)
    torch.manual_seed(234)
    device = resolve_device(a.device)
    modes = ["kmeans", "linear"] if a.mode == "both" else [a.mode]
    return {m: bench_mode(m, a, device) for m in modes}


if __name__ == "__main__":
    from lib.utils.errors import run_cli
    run_cli(main)
