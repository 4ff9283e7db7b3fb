"""The allocators beside DDPG (lib/allocate, rl_quantize.py --method ilp / random).

Toy models of four layers with a 1..3-bit range are small enough to enumerate every
policy, so the integer program is checked against brute force through the real
envs (their costs, pins and budgets). The CLI runs use the tiny random-init
MobileNet-V2 of conftest.py on 32 mnist5k images.
"""
import itertools
import json
import os
import re

import numpy as np
import pytest
import torch
import torch.nn as nn
from torch.utils.data import DataLoader, TensorDataset

import rl_quantize
from lib.allocate import (allocate_bits, hutchinson_traces, layer_options, layer_scores,
                          solver_scores)
from lib.env import (EnvConfig, FinetuneConfig, KMeansQuantizeEnv, LinearQuantizeEnv,
                     ShortFinetune)
from lib.quantize.linear import QConv2d, QLinear
from lib.quantize.kmeans import apply_kmeans_policy
from lib.simulator.costs import TableCost
from lib.utils.checkpoint import load_checkpoint
from lib.utils.errors import run_cli
from lib.utils.layers import fold_batchnorm, quantizable_layers
from lib.utils.strategy import load_strategy, validate_strategy
from models import get_model


# ----------------------------------------------------------------- toy envs
def toy_data(n=96, seed=0):
    """Three classes of 1x8x8 images: a class-specific pattern plus noise."""
    g = torch.Generator().manual_seed(seed)
    patterns = torch.randn(3, 1, 8, 8, generator=g)
    y = torch.arange(n) % 3
    x = patterns[y] + 0.7 * torch.randn(n, 1, 8, 8, generator=g)
    return TensorDataset(x, y)


class StagedSequential(nn.Sequential):
    """A Sequential that offers its children as :meth:`stages` (as the project's models do)."""

    def stages(self):
        return [nn.Sequential(*self[:2]), nn.Sequential(*self[2:4]), nn.Sequential(*self[4:])]


def toy_model(linear=False, staged=False):
    conv, fc = (QConv2d, QLinear) if linear else (nn.Conv2d, nn.Linear)
    kw = {"half_wave": False} if linear else {}
    return (StagedSequential if staged else nn.Sequential)(conv(1, 6, 3, padding=1, **kw), nn.ReLU6(),
                         conv(6, 6, 3, padding=1), nn.ReLU6(),
                         conv(6, 8, 3, stride=2, padding=1), nn.ReLU6(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), fc(8, 3))


def train(model, data, steps=150):
    torch.manual_seed(0)
    opt = torch.optim.Adam(model.parameters(), lr=0.02)
    loader = DataLoader(data, batch_size=32, shuffle=True)
    for _, (x, y) in zip(range(steps), itertools.cycle(loader)):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    return model


def toy_env(linear=False, ratio=0.5, min_bit=1, max_bit=3, trained=False, table_seed=0,
            staged=False):
    torch.manual_seed(1)
    data = toy_data()
    model = toy_model(linear, staged)
    if trained:
        train(model, data)
    loader = DataLoader(data, batch_size=48)
    evaluator = ShortFinetune(loader, loader, "cpu", FinetuneConfig(finetune_flag=False))
    cfg = EnvConfig(preserve_ratio=ratio, min_bit=min_bit, max_bit=max_bit, input_size=8, seed=3)
    if not linear:
        env = KMeansQuantizeEnv(model, evaluator, cfg)
    else:
        rng = np.random.default_rng(table_seed)
        table = rng.uniform(1, 5, (4, 1, 1)) * np.outer(np.arange(1, 9), np.arange(1, 9))[None] \
            * rng.uniform(0.7, 1.3, (4, 8, 8))
        table[[0, 3]] *= 0.05     # the pinned layers: a small share, so budgets can bind
        env = LinearQuantizeEnv(model, evaluator, cfg, TableCost(table, min_bit=min_bit,
                                                                 max_bit=8), loader, "cpu")
    env.measure_original()
    return env


