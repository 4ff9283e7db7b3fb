"""A local search that refines the integer program's policy on measured losses (docs/design.md,
allocators).

The integer program (lib.allocate.ilp) adds per-layer scores, each measured with only that
layer quantized: loss(policy) ~ base + sum_l s_l(b_l). At a tight budget many layers sit at
2-3 bits and their errors compound, so the sum misjudges the policy. The refinement measures
the real loss of the whole quantized model (the env's own quantizer, as an episode applies
it, without the fine-tune) on the scoring images and moves widths between layers while that
loss falls:

1. every one-width move of a free step (one up, one down) is measured in the context of the
   current policy, giving its loss change d and cost change c;
2. swaps are formed from them, within budget: raise one step and lower the steps of least
   loss per saved cost until the policy fits again, or lower one step and raise the steps of
   most gain per cost while it fits; each is ranked by its predicted change (the sum of its
   moves' d);
3. swaps predicted to help are measured in that order and the first that lowers the measured
   loss is kept; the single moves are then measured again around the new policy.

It stops when no swap helps or after ``max_evals`` measured policies. Every measured policy
is within budget, so the result is too.
"""
import logging
import math
import time

from .staged import _loss

log = logging.getLogger(__name__)

LOSS_TOL = 1e-6        # relative: a swap must lower the loss by more than this to be kept
TRIES_PER_ROUND = 6    # swaps measured around one policy before its moves are measured again


class PolicyLoss:
    """Cross-entropy on fixed batches of the env's model quantized by a flat-bits policy.

    Each policy is measured once (cached); ``evaluations`` counts the measured ones. The
    model is quantized by ``env.quantize_policy``, so whatever quantizer options the env
    holds are the ones measured.
    """

    def __init__(self, env, batches):
        self.env, self.batches = env, batches
        self.cache, self.evaluations = {}, 0

    def __call__(self, bits):
        key = tuple(int(b) for b in bits)
        if key not in self.cache:
            self.env.quantize_policy(self.env.policy_from_bits(list(key)))
            loss = _loss(self.env.model, self.batches)
            self.cache[key] = loss if math.isfinite(loss) else math.inf
            self.evaluations += 1
        return self.cache[key]


def single_moves(env, bits):
    """``[(step, width, cost change)]``: each free step one allowed width up and one down."""
    base = env.cost(env.policy_from_bits(bits))
    moves = []
    for step in range(env.n_steps):
        if step in env.pins:
            continue
        widths = env.step_widths(step)
        lower = [w for w in widths if w < bits[step]]
        higher = [w for w in widths if w > bits[step]]
        for width in ([lower[-1]] if lower else []) + ([higher[0]] if higher else []):
            trial = list(bits)
            trial[step] = width
            change = env.cost(env.policy_from_bits(trial)) - base
            if change != 0:   # a move that costs nothing (size: activations) trades nothing
                moves.append((step, width, change))
    return moves


def _fill(lead, pool, bits, cost, budget, ratio):
    """``lead`` then moves of ``pool`` in ``ratio`` order, one per step, while they are needed
    (lowering: until within budget) or fit (raising: while within budget)."""
    steps, moves, predicted = {lead[0]}, [lead], lead[3]
    cost += lead[2]
    for move in sorted(pool, key=ratio):
        step, _, change, _ = move
        if step in steps:
            continue
        lowering = change < 0
        if lowering and cost <= budget:
            break
        if not lowering and cost + change > budget:
            continue
        steps.add(step)
        moves.append(move)
        cost += change
        predicted += move[3]
    if cost > budget:
        return None
    trial = list(bits)
    for step, width, _, _ in moves:
        trial[step] = width
    return predicted, trial


def candidate_swaps(bits, measured, cost, budget):
    """Within-budget swaps built from ``measured`` moves ``(step, width, cost change, loss
    change)``, best predicted first; only those predicted to lower the loss."""
    ups = [m for m in measured if m[2] > 0]
    downs = [m for m in measured if m[2] < 0]
    swaps = []
    for lead in ups:   # raise one, lower the cheapest losses per saved cost until it fits
        swaps.append(_fill(lead, downs, bits, cost, budget, lambda m: m[3] / -m[2]))
    gains = [m for m in ups if m[3] < 0]
    for lead in downs:   # lower one, raise the largest gains per cost while they fit
        swaps.append(_fill(lead, gains, bits, cost, budget, lambda m: m[3] / m[2]))
    seen, ranked = set(), []
    for swap in sorted(s for s in swaps if s is not None and s[0] < 0):
        key = tuple(swap[1])
        if key not in seen:
            seen.add(key)
            ranked.append(swap[1])
    return ranked


def refine_bits(env, bits, loss, max_evals):
    """The refined flat bits (see the module's docstring); ``loss``: a :class:`PolicyLoss`."""
    start, current = time.perf_counter(), [int(b) for b in bits]
    first = best = loss(current)
    budget = env.budget()
    while loss.evaluations < max_evals:
        measured = []
        for step, width, change in single_moves(env, current):
            if loss.evaluations >= max_evals:
                break
            trial = list(current)
            trial[step] = width
            measured.append((step, width, change, loss(trial) - best))
        cost = env.cost(env.policy_from_bits(current))
        improved = False
        for trial in candidate_swaps(current, measured, cost, budget)[:TRIES_PER_ROUND]:
            if loss.evaluations >= max_evals:
                break
            value = loss(trial)
            if value < best - LOSS_TOL * max(1.0, abs(best)):
                current, best, improved = trial, value, True
                break
        if not improved:
            break
    log.info("refinement: loss %.4f -> %.4f in %d evaluations, %.1fs", first, best,
             loss.evaluations, time.perf_counter() - start)
    return current
