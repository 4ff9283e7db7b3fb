"""The fake quantization against a textbook reference, no host synchronisation on an
accelerator, one graph under torch.compile, and mixed precision in the search's fine-tune."""
import copy
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import rl_quantize
from lib.quantize import linear
from lib.quantize.linear import QConv2d, QLinear, fake_quantize, n_steps
from lib.quantize.policy import apply_linear_policy
from lib.utils.layers import quantizable_layers
from models import get_model


class ReferenceFakeQuant(torch.autograd.Function):
    """The textbook fake quantization, written independently of lib/quantize/linear.py.

    y = round(clamp(x, lo, r) / s) * s, s = r / steps, lo = -r (signed) or 0; r * sign(x) for
    steps == 0.  dL/dx = dL/dy inside (lo, r) and 0 outside (inputs) or dL/dy everywhere
    (weights, ``clip_grad`` False); dL/dr = sum over x > r minus sum over x < lo when signed.
    """

    @staticmethod
    def forward(ctx, x, r, steps, signed, clip_grad):
        r = r.detach().clamp(min=linear._MIN_RANGE).to(x.dtype)
        lo = -r if signed else torch.zeros_like(r)
        ctx.save_for_backward(x, r, lo)
        ctx.signed, ctx.clip_grad = signed, clip_grad
        if steps == 0:
            return torch.where(x >= 0, r, lo)
        scale = r / steps
        return torch.round(torch.clamp(x, lo, r) / scale) * scale

    @staticmethod
    def backward(ctx, grad):
        x, r, lo = ctx.saved_tensors
        zero = torch.zeros_like(grad)
        grad_x = torch.where((x > lo) & (x < r), grad, zero) if ctx.clip_grad else grad
        grad_r = torch.where(x > r, grad, zero).sum()
        if ctx.signed:
            grad_r = grad_r - torch.where(x < lo, grad, zero).sum()
        return grad_x, grad_r.reshape(1), None, None, None


def reference_fake_quantize(x, r, bits, signed, clip_grad=True):
    return ReferenceFakeQuant.apply(x, r, n_steps(bits, signed), signed, clip_grad)


def _grads(fn, x0, r0, g, bits, signed, clip_grad):
    x = x0.clone().requires_grad_()
    r = r0.clone().requires_grad_()
    y = fn(x, r, bits, signed, clip_grad)
    y.backward(g)
    return y.detach(), x.grad, r.grad


LAYOUTS = {
    "contiguous": lambda t: t,
    "channels_last": lambda t: t.contiguous(memory_format=torch.channels_last),
    "strided": lambda t: t.transpose(2, 3),
}


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
@pytest.mark.parametrize("bits,signed,clip_grad", [(4, False, True), (2, False, True),
                                                   (4, True, True), (3, True, True),
                                                   (1, True, True), (4, True, False)])
def test_fake_quantize_equals_the_reference(layout, bits, signed, clip_grad):
    """Outputs bit for bit, dL/dx bit for bit, dL/dr to float rounding (a sum), with values on
    the clip boundaries and beyond them, in every memory layout."""
    gen = torch.Generator().manual_seed(bits + 10 * signed)
    x0 = torch.rand(3, 8, 61, 67, generator=gen) * 9 - (4.5 if signed else 1.0)
    r0 = torch.tensor([3.0])
    flat = x0.view(-1)
    flat[::97] = 3.0                   # exactly r: no gradient to x nor to r
    flat[::89] = -3.0 if signed else 0.0
    x0, g = LAYOUTS[layout](x0), LAYOUTS[layout](torch.randn(x0.shape, generator=gen))
    got = _grads(fake_quantize, x0, r0, g, bits, signed, clip_grad)
    ref = _grads(reference_fake_quantize, x0, r0, g, bits, signed, clip_grad)
    assert torch.equal(got[0], ref[0])
    assert torch.equal(got[1], ref[1])
    torch.testing.assert_close(got[2], ref[2], rtol=1e-5, atol=1e-3)
    assert (got[2] != 0).all()