def binding_budget(env, frac):
    """Set the budget a fraction ``frac`` of the way from the cheapest to the widest policy."""
    lo = env.min_cost_ratio()
    widest = [env.pins.get(i, env.cfg.max_bit) for i in range(env.n_steps)]
    hi = env.cost(env.policy_from_bits(widest)) / env.reference_cost()
    env.cfg.preserve_ratio = lo + frac * (hi - lo)
    return env


def brute_force(env, scores):
    """(lowest summed score, its bits) over every in-budget policy of the env."""
    best = (np.inf, None)
    k, lo = env.actions_per_layer, env.cfg.min_bit
    per_layer = [layer_options(env, layer) for layer in range(len(env.layers))]
    for combo in itertools.product(*per_layer):
        bits = [b for option in combo for b in option]
        if env.cost(env.policy_from_bits(bits)) > env.budget():
            continue
        total = 0.0
        for step, b in enumerate(bits):
            if step in env.pins:
                continue
            kind = "activation" if k == 2 and step % 2 else "weight"
            total += scores[kind][step // k, b - lo]
        best = min(best, (total, bits), key=lambda t: t[0])
    return best


def summed(env, scores, bits):
    k, lo = env.actions_per_layer, env.cfg.min_bit
    return sum(scores["activation" if k == 2 and s % 2 else "weight"][s // k, b - lo]
               for s, b in enumerate(bits) if s not in env.pins)


# ------------------------------------------------------- the integer program
@pytest.mark.parametrize("linear", [False, True])
@pytest.mark.parametrize("seed,frac", [(0, 0.3), (1, 0.5), (2, 0.7)])
def test_ilp_policy_is_the_best_in_budget_policy(linear, seed, frac):
    env = binding_budget(toy_env(linear=linear, ratio=1.0, table_seed=seed), frac)
    rng = np.random.default_rng(seed)
    n = len(env.layers)
    # Raw scores (negative ones too): the solver must be exact whatever they are.
    scores = {"weight": rng.normal(size=(n, 3)) + np.array([2.0, 1.0, 0.0])}
    if linear:
        scores["activation"] = rng.normal(size=(n, 3)) + np.array([2.0, 1.0, 0.0])
    best_total, _ = brute_force(env, scores)
    bits = allocate_bits(env, scores)
    assert env.cost(env.policy_from_bits(bits)) <= env.budget()
    assert summed(env, scores, bits) == pytest.approx(best_total, rel=1e-6, abs=1e-6)
    # Pins and bit range (linear: first layer [8, -1], last [8, 8]; the rest in 1..3).
    free = [b for s, b in enumerate(bits) if s not in env.pins]
    assert free and all(1 <= b <= 3 for b in free)
    if linear:
        policy = env.policy_from_bits(bits)
        assert policy[0] == [8, -1] and policy[-1] == [8, 8]


def test_ilp_trades_weight_and_activation_bits_through_the_table():
    """Linear mode chooses (w, a) jointly: a cheap pair beats a split bit-count choice."""
    env = binding_budget(toy_env(linear=True, ratio=1.0), 0.5)
    n = len(env.layers)
    scores = {"weight": np.tile([3.0, 1.0, 0.0], (n, 1)), "activation": np.tile([3.0, 1.0, 0.0],
                                                                                (n, 1))}
    best_total, best_bits = brute_force(env, scores)
    bits = allocate_bits(env, scores)
    assert summed(env, scores, bits) == pytest.approx(best_total, rel=1e-6, abs=1e-6)
    assert env.cost(env.policy_from_bits(bits)) <= env.budget()


def test_ilp_ties_spend_the_budget():
    """Flat (all-zero) scores: every policy ties, and the widest in-budget one is returned."""
    env = binding_budget(toy_env(ratio=1.0), 0.6)
    n = len(env.layers)
    bits = allocate_bits(env, {"weight": np.zeros((n, 3))})
    spent = env.cost(env.policy_from_bits(bits))
    feasible = [env.cost(env.policy_from_bits(list(c)))
                for c in itertools.product(range(1, 4), repeat=n)]
    assert spent == max(c for c in feasible if c <= env.budget())


def test_solver_scores_are_monotone_and_non_negative():
    raw = {"weight": np.array([[0.5, -0.1, 0.2, 0.0], [-1.0, -2.0, 0.3, 0.1]])}
    out = solver_scores(raw)["weight"]
    np.testing.assert_allclose(out, [[0.5, 0.2, 0.2, 0.0], [0.3, 0.3, 0.3, 0.1]])
    assert raw["weight"][0, 1] == -0.1   # the raw (cached) scores are untouched


# ---------------------------------------------------------------- sensitivity
def test_loss_sensitivity_is_zero_at_an_exact_width():
    """A layer holding 4 distinct weight values is reproduced exactly by 2-bit K-Means."""
    env = toy_env(trained=True, min_bit=1, max_bit=4)
    name, module = env.layers[1]
    values = torch.tensor([-0.3, -0.05, 0.1, 0.4])
    idx = torch.randint(0, 4, module.weight.shape, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        module.weight.copy_(values[idx])
    env.pretrained_state = {k: v.detach().clone() for k, v in env.model.state_dict().items()}
    s = layer_scores(env, "loss", n_images=96)["weight"]
    assert abs(s[1, 0]) > 1e-4                  # 1 bit (2 centroids) changes the weights
    assert np.all(np.abs(s[1, 1:]) < 1e-6)      # 2, 3, 4 bits reproduce the weights exactly
    assert torch.equal(module.weight, values[idx])   # the model is left as it was


@pytest.mark.parametrize("linear", [False, True])
def test_loss_sensitivity_grows_as_bits_fall_on_a_trained_model(linear):
    env = toy_env(linear=linear, trained=True, min_bit=1 if not linear else 2, max_bit=6)
    scores = layer_scores(env, "loss", n_images=96)
    kinds = ["weight", "activation"] if linear else ["weight"]
    for kind in kinds:
        free = [i for i in range(len(env.layers))
                if (2 * i + (kind == "activation") if linear else i) not in env.pins]
        mean = scores[kind][free].mean(axis=0)     # one value per width, narrowest first
        assert np.all(np.diff(mean) <= 1e-3), (kind, mean)
        assert mean[0] > max(1e-4, 10 * abs(mean[-1])), (kind, mean)
    # The float model is back in place (no layer left quantized).
    assert all(getattr(m, "w_bit", -1) == -1 and getattr(m, "a_bit", -1) == -1
               for _, m in env.layers)


@pytest.mark.parametrize("linear", [False, True])
def test_staged_scores_equal_whole_model_passes(linear):
    """The prefix cache (each stage's float input computed once) changes no score."""
    whole = layer_scores(toy_env(linear=linear, trained=True, max_bit=4), "loss", n_images=96)
    env = toy_env(linear=linear, trained=True, max_bit=4, staged=True)
    calls = []
    for k, first in enumerate((0, 2, 4)):     # the first module of each stage
        env.model[first].register_forward_hook(lambda *a, k=k: calls.append(k))
    staged = layer_scores(env, "loss", n_images=96)
    for kind in ("weight", "activation") if linear else ("weight",):
        assert np.abs(staged[kind]).max() > 1e-4
        np.testing.assert_allclose(staged[kind], whole[kind], rtol=1e-5, atol=1e-7)
    assert staged["baseline_loss"] == pytest.approx(whole["baseline_loss"], rel=1e-6)
    # The first stage's cached input is reused: it runs far less often than the last one.
    assert calls.count(0) < calls.count(2) / 2


def test_kmeans_scores_use_the_codebooks_apply_kmeans_policy_builds():
    """The scan's precomputed (lockstep) centroids are those apply_kmeans_policy clusters."""
    from lib.allocate.sensitivity import _loss, bit_widths, fixed_batches
    env = toy_env(linear=False, trained=True, max_bit=4)
    got = layer_scores(env, "loss", n_images=96)["weight"]
    batches = fixed_batches(env.evaluator.val_loader, 96)
    base = _loss(env.model, batches)
    for layer, (name, module) in enumerate(env.layers):
        original = module.weight.detach().clone()
        for j, bits in enumerate(bit_widths(env)):
            apply_kmeans_policy(env.model, {name: bits}, n_iter=env.n_iter, method=env.method,
                                is_pruned=env.is_pruned, seed=env.cfg.seed)
            want = _loss(env.model, batches) - base
            module.weight.data.copy_(original)
            assert got[layer, j] == pytest.approx(want, rel=1e-5, abs=1e-7), (name, bits)


def randomise_batchnorm(model, seed=0):
    """Non-trivial BN statistics and affine terms, so that folding them changes the convs."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.copy_(0.2 * torch.randn(m.num_features, generator=g))
                m.running_var.copy_(0.5 + torch.rand(m.num_features, generator=g))
                m.weight.copy_(0.5 + torch.rand(m.num_features, generator=g))
                m.bias.copy_(0.1 * torch.randn(m.num_features, generator=g))
    return model.eval()


@pytest.mark.parametrize("arch", ["qmobilenetv2", "mobilenet", "resnet18"])
def test_fold_batchnorm_matches_the_eval_model_and_leaves_it_alone(arch):
    torch.manual_seed(0)
    model = randomise_batchnorm(get_model(arch, num_classes=7, input_size=32))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    folded = fold_batchnorm(model)
    n_bn = [sum(isinstance(m, nn.BatchNorm2d) for m in net.modules()) for net in (model, folded)]
    # resnet's stem registers maxpool between conv1 and bn1: that one stays (not adjacent)
    assert n_bn[1] == (1 if arch == "resnet18" else 0) < n_bn[0]
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        want, got = model(x), folded(x)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())


class ConvAfterNorm(nn.Module):
    """Registers conv then bn, but normalises *before* the conv: folding would be wrong."""

    def __init__(self):
        super().__init__()
        self.conv = QConv2d(6, 6, 3, padding=1)
        self.bn = nn.BatchNorm2d(6)

    def forward(self, x):
        return self.conv(self.bn(x))


@pytest.mark.parametrize("misordered", [False, True])
def test_staged_loss_with_batchnorm_equals_whole_passes(misordered):
    """Folded, channels-last float stages give the scores of whole-model passes; a layout
    that folding would break is detected and run unfolded."""
    from lib.allocate.sensitivity import StagedLoss, _loss
    torch.manual_seed(0)
    if misordered:
        model = StagedSequential(QConv2d(1, 6, 3, padding=1, half_wave=False), nn.ReLU6(),
                                 ConvAfterNorm(), nn.ReLU6(), nn.AdaptiveAvgPool2d(1),
                                 nn.Flatten(), QLinear(6, 3))
    else:
        model = get_model("qmobilenetv2", num_classes=3, input_size=32, width_mult=0.25)
    model = randomise_batchnorm(model)
    x, y = toy_data()[:]
    if not misordered:
        x = nn.functional.interpolate(x.expand(-1, 3, -1, -1), size=32)
    batches = [(x[:48], y[:48]), (x[48:], y[48:])]
    layers = quantizable_layers(model, linear=True)
    with torch.no_grad():   # initial logits are tiny: scale them so the loss sees the features
        layers[-1][1].weight.mul_(100.0)
    loss = StagedLoss(model, batches, [m for _, m in layers])
    assert loss.stages is not None
    folded = not any(isinstance(m, nn.BatchNorm2d) for s in loss.float_stages for m in s.modules())
    assert folded == (not misordered)
    changed = 0
    for index in range(len(layers)):
        _, module = layers[index]
        module.set_bits(2, 2)
        with torch.no_grad():
            module.activation_range.fill_(1.0)
            module.weight_range.fill_(float(module.weight.abs().max()))
        whole = _loss(model, batches)
        assert loss(index) == pytest.approx(whole, rel=1e-4, abs=1e-6)
        changed += abs(whole - loss.base) > 1e-5
        module.set_bits(-1, -1)
    assert changed >= len(layers) // 2, changed   # the quantization shows in the loss
    # the changed layers ran as twins in the folded copy (its check passed), not live
    assert (loss.twins is not None) == (not misordered)


def small_bn_model():
    """A 0.25-wide qmobilenetv2 with non-trivial BatchNorm, toy batches at 32 px, its layers."""
    torch.manual_seed(0)
    model = randomise_batchnorm(get_model("qmobilenetv2", num_classes=3, input_size=32,
                                          width_mult=0.25))
    x, y = toy_data()[:]
    batches = [(nn.functional.interpolate(x.expand(-1, 3, -1, -1), size=32), y)]
    return model, batches, quantizable_layers(model, linear=True)


def test_staged_loss_refuses_a_twin_that_differs(monkeypatch):
    """If the folded copy's twin of a changed layer gave another loss than the live stage,
    the first call notices, answers the live loss and stops using twins."""
    from lib.allocate.sensitivity import StagedLoss, _loss
    model, batches, layers = small_bn_model()
    loss = StagedLoss(model, batches, [m for _, m in layers])
    assert loss.twins is not None
    monkeypatch.setattr(StagedLoss, "_twin_loss", lambda self, layer, k: loss.base + 1.0)
    module = layers[3][1]
    module.set_bits(2, -1)
    assert loss(3) == pytest.approx(_loss(model, batches), rel=1e-4)
    assert loss.twins is None
    module.set_bits(-1, -1)
    assert loss(4) == pytest.approx(loss.base, rel=1e-5)


@pytest.mark.parametrize("arch", ["mobilenet", "qmobilenetv2", "resnet18", "qresnet50"])
def test_model_stages_chain_to_its_forward(arch):
    torch.manual_seed(0)
    model = get_model(arch, num_classes=7, input_size=32).eval()
    x = torch.randn(2, 3, 32, 32)
    y = x
    with torch.no_grad():
        for stage in model.stages():
            y = stage(y)
        assert torch.equal(y, model(x))
    assert {id(m) for s in model.stages() for m in s.modules()} >= \
        {id(m) for _, m in quantizable_layers(model)}


def test_hutchinson_estimates_each_blocks_trace():
    torch.manual_seed(0)
    a = torch.randn(10, 10)
    hess = a @ a.T + torch.eye(10)               # Hessian of the quadratic below, blocks 6 + 4
    params = [torch.randn(6, requires_grad=True), torch.randn(4, requires_grad=True)]
    x = torch.cat(params)
    loss = 0.5 * x @ hess @ x
    generator = torch.Generator().manual_seed(0)
    traces = hutchinson_traces(loss, params, n_iter=4000, generator=generator)
    expect = [float(hess[:6, :6].trace()), float(hess[6:, 6:].trace())]
    np.testing.assert_allclose(traces, expect, rtol=0.08)


def test_hessian_scores_fall_with_bits():
    env = toy_env(trained=True, min_bit=1, max_bit=5)
    s = layer_scores(env, "hessian", n_images=96, hessian_iters=32)["weight"]
    assert np.all(s >= 0) and np.all(np.diff(s, axis=1) <= 1e-12)
    assert np.all(s[:, 0] > s[:, -1])


# ------------------------------------------------------------------- the CLI
@pytest.fixture(scope="module")
def cli_assets(tmp_path_factory, tiny_pretrained):
    d = tmp_path_factory.mktemp("alloc")
    scale = np.linspace(1, 5, 53)
    table = scale[:, None, None] * np.outer(np.arange(1, 9), np.arange(1, 9))[None]
    np.save(d / "table.npy", table)
    return {"ckpt": tiny_pretrained[0], "table": str(d / "table.npy")}


def cli(assets, out, method, episodes=3, extra=()):
    return ["--dataset", "mnist5k", "--width_mult", "0.25", "--pretrained_path", assets["ckpt"],
            "--train_size", "32", "--val_size", "32", "--data_bsize", "32", "--n_worker", "0",
            "--warmup", "2", "--train_episode", str(episodes), "--output", str(out),
            "--seed", "1", "--method", method, *extra]


KMEANS = ("--arch", "mobilenetv2", "--max_bit", "4", "--preserve_ratio", "0.15")
# Two widths per step keep the 53-layer ILP runs to a few hundred 16-image evaluations.
KMEANS_ILP = ("--arch", "mobilenetv2", "--min_bit", "3", "--max_bit", "4",
              "--preserve_ratio", "0.11", "--sensitivity_images", "16")
LINEAR = ("--arch", "qmobilenetv2", "--linear_quantization", "--min_bit", "7",
          "--preserve_ratio", "0.85", "--sensitivity_images", "16")


def folder_of(out):
    (d,) = [os.path.join(out, x) for x in os.listdir(out)]
    return d


def log_rows(folder):
    with open(os.path.join(folder, "log.txt")) as f:
        lines = f.read().splitlines()[1:]
    return [ln.split("\t") for ln in lines if ln]


def names(arch, linear):
    model = get_model(arch, num_classes=10, input_size=32, width_mult=0.25)
    return [n for n, _ in quantizable_layers(model, linear=linear)]


def test_random_search_draws_differ_within_budget_and_resume_logs_once(cli_assets, tmp_path,
                                                                      kill_before_state_save):
    full = cli(cli_assets, tmp_path / "full", "random", episodes=4, extra=KMEANS)
    rl_quantize.main(full)
    ref = log_rows(folder_of(tmp_path / "full"))
    policies = [r[6] for r in ref]
    assert [int(r[0]) for r in ref] == [0, 1, 2, 3]
    assert len(set(policies)) == 4                                   # a new draw per episode
    assert all(float(r[3]) <= 0.15 for r in ref)                     # within the budget
    assert all(1 <= b <= 4 for p in policies for b in json.loads(p))
    # Killed between episode 2's log line and its state save, then resumed.
    argv = cli(cli_assets, tmp_path / "cut", "random", episodes=4, extra=KMEANS)
    kill_before_state_save(3)
    with pytest.raises(SystemExit):
        run_cli(rl_quantize.main, argv)
    kill_before_state_save(None)
    rl_quantize.main(argv + ["--resume_search"])
    folder = folder_of(tmp_path / "cut")
    rows = log_rows(folder)
    assert [int(r[0]) for r in rows] == [0, 1, 2, 3]                 # each episode once
    assert [r[6] for r in rows] == policies                         # the same draws
    s = load_strategy(os.path.join(folder, "strategy.json"))
    assert s["method"] == "random" and s["cost_ratio"] <= 0.15
    validate_strategy(s, names("mobilenetv2", False), "kmeans", min_bit=1, max_bit=4)


def test_ilp_search_outputs_and_resume_reuses_the_scores(cli_assets, tmp_path, monkeypatch,
                                                         capsys):
    argv = cli(cli_assets, tmp_path, "ilp", extra=KMEANS_ILP)
    # Killed during the evaluation of the planned policy: the scores are already cached.
    real_finish = rl_quantize.Search.record

    def dying_record(self, episode, info, losses):
        raise KeyboardInterrupt

    monkeypatch.setattr(rl_quantize.Search, "record", dying_record)
    with pytest.raises(SystemExit):
        run_cli(rl_quantize.main, argv)
    folder = folder_of(tmp_path)
    with open(os.path.join(folder, "sensitivity.json")) as f:
        cached = json.load(f)
    assert len(cached["weight"]) == 53 and cached["bits"] == [3, 4]
    assert load_checkpoint(os.path.join(folder, rl_quantize.STATE_FILE))["episode"] == 0
    monkeypatch.setattr(rl_quantize.Search, "record", real_finish)

    def no_scoring(*args, **kwargs):
        raise AssertionError("the resumed run scored the layers again")

    monkeypatch.setattr("lib.allocate.layer_scores", no_scoring)
    capsys.readouterr()
    best = rl_quantize.main(argv + ["--resume_search"])
    assert [int(r[0]) for r in log_rows(folder)] == [0]               # one evaluated episode
    # the method's own time, read by bench/allocate_bench.sh
    assert re.search(r"search time \d+\.\ds \(ilp, episodes 1-1\)", capsys.readouterr().err)
    for name in ("strategy.json", "log.txt", "search_state.pth.tar", "best_policy.png",
                 "accuracy_vs_cost.png", "sensitivity.png"):
        assert os.path.getsize(os.path.join(folder, name)) > 0, name
    assert any(f.startswith("events.out.tfevents") for f in os.listdir(folder))
    s = load_strategy(os.path.join(folder, "strategy.json"))
    assert s["method"] == "ilp" and s["cost_ratio"] <= 0.11 and s["strategy"] == best["policy"]
    assert set(s["strategy"]) == {3, 4}     # the budget binds: some layers at each width
    validate_strategy(s, names("mobilenetv2", False), "kmeans", min_bit=3, max_bit=4)


@pytest.mark.slow
def test_ilp_linear_search_respects_pins_range_and_budget(cli_assets, tmp_path):
    rl_quantize.main(cli(cli_assets, tmp_path, "ilp", extra=LINEAR + (
        "--cost_table", cli_assets["table"])))
    s = load_strategy(os.path.join(folder_of(tmp_path), "strategy.json"))
    assert s["strategy"][0] == [8, -1] and s["strategy"][-1] == [8, 8]
    assert all(7 <= b <= 8 for w, a in s["strategy"][1:-1] for b in (w, a))
    assert {b for w, a in s["strategy"][1:-1] for b in (w, a)} == {7, 8}    # the budget binds
    assert s["cost_ratio"] <= 0.85 and s["mode"] == "linear"
    validate_strategy(s, names("qmobilenetv2", True), "linear", min_bit=7, max_bit=8)


@pytest.mark.parametrize("method", ["ilp", "random"])
def test_unreachable_budget_is_the_same_error_as_ddpg(cli_assets, tmp_path, capsys, method):
    lines = []
    for m in ("ddpg", method):
        with pytest.raises(SystemExit) as exc:
            run_cli(rl_quantize.main, cli(cli_assets, tmp_path / m, m, extra=(
                "--arch", "mobilenetv2", "--preserve_ratio", "0.01", "--min_bit", "2")))
        assert exc.value.code != 0
        err = capsys.readouterr().err.strip().splitlines()
        assert not any("Traceback" in ln for ln in err)
        lines.append(err[-1])
    assert lines[0] == lines[1] and lines[0].startswith("error: ") and "unreachable" in lines[0]


@pytest.mark.parametrize("method", ["ilp", "random"])
def test_agent_weights_need_ddpg(cli_assets, tmp_path, capsys, method):
    with pytest.raises(SystemExit):
        run_cli(rl_quantize.main, cli(cli_assets, tmp_path, method, extra=KMEANS + (
            "--resume", str(tmp_path / "agent.pth.tar"))))
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1] == f"error: --resume loads DDPG agent weights; expected --method ddpg " \
                      f"(got --method {method})"
    assert not os.path.exists(tmp_path / "mobilenetv2_mnist5k-run1")


def test_a_cache_that_is_not_the_scores_is_scored_again(tmp_path):
    """A sensitivity.json that is not JSON, has NaN, or holds another JSON type is ignored (None)."""
    from lib.allocate import load_scores
    expect = {"metric": "loss", "bits": [2, 3], "layers": ["a"], "requested_images": 10,
              "hessian_iters": None}
    path = tmp_path / "sensitivity.json"
    for text in ("[1, 2]", '"scores"', '{"metric": NaN}', "\x00\x01binary", "{"):
        path.write_text(text)
        assert load_scores(str(path), expect) is None, text


# ------------------------------------------------------------------ --method replay
def test_replay_plays_one_policy_every_episode(cli_assets, tmp_path):
    """The reward's noise: the same policy each episode, scored with a new fine-tune data order."""
    rl_quantize.main(cli(cli_assets, tmp_path / "src", "random", episodes=2, extra=KMEANS))
    source = os.path.join(folder_of(tmp_path / "src"), "strategy.json")
    policy = load_strategy(source)["strategy"]
    rl_quantize.main(cli(cli_assets, tmp_path / "rep", "replay", episodes=3,
                         extra=KMEANS + ("--policy", source)))
    rows = log_rows(folder_of(tmp_path / "rep"))
    assert [int(r[0]) for r in rows] == [0, 1, 2]
    assert all(json.loads(r[6]) == policy for r in rows)


def test_replay_refuses_a_policy_over_budget_or_without_policy(cli_assets, tmp_path, capsys):
    n = len(names("mobilenetv2", False))
    wide = tmp_path / "wide.json"
    wide.write_text(json.dumps({"mode": "kmeans", "strategy": [4] * n}))
    for extra, expect in ((("--policy", str(wide)), "costs 0.1250 of the reference size; "
                           "expected --preserve_ratio >= 0.1250"),
                          ((), "--policy goes with --method replay")):
        with pytest.raises(SystemExit):
            run_cli(rl_quantize.main, cli(cli_assets, tmp_path / "out", "replay",
                                          extra=("--arch", "mobilenetv2", "--max_bit", "4",
                                                 "--preserve_ratio", "0.1") + extra))
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and expect in err[0], err
    assert not os.path.exists(tmp_path / "out")


def test_replay_warns_when_the_policy_was_found_in_another_quantizer(caplog):
    """A replayed strategy records the quantizer it was searched with; a replay with other flags
    says which differ (it still runs: measuring a policy in another quantizer is allowed)."""
    from types import SimpleNamespace
    from lib.search.methods import warn_other_quantizer
    args = SimpleNamespace(linear_quantization=True, policy="p.json", per_channel=False,
                           weight_clip="max", fold_bn=False, bias_correction=False, kl_max_bit=0)
    found = {"quant_options": {"per_channel": True, "weight_clip": "max", "fold_bn": False,
                               "bias_correction": False}, "kl_max_bit": 4}
    with caplog.at_level("WARNING"):
        warn_other_quantizer(args, found)
    assert len(caplog.records) == 1
    message = caplog.records[0].getMessage()
    assert "per_channel True (here False)" in message and "kl_max_bit 4 (here 0)" in message
    caplog.clear()
    args.per_channel, args.kl_max_bit = True, 4
    with caplog.at_level("WARNING"):
        warn_other_quantizer(args, found)
        warn_other_quantizer(SimpleNamespace(**dict(vars(args), per_channel=False, kl_max_bit=0)),
                             {"strategy": []})     # an older file: the released quantizer
    assert not caplog.records


# ---------------------------------------------------------------- --channels_last
@pytest.mark.parametrize("mode", [KMEANS, LINEAR])
def test_channels_last_search_plays_the_same_episodes(cli_assets, tmp_path, mode, monkeypatch):
    """The same policies, and the same accuracies up to a convolution's rounding (a flipped
    image at most), with the model and batches channels-last."""
    formats, build = [], rl_quantize.build_model

    def spy(args, device):
        model, info = build(args, device)
        kernel = next(p for p in model.parameters() if p.dim() == 4 and p.shape[-1] > 1)
        formats.append(kernel.is_contiguous(memory_format=torch.channels_last)
                       and not kernel.is_contiguous())
        return model, info
    monkeypatch.setattr(rl_quantize, "build_model", spy)
    runs = {}
    for flag in ((), ("--channels_last",)):
        out = tmp_path / ("cl" if flag else "plain")
        best = rl_quantize.main(cli(cli_assets, out, "random", episodes=2, extra=mode + flag))
        runs[bool(flag)] = (log_rows(folder_of(out)), best)
    (plain, _), (strided, best) = runs[False], runs[True]
    assert [r[6] for r in strided] == [r[6] for r in plain]
    assert [float(r[2]) for r in strided] == pytest.approx([float(r[2]) for r in plain],
                                                           abs=100 / 32 + 1e-9)
    assert best["policy"] == json.loads(plain[best["episode"]][6])
    assert formats == [False, True]
