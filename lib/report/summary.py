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

from . import anyruns
from .plots import plot_policy, save, search_figure
from .runs import (MODES, find_search, matching_results, newest_run, over_budget,
                   policy_sha256, read_log)
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


def policy_row(strategy, results, cost):
    """One policy's row: its cost from its own bits, its accuracies from the fine-tune that
    trained exactly those bits (None when no such fine-tune was found)."""
    c = cost(strategy["strategy"])
    value, unit = cost.to_human(c)
    r = results or {}
    return {"top1": r.get("best_top1"), "quant_top1": r.get("quant_top1"),
            "cost_ratio": c / cost.reference(), "cost": value, "unit": unit,
            "policy": strategy["strategy"], "fp32_top1": r.get("fp32_top1"),
            "matched": results is not None, "policy_sha256": policy_sha256(strategy["strategy"])}


def collect(demo_dir, mode):
    """Everything the summary reports for one mode (the ILP row when the demo ran it).

    A fine-tune that trained another policy than the strategy beside it (a later search
    replaced the strategy, say) is left out with a note; a row over the budget is marked.
    """
    search = find_search(demo_dir, mode)
    haq = _read_json(os.path.join(search, "strategy.json"))
    uniform = _read_json(os.path.join(demo_dir, f"{mode}_uniform.json"))
    cost, _ = cost_model_for(haq)
    policies = [("haq", haq), ("uniform", uniform)]
    if os.path.isdir(os.path.join(demo_dir, f"{mode}_ilp")):
        ilp = find_search(demo_dir, f"{mode}_ilp")
        policies.insert(1, ("ilp", _read_json(os.path.join(ilp, "strategy.json"))))
    res, notes = {}, []
    for name, strat in policies:
        results = matching_results(os.path.join(demo_dir, f"{mode}_{name}"), strat, notes)
        res[name] = policy_row(strat, results, cost)
        res[name]["over_budget"] = over_budget(res[name]["cost_ratio"], haq["preserve_ratio"])
    ref_value, ref_unit = cost.to_human(cost.reference())
    res["uniform"]["label"] = uniform_label(uniform)
    noise_sd, replays = replay_noise(demo_dir, mode)
    return {"search": search, "noise_sd": noise_sd, "replays": replays,
            "history": read_log(os.path.join(search, "log.txt")),
            "layers": haq["layers"], "preserve_ratio": haq["preserve_ratio"],
            "metric": haq["metric"], "hardware": haq.get("hardware"),
            "reference": {"cost": ref_value, "unit": ref_unit}, "notes": notes, **res}


def _fmt(v, spec=".2f"):
    return "-" if v is None else format(v, spec)


def _cost_cell(r):
    """The cost ratio, marked when the policy does not fit the budget it is reported under."""
    return f"{r['cost_ratio']:.3f}" + (" **over budget**" if r.get("over_budget") else "")


def markdown(summary):
    lines = ["| mode | policy | top-1 after fine-tune (%) | top-1 right after quantization (%) "
             "| cost ratio | cost |", "|---|---|---|---|---|---|"]
    notes = []
    for mode in MODES:
        s = summary.get(mode)
        if not s:
            continue
        ref = s["reference"]
        budget = f"{s['metric']} <= {s['preserve_ratio']} x reference"
        fp32 = next((s[k]["fp32_top1"] for k in ("haq", "ilp", "uniform")
                     if s.get(k) and s[k]["fp32_top1"] is not None), None)
        ref_name = "w8a8" if mode == "linear" else "fp32"
        lines.append(f"| {mode} ({budget}) | fp32 model | {_fmt(fp32)} | - | 1.000 ({ref_name}) "
                     f"| {ref['cost']:.4g} {ref['unit']} |")
        for key, label in (("uniform", s["uniform"]["label"]), ("ilp", "ILP (sensitivity)"),
                           ("haq", "HAQ (searched)")):
            r = s.get(key)
            if r is not None and r.get("matched", True):
                lines.append(f"| {mode} | {label} | {_fmt(r['top1'])} | {_fmt(r['quant_top1'])} "
                             f"| {_cost_cell(r)} | {r['cost']:.4g} {r['unit']} |")
        notes += [f"- {mode}: {n}" for n in s.get("notes", [])]
    gaps = "".join(_gap_line(m, summary[m]) for m in MODES if summary.get(m))
    return "\n".join(lines) + "\n" + gaps + ("\nNotes:\n" + "\n".join(notes) + "\n" if notes
                                             else "")


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
    """Accuracy vs cost of every episode; the fine-tuned HAQ, ILP and uniform policies marked."""
    marks = [(label, marker, color, s[key]["cost_ratio"], s[key]["top1"])
             for key, marker, color, label in (("haq", "*", "#d62728", "HAQ"),
                                               ("ilp", "D", "#2ca02c", "ILP"),
                                               ("uniform", "s", "#1f77b4", s["uniform"]["label"]))
             if s.get(key) is not None and s[key]["top1"] is not None]
    save(*search_figure(s["history"], marks, s["preserve_ratio"], s["metric"], mode), path)


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
    # the same table any runs get, beside the demo's own HAQ-vs-uniform summary
    anyruns.build([demo_dir], demo_dir, search_plots=False)
    atomic_write_text(os.path.join(demo_dir, "summary.md"), "# HAQ demo summary\n\n" + table)
    atomic_write_json(os.path.join(demo_dir, "summary.json"),
                      {m: {k: v for k, v in s.items() if k != "history"} for m, s in summary.items()})
    return table
