"""One compiled graph for every policy (issue 30): torch.compile of the fake-quantized layers
equals the eager layers, a new policy reuses the compiled graph, and the search and
finetune.py run through the compiled model with a fixed number of graphs.

Compiling on this CPU takes minutes cold, so the inductor tests are ``slow``; the search
test uses dynamo's ``eager`` backend: the graphs and recompilations it counts are dynamo's,
whichever backend then compiles them.
"""
import random

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch._dynamo.utils import counters

import rl_quantize
from helpers import tiny_search_argv
from lib.quantize.linear import QConv2d, QLinear, calibrate, quant_layers

# Compiled against eager: inductor may evaluate x / scale in a different order of float
# operations, which can move a value lying within rounding error of a grid midpoint to the
# neighbouring grid point.  Allowed: outputs and gradients equal to 1e-5 relative, 1e-6
# absolute, except at most 0.1% of the entries of each tensor (those midpoint flips).
RTOL, ATOL, FLIP_SHARE = 1e-5, 1e-6, 1e-3


class TinyQ(nn.Module):
    """A signed (full-wave) input, a half-wave conv input and a half-wave linear input."""

    def __init__(self):
        super().__init__()
        self.conv1 = QConv2d(3, 8, 3, padding=1, half_wave=False)
        self.conv2 = QConv2d(8, 8, 3, padding=1)
        self.fc = QLinear(8, 5)

    def forward(self, x):
        x = F.relu(self.conv2(F.relu(self.conv1(x))))
        return self.fc(x.mean((2, 3)))


def _graphs():
    return counters["stats"]["unique_graphs"]


def _step(model, x, y=None):
    """Output, input gradient and every parameter's gradient of one forward + backward (loss:
    cross-entropy against ``y``, or without it the sum of squares)."""
    model.zero_grad(set_to_none=True)
    x = x.clone().requires_grad_()
    out = model(x)
    (F.cross_entropy(out, y) if y is not None else out.square().sum()).backward()
    grads = {n.removeprefix("_orig_mod."): p.grad.clone() for n, p in model.named_parameters()
             if p.grad is not None}
    return out.detach(), x.grad, grads


def _assert_close(got, want, what):
    bad = ~torch.isclose(got, want, rtol=RTOL, atol=ATOL)
    assert bad.float().mean().item() <= FLIP_SHARE, (what, (got - want).abs().max())


def _policies(n_layers, count, seed):
    rng = random.Random(seed)
    fixed = [[(1, 1)] * n_layers, [(8, 8)] * n_layers, [(2, 1), (1, 2), (3, 3)]]
    drawn = [[(rng.randint(1, 8), rng.randint(1, 8)) for _ in range(n_layers)]
             for _ in range(count - len(fixed))]
    return fixed + drawn


@pytest.mark.slow
def test_compiled_quantizers_equal_eager_and_one_graph_serves_every_policy():
    """Ten policies (1 to 8 bits, signed and unsigned grids, weights and PACT inputs) through
    one inductor graph: outputs, input gradients, weight and range gradients equal the eager
    model's; switching quantizers off costs one more graph, after which the model computes
    what the eager one does."""
    torch.manual_seed(0)
    model = TinyQ()
    x, y = torch.randn(4, 3, 8, 8) * 2, torch.randint(0, 5, (4,))
    for m in quant_layers(model):
        m.set_bits(4, 4)
    calibrate(model, x)
    compiled = torch.compile(model)
    before = _graphs()
    for policy in _policies(3, 10, seed=1):
        for m, (w, a) in zip(quant_layers(model), policy):
            m.set_bits(w, a)
        want, got = _step(model, x, y), _step(compiled, x, y)
        _assert_close(got[0], want[0], f"output {policy}")
        _assert_close(got[1], want[1], f"input grad {policy}")
        assert got[2].keys() == want[2].keys() and len(got[2]) == 9   # 3 weights, biases, ranges
        for name in want[2]:
            _assert_close(got[2][name], want[2][name], f"{name} grad {policy}")
    assert _graphs() - before == 1
    model.conv1.set_bits(-1, -1)
    want, got = _step(model, x, y), _step(compiled, x, y)
    _assert_close(got[0], want[0], "output, conv1 off")
    assert "conv1.activation_range" not in got[2]
    assert _graphs() - before == 2


@pytest.mark.slow
@pytest.mark.parametrize("cls,float_cls,args,shape", [
    (QConv2d, nn.Conv2d, (4, 6, 3), (2, 4, 7, 7)), (QLinear, nn.Linear, (5, 3), (4, 5))])
def test_compiled_unquantized_layer_is_the_compiled_float_layer(cls, float_cls, args, shape):
    """Bits -1/-1 under torch.compile: the float layer's outputs and gradients, bit for bit,
    after the layer has been quantized (and compiled so) once."""
    torch.manual_seed(0)
    q, f = cls(*args, w_bit=3, a_bit=3), float_cls(*args)
    q.load_state_dict(f.state_dict(), strict=False)
    x = torch.randn(*shape) * 5
    cq, cf = torch.compile(q), torch.compile(f)
    _step(cq, x)
    q.set_bits(-1, -1)
    for x_in in (x, x * 0.1):
        (out_q, gx_q, g_q), (out_f, gx_f, g_f) = (_step(m, x_in) for m in (cq, cf))
        assert torch.equal(out_q, out_f) and torch.equal(gx_q, gx_f)
        assert g_q.keys() == g_f.keys() == {"weight", "bias"}
        assert all(torch.equal(g_q[k], g_f[k]) for k in g_q)


