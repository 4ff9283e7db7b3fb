"""ONNX export (issue 32): ONNX Runtime runs the quantized model as PyTorch does.

Fast tests use a four-layer network (stem, depthwise, pointwise, classifier) at a mixed policy;
torch.onnx.export of MobileNet-V2 takes half a minute on 2 shared cores, so the embedded model
and a torchvision model are exported in the slow tests.
"""
import hashlib
import json
import sys

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

from onnx import TensorProto  # noqa: E402

from lib.export import onnx_export  # noqa: E402
from lib.export.__main__ import main as export_main  # noqa: E402
from lib.export.onnx_export import build_onnx, compare, ort_session  # noqa: E402
from lib.export.onnx_graph import initializer_array, read_metadata  # noqa: E402
from lib.quantize import QConv2d, QLinear, apply_linear_policy, calibrate  # noqa: E402
from lib.quantize.kmeans import kmeans_quantize_model  # noqa: E402
from lib.quantize.linear import n_steps  # noqa: E402
from lib.export.report import model_from_checkpoint  # noqa: E402
from lib.utils.checkpoint import load_checkpoint, save_checkpoint  # noqa: E402
from lib.utils.errors import run_cli  # noqa: E402

SIZE = 16
LINEAR_POLICY = [[3, 8], [2, 5], [7, 2], [8, 8]]      # weights int4, int4, int8, int8
KMEANS_POLICY = [2, 3, 5, 8]


class Tiny(nn.Module):
    """stem (signed image input) -> BN -> ReLU -> depthwise -> ReLU -> pointwise -> ReLU -> fc."""

    def __init__(self, linear):
        super().__init__()
        conv, fc = (QConv2d, QLinear) if linear else (nn.Conv2d, nn.Linear)
        extra = {"half_wave": False} if linear else {}
        self.stem = conv(3, 8, 3, padding=1, bias=False, **extra)
        self.bn = nn.BatchNorm2d(8)
        self.dw = conv(8, 8, 3, padding=1, groups=8, bias=False)
        self.pw = conv(8, 16, 1)
        self.fc = fc(16, 10)

    def forward(self, x):
        x = F.relu(self.bn(self.stem(x)))
        x = F.relu(self.pw(F.relu(self.dw(x))))
        return self.fc(x.mean((2, 3)))


def _images(n, seed):
    return torch.randn(n, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(seed))


def _ckpt(mode, policy):
    return {"mode": mode, "arch": "tiny", "model_kwargs": {"input_size": SIZE},
            "policy": {"mode": mode, "strategy": policy, "layers": None, "preserve_ratio": 0.5,
                       "metric": "latency", "cost_ratio": 0.49}}


def _tiny_linear():
    torch.manual_seed(0)
    model = Tiny(linear=True)
    with torch.no_grad():
        model.bn.running_var.uniform_(0.5, 2.0)
    apply_linear_policy(model, LINEAR_POLICY)
    calibrate(model, _images(64, 1))
    return model.eval()


def _tiny_kmeans():
    torch.manual_seed(0)
    model = Tiny(linear=False)
    kmeans_quantize_model(model, KMEANS_POLICY, seed=0)
    return model.eval()


@pytest.fixture(scope="module")
def linear_export():
    model = _tiny_linear()
    proto, check = build_onnx(model, _ckpt("linear", LINEAR_POLICY), batch=32)
    return model, proto, check


@pytest.fixture(scope="module")
def kmeans_export():
    model = _tiny_kmeans()
    proto, check = build_onnx(model, _ckpt("kmeans", KMEANS_POLICY), batch=32)
    return model, proto, check


def _assert_agrees(model, proto, n=512):
    """Same top-1 on every one of ``n`` images, logits within the exporter's tolerance."""
    diff, top, flips = compare(ort_session(proto.SerializeToString()), model, _images(n, 7))
    assert flips == 0
    assert top > 0 and diff <= onnx_export.LOGIT_TOL * top


