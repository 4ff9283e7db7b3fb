"""Packed export (issue 15, part 2): bit packing, bit-exact rebuild, sizes, refusing bad files."""
import os
import struct
import subprocess
import sys

import numpy as np
import pytest
import torch

from lib.export import (export_checkpoint, load_packed, pack_bits, packed_nbytes, read_packed,
                        size_report, unpack_bits)
from lib.export.__main__ import main as export_main
from lib.export.report import model_from_checkpoint
from lib.quantize import apply_linear_policy, calibrate, quant_layers
from lib.utils.checkpoint import load_checkpoint, save_checkpoint
from lib.utils.errors import UserError, run_cli
from models import get_model

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.parametrize("bits", range(1, 9))
def test_bit_packing_round_trips_every_width(bits):
    rng = np.random.default_rng(bits)
    for n in (1, 3, 7, 8, 9, 1001, (1 << 18) + 5):     # also across the packer's chunks
        values = rng.integers(0, 2 ** bits, n)
        values[0] = 2 ** bits - 1
        data = pack_bits(values, bits)
        assert len(data) == packed_nbytes(n, bits) == (n * bits + 7) // 8
        assert np.array_equal(unpack_bits(data, bits, n), values)


def test_bit_packing_layout_is_little_endian():
    """Value i sits at stream bits [i*b, (i+1)*b), least significant bit first."""
    assert pack_bits([1, 2, 3], 2) == bytes([0b00111001])
    assert pack_bits([5], 3) == bytes([0b101])
    assert pack_bits([0x1ff], 9) == bytes([0xff, 0x01])


@pytest.fixture(scope="module")
def kmeans_ckpt(kmeans_finetune_checkpoint):
    """A real finetune.py K-Means checkpoint (1 epoch, 7-bit layers clustered at the end)."""
    return kmeans_finetune_checkpoint(lambda i: (2, 3, 7)[i % 3])


@pytest.fixture(scope="module")
def linear_ckpt(tmp_path_factory):
    """A linear-mode checkpoint in finetune.py's format for torchvision's mobilenet_v3_small
    (no Q twin: its layers are swapped), every width 1..8 among its weights.

    ``weight_range`` is set to max|w| explicitly, so the clip is the same whether the
    fake quantization reads the stored range or recomputes max|w|.
    """
    torch.manual_seed(0)
    kwargs = dict(num_classes=10, input_size=32, width_mult=None)
    model = get_model("mobilenet_v3_small", linear=True, **kwargs)
    n = len(quant_layers(model))
    policy = [[8, -1]] + [[b, 9 - b] for b in (1, 2, 3, 4, 5, 6, 7, 8)] * 7
    policy = policy[:n - 1] + [[8, 8]]
    apply_linear_policy(model, policy)
    calibrate(model, torch.randn(8, 3, 32, 32))
    for m in quant_layers(model):
        m.weight_range.fill_(float(m.weight.detach().abs().max()))
    root = tmp_path_factory.mktemp("export_lin")
    path = root / "checkpoint.pth.tar"
    save_checkpoint({"state_dict": model.state_dict(), "arch": "mobilenet_v3_small",
                     "mode": "linear", "model_kwargs": kwargs, "epoch": 1,
                     "policy": {"mode": "linear", "strategy": policy, "layers": None}}, path)
    return str(path)


@pytest.fixture(scope="module")
def linear_packed(linear_ckpt, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("packed") / "lin.haq")
    return out, export_checkpoint(linear_ckpt, out)