def test_bit_widths_are_tensors_outside_the_state_dict():
    """The widths the forward pass reads are integer buffers on the layer's device that follow
    set_bits; they stay out of the state_dict (the released entries only), so checkpoints
    written before them load, and a float cast leaves them integers."""
    layer = QConv2d(3, 4, 3, w_bit=5, a_bit=-1)
    assert set(layer.state_dict()) == {"weight", "bias", "activation_range", "weight_range"}
    assert layer.w_bit_tensor.dtype == torch.long and int(layer.w_bit_tensor) == 5
    assert layer.w_quantized and not layer.a_quantized
    layer.set_bits(a_bit=2)
    assert int(layer.a_bit_tensor) == 2 and layer.a_quantized and int(layer.w_bit_tensor) == 5
    layer.double()
    assert layer.w_bit_tensor.dtype == torch.long and layer.weight.dtype == torch.float64
    old = {k: v for k, v in layer.state_dict().items()}
    fresh = QConv2d(3, 4, 3, w_bit=5, a_bit=2).double()
    assert not fresh.load_state_dict(old, strict=True).missing_keys


@pytest.mark.slow
def test_search_with_compile_keeps_a_fixed_number_of_graphs(tiny_pretrained, tmp_path,
                                                            monkeypatch):
    """A 10-episode linear search with --compile, a new random policy every episode: three
    graphs in all (the float model's reference validation, the fine-tune, the validation of
    quantized models), none per episode; the policies did differ."""
    real_compile = torch.compile
    compiled = []

    def eager_backend_compile(module, **kw):
        compiled.append(module)
        return real_compile(module, backend="eager", **kw)

    monkeypatch.setattr(torch, "compile", eager_backend_compile)
    seen = set()
    real_set_bits = QConv2d.set_bits

    def recording_set_bits(self, w_bit=None, a_bit=None):
        seen.add((w_bit, a_bit))
        return real_set_bits(self, w_bit, a_bit)

    monkeypatch.setattr(QConv2d, "set_bits", recording_set_bits)
    torch._dynamo.reset()
    counters.clear()
    argv = tiny_search_argv(tiny_pretrained[0], tmp_path, 10) + [
        "--linear_quantization", "--arch", "qmobilenetv2", "--cost", "latency",
        "--preserve_ratio", "0.5", "--min_bit", "2", "--max_bit", "8", "--compile",
        "--device", "cpu"]
    rl_quantize.main(argv)
    assert len(compiled) == 1 and len(seen) > 20
    assert counters["frames"]["ok"] == _graphs() == 3


@pytest.mark.slow
def test_finetune_compile_makes_one_graph_for_all_epochs(tiny_pretrained, tmp_path, monkeypatch):
    """finetune.py --compile over two epochs of a linear policy: one training graph in all
    (validation runs the plain model)."""
    import json

    import finetune
    from lib.utils.layers import quantizable_layers
    real_compile = torch.compile
    monkeypatch.setattr(torch, "compile",
                        lambda module, **kw: real_compile(module, backend="eager", **kw))
    names = [n for n, _ in quantizable_layers(tiny_pretrained[1])]
    strategy = tmp_path / "linear.json"
    strategy.write_text(json.dumps({"mode": "linear", "layers": names,
                                    "strategy": [[8, -1]] + [[3, 5]] * (len(names) - 1)}))
    torch._dynamo.reset()
    counters.clear()
    finetune.main(["--strategy", str(strategy), "--pretrained_path", tiny_pretrained[0], "-c",
                   str(tmp_path / "run"), "--epochs", "2", "--no-eval_fp32", "--compile",
                   "--width_mult", "0.25", "--device", "cpu", "--no-progress", "--train_subset",
                   "32", "--train_batch", "16", "--test_batch", "32"])
    assert counters["frames"]["ok"] == _graphs() == 1


def test_a_range_per_channel_quantizes_each_channel_on_its_own_range():
    """A range of shape [1, C, 1, 1] (or any shape that broadcasts against x): each channel is
    quantized as with its own range [1], and the range gradient has the range's shape, each
    entry that channel's PACT gradient."""
    from lib.quantize.linear import fake_quantize
    torch.manual_seed(0)
    x = torch.randn(2, 3, 5, 5) * 3
    g = torch.randn(x.shape)
    r = torch.tensor([0.5, 1.5, 4.0]).reshape(1, 3, 1, 1).requires_grad_()
    xg = x.clone().requires_grad_()
    y = fake_quantize(xg, r, torch.tensor(3), signed=True)
    y.backward(g)
    assert r.grad.shape == r.shape
    for c in range(3):
        rc = r.detach()[0, c].reshape(1).clone().requires_grad_()
        xc = x[:, c].clone().requires_grad_()
        yc = fake_quantize(xc, rc, 3, signed=True)
        yc.backward(g[:, c])
        assert torch.equal(y[:, c], yc) and torch.equal(xg.grad[:, c], xc.grad)
        torch.testing.assert_close(r.grad[0, c].reshape(1), rc.grad, rtol=1e-5, atol=1e-5)
        assert rc.grad.abs().item() > 0
