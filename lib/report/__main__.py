"""Reports of the runs' own files.

    python -m lib.report uniform SEARCH/strategy.json OUT.json
        The best *uniform* policy (same bits in every layer; linear mode keeps the
        pinned first/last layers) whose cost fits the search's budget, as a strategy.json.
    python -m lib.report uniform SEARCH/strategy.json OUT.json --bits B
        The uniform B-bit policy whatever its cost (the frontier's uniform curve).
    python -m lib.report runs DIR [DIR ...] --out OUT
        Any searches (folders with log.txt + strategy.json) and fine-tunes (folders with
        results.json) in or under the DIRs, whatever their names: prints and writes
        OUT/runs.md and OUT/runs.json (a row per policy: cost, budget, search and fine-tuned
        accuracy; a fine-tune joins a search's row only if it trained that very policy),
        OUT/runs.png and, per search, OUT/<run>_search.png and OUT/<run>_policy.png.
    python -m lib.report report DEMO_DIR
        Reads DEMO_DIR/{linear,kmeans}_{search,haq,uniform} (and, when the demo made them,
        _ilp_search/_ilp and the replays in _noise); prints and writes summary.md and
        summary.json, and the plots (per-layer bits, accuracy vs cost, reward); and the
        ``runs`` report of DEMO_DIR (runs.md, runs.json, runs.png).
    python -m lib.report frontier OUT [--warmup 12]
        Reads what run/run_frontier.sh left in OUT; prints and writes frontier.md and
        frontier.json, and frontier.png and learning.png.
"""
import argparse
import logging
import os
import sys

from lib.utils.cli import ArgumentParser, bit_width, check_output_dir, nonneg_int
from lib.utils.errors import UserError, run_cli

from . import anyruns, frontier, summary, uniform


def get_args_parser():
    p = ArgumentParser(prog="python -m lib.report", description=__doc__,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    u = sub.add_parser("uniform", help="best uniform policy within a search's budget")
    u.add_argument("strategy", help="the search's strategy.json")
    u.add_argument("output", help="where to write the uniform strategy.json")
    u.add_argument("--bits", type=bit_width, default=None,
                   help="this width in every layer instead, whatever its cost (the frontier's "
                        "uniform curve)")
    a = sub.add_parser("runs", help="table and plots of any search and fine-tune folders")
    a.add_argument("dirs", nargs="+", metavar="DIR",
                   help="a search or fine-tune folder, or a folder holding them at any depth")
    a.add_argument("--out", required=True, help="folder for runs.md, runs.json and the plots")
    r = sub.add_parser("report", help="summary table and plots of a demo folder")
    r.add_argument("demo_dir")
    f = sub.add_parser("frontier", help="accuracy-vs-cost tables, goals and plots of "
                                        "run/run_frontier.sh")
    f.add_argument("out_dir", help="the folder run/run_frontier.sh wrote")
    f.add_argument("--warmup", type=nonneg_int, default=12,
                   help="warmup episodes of the searches (as run_frontier.sh's WARMUP)")
    return p


def main(argv=None):
    """Run one command; returns the uniform strategy dict or the printed table."""
    args = get_args_parser().parse_args(argv)
    if args.command == "uniform":
        return uniform.write_uniform(args.strategy, args.output, args.bits)
    if args.command == "runs":
        check_output_dir(args.out, "--out")
        table = anyruns.build(args.dirs, args.out)[1]
    elif args.command == "report":
        check_output_dir(args.demo_dir, "demo_dir")
        table = summary.report(args.demo_dir)
    else:
        if not os.path.isdir(args.out_dir):
            raise UserError(f"'{args.out_dir}' is not a folder; expected run_frontier.sh's output")
        _, table = frontier.build(args.out_dir, args.warmup)
    sys.stdout.write(table)
    return table


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    run_cli(main)
