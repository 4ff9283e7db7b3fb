"""Uniform-precision baselines and the demo's summary of a search + fine-tune run.

    python -m lib.env.summary uniform SEARCH/strategy.json OUT.json
        The best *uniform* policy (same bits in every layer; linear mode keeps the
        pinned first/last layers) whose cost fits the search's budget, as a strategy.json.
    python -m lib.env.summary uniform SEARCH/strategy.json OUT.json --bits B
        The uniform B-bit policy whatever its cost (the frontier's uniform curve).
    python -m lib.env.summary report DEMO_DIR
        Reads DEMO_DIR/{linear,kmeans}_{search,haq,uniform} (and, when the demo made them,
        _ilp_search/_ilp and the replays in _noise); prints and writes summary.md and
        summary.json, and the plots (per-layer bits, accuracy vs cost, reward).

The HAQ claim under test: at the same or lower cost, the searched mixed-precision
policy is more accurate than the best uniform one after the same fine-tune.
"""
import argparse
import logging
import os
import statistics
import sys

from lib.utils.checkpoint import atomic_write_json, atomic_write_text, read_json
from lib.utils.cli import (ArgumentParser, check_output_dir, check_output_file, bit_width,
                           same_file)
from lib.utils.errors import UserError, run_cli
from lib.utils.strategy import load_strategy

from .report import _pyplot, plot_policy

log = logging.getLogger(__name__)
MODES = ("linear", "kmeans")


def _read_json(path):
    """Strict JSON (NaN/Infinity refused) of an earlier step's output."""
    return read_json(path, "file", "the output of an earlier demo step")


def recorded_cost_table(strategy):
    """(path, sha256) of the user table a strategy.json records, or (None, None) (DESIGN.md 9)."""
    record = strategy.get("cost_table")
    if record is None:
        return None, None
    if not (isinstance(record, dict) and isinstance(record.get("path"), str)
            and isinstance(record.get("sha256"), str)):
        raise UserError("the strategy's 'cost_table' must be {\"path\": ..., \"sha256\": ...}; "
                        f"got {record!r:.80}")
    return record["path"], record["sha256"]


def cost_model_for(strategy):
    """(cost model, layer names) of the model and budget a strategy.json describes.

    A search on a user table is costed with that table, loaded from its recorded
    path and refused if its content no longer has the recorded sha256.
    """
    from lib.simulator import SizeCost, linear_cost_model
    from lib.utils.layers import quantizable_layers
    from lib.utils.run_utils import model_kwargs_for
    from models import get_model

    arch, dataset, linear = strategy["arch"], strategy.get("dataset", "imagenet"), \
        strategy["mode"] == "linear"
    kwargs = model_kwargs_for(arch, dataset, None, strategy.get("width_mult"),
                              strategy.get("input_size"))
    model = get_model(arch, linear=linear, **kwargs)
    layers = quantizable_layers(model, linear=linear)
    if not linear:
        return SizeCost([m.weight.numel() for _, m in layers]), [n for n, _ in layers]
    table, sha256 = recorded_cost_table(strategy)
    cost = linear_cost_model(model, arch, dataset, strategy["hardware"], strategy["metric"],
                             min_bit=strategy.get("min_bit", 1), max_bit=strategy.get("max_bit", 8),
                             cost_table=table, width_mult=strategy.get("width_mult"),
                             cost_table_sha256=sha256, input_size=kwargs["input_size"])
    return cost, [n for n, _ in layers]


def uniform_policy(bits, n_layers, linear):
    """Same bits everywhere; linear mode pins the first layer to [8, -1] and the last to [8, 8]."""
    if not linear:
        return [bits] * n_layers
    return [[8, -1]] + [[bits, bits]] * (n_layers - 2) + [[8, 8]]


def uniform_strategy(strategy, bits, cost=None, names=None):
    """The uniform ``bits`` policy of ``strategy``'s model, as a strategy.json dict.

    Its ``preserve_ratio`` is the search's; ``cost_ratio`` is the uniform policy's own.
    """
    if cost is None:
        cost, names = cost_model_for(strategy)
    policy = uniform_policy(bits, len(names), strategy["mode"] == "linear")
    out = {k: strategy.get(k) for k in ("arch", "mode", "metric", "hardware", "preserve_ratio",
                                          "dataset", "width_mult", "min_bit", "max_bit")}
    if strategy.get("cost_table") is not None:
        out["cost_table"] = strategy["cost_table"]
    out.update(cost_ratio=cost(policy) / cost.reference(), layers=names, strategy=policy,
               uniform_bits=bits, accuracy=None, episode=None)
    return out


def best_uniform(strategy):
    """The widest uniform policy within the strategy's budget, as a strategy.json dict."""
    cost, names = cost_model_for(strategy)
    lo, hi = strategy.get("min_bit", 1), strategy.get("max_bit", 8)
    for bits in range(hi, lo - 1, -1):
        out = uniform_strategy(strategy, bits, cost, names)
        if out["cost_ratio"] <= strategy["preserve_ratio"]:
            return out
    raise UserError(f"no uniform policy of {lo}..{hi} bits fits preserve ratio "
                    f"{strategy['preserve_ratio']}")


