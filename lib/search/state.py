"""A search's saved state (search_state.pth.tar) and the checks a resume must pass.

The state is written after every episode, so ``--resume_search`` continues exactly
where a killed search stopped: the agent, the env's generator, the best policy, the
history, every random generator and the flags it ran with. A resume is refused (one
UserError, nothing written) when a flag that defines the search differs
(lib.search.config), when the user's cost table changed, or when the state does not
fit this search.
"""
import os
import random

import numpy as np
import torch

from lib.utils.checkpoint import load_checkpoint, remove_stale_tmp
from lib.utils.errors import UserError
from lib.utils.run_utils import list_runs, new_run_folder

from .config import resume_defaults, resume_fields

STATE_FILE = "search_state.pth.tar"
BEST_KEYS = {"episode", "reward", "accuracy", "cost_ratio", "cost", "policy"}
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


def check_same_flags(path, file, saved_args, args):
    """UserError naming the first flag that defines the search and differs from the saved one."""
    keys = [f.name for f in resume_fields(args)]
    saved = dict(resume_defaults(args), **saved_args)
    unrecorded = [k for k in keys if k not in saved]
    if unrecorded:   # an older version's state: whether its flags match cannot be checked
        raise UserError(f"--resume_search: '{file}' records no --{unrecorded[0]} (written by an "
                        "older version?); expected a state that records every flag of its "
                        "search, or start a new search")
    diff = [k for k in keys if saved[k] != getattr(args, k)]
    if diff:
        k = diff[0]
        raise UserError(f"--resume_search: '{path}' was searched with --{k} {saved[k]}; "
                        f"expected the same flags as that search (got {getattr(args, k)})")


def load_search_state(path, args, env):
    """The saved state of the search in ``path``, refused if its flags or cost table differ."""
    file = os.path.join(path, STATE_FILE)
    state = load_checkpoint(file)
    if (not isinstance(state, dict) or not STATE_KEYS <= set(state)
            or not isinstance(state["args"], dict)):
        raise UserError(f"--resume_search: '{file}' is not a search state of this version; "
                        "expected the file rl_quantize.py saves")
    check_same_flags(path, file, state["args"], args)
    check_same_cost_table(path, state.get("cost_table"), cost_table_of(env))
    return state


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
