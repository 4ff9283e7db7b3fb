"""Linear mode for any model (issue 15, part 1): the Conv2d/Linear -> QConv2d/QLinear swap."""
import json
import os

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import finetune
import rl_quantize
from lib.quantize import apply_linear_policy, calibrate, quant_layers
from lib.quantize.linear import QConv2d, QLinear
from lib.quantize.swap import (half_wave_by_observation, half_wave_by_structure,
                               infer_half_wave, quantize_model)
from lib.utils.checkpoint import load_checkpoint, save_checkpoint
from lib.utils.errors import UserError
from models import get_model


class Mixed(nn.Module):
    """Convs after ReLU, SiLU, Hardswish, a residual add, an SE-style product and a pool."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.after_relu = nn.Conv2d(8, 8, 3, padding=2, dilation=2, padding_mode="reflect")
        self.after_silu = nn.Conv2d(8, 8, 3, padding=1, groups=4, bias=False)
        self.after_hswish = nn.Conv2d(8, 8, 1, stride=2)
        self.after_residual = nn.Conv2d(8, 8, 1)
        self.after_se = nn.Conv2d(8, 8, 1)
        self.after_pool = nn.Conv2d(8, 8, 1)
        self.fc = nn.Linear(8, 5)

    def forward(self, x):
        a = F.relu(self.stem(x))
        b = F.silu(self.after_relu(a))
        c = nn.functional.hardswish(self.after_silu(b))
        d = self.after_hswish(c)
        e = self.after_residual(d + F.max_pool2d(a, 2))      # signed branch + ReLU shortcut
        f = self.after_se(torch.relu(e) * torch.sigmoid(e))  # non-negative product
        g = self.after_pool(F.max_pool2d(torch.relu(f), 2))
        return self.fc(torch.relu(g).mean((2, 3)))


EXPECTED = {"stem": False, "after_relu": True, "after_silu": False, "after_hswish": False,
            "after_residual": False, "after_se": True, "after_pool": True, "fc": True}


def test_half_wave_follows_the_graph_not_an_assumption():
    """SiLU/Hardswish outputs and a signed+ReLU residual sum are full-wave; ReLU paths half."""
    assert half_wave_by_structure(Mixed()) == EXPECTED


def test_observation_fallback_for_untraceable_models():
    """Data-dependent control flow defeats fx; hooks on a batch decide, and agree."""
    class Branchy(Mixed):
        def forward(self, x):
            if x.sum() > -1e9:     # fx cannot trace a tensor-valued condition
                return super().forward(x)
            return x

    torch.manual_seed(0)
    x = torch.randn(4, 3, 16, 16)
    with pytest.raises(UserError, match="example input"):
        infer_half_wave(Branchy())
    assert infer_half_wave(Branchy(), example_input=x) == EXPECTED
    assert half_wave_by_observation(Mixed(), x) == EXPECTED


def test_swap_keeps_layers_and_float_output_exactly():
    """Swapped with quantization off = the float model, bit for bit (torchvision + odd convs)."""
    torch.manual_seed(0)
    for model, size in ((Mixed(), 16), (get_model("mobilenet_v3_small", num_classes=10,
                                                   input_size=32), 32)):
        model.eval()
        x = torch.randn(2, 3, size, size)
        with torch.no_grad():
            ref = model(x)
        before = {n: m for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))}
        quantize_model(model)
        after = dict(model.named_modules())
        for name, old in before.items():
            new = after[name]
            assert isinstance(new, QConv2d if isinstance(old, nn.Conv2d) else QLinear)
            assert new.weight is old.weight and new.bias is old.bias
            if isinstance(old, nn.Conv2d):
                for attr in ("stride", "padding", "dilation", "groups", "padding_mode"):
                    assert getattr(new, attr) == getattr(old, attr), (name, attr)
        with torch.no_grad():
            assert torch.equal(model(x), ref)
        if isinstance(model, Mixed):
            assert after["after_relu"].padding_mode == "reflect"
            assert after["after_silu"].groups == 4 and after["after_relu"].dilation == (2, 2)


@pytest.mark.parametrize("arch", ["mobilenetv2", "resnet50"])
def test_inferred_half_wave_equals_the_hand_written_twins(arch):
    twin = get_model("q" + arch, num_classes=10, input_size=32)
    flags = {n: m.half_wave for n, m in twin.named_modules() if isinstance(m, (QConv2d, QLinear))}
    assert infer_half_wave(get_model(arch, num_classes=10, input_size=32)) == flags


def test_swapped_model_equals_twin_under_one_policy():
    torch.manual_seed(0)
    float_model = get_model("mobilenetv2", num_classes=10, input_size=32, width_mult=0.25)
    twin = get_model("qmobilenetv2", num_classes=10, input_size=32, width_mult=0.25)
    twin.load_state_dict(float_model.state_dict(), strict=False)
    swapped = get_model("mobilenetv2", num_classes=10, input_size=32, width_mult=0.25,
                        linear=True)
    swapped.load_state_dict(float_model.state_dict(), strict=False)
    assert list(swapped.state_dict()) == list(twin.state_dict())   # released keys load as is
    n = len(quant_layers(twin))
    gen = torch.Generator().manual_seed(1)
    policy = [[8, -1]] + torch.randint(2, 9, (n - 2, 2), generator=gen).tolist() + [[8, 8]]
    x = torch.randn(8, 3, 32, 32, generator=gen)
    for model in (twin, swapped):
        apply_linear_policy(model, policy)
        calibrate(model, x)
        model.eval()
    with torch.no_grad():
        out_twin, out_swapped = twin(x), swapped(x)
    assert torch.equal(out_twin, out_swapped)
    assert not torch.equal(out_twin, float_model.eval()(x))   # the policy did quantize


def test_linear_search_and_finetune_take_a_model_without_twin(tmp_path):
    """rl_quantize --linear_quantization / finetune.py linear on torchvision's mobilenet_v3_small."""
    torch.manual_seed(0)
    model = get_model("mobilenet_v3_small", num_classes=10, input_size=32)
    weights = str(tmp_path / "mnv3.pth.tar")
    save_checkpoint({"state_dict": model.state_dict()}, weights)
    table = tmp_path / "table.npy"
    import numpy as np
    np.save(table, np.ones((54, 8, 8)) * np.arange(1, 9)[None, :, None])
    out = tmp_path / "search"
    rl_quantize.main(["--arch", "mobilenet_v3_small", "--linear_quantization", "--dataset",
                      "mnist5k", "--pretrained_path", weights, "--cost_table", str(table),
                      "--train_size", "32", "--val_size", "32", "--data_bsize", "32",
                      "--n_worker", "0", "--warmup", "1", "--train_episode", "2", "--output",
                      str(out), "--preserve_ratio", "0.8", "--min_bit", "5", "--device", "cpu"])
    (run,) = os.listdir(out)
    strategy = json.load(open(out / run / "strategy.json"))
    assert strategy["arch"] == "mobilenet_v3_small" and len(strategy["strategy"]) == 54
    assert strategy["layers"][0] == "features.0.0" and strategy["strategy"][0] == [8, -1]
    ft = str(tmp_path / "ft")
    finetune.main(["--strategy", str(out / run / "strategy.json"), "--pretrained_path", weights,
                   "--epochs", "1", "--train_subset", "32", "--train_batch", "16",
                   "--test_batch", "32", "--device", "cpu", "--no-progress", "-c", ft])
    ckpt = load_checkpoint(os.path.join(ft, "checkpoint.pth.tar"))
    assert ckpt["mode"] == "linear" and ckpt["arch"] == "mobilenet_v3_small"
    # the fine-tuned layers are Q layers whose ranges were calibrated and saved
    assert float(ckpt["state_dict"]["features.1.block.0.0.weight_range"]) > 0
    assert "classifier.3.activation_range" in ckpt["state_dict"]


def test_a_user_registered_model_gets_linear_mode():
    from models import registry

    @registry.register_model(name="user_net_for_test")
    def user_net(num_classes=10, input_size=32):
        return nn.Sequential(nn.Conv2d(3, 4, 3), nn.Hardswish(), nn.Conv2d(4, 4, 3), nn.ReLU6(),
                             nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, num_classes))
    try:
        model = get_model("user_net_for_test", linear=True)
        assert [m.half_wave for m in quant_layers(model)] == [False, False, True]
    finally:
        registry._REGISTRY.pop("user_net_for_test")


@pytest.mark.parametrize("arch", ["resnet18", "mobilenet_v3_small", "efficientnet_b0",
                                  "regnet_x_400mf"])
def test_issue_archs_build_in_linear_mode(arch):
    """get_model(linear=True): every Conv2d/Linear swapped, same output with quantization off."""
    torch.manual_seed(0)
    ref = get_model(arch, num_classes=10, input_size=32).eval()
    n_float = sum(isinstance(m, (nn.Conv2d, nn.Linear)) for m in ref.modules())
    torch.manual_seed(0)
    model = get_model(arch, num_classes=10, input_size=32, linear=True).eval()
    assert len(quant_layers(model)) == n_float
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(model(x), ref(x))
