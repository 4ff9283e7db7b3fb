"""The report of any runs: ``python -m lib.report runs DIR [DIR ...] --out OUT``.

Each DIR is a search folder (log.txt + strategy.json), a fine-tune folder (results.json),
or a folder holding such folders at any depth: runs are recognised by their files, never
by their names or layout. Writes OUT/runs.md, OUT/runs.json, OUT/runs.png (accuracy after
fine-tune vs cost ratio, one panel per mode) and, per search, OUT/<run>_search.png and
OUT/<run>_policy.png.

Every row is one policy. A search's row carries its best policy's cost and search accuracy,
and the accuracy of a fine-tune only if that fine-tune trained exactly this policy (read from
its results.json or checkpoint). A fine-tune of a policy no given search found (a uniform
baseline, a preset) has its own row, costed from the strategy recorded with the policy. A
fine-tune whose policy cannot be read is left out with a note; a row over its budget is marked.
"""
import logging
import math
import os
import re

from lib.utils.checkpoint import atomic_write_json, atomic_write_text, read_json
from lib.utils.errors import UserError
from lib.utils.schema import is_weights_record

from .plots import legend_below, plot_policy, pyplot, save, search_figure
from .runs import (is_finetune, is_search, over_budget, policy_of, policy_sha256, read_log,
                   read_finetune, same_policy)
from .uniform import uniform_label

log = logging.getLogger(__name__)


def find_runs(paths):
    """(search folders, fine-tune folders, notes) under ``paths``, each folder once."""
    searches, finetunes, notes, seen = [], [], [], set()
    for path in paths:
        if not os.path.isdir(path):
            raise UserError(f"'{path}' is not a folder; expected a search or fine-tune folder, "
                            "or one that holds them")
        found = 0
        for folder, subdirs, _ in os.walk(path):
            subdirs.sort()
            kind = searches if is_search(folder) else finetunes if is_finetune(folder) else None
            if kind is None:
                continue
            subdirs[:] = []   # a run's own subfolders (TensorBoard, checkpoints) are not runs
            found += 1
            if os.path.realpath(folder) not in seen:
                seen.add(os.path.realpath(folder))
                kind.append(folder)
        if not found:
            notes.append(f"{path}: holds no search (log.txt + strategy.json) or fine-tune "
                         "(results.json)")
    return searches, finetunes, notes


def read_search(folder, notes):
    strategy = read_json(os.path.join(folder, "strategy.json"), "strategy file",
                         "the strategy.json of a search")
    if not isinstance(strategy, dict) or policy_of(strategy) is None:
        notes.append(f"{folder}: left out, its strategy.json holds no policy")
        return None
    return {"folder": folder, "strategy": strategy,
            "history": read_log(os.path.join(folder, "log.txt"))}


def _number(*values):
    """The first finite number among ``values`` (a damaged record's fields are skipped)."""
    return next((v for v in values if isinstance(v, (int, float)) and not isinstance(v, bool)
                 and math.isfinite(v)), None)


def _text(*values):
    return next((v for v in values if isinstance(v, str)), None)


def row(name, strategy, search=None, finetune=None, finetune_name=None):
    """One table row: a policy, its cost and budget, and the accuracies measured on it."""
    r = finetune["results"] if finetune else {}
    cost_ratio = _number(strategy.get("cost_ratio"), r.get("cost_ratio"))
    budget = _number(strategy.get("preserve_ratio"), r.get("preserve_ratio"))
    mode = _text(strategy.get("mode"), r.get("mode"))
    method = _text(strategy.get("method")) or (
        uniform_label(dict(strategy, mode=mode)) if _number(strategy.get("uniform_bits")) and mode
        else None)
    return {"run": name, "method": method, "mode": mode,
            "metric": _text(strategy.get("metric")), "budget": budget, "cost_ratio": cost_ratio,
            "over_budget": over_budget(cost_ratio, budget),
            "search_top1": _number(strategy.get("accuracy")) if search else None,
            "top1": _number(r.get("best_top1")), "quant_top1": _number(r.get("quant_top1")),
            "fp32_top1": _number(r.get("fp32_top1")),
            "search": search["folder"] if search else None,
            "finetune": finetune["folder"] if finetune else None, "finetune_run": finetune_name,
            "policy_sha256": policy_sha256(policy_of(strategy)),
            "weights": weights_label(strategy.get("weights"), r.get("weights"))}


def weights_label(*records):
    """The pretrained weights a run started from, for the table: a torchvision name, or a
    file's name and the start of its sha256; a search's and its fine-tune's joined by " / "
    when they differ (the linear setting searches on ImageNet-100 weights); None when no
    record holds them (older runs)."""
    labels = []
    for rec in records:
        if is_weights_record(rec):
            label = rec["name"] if "name" in rec else (
                f"{os.path.basename(rec['path'])} ({rec['sha256'][:8]})")
            if label not in labels:
                labels.append(label)
    return " / ".join(labels) or None


def pair(searches, finetunes, label):
    """The rows: each search with every fine-tune of its policy, then the unpaired fine-tunes."""
    rows, paired = [], set()
    for s in searches:
        mine = [f for f in finetunes if same_policy(policy_of(f["strategy"]),
                                                    policy_of(s["strategy"]))]
        paired.update(f["folder"] for f in mine)
        rows += [row(label(s["folder"]), s["strategy"], s, f, label(f["folder"]))
                 for f in mine] or \
            [row(label(s["folder"]), s["strategy"], s)]
    rows += [row(label(f["folder"]), f["strategy"], finetune=f, finetune_name=label(f["folder"]))
             for f in finetunes if f["folder"] not in paired]
    return rows


