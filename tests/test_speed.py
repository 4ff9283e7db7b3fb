"""Issue 17: the fast fake-quantization paths against a straightforward reference, no host
synchronisation on an accelerator, and mixed precision in the search's fine-tune."""
import copy
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import rl_quantize
from lib.quantize import fake_quant_jit, linear
from lib.quantize.fused import unfuse_input_activations
from lib.quantize.linear import QConv2d, QLinear, calibrate, fake_quantize, n_steps
from lib.quantize.policy import apply_linear_policy
from lib.utils.layers import quantizable_layers
from models import get_model


class ReferenceFakeQuant(torch.autograd.Function):
    """The textbook fake quantization the fast one must reproduce (DESIGN.md section 4).

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


def reference_fake_quantize(x, r, bits, signed, clip_grad=True, cap=math.inf):
    """The reference; ``cap`` is ignored (it runs on unfused models, whose inputs never exceed it)."""
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


@pytest.mark.parametrize("compiled", [True, False])
@pytest.mark.parametrize("block", [None, 4096])
@pytest.mark.parametrize("layout", sorted(LAYOUTS))
@pytest.mark.parametrize("bits,signed,clip_grad", [(4, False, True), (2, False, True),
                                                   (4, True, True), (3, True, True),
                                                   (1, True, True), (4, True, False)])
def test_fast_fake_quant_equals_reference(monkeypatch, compiled, block, layout, bits, signed,
                                          clip_grad):
    """Outputs bit for bit, dL/dx bit for bit, dL/dr to float rounding (a sum), with values on
    the clip boundaries and beyond them; in one block and in many blocks with a partial last
    one (the CPU's blocked passes); with the compiled passes (the tests run one torch
    thread) and with torch's."""
    if block is not None:
        monkeypatch.setattr(linear, "_BLOCK", block)
    if not compiled:
        monkeypatch.setattr(fake_quant_jit, "applies", lambda flat: False)
    elif not fake_quant_jit.available():
        pytest.skip("numba is not installed")
    gen = torch.Generator().manual_seed(bits + 10 * signed)
    x0 = torch.rand(3, 8, 61, 67, generator=gen) * 9 - (4.5 if signed else 1.0)
    r0 = torch.tensor([3.0])
    flat = x0.view(-1)
    flat[::97] = 3.0                   # exactly r: no gradient to x nor to r
    flat[::89] = -3.0 if signed else 0.0
    x0, g = LAYOUTS[layout](x0), LAYOUTS[layout](torch.randn(x0.shape, generator=gen))
    fast = _grads(fake_quantize, x0, r0, g, bits, signed, clip_grad)
    ref = _grads(reference_fake_quantize, x0, r0, g, bits, signed, clip_grad)
    assert torch.equal(fast[0], ref[0])
    assert torch.equal(fast[1], ref[1])
    torch.testing.assert_close(fast[2], ref[2], rtol=1e-5, atol=1e-3)
    assert (fast[2] != 0).all()


def _exact_range_grad(x, r, g, signed):
    """PACT's dL/dr summed in float64: over x > r, minus over x < -r when signed."""
    x, g, r = x.double(), g.double(), float(r)
    total = g[(x > r) & (x < math.inf)].sum()
    if signed:
        total = total - g[(x < -r) & (x > -math.inf)].sum()
    return float(total)