def test_linear_graph_runs_as_the_fake_quant_model(linear_export):
    model, proto, check = linear_export
    assert check["max_abs_logit_diff"] <= check["tolerance"]
    _assert_agrees(model, proto)
    ops = [n.op_type for n in proto.graph.node]
    assert ops.count("QuantizeLinear") == 4 and ops.count("DequantizeLinear") == 8
    assert proto.opset_import[0].version == 21
    onnx.checker.check_model(proto, full_check=True)


def test_linear_weights_hold_only_their_widths_integers(linear_export):
    model, proto, _ = linear_export
    inits = {t.name: t for t in proto.graph.initializer}
    for (name, module), (w_bit, _) in zip(
            [(n, m) for n, m in model.named_modules() if hasattr(m, "w_bit")], LINEAR_POLICY):
        assert f"{name}.weight" not in inits          # no float copy of the weight is left
        codes = initializer_array(proto, f"{name}.weight_quantized")
        assert inits[f"{name}.weight_quantized"].data_type == (
            TensorProto.INT4 if w_bit <= 4 else TensorProto.INT8)
        assert np.abs(codes).max() <= n_steps(w_bit, signed=True)
        scale = initializer_array(proto, f"{name}.weight_scale")
        with torch.no_grad():
            expected = module.quantized_weight().numpy()
        assert np.array_equal(codes.astype(np.float32) * scale, expected)


def test_linear_inputs_are_clipped_to_their_grids(linear_export):
    model, proto, _ = linear_export
    for name, signed in (("stem", True), ("dw", False), ("pw", False), ("fc", False)):
        module = getattr(model, name)
        r = float(module.activation_range.detach())
        lo, hi = (initializer_array(proto, f"{name}_input_{k}") for k in ("lo", "hi"))
        assert float(lo) == (-r if signed else 0.0) and float(hi) == r
        zero = [t for t in proto.graph.initializer if t.name == f"{name}_input_zero_point"][0]
        assert zero.data_type == (TensorProto.INT8 if signed else TensorProto.UINT8)
        scale = float(initializer_array(proto, f"{name}_input_scale"))
        assert scale == float(module.activation_range.detach()[0] / n_steps(module.a_bit, signed))


def test_kmeans_graph_gathers_the_shared_weights(kmeans_export):
    model, proto, _ = kmeans_export
    _assert_agrees(model, proto)
    for (name, module), bits in zip(
            [(n, m) for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))],
            KMEANS_POLICY):
        idx = initializer_array(proto, f"{name}.weight_indices")
        codebook = initializer_array(proto, f"{name}.weight_codebook")
        stored = [t for t in proto.graph.initializer if t.name == f"{name}.weight_indices"][0]
        assert stored.data_type == (TensorProto.UINT4 if bits <= 4 else TensorProto.UINT8)
        assert codebook.size <= 2 ** bits and idx.max() < codebook.size
        assert np.array_equal(codebook[idx.astype(np.int64)], module.weight.detach().numpy())
        assert not any(t.name == f"{name}.weight" for t in proto.graph.initializer)


def test_per_channel_ranges_give_per_axis_scales():
    """A weight_range with one element per output channel: DequantizeLinear along axis 0."""
    from lib.export.onnx_export import torch_to_onnx
    from lib.export.onnx_graph import GraphEditor
    torch.manual_seed(0)
    model = Tiny(linear=False).eval()
    proto = torch_to_onnx(model, SIZE)
    w = model.pw.weight.detach()
    scale = w.abs().amax((1, 2, 3)) / 127
    codes = torch.round(w / scale.reshape(-1, 1, 1, 1))
    editor = GraphEditor(proto)
    q_name = editor.dequantized_weight("pw.weight", codes.to(torch.int32).numpy(),
                                       scale.numpy(), TensorProto.INT8)
    proto = editor.finish()
    (node,) = [n for n in proto.graph.node if q_name in n.input]
    assert [a.i for a in node.attribute if a.name == "axis"] == [0]
    with torch.no_grad():
        model.pw.weight.copy_(codes * scale.reshape(-1, 1, 1, 1))
    diff, top, flips = compare(ort_session(proto.SerializeToString()), model, _images(64, 3))
    assert flips == 0 and diff <= 1e-5 * top


