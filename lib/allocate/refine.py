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
3. swaps predicted to help are measured in that order and each that lowers the measured loss
   is kept (later ones only where they touch other steps); then the moves of the steps that
   changed are measured around the new policy, the others keeping their changes as
   predictions, and a round on such predictions that keeps nothing is followed by one that
   measures every move again.

It stops when a round that measured every move keeps nothing, or after ``max_evals``
measured policies. Only swaps within budget are kept, so a policy within budget stays within
it.
"""
import logging
import math
import time

import torch

from .folded import FoldedPolicy
from .staged import StagedLoss, _channels_last, _device, _loss, _Tail

log = logging.getLogger(__name__)

LOSS_TOL = 1e-6        # relative: a swap must lower the loss by more than this to be kept
TRIES_PER_ROUND = 6    # swaps measured around one policy before its moves are measured again
FOLD_TOL = 1e-2        # relative: how far the folded copy's loss may be from the model's


class PolicyLoss:
    """Cross-entropy on fixed batches of the env's model quantized by a flat-bits policy.

    Each policy is measured once (cached); ``evaluations`` counts the measured ones. Layers
    are quantized by ``env.quantize_policy``, so whatever quantizer options the env holds are
    the ones measured. A model with ``stages()`` is measured on a BatchNorm-folded,
    channels-last copy of its stages (lib.allocate.folded) carrying the layer states the env
    gave: checked once against the model itself, within FOLD_TOL (the fold moves float
    rounding, and an activation that lands on the other side of a rounding step moves the
    loss of a low-bit policy by up to a few thousandths of itself). :meth:`anchor` keeps every
    stage's input under one policy; a policy that differs from it only from some stage on is
    then run from that stage's kept input (checked once against the whole pass). A check
    that fails falls back to the model itself, then to whole passes.
    """

    def __init__(self, env, batches):
        self.env, self.batches = env, batches
        self.cache, self.evaluations = {}, 0
        modules = [m for _, m in env.layers]
        self.live, self.stage_of = StagedLoss._split(env.model, modules)
        self.stages, self.start, self.folded = self.live, batches, None
        if self.live is not None:
            self.folded = FoldedPolicy(env, self.live, modules)
            self.stages = self.folded.stages
            self.start = [(_channels_last(x), y) for x, y in batches]
        self.anchored, self.inputs, self.checked = None, None, set()

    def anchor(self, bits):
        """Keep the stage inputs of ``bits`` (a no-op for a model without ``stages()``)."""
        key = tuple(int(b) for b in bits)
        if self.stages is None or key == self.anchored:
            return
        self._quantize(key)
        inputs, device = [self.start], _device(self.env.model)
        with torch.no_grad():
            for stage in self.stages[:-1]:
                inputs.append([(stage(x.to(device)), y) for x, y in inputs[-1]])
        self.anchored, self.inputs = key, inputs

    def _quantize(self, key):
        """The policy into the folded copy, from kept layer states where it can (the env
        quantizes the model when a state is new, and before the fold is checked)."""
        folded = self.folded
        if folded is not None and not folded.states:
            folded.harvest_every_width(self.env)
        if folded is None or "folded" not in self.checked or not folded.knows(key):
            self.env.quantize_policy(self.env.policy_from_bits(list(key)))
            self.env.model.eval()
            if folded is not None:
                folded.harvest(key)
        if folded is not None:
            folded.carry(key)

    def __call__(self, bits):
        key = tuple(int(b) for b in bits)
        if key not in self.cache:
            self._quantize(key)
            loss = self._measure(key)
            self.cache[key] = loss if math.isfinite(loss) else math.inf
            self.evaluations += 1
        return self.cache[key]

    def _measure(self, key):
        if self.stages is None:
            return _loss(self.env.model, self.batches)
        k = self.env.actions_per_layer
        changed = [self.stage_of[i // k] for i, (a, b) in enumerate(zip(key, self.anchored))
                   if a != b] if self.anchored is not None else []
        first = min(changed) if changed else 0
        inputs = self.inputs[first] if first else self.start
        loss = _loss(_Tail(self.stages[first:]), inputs, _device(self.env.model))
        check = "folded" if self.folded is not None and "folded" not in self.checked else \
            "staged" if first and "staged" not in self.checked else None
        return loss if check is None else self._check(check, loss)

    def _check(self, check, loss):
        """``loss`` if it matches its reference; else the reference, and the fallback set up."""
        self.checked.add(check)
        # the folded copy, once it matched the model, stands in for it (a cheaper pass)
        reference = _loss(_Tail(self.stages), self.start, _device(self.env.model)) \
            if check == "staged" and self.folded is not None \
            else _loss(self.env.model, self.batches)
        tol = FOLD_TOL if check == "folded" else 1e-4
        if math.isclose(loss, reference, rel_tol=tol, abs_tol=1e-6):
            return loss
        if check == "folded":
            log.warning("%s's BatchNorm-folded copy differs from it under a policy (loss %.6g, "
                        "not %.6g); refining on the model itself", type(self.env.model).__name__,
                        loss, reference)
            self.stages, self.start, self.folded = self.live, self.batches, None
            self.anchored = self.inputs = None
            return reference
        log.warning("a stage of %s depends on more than its own widths; refining on "
                    "whole passes", type(self.env.model).__name__)
        self.stages = self.anchored = self.inputs = None
        return _loss(self.env.model, self.batches)


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
    """The refined flat bits (see the module's docstring); ``loss``: a :class:`PolicyLoss`.

    One round measures single moves around the round's policy, then tries its swaps
    best-predicted first; a kept swap becomes the current policy, and later swaps of the
    round that touch other steps are tried on top of it (their predictions, made around
    the round's policy, still rank them) until TRIES_PER_ROUND in a row fail. After a round
    that kept a swap, only the moves of the steps it changed are measured again: the other
    moves keep their measured changes as predictions (a kept swap still needs its own
    measured loss to be lower). When such a round keeps nothing, every move is measured
    around its policy once more; the search stops when that round keeps nothing either.
    """
    start, current = time.perf_counter(), [int(b) for b in bits]
    first = best = loss(current)
    budget, rounds, known, fresh = env.budget(), 0, {}, True
    while loss.evaluations < max_evals:
        rounds += 1
        loss.anchor(current)
        if fresh:
            known.clear()
        measured = _measure_moves(env, current, loss, best, max_evals, known)
        current, value, touched = _try_swaps(env, current, measured, loss, best, max_evals)
        log.debug("refinement round %d (%s moves): loss %.5f after %d evaluations", rounds,
                  "measured" if fresh else "kept", value, loss.evaluations)
        if touched:
            best, fresh = value, False
            for key in [key for key in known if key[0] in touched]:
                del known[key]
        elif fresh:
            break
        else:
            fresh = True
    log.info("refinement: loss %.4f -> %.4f in %d evaluations (%d rounds), %.1fs", first, best,
             loss.evaluations, rounds, time.perf_counter() - start)
    return current


def _measure_moves(env, current, loss, best, max_evals, known):
    """``[(step, width, cost change, loss change)]`` of the single moves around ``current``,
    the loss changes from ``known`` ({(step, width): change}) where it has them, else
    measured (while evaluations remain) and added to it."""
    measured = []
    for step, width, change in single_moves(env, current):
        if (step, width) not in known:
            if loss.evaluations >= max_evals:
                break
            trial = list(current)
            trial[step] = width
            known[(step, width)] = loss(trial) - best
        measured.append((step, width, change, known[(step, width)]))
    return measured


def _try_swaps(env, current, measured, loss, best, max_evals):
    """(policy, its loss, steps changed) after trying the swaps of ``measured`` on ``current``."""
    base, budget = list(current), env.budget()
    cost = env.cost(env.policy_from_bits(current))
    touched, failures = set(), 0
    for swap in candidate_swaps(base, measured, cost, budget):
        if loss.evaluations >= max_evals or failures >= TRIES_PER_ROUND:
            break
        steps = {i for i, (a, b) in enumerate(zip(base, swap)) if a != b}
        trial = [swap[i] if i in steps else b for i, b in enumerate(current)]
        if steps & touched or env.cost(env.policy_from_bits(trial)) > budget:
            continue
        value = loss(trial)
        if value < best - LOSS_TOL * max(1.0, abs(best)):
            current, best, failures = trial, value, 0
            touched |= steps
        else:
            failures += 1
    return current, best, touched
