"""Linear fake quantization as released (issue 11, items 1-3): the weight STE, fixed stored
weight ranges, and the released divergence rule behind ``kl_max_bit``."""
import copy
import json
import math

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from lib.quantize import linear
from lib.quantize.linear import QConv2d, QLinear, calibrate, fake_quantize, kl_clip
from lib.utils.layers import quantizable_layers


def hand_fake_quant(w, t, bits):
    """Symmetric fake quantization of ``w`` on [-t, t] with 2^(bits-1) - 1 steps, by hand."""
    scale = t / (2 ** (bits - 1) - 1)
    return torch.round(torch.clamp(w, -t, t) / scale) * scale


def _conv(w_bit=4, seed=0):
    torch.manual_seed(seed)
    return QConv2d(4, 6, 3, padding=1, w_bit=w_bit, a_bit=-1)


# --------------------------------------------------------------------------- item 1: weight STE


@pytest.mark.parametrize("range_factor", [None, 0.5])
def test_every_weight_gets_its_straight_through_gradient(range_factor):
    """dL/dw = dL/dw_q for every weight: the argmax of |w| too, and weights beyond a stored
    range smaller than max|w| (the release's STE passes them all)."""
    layer = _conv()
    w = layer.weight.detach()
    if range_factor is not None:
        layer.weight_range.fill_(range_factor * w.abs().max())
    torch.manual_seed(1)
    x, g = torch.randn(2, 4, 5, 5), torch.randn(2, 6, 5, 5)
    (layer(x) * g).sum().backward()
    t = w.abs().max().item() * (range_factor or 1.0)
    wq = hand_fake_quant(w, t, 4).requires_grad_()
    (F.conv2d(x, wq, layer.bias.detach(), padding=1) * g).sum().backward()
    torch.testing.assert_close(layer.weight.grad, wq.grad)
    assert (layer.weight.grad != 0).all()
    top = w.abs().argmax()
    assert layer.weight.grad.flatten()[top] != 0
    if range_factor is not None:
        assert (w.abs() > t).sum() > 0   # some weights are clipped, and still train


def test_activation_ste_still_masks_and_weight_mode_does_not():
    x = torch.tensor([-1.0, 0.5, 3.0], requires_grad=True)
    r = torch.tensor([2.0])
    fake_quantize(x, r, 3, signed=True, clip_grad=False).backward(torch.ones(3))
    assert torch.equal(x.grad, torch.ones(3))
    x.grad = None
    fake_quantize(x, r, 3, signed=False).backward(torch.ones(3))
    assert torch.equal(x.grad, torch.tensor([0.0, 1.0, 0.0]))


# --------------------------------------------------------------------------- item 2: stored range


@pytest.mark.parametrize("w_bit", [4, 6, 8])
def test_stored_weight_range_below_max_is_the_one_used(w_bit):
    """A range loaded from a state_dict (here half of max|w|) decides the forward at any width."""
    layer = _conv(w_bit)
    sd = layer.state_dict()
    t = 0.5 * layer.weight.abs().max().item()
    sd["weight_range"] = torch.tensor([t])
    fresh = _conv(w_bit, seed=3)
    fresh.load_state_dict(sd)
    x = torch.randn(2, 4, 5, 5)
    expected = F.conv2d(x, hand_fake_quant(sd["weight"], t, w_bit), sd["bias"], padding=1)
    torch.testing.assert_close(fresh(x), expected)
    assert fresh.weight_range.item() == pytest.approx(t)


def test_weight_range_is_fixed_at_calibration_for_the_whole_fine_tune():
    torch.manual_seed(0)
    model = nn.Sequential(QConv2d(3, 8, 3, w_bit=5, a_bit=5, half_wave=False), nn.ReLU(),
                          nn.Flatten(), QLinear(8 * 6 * 6, 4, w_bit=5, a_bit=5))
    data = torch.randn(16, 3, 8, 8)
    calibrate(model, data)
    ranges = [m.weight_range.clone() for m in (model[0], model[3])]
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    for _ in range(3):
        opt.zero_grad()
        model(data).pow(2).sum().backward()
        opt.step()
    for m, r in zip((model[0], model[3]), ranges):
        assert torch.equal(m.weight_range, r)
        assert m.weight.abs().max() > r   # the weights grew past it; the clip did not follow
        x = torch.randn(2, 3, 8, 8) if m is model[0] else torch.rand(2, 8 * 6 * 6)
        m.set_bits(a_bit=-1)
        ref = (F.conv2d(x, hand_fake_quant(m.weight.detach(), r.item(), 5), m.bias)
               if m is model[0] else F.linear(x, hand_fake_quant(m.weight.detach(), r.item(), 5), m.bias))
        torch.testing.assert_close(m(x), ref)


