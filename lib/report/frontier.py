"""The accuracy-vs-cost frontier of run/run_frontier.sh: tables, goal checks and plots.

    python -m lib.report frontier OUT [--warmup 12]

reads what the script's runs left in OUT (nothing else: every figure comes from a
search's strategy.json / log.txt or a fine-tune's results.json)::

    OUT/<mode>/b<budget>/<method>.strategy     the run's strategy.json path (rl_quantize's stdout)
    OUT/<mode>/b<budget>/<method>_ft/results.json   the demo's fine-tune of that policy
    OUT/<mode>/b<budget>/noise.strategy        a replayed policy (--method replay): the reward noise
    OUT/<mode>/uniform/w<bits>.json, w<bits>_ft/results.json   uniform policies, fine-tuned alike

with ``<method>`` one of ``ilp``, ``ddpg_s<seed>``, ``random_s<seed>``, and writes
frontier.json, frontier.md, frontier.png (accuracy after fine-tune vs cost ratio)
and learning.png (search accuracy per episode, mean over seeds, DDPG vs random).

Accuracies are in percent; the search reward is 0.1 x (accuracy - fp32 accuracy), so
every comparison made on accuracy holds for the reward.
"""
import glob
import logging
import os
import re
import statistics

from lib.utils.checkpoint import atomic_write_json, atomic_write_text, read_json
from lib.utils.errors import UserError

from .plots import pyplot
from .runs import MODES, is_finetune, matching_results, over_budget, policy_of, read_log

log = logging.getLogger(__name__)

METHODS = ("ddpg", "random", "ilp")
SMOOTH = 5   # episodes in the learning plot's running mean
COLORS = {"ddpg": "#d62728", "random": "#7f7f7f", "ilp": "#2ca02c", "uniform": "#1f77b4"}


def _json(path):
    return read_json(path, "file", "the output of a run_frontier.sh step")


def _sd(values):
    return statistics.stdev(values) if len(values) > 1 else 0.0


def _mean(values):
    return statistics.fmean(values) if values else None


def read_run(prefix, notes):
    """One search of the frontier: its best policy, episode history and fine-tune result.

    The fine-tune counts only if it trained this search's policy (a rerun search beside an
    older fine-tune is not paired with it); ``notes`` says which were left out.
    """
    with open(prefix + ".strategy") as f:
        strategy_path = f.read().strip()
    strategy = _json(strategy_path)
    if not isinstance(strategy, dict) or policy_of(strategy) is None:
        notes.append(f"{prefix}.strategy: skipped, '{strategy_path}' holds no policy")
        return None
    history = read_log(os.path.join(os.path.dirname(strategy_path), "log.txt"))
    ft = prefix + "_ft"
    results = (matching_results(ft, strategy, notes) if is_finetune(ft) else None) or {}
    return {"search_acc": strategy.get("accuracy"), "cost_ratio": strategy.get("cost_ratio"),
            "best_episode": strategy.get("episode"), "top1": results.get("best_top1"),
            "fp32_top1": results.get("fp32_top1"), "policy": strategy["strategy"],
            "history": [h["accuracy"] for h in history]}


