"""The demo's summary of a search + fine-tune run: ``python -m lib.report report DEMO_DIR``.

Reads DEMO_DIR/{linear,kmeans}_{search,haq,uniform} (and, when the demo made them,
_ilp_search/_ilp and the replays in _noise); prints and writes summary.md and
summary.json, and the plots (per-layer bits, accuracy vs cost, reward).

The HAQ claim under test: at the same or lower cost, the searched mixed-precision
policy is more accurate than the best uniform one after the same fine-tune.
"""
import os
import statistics

from lib.utils.checkpoint import atomic_write_json, atomic_write_text, read_json
from lib.utils.errors import UserError

from .plots import plot_policy, pyplot
from .runs import MODES, find_search, newest_run, read_log
from .uniform import cost_model_for, uniform_label


def _read_json(path):
    """Strict JSON (NaN/Infinity refused) of an earlier step's output."""
    return read_json(path, "file", "the output of an earlier demo step")


def replay_noise(demo_dir, mode):
    """(SD, accuracies) of the searched policy's replays (``<mode>_noise``), or (None, [])."""
    parent = os.path.join(demo_dir, f"{mode}_noise")
    if not os.path.isdir(parent):
        return None, []
    run = newest_run(parent, "log.txt")
    accs = [h["accuracy"] for h in read_log(os.path.join(run, "log.txt"))]
    return (statistics.stdev(accs) if len(accs) > 1 else None), accs


def collect(demo_dir, mode):
    """Everything the summary reports for one mode (the ILP row when the demo ran it)."""
    search = find_search(demo_dir, mode)
    haq = _read_json(os.path.join(search, "strategy.json"))
    uniform = _read_json(os.path.join(demo_dir, f"{mode}_uniform.json"))
    cost, _ = cost_model_for(haq)
    policies = [("haq", haq), ("uniform", uniform)]
    if os.path.isdir(os.path.join(demo_dir, f"{mode}_ilp")):
        ilp = find_search(demo_dir, f"{mode}_ilp")
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
    res["uniform"]["label"] = uniform_label(uniform)
    noise_sd, replays = replay_noise(demo_dir, mode)
    return {"search": search, "noise_sd": noise_sd, "replays": replays,
            "history": read_log(os.path.join(search, "log.txt")),
            "layers": haq["layers"], "preserve_ratio": haq["preserve_ratio"],
            "metric": haq["metric"], "hardware": haq.get("hardware"),
            "reference": {"cost": ref_value, "unit": ref_unit}, **res}


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
    plt = pyplot()
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
