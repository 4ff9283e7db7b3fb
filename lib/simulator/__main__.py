"""``python -m lib.simulator``: build (or load) a cost table and summarise it per layer.

Prints, for every quantizable layer, its GEMM shape, the cost at w8a8 and w4a4,
its share of the w8a8 total and whether it is compute- or memory-bound at each
width; then the totals at w8a8 / w6a6 / w4a4 and their ratios, the most expensive
layers, and the memory-bound ones. A PNG bar chart of the per-layer cost is
written next to the table unless ``--no_plot``.

Example::

    python -m lib.simulator --arch mobilenetv2 --dataset imagenet \\
        --hardware bismo_edge --metric latency --batch 16
"""
import logging
import os
import sys

import numpy as np

from lib.simulator.costs import to_human
from lib.simulator.hardware import get_hardware, list_hardware
from lib.simulator.shapes import extract_layer_shapes
from lib.simulator.tables import (CACHE_DIR, METRICS, UNITS, check_metric, get_table,
                                  table_path)
from lib.utils import cli
from lib.utils.errors import UserError, run_cli

log = logging.getLogger("lib.simulator")


def get_args_parser():
    p = cli.ArgumentParser(prog="python -m lib.simulator", description=__doc__.split("\n")[0])
    p.add_argument("--arch", required=True, help="model name from the models registry")
    p.add_argument("--dataset", default="imagenet", help="sets classes and input size")
    p.add_argument("--hardware", required=True, choices=list_hardware(), help="cost model preset")
    p.add_argument("--metric", default="latency", help=f"one of: {', '.join(METRICS)}")
    p.add_argument("--batch", type=cli.positive_int, default=16,
                   help="batch size the table is built for")
    p.add_argument("--input_size", type=cli.input_size, default=None,
                   help="image size the layers are traced at, 8..1024 (default: the dataset's, 224 "
                        "or 32 for mnist5k); <= 64 px uses the CIFAR-style stem")
    p.add_argument("--width_mult", type=cli.width_mult, default=None,
                   help="MobileNet width (default 1.0)")
    p.add_argument("--max_bit", type=cli.number(int, 8, 16), default=8,
                   help="widest bit width in the table, 8..16 (the summary shows w8a8)")
    p.add_argument("--top", type=cli.nonneg_int, default=5,
                   help="how many of the costliest layers to list")
    p.add_argument("--cache_dir", default=str(CACHE_DIR))
    cli.bool_flag(p, "--rebuild", False, "ignore a cached table")
    p.add_argument("--plot", default=None, help="PNG path (default: next to the table)")
    cli.bool_flag(p, "--no_plot", False, "write no plot")
    return p


def parse_args(argv):
    """Parsed flags, with the output paths checked (nothing is created)."""
    args = get_args_parser().parse_args(argv)
    cli.check_output_dir(args.cache_dir, "--cache_dir")
    if args.plot and not args.no_plot:
        if not args.plot.lower().endswith(".png"):
            raise UserError(f"--plot '{args.plot}' is not a .png path; expected e.g. costs.png")
        cli.check_output_file(args.plot, "--plot")
    return args


def _fmt(value, unit):
    number, shown = to_human(value, unit)
    return f"{number:.4g} {shown}"


