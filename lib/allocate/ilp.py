"""The bit allocation as an integer program over one-hot choices per layer.

Each layer l has a set of options j (K-Means mode: a weight width; linear mode: a
(w, a) pair, so activation and weight bits trade off through the real (L, 8, 8)
cost table rather than a bit-count proxy), each with a sensitivity score s_lj and
a cost c_lj. With binaries x_lj (HAWQ-V3's formulation, Yao et al. 2021, eq. 11):

    minimise   sum_lj s_lj x_lj
    subject to sum_j x_lj = 1 for every layer,   sum_lj c_lj x_lj <= budget,

solved exactly (zero relative gap) by scipy.optimize.milp; ties go to the policy
that spends the most of the budget. Costs come from the
env-like object's own ``cost(policy)`` (size, or the latency/energy table), pins
from its ``pins``, the range from its ``cfg.min_bit``..``cfg.max_bit``: the same
budget as every other allocation method. Nothing here knows of RL.
"""
import itertools
import logging

import numpy as np
from scipy.optimize import Bounds, LinearConstraint, milp

from lib.utils.errors import UserError

from .sensitivity import bit_widths

log = logging.getLogger(__name__)

BUDGET_SLACK = 1e-9   # relative: keeps the solver's feasibility tolerance inside the budget
SCORE_TOL = 1e-7      # relative: policies this close to the lowest summed score count as tied
# The tie-break (most budget among the lowest-score policies) is a knapsack that HiGHS can take
# long to prove optimal; its best solution after this many seconds is kept (it is always tied).
TIEBREAK_SECONDS = 2.0


def solve_choices(scores, costs, budget, scale=None):
    """Indices j_l minimising sum s_l[j_l] subject to sum c_l[j_l] <= budget (exact MILP).

    ``scores``/``costs``: one 1-D array per layer (same lengths). ``scale``: the cost unit
    the solver's tolerances are relative to (default: the budget). Among policies of the
    lowest summed score (within SCORE_TOL of it) the one that spends the most of the
    budget is returned (best effort within TIEBREAK_SECONDS): a second program breaks the
    ties that flat scores leave (a width that loses nothing measurable costs nothing to
    keep). Raises UserError when no
    choice fits the budget.
    """
    sizes = [len(s) for s in scores]
    offsets = np.concatenate([[0], np.cumsum(sizes)])
    n = int(offsets[-1])
    score = np.concatenate([np.asarray(s, dtype=np.float64) for s in scores])
    cost = np.concatenate([np.asarray(x, dtype=np.float64) for x in costs])
    # Costs in units of ``scale``: the solver's absolute tolerances then mean "of the budget".
    scale = float(scale or abs(budget) or 1.0)
    one_hot = np.zeros((len(sizes), n))
    for layer, (lo, hi) in enumerate(zip(offsets[:-1], offsets[1:])):
        one_hot[layer, lo:hi] = 1.0
    rhs = max(budget / scale - BUDGET_SLACK, min(budget / scale, 0.0))
    constraints = [LinearConstraint(one_hot, 1.0, 1.0),
                   LinearConstraint(cost[None, :] / scale, -np.inf, rhs)]
    best = _milp(score, constraints, n)
    if best is None:
        raise UserError("the integer program found no policy within the budget; expected a "
                        "reachable --preserve_ratio")
    # Second program: the most budget among the (near-)lowest-score policies.
    unit = max(1.0, abs(float(score @ best)))
    tied = LinearConstraint(score[None, :] / unit, -np.inf, float(score @ best) / unit + SCORE_TOL)
    spent = _milp(-cost / scale, constraints + [tied], n, time_limit=TIEBREAK_SECONDS)
    x = best if spent is None else spent
    return [int(np.argmax(x[lo:hi])) for lo, hi in zip(offsets[:-1], offsets[1:])]