def collect(paths):
    """(rows, searches, notes) of the runs under ``paths``."""
    search_dirs, finetune_dirs, notes = find_runs(paths)
    searches = [s for s in (read_search(d, notes) for d in search_dirs) if s]
    finetunes = [f for f in (read_finetune(d, notes) for d in finetune_dirs) if f]
    if not searches and not finetunes:
        raise UserError(f"no search or fine-tune found under {', '.join(paths)}; expected "
                        "folders holding log.txt + strategy.json or results.json")
    top = os.path.commonpath([os.path.abspath(p) for p in paths])

    def label(folder):
        """The run's path from the folders given (its own name when it was given itself)."""
        name = os.path.relpath(os.path.abspath(folder), top)
        return os.path.basename(os.path.abspath(folder)) if name == "." else name
    return pair(searches, finetunes, label), searches, notes


def _f(v, spec=".2f"):
    return "-" if v is None else format(v, spec)


def markdown(rows, notes):
    lines = ["| run | method | mode | budget | cost ratio | search top-1 (%) "
             "| top-1 after fine-tune (%) | fine-tune | weights |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        over = " **over budget**" if r["over_budget"] else ""
        budget = f"{r['metric'] or 'cost'} <= {r['budget']:g}" if r["budget"] is not None else "-"
        lines.append(f"| {r['run']} | {r['method'] or '-'} | {r['mode'] or '-'} | {budget} "
                     f"| {_f(r['cost_ratio'], '.3f')}{over} | {_f(r['search_top1'])} "
                     f"| {_f(r['top1'])} | {r['finetune_run'] or '-'} | {r['weights'] or '-'} |")
    if notes:
        lines += ["", "Left out:", ""] + [f"- {n}" for n in notes]
    return "\n".join(lines) + "\n"


def file_stem(name):
    """A file name of a run's label (its relative path): safe characters only."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("._") or "run"


def plot_rows(path, rows):
    """Accuracy after fine-tune against cost ratio of every fine-tuned row, a panel per mode."""
    plt = pyplot()
    modes = sorted({r["mode"] or "-" for r in rows if r["top1"] is not None}) or ["-"]
    fig, axes = plt.subplots(1, len(modes), figsize=(5.5 * len(modes), 4.2), squeeze=False)
    for ax, mode in zip(axes[0], modes):
        points = {}   # one point per fine-tune, named after every run of its policy
        for r in rows:
            if (r["mode"] or "-") == mode and None not in (r["top1"], r["cost_ratio"]):
                points.setdefault(r["finetune"], (r, []))[1].append(r["run"])
        for r, names in points.values():
            ax.scatter([r["cost_ratio"]], [r["top1"]], s=40,
                       marker="X" if r["over_budget"] else "o",
                       label=", ".join(names) + (" (over budget)" if r["over_budget"] else ""))
        for budget in sorted({r["budget"] for r in rows if (r["mode"] or "-") == mode
                              and r["budget"] is not None}):
            ax.axvline(budget, color="k", lw=0.6, ls=":")
        ax.set_xlabel("cost ratio")
        ax.set_ylabel("top-1 after fine-tune (%)")
        ax.set_title(f"{mode}: accuracy vs cost (dotted: budgets)", fontsize=9)
        if ax.get_legend_handles_labels()[0]:
            legend_below(ax, ncol=1)
    save(plt, fig, path)


def plot_search_run(out, s, rows):
    """The search's episodes with its fine-tuned policy marked, and its policy's bars."""
    name = next(r["run"] for r in rows if r["search"] == s["folder"])
    strategy = s["strategy"]
    marks = [(f"fine-tune {r['finetune_run']}", "*", "#d62728", r["cost_ratio"], r["top1"])
             for r in rows if r["search"] == s["folder"] and r["top1"] is not None
             and r["cost_ratio"] is not None]
    save(*search_figure(s["history"], marks, _number(strategy.get("preserve_ratio")),
                        strategy.get("metric", "cost"), name),
         os.path.join(out, file_stem(name) + "_search.png"))
    policy = policy_of(strategy)
    layers = strategy.get("layers")
    if not (isinstance(layers, list) and len(layers) == len(policy)):
        layers = [str(i) for i in range(len(policy))]
    plot_policy(os.path.join(out, file_stem(name) + "_policy.png"), policy, layers,
                title=f"{name}: policy (cost ratio "
                      f"{_f(_number(strategy.get('cost_ratio')), '.3f')})")


def build(paths, out, search_plots=True):
    """The ``runs`` command: table, JSON and plots of the runs under ``paths``, into ``out``."""
    rows, searches, notes = collect(paths)
    for note in notes:
        log.warning("%s", note)
    table = markdown(rows, notes)
    os.makedirs(out, exist_ok=True)
    atomic_write_text(os.path.join(out, "runs.md"), table)
    atomic_write_json(os.path.join(out, "runs.json"), {"rows": rows, "notes": notes})
    plot_rows(os.path.join(out, "runs.png"), rows)
    if search_plots:
        for s in searches:
            plot_search_run(out, s, rows)
    return rows, table