@pytest.mark.skipif(not fake_quant_jit.available(), reason="numba is not installed")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_compiled_fake_quant_passes_equal_torchs_bit_for_bit(monkeypatch, dtype):
    """lib/quantize/fake_quant_jit.py against the torch passes it replaces: outputs and dL/dx
    bit for bit, over ties half a step apart, values on and past the clip, +-inf, -0 and NaN
    (forward); contiguous and channels-last, one block and several, signed and half-wave,
    inputs and weights. dL/dr, a sum, is the float64 sum rounded once: within one rounding of
    the exact sum, where torch's float32 summation may be further. The compiled passes must
    actually run."""
    calls = []
    for name in ("quantize", "ste"):
        real = getattr(fake_quant_jit, name)
        monkeypatch.setattr(fake_quant_jit, name,
                            lambda *a, _real=real, _name=name: calls.append(_name) or _real(*a))
    gen = torch.Generator().manual_seed(3)
    default_block = linear._BLOCK
    for case in range(24):
        shape = [(5, 7), (2, 16, 9, 9), (3, 40, 50, 50)][case % 3]
        signed, bits, clip_grad = case % 2 == 0, 2 + case % 7, case % 5 != 4
        steps = n_steps(bits, signed)
        r0 = (torch.rand(1, generator=gen, dtype=dtype) * 4 + 0.01).requires_grad_(False)
        x0 = torch.randn(shape, generator=gen, dtype=dtype) * 3
        flat = x0.view(-1)
        ties = torch.randint(-2 * steps, 2 * steps, (flat.numel() // 3,), generator=gen)
        flat[:ties.numel()] = (ties.to(dtype) + 0.5) * (r0 / steps)
        flat[-40:-30], flat[-30:-20] = r0, -r0
        flat[-5:] = torch.tensor([math.inf, -math.inf, -0.0, 0.0, 1e-30])
        flat[7:12] = torch.tensor([math.inf, -math.inf, -0.0, 0.0, -1e-30])
        with_nan = x0.clone()   # NaN: forward only (torch's STE masks treat it unlike in its tail)
        with_nan.view(-1)[[1, 9, -1]] = math.nan
        g = torch.randn(shape, generator=gen, dtype=dtype)
        if case % 3 == 2 and case % 4 < 2:
            x0, g, with_nan = (t.contiguous(memory_format=torch.channels_last)
                               for t in (x0, g, with_nan))
        # blocks of 1000 (a partial last one) in some cases, the real size in the others
        monkeypatch.setattr(linear, "_BLOCK", 1000 if case % 4 == 1 else default_block)
        fast = _grads(fake_quantize, x0, r0, g, bits, signed, clip_grad)
        with torch.no_grad():
            fast += (fake_quantize(with_nan, r0, bits, signed),)
        with monkeypatch.context() as m:
            m.setattr(fake_quant_jit, "applies", lambda flat: False)
            ref = _grads(fake_quantize, x0, r0, g, bits, signed, clip_grad)
            with torch.no_grad():
                ref += (fake_quantize(with_nan, r0, bits, signed),)
        assert fast[-1].isnan().sum() == 3
        for i, (a, b) in enumerate(zip(fast, ref)):
            assert a.stride() == b.stride()
            if i == 2 and a is not None:   # dL/dr
                exact = _exact_range_grad(x0, r0, g, signed)
                # one rounding to dtype, plus the float64 summation's own (n * 2^-53 of sum |g|)
                bound = torch.finfo(dtype).eps * abs(exact) + 1e-12 * float(g.abs().sum())
                assert abs(float(a) - exact) <= bound
                torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-4)
                continue
            assert torch.equal(a.isnan(), b.isnan()) and torch.equal(a.nan_to_num(), b.nan_to_num())
    assert calls.count("quantize") == 48 and calls.count("ste") >= 16


def test_compiled_passes_run_at_the_thread_counts_where_they_win():
    """They are single-threaded: they run compiled at up to two torch threads; above that
    torch's parallel passes run (and numba is not imported for them); never for a dtype
    numpy lacks."""
    flat, threads = torch.zeros(8), torch.get_num_threads()
    want = fake_quant_jit if fake_quant_jit.available() else None
    try:
        torch.set_num_threads(3)
        assert linear.compiled_passes(flat) is None
        for n in (2, 1):
            torch.set_num_threads(n)
            assert linear.compiled_passes(flat) is want
        assert linear.compiled_passes(flat.to(torch.bfloat16)) is None
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize("host", [True, False])
def test_quantized_model_step_equals_reference(monkeypatch, host):
    """A w4a4 training step of a small Q MobileNet-V2 with stored (calibrated) weight ranges:
    loss, and the gradients of every weight and every activation_range, equal those of the
    same model run on the reference fake quantization -- on the CPU path and on the tensor
    path an accelerator takes."""
    torch.manual_seed(0)
    model = get_model("qmobilenetv2", num_classes=10, input_size=32, width_mult=0.25)
    n = len(quantizable_layers(model, linear=True))
    apply_linear_policy(model, [[4, -1]] + [[4, 4]] * (n - 1))
    x, y = torch.randn(4, 3, 32, 32), torch.randint(0, 10, (4,))
    calibrate(model, x)
    monkeypatch.setattr(linear, "_host_scalars", lambda t: host)
    reference = copy.deepcopy(model)
    unfuse_input_activations(reference)   # the straightforward model: every ReLU6 runs
    results = []
    for fn, model in ((fake_quantize, model), (reference_fake_quantize, reference)):
        monkeypatch.setattr(linear, "fake_quantize", fn)
        model.zero_grad(set_to_none=True)
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        results.append((loss.detach(), {k: p.grad.clone() for k, p in model.named_parameters()
                                        if p.grad is not None}))
    (loss_fast, fast), (loss_ref, ref) = results
    assert torch.equal(loss_fast, loss_ref)
    assert fast.keys() == ref.keys()
    assert sum(k.endswith("activation_range") for k in fast) == n - 1
    for k in fast:
        torch.testing.assert_close(fast[k], ref[k], rtol=1e-4, atol=1e-6, msg=k)


def test_accelerator_path_never_reads_a_tensor_to_the_host():
    """On a non-CPU device, forward and backward of every Q layer stay on the device: run on
    the meta device, where any .item()/float()/bool() of a tensor raises.  The same model
    with the host-scalar path forced does raise, so the check is real."""
    def build():
        torch.manual_seed(0)
        model = get_model("qmobilenetv2", num_classes=10, input_size=32,
                          width_mult=0.25).to("meta")
        n = len(quantizable_layers(model, linear=True))
        apply_linear_policy(model, [[4, -1]] + [[4, 4]] * (n - 2) + [[1, 2]])
        return model

    model = build()   # never calibrated: the lazy weight-range init runs on the device too
    model(torch.empty(2, 3, 32, 32, device="meta")).sum().backward()
    layers = [m for m in model.modules() if isinstance(m, (QConv2d, QLinear))]
    assert all(m.weight.grad is not None for m in layers)
    assert all(m.activation_range.grad is not None for m in layers[1:])
    assert not linear._host_scalars(torch.empty(1, device="meta"))
    assert linear._host_scalars(torch.empty(1))
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(linear, "_host_scalars", lambda t: True)
        with pytest.raises((RuntimeError, NotImplementedError)):
            build()(torch.empty(2, 3, 32, 32, device="meta"))


def test_compiled_graph_takes_the_tensor_path(monkeypatch):
    """Under torch.compile the range stays a tensor (no graph break per layer) even on the CPU."""
    x = torch.empty(2)
    assert linear._host_scalars(x)
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    assert not linear._host_scalars(x)


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
