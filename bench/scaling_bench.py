"""Search episode time on 1 and N processes (torchrun, gloo on CPU, 1 thread each), side by side.

    python bench/scaling_bench.py [--procs 2] [--mode kmeans] [--train_size 2000 --val_size 1000]

Runs the same short search of the embedded default (mnist5k, the pretrained
width-0.5 MobileNet-V2) once per process count, each under
``python -m torch.distributed.run --nproc_per_node N`` with OMP_NUM_THREADS=1,
and reads each episode's wall time from the search's own log line. The first
episode (warm-up of caches and allocators) is dropped; the median of the rest is
reported, with the 1-process / N-process ratio. ``--rounds`` alternates the two
runs that many times (on a shared machine the load drifts; alternating spreads
it over both). ``--control`` adds a third run, one process on 1/N of the work
(train, val and batch divided by N): on a busy machine it tells the cost of the
collectives (N processes on the whole work vs one on a share) from the load.
The episodes of a run are past the agent's warmup only if --warmup says so; the
default (all random) keeps the agent's update out of the measurement, as the
fine-tune and validation are what is spread over the processes.
"""
import argparse
import os
import re
import socket
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EPISODE_LINE = re.compile(r"episode (\d+)/\d+ .*\)\s+([0-9.]+)s\s+eta")


def search_cmd(procs, port, a, out):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(procs),
           "--master_port", str(port), "rl_quantize.py", "--dataset", "mnist5k",
           "--train_size", str(a.train_size), "--val_size", str(a.val_size),
           "--data_bsize", str(a.data_bsize), "--n_worker", "0", "--device", "cpu",
           "--train_episode", str(a.episodes), "--warmup", str(a.warmup), "--output", out]
    if a.pretrained_path:
        cmd += ["--pretrained_path", a.pretrained_path]
    if a.mode == "linear":
        cmd += ["--arch", "qmobilenetv2", "--linear_quantization", "--preserve_ratio", "0.5",
                "--min_bit", "3"]
    else:
        cmd += ["--preserve_ratio", "0.1", "--min_bit", "2"]
    return cmd


def free_port():
    """A port nothing listens on now (another job may hold a fixed one)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def run(procs, a):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    with tempfile.TemporaryDirectory() as out:
        start = time.perf_counter()
        r = subprocess.run(search_cmd(procs, free_port(), a, out), cwd=ROOT, env=env,
                           capture_output=True, text=True)
        wall = time.perf_counter() - start
    if r.returncode != 0:
        sys.exit(f"error: the {procs}-process search failed:\n{r.stderr[-3000:]}")
    times = [float(t) for _, t in EPISODE_LINE.findall(r.stderr)]
    return times, wall


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--procs", type=int, default=2, help="processes of the parallel run")
    p.add_argument("--mode", default="kmeans", choices=["kmeans", "linear"])
    p.add_argument("--train_size", type=int, default=2000)
    p.add_argument("--val_size", type=int, default=1000)
    p.add_argument("--data_bsize", type=int, default=100, help="global batch")
    p.add_argument("--episodes", type=int, default=4)
    p.add_argument("--warmup", type=int, default=100)
    p.add_argument("--rounds", type=int, default=1, help="alternate 1 and N processes this often")
    p.add_argument("--control", action="store_true",
                   help="also run 1 process on 1/N of the work (see the module docstring)")
    p.add_argument("--pretrained_path", default=None,
                   help="default checkpoints/pretrained/mobilenetv2_mnist5k.pth.tar")
    a = p.parse_args(argv)
    share = argparse.Namespace(**dict(vars(a), train_size=a.train_size // a.procs,
                                      val_size=a.val_size // a.procs,
                                      data_bsize=a.data_bsize // a.procs))
    runs = [("1 process", 1, a), (f"{a.procs} processes", a.procs, a)]
    if a.control:
        runs.append((f"1 process, 1/{a.procs} of the work", 1, share))
    episodes = {name: [] for name, *_ in runs}
    for _ in range(a.rounds):
        for name, procs, args in runs:
            times, wall = run(procs, args)
            episodes[name] += times[1:]
            print(f"{name} x 1 thread: episodes {', '.join(f'{t:.1f}' for t in times)} s "
                  f"(first dropped); whole run {wall:.0f} s", flush=True)
    results = {name: statistics.median(t) for name, t in episodes.items()}
    for name, median in results.items():
        print(f"{name}: median episode {median:.2f} s over {len(episodes[name])}")
    print(f"{a.mode} episode, train {a.train_size} / val {a.val_size}, global batch "
          f"{a.data_bsize}: 1 / {a.procs} processes = "
          f"{results['1 process'] / results[f'{a.procs} processes']:.2f}x")
    return results


if __name__ == "__main__":
    main()