def test_uncalibrated_layer_takes_max_abs_weight_once():
    """No calibration: the first quantized forward stores max|w| (released lazy init), then it stays."""
    layer = _conv(4)
    assert layer.weight_range.item() < 0
    x = torch.randn(1, 4, 5, 5)
    layer(x)
    first = layer.weight.abs().max().item()
    assert layer.weight_range.item() == pytest.approx(first)
    with torch.no_grad():
        layer.weight.mul_(3.0)
    out = layer(x)
    assert layer.weight_range.item() == pytest.approx(first)
    ref = F.conv2d(x, hand_fake_quant(layer.weight.detach(), first, 4), layer.bias, padding=1)
    torch.testing.assert_close(out, ref)


# --------------------------------------------------------------------------- item 3: the rule


def _released_rule_by_hand(values, bits):
    """The released threshold rule evaluated literally, one candidate at a time, in plain Python."""
    v = [abs(float(a)) for a in values]
    top, low = max(v), min(v)
    bins = math.ceil(top / ((top - low) / math.sqrt(len(v))))   # numpy's 'sqrt' bin count
    width = top / bins
    counts = [0] * bins
    for a in v:
        counts[min(int(a / width), bins - 1)] += 1
    cdf, total = [], 0
    for c in counts:
        total += c
        cdf.append(total / len(v))
    n = 2 ** (bits - 1)

    def lerp(seq, pos):   # linear interpolation of seq at a fractional index
        k = min(int(pos), len(seq) - 2)
        return seq[k] + (pos - k) * (seq[k + 1] - seq[k])

    best = None
    for i in range(n + 1, bins + 1):
        p = cdf[:i - 1] + [1.0]
        coarse = [lerp(p, k * (i - 1) / (n - 1)) for k in range(n)]
        q = [lerp(coarse, j * (n - 1) / (i - 1)) for j in range(i)] + [1.0] * (bins - i)
        div = 0.0
        for c, qq in zip(cdf, q):
            if c != qq:
                div += (c - qq) * (math.log2(c) - math.log2(qq)) if c > 0 else math.inf
        if best is None or div < best[0]:
            best = (div, i)
    return (best[1] + 0.5) * width


@pytest.mark.parametrize("kind", ["laplace_outliers", "relu_gauss", "uniform"])
@pytest.mark.parametrize("bits", [2, 3, 4])
def test_kl_clip_is_the_released_rule(kind, bits):
    rng = np.random.default_rng(bits)
    if kind == "laplace_outliers":   # weight-like: long tail plus a few outliers
        x = np.concatenate([rng.laplace(0, 0.05, 3000), [0.9, -1.1, 1.3]])
    elif kind == "relu_gauss":       # a post-ReLU input: half of it exact zeros
        x = np.maximum(rng.normal(0, 1, 4000), 0)
    else:
        x = rng.uniform(-2, 2, 2500)
    t = kl_clip(torch.tensor(x, dtype=torch.float32), bits)
    assert t == pytest.approx(_released_rule_by_hand(np.float32(x), bits), rel=1e-6)


def test_kl_clip_cuts_outliers_and_keeps_a_flat_range():
    torch.manual_seed(0)
    x = torch.randn(20000)
    x[:5] = 40.0
    for bits in (2, 3, 4):
        assert 0 < kl_clip(x, bits) < 5
    flat = torch.rand(100000) * 6
    assert kl_clip(flat, 4) == pytest.approx(6.0, abs=0.02)   # nothing to cut
    assert kl_clip(torch.zeros(10), 4) == 0


def test_calibrate_applies_the_rule_by_width_to_float_inputs():
    """Weights of <= kl_max_bit bits and inputs of <= kl_max_bit magnitude bits (a - 1 for a
    full-wave input, as released) get kl_clip; every layer sees the float model's input."""
    torch.manual_seed(0)
    model = nn.Sequential(QConv2d(3, 8, 3, padding=1, half_wave=False), nn.ReLU(),
                          QConv2d(8, 8, 3, padding=1), nn.ReLU(),
                          nn.Flatten(), QLinear(8 * 8 * 8, 10))
    data = torch.randn(32, 3, 8, 8) * 3
    inputs = {}

    def keep_input(module, args, _):
        inputs[module] = args[0].detach()

    hooks = [m.register_forward_hook(keep_input) for m in (model[0], model[2], model[5])]
    model(data)   # all layers float: the inputs calibration must see
    for h in hooks:
        h.remove()
    for m, (w, a) in zip((model[0], model[2], model[5]), [(4, 5), (3, 4), (6, 6)]):
        m.set_bits(w, a)
    calibrate(model, data, kl_max_bit=4)
    first, mid, last = model[0], model[2], model[5]
    assert first.weight_range.item() == pytest.approx(kl_clip(first.weight, 4))
    assert mid.weight_range.item() == pytest.approx(kl_clip(mid.weight, 3))
    assert last.weight_range.item() == pytest.approx(last.weight.abs().max().item())
    x0, x1, x2 = inputs[first], inputs[mid], inputs[last]
    assert first.activation_range.item() == pytest.approx(
        min(6.0, x0.abs().max().item(), kl_clip(x0, 4)))       # a = 5, full-wave: 4 bits
    assert mid.activation_range.item() == pytest.approx(min(6.0, x1.max().item(), kl_clip(x1, 4)))
    assert last.activation_range.item() == pytest.approx(min(6.0, x2.max().item()))
    calibrate(model, data, kl_max_bit=0)
    assert mid.weight_range.item() == pytest.approx(mid.weight.abs().max().item())
    assert mid.activation_range.item() == pytest.approx(min(6.0, x1.max().item()))