def summarize(shapes, table, hw, metric, top=5):
    """The report as a list of lines (separate from main so that tests can read it)."""
    unit = UNITS[metric]
    t8, t6, t4 = (table[:, b - 1, b - 1] for b in (8, 6, 4))
    bounds = {b: [hw.layer_cost(s, b, b).bound if metric != "size" else "-" for s in shapes]
              for b in (8, 4)}
    show_cycles = metric == "latency"
    lines = [f"{'#':>3} {'layer':<28} {'type':<4} {'M x K x N (x groups)':<26} "
             f"{'w8a8':>12} {'w4a4':>12} {'share':>6}  bound@8/@4"
             + ("  cycles@w8a8" if show_cycles else "")]
    for i, s in enumerate(shapes):
        gemm = f"{s.M}x{s.K}x{s.N}" + (f" x{s.groups}" if s.groups > 1 else "")
        extra = f"  {hw.layer_cost(s, 8, 8).cycles}" if show_cycles else ""
        lines.append(f"{i:>3} {s.name[:28]:<28} {s.layer_type:<4} {gemm:<26} "
                     f"{_fmt(t8[i], unit):>12} {_fmt(t4[i], unit):>12} "
                     f"{100 * t8[i] / t8.sum():>5.1f}%  {bounds[8][i]}/{bounds[4][i]}{extra}")
    lines.append(f"total w8a8 {_fmt(t8.sum(), unit)}, w6a6 {_fmt(t6.sum(), unit)}, "
                 f"w4a4 {_fmt(t4.sum(), unit)}")
    lines.append(f"ratio w4a4/w8a8 = {t4.sum() / t8.sum():.3f}, "
                 f"w6a6/w8a8 = {t6.sum() / t8.sum():.3f}")
    order = np.argsort(-t8, kind="stable")[:top]
    lines.append(f"top {top} at w8a8: " + ", ".join(
        f"{i} {shapes[i].name} ({shapes[i].layer_type}, {100 * t8[i] / t8.sum():.1f}%)"
        for i in order))
    for b in (8, 4):
        mem = [f"{i} {s.name} ({s.layer_type})" for i, s in enumerate(shapes)
               if bounds[b][i] == "memory"]
        lines.append(f"memory-bound at w{b}a{b}: {len(mem)} of {len(shapes)}"
                     + (": " + ", ".join(mem) if mem else ""))
    return lines


def plot_layers(table, shapes, path, title, unit):
    """Bar chart of per-layer cost at w8a8 and w4a4 (matplotlib, Agg backend)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    scale, shown = to_human(1.0, unit)
    x = np.arange(len(shapes))
    fig, ax = plt.subplots(figsize=(max(8, 0.18 * len(shapes)), 3.5))
    ax.bar(x - 0.2, table[:, 7, 7] * scale, width=0.4, label="w8a8")
    ax.bar(x + 0.2, table[:, 3, 3] * scale, width=0.4, label="w4a4")
    for i, s in enumerate(shapes):
        if s.depthwise:
            ax.axvspan(i - 0.5, i + 0.5, color="0.9", zorder=0)
    ax.set_xlabel("layer (grey: depthwise)")
    ax.set_ylabel(shown)
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120, format="png")   # exactly ``path``: no extension is added
    plt.close(fig)
    return os.path.abspath(path)


def main(argv=None):
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    from lib.utils.data_utils import dataset_info
    from models import get_model

    hw = get_hardware(args.hardware)
    check_metric(hw, args.metric)          # fail before building the model
    num_classes, default_size = dataset_info(args.dataset)
    size = args.input_size or default_size
    model = get_model(args.arch, num_classes=num_classes, input_size=size,
                      width_mult=args.width_mult)
    table = get_table(args.arch, args.dataset, hw, args.metric, args.batch, model=model,
                      input_size=size, cache_dir=args.cache_dir, max_bit=args.max_bit,
                      rebuild=args.rebuild, width_mult=args.width_mult)
    shapes = extract_layer_shapes(model, size, batch=args.batch)
    print(f"{args.arch} on {args.dataset} at {size}px, batch {args.batch}; {hw.name} {args.metric} "
          f"({UNITS[args.metric]}); table {tuple(table.shape)} indexed [layer, w-1, a-1]")
    print(f"hardware: {hw}")
    print("\n".join(summarize(shapes, table, hw, args.metric, args.top)))
    if not args.no_plot:
        path = args.plot or table_path(args.arch, args.dataset, hw, args.metric, args.batch,
                                       args.cache_dir, size, args.width_mult).with_suffix(".png")
        written = plot_layers(table, shapes, path,
                              f"{args.arch} {hw.name} {args.metric}, batch {args.batch}",
                              UNITS[args.metric])
        print(f"plot: {written}")
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main, sys.argv[1:]))