def _read_log(path):
    """Episode rows of a search's log.txt (header: episode reward accuracy cost_ratio ...)."""
    rows = []
    with open(path) as f:
        header = f.readline().rstrip("\n").split("\t")
        for line in f:
            cells = dict(zip(header, line.rstrip("\n").split("\t")))
            rows.append({k: float(cells[k]) for k in ("episode", "reward", "accuracy", "cost_ratio")})
    return rows


def _find_search(demo_dir, mode):
    """The newest run folder under DEMO_DIR/<mode>_search that holds a strategy.json."""
    return _newest_run(os.path.join(demo_dir, f"{mode}_search"), "strategy.json")


def _newest_run(parent, holding):
    """The newest run folder under ``parent`` that holds the file ``holding``."""
    runs = sorted((os.path.join(parent, d) for d in os.listdir(parent)), key=os.path.getmtime) \
        if os.path.isdir(parent) else []
    runs = [r for r in runs if os.path.isfile(os.path.join(r, holding))]
    if not runs:
        raise UserError(f"no search with a {holding} under '{parent}'")
    return runs[-1]


def replay_noise(demo_dir, mode):
    """(SD, accuracies) of the searched policy's replays (``<mode>_noise``), or (None, [])."""
    parent = os.path.join(demo_dir, f"{mode}_noise")
    if not os.path.isdir(parent):
        return None, []
    accs = [h["accuracy"] for h in _read_log(os.path.join(_newest_run(parent, "log.txt"),
                                                          "log.txt"))]
    return (statistics.stdev(accs) if len(accs) > 1 else None), accs


def collect(demo_dir, mode):
    """Everything the summary reports for one mode (the ILP row when the demo ran it)."""
    search = _find_search(demo_dir, mode)
    haq = _read_json(os.path.join(search, "strategy.json"))
    uniform = _read_json(os.path.join(demo_dir, f"{mode}_uniform.json"))
    cost, _ = cost_model_for(haq)
    policies = [("haq", haq), ("uniform", uniform)]
    if os.path.isdir(os.path.join(demo_dir, f"{mode}_ilp")):
        ilp = _find_search(demo_dir, f"{mode}_ilp")
        policies.insert(1, ("ilp", _read_json(os.path.join(ilp, "strategy.json"))))
    res = {}
    for name, strat in policies:
        r = _read_json(os.path.join(demo_dir, f"{mode}_{name}", "results.json"))
        c = cost(strat["strategy"])
        value, unit = cost.to_human(c)
        res[name] = {"top1": r.get("best_top1"), "quant_top1": r.get("quant_top1"),
                     "cost_ratio": c / cost.reference(), "cost": value, "unit": unit,
                     "policy": strat["strategy"], "fp32_top1": r.get("fp32_top1")}
    ref_value, ref_unit = cost.to_human(cost.reference())
    res["uniform"]["label"] = _uniform_label(uniform)
    noise_sd, replays = replay_noise(demo_dir, mode)
    return {"search": search, "noise_sd": noise_sd, "replays": replays,
            "history": _read_log(os.path.join(search, "log.txt")),
            "layers": haq["layers"], "preserve_ratio": haq["preserve_ratio"],
            "metric": haq["metric"], "hardware": haq.get("hardware"),
            "reference": {"cost": ref_value, "unit": ref_unit}, **res}


def _uniform_label(uniform):
    b = uniform["uniform_bits"]
    return f"uniform w{b}a{b}" if uniform["mode"] == "linear" else f"uniform {b}-bit"


def _fmt(v, spec=".2f"):
    return "-" if v is None else format(v, spec)


def markdown(summary):
    lines = ["| mode | policy | top-1 after fine-tune (%) | top-1 right after quantization (%) "
             "| cost ratio | cost |", "|---|---|---|---|---|---|"]
    for mode in MODES:
        s = summary.get(mode)
        if not s:
            continue
        ref = s["reference"]
        budget = f"{s['metric']} <= {s['preserve_ratio']} x reference"
        fp32 = s["haq"]["fp32_top1"]
        ref_name = "w8a8" if mode == "linear" else "fp32"
        lines.append(f"| {mode} ({budget}) | fp32 model | {_fmt(fp32)} | - | 1.000 ({ref_name}) "
                     f"| {ref['cost']:.4g} {ref['unit']} |")
        for key, label in (("uniform", s["uniform"]["label"]), ("ilp", "ILP (sensitivity)"),
                           ("haq", "HAQ (searched)")):
            r = s.get(key)
            if r is not None:
                lines.append(f"| {mode} | {label} | {_fmt(r['top1'])} | {_fmt(r['quant_top1'])} "
                             f"| {r['cost_ratio']:.3f} | {r['cost']:.4g} {r['unit']} |")
    return "\n".join(lines) + "\n" + "".join(_gap_line(m, summary[m]) for m in MODES
                                             if summary.get(m))