# --------------------------------------------------------------------------- finetune.py


def test_finetune_checkpoint_evaluates_with_its_stored_ranges(tmp_path, tiny_pretrained):
    """-e --resume uses the checkpoint's weight ranges, here cut below max|w| (a 4-bit layer and
    the 8-bit classifier); the rule that set them is recorded in the checkpoint and results.json."""
    import finetune
    from lib.utils.checkpoint import load_checkpoint, save_checkpoint
    weights, float_model = tiny_pretrained
    names = [n for n, _ in quantizable_layers(float_model)]
    policy = tmp_path / "policy.json"
    policy.write_text(json.dumps({"mode": "linear", "layers": names, "strategy":
                                  [[8, -1]] + [[4, 4]] * (len(names) - 2) + [[8, 8]]}))
    out = tmp_path / "run"
    res = finetune.main(["--strategy", str(policy), "--pretrained_path", weights, "-c", str(out),
                         "--epochs", "1", "--no-eval_fp32", "--kl_max_bit", "4", "--width_mult",
                         "0.25", "--train_subset", "32", "--train_batch", "16", "--test_batch",
                         "32", "--device", "cpu", "--no-progress"])
    ck = load_checkpoint(str(out / "checkpoint.pth.tar"))
    assert res["kl_max_bit"] == ck["kl_max_bit"] == 4
    assert json.loads((out / "results.json").read_text())["kl_max_bit"] == 4
    sd = ck["state_dict"]
    for name in (names[1], names[-1]):
        sd[name + ".weight_range"] = 0.5 * sd[name + ".weight"].abs().max().reshape(1)
    edited = str(tmp_path / "edited.pth.tar")
    save_checkpoint(ck, edited)

    args = finetune.get_args_parser().parse_args(["-e", "--resume", edited, "--device", "cpu",
                                                  "--no-progress", "--test_batch", "32"])
    run = finetune.Finetune(args, finetune.resolve_setup(args), torch.device("cpu"), 0)
    run.prepare_resumed()   # what -e --resume evaluates
    reference = copy.deepcopy(run.model)
    for name, m in quantizable_layers(reference, linear=True):
        t = float(sd[name + ".weight_range"])
        with torch.no_grad():
            m.weight.copy_(hand_fake_quant(sd[name + ".weight"], t, m.w_bit))
        m.set_bits(w_bit=-1)
    run.model.eval()
    reference.eval()
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(run.model(x), reference(x))
    layers = dict(quantizable_layers(run.model, linear=True))
    assert layers[names[1]].weight_range.item() < layers[names[1]].weight.abs().max().item()
    assert run.kl_max_bit == 4


# --------------------------------------------------------------------------- the search env


class RangeRecorder:
    """Search evaluator stub: records each layer's ranges when the fine-tune starts, then trains
    (here: moves every weight) and checks the weight ranges did not follow."""

    def __init__(self):
        self.seen = []

    def validate(self, model):
        return {"top1": 50.0, "top5": 90.0, "loss": 1.0}

    def finetune(self, model, step_hook=None):
        layers = quantizable_layers(model, linear=True)
        ranges = {n: (m.weight_range.item(), m.activation_range.item()) for n, m in layers}
        with torch.no_grad():
            for _, m in layers:
                m.weight.mul_(2.0)
        model(torch.randn(2, 3, 32, 32))
        assert all(m.weight_range.item() == ranges[n][0] for n, m in layers)
        self.seen.append(ranges)
        return {"top1": 50.0, "top5": 90.0, "loss": 1.0, "nonfinite": False}


