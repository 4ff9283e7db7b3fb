"""A search's saved state (search_state.pth.tar) and the checks a resume must pass.

The state is written after every episode, so ``--resume_search`` continues exactly
where a killed search stopped: the agent, the env's generator, the best policy, the
history, every random generator and the flags it ran with. A resume is refused (one
UserError, nothing written) when a flag that defines the search differs
(lib.search.config), when the user's cost table changed, when its training crops came
from --data_cache's stores and now would not (or the reverse), or when the state does
not fit this search.
"""
import math
import os
import random

import numpy as np
import torch

from lib.env.base import REWARD_SCALE
from lib.utils.checkpoint import load_checkpoint, remove_stale_tmp
from lib.utils.errors import UserError
from lib.utils.schema import is_int, is_real, is_weights_record, shown
from lib.utils.run_utils import list_runs, new_run_folder

from .config import resume_defaults, resume_fields

STATE_FILE = "search_state.pth.tar"
BEST_KEYS = {"episode", "reward", "accuracy", "cost_ratio", "cost", "policy"}
HISTORY_KEYS = {"episode", "reward", "accuracy", "cost_ratio"}
MAX_PASSES = 1 << 32    # training passes of the search's short fine-tunes
STATE_KEYS = {"args", "agent", "env", "episode", "best", "history", "rng"}


