"""BatchNorm re-estimation after quantization (--bn_reestimate; lib.quantize.options): the
statistics it measures against a hand computation, its no-op cases, its record in
strategy.json, the fine-tune and the packed export, and the search episode that applies it."""
import copy
import json

import numpy as np
import pytest
import torch
import torch.nn as nn

from lib.env import EnvConfig, LinearQuantizeEnv
from lib.quantize import calibrate, quant_layers
from lib.quantize.options import QuantOptions, prepare_model, reestimate_batchnorm
from lib.quantize.policy import apply_linear_policy
from lib.simulator import TableCost
from lib.utils.checkpoint import load_checkpoint
from lib.utils.errors import UserError
from lib.utils.strategy import load_strategy
from models import get_model


def _bn_stats(model):
    return {k: v.clone() for k, v in model.state_dict().items()
            if k.endswith(("running_mean", "running_var"))}


def _quantized_model(bits=3):
    """The tiny Q MobileNet-V2, w{bits}a8 applied and calibrated, with BN statistics unlike
    the quantized model's activations (so a re-estimation has something to change)."""
    torch.manual_seed(0)
    model = get_model("qmobilenetv2", num_classes=10, input_size=32, width_mult=0.25).eval()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-1, 1)
                m.running_var.uniform_(0.5, 2)
    n = len(quant_layers(model))
    apply_linear_policy(model, [[8, -1]] + [[bits, 8]] * (n - 2) + [[8, 8]])
    calibrate(model, torch.randn(8, 3, 32, 32, generator=torch.Generator().manual_seed(1)))
    return model


def _loader(n_batches, batch=8, seed=2):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(batch, 3, 32, 32, generator=g), torch.zeros(batch, dtype=torch.long))
            for _ in range(n_batches)]


def _by_hand(model, batches):
    """{bn name: (mean, var)}: each BN input's per-batch mean and unbiased variance per
    channel, averaged over the batches, on a copy with the BNs in training mode."""
    ref = copy.deepcopy(model).eval()
    seen = {}
    hooks = []
    for name, m in ref.named_modules():
        if isinstance(m, nn.BatchNorm2d):
            m.train()
            hooks.append(m.register_forward_pre_hook(
                lambda mod, inp, name=name: seen.setdefault(name, []).append(inp[0].detach())))
    with torch.no_grad():
        for x, _ in batches:
            ref(x)
    for h in hooks:
        h.remove()
    out = {}
    for name, inputs in seen.items():
        flat = [x.transpose(0, 1).reshape(x.shape[1], -1).double() for x in inputs]
        out[name] = (torch.stack([f.mean(dim=1) for f in flat]).mean(dim=0),
                     torch.stack([f.var(dim=1, unbiased=True) for f in flat]).mean(dim=0))
    return out


class _NoIteration:
    def __iter__(self):
        raise AssertionError("the loader must not be read")


# ---------------------------------------------------------------- the operation
def test_reestimated_statistics_equal_the_quantized_inputs_batch_statistics():
    model = _quantized_model()
    before = _bn_stats(model)
    modes = {n: m.training for n, m in model.named_modules()}
    loader = _loader(3)
    expected = _by_hand(model, loader[:2])
    # 12 images asked: whole batches until 12 are reached, so the first two (16 images)
    assert reestimate_batchnorm(model, loader, 12, "cpu") == 16
    changed = 0
    for name, m in model.named_modules():
        if isinstance(m, nn.BatchNorm2d):
            mean, var = expected[name]
            np.testing.assert_allclose(m.running_mean.double().numpy(), mean.numpy(),
                                       rtol=1e-4, atol=1e-5, err_msg=name)
            np.testing.assert_allclose(m.running_var.double().numpy(), var.numpy(),
                                       rtol=1e-4, atol=1e-5, err_msg=name)
            assert m.momentum == 0.1 and int(m.num_batches_tracked) == 2
            changed += not torch.equal(m.running_mean, before[f"{name}.running_mean"])
    assert changed == len(expected) > 0
    assert {n: m.training for n, m in model.named_modules()} == modes


def test_the_mode_of_a_training_model_is_restored():
    model = _quantized_model().train()
    reestimate_batchnorm(model, _loader(1), 8, "cpu")
    assert all(m.training for m in model.modules())


def test_zero_images_or_no_batchnorm_leave_the_model_untouched():
    model = _quantized_model()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    assert reestimate_batchnorm(model, _NoIteration(), 0, "cpu") == 0
    for k, v in model.state_dict().items():
        assert torch.equal(v, state[k]), k
    torch.manual_seed(0)
    folded = get_model("qmobilenetv2", num_classes=10, input_size=32, width_mult=0.25).eval()
    prepare_model(folded, QuantOptions(fold_bn=True, bn_reestimate=64))
    state = {k: v.clone() for k, v in folded.state_dict().items()}
    assert reestimate_batchnorm(folded, _NoIteration(), 64, "cpu") == 0
    for k, v in folded.state_dict().items():
        assert torch.equal(v, state[k]), k