def learning(history, warmup):
    """Warmup mean, last-quarter mean (accuracy %) and their difference for one search."""
    last = history[-max(1, len(history) // 4):]
    first = history[:warmup] or history[:1]
    return {"warmup_mean": _mean(first), "last_quarter_mean": _mean(last),
            "gain": _mean(last) - _mean(first)}


def top_quarter_sd(history):
    """SD of the search accuracy among the best quarter of a search's episodes."""
    best = sorted(history, reverse=True)[:max(2, len(history) // 4)]
    return _sd(best)


def collect_budget(folder, warmup, notes):
    """Every run at one budget, grouped by method, plus the noise and goal figures."""
    runs = {m: [] for m in METHODS}
    for path in sorted(glob.glob(os.path.join(glob.escape(folder), "*.strategy"))):
        name = os.path.basename(path)[:-len(".strategy")]
        match = re.fullmatch(r"(ddpg|random)_s(\d+)|ilp", name)
        if match:
            run = read_run(path[:-len(".strategy")], notes)
            if run is None:
                continue
            run["seed"] = int(match.group(2)) if match.group(2) else None
            runs[match.group(1) or "ilp"].append(run)
        elif name != "noise":
            notes.append(f"{path}: skipped, not ilp, ddpg_s<seed>, random_s<seed> or noise")
    out = {"runs": runs}
    noise_prefix = os.path.join(folder, "noise")
    noise = read_run(noise_prefix, notes) if os.path.isfile(noise_prefix + ".strategy") else None
    if noise is not None:
        replays = noise["history"]
        out["noise"] = {"replays": replays, "sd": _sd(replays)}
    for method in ("ddpg", "random"):
        rs = runs[method]
        out[method] = {
            "search_acc_mean": _mean([r["search_acc"] for r in rs]),
            "top1_mean": _mean([r["top1"] for r in rs if r["top1"] is not None]),
            "top1_sd": _sd([r["top1"] for r in rs if r["top1"] is not None]),
            "cost_ratio_mean": _mean([r["cost_ratio"] for r in rs]),
            "learning": [dict(learning(r["history"], warmup), seed=r["seed"],
                              best_episode=r["best_episode"]) for r in rs]}
    out["random"]["top_quarter_sd"] = [top_quarter_sd(r["history"]) for r in runs["random"]]
    return out


def collect_uniform(folder, notes):
    """The uniform policies w<bits>.json whose fine-tune w<bits>_ft trained that very policy."""
    rows = []
    for path in sorted(glob.glob(os.path.join(glob.escape(folder), "w*.json"))):
        match = re.fullmatch(r"w(\d+)\.json", os.path.basename(path))
        if not match:
            notes.append(f"{path}: skipped, not a uniform policy w<bits>.json")
            continue
        ft = os.path.join(folder, f"w{match.group(1)}_ft")
        strategy = _json(path)
        if not isinstance(strategy, dict) or policy_of(strategy) is None:
            notes.append(f"{path}: skipped, it holds no policy")
            continue
        r = matching_results(ft, strategy, notes) if is_finetune(ft) else None
        if r is None or not isinstance(strategy.get("cost_ratio"), (int, float)):
            continue
        rows.append({"bits": int(match.group(1)), "cost_ratio": strategy["cost_ratio"],
                     "top1": r.get("best_top1"), "fp32_top1": r.get("fp32_top1")})
    return sorted(rows, key=lambda r: r["cost_ratio"])


def goals(b, budget, uniform, warmup):
    """The issue's four goals at one budget, each with the figures it was decided on."""
    g, noise = {}, b.get("noise", {}).get("sd")
    quarter = _mean(b["random"]["top_quarter_sd"])
    if noise is not None and quarter:
        g["signal"] = {"noise_sd": noise, "top_quarter_sd": quarter,
                       "held": noise <= quarter / 3}
    lrn = b["ddpg"]["learning"]
    if lrn and noise is not None:
        after = sum(r["best_episode"] is not None and r["best_episode"] >= warmup for r in lrn)
        g["learning"] = {"gains": [r["gain"] for r in lrn], "two_noise_sd": 2 * noise,
                         "best_after_warmup": after, "seeds": len(lrn),
                         "held": all(r["gain"] >= 2 * noise for r in lrn)
                         and after >= min(2, len(lrn))}
    d, r = b["ddpg"], b["random"]
    if d["search_acc_mean"] is not None and r["search_acc_mean"] is not None:
        g["vs_random"] = {"search": [d["search_acc_mean"], r["search_acc_mean"]],
                          "top1": [d["top1_mean"], r["top1_mean"]]}
        g["vs_random"]["held"] = (d["search_acc_mean"] > r["search_acc_mean"]
                                  and None not in g["vs_random"]["top1"]
                                  and d["top1_mean"] > r["top1_mean"])
    fits = [u for u in uniform if u["cost_ratio"] <= budget + 1e-9 and u["top1"] is not None]
    fp32 = next((u["fp32_top1"] for u in uniform if u["fp32_top1"] is not None), None)
    if fits and fp32 is not None and d["top1_mean"] is not None:
        best = max(fits, key=lambda u: u["top1"])
        ilp = b["runs"]["ilp"][0]["top1"] if b["runs"]["ilp"] else None
        g["vs_uniform"] = {"uniform_bits": best["bits"], "uniform_top1": best["top1"],
                           "uniform_loss": fp32 - best["top1"], "ddpg_mean": d["top1_mean"],
                           "ddpg_sd": d["top1_sd"], "ilp_top1": ilp,
                           "applies": fp32 - best["top1"] >= 1.0}
        # the goal speaks of budgets where uniform loses >= 1 point; elsewhere it is n/a
        g["vs_uniform"]["held"] = (d["top1_mean"] - best["top1"] > d["top1_sd"]
                                   if g["vs_uniform"]["applies"] else None)
    return g


def _budget_of(folder):
    """The budget of a b<budget> folder (b0.07), or None for anything else (b0.08.bak, a file)."""
    match = re.fullmatch(r"b(\d+(?:\.\d*)?|\.\d+)", os.path.basename(folder))
    return float(match.group(1)) if match and os.path.isdir(folder) else None


def collect(out_dir, warmup):
    frontier = {}
    for mode in MODES:
        folder = os.path.join(out_dir, mode)
        if not os.path.isdir(folder):
            continue
        notes = []
        uniform = collect_uniform(os.path.join(folder, "uniform"), notes)
        budgets = {}
        for sub in sorted(glob.glob(os.path.join(glob.escape(folder), "b*"))):
            budget = _budget_of(sub)
            if budget is None:
                notes.append(f"{sub}: skipped, not a b<budget> folder of run_frontier.sh")
                continue
            b = collect_budget(sub, warmup, notes)
            for run in (r for rs in b["runs"].values() for r in rs):
                run["over_budget"] = over_budget(run["cost_ratio"], budget)
            b["goals"] = goals(b, budget, uniform, warmup)
            budgets[f"{budget:g}"] = b
        for note in notes:
            log.warning("%s", note)
        frontier[mode] = {"uniform": uniform, "budgets": budgets, "notes": notes}
    if not frontier:
        raise UserError(f"'{out_dir}' holds no linear/ or kmeans/ folder of run_frontier.sh")
    return frontier


def _f(v, spec=".2f"):
    return "-" if v is None else format(v, spec)


def _mark(goal):
    if goal.get("held") is None:
        return "n/a"
    return "held" if goal["held"] else "**not held**"


GOAL_TEXT = {   # one line per goal of the issue, with the figures it was decided on
    "signal": lambda g: (f"signal: noise SD {g['noise_sd']:.2f} vs best-quarter SD "
                         f"{g['top_quarter_sd']:.2f} of random policies (goal <= 1/3)"),
    "learning": lambda g: (f"learning: last quarter - warmup = "
                           f"{', '.join(f'{x:.2f}' for x in g['gains'])} (goal >= "
                           f"{g['two_noise_sd']:.2f}); best after warmup in "
                           f"{g['best_after_warmup']}/{g['seeds']} seeds"),
    "vs_random": lambda g: (f"DDPG vs random: search {_f(g['search'][0])} vs {_f(g['search'][1])}, "
                            f"after fine-tune {_f(g['top1'][0])} vs {_f(g['top1'][1])}"),
    "vs_uniform": lambda g: (f"DDPG vs uniform {g['uniform_bits']}-bit: {g['ddpg_mean']:.2f} ± "
                             f"{g['ddpg_sd']:.2f} vs {g['uniform_top1']:.2f} (ILP "
                             f"{_f(g['ilp_top1'])})"
                             + ("" if g["applies"] else " (uniform loses < 1 point here)")),
}


def markdown(frontier):
    lines = ["# Accuracy vs cost on the embedded default", "",
             "Top-1 on the test split after the demo's fine-tune (mean ± SD over search seeds); "
             "search = best accuracy on the search's reward subset.", "",
             "| mode | budget | method | seeds | cost ratio | search top-1 "
             "| top-1 after fine-tune |",
             "|---|---|---|---|---|---|---|"]
    for mode, m in frontier.items():
        for budget, b in m["budgets"].items():
            for method in METHODS:
                rs = b["runs"][method]
                if not rs:
                    continue
                top1 = [r["top1"] for r in rs if r["top1"] is not None]
                spread = f" ± {_sd(top1):.2f}" if len(top1) > 1 else ""
                cost = _mean([r["cost_ratio"] for r in rs if r["cost_ratio"] is not None])
                over = " **over budget**" if over_budget(cost, float(budget)) else ""
                lines.append(f"| {mode} | {budget} | {method} | {len(rs)} | "
                             f"{_f(cost, '.3f')}{over} | "
                             f"{_f(_mean([r['search_acc'] for r in rs]))} | "
                             f"{_f(_mean(top1))}{spread} |")
        for u in m["uniform"]:
            lines.append(f"| {mode} | - | uniform {u['bits']}-bit | - | {u['cost_ratio']:.3f} | - "
                         f"| {_f(u['top1'])} |")
    lines += ["", "## Goals", ""]
    for mode, m in frontier.items():
        for budget, b in m["budgets"].items():
            for key, text in GOAL_TEXT.items():
                if key in b["goals"]:
                    g = b["goals"][key]
                    lines.append(f"- **{mode} <= {budget}** {text(g)}: {_mark(g)}")
    notes = [f"- {mode}: {n}" for mode, m in frontier.items() for n in m.get("notes", [])]
    if notes:
        lines += ["", "## Left out", ""] + notes
    return "\n".join(lines) + "\n"


def plot_frontier(path, frontier):
    plt = pyplot()
    fig, axes = plt.subplots(1, len(frontier), figsize=(5.5 * len(frontier), 4.2), squeeze=False)
    for ax, (mode, m) in zip(axes[0], frontier.items()):
        u = [r for r in m["uniform"] if r["top1"] is not None]
        ax.plot([r["cost_ratio"] for r in u], [r["top1"] for r in u], "o-",
                color=COLORS["uniform"], label="uniform")
        for r in u:
            ax.annotate(f"{r['bits']}b", (r["cost_ratio"], r["top1"]), fontsize=7,
                        xytext=(3, -9), textcoords="offset points")
        for i, method in enumerate(METHODS):
            for budget, b in m["budgets"].items():
                rs = [r for r in b["runs"][method] if r["top1"] is not None]
                if not rs:
                    continue
                x = _mean([r["cost_ratio"] for r in rs]) + (i - 1) * 0.003
                ax.errorbar(x, _mean([r["top1"] for r in rs]), yerr=_sd([r["top1"] for r in rs]),
                            fmt="s^D"[i], color=COLORS[method], capsize=3, ms=6,
                            label=method if budget == next(iter(m["budgets"])) else None)
        for budget in m["budgets"]:
            ax.axvline(float(budget), color="k", lw=0.6, ls=":")
        _label(ax, "cost ratio (latency)" if mode == "linear" else "cost ratio (size)",
               "top-1 after fine-tune (%)", f"{mode}: accuracy vs cost")
    _save(plt, fig, path)


def _label(ax, xlabel, ylabel, title):
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=7, loc="lower right")


def _save(plt, fig, path):
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_learning(path, frontier, warmup):
    plt = pyplot()
    panels = [(mode, budget, b) for mode, m in frontier.items()
              for budget, b in m["budgets"].items()]
    fig, axes = plt.subplots(1, len(panels), figsize=(4.5 * len(panels), 3.6), squeeze=False)
    for ax, (mode, budget, b) in zip(axes[0], panels):
        for method in ("ddpg", "random"):
            hs = [r["history"] for r in b["runs"][method]]
            if not hs:
                continue
            n = min(len(h) for h in hs)
            curve = [_mean([h[e] for h in hs]) for e in range(n)]
            ax.plot(range(n), curve, color=COLORS[method], lw=0.6, alpha=0.4)
            # a running mean over SMOOTH episodes: the per-episode curve is mostly policy noise
            smooth = [_mean(curve[max(0, e - SMOOTH + 1):e + 1]) for e in range(n)]
            ax.plot(range(n), smooth, color=COLORS[method], lw=1.8,
                    label=f"{method} (mean of {len(hs)}; running mean of {SMOOTH})")
        ax.axvline(warmup - 0.5, color="k", lw=0.6, ls=":", label="end of warmup")
        _label(ax, "episode", "search accuracy (%)", f"{mode} <= {budget}")
    _save(plt, fig, path)


def build(out_dir, warmup):
    frontier = collect(out_dir, warmup)
    table = markdown(frontier)
    atomic_write_text(os.path.join(out_dir, "frontier.md"), table)
    atomic_write_json(os.path.join(out_dir, "frontier.json"), frontier)
    plot_frontier(os.path.join(out_dir, "frontier.png"), frontier)
    plot_learning(os.path.join(out_dir, "learning.png"), frontier, warmup)
    return frontier, table
