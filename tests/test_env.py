"""Search environments (lib/env): action -> bits, state, budget wall, pins, reward, restore.

A stub evaluator stands in for the fine-tune + validation so every test runs in
well under a second per episode.
"""
import numpy as np
import pytest
import torch
import torch.nn as nn

from lib.env import EnvConfig, KMeansQuantizeEnv, action_to_bits
from lib.utils.errors import UserError


class StubEvaluator:
    """Returns preset accuracies; its 'fine-tune' wrecks the weights to prove they are restored."""

    def __init__(self, acc=50.0, org=80.0):
        self.acc, self.org = acc, org
        self.seen = []

    def validate(self, model):
        return {"top1": self.org, "top5": 99.0, "loss": 0.1}

    def finetune(self, model, step_hook=None, scoring=None):
        self.seen.append({n: p.detach().clone() for n, p in model.named_parameters()})
        with torch.no_grad():
            for p in model.parameters():
                p.add_(1000.0)
        return {"top1": self.acc, "top5": 90.0, "loss": 1.0, "nonfinite": False}


def tiny_cnn():
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Conv2d(8, 8, 3, stride=2, padding=1, groups=8, bias=False), nn.ReLU(),
        nn.Conv2d(8, 32, 1, bias=False), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 10))


def kmeans_env(ratio=0.25, min_bit=1, max_bit=8, evaluator=None):
    cfg = EnvConfig(preserve_ratio=ratio, min_bit=min_bit, max_bit=max_bit, input_size=16)
    env = KMeansQuantizeEnv(tiny_cnn(), evaluator or StubEvaluator(), cfg)
    env.measure_original()
    return env


def run_episode(env, actions):
    state = env.reset()
    states = [state]
    for a in actions:
        state, reward, done, info = env.step(np.array([a]))
        states.append(state)
    assert done
    return reward, info, states


@pytest.mark.parametrize("lo,hi", [(1, 8), (2, 8), (2, 6), (3, 3)])
def test_action_to_bits_boundaries_and_equal_width(lo, hi):
    assert action_to_bits(0.0, lo, hi) == lo
    assert action_to_bits(1.0, lo, hi) == hi
    grid = (np.arange(20000) + 0.5) / 20000
    counts = np.bincount([action_to_bits(a, lo, hi) for a in grid], minlength=hi + 1)[lo:]
    assert counts.sum() == len(grid)
    # Every bit width owns the same share of [0, 1].
    assert counts.max() - counts.min() <= 1, counts


def test_kmeans_state_rows_have_9_values_in_unit_interval():
    env = kmeans_env()
    assert env.state_dim == 9 and env.n_steps == 4
    _, _, states = run_episode(env, [0.3, 0.9, 0.1, 0.6])
    for s in states:
        assert s.shape == (9,) and s.min() >= 0.0 and s.max() <= 1.0
    # Static columns: depthwise flag marks only the second conv; fc has type 0.
    assert env.static_features[:, 0].tolist() == [0.0, 1.0, 0.0, 0.0]
    # The last column is the previous action's bits / max_bit (first step: 1.0).
    assert states[0][-1] == 1.0
    assert states[1][-1] == pytest.approx(action_to_bits(0.3, 1, 8) / 8)


def test_reward_formula_and_restore_each_episode():
    ev = StubEvaluator(acc=61.5, org=80.0)
    env = kmeans_env(ratio=0.5, evaluator=ev)
    assert env.org_acc == 80.0
    for _ in range(2):
        reward, info, _ = run_episode(env, [1.0, 1.0, 1.0, 1.0])
        assert reward == pytest.approx(0.1 * (61.5 - 80.0))
        assert info["accuracy"] == 61.5
    # Both episodes started from the pretrained weights (the stub added 1000 after the first).
    w0 = env.pretrained_state["0.weight"]
    for seen in ev.seen:
        assert (seen["0.weight"] - w0).abs().max() < 1.0


