"""lib/quantize/fused.py: a ReLU/ReLU6 read only by a half-wave quantized layer is skipped when
that layer's quantizer computes it, with the outputs and gradients of the unfused model."""
import copy

import pytest
import torch
import torch.nn.functional as F

from lib.quantize import linear
from lib.quantize.fused import (SkippableReLU, SkippableReLU6, fuse_input_activations,
                                unfuse_input_activations)
from lib.quantize.linear import calibrate, fake_quantize
from lib.quantize.policy import apply_linear_policy
from lib.utils.layers import quantizable_layers
from models import get_model
from tests.test_speed import reference_fake_quantize

SKIPPABLE = (SkippableReLU, SkippableReLU6)


def unfused(model):
    """A copy of ``model`` with plain activations: the straightforward implementation."""
    model = copy.deepcopy(model)
    unfuse_input_activations(model)
    return model


def quantized(arch, seed=0):
    """A small w4a8 model with half-wave input ranges below, at and above 6."""
    torch.manual_seed(seed)
    model = get_model(arch, num_classes=10, input_size=32, width_mult=0.25)
    layers = [m for _, m in quantizable_layers(model, linear=True)]
    # 8-bit inputs: at 4 bits this random-init model's signal dies in the deep layers
    apply_linear_policy(model, [[4, -1]] + [[4, 8]] * (len(layers) - 1))
    x = torch.randn(4, 3, 32, 32)
    # not calibrated: the eval-mode ranges of a random-init model are far too small for the
    # train-mode steps below; inputs keep r = 6, weights take max|w| at their first use
    with torch.no_grad():
        for i, m in enumerate(m for m in layers[1:] if m.half_wave):
            if i % 4 == 1:
                m.activation_range.fill_(6.0)     # the ReLU6's own top: dL/dr must stay 0
            elif i % 4 == 2:
                m.activation_range.fill_(7.5)     # above it: the ReLU6 runs
            elif i % 4 == 3:
                m.activation_range.fill_(0.7)     # well inside: most inputs clipped
    return model, x, torch.randint(0, 10, (4,))


def step(model, x, y):
    model.train()
    model.zero_grad(set_to_none=True)
    loss = F.cross_entropy(model(x), y)
    loss.backward()
    return loss.detach(), {k: p.grad.clone() for k, p in model.named_parameters()
                           if p.grad is not None}


@pytest.mark.parametrize("arch,expect", [("qmobilenetv2", 33), ("qmobilenet", 13)])
def test_fusion_is_wired_and_keeps_the_module_tree(arch, expect):
    model = get_model(arch, num_classes=10, input_size=32, width_mult=0.25)
    plain = unfused(model)
    assert sum(isinstance(m, SKIPPABLE) for m in model.modules()) == expect
    assert [n for n, _ in model.named_modules()] == [n for n, _ in plain.named_modules()]
    assert model.state_dict().keys() == plain.state_dict().keys()
    assert fuse_input_activations(plain) == expect          # what the model's constructor ran
    float_twin = get_model(arch[1:], num_classes=10, input_size=32, width_mult=0.25)
    assert not any(isinstance(m, SKIPPABLE) for m in float_twin.modules())


@pytest.mark.parametrize("arch", ["qmobilenetv2", "qmobilenet"])
@pytest.mark.parametrize("host", [True, False])
def test_fused_step_equals_the_unfused_reference(monkeypatch, arch, host):
    """Loss bit for bit, every weight's and every activation_range's gradient to float
    rounding, against the unfused model on the reference fake quantization; on the CPU
    path (activations skipped) and on the accelerator's tensor path (never skipped)."""
    model, x, y = quantized(arch)
    reference = unfused(model)
    monkeypatch.setattr(linear, "_host_scalars", lambda t: host)
    loss_fast, fast = step(model, x, y)
    monkeypatch.setattr(linear, "fake_quantize", reference_fake_quantize)
    loss_ref, ref = step(reference, x, y)
    assert torch.equal(loss_fast, loss_ref)
    assert fast.keys() == ref.keys()
    for k in fast:
        torch.testing.assert_close(fast[k], ref[k], rtol=1e-4, atol=1e-6, msg=k)
    # the comparison is not vacuous: the signal reaches the classifier, PACT gradients flow
    assert ref["classifier.weight"].abs().sum() > 0
    clipped = [n for n, m in quantizable_layers(model, linear=True)
               if m.a_bit > 0 and float(m.activation_range.detach()) < 1]
    assert len(clipped) >= 5 and all(ref[f"{n}.activation_range"] != 0 for n in clipped)


def test_skipped_only_when_the_reader_computes_it():
    model, x, _ = quantized("qmobilenetv2")
    act = next(m for m in model.modules() if isinstance(m, SkippableReLU6))
    reader = act._reader[0]
    seen = []
    act.register_forward_hook(lambda mod, inp, out: seen.append(float(out.min())))

    def skipped(r=None, a_bit=4):
        reader.set_bits(a_bit=a_bit)
        if r is not None:
            with torch.no_grad():
                reader.activation_range.fill_(r)
        seen.clear()
        with torch.no_grad():
            model.eval()(x)
        return seen[0] < 0          # a negative output: the ReLU6 did not run

    assert skipped(r=2.0) and skipped(r=6.0)
    assert not skipped(r=6.5)                 # the clip would not cap at 6
    assert not skipped(r=2.0, a_bit=-1)       # float input: the ReLU6 is needed
    reader.set_bits(a_bit=4)
    calibrate(model, x)                       # ranges are measured after the activation
    assert float(reader.activation_range.detach()) <= 6.0
    assert reader.absorbs_input_activation(x)
    assert not reader.absorbs_input_activation(torch.empty(1, device="meta"))


def test_fused_cap_zeroes_the_range_gradient_only_at_and_above_it():
    x = torch.tensor([-1.0, 0.5, 3.0, 7.0])
    for r, expect in ((6.0, 0.0), (6.5, 0.0), (2.0, 2.0)):
        rr = torch.tensor([r], requires_grad=True)
        fake_quantize(x, rr, 4, signed=False, cap=6.0).sum().backward()
        assert rr.grad is not None and float(rr.grad) == expect   # a zero, not None (weight decay)
