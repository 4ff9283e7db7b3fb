import pytest
import torch
import torchvision

from lib.utils.errors import UserError
from lib.utils.layers import quantizable_layers
from models import default_pretrained_path, get_model, list_models

RESNET50_10PCT = [6, 6, 6, 6, 5, 5, 6, 5, 5, 6, 5, 5, 6, 5, 5, 5, 5, 5, 4, 5, 4, 4, 5, 4, 4, 4, 3,
                  4, 4, 4, 3, 4, 4, 3, 4, 4, 3, 4, 4, 3, 4, 4, 3, 4, 3, 3, 2, 3, 2, 3, 3, 2, 3, 4]


@pytest.mark.parametrize("name", list_models())
def test_forward_shape_small_input(name):
    torch.manual_seed(0)
    model = get_model(name, num_classes=7, input_size=32).eval()
    with torch.no_grad():
        out = model(torch.randn(2, 3, 32, 32))
    assert out.shape == (2, 7)
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("name", ["mobilenet_v3_small", "squeezenet1_0", "efficientnet_b0"])
def test_torchvision_model_by_name(name):
    model = get_model(name, num_classes=5).eval()
    with torch.no_grad():
        assert model(torch.randn(1, 3, 64, 64)).shape == (1, 5)
    assert len(quantizable_layers(model)) > 0


def test_registry_lists_torchvision_names():
    names = list_models(include_torchvision=True)
    assert "mobilenetv2" in names and "vgg16" in names
    assert names.count("resnet50") == 1


def test_mobilenetv2_layers_and_keys():
    model = get_model("mobilenetv2")
    layers = quantizable_layers(model)
    assert len(layers) == 53
    assert [n for n, _ in layers][:3] == ["features.0.0", "features.1.conv.0", "features.1.conv.3"]
    assert layers[-2][0] == "features.18.0" and layers[-1][0] == "classifier"
    assert isinstance(layers[-1][1], torch.nn.Linear)
    keys = model.state_dict().keys()
    for k in ("features.0.0.weight", "features.1.conv.0.weight", "features.18.0.weight",
              "classifier.weight"):
        assert k in keys
    assert len(model.features) == 19
    # Same tensors, in the same order and shapes, as torchvision's MobileNet-V2.
    tv = torchvision.models.mobilenet_v2()
    assert [p.shape for p in model.parameters()] == [p.shape for p in tv.parameters()]


def test_resnet50_matches_torchvision_and_published_policy():
    model = get_model("resnet50")
    tv = torchvision.models.resnet50()
    assert list(model.state_dict()) == list(tv.state_dict())
    model.load_state_dict(tv.state_dict())  # strict: identical tree
    layers = quantizable_layers(model)
    assert len(layers) == 54
    sizes = [m.weight.numel() for _, m in layers]
    ratio = sum(b * n for b, n in zip(RESNET50_10PCT, sizes)) / (32 * sum(sizes))
    assert ratio <= 0.1
    x = torch.randn(1, 3, 224, 224)
    model.eval(), tv.eval()
    with torch.no_grad():
        assert torch.allclose(model(x), tv(x), atol=1e-5)


def test_unknown_arch_and_width():
    with pytest.raises(UserError, match="unknown arch"):
        get_model("nope")
    with pytest.raises(UserError, match="width_mult"):
        get_model("resnet18", width_mult=0.5)


def test_default_pretrained_path():
    assert default_pretrained_path("qmobilenetv2", "mnist5k").endswith("mobilenetv2_mnist5k.pth.tar")
    assert default_pretrained_path("resnet50", "imagenet").endswith("pretrained/resnet50.pth.tar")


def test_qmobilenetv2_half_wave_inputs_follow_the_relus():
    model = get_model("qmobilenetv2")
    layers = quantizable_layers(model, linear=True)
    assert len(layers) == 53
    full = {n for n, m in layers if not m.half_wave}
    expand = {f"features.{i}.conv.0" for i in range(2, 18)}
    # stem (image), expand 1x1 convs and the final 1x1 read signed inputs; all else a ReLU6.
    assert full == {"features.0.0", "features.18.0"} | expand


def test_float_checkpoint_loads_into_q_twin():
    from lib.utils.checkpoint import load_state_dict
    src = get_model("mobilenetv2", num_classes=10, input_size=32, width_mult=0.25)
    dst = get_model("qmobilenetv2", num_classes=10, input_size=32, width_mult=0.25)
    missing, unexpected = load_state_dict(dst, src.state_dict())
    assert unexpected == []
    assert missing and all(k.endswith(("activation_range", "weight_range")) for k in missing)


@pytest.mark.parametrize("ours,theirs", [("mobilenetv2", "mobilenet_v2"), ("qresnet50", "resnet50")])
def test_torchvision_weights_map_onto_our_trees(ours, theirs):
    """The weights API path: torchvision's tensors land on our names, in order (no download)."""
    from models import rename_by_order
    tv = getattr(torchvision.models, theirs)()
    model = get_model(ours)
    mapped = rename_by_order(tv.state_dict(), model)
    missing, unexpected = model.load_state_dict(mapped, strict=False)
    assert not unexpected
    assert all(k.endswith(("activation_range", "weight_range")) for k in missing)
    src_w = tv.features[1].conv[0][0].weight if theirs == "mobilenet_v2" else tv.layer1[0].conv1.weight
    dst_w = model.features[1].conv[0].weight if ours == "mobilenetv2" else model.layer1[0].conv1.weight
    assert torch.equal(src_w, dst_w)


def test_missing_local_weights_on_small_data_is_one_line(tmp_path):
    from models import load_pretrained_weights
    with pytest.raises(UserError, match="pretrain.py --arch mobilenetv2 --dataset mnist5k"):
        load_pretrained_weights(get_model("qmobilenetv2", 10, 32), "qmobilenetv2", "mnist5k",
                                str(tmp_path / "none.pth.tar"))