def test_kmeans_policy_is_applied_with_at_most_2_pow_bits_values():
    ev = StubEvaluator()
    env = kmeans_env(ratio=1.0, evaluator=ev)
    _, info, _ = run_episode(env, [0.0, 0.2, 0.5, 1.0])
    for (name, _), bits in zip(env.layers, info["policy"]):
        w = ev.seen[-1][name + ".weight"]
        assert torch.unique(w).numel() <= 2 ** bits


@pytest.mark.parametrize("ratio", [0.04, 0.1, 0.2, 0.5])
def test_wall_keeps_every_policy_within_budget_or_at_min(ratio):
    env = kmeans_env(ratio=ratio)
    rng = np.random.default_rng(ratio.__hash__() % 1000)
    for _ in range(30):
        bits = [int(b) for b in rng.integers(1, 9, size=env.n_steps)]
        walled = env.action_wall(bits)
        within = env.cost(walled) <= env.budget() + 1e-9
        assert within or all(b == env.cfg.min_bit for b in walled)
        assert all(w <= b for w, b in zip(walled, bits))


def test_wall_lowers_from_the_last_layer_first():
    env = kmeans_env(ratio=0.2)
    walled = env.action_wall([8, 8, 8, 8])
    # The last layers give up bits before the first one does.
    assert walled[0] >= walled[-1]
    assert env.cost(walled) <= env.budget()


def test_unreachable_budget_names_smallest_ratio():
    env = kmeans_env(ratio=0.01, min_bit=2)
    with pytest.raises(UserError, match=r"0\.0625"):
        env.check_budget()     # 2 bits / 32 = 0.0625
    kmeans_env(ratio=0.0625, min_bit=2).check_budget()


# ---------------------------------------------------------------- linear mode
@pytest.fixture(autouse=True)
def _skip_calibration(monkeypatch):
    """Calibration (KL clips of 53 layers) is tested in tests/test_quantize*; here it only costs time."""
    import lib.env.linear_env as linear_env_module
    monkeypatch.setattr(linear_env_module, "calibrate", lambda model, loader, device, **kwargs: model)


def linear_env(ratio=0.5, min_bit=2, evaluator=None):
    from lib.env import LinearQuantizeEnv
    from lib.simulator.costs import TableCost
    from models import get_model
    torch.manual_seed(0)
    model = get_model("qmobilenetv2", num_classes=10, input_size=32, width_mult=0.25)
    n = 53
    # A monotone synthetic table: layer weight * w * a.
    scale = np.random.default_rng(0).uniform(1, 10, size=n)
    table = scale[:, None, None] * np.outer(np.arange(1, 9), np.arange(1, 9))[None]
    cfg = EnvConfig(preserve_ratio=ratio, min_bit=min_bit, max_bit=8, float_bit=8, input_size=32)
    calib = [(torch.randn(4, 3, 32, 32), torch.zeros(4, dtype=torch.long))]
    env = LinearQuantizeEnv(model, evaluator or StubEvaluator(), cfg,
                            TableCost(table, min_bit=min_bit, max_bit=8), calib, torch.device("cpu"))
    env.measure_original()
    return env


def test_linear_state_rows_have_10_values_and_weight_flag():
    env = linear_env()
    assert env.n_steps == 106 and env.state_dim == 10
    rng = np.random.default_rng(1)
    _, _, states = run_episode(env, rng.uniform(size=env.n_steps))
    for i, s in enumerate(states[:-1]):
        assert s.shape == (10,) and s.min() >= 0.0 and s.max() <= 1.0
        assert s[-1] == (1.0 if i % 2 == 0 else 0.0)


@pytest.mark.parametrize("kind", ["zeros", "ones", "random"])
def test_linear_pins_first_and_last_layers_through_the_wall(kind):
    env = linear_env(ratio=0.3)
    rng = np.random.default_rng(2)
    actions = {"zeros": np.zeros(env.n_steps), "ones": np.ones(env.n_steps),
               "random": rng.uniform(size=env.n_steps)}[kind]
    _, info, _ = run_episode(env, actions)
    policy = info["policy"]
    assert policy[0] == [8, -1] and policy[-1] == [8, 8]
    assert env.cost(policy) <= env.budget() + 1e-9 or \
        all(b == 2 for pair in policy[1:-1] for b in pair)
    # The policy really was applied to the Q layers.
    layers = env.layers
    assert (layers[0][1].w_bit, layers[0][1].a_bit) == (8, -1)
    assert (layers[5][1].w_bit, layers[5][1].a_bit) == tuple(policy[5])