def _milp(objective, constraints, n, time_limit=None):
    """The binary solution of ``min objective @ x`` (zero relative gap), or None if infeasible.

    With ``time_limit`` the best feasible solution found by then is returned.
    """
    options = {"mip_rel_gap": 0.0}
    if time_limit is not None:
        options["time_limit"] = time_limit
    res = milp(objective, constraints=constraints, integrality=np.ones(n),
               bounds=Bounds(0.0, 1.0), options=options)
    if res.x is None:
        log.debug("milp: %s", res.message)
        return None
    return np.round(res.x)


def step_options(env, step, free=()):
    """The widths a step may take: its pin, else its kind's widths (range or set); a step in
    ``free`` (its width costs nothing) only its widest: a narrower one could only lose."""
    if step in env.pins:
        return [env.pins[step]]
    widths = env.step_widths(step)
    return widths[-1:] if step in free else widths


def layer_options(env, layer, free=()):
    """Every combination of the layer's step widths: (w,) in K-Means mode, (w, a) in linear mode
    (``free``: see :func:`step_options`)."""
    k = env.actions_per_layer
    return list(itertools.product(*(step_options(env, layer * k + i, free) for i in range(k))))


def _score_of(scores, layer, option, widths):
    """Summed score of one option: weight (+ activation, linear mode) score; pins score 0.

    ``widths``: {kind: the widths of that kind's score columns}."""
    total = 0.0
    for kind, bits in zip(("weight", "activation"), option):
        table = scores.get(kind)
        if table is not None and bits in widths[kind]:
            total += float(table[layer, widths[kind].index(bits)])
    return total


def option_tables(env, scores):
    """(options, score arrays, cost arrays) per layer for :func:`solve_choices`, and the base cost.

    A layer's cost is measured through ``env.cost`` as the change from the cheapest
    reachable policy (the base cost, also returned) when only that layer moves, which is
    exact for the additive costs of the search (size and table sums). Steps whose width
    the cost ignores (the env's ``free_steps``) take their widest width only; their
    scores may be left unmeasured (lib.allocate.sensitivity.unscored_steps).
    """
    free = env.free_steps() if hasattr(env, "free_steps") else set()
    base = env.min_bits()
    base_cost = env.cost(env.policy_from_bits(base))
    k = env.actions_per_layer
    widths = {kind: bit_widths(env, kind) for kind in ("weight", "activation")[:k]}
    all_options, score_arrays, cost_arrays = [], [], []
    for layer in range(len(env.layers)):
        options = layer_options(env, layer, free)
        costs = []
        for option in options:
            bits = list(base)
            bits[layer * k:(layer + 1) * k] = option
            costs.append(env.cost(env.policy_from_bits(bits)) - base_cost)
        all_options.append(options)
        score_arrays.append(np.array([_score_of(scores, layer, o, widths) for o in options]))
        cost_arrays.append(np.array(costs))
    return all_options, score_arrays, cost_arrays, base_cost


def allocate_bits(env, scores):
    """The per-step bits of the policy with the lowest summed score within the env's budget.

    ``scores``: dict with ``weight`` (and in linear mode ``activation``) arrays of shape
    (n_layers, n_widths), column j = the kind's j-th width. Returns a flat list
    (one width per env step, pins included) ready for the env.
    """
    env.check_budget()
    options, s, c, base_cost = option_tables(env, scores)
    choice = solve_choices(s, c, env.budget() - base_cost, scale=env.reference_cost())
    bits = [b for layer, j in enumerate(choice) for b in options[layer][j]]
    # The solver works to a tolerance; the env's wall settles any last rounding (a no-op normally).
    walled = env.action_wall(bits)
    if walled != bits:
        log.warning("integer program's policy was over budget by rounding; lowered by the wall")
    total = sum(float(x[j]) for x, j in zip(s, choice))
    log.info("integer program: summed score %.6g, cost ratio %.4f (budget %.4f)", total,
             env.cost(env.policy_from_bits(walled)) / env.reference_cost(), env.cfg.preserve_ratio)
    return walled
