"""The linear quantizer options (lib.quantize.options): per-channel scales, the MSE weight clip,
BatchNorm folding and bias correction, against references, and their path through the
search's strategy.json, the fine-tune and the packed export."""
import json
import os

import numpy as np
import pytest
import torch
import torch.nn as nn

from lib.export import export_checkpoint, load_packed, model_from_checkpoint
from lib.quantize import QConv2d, QLinear, calibrate, quant_layers, quantize_model
from lib.quantize.linear import calibration_key, get_ranges, set_ranges
from lib.quantize.options import (MSE_GRID, QuantOptions, fold_batchnorm, mse_clip,
                                  prepare_model)
from lib.quantize.policy import apply_linear_policy
from lib.utils.checkpoint import load_checkpoint
from lib.utils.errors import UserError
from models import get_model

ALL_ON = QuantOptions(per_channel=True, weight_clip="mse", fold_bn=True, bias_correction=True)


def _numpy_quantize(w, t, bits):
    """The symmetric grid of fake_quantize, written out in numpy."""
    steps = 2 ** (bits - 1) - 1
    if steps == 0:
        return np.where(w >= 0, t, -t)
    scale = t / steps
    return np.round(np.clip(w, -t, t) / scale) * scale


def _brute_force_clip(w, bits):
    """Every candidate clip max|w| * k / N tried in a loop; the first minimiser."""
    top = np.abs(w).max()
    errors = [((_numpy_quantize(w, top * k / MSE_GRID, bits) - w) ** 2).sum()
              for k in range(1, MSE_GRID + 1)]
    return top * (int(np.argmin(errors)) + 1) / MSE_GRID


@pytest.mark.parametrize("bits", [1, 2, 3, 4, 8])
def test_mse_clip_matches_a_brute_force_search(bits):
    rng = np.random.default_rng(bits)
    w = rng.standard_t(3, size=(5, 3, 3, 3))      # heavy tails: the clip is below max|w|
    tensor = torch.from_numpy(w)
    per_layer = mse_clip(tensor, bits)
    assert per_layer.shape == (1,)
    assert float(per_layer) == pytest.approx(_brute_force_clip(w.reshape(-1), bits), rel=1e-12)
    per_channel = mse_clip(tensor, bits, per_channel=True)
    expected = [_brute_force_clip(row.reshape(-1), bits) for row in w]
    np.testing.assert_allclose(per_channel.numpy(), expected, rtol=1e-12)
    if bits == 2:   # 3 levels: clipping the tails beats the max clip
        assert float(per_layer) < np.abs(w).max()


def _qconv(per_channel=False, weight_clip="max", bits=3):
    torch.manual_seed(0)
    conv = QConv2d(4, 6, 3, padding=1, bias=False, half_wave=False)
    model = nn.Sequential(conv)
    prepare_model(model, QuantOptions(per_channel=per_channel, weight_clip=weight_clip))
    conv.set_bits(bits, -1)
    calibrate(model, torch.randn(8, 4, 6, 6))
    return conv


def test_per_channel_ranges_quantize_each_channel_on_its_own_grid():
    conv = _qconv(per_channel=True)
    w = conv.weight.detach()
    assert conv.weight_range.shape == (6, 1, 1, 1)
    np.testing.assert_allclose(conv.weight_range.reshape(-1).numpy(),
                               w.abs().reshape(6, -1).amax(1).numpy())
    q = conv.quantized_weight().detach()
    for c in range(6):   # each channel: the per-tensor grid of that channel alone
        expected = _numpy_quantize(w[c].double().numpy(), float(w[c].abs().max()), 3)
        np.testing.assert_allclose(q[c].double().numpy(), expected, rtol=1e-6, atol=1e-7)
    mse = _qconv(per_channel=True, weight_clip="mse")
    np.testing.assert_allclose(mse.weight_range.reshape(-1).numpy(),
                               mse_clip(w, 3, per_channel=True).numpy())


def test_linear_layer_per_channel_range_is_c_by_1():
    layer = QLinear(7, 5, half_wave=False)
    prepare_model(nn.Sequential(layer), QuantOptions(per_channel=True))
    layer.set_bits(4, -1)
    calibrate(nn.Sequential(layer), torch.randn(3, 7))
    assert layer.weight_range.shape == (5, 1)
    assert layer.quantized_weight().shape == (5, 7)


def _with_bn_statistics(model):
    gen = torch.Generator().manual_seed(1)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            n = m.num_features
            m.running_mean.copy_(torch.rand(n, generator=gen) - 0.5)
            m.running_var.copy_(torch.rand(n, generator=gen) + 0.5)
            m.weight.data.copy_(torch.rand(n, generator=gen) + 0.5)
            m.bias.data.copy_(torch.rand(n, generator=gen) - 0.5)
    return model.eval()


