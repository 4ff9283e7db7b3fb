"""Bit widths of a search (issue 34): the size-cost budget wall, separate activation ranges,
width sets, --pin, and the integer program's measured refinement (lib/allocate/refine.py).

The wall and width tests use the env-level stubs of test_env.py (a random-init MobileNet-V2
at 32 px, a stub evaluator); the refinement uses the trained toy models of test_allocate.py.
"""
import math

import numpy as np
import pytest
import torch

import rl_quantize
from lib.allocate import FixedActions, PolicyLoss, UniformActions, allocate_bits, refine_bits
from lib.allocate.sensitivity import fixed_batches
from lib.env import EnvConfig, LinearQuantizeEnv, action_to_bits, action_to_width
from lib.rl import DDPG, DDPGConfig
from lib.search.loop import play_episode
from lib.simulator.costs import TableCost
from lib.utils.errors import UserError
from models import get_model
from tests.test_allocate import toy_env
from tests.test_env import StubEvaluator, kmeans_env


def size_table(model):
    """Linear mode's size table: table[i, w-1, a-1] = w * #weights_i, whatever a is."""
    from lib.simulator.shapes import extract_layer_shapes
    n = np.array([s.n_weights for s in extract_layer_shapes(model, 32, batch=1, linear=True)])
    return n[:, None, None] * np.arange(1, 9)[None, :, None] * np.ones(8)[None, None, :], n


def size_env(ratio=0.5, **widths):
    torch.manual_seed(0)
    model = get_model("qmobilenetv2", num_classes=10, input_size=32, width_mult=0.25)
    table, n_weights = size_table(model)
    cfg = EnvConfig(preserve_ratio=ratio, min_bit=2, max_bit=8, float_bit=8, input_size=32,
                    **widths)
    calib = [(torch.randn(4, 3, 32, 32), torch.zeros(4, dtype=torch.long))]
    env = LinearQuantizeEnv(model, StubEvaluator(), cfg, TableCost(table, min_bit=2, max_bit=8,
                                                                   metric="size"),
                            calib, torch.device("cpu"))
    env.measure_original()
    return env, n_weights


def released_wall(env, bits, steps=None):
    """The released wall: every unpinned step above min_bit down by one, last first (only
    ``steps`` when given)."""
    bits = list(bits)
    while env.cost(env.policy_from_bits(bits)) > env.budget():
        lowered = False
        for i in reversed(range(env.n_steps)):
            if i in env.pins or bits[i] <= env.cfg.min_bit or (steps and i not in steps):
                continue
            bits[i] -= 1
            lowered = True
            if env.cost(env.policy_from_bits(bits)) <= env.budget():
                return bits
        if not lowered:
            break
    return bits


# ------------------------------------------------------------------ the size-cost wall
@pytest.mark.parametrize("ratio", [0.5, 0.375])
def test_size_wall_keeps_activations_and_spends_the_budget(ratio):
    env, n_weights = size_env(ratio)
    bits = [env.pins.get(i, 8) for i in range(env.n_steps)]
    walled = env.action_wall(bits)
    policy = env.policy_from_bits(walled)
    assert all(a == 8 for _, a in policy[1:])           # activations cost nothing: untouched
    cost = env.cost(policy)
    assert cost <= env.budget()
    # not needlessly under-spent: the last lowering took at most one width of one layer
    assert cost > env.budget() - n_weights.max()


@pytest.mark.parametrize("source", ["ddpg", "random", "replay"])
def test_size_wall_after_each_policy_source(source):
    env, n_weights = size_env(0.4)
    if source == "ddpg":
        agent = DDPG(env.state_dim, len(env.layers), DDPGConfig(warmup=0), seed=3)
    elif source == "random":
        agent = UniformActions(seed=4)
    else:
        raw = [int(b) for b in np.random.default_rng(5).integers(2, 9, env.n_steps)]
        agent = FixedActions(2, 8, raw)
    for episode in range(3):
        transitions, info = play_episode(env, agent, episode)
        policy = info["policy"]
        actions = [action_to_bits(t[1], 2, 8) for t in transitions]
        assert info["cost"] <= env.budget()
        assert info["cost"] > env.budget() - n_weights.max()
        for layer in range(1, len(env.layers) - 1):   # the wall left every activation as chosen
            assert policy[layer][1] == actions[2 * layer + 1]


