"""Run one benchmark at two git revisions side by side, in alternating rounds, and print ratios.

    python bench/compare_refs.py OLD_REF NEW_REF --rounds 3 \
        --metric 'episode=whole episode\\s+([\\d.]+)' \
        -- bench/episode_bench.py --mode linear --repeat 1

Each revision is checked out (``git worktree add --detach``) into a temporary folder, and the
benchmark command (everything after ``--``, run with this Python from the checkout's root) runs
old, new, old, new, ... so that load changes on a noisy machine hit both alike. Each ``--metric
NAME=REGEX`` takes the first capture group of every match in a run's output as a number; the
table gives each metric's median per revision, the per-round new/old ratios and their spread.
Paths in the command that exist in this checkout but are git-ignored (a pretrained checkpoint)
are best passed as absolute paths.
"""
import argparse
import os
import re
import statistics
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def checkout(ref, folder):
    """A detached worktree of ``ref`` in ``folder`` (removed again by :func:`remove`)."""
    subprocess.run(["git", "-C", ROOT, "worktree", "add", "--detach", "--quiet", folder, ref],
                   check=True)
    for sub in ("data", "checkpoints/pretrained", "lib/simulator/lookup_tables"):  # as run/setup.sh
        os.makedirs(os.path.join(folder, sub), exist_ok=True)
    return folder


def remove(folder):
    subprocess.run(["git", "-C", ROOT, "worktree", "remove", "--force", folder], check=False)


def run_once(folder, command, log):
    """The benchmark's output (stdout + stderr) in ``folder``; a failure stops the comparison."""
    proc = subprocess.run([sys.executable, *command], cwd=folder, capture_output=True, text=True)
    log.write(proc.stdout + proc.stderr)
    if proc.returncode != 0:
        sys.exit(f"compare_refs: {' '.join(command)} failed in {folder} "
                 f"(exit {proc.returncode}): {proc.stderr.strip().splitlines()[-1:]}")
    return proc.stdout + proc.stderr


def values(text, metrics):
    """{name: [float, ...]}: every match of each metric's pattern in ``text``."""
    return {name: [float(m) for m in pattern.findall(text)] for name, pattern in metrics.items()}


def parse_metric(spec):
    name, sep, pattern = spec.partition("=")
    if not sep or not name:
        raise argparse.ArgumentTypeError(f"expected NAME=REGEX, got {spec!r}")
    try:
        compiled = re.compile(pattern)
    except re.error as e:
        raise argparse.ArgumentTypeError(f"bad regular expression {pattern!r}: {e}")
    if compiled.groups != 1:
        raise argparse.ArgumentTypeError(f"expected one capture group in {pattern!r}")
    return name, compiled


def report(results, metrics, refs):
    """One line per metric and match: medians per revision and the per-round ratios."""
    for name in metrics:
        per_ref = {ref: [run[name] for run in results[ref]] for ref in refs}
        n = min(len(r) for runs in per_ref.values() for r in runs)
        if n == 0:
            print(f"{name}: no match in some run")
            continue
        for k in range(n):
            old = [r[k] for r in per_ref[refs[0]]]
            new = [r[k] for r in per_ref[refs[1]]]
            ratios = sorted(b / a for a, b in zip(old, new) if a)
            label = name if n == 1 else f"{name}[{k}]"
            spread = f"{ratios[0]:.3f}-{ratios[-1]:.3f}" if ratios else "n/a"
            print(f"{label:24s} old {statistics.median(old):10.4f}  new {statistics.median(new):10.4f}"
                  f"  new/old {statistics.median(new) / statistics.median(old):.3f}"
                  f"  (per round {spread})")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("old")
    p.add_argument("new")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--metric", action="append", type=parse_metric, required=True)
    p.add_argument("--log", default=None, help="also write every run's full output here")
    argv = sys.argv[1:] if argv is None else list(argv)
    if "--" not in argv:
        p.error("expected the benchmark command after --")
    split = argv.index("--")
    args, command = p.parse_args(argv[:split]), argv[split + 1:]
    if not command:
        p.error("expected the benchmark command after --")
    metrics = dict(args.metric)
    refs = [args.old, args.new]
    results = {ref: [] for ref in refs}
    with tempfile.TemporaryDirectory() as tmp, \
            open(args.log or os.devnull, "w") as log:
        folders = {}
        try:
            for i, ref in enumerate(refs):
                folders[ref] = checkout(ref, os.path.join(tmp, f"ref{i}"))
            for r in range(args.rounds):
                for ref in refs:
                    log.write(f"\n===== round {r + 1}, {ref}\n")
                    results[ref].append(values(run_once(folders[ref], command, log), metrics))
                print(f"round {r + 1}/{args.rounds} done", file=sys.stderr)
        finally:
            for folder in folders.values():
                remove(folder)
    print(f"{' '.join(command)}: {args.rounds} alternating rounds, old = {refs[0]}, new = {refs[1]}")
    report(results, metrics, refs)


if __name__ == "__main__":
    main()