def _small_w4(arch):
    """A small quantized model at w4 (the image unquantized) with its inputs at 8 bits, half-wave
    ranges below, at and above 6 (so that PACT clips some inputs)."""
    torch.manual_seed(0)
    model = get_model(arch, num_classes=10, input_size=32, width_mult=0.25)
    layers = [m for _, m in quantizable_layers(model, linear=True)]
    # 8-bit inputs: at 4 bits this random-init model's signal dies in the deep layers
    apply_linear_policy(model, [[4, -1]] + [[4, 8]] * (len(layers) - 1))
    # not calibrated: the eval-mode ranges of a random-init model are far too small for the
    # train-mode step; inputs keep r = 6 or get one below, at or above it, weights take max|w|
    # at their first use
    with torch.no_grad():
        for i, m in enumerate(m for m in layers[1:] if m.half_wave):
            m.activation_range.fill_((6.0, 7.5, 0.7, 2.0)[i % 4])
    return model, torch.randn(4, 3, 32, 32), torch.randint(0, 10, (4,))


@pytest.mark.parametrize("arch", ["qmobilenetv2", "qmobilenet"])
def test_quantized_model_step_equals_reference(monkeypatch, arch):
    """A training step of a small Q model: loss, and the
    gradients of every weight and every activation_range, equal those of the same model run
    on the reference fake quantization; the PACT gradients of clipped inputs are not zero."""
    model, x, y = _small_w4(arch)
    n = len(quantizable_layers(model, linear=True))
    reference = copy.deepcopy(model)
    results = []
    for fn, net in ((fake_quantize, model), (reference_fake_quantize, reference)):
        monkeypatch.setattr(linear, "fake_quantize", fn)
        net.zero_grad(set_to_none=True)
        loss = F.cross_entropy(net(x), y)
        loss.backward()
        results.append((loss.detach(), {k: p.grad.clone() for k, p in net.named_parameters()
                                        if p.grad is not None}))
    (loss_got, got), (loss_ref, ref) = results
    assert torch.equal(loss_got, loss_ref)
    assert got.keys() == ref.keys()
    assert sum(k.endswith("activation_range") for k in got) == n - 1
    for k in got:
        torch.testing.assert_close(got[k], ref[k], rtol=1e-4, atol=1e-6, msg=k)
    assert ref["classifier.weight"].abs().sum() > 0
    clipped = [n for n, m in quantizable_layers(model, linear=True)
               if m.a_bit > 0 and float(m.activation_range.detach()) < 1]
    assert len(clipped) >= 5 and all(ref[f"{n}.activation_range"] != 0 for n in clipped)


def test_quantized_layers_never_read_a_tensor_to_the_host():
    """Forward and backward of every Q layer stay on the tensor's device: run on the meta
    device, where any .item()/float()/bool() of a tensor raises (checked here too)."""
    torch.manual_seed(0)
    model = get_model("qmobilenetv2", num_classes=10, input_size=32, width_mult=0.25).to("meta")
    n = len(quantizable_layers(model, linear=True))
    apply_linear_policy(model, [[4, -1]] + [[4, 4]] * (n - 2) + [[1, 2]])
    # never calibrated: the lazy weight-range init runs on the device too
    model(torch.empty(2, 3, 32, 32, device="meta")).sum().backward()
    layers = [m for m in model.modules() if isinstance(m, (QConv2d, QLinear))]
    assert all(m.weight.grad is not None for m in layers)
    assert all(m.activation_range.grad is not None for m in layers[1:])
    with pytest.raises((RuntimeError, NotImplementedError)):
        float(layers[1].activation_range.detach())


@pytest.mark.parametrize("half_wave", [True, False])
def test_quantized_layer_compiles_to_one_graph(half_wave):
    """torch.compile(fullgraph=True) of a quantized layer's forward and backward: no graph
    break (a host read would be one), and the values of the eager layer."""
    torch.manual_seed(0)
    layer = QConv2d(4, 6, 3, padding=1, w_bit=3, a_bit=4, half_wave=half_wave)
    x = torch.randn(2, 4, 8, 8) * 3
    eager = layer(x.clone().requires_grad_())
    compiled = torch.compile(layer, fullgraph=True, backend="eager")
    xc = x.clone().requires_grad_()
    out = compiled(xc)
    out.sum().backward()
    assert torch.equal(out, eager)
    assert xc.grad is not None and layer.activation_range.grad is not None


@pytest.mark.parametrize("flags,dtype", [([], torch.float32),
                                         (["--half", "--half_type", "bf16"], torch.bfloat16),
                                         (["--half"], torch.bfloat16)])