def test_linear_wall_random_policies_within_budget():
    env = linear_env(ratio=0.25)
    rng = np.random.default_rng(3)
    for _ in range(10):
        bits = [int(b) for b in rng.integers(2, 9, size=env.n_steps)]
        for i, b in env.pins.items():
            bits[i] = b
        walled = env.action_wall(bits)
        policy = env.policy_from_bits(walled)
        assert policy[0] == [8, -1] and policy[-1] == [8, 8]
        assert env.cost(policy) <= env.budget() + 1e-9


def test_linear_unreachable_budget_is_refused():
    env = linear_env(ratio=0.01)
    with pytest.raises(UserError, match="unreachable.*expected a preserve ratio >="):
        env.check_budget()


# ------------------------------------------------------ short fine-tune scoring
def test_nonfinite_finetune_is_scored_not_raised():
    from lib.env import FinetuneConfig, ShortFinetune
    torch.manual_seed(0)
    x, y = torch.randn(8, 3, 16, 16), torch.randint(0, 10, (8,))
    bad = [(torch.full_like(x, float("nan")), y)]
    ev = ShortFinetune(bad, [(x, y)], torch.device("cpu"), FinetuneConfig(finetune_epoch=2))
    out = ev.finetune(tiny_cnn())
    assert out["nonfinite"] is True and 0.0 <= out["top1"] <= 100.0
    # A fine-tune that blows the weights up scores 0% (the worst reward).
    ev = ShortFinetune([(x, y)], [(x, y)], torch.device("cpu"),
                       FinetuneConfig(finetune_lr=float("inf")))
    out = ev.finetune(tiny_cnn())
    assert out["top1"] == 0.0 and out["nonfinite"] is True


def test_finetune_flag_off_only_validates():
    from lib.env import FinetuneConfig, ShortFinetune
    x, y = torch.randn(8, 3, 16, 16), torch.randint(0, 10, (8,))
    model = tiny_cnn()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    ev = ShortFinetune([(x, y)], [(x, y)], torch.device("cpu"), FinetuneConfig(finetune_flag=False))
    ev.finetune(model)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def _kmeans_state(env):
    """The quantized weights of every layer, as the stub evaluator saw them at its last call."""
    seen = env.evaluator.seen[-1]
    return {n: seen[n + ".weight"] for n in env.layer_names}


def test_reused_codebooks_equal_clustering_again_with_the_search_seed():
    """--reuse_codebooks: a (layer, bits) pair met before gets the codebook it got then, which
    is the one clustering the pretrained weights again with the search's seed gives."""
    from lib.quantize.kmeans import apply_kmeans_policy
    env = kmeans_env(ratio=1.0)
    env.reuse_codebooks = True
    first, second = [2, 3, 2, 4], [2, 2, 3, 4]     # layers 0 and 3 keep their widths
    env.evaluate_policy(first)
    env.evaluate_policy(second)
    reused = _kmeans_state(env)
    fresh = kmeans_env(ratio=1.0)
    apply_kmeans_policy(fresh.model, second, seed=fresh.cfg.seed)
    for (name, module), bits in zip(fresh.layers, second):
        assert torch.equal(reused[name], module.weight), name
        assert reused[name].unique().numel() <= 2 ** bits
    assert len(env._codebooks) == 6        # 4 pairs of the first policy + 2 new ones
    env.evaluate_policy(second)             # the same policy again: the same weights
    assert all(torch.equal(reused[n], w) for n, w in _kmeans_state(env).items())


def test_without_reuse_each_episode_clusters_with_its_own_seed():
    env = kmeans_env(ratio=1.0)
    env.evaluate_policy([2, 2, 2, 2])
    once = _kmeans_state(env)
    env.evaluate_policy([2, 2, 2, 2])
    assert not all(torch.equal(once[n], w) for n, w in _kmeans_state(env).items())
    assert env._codebooks == {}