@pytest.fixture
def tiny_cli(monkeypatch, tmp_path):
    """A linear checkpoint file of the tiny network; the CLI rebuilds it through the stub."""
    model = _tiny_linear()
    ckpt = dict(_ckpt("linear", LINEAR_POLICY), state_dict=model.state_dict(), epoch=1)
    path = tmp_path / "checkpoint.pth.tar"
    save_checkpoint(ckpt, path)
    monkeypatch.setattr(onnx_export, "model_from_checkpoint", lambda _: _tiny_linear())
    return str(path), ckpt


def test_cli_writes_the_policy_and_source_hash_into_metadata(tiny_cli, tmp_path):
    path, ckpt = tiny_cli
    out = str(tmp_path / "tiny.onnx")
    assert export_main(["--format", "onnx", "--resume", path, "--output", out]) == 0
    meta = read_metadata(out)
    assert meta["source"]["sha256"] == hashlib.sha256(open(path, "rb").read()).hexdigest()
    assert meta["policy"] == {"mode": "linear", "layers": ["stem", "dw", "pw", "fc"],
                              "bits": LINEAR_POLICY, "budget": 0.5,
                              "cost": {"metric": "latency", "hardware": None, "cost": None,
                                       "cost_ratio": 0.49}}
    assert meta["arch"] == "tiny" and meta["format"] == "haq-onnx"
    assert meta["check"]["max_abs_logit_diff"] <= meta["check"]["tolerance"]
    json.dumps(meta, allow_nan=False)


def test_a_disagreeing_graph_is_refused_and_nothing_written(tiny_cli, tmp_path, monkeypatch,
                                                            capsys):
    path, _ = tiny_cli
    real = onnx_export.linear_weight_codes

    def wrong_scale(name, module):
        codes, scale = real(name, module)
        return codes, scale * 1.5
    monkeypatch.setattr(onnx_export, "linear_weight_codes", wrong_scale)
    out = tmp_path / "bad.onnx"
    with pytest.raises(SystemExit) as exc:
        run_cli(export_main, ["--format", "onnx", "--resume", path, "--output", str(out)])
    assert exc.value.code == 2 and not out.exists()
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ONNX Runtime disagrees") and "\n" not in err


def test_missing_onnxruntime_says_how_to_install(tiny_cli, tmp_path, monkeypatch, capsys):
    path, _ = tiny_cli
    monkeypatch.setitem(sys.modules, "onnxruntime", None)
    with pytest.raises(SystemExit) as exc:
        run_cli(export_main, ["--format", "onnx", "--resume", path,
                              "--output", str(tmp_path / "x.onnx")])
    err = capsys.readouterr().err.strip()
    assert exc.value.code == 2 and "\n" not in err
    assert "onnxruntime" in err and "pip install -r requirements-onnx.txt" in err


def _settle_batchnorm(model, size):
    """BN statistics of a few random batches: at initialisation (mean 0, variance 1) a deep
    network's activations shrink towards 0 layer after layer, and its logits (~1e-7) would be
    all rounding."""
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.momentum = None       # the plain average of the batches
    model.train()
    with torch.no_grad():
        for _ in range(4):
            model(torch.randn(32, 3, size, size))


def _linear_model(arch, kwargs, seed=0):
    """``arch`` in linear mode at widths 2-8 across layers, calibrated: (model, policy)."""
    from lib.quantize import quant_layers
    from models import get_model
    torch.manual_seed(seed)
    model = get_model(arch, linear=True, **kwargs)
    _settle_batchnorm(model, kwargs["input_size"])
    n = len(quant_layers(model))
    policy = [[8, -1]] + [[2 + i % 7, 2 + (3 * i + 4) % 7] for i in range(n - 2)] + [[8, 8]]
    apply_linear_policy(model, policy)
    calibrate(model, torch.randn(32, 3, kwargs["input_size"], kwargs["input_size"]))
    return model.eval(), policy