def _gap_line(mode, s):
    """How far apart HAQ and uniform are after fine-tune, with the noise figures beside it."""
    haq, uni = s["haq"]["top1"], s["uniform"]["top1"]
    if haq is None or uni is None:
        return ""
    line = f"\n{mode}: HAQ - {s['uniform']['label']} = {haq - uni:+.2f} points after fine-tune"
    if s.get("ilp") and s["ilp"]["top1"] is not None:
        line += f" (ILP - uniform = {s['ilp']['top1'] - uni:+.2f})"
    if s.get("noise_sd") is not None:
        line += (f"; noise: the searched policy's search accuracy over {len(s['replays'])} "
                 f"evaluations has SD {s['noise_sd']:.2f} points")
    return line + ".\n"


def plot_search(path, s, mode):
    """Accuracy vs cost of every episode, with the fine-tuned HAQ and uniform policies marked."""
    plt = _pyplot()
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    hist = s["history"]
    ax.scatter([h["cost_ratio"] for h in hist], [h["accuracy"] for h in hist], s=10,
               c=[h["episode"] for h in hist], cmap="viridis", label="search episodes (short fine-tune)")
    for key, marker, color, label in (("haq", "*", "#d62728", "HAQ"),
                                      ("ilp", "D", "#2ca02c", "ILP"),
                                      ("uniform", "s", "#1f77b4", s["uniform"]["label"])):
        r = s.get(key)
        if r is not None and r["top1"] is not None:
            ax.scatter([r["cost_ratio"]], [r["top1"]], marker=marker, s=140, c=color, zorder=3,
                       edgecolors="k", label=f"{label}, after full fine-tune")
    ax.axvline(s["preserve_ratio"], color="#d62728", lw=0.8, ls="--", label="budget")
    ax.set_xlabel(f"{s['metric']} / reference")
    ax.set_ylabel("top-1 (%)")
    ax.set_title(f"{mode}: accuracy vs cost", fontsize=9)
    ax.legend(fontsize=7, loc="lower right")
    ax2.plot([h["episode"] for h in hist], [h["reward"] for h in hist], lw=0.8, marker=".")
    ax2.set_xlabel("episode")
    ax2.set_ylabel("reward = 0.1 x (acc - acc_fp32)")
    ax2.set_title(f"{mode}: reward over episodes", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def report(demo_dir):
    summary = {}
    for mode in MODES:
        if os.path.isdir(os.path.join(demo_dir, f"{mode}_search")):
            summary[mode] = collect(demo_dir, mode)
    if not summary:
        raise UserError(f"'{demo_dir}' holds no linear_search/ or kmeans_search/ folder")
    table = markdown(summary)
    for mode, s in summary.items():
        plot_policy(os.path.join(demo_dir, f"{mode}_policy.png"), s["haq"]["policy"], s["layers"],
                    title=f"HAQ {mode} policy ({s['metric']} ratio {s['haq']['cost_ratio']:.3f})")
        plot_search(os.path.join(demo_dir, f"{mode}_search.png"), s, mode)
    atomic_write_text(os.path.join(demo_dir, "summary.md"), "# HAQ demo summary\n\n" + table)
    atomic_write_json(os.path.join(demo_dir, "summary.json"),
                      {m: {k: v for k, v in s.items() if k != "history"} for m, s in summary.items()})
    return table


def check_not_input(output, source):
    """The output must not be the input file (under any name): the search's result stays."""
    if same_file(output, source):
        raise UserError(f"output '{output}' is the input '{source}'; expected another path (the "
                        "input is never overwritten)")


def read_search_strategy(path):
    """A search's strategy.json with the fields the uniform baseline needs, type-checked."""
    strategy = load_strategy(path)
    needed = ["arch", "preserve_ratio"] + (["metric", "hardware"] if strategy["mode"] == "linear"
                                           else [])
    missing = [k for k in needed if strategy.get(k) is None]
    if missing:
        raise UserError(f"strategy file '{path}' has no '{missing[0]}'; expected a strategy.json "
                        "written by rl_quantize.py")
    return strategy


def get_args_parser():
    p = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    u = sub.add_parser("uniform", help="best uniform policy within a search's budget")
    u.add_argument("strategy", help="the search's strategy.json")
    u.add_argument("output", help="where to write the uniform strategy.json")
    u.add_argument("--bits", type=bit_width, default=None,
                   help="this width in every layer instead, whatever its cost (the frontier's "
                        "uniform curve)")
    r = sub.add_parser("report", help="summary table and plots of a demo folder")
    r.add_argument("demo_dir")
    return p


def main(argv=None):
    args = get_args_parser().parse_args(argv)
    if args.command == "uniform":
        check_not_input(args.output, args.strategy)
        check_output_file(args.output, "output")
        strategy = read_search_strategy(args.strategy)
        if args.bits is None:
            out = best_uniform(strategy)
        else:
            out = uniform_strategy(strategy, args.bits)
        atomic_write_json(args.output, out)
        log.info("%s: cost ratio %.3f", _uniform_label(out), out["cost_ratio"])
        return out
    check_output_dir(args.demo_dir, "demo_dir")
    table = report(args.demo_dir)
    sys.stdout.write(table)
    return table


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    run_cli(main)