def rng_states():
    """Python, NumPy and torch generator states as tensors, numbers, tuples and dicts.

    NumPy's MT19937 key becomes a list of ints, so the search state holds no
    numpy array and loads with ``torch.load(weights_only=True)``.
    """
    numpy_state = np.random.get_state(legacy=False)
    numpy_state["state"]["key"] = numpy_state["state"]["key"].tolist()
    states = {"python": random.getstate(), "numpy": numpy_state, "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def set_rng_states(states):
    version, internal, gauss = states["python"]
    random.setstate((version, tuple(internal), gauss))
    np.random.set_state(states["numpy"])
    torch.set_rng_state(states["torch"])
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


def cost_table_of(env):
    """``{"path", "sha256"}`` of the user's --cost_table the env costs with, or None."""
    return getattr(getattr(env, "cost_model", None), "source", None)


def check_same_cost_table(path, recorded, current):
    """Refuse to continue a search under another cost model than the one it started with.

    ``recorded``/``current``: the ``{"path", "sha256"}`` of the user table, or None for
    the simulator's table. Tables are the same when their content is (a moved file is fine).
    """
    if recorded is None and current is None:
        return
    if recorded is not None and current is not None and recorded["sha256"] == current["sha256"]:
        return
    if recorded is None:
        raise UserError(f"--resume_search: '{path}' was searched with the simulator's cost "
                        f"table; expected no --cost_table (got {current['path']})")
    got = f"'{current['path']}' with other content" if current else "no --cost_table"
    raise UserError(f"--resume_search: '{path}' was searched with --cost_table "
                    f"{recorded['path']} (sha256 {recorded['sha256'][:12]}...); expected that "
                    f"table, got {got}")


def _weights_text(record):
    if "name" in record:
        return record["name"]
    return f"{record['path']} (sha256 {record['sha256'][:12]}...)"


def check_same_weights(path, file, recorded, current):
    """Refuse to continue a search from other pretrained weights than it started from.

    ``recorded``/``current``: ``{"name"}`` or ``{"path", "sha256"}`` (models.load_pretrained_
    weights); files are the same when their content is. A state written before weights were
    recorded holds none, and is let through: what it started from cannot be known.
    """
    if recorded is None or current is None:
        return
    if not is_weights_record(recorded):
        _bad(file, "args.weights_source", recorded, 'null, {"name"} or {"path", "sha256"}')
    same = (recorded.get("name") == current.get("name") if "name" in recorded
            else recorded["sha256"] == current.get("sha256"))
    if not same:
        raise UserError(f"--resume_search: '{path}' was searched from the weights "
                        f"{_weights_text(recorded)}; expected the same --weights/--pretrained_path "
                        f"(got {_weights_text(current)})")


def _crops_text(cached):
    return ("cut from its --data_cache stores" if cached
            else "decoded from the dataset (no --data_cache)")


def check_same_training_crops(path, file, saved_args, args):
    """Refuse to continue a search whose training crops came the other way: --data_cache's
    crops are drawn on stored tensors, not the JPEGs, so one search would mix two
    augmentations. A state written before ``cached_training`` was recorded stands on its
    --data_cache flag (given or not; a state older than that flag ran without it).
    """
    if "cached_training" in saved_args:
        recorded, current = saved_args["cached_training"], getattr(args, "cached_training", False)
        if not isinstance(recorded, bool):
            _bad(file, "args.cached_training", recorded, "true or false")
    else:
        recorded = saved_args.get("data_cache") is not None
        current = getattr(args, "data_cache", None) is not None
    if recorded != current:
        raise UserError(f"--resume_search: '{path}' was searched with its training crops "
                        f"{_crops_text(recorded)}; expected the same (got them "
                        f"{_crops_text(current)})")


def _differs(saved, value):
    """``saved != value``, where a saved value of another kind (a tensor, say) differs."""
    try:
        return bool(saved != value)
    except (RuntimeError, TypeError, ValueError):
        return True


def check_same_flags(path, file, saved_args, args):
    """UserError naming the first flag that defines the search and differs from the saved one."""
    keys = [f.name for f in resume_fields(args)]
    saved = dict(resume_defaults(args), **saved_args)
    unrecorded = [k for k in keys if k not in saved]
    if unrecorded:   # an older version's state: whether its flags match cannot be checked
        raise UserError(f"--resume_search: '{file}' records no --{unrecorded[0]} (written by an "
                        "older version?); expected a state that records every flag of its "
                        "search, or start a new search")
    diff = [k for k in keys if _differs(saved[k], getattr(args, k))]
    if diff:
        k = diff[0]
        raise UserError(f"--resume_search: '{path}' was searched with --{k} {saved[k]}; "
                        f"expected the same flags as that search (got {getattr(args, k)})")


def load_search_state(path, args, env):
    """The saved state of the search in ``path``, refused if its flags or cost table differ
    or a value in it is not what a search writes (:func:`check_state_values`)."""
    file = os.path.join(path, STATE_FILE)
    state = load_checkpoint(file)
    if (not isinstance(state, dict) or not STATE_KEYS <= set(state)
            or not isinstance(state["args"], dict)):
        raise UserError(f"--resume_search: '{file}' is not a search state of this version; "
                        "expected the file rl_quantize.py saves")
    check_same_flags(path, file, state["args"], args)
    table = state.get("cost_table")
    if table is not None and not (isinstance(table, dict) and isinstance(table.get("path"), str)
                                  and isinstance(table.get("sha256"), str)):
        _bad(file, "cost_table", table, 'null or {"path", "sha256"} of the user\'s table')
    check_same_cost_table(path, table, cost_table_of(env))
    check_same_weights(path, file, state["args"].get("weights_source"),
                       getattr(args, "weights_source", None))
    check_same_training_crops(path, file, state["args"], args)
    check_state_values(file, state, env)
    return state


def _bad(file, field, value, expected):
    raise UserError(f"--resume_search: '{file}': '{field}' is {shown(value)}; expected "
                    f"{expected}")


def _check_number(file, field, value, lo=-math.inf, hi=math.inf):
    if not is_real(value, lo, hi):
        bounds = ("" if lo == -math.inf else f" >= {lo:g}" if hi == math.inf
                  else f" in [{lo:g}, {hi:g}]")
        _bad(file, field, value, "a finite number" + bounds)


def check_policy(file, field, policy, env):
    """A policy of the env's length, each step one of its allowed widths or at its pin."""
    flat = policy
    if env.actions_per_layer == 2:
        if not isinstance(policy, list) or not all(
                isinstance(e, list) and len(e) == 2 for e in policy):
            _bad(file, field, policy, "a list of [w_bit, a_bit] pairs")
        flat = [b for pair in policy for b in pair]
    if not isinstance(flat, list) or len(flat) != env.n_steps:
        _bad(file, field, policy, f"{len(env.layers)} entries, one per quantizable layer")
    for step, bits in enumerate(flat):
        widths = env.step_widths(step)
        if not ((is_int(bits) and bits in widths) or (step in env.pins and bits == env.pins[step]
                                                      and type(bits) is int)):
            pin = f" or its pinned {env.pins[step]}" if step in env.pins else ""
            _bad(file, f"{field}[{step // env.actions_per_layer}]", bits,
                 f"a width in {widths} (the search's --min_bit/--max_bit, --bits){pin}")


def _check_episode(file, field, row, keys, org_acc):
    """One episode's record: its index, accuracy (percent), cost ratio, and the reward its
    accuracy earns (paper eq. 4, against the saved original accuracy)."""
    if not isinstance(row, dict) or not set(keys) <= set(row):
        _bad(file, field, row, f"an object with {', '.join(sorted(keys))}")
    if not is_int(row["episode"]):
        _bad(file, f"{field}.episode", row["episode"], "a non-negative integer")
    _check_number(file, f"{field}.accuracy", row["accuracy"], 0, 100)
    _check_number(file, f"{field}.cost_ratio", row["cost_ratio"], 0)
    _check_number(file, f"{field}.reward", row["reward"])
    _check_derived(file, f"{field}.reward", row["reward"],
                   REWARD_SCALE * (row["accuracy"] - org_acc), "0.1 x (accuracy - env.org_acc)")


def _check_derived(file, field, value, expected, how):
    if not math.isclose(value, expected, rel_tol=1e-9, abs_tol=1e-12):
        _bad(file, field, value, f"{expected:.6g} = {how}")


def _check_best(file, best, state, env, org_acc):
    """The best episode's record, its policy in the search's range, its cost that policy's."""
    _check_episode(file, "best", best, BEST_KEYS, org_acc)
    if best["episode"] >= state["episode"]:
        _bad(file, "best.episode", best["episode"], f"an episode before {state['episode']}")
    check_policy(file, "best.policy", best["policy"], env)
    _check_number(file, "best.cost", best["cost"], 0)
    _check_derived(file, "best.cost", best["cost"], env.cost(best["policy"]),
                   "the cost of best.policy")
    _check_derived(file, "best.cost_ratio", best["cost_ratio"],
                   best["cost"] / env.reference_cost(), "best.cost / the reference cost")


def check_state_values(file, state, env):
    """UserError naming the first value of a search state that no search writes.

    What the loaders of the agent, env and generators cannot catch themselves: values read
    only later (accuracies, the best policy written to strategy.json, counters), and those
    that follow from others (a reward from its accuracy, a cost from its policy).
    """
    if not is_int(state["episode"]):
        _bad(file, "episode", state["episode"], "a non-negative integer")
    saved_env = state["env"]
    if not isinstance(saved_env, dict):
        _bad(file, "env", saved_env, "the env's state (an object)")
    org_acc = saved_env.get("org_acc")
    _check_number(file, "env.org_acc", org_acc, 0, 100)
    evaluator = saved_env.get("evaluator")
    # the pass counter orders the fine-tune's data (without it the resume differs) and seeds
    # a generator with seed + passes, which must stay far inside 64 bits
    if hasattr(env.evaluator, "load_state_dict") and not (
            isinstance(evaluator, dict) and is_int(evaluator.get("passes"), 0, MAX_PASSES)):
        _bad(file, "env.evaluator", evaluator, f'{{"passes": an integer in [0, {MAX_PASSES}]}}')
    history = state["history"]
    if not isinstance(history, list) or len(history) != state["episode"]:
        raise UserError(f"--resume_search: '{file}' is inconsistent: 'history' is "
                        f"{shown(history)}; expected a list of {state['episode']} records, one "
                        "per episode run")
    for i, row in enumerate(history):
        _check_episode(file, f"history[{i}]", row, HISTORY_KEYS, org_acc)
        if row["episode"] != i:
            _bad(file, f"history[{i}].episode", row["episode"], f"{i}, its place in the list")
    if state["best"] is not None:
        _check_best(file, state["best"], state, env, org_acc)
    _check_agent_counters(file, state, env)


def _check_agent_counters(file, state, env):
    """The DDPG agent's counters and reward baseline, which its loader copies unchecked (the
    replay memory checks its own, lib.rl.memory)."""
    agent = state["agent"]
    if not isinstance(agent, dict):
        _bad(file, "agent", agent, "the agent's state (an object)")
    if agent.get("moving_average") is not None:   # a mean of rewards, each within +-10
        _check_number(file, "agent.moving_average", agent["moving_average"],
                      -100 * REWARD_SCALE, 100 * REWARD_SCALE)
    if "n_updates" in agent:   # at most n_update updates per step of each episode run
        most = state["episode"] * env.n_steps * state["args"].get("n_update", 1)
        if not is_int(agent["n_updates"], 0, most if is_int(most) else 0):
            _bad(file, "agent.n_updates", agent["n_updates"], f"an integer in [0, {most}]")


def check_resumable(out, start, best, history, train_episode):
    """UserError unless a restored (episode, best, history) is consistent and has episodes left."""
    if start < 0 or len(history) != start or (best is None) != (start == 0) or (
            best is not None and not (isinstance(best, dict) and BEST_KEYS <= set(best))):
        raise UserError(f"--resume_search: the state in '{out}' is inconsistent "
                        f"(episode {start}, {len(history)} episodes in its history); expected "
                        "the state rl_quantize.py saves")
    if start > train_episode:
        raise UserError(f"--resume_search: '{out}' has already run {start} episodes; "
                        f"expected --train_episode of at least {start}")


def base_name(args):
    from lib.utils.data_utils import dataset_label
    return f"{args.arch}_{dataset_label(args.dataset)}" + (f"_{args.suffix}" if args.suffix else "")


def output_folder(args):
    """A new ``-runN`` folder, or (``--resume_search``) the folder to continue."""
    if args.resume_search is None:
        return new_run_folder(args.output, base_name(args))
    if args.resume_search != "latest":
        path = args.resume_search
    else:
        done = [p for _, p in list_runs(args.output, base_name(args))
                if os.path.isfile(os.path.join(p, STATE_FILE))]
        if not done:
            raise UserError(f"--resume_search: no search of {base_name(args)} under "
                            f"'{args.output}' has saved state; expected a folder holding "
                            f"{STATE_FILE}")
        path = done[-1]
    if not os.path.isfile(os.path.join(path, STATE_FILE)):
        raise UserError(f"--resume_search: '{path}' holds no {STATE_FILE}; expected the output "
                        "folder of a stopped search")
    remove_stale_tmp(path)
    return path
