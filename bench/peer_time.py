"""Whole-process time of our allocator and MCT's, fresh processes side by side (issue 34).

bench/peer_bench.py times each tool's allocation phase: our search's "allocation" log line
(scores, integer program, refinement) against MCT's PTQ call. A user runs a whole process, so
this bench also times those: each round starts, one after the other,

- ours: ``rl_quantize.py --linear_quantization --cost size --preserve_ratio X --method ilp``
  (plus ``--ours-args``) into a fresh output folder, so no cached score is reused: start-up,
  model and data, the original accuracy, the allocation and its reward episode (quantization,
  the short fine-tune and validation);
- MCT: a python process that does what an MCT user's script does on the same model and data:
  import MCT, build the float model and the data, measure the 8-bit weight memory (the budget's
  reference), run the mixed-precision PTQ, score top-1 on the test split.

Both run on one thread (``OMP_NUM_THREADS=1``). The figure is CPU seconds of the child process
(from ``getrusage``), which other jobs on a shared machine disturb less than wall time; wall
seconds are printed beside. Rounds alternate which tool starts first. Prints, per tool, the
median and range over rounds of the whole process and of its allocation phase, and the
median of the per-round ratio ours / MCT. Needs MCT (see bench/peer_bench.py's docstring):

    nice /work/mct-venv/bin/python bench/peer_time.py --budget 0.375 --rounds 3 \\
        --ours-args "--per_channel --refine 130"
"""
import argparse
import json
import logging
import os
import re
import resource
import shlex
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "bench"))

import peer_bench  # noqa: E402
from lib.utils.checkpoint import atomic_write_json  # noqa: E402
from lib.utils.errors import UserError  # noqa: E402

log_bench = logging.getLogger("peer_time")
# our search's summary line: "allocation (scores, integer program, refinement): 13.2s, 13.2 CPU s"
ALLOCATION_LINE = re.compile(r"allocation \([^)]*\): ([0-9.]+)s, ([0-9.]+) CPU s")


def allocation_cpu_seconds(log_text):
    """CPU seconds of the allocation phase from our search's log, or None without the line."""
    found = ALLOCATION_LINE.findall(log_text)
    return float(found[-1][1]) if found else None


def _children_cpu():
    use = resource.getrusage(resource.RUSAGE_CHILDREN)
    return use.ru_utime + use.ru_stime


def timed_process(cmd, log_path):
    """Run ``cmd`` in a fresh process on one thread: (its CPU seconds, wall seconds, stderr)."""
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    cpu, start = _children_cpu(), time.perf_counter()
    done = subprocess.run(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True)
    wall, cpu = time.perf_counter() - start, _children_cpu() - cpu
    with open(log_path, "a") as log:
        log.write("$ " + shlex.join(cmd) + "\n" + done.stderr)
    if done.returncode != 0:
        raise UserError(f"'{shlex.join(cmd[1:3])} ...' failed (exit {done.returncode}); "
                        f"see {log_path}")
    return cpu, wall, done.stdout, done.stderr


def run_round(args, folder, round_index):
    """One round: ours and MCT, the first tool alternating by round. A dict per tool."""
    out = {}
    ours_cmd = [args.python, "rl_quantize.py", "--arch", "qmobilenetv2", "--linear_quantization",
                "--cost", "size", "--preserve_ratio", str(args.budget), "--min_bit", "2",
                "--max_bit", "8", "--method", "ilp", *peer_bench.SEARCH_DATA, "--threads", "1",
                "--progress", "false", *shlex.split(args.ours_args)]
    mct_cmd = [args.python, os.path.join("bench", "peer_time.py"), "--mct-child",
               "--budget", str(args.budget), "--mct-bits", args.mct_bits]
    order = ["ours", "mct"] if round_index % 2 == 0 else ["mct", "ours"]
    for tool in order:
        log_path = os.path.join(folder, f"{tool}.log")
        if tool == "ours":
            search_out = tempfile.mkdtemp(prefix=f"ours_round{round_index}_", dir=folder)
            cpu, wall, _, stderr = timed_process(ours_cmd + ["--output", search_out], log_path)
            phase = allocation_cpu_seconds(stderr)
            if phase is None:
                raise UserError(f"our search logged no allocation line; see {log_path}")
        else:
            cpu, wall, stdout, _ = timed_process(mct_cmd, log_path)
            phase = json.loads(stdout.strip().splitlines()[-1])["alloc_cpu_seconds"]
        out[tool] = {"process_cpu_s": cpu, "process_wall_s": wall, "allocation_cpu_s": phase}
        log_bench.info("round %d %s: process %.1f CPU s (%.1f s wall), allocation %.1f CPU s",
                       round_index + 1, tool, cpu, wall, phase)
    return out