def test_wall_equals_the_released_wall_on_a_strictly_monotone_table():
    from tests.test_env import linear_env
    env = linear_env(ratio=0.3)
    rng = np.random.default_rng(6)
    for _ in range(5):
        bits = [env.pins.get(i, int(b)) for i, b in enumerate(rng.integers(2, 9, env.n_steps))]
        assert env.action_wall(bits) == released_wall(env, bits)
    kenv = kmeans_env(ratio=0.2)
    for _ in range(10):
        bits = [int(b) for b in rng.integers(1, 9, kenv.n_steps)]
        assert kenv.action_wall(bits) == released_wall(kenv, bits)


def test_wall_takes_released_single_steps_through_equal_costs():
    """Widths 5..8 cost the same: weights still go down one width per sweep, as released;
    activations, which no width makes cheaper, stay as chosen."""
    env, _ = size_env(0.5)
    flat = np.ones((len(env.layers), 8, 8))
    flat[:, 4:, :] = 2.0       # [layer, w - 1, a - 1]: only weights of 4 bits and below save
    env.cost_model = TableCost(flat, min_bit=2, max_bit=8)
    bits = [env.pins.get(i, 8) for i in range(env.n_steps)]
    env.cfg.preserve_ratio = (env.cost(env.policy_from_bits(bits)) - 1.5) / env.reference_cost()
    walled = env.action_wall(bits)
    weight_steps = set(range(0, env.n_steps, 2))
    assert walled == released_wall(env, bits, weight_steps)
    assert env.cost(env.policy_from_bits(walled)) <= env.budget()
    assert all(walled[i] == bits[i] for i in range(1, env.n_steps, 2))


# ------------------------------------------------------------------ width ranges and sets
def test_action_to_width_on_a_range_is_action_to_bits_and_on_a_set_stays_in_it():
    actions = np.linspace(0, 1, 501)
    assert [action_to_width(a, range(2, 9)) for a in actions] == \
        [action_to_bits(a, 2, 8) for a in actions]
    got = [action_to_width(a, [2, 4, 8]) for a in actions]
    assert set(got) == {2, 4, 8} and got == sorted(got)
    assert got[0] == 2 and got[-1] == 8
    # the action FixedActions gives a member of the set maps back to it
    from lib.allocate import bits_to_action
    assert all(action_to_width(bits_to_action(b, 2, 8), [2, 4, 8]) == b for b in (2, 4, 8))


def test_width_sets_and_activation_range_restrict_episodes_wall_and_ilp():
    env, _ = size_env(0.45, bits=[2, 4, 8], min_bit_a=6, max_bit_a=8)
    rng = np.random.default_rng(7)
    state, done = env.reset(), False
    while not done:
        state, _, done, info = env.step(rng.uniform(size=1))
    free = [(s, b) for s, b in enumerate(sum(info["policy"], [])) if s not in env.pins]
    assert all(b in ({2, 4, 8} if s % 2 == 0 else {6, 7, 8}) for s, b in free)
    assert info["cost"] <= env.budget()
    tenv = toy_env(linear=True, ratio=0.5, min_bit=1, max_bit=8, trained=True)
    for kind, widths in (("weight", [2, 8]), ("activation", [4, 8])):
        tenv.widths[kind] = widths
    scores = {"weight": np.tile([3.0, 0.0], (4, 1)), "activation": np.tile([1.0, 0.0], (4, 1))}
    bits = allocate_bits(tenv, scores)
    assert all(b in tenv.step_widths(s) for s, b in enumerate(bits) if s not in tenv.pins)
    assert tenv.cost(tenv.policy_from_bits(bits)) <= tenv.budget()


def test_replay_refuses_a_width_outside_the_set(tmp_path):
    from lib.search.methods import replay_bits
    from lib.utils.strategy import write_strategy
    env, _ = size_env(1.0, bits=[4, 8])
    policy = env.policy_from_bits([env.pins.get(i, 8) for i in range(env.n_steps)])
    policy[3][0] = 5
    path = str(tmp_path / "strategy.json")
    write_strategy(path, {"policy": policy, "cost_ratio": 0.5, "accuracy": 1.0, "episode": 0,
                          "reward": 0.0, "cost": 1.0}, env.layer_names,
                   {"arch": "qmobilenetv2", "mode": "linear", "metric": "size",
                    "preserve_ratio": 1.0})
    args = rl_quantize.get_args_parser().parse_args(["--policy", path, "--preserve_ratio", "1"])
    with pytest.raises(UserError, match=r"width 5; expected one of \[4, 8\]"):
        replay_bits(args, env)