def test_batchnorm_folding_equals_conv_plus_bn_in_float():
    torch.manual_seed(0)
    model = _with_bn_statistics(get_model("qmobilenetv2", num_classes=10, input_size=32,
                                          width_mult=0.25))
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        before = model(x)
        pairs = fold_batchnorm(model)
        after = model(x)
    assert len(pairs) == len(quant_layers(model)) - 1          # every conv had its BN
    assert not any(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    assert (after - before).abs().max() <= 1e-5 * max(1.0, float(before.abs().max()))


def test_batchnorm_folding_of_a_swapped_model():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 5, 3, bias=True), nn.BatchNorm2d(5), nn.ReLU(),
                          nn.Conv2d(5, 4, 1), nn.BatchNorm2d(4))
    _with_bn_statistics(model)
    x = torch.randn(2, 3, 7, 7)
    with torch.no_grad():
        before = model(x)
        quantize_model(model)
        prepare_model(model, QuantOptions(fold_bn=True))
        assert torch.allclose(model(x), before, atol=1e-5)


def test_bias_correction_removes_the_mean_output_shift_on_the_calibration_batch():
    torch.manual_seed(0)
    x = torch.randn(16, 4, 6, 6) + 0.5     # a non-zero mean input: a shift to correct

    def shift(options):
        torch.manual_seed(1)
        conv = QConv2d(4, 6, 3, padding=1, bias=False, half_wave=False)
        float_out = conv(x).detach()
        prepare_model(nn.Sequential(conv), options)
        conv.set_bits(2, -1)
        calibrate(nn.Sequential(conv), x)
        return (conv(x) - float_out).detach().mean(dim=(0, 2, 3)).abs()

    uncorrected = shift(QuantOptions())
    corrected = shift(QuantOptions(bias_correction=True))
    assert float(uncorrected.max()) > 1e-3
    assert float(corrected.max()) < 1e-5
    assert float(corrected.mean()) < float(uncorrected.mean())


def test_bias_correction_is_part_of_the_reused_calibration():
    torch.manual_seed(0)
    model = get_model("qmobilenetv2", num_classes=10, input_size=32, width_mult=0.25).eval()
    prepare_model(model, QuantOptions(bias_correction=True, weight_clip="mse"))
    float_state = {k: v.clone() for k, v in model.state_dict().items()}
    policy = [[8, -1]] + [[3, 8]] * (len(quant_layers(model)) - 2) + [[8, 8]]
    apply_linear_policy(model, policy)
    x = torch.randn(8, 3, 32, 32)
    key = calibration_key(model)
    calibrate(model, x)
    saved = get_ranges(model)
    corrected = {k: v.clone() for k, v in model.state_dict().items()}
    model.load_state_dict(float_state)
    set_ranges(model, saved)
    for k, v in model.state_dict().items():
        assert torch.equal(v, corrected[k]), k
    apply_linear_policy(model, [[8, -1]] + [[4, 8]] * (len(policy) - 2) + [[8, 8]])
    assert calibration_key(model) != key      # another width: another clip and correction


def test_all_options_off_leave_the_model_and_its_calibration_as_released():
    torch.manual_seed(0)
    model = get_model("qmobilenetv2", num_classes=10, input_size=32, width_mult=0.25).eval()
    reference = get_model("qmobilenetv2", num_classes=10, input_size=32, width_mult=0.25).eval()
    reference.load_state_dict(model.state_dict())
    prepare_model(model, QuantOptions())
    assert model.state_dict().keys() == reference.state_dict().keys()
    policy = [[8, -1]] + [[3, 5]] * (len(quant_layers(model)) - 2) + [[8, 8]]
    x = torch.randn(8, 3, 32, 32)
    for m in (model, reference):
        apply_linear_policy(m, policy)
        calibrate(m, x)
    assert calibration_key(model) == calibration_key(reference)
    for k, v in reference.state_dict().items():
        assert torch.equal(model.state_dict()[k], v), k
    with torch.no_grad():
        assert torch.equal(model(x), reference(x))


def test_malformed_option_records_are_user_errors():
    with pytest.raises(UserError, match="weight_clip"):
        QuantOptions.from_record({"weight_clip": "kl"})
    with pytest.raises(UserError, match="unknown key"):
        QuantOptions.from_record({"per_chanel": True})
    assert QuantOptions.from_record(None) == QuantOptions()
    assert QuantOptions.from_record(ALL_ON.record()) == ALL_ON


# ---------------------------------------------------------------- search, fine-tune, export
@pytest.fixture(scope="module")
def options_search(tiny_pretrained, tmp_path_factory):
    """strategy.json of a one-episode linear search with every option on."""
    import rl_quantize
    from tests.helpers import tiny_search_argv
    weights, _ = tiny_pretrained
    out = tmp_path_factory.mktemp("qopts_search")
    argv = tiny_search_argv(weights, out, 1) + [
        "--arch", "qmobilenetv2", "--linear_quantization", "--cost", "size", "--min_bit", "2",
        "--method", "random", "--no-finetune_flag", "--per_channel", "--weight_clip", "mse",
        "--fold_bn", "--bias_correction", "--preserve_ratio", "0.5"]
    result = rl_quantize.main(argv)
    return json.loads(open(f"{result['output']}/strategy.json").read())


@pytest.mark.slow
def test_search_records_the_options_in_strategy_json(options_search):
    assert options_search["quant_options"] == ALL_ON.record()


