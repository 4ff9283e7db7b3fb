"""Steps whose width the cost ignores are not scored (lib/allocate/sensitivity.py unscored_steps).

Under a size cost the activation widths cost nothing, so the integer program keeps every
free activation at its widest width and no activation score could change its policy. The
toy linear env of test_allocate.py gets a size table here (cost = weight bits x #weights).
"""
import logging

import numpy as np
import pytest

from lib.allocate import (allocate_bits, cached_layer_scores, layer_scores, load_scores,
                          save_scores, solver_scores)
from lib.allocate.sensitivity import _FloatCalibration, unscored_steps
from lib.env import LinearQuantizeEnv
from lib.simulator.costs import TableCost
from tests.test_allocate import binding_budget, toy_env


def size_env(frac=0.5):
    """The trained toy linear env (widths 2..6) under a size cost: table[l, w-1, a-1] = w * n_l."""
    env = toy_env(linear=True, ratio=1.0, min_bit=2, max_bit=6, trained=True)
    n = np.array([m.weight.numel() for _, m in env.layers], dtype=np.float64)
    table = n[:, None, None] * np.arange(1, 9)[None, :, None] * np.ones((1, 1, 8))
    size = LinearQuantizeEnv(env.model, env.evaluator, env.cfg,
                             TableCost(table, min_bit=2, max_bit=8, metric="size"),
                             env.calib_loader, "cpu")
    size.measure_original()
    return binding_budget(size, frac)


def full_scores(env, monkeypatch):
    """The scores with every step measured (as before the skip rule)."""
    with monkeypatch.context() as m:
        m.setattr("lib.allocate.sensitivity.unscored_steps", lambda env: set())
        return layer_scores(env, "loss", n_images=96)


def test_free_activations_are_not_scored_and_the_ilp_policy_is_unchanged(monkeypatch):
    env = size_env()
    free = unscored_steps(env)
    activations = {2 * i + 1 for i in range(len(env.layers))} - set(env.pins)
    assert free == activations        # under a size cost: every unpinned activation, no weight
    measured = []
    real_set = _FloatCalibration.set

    def spy(self, module, w_bit=-1, a_bit=-1):
        measured.append((w_bit, a_bit))
        return real_set(self, module, w_bit, a_bit)

    monkeypatch.setattr(_FloatCalibration, "set", spy)
    skipped = layer_scores(env, "loss", n_images=96)
    assert measured and all(a == -1 for _, a in measured)     # no activation width measured
    names = [env.layer_names[s // 2] for s in sorted(free)]
    assert skipped["unscored"] == {"activation": names}
    assert np.all(skipped["activation"] == 0.0)
    full = full_scores(env, monkeypatch)
    np.testing.assert_allclose(skipped["weight"], full["weight"], rtol=1e-6, atol=1e-9)
    assert np.abs(full["activation"]).max() > 1e-4      # they were real work, and ignored
    for frac in (0.3, 0.6):
        binding_budget(env, frac)
        bits = allocate_bits(env, solver_scores(skipped))
        assert bits == allocate_bits(env, solver_scores(full))
        assert all(bits[s] == env.step_widths(s)[-1] for s in free)   # widest: cost-free
        assert env.cost(env.policy_from_bits(bits)) <= env.budget()
        # the program before the rule (every width of every step open, every score measured)
        with monkeypatch.context() as m:
            m.setattr(env, "free_steps", lambda: set())
            before = allocate_bits(env, solver_scores(full))
        assert bits[::2] == before[::2]                     # the same weight widths
        table = solver_scores(full)["activation"]
        for s in free:   # its activations tie with the widest (the scores never favour less)
            assert table[s // 2, before[s] - 2] == pytest.approx(table[s // 2, -1], abs=1e-12)


def test_a_cache_without_scores_the_cost_needs_is_scored_again(tmp_path, caplog):
    """Scores made under a size cost serve a size run, not one whose cost reads activations."""
    env = size_env()
    scores = layer_scores(env, "loss", n_images=96)
    save_scores(str(tmp_path / "sensitivity.json"), scores)
    expect = {k: scores[k] for k in ("metric", "bits", "layers", "requested_images",
                                     "hessian_iters")}
    path = str(tmp_path / "sensitivity.json")
    assert load_scores(path, expect, ("weight", "activation"), scores["unscored"]) is not None
    with caplog.at_level(logging.INFO):
        assert load_scores(path, expect, ("weight", "activation")) is None
    assert "scoring again" in caplog.text and "activation" in caplog.text
    # through the search's entry: the size env reuses it, the table env (costs read a) does not
    calls = []
    with pytest.MonkeyPatch.context() as m:
        m.setattr("lib.allocate.layer_scores", lambda *a, **k: calls.append(1) or scores)
        m.setattr("lib.allocate.plot_scores", lambda *a: None)
        cached_layer_scores(env, str(tmp_path), "loss", n_images=96)
        assert calls == []
        table_env = toy_env(linear=True, min_bit=2, max_bit=6, trained=True)
        assert not unscored_steps(table_env)
        cached_layer_scores(table_env, str(tmp_path), "loss", n_images=96)
        assert calls == [1]


def test_a_malformed_unscored_entry_is_scored_again(tmp_path):
    env = size_env()
    scores = layer_scores(env, "loss", n_images=96)
    expect = {k: scores[k] for k in ("metric", "bits", "layers", "requested_images",
                                     "hessian_iters")}
    path = str(tmp_path / "sensitivity.json")
    for bad in ({"activation": ["no.such.layer"]}, {"bias": []}, ["activation"]):
        save_scores(path, dict(scores, unscored=bad))
        assert load_scores(path, expect, ("weight", "activation"), scores["unscored"]) is None
