"""The refinement's measured policies (lib/allocate/refine.py, lib/allocate/folded.py).

PolicyLoss measures a policy on a BatchNorm-folded, channels-last copy of the model's stages
that carries the layer states the env's own quantization gave; it must give the model's own
loss (up to float rounding) and fall back to the model when it does not. The search stops
only where a freshly measured round keeps nothing.
"""
import logging
import math

import numpy as np
import pytest
import torch
import torch.nn as nn

from lib.allocate import PolicyLoss, refine_bits
from lib.allocate.folded import FoldedPolicy
from lib.allocate.refine import FOLD_TOL, LOSS_TOL, TRIES_PER_ROUND, candidate_swaps, single_moves
from lib.allocate.sensitivity import fixed_batches
from lib.allocate.staged import _loss
from tests.test_allocate import toy_env
from tests.test_widths import size_env


def bn_env():
    """The random-init MobileNet-V2 env of test_widths.py with BatchNorms that do something,
    and 16 fixed images to measure on."""
    env, _ = size_env(0.5)
    g = torch.Generator().manual_seed(0)
    images = torch.randn(16, 3, 32, 32, generator=g)
    with torch.no_grad():
        for m in env.model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5, generator=g)
                m.running_var.uniform_(0.5, 2.0, generator=g)
                m.weight.uniform_(1.0, 2.0, generator=g)
                m.bias.uniform_(-0.2, 0.2, generator=g)
        env.layers[-1][1].weight.mul_(30.0)   # logits that quantization moves
        env.unquantize()
        env.model.eval()
        labels = env.model(images).argmax(1)   # the float model right: a loss quantization raises
    env.pretrained_state = {k: v.detach().clone() for k, v in env.model.state_dict().items()}
    return env, [(images, labels)]


def random_bits(env, rng, widest=False):
    return [env.pins.get(i, env.step_widths(i)[-1] if widest else int(rng.choice(
        env.step_widths(i)))) for i in range(env.n_steps)]


def live_loss(env, bits, batches):
    env.quantize_policy(env.policy_from_bits(bits))
    env.model.eval()
    return _loss(env.model, batches)


def test_the_folded_copy_gives_the_models_loss_without_quantizing_again(monkeypatch):
    env, batches = bn_env()
    loss, rng = PolicyLoss(env, batches), np.random.default_rng(0)
    policies = [random_bits(env, rng, widest=True)] + [random_bits(env, rng) for _ in range(3)]
    values = [loss(bits) for bits in policies]
    assert loss.folded is not None                      # the check passed: no fallback
    # every step's state at every width is kept: a new policy needs no quantization by the env
    monkeypatch.setattr(env, "quantize_policy", lambda policy: pytest.fail("quantized again"))
    policies.append(random_bits(env, rng))
    values.append(loss(policies[-1]))
    monkeypatch.undo()
    for k, (bits, value) in enumerate(zip(policies, values)):
        # float rounding only, but an activation may land on the other side of a rounding step
        assert value == pytest.approx(live_loss(env, bits, batches), rel=FOLD_TOL), k
    assert len({round(v, 6) for v in values}) == len(values)    # the policies differ


def test_an_anchored_policy_runs_from_its_first_changed_stage():
    env, batches = bn_env()
    rng = np.random.default_rng(1)
    anchored, fresh = PolicyLoss(env, batches), PolicyLoss(env, batches)
    base = random_bits(env, rng)
    anchored.anchor(base)
    for step in (env.n_steps - 4, env.n_steps // 2):   # a late and a middle layer's weight
        trial = list(base)
        trial[step] = env.step_widths(step)[0] if base[step] != env.step_widths(step)[0] \
            else env.step_widths(step)[-1]
        assert anchored(trial) == pytest.approx(fresh(trial), rel=1e-5)
    assert anchored.stages is not None and "staged" in anchored.checked


def test_a_folded_copy_that_differs_falls_back_to_the_model(monkeypatch, caplog):
    env, batches = bn_env()
    real_carry = FoldedPolicy.carry

    def broken(self, key):   # a twin whose weight is not the layer's
        real_carry(self, key)
        with torch.no_grad():
            self.twins[-1][0].weight[0].add_(1.0)   # one class's logit moves

    monkeypatch.setattr(FoldedPolicy, "carry", broken)
    loss, rng = PolicyLoss(env, batches), np.random.default_rng(2)
    with caplog.at_level(logging.WARNING):
        bits = random_bits(env, rng)
        value = loss(bits)
    assert "refining on the model itself" in caplog.text and loss.folded is None
    assert value == live_loss(env, bits, batches)
    other = random_bits(env, rng)
    assert loss(other) == pytest.approx(live_loss(env, other, batches), rel=1e-5)


def test_the_refinement_stops_where_a_fresh_round_keeps_nothing():
    env = toy_env(linear=True, ratio=0.35, min_bit=1, max_bit=8, trained=True, staged=True)
    batches = fixed_batches(env.evaluator.val_loader, 96)
    start = env.action_wall([env.pins.get(i, 8 if i % 2 else 1) for i in range(env.n_steps)])
    loss = PolicyLoss(env, batches)
    refined = refine_bits(env, start, loss, max_evals=2000)
    assert loss.evaluations < 2000                     # it stopped by itself
    best = loss(refined)
    assert best < loss(start) and math.isfinite(best)
    assert env.cost(env.policy_from_bits(refined)) <= env.budget()
    # around the result, the single moves measured afresh give no swap the search would keep
    measured = []
    for step, width, change in single_moves(env, refined):
        trial = list(refined)
        trial[step] = width
        measured.append((step, width, change, loss(trial) - best))
    swaps = candidate_swaps(refined, measured, env.cost(env.policy_from_bits(refined)),
                            env.budget())
    for swap in swaps[:TRIES_PER_ROUND]:
        assert loss(swap) >= best - LOSS_TOL * max(1.0, abs(best))