@pytest.fixture(scope="module")
def options_finetune(tiny_pretrained, tmp_path_factory):
    """A 1-epoch fine-tune of a linear strategy that records every option (as a search writes)."""
    import finetune
    weights, model = tiny_pretrained
    n = sum(isinstance(m, (nn.Conv2d, nn.Linear)) for m in model.modules())
    root = tmp_path_factory.mktemp("qopts_ft")
    strategy = root / "strategy.json"
    strategy.write_text(json.dumps({
        "mode": "linear", "arch": "qmobilenetv2", "dataset": "mnist5k", "width_mult": 0.25,
        "strategy": [[8, -1]] + [[3, 8]] * (n - 2) + [[8, 8]],
        "quant_options": ALL_ON.record()}))
    finetune.main(["--strategy", str(strategy), "--pretrained_path", weights, "-c",
                   str(root / "ft"), "--epochs", "1", "--no-eval_fp32", "--train_subset", "32",
                   "--train_batch", "16", "--test_batch", "32", "--device", "cpu",
                   "--no-progress"])
    return str(root / "ft" / "checkpoint.pth.tar")


def test_finetune_uses_the_strategy_options(options_finetune):
    ckpt = load_checkpoint(options_finetune)
    assert ckpt["policy"]["quant_options"] == ALL_ON.record()
    results = json.loads(open(os.path.join(os.path.dirname(options_finetune),
                                           "results.json")).read())
    assert results["quant_options"] == ALL_ON.record()                # what was measured
    state = ckpt["state_dict"]
    assert not any("running_mean" in k for k in state)                 # BN folded away
    assert state["features.1.conv.0.weight_range"].dim() == 4          # per channel
    assert state["features.1.conv.0.weight_range"].shape[0] == \
        state["features.1.conv.0.weight"].shape[0]
    assert "features.1.conv.0.bias" in state                           # folded / corrected
    model = model_from_checkpoint(ckpt)                                # rebuilds the structure
    assert all(m.per_channel and m.weight_clip == "mse" for m in quant_layers(model))


def test_export_round_trips_the_options_model(options_finetune, tmp_path):
    out = str(tmp_path / "qopts.haq")
    header = export_checkpoint(options_finetune, out)
    assert header["quant_options"] == ALL_ON.record()
    scales = [e["scale"]["count"] for e in header["entries"] if e["encoding"] == "linear"]
    assert all(n > 1 for n in scales)
    packed, _ = load_packed(out)
    reference = model_from_checkpoint(load_checkpoint(options_finetune))
    for (name, a), b in zip(((n, m) for n, m in packed.named_modules()
                             if isinstance(m, (QConv2d, QLinear))), quant_layers(reference)):
        qa, qb = a.quantized_weight().detach(), b.quantized_weight().detach()
        assert torch.allclose(qa, qb, rtol=0, atol=1e-6 * float(qb.abs().max())), name
    x = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.allclose(packed(x), reference(x), atol=1e-5)


def test_kmeans_mode_refuses_the_options(tiny_pretrained, tmp_path):
    import rl_quantize
    from tests.helpers import tiny_search_argv
    weights, _ = tiny_pretrained
    with pytest.raises(UserError, match="linear-quantizer options"):
        rl_quantize.main(tiny_search_argv(weights, tmp_path, 1) + ["--per_channel"])


def test_ilp_sensitivity_quantizes_each_layer_with_the_options():
    """The ILP's one-layer-at-a-time scoring sets the clip and bias the env would set."""
    from types import SimpleNamespace

    from lib.allocate.sensitivity import _FloatCalibration
    torch.manual_seed(0)
    model = get_model("qmobilenetv2", num_classes=10, input_size=32, width_mult=0.25).eval()
    prepare_model(model, QuantOptions(per_channel=True, weight_clip="mse", bias_correction=True))
    layers = [(n, m) for n, m in model.named_modules() if isinstance(m, (QConv2d, QLinear))]
    x = torch.randn(8, 3, 32, 32)
    env = SimpleNamespace(model=model, layers=layers, calib_loader=[(x, None)],
                          unquantize=lambda: apply_linear_policy(model, [[-1, -1]] * len(layers)))
    calib = _FloatCalibration(env)
    module = layers[5][1]
    float_bias = module.bias.detach().clone()
    calib.set(module, w_bit=3)
    np.testing.assert_allclose(module.weight_range.reshape(-1).numpy(),
                               mse_clip(module.weight, 3, per_channel=True).numpy())
    assert not torch.equal(module.bias, float_bias)          # corrected for this width
    calib.reset(module)
    assert torch.equal(module.bias, float_bias) and module.w_bit == -1


def test_evaluating_the_options_checkpoint_rebuilds_its_model(options_finetune):
    """-e --resume prepares the model as the run did (folded, per channel) before loading it."""
    import finetune
    ckpt = load_checkpoint(options_finetune)
    va = finetune.main(["-e", "--resume", options_finetune, "--device", "cpu", "--no-progress",
                        "--test_batch", "32"])
    assert va["top1"] == pytest.approx(ckpt["acc"], abs=1e-6)
