"""Reading what a run left in its folder: the episode log, the newest run of a kind, and the
policy a fine-tune trained.

A fine-tune is paired with a strategy only when the policy it trained (recorded in its
results.json or, failing that, in its checkpoint) is the strategy's policy, entry for entry:
a folder name or a path says nothing about which search's policy was trained last.
"""
import hashlib
import json
import logging
import math
import os

from lib.utils.checkpoint import load_checkpoint, read_json
from lib.utils.errors import UserError

log = logging.getLogger(__name__)

MODES = ("linear", "kmeans")
LOG_KEYS = ("episode", "reward", "accuracy", "cost_ratio")
# model_best first: it is written with the policy that scored best, and is smaller to read
CHECKPOINTS = ("model_best.pth.tar", "checkpoint.pth.tar")


def read_log(path):
    """Episode rows of a search's log.txt (header: episode reward accuracy cost_ratio ...).

    A row that lacks one of those columns or holds a non-finite one is skipped with a
    warning naming its line, so one damaged row does not lose the whole report.
    """
    rows = []
    try:
        with open(path) as f:
            header = f.readline().rstrip("\n").split("\t")
            for n, line in enumerate(f, start=2):
                if not line.strip():
                    continue
                row = _log_row(header, line)
                if row is None:
                    log.warning("%s line %d: not an episode row (%s); skipped", path, n,
                                " ".join(LOG_KEYS))
                else:
                    rows.append(row)
    except (OSError, UnicodeDecodeError) as exc:
        raise UserError(f"search log '{path}' could not be read ({type(exc).__name__}); "
                        "expected a log.txt written by rl_quantize.py") from exc
    return rows


def _log_row(header, line):
    cells = dict(zip(header, line.rstrip("\n").split("\t")))
    try:
        row = {k: float(cells[k]) for k in LOG_KEYS}
    except (KeyError, ValueError):
        return None
    return row if all(math.isfinite(v) for v in row.values()) else None


def newest_run(parent, holding):
    """The newest run folder under ``parent`` that holds the file ``holding``."""
    runs = sorted((os.path.join(parent, d) for d in os.listdir(parent)), key=os.path.getmtime) \
        if os.path.isdir(parent) else []
    runs = [r for r in runs if os.path.isfile(os.path.join(r, holding))]
    if not runs:
        raise UserError(f"no search with a {holding} under '{parent}'")
    return runs[-1]


def find_search(demo_dir, mode):
    """The newest run folder under DEMO_DIR/<mode>_search that holds a strategy.json."""
    return newest_run(os.path.join(demo_dir, f"{mode}_search"), "strategy.json")


def is_search(folder):
    return all(os.path.isfile(os.path.join(folder, n)) for n in ("log.txt", "strategy.json"))


def is_finetune(folder):
    return os.path.isfile(os.path.join(folder, "results.json"))


def _bits(value):
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def policy_of(record):
    """The policy list of a strategy dict (or a bare policy list): numbers or [w, a] pairs of
    numbers. None when there is none, or when it holds anything else (it is compared and
    hashed, and a report must not fail on a damaged file)."""
    if isinstance(record, dict):
        record = record.get("strategy")
    if not isinstance(record, list) or not record:
        return None
    pairs = all(isinstance(e, (list, tuple)) and len(e) == 2 and all(map(_bits, e))
                for e in record)
    return record if pairs or all(map(_bits, record)) else None


def policy_sha256(policy):
    """A short fingerprint of a policy's content (the same for the same bits, however stored)."""
    text = json.dumps([list(e) if isinstance(e, (list, tuple)) else e for e in policy],
                      separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()


def same_policy(a, b):
    return a is not None and b is not None and policy_sha256(a) == policy_sha256(b)


def trained_strategy(folder, results):
    """(strategy dict, where) of what the fine-tune in ``folder`` trained, or (None, why).

    results.json's own record wins; older fine-tunes record the policy only in their
    checkpoints, which are read with the safe loader.
    """
    recorded = next((results[k] for k in ("policy", "strategy") if policy_of(results.get(k))),
                    None) if isinstance(results, dict) else None
    if recorded is not None:
        return (recorded if isinstance(recorded, dict) else {"strategy": recorded}), \
            "results.json"
    why = "neither results.json nor a checkpoint beside it records the policy it trained"
    for name in CHECKPOINTS:
        path = os.path.join(folder, name)
        if not os.path.isfile(path):
            continue
        try:
            ckpt = load_checkpoint(path)
        except UserError as exc:
            why = str(exc)
            continue
        strategy = ckpt.get("policy") if isinstance(ckpt, dict) else None
        if policy_of(strategy) is not None:
            return (strategy if isinstance(strategy, dict) else {"strategy": strategy}), name
    return None, why


def read_results(folder):
    return read_json(os.path.join(folder, "results.json"), "fine-tune results",
                     "a results.json written by finetune.py")


def read_finetune(folder, notes):
    """{"folder", "results", "strategy"} of a fine-tune folder (``strategy``: the one it trained,
    read by :func:`trained_strategy`), or None with a line in ``notes`` saying why it is left out."""
    results = read_results(folder)
    if not isinstance(results, dict):
        notes.append(f"{folder}: left out, its results.json is not an object")
        return None
    trained, where = trained_strategy(folder, results)
    if trained is None:
        notes.append(f"{folder}: left out, {where}")
        return None
    return {"folder": folder, "results": results, "strategy": trained, "where": where}


def matching_results(folder, strategy, notes):
    """The fine-tune's results.json if it trained ``strategy``'s policy, else None with a note.

    ``notes`` collects one line per fine-tune left out and why.
    """
    run = read_finetune(folder, notes)
    if run is None:
        return None
    if not same_policy(policy_of(run["strategy"]), policy_of(strategy)):
        notes.append(f"{folder}: left out, it fine-tuned another policy (per its {run['where']}) "
                     f"than the one it is paired with")
        return None
    return run["results"]


def over_budget(cost_ratio, budget):
    """True when a cost ratio exceeds the budget (beyond rounding); None when either is unknown."""
    if cost_ratio is None or budget is None:
        return None
    return cost_ratio > budget * (1 + 1e-6)