def test_search_env_calibrates_every_episode():
    """Each episode starts from the pretrained weights and sets every range by calibration."""
    from lib.env import EnvConfig, LinearQuantizeEnv
    from lib.quantize.policy import apply_linear_policy
    from lib.simulator.costs import TableCost
    from models import get_model
    torch.manual_seed(0)
    model = get_model("qmobilenetv2", num_classes=10, input_size=32, width_mult=0.25)
    pretrained = copy.deepcopy(model.state_dict())
    table = np.ones((53, 8, 8))
    calib = [(torch.randn(4, 3, 32, 32), torch.zeros(4, dtype=torch.long))]
    recorder = RangeRecorder()
    env = LinearQuantizeEnv(model, recorder, EnvConfig(preserve_ratio=0.5, input_size=32),
                            TableCost(table), calib, torch.device("cpu"))
    policies = [[[8, -1]] + [[4, 4]] * 51 + [[8, 8]], [[8, -1]] + [[6, 3]] * 51 + [[8, 8]]]
    for policy in policies:
        env.evaluate_policy(policy)
        ref = get_model("qmobilenetv2", num_classes=10, input_size=32, width_mult=0.25)
        ref.load_state_dict(pretrained)
        apply_linear_policy(ref, policy)
        calibrate(ref, calib)
        expected = {n: (m.weight_range.item(), m.activation_range.item())
                    for n, m in quantizable_layers(ref, linear=True)}
        assert recorder.seen[-1] == pytest.approx(expected)
        assert all(w > 0 for w, _ in recorder.seen[-1].values())


def test_search_env_reuses_calibration_with_the_same_ranges_and_random_stream(monkeypatch):
    """Calibrating once per search (the default) gives every episode the ranges, and the later
    random draws, of calibrating every episode; the forward pass runs once; a policy whose
    widths take the divergence clip (calibration_key) is calibrated again."""
    from lib.env import EnvConfig, LinearQuantizeEnv
    from lib.env import linear_env as linear_env_module
    from lib.simulator.costs import TableCost
    from models import get_model
    calls = []
    real = linear_env_module.calibrate
    monkeypatch.setattr(linear_env_module, "calibrate",
                        lambda *a, **k: calls.append(1) or real(*a, **k))
    data = torch.utils.data.TensorDataset(torch.randn(8, 3, 32, 32),
                                          torch.zeros(8, dtype=torch.long))
    policies = [[[8, -1]] + [[4, 4]] * 51 + [[8, 8]], [[8, -1]] + [[6, 3]] * 51 + [[8, 8]],
                [[8, -1]] + [[2, 5]] * 51 + [[8, 8]]]
    seen, draws = {}, {}
    for reuse in (True, False):
        torch.manual_seed(0)
        model = get_model("qmobilenetv2", num_classes=10, input_size=32, width_mult=0.25)
        calib = torch.utils.data.DataLoader(data, batch_size=4, shuffle=False)
        recorder = RangeRecorder()
        env = LinearQuantizeEnv(model, recorder, EnvConfig(preserve_ratio=0.5, input_size=32),
                                TableCost(np.ones((53, 8, 8))), calib, torch.device("cpu"),
                                reuse_calibration=reuse)
        calls.clear()
        for policy in policies:
            env.evaluate_policy(policy)
        seen[reuse], draws[reuse] = recorder.seen, torch.rand(4)
        assert len(calls) == (1 if reuse else 3)
    assert seen[True] == seen[False]
    assert torch.equal(draws[True], draws[False])
    layer = linear.quant_layers(model)[5]
    key = linear.calibration_key(model, kl_max_bit=4)
    assert linear.calibration_key(model, 0) == ((0, 0),) * 53
    layer.set_bits(w_bit=5 if layer.w_bit <= 4 else 4)   # crosses kl_max_bit 4: another clip
    assert linear.calibration_key(model, kl_max_bit=4) != key
    keys = iter(range(4))
    monkeypatch.setattr(linear_env_module, "calibration_key", lambda m, *a: next(keys))
    env.reuse_calibration = True
    calls.clear()
    for policy in policies:
        env.evaluate_policy(policy)
    assert len(calls) == 3   # the key changed every episode
    env.calibrate()          # called directly (weights maybe not the pretrained ones): always runs
    assert len(calls) == 4


def test_negative_kl_max_bit_is_a_one_line_error(capsys):
    import finetune
    from lib.utils.errors import run_cli
    with pytest.raises(SystemExit) as exit_info:
        run_cli(finetune.main, ["--strategy", "mobilenetv2_linear_0.6", "--kl_max_bit", "-1",
                                "--device", "cpu"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: ") and "--kl_max_bit" in err[-1]
    assert "expected an integer in [0, 8]" in err[-1]
    assert "Traceback" not in "\n".join(err)