def _max_logit_diff(packed, ckpt):
    model, _ = load_packed(packed)
    reference = model_from_checkpoint(load_checkpoint(ckpt))
    x = torch.randn(16, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        a, b = model(x), reference(x)
    return float((a - b).abs().max()), float(b.abs().max())


def test_kmeans_export_rebuilds_the_same_logits(kmeans_ckpt, tmp_path, capsys):
    out = str(tmp_path / "km.haq")
    export_main(["--resume", kmeans_ckpt, "--output", out])
    diff, scale = _max_logit_diff(out, kmeans_ckpt)
    assert diff <= 1e-6 and scale > 0
    state, header = read_packed(out)
    ckpt = load_checkpoint(kmeans_ckpt)
    for name, bits in zip(ckpt["policy"]["layers"], ckpt["policy"]["strategy"]):
        (entry,) = [e for e in header["entries"] if e["key"] == f"{name}.weight"]
        assert entry["encoding"] == "kmeans" and entry["bits"] == bits
        assert entry["indices"]["nbytes"] == packed_nbytes(entry["count"], bits)
        assert entry["codebook"]["count"] <= 2 ** bits
    # the weight part is the simulator's size cost to within a byte per layer
    n_weights = sum(e["count"] for e in header["entries"] if e["encoding"] == "kmeans")
    predicted = sum(b * e["count"] for b, e in zip(ckpt["policy"]["strategy"], (
        e for e in header["entries"] if e["encoding"] == "kmeans"))) / 8
    assert 0 <= header["sizes"]["weights"] - predicted < len(ckpt["policy"]["strategy"])
    assert header["sizes"]["weights"] < n_weights      # under 8 bits a weight (fp32: 32)
    assert os.path.getsize(out) == header["file_bytes"]


def test_linear_export_rebuilds_the_same_logits(linear_ckpt, linear_packed):
    out, header = linear_packed
    diff, scale = _max_logit_diff(out, linear_ckpt)
    assert diff <= 1e-6 and scale > 0
    entries = {e["key"]: e for e in header["entries"]}
    first, second = entries["features.0.0.weight"], entries["features.1.block.0.0.weight"]
    assert first["encoding"] == "linear" and first["bits"] == 8
    assert second["bits"] == 1 and second["indices"]["nbytes"] == packed_nbytes(second["count"], 1)
    bn = entries["features.0.1.weight"]
    assert bn["encoding"] == "float" and bn["dtype"] == "float32"
    # the file records the half-wave decisions (the stem reads the signed image)
    assert header["half_wave"]["features.0.0"] is False
    report = "\n".join(size_report(header))
    assert "weights" in report and "codebooks_scales" in report and "whole file" in report


def test_load_cli_prints_sizes_and_logit_difference(linear_ckpt, linear_packed):
    proc = subprocess.run([sys.executable, "-m", "lib.export", "--load", linear_packed[0],
                           "--resume", linear_ckpt], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    line = [ln for ln in proc.stderr.splitlines() if "max |logit difference|" in ln][0]
    assert float(line.rsplit(":", 1)[1]) <= 1e-6
    assert "whole file" in proc.stderr


def _corrupt(src, dst, how):
    data = bytearray(open(src, "rb").read())
    if how == "truncate":
        data = data[:len(data) // 2]
    elif how == "flip":
        data[len(data) // 2] ^= 0x10
    elif how == "header":      # a bit flipped inside the JSON header
        head_len = struct.unpack_from("<Q", data, 8)[0]
        data[16 + head_len // 2] ^= 0x01
    open(dst, "wb").write(bytes(data))


@pytest.mark.parametrize("how", ["truncate", "flip", "header"])
def test_truncated_or_altered_file_is_refused_with_one_line(linear_packed, tmp_path, how, capsys):
    bad = str(tmp_path / "bad.haq")
    _corrupt(linear_packed[0], bad, how)
    with pytest.raises(UserError, match="checksum"):
        load_packed(bad)
    with pytest.raises(SystemExit) as exc:
        run_cli(export_main, ["--load", bad])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and len(err.strip().splitlines()) == 1
    assert "checksum" in err and "Traceback" not in err


def test_other_files_are_refused(tmp_path, kmeans_ckpt):
    with pytest.raises(UserError, match="not a packed HAQ model"):
        load_packed(kmeans_ckpt)
    with pytest.raises(UserError, match="not found"):
        load_packed(str(tmp_path / "missing.haq"))
    with pytest.raises(UserError, match="records no policy"):
        model_from_checkpoint({"state_dict": {}})


def test_unshared_kmeans_weights_are_refused(tmp_path, tiny_pretrained):
    """A K-Means layer with more distinct values than 2^b cannot be packed at b bits."""
    weights, model = tiny_pretrained
    n = sum(isinstance(m, (torch.nn.Conv2d, torch.nn.Linear)) for m in model.modules())
    path = tmp_path / "float.pth.tar"
    save_checkpoint({"state_dict": model.state_dict(), "arch": "mobilenetv2", "mode": "kmeans",
                     "model_kwargs": dict(num_classes=10, input_size=32, width_mult=0.25),
                     "policy": {"strategy": [4] * n, "layers": None}}, path)
    with pytest.raises(UserError, match="distinct weights, more than 2\\^4"):
        export_checkpoint(str(path), str(tmp_path / "x.haq"))


@pytest.mark.parametrize("case", ["output_is_folder", "output_is_checkpoint", "batch_0",
                                  "batch_negative", "seed_negative"])
def test_export_bad_arguments_are_one_line_errors(kmeans_ckpt, tmp_path, capsys, case):
    """Nothing is written; the checkpoint stays as it was (an --output naming it replaced it)."""
    with open(kmeans_ckpt, "rb") as f:
        before = f.read()
    (tmp_path / "in").mkdir()
    ckpt = str(tmp_path / "in" / "checkpoint.pth.tar")
    with open(ckpt, "wb") as f:
        f.write(before)
    folder = tmp_path / "out"
    folder.mkdir()
    out = str(folder / "model.haq")
    argv = {"output_is_folder": ["--resume", ckpt, "--output", str(folder)],
            "output_is_checkpoint": ["--resume", ckpt, "--output", ckpt],
            "batch_0": ["--resume", ckpt, "--output", out, "--batch", "0"],
            "batch_negative": ["--resume", ckpt, "--output", out, "--batch", "-3"],
            "seed_negative": ["--resume", ckpt, "--output", out, "--seed", "-1"]}[case]
    with pytest.raises(SystemExit) as exc:
        run_cli(export_main, argv)
    err = capsys.readouterr().err
    assert exc.value.code == 2 and "Traceback" not in err
    assert err.startswith("error: ") and len(err.strip().splitlines()) == 1
    assert os.listdir(folder) == [] and os.listdir(tmp_path / "in") == ["checkpoint.pth.tar"]
    with open(ckpt, "rb") as f:
        assert f.read() == before