def test_an_empty_loader_keeps_the_statistics():
    model = _quantized_model()
    before = _bn_stats(model)
    assert reestimate_batchnorm(model, [], 8, "cpu") == 0
    for k, v in _bn_stats(model).items():
        assert torch.equal(v, before[k]), k


# ---------------------------------------------------------------- the option's record
def test_the_record_validates_and_old_records_mean_off(tmp_path):
    assert QuantOptions.from_record({"per_channel": True}).bn_reestimate == 0
    options = QuantOptions(per_channel=True, bn_reestimate=512)
    assert QuantOptions.from_record(options.record()) == options
    for bad in (-1, 2.5, True, "512", 2 ** 31):
        with pytest.raises(UserError, match="bn_reestimate"):
            QuantOptions.from_record({"bn_reestimate": bad})
    path = tmp_path / "strategy.json"

    def load(options):
        path.write_text(json.dumps({"mode": "linear", "strategy": [[8, -1], [8, 8]],
                                    "quant_options": options}))
        return load_strategy(str(path))

    old = load({"per_channel": True})     # written before the option existed
    assert QuantOptions.from_record(old["quant_options"]) == QuantOptions(per_channel=True)
    assert load({"bn_reestimate": 64})["quant_options"] == {"bn_reestimate": 64}
    for bad in (-1, 2.5, True):
        with pytest.raises(UserError, match="quant_options"):
            load({"bn_reestimate": bad})


def test_the_option_alone_leaves_the_layers_as_released():
    """Re-estimation runs after calibration: the layers keep the released calibration."""
    torch.manual_seed(0)
    model = get_model("qmobilenetv2", num_classes=10, input_size=32, width_mult=0.25)
    prepare_model(model, QuantOptions(bn_reestimate=64))
    assert all(m.weight_calibrator is None and not m.per_channel for m in quant_layers(model))
    assert QuantOptions(bn_reestimate=64).changes_layers() is False
    assert QuantOptions(bn_reestimate=64).is_default() is False


def test_kmeans_mode_refuses_the_option():
    from types import SimpleNamespace

    from lib.search.build import search_quant_options
    with pytest.raises(UserError, match="--bn_reestimate are linear-quantizer options"):
        search_quant_options(SimpleNamespace(linear_quantization=False, bn_reestimate=16))


# ---------------------------------------------------------------- the search episode
class _Recorder:
    """An evaluator that records the BN statistics the short fine-tune would start from."""

    def __init__(self, train_loader):
        self.train_loader = train_loader
        self.stats = []

    def validate(self, model):
        return {"top1": 50.0, "top5": 90.0, "loss": 1.0}

    def finetune(self, model, step_hook=None, scoring=None):
        self.stats.append(_bn_stats(model))
        return {"top1": 50.0, "top5": 90.0, "loss": 1.0, "nonfinite": False}


@pytest.mark.parametrize("n_images", [0, 8])
def test_the_episode_reestimates_before_its_fine_tune(n_images):
    torch.manual_seed(0)
    model = get_model("qmobilenetv2", num_classes=10, input_size=32, width_mult=0.25)
    pretrained = _bn_stats(model)
    calib = _loader(1, seed=3)
    train = _loader(2, seed=4)
    recorder = _Recorder(train)
    env = LinearQuantizeEnv(model, recorder, EnvConfig(preserve_ratio=0.5, input_size=32),
                            TableCost(np.ones((53, 8, 8))), calib, torch.device("cpu"),
                            bn_reestimate=n_images)
    policy = [[8, -1]] + [[3, 8]] * 51 + [[8, 8]]
    env.quantize_policy(policy)      # what the ILP's refinement measures with: no re-estimation
    for k, v in _bn_stats(model).items():
        assert torch.equal(v, pretrained[k]), k
    env.evaluate_policy(policy)
    got = recorder.stats[-1]
    if n_images == 0:                # the released episode: the pretrained statistics
        for k, v in got.items():
            assert torch.equal(v, pretrained[k]), k
        return
    reference = copy.deepcopy(model)
    reference.load_state_dict(pretrained, strict=False)
    assert reestimate_batchnorm(reference, train, 8, "cpu") == 8
    for k, v in _bn_stats(reference).items():
        assert torch.allclose(got[k], v, rtol=1e-6, atol=1e-7), k
        assert not torch.equal(got[k], pretrained[k]), k


# ---------------------------------------------------------------- fine-tune and export
def _strategy(root, n, options=None):
    path = root / "strategy.json"
    record = {"mode": "linear", "arch": "qmobilenetv2", "dataset": "mnist5k",
              "width_mult": 0.25, "strategy": [[8, -1]] + [[3, 8]] * (n - 2) + [[8, 8]]}
    if options is not None:
        record["quant_options"] = options
    path.write_text(json.dumps(record))
    return str(path)


def _n_layers(model):
    return sum(isinstance(m, (nn.Conv2d, nn.Linear)) for m in model.modules())


FT = ["--train_subset", "32", "--train_batch", "16", "--test_batch", "32", "--device", "cpu",
      "--no-progress", "--no-eval_fp32"]