# ------------------------------------------------------------------ pins
def test_pins_override_the_default_and_hold_through_the_wall():
    names = size_env(1.0)[0].layer_names
    env, _ = size_env(0.3, pin=[f"{names[0]}=4,8", f"{names[7]}=8"])
    assert env.pins[0] == 4 and env.pins[1] == 8 and env.pins[14] == 8
    assert env.pins[2 * len(names) - 2] == 8            # the default last-layer pin stays
    walled = env.action_wall([env.pins.get(i, 8) for i in range(env.n_steps)])
    assert walled[0] == 4 and walled[14] == 8
    assert env.min_bits()[14] == 8
    with pytest.raises(UserError, match="no quantizable layer 'nope'"):
        size_env(0.5, pin=["nope=4"])
    with pytest.raises(UserError, match="NAME=W,A"):
        size_env(0.5, pin=[f"{names[2]}=4,4,4"])
    kenv = kmeans_env(ratio=0.5)
    with pytest.raises(UserError, match="weights only"):
        type(kenv)(kenv.model, kenv.evaluator, EnvConfig(pin=[f"{kenv.layer_names[0]}=3,3"],
                                                         input_size=16))


@pytest.mark.parametrize("argv,expected", [
    (["--bits", "2,9"], "--bits: .*expected comma-separated integers in \\[1, 8\\]"),
    (["--pin", "features.0"], "--pin: .*expected NAME=W or NAME=W,A"),
    (["--min_bit_a", "4"], "--min_bit_a sets activation widths; expected --linear_quantization"),
    (["--linear_quantization", "--min_bit_a", "6", "--max_bit_a", "4"], "activation range 6..4"),
    (["--refine", "5"], "--refine .*expected --method ilp"),
])
def test_width_flags_bad_values_are_one_line_errors(argv, expected, capsys):
    from lib.utils.errors import run_cli
    with pytest.raises(SystemExit) as exc:
        run_cli(rl_quantize.main, argv + ["--dataset", "mnist5k"])
    assert exc.value.code != 0
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert any(__import__("re").search(expected, line) for line in err.splitlines()), err


# ------------------------------------------------------------------ the refinement
def test_staged_policy_loss_equals_the_whole_pass():
    env = toy_env(linear=True, ratio=0.5, min_bit=1, max_bit=8, trained=True, staged=True)
    batches = fixed_batches(env.evaluator.val_loader, 64)
    staged, whole = PolicyLoss(env, batches), PolicyLoss(env, batches)
    start = env.min_bits()
    staged.anchor(start)
    for step in (4, 6):
        trial = list(start)
        trial[step] = 8
        assert staged(trial) == pytest.approx(whole(trial), rel=1e-5)
    assert staged.stages is not None


@pytest.mark.parametrize("linear,ratio", [(True, 0.35), (False, 0.1)])
def test_refinement_lowers_the_measured_loss_within_budget_and_evaluations(linear, ratio):
    env = toy_env(linear=linear, ratio=ratio, min_bit=1, max_bit=8, trained=True, staged=True)
    batches = fixed_batches(env.evaluator.val_loader, 96)
    # a poor start within budget: every weight at its narrowest width, activations wide
    start = env.action_wall([env.pins.get(i, 8 if linear and i % 2 else 1)
                             for i in range(env.n_steps)])
    loss = PolicyLoss(env, batches)
    refined = refine_bits(env, start, loss, max_evals=40)
    assert loss.evaluations <= 40
    assert env.cost(env.policy_from_bits(refined)) <= env.budget()
    assert all(refined[i] == b for i, b in env.pins.items())
    assert loss(refined) < loss(start)
    assert math.isfinite(loss(refined))


# ------------------------------------------------------------------ recorded and resume-checked
def test_width_flags_are_recorded_and_a_resume_refuses_a_change(tiny_pretrained, tmp_path, capsys):
    import json
    import os

    from helpers import tiny_search_argv
    from lib.utils.errors import run_cli
    argv = tiny_search_argv(tiny_pretrained[0], tmp_path, 1) + [
        "--bits", "2,4", "--pin", "features.0.0=4", "--preserve_ratio", "0.2"]
    rl_quantize.main(argv)
    (name,) = os.listdir(tmp_path)
    with open(os.path.join(tmp_path, name, "strategy.json")) as f:
        record = json.load(f)
    assert record["bits"] == [2, 4] and record["pins"] == ["features.0.0=4"]
    assert record["strategy"][0] == 4 and all(b in (2, 4) for b in record["strategy"])
    folder = os.path.join(tmp_path, name)
    for flag, value in (("--bits", "2,3"), ("--pin", "features.0.0=2")):
        changed = [v for v in argv]
        changed[changed.index(flag) + 1] = value
        with pytest.raises(SystemExit):
            run_cli(rl_quantize.main, changed + ["--train_episode", "2", "--resume_search", folder])
        err = capsys.readouterr().err.strip().splitlines()[-1]
        assert f"was searched with {flag} " in err and "expected the same flags" in err