def test_search_finetune_runs_under_autocast_with_half(tiny_pretrained, tmp_path, flags, dtype):
    """rl_quantize --half: the episode's fine-tune and validation run the layers in the autocast
    dtype (bf16 on the CPU for O1, as finetune.py's --half), and the fine-tune still trains."""
    argv = ["--dataset", "mnist5k", "--width_mult", "0.25", "--pretrained_path",
            tiny_pretrained[0], "--train_size", "32", "--val_size", "32", "--data_bsize", "16",
            "--n_worker", "0", "--device", "cpu", "--output", str(tmp_path), "--arch",
            "qmobilenetv2", "--linear_quantization", "--cost", "latency",
            "--preserve_ratio", "0.5", "--min_bit", "5"] + flags
    args = rl_quantize.get_args_parser().parse_args(argv)
    rl_quantize.check_args(args)
    device = torch.device("cpu")
    loaders = rl_quantize.build_loaders(args)
    model, info = rl_quantize.build_model(args, device)
    env = rl_quantize.build_env(args, model, info, loaders, device)
    seen = {"train": set(), "eval": set()}
    layer = quantizable_layers(model)[3][1]
    layer.register_forward_hook(
        lambda m, i, o: seen["train" if m.training else "eval"].add(o.dtype))
    before = layer.weight.detach().clone()
    metrics = env.evaluator.finetune(model)
    assert seen == {"train": {dtype}, "eval": {dtype}}
    assert not torch.equal(before, layer.weight.detach())
    assert np.isfinite(metrics["loss"]) and not metrics["nonfinite"]
    assert not math.isnan(metrics["top1"])


def test_finetune_compile_trains_through_the_compiled_model(tiny_pretrained, tmp_path,
                                                            monkeypatch):
    """finetune.py --compile: the training steps run through torch.compile's module (here with
    the 'eager' backend, to keep the test short), and the checkpoint is the plain model's."""
    import json

    import finetune
    from lib.utils.checkpoint import load_checkpoint
    weights, model = tiny_pretrained
    names = [n for n, _ in quantizable_layers(model)]
    strategy = tmp_path / "linear.json"
    strategy.write_text(json.dumps({"mode": "linear", "layers": names,
                                    "strategy": [[8, -1]] + [[4, 4]] * (len(names) - 1)}))
    compiled = []
    real_compile = torch.compile

    def recording_compile(module, **kw):
        wrapped = real_compile(module, backend="eager", **kw)
        compiled.append(module)
        wrapped.register_forward_hook(lambda m, i, o: calls.append(o.shape))
        return wrapped

    calls = []
    monkeypatch.setattr(torch, "compile", recording_compile)
    out = str(tmp_path / "run")
    finetune.main(["--strategy", str(strategy), "--pretrained_path", weights, "-c", out,
                   "--epochs", "1", "--no-eval_fp32", "--compile", "--width_mult", "0.25",
                   "--device", "cpu", "--no-progress", "--train_subset", "32",
                   "--train_batch", "16", "--test_batch", "32"])
    assert len(compiled) == 1 and isinstance(compiled[0], torch.nn.Module)
    assert calls   # the training forward went through the compiled module
    sd = load_checkpoint(f"{out}/checkpoint.pth.tar")["state_dict"]
    assert set(sd) == set(compiled[0].state_dict())
    assert not any(k.startswith("_orig_mod") for k in sd)


def test_centroid_update_on_an_accelerator_never_reads_to_the_host():
    """The K-Means centroid-shared update on a non-CPU device: on the meta device any value read
    back (bincount sizing its output, a .cpu() of the centroids) raises; the update runs."""
    from lib.quantize.kmeans import CentroidSharer, Codebook, _cluster_sums
    flat = torch.empty(1000, device="meta")
    labels = torch.empty(1000, dtype=torch.uint8, device="meta")
    sums = _cluster_sums(flat, labels, 16)
    assert sums.device.type == "meta" and sums.shape == (16,) and sums.dtype == torch.float64
    cb = Codebook(torch.empty(16, device="meta"), labels, bits=4)
    CentroidSharer._update(flat, cb, torch.empty(16, dtype=torch.float64, device="meta"))
    assert cb.centroids.device.type == "meta"
    with pytest.raises((RuntimeError, NotImplementedError)):
        torch.bincount(labels.int(), weights=flat.double(), minlength=16)   # what it replaced