def test_finetune_evaluate_honours_the_flag(tiny_pretrained, tmp_path, monkeypatch):
    """-e: with --bn_reestimate the accuracy after quantization is taken with re-estimated
    statistics (other than the pretrained ones, so other scores); without, as released."""
    import finetune
    from lib.finetune import quantized
    weights, model = tiny_pretrained
    strategy = _strategy(tmp_path, _n_layers(model))
    calls = []

    def spy(net, loader, n_images, device):
        used = reestimate_batchnorm(net, loader, n_images, device)
        calls.append((n_images, used, _bn_stats(net)))
        return used

    monkeypatch.setattr(quantized, "reestimate_batchnorm", spy)
    argv = ["-e", "--strategy", strategy, "--pretrained_path", weights, "-c"]
    plain = finetune.main(argv + [str(tmp_path / "a")] + FT)
    redone = finetune.main(argv + [str(tmp_path / "b")] + FT + ["--bn_reestimate", "20"])
    assert [(n, used) for n, used, _ in calls] == [(0, 0), (20, 32)]
    pretrained = _bn_stats(model)
    for k, v in calls[0][2].items():
        assert torch.equal(v, pretrained[k]), k
    assert all(not torch.equal(v, pretrained[k]) for k, v in calls[1][2].items())
    # the tiny model's classifier starts at zero (loss ln 10 either way); its ranking moves
    assert (redone["top1"], redone["top5"]) != (plain["top1"], plain["top5"])


@pytest.fixture(scope="module")
def reestimated_finetune(tiny_pretrained, tmp_path_factory):
    """A 1-epoch fine-tune of a strategy that records bn_reestimate (as a search writes it)."""
    import finetune
    weights, model = tiny_pretrained
    root = tmp_path_factory.mktemp("bnre_ft")
    strategy = _strategy(root, _n_layers(model), {"bn_reestimate": 16})
    finetune.main(["--strategy", strategy, "--pretrained_path", weights, "-c", str(root / "ft"),
                   "--epochs", "1"] + FT)
    return str(root / "ft" / "checkpoint.pth.tar")


def test_the_checkpoint_and_the_packed_file_record_the_option(reestimated_finetune, tmp_path):
    from lib.export import export_checkpoint, load_packed, model_from_checkpoint
    ckpt = load_checkpoint(reestimated_finetune)
    assert ckpt["policy"]["quant_options"] == QuantOptions(bn_reestimate=16).record()
    out = str(tmp_path / "bnre.haq")
    header = export_checkpoint(reestimated_finetune, out)
    assert header["quant_options"]["bn_reestimate"] == 16
    packed, _ = load_packed(out)
    reference = model_from_checkpoint(ckpt).eval()
    for k, v in _bn_stats(reference).items():
        assert torch.equal(packed.state_dict()[k], v), k
    x = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.allclose(packed.eval()(x), reference(x), atol=1e-5)


def test_the_search_records_the_option(tiny_pretrained, tmp_path):
    import rl_quantize
    from tests.helpers import tiny_search_argv
    weights, _ = tiny_pretrained
    argv = tiny_search_argv(weights, tmp_path, 1) + [
        "--arch", "qmobilenetv2", "--linear_quantization", "--cost", "size", "--min_bit", "2",
        "--method", "random", "--no-finetune_flag", "--bn_reestimate", "16",
        "--preserve_ratio", "0.5"]
    result = rl_quantize.main(argv)
    strategy = json.loads(open(f"{result['output']}/strategy.json").read())
    assert strategy["quant_options"] == QuantOptions(bn_reestimate=16).record()


@pytest.mark.slow
def test_the_compiled_search_reestimates_without_new_graphs(tiny_pretrained, tmp_path,
                                                            monkeypatch):
    """--compile: the re-estimation runs the eager model and puts every mode and momentum
    back, so the compiled search keeps its three graphs (tests/test_compile.py) over episodes."""
    import rl_quantize
    from torch._dynamo.utils import counters

    from lib.quantize import options
    from tests.helpers import tiny_search_argv
    real_compile = torch.compile
    monkeypatch.setattr(torch, "compile",
                        lambda module, **kw: real_compile(module, backend="eager", **kw))
    real = options.reestimate_batchnorm
    used = []
    monkeypatch.setattr("lib.env.linear_env.reestimate_batchnorm",
                        lambda *a: used.append(real(*a)) or used[-1])
    torch._dynamo.reset()
    counters.clear()
    rl_quantize.main(tiny_search_argv(tiny_pretrained[0], tmp_path, 3) + [
        "--linear_quantization", "--arch", "qmobilenetv2", "--cost", "latency",
        "--preserve_ratio", "0.5", "--min_bit", "2", "--max_bit", "8", "--compile",
        "--device", "cpu", "--bn_reestimate", "16"])
    assert used == [32] * 3      # whole batches of 32 (--data_bsize) in every episode
    assert counters["frames"]["ok"] == counters["stats"]["unique_graphs"] == 3