def _linear_checkpoint(path, arch, kwargs):
    """A linear-mode checkpoint of ``arch`` in finetune.py's format (see _linear_model)."""
    model, policy = _linear_model(arch, kwargs)
    save_checkpoint({"state_dict": model.state_dict(), "arch": arch, "mode": "linear",
                     "model_kwargs": kwargs, "epoch": 1,
                     "policy": {"mode": "linear", "strategy": policy, "layers": None}}, path)
    return str(path), policy


def _agrees_on_the_test_split(model, onnx_bytes):
    """ONNX Runtime against PyTorch on mnist5k's 1,000 test images: the logits agree within the
    exporter's tolerance except on the few images where a float sum sits on a rounding midpoint
    of an input grid (onnx_export.LOGIT_TOL's comment).  These untrained networks have
    near-equal logits, so such a tie may change the top-1 of its image; the trained embedded
    model's top-1 is the same on every image (docs/results.md, ONNX export)."""
    from lib.utils.data_utils import build_datasets
    _, test_set = build_datasets("mnist5k", input_size=32)
    x = torch.stack([test_set[i][0] for i in range(len(test_set))])
    got = onnx_export.run_session(ort_session(onnx_bytes), x)
    with torch.no_grad():
        want = model(x)
    off = (got - want).abs().amax(1) > onnx_export.LOGIT_TOL * want.abs().max()
    flips = got.argmax(1) != want.argmax(1)
    assert len(x) == 1000 and int(off.sum()) <= 20 and int(flips.sum()) <= 5
    assert not (flips & ~off).any()      # a changed top-1 only where a tie moved the logits


@pytest.mark.slow
def test_embedded_model_both_modes_on_the_test_split(kmeans_finetune_checkpoint, tmp_path):
    kw = dict(num_classes=10, input_size=32, width_mult=0.25)
    lin, policy = _linear_checkpoint(tmp_path / "lin.pth.tar", "qmobilenetv2", kw)
    km = kmeans_finetune_checkpoint(lambda i: 2 + i % 7)
    for ckpt, name in ((lin, "lin.onnx"), (km, "km.onnx")):
        out = str(tmp_path / name)
        assert export_main(["--format", "onnx", "--resume", ckpt, "--output", out]) == 0
        model = model_from_checkpoint(load_checkpoint(ckpt))
        _agrees_on_the_test_split(model, open(out, "rb").read())
    assert read_metadata(str(tmp_path / "lin.onnx"))["policy"]["bits"] == policy


@pytest.mark.slow
def test_a_torchvision_model_without_a_q_twin_exports(tmp_path):
    """mnasnet0_5, its layers swapped for Q layers, from its finetune.py-format checkpoint
    (which loads although a checkpoint keeps no module-version metadata)."""
    kwargs = dict(num_classes=10, input_size=32, width_mult=None)
    ckpt, policy = _linear_checkpoint(tmp_path / "mnas.pth.tar", "mnasnet0_5", kwargs)
    out = str(tmp_path / "mnas.onnx")
    assert export_main(["--format", "onnx", "--resume", ckpt, "--output", out]) == 0
    proto = onnx.load(out)
    ops = [n.op_type for n in proto.graph.node]
    assert ops.count("QuantizeLinear") == len(policy) - 1      # the first layer's input is float
    model = model_from_checkpoint(load_checkpoint(ckpt))
    _agrees_on_the_test_split(model, proto.SerializeToString())


def test_onnx_format_wants_a_checkpoint_and_an_output(tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        run_cli(export_main, ["--format", "onnx", "--load", str(tmp_path / "m.haq")])
    err = capsys.readouterr().err.strip()
    assert exc.value.code == 2 and "\n" not in err
    assert "expected --resume CKPT --output FILE" in err