def summarise(rounds):
    """Median and range per tool and measure, and the median of the per-round ratios."""
    def stats(values):
        return {"median": statistics.median(values), "min": min(values), "max": max(values)}
    summary = {}
    for key in ("process_cpu_s", "allocation_cpu_s", "process_wall_s"):
        summary[key] = {tool: stats([r[tool][key] for r in rounds]) for tool in ("ours", "mct")}
        summary[key]["ratio_ours_mct"] = stats([r["ours"][key] / r["mct"][key] for r in rounds])
    return summary


def format_summary(summary):
    names = {"process_cpu_s": "whole process, CPU s", "allocation_cpu_s":
             "allocation phase, CPU s (ours: scores + ILP + refinement; MCT: its PTQ call)",
             "process_wall_s": "whole process, wall s"}
    lines = ["| measure | ours: median (range) | MCT: median (range) | ours / MCT per round: "
             "median (range) |", "|---|---|---|---|"]
    for key, name in names.items():
        cells = [f"{summary[key][t]['median']:.2f} ({summary[key][t]['min']:.2f}-"
                 f"{summary[key][t]['max']:.2f})" for t in ("ours", "mct", "ratio_ours_mct")]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def mct_child(args):
    """The MCT user's process: everything peer_bench.run_mct does, its result as one JSON line."""
    calib = (args.calib_images, args.calib_batch, args.mp_images)
    with tempfile.TemporaryDirectory() as tmp:
        result = peer_bench.run_mct(args.budget, peer_bench.MCT_BIT_SETS[args.mct_bits], calib,
                                    os.path.join(tmp, "mct.log"))
    print(json.dumps({k: result[k] for k in ("alloc_cpu_seconds", "own_quant_top1",
                                              "size_ratio")}))


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--budget", type=peer_bench._budget, default=0.375,
                   help="weights budget as a share of the 8-bit weight size")
    p.add_argument("--mct-bits", choices=sorted(peer_bench.MCT_BIT_SETS), default="8,4,2",
                   help="MCT's weight width options")
    p.add_argument("--rounds", type=peer_bench._positive, default=3)
    p.add_argument("--ours-args", default="",
                   help="extra rl_quantize.py flags of our search, one quoted string")
    p.add_argument("--calib-images", type=peer_bench._positive, default=256)
    p.add_argument("--calib-batch", type=peer_bench._positive, default=32)
    p.add_argument("--mp-images", type=peer_bench._positive, default=32)
    p.add_argument("--out", default=os.path.join("outputs", "peer_time"))
    p.add_argument("--python", default=sys.executable, help="python that runs both processes")
    p.add_argument("--mct-child", action="store_true", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S",
                        stream=sys.stderr)
    if args.mct_child:
        return mct_child(args)
    try:
        import model_compression_toolkit  # noqa: F401
    except ImportError:
        raise UserError(peer_bench.INSTALL_HINT) from None
    folder = os.path.abspath(os.path.join(args.out, f"budget_{args.budget:g}"))
    os.makedirs(folder, exist_ok=True)
    rounds = [run_round(args, folder, i) for i in range(args.rounds)]
    summary = summarise(rounds)
    command = "python bench/peer_time.py " + shlex.join(argv if argv is not None else sys.argv[1:])
    stamp = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    atomic_write_json(os.path.join(folder, "peer_time.json"),
                      {"command": command, "date": stamp, "rounds": rounds, "summary": summary})
    print(f"`{command}` ({stamp}), {args.rounds} rounds\n\n{format_summary(summary)}")


if __name__ == "__main__":
    from lib.utils.errors import run_cli
    run_cli(main)
