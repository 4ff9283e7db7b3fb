"""Tests of lib.simulator: shapes, the BISMO/BitFusion models, tables, cost objects, CLI."""
import json
import math
import re
from dataclasses import dataclass

import numpy as np
import pytest
import torch.nn as nn

from lib.simulator import (HARDWARE, METRICS, BismoConfig, CostModel, LayerCost, LayerShape,
                           SizeCost, TableCost, bismo_edge, bitfusion, build_table,
                           extract_layer_shapes, get_hardware, get_table, list_hardware,
                           load_user_table)
from lib.simulator.__main__ import main as cli_main
from lib.utils.errors import UserError, run_cli
from models import get_model

HW_METRICS = [(name, metric) for name in list_hardware() for metric in get_hardware(name).metrics]


def fc_shape(m, k, n):
    """A fully-connected layer as a GEMM of m x k by k x n (m = batch)."""
    return LayerShape(name="fc", kind="linear", batch=m, in_channels=k, out_channels=n,
                      kernel=(1, 1), stride=(1, 1), groups=1, in_h=1, in_w=1, out_h=1,
                      out_w=1, M=m, K=k, N=n, n_inputs=m * k, n_weights=k * n,
                      n_outputs=m * n)


@pytest.fixture(scope="module")
def nets():
    return {arch: get_model(arch) for arch in ("mobilenetv2", "resnet50")}


@pytest.fixture(scope="module")
def net_shapes(nets):
    return {arch: extract_layer_shapes(model, 224, batch=16) for arch, model in nets.items()}


def tiny_net():
    return nn.Sequential(nn.Conv2d(4, 8, 3, stride=1, padding=1, groups=2), nn.ReLU(),
                         nn.Flatten(), nn.Linear(8 * 10 * 10, 5))


# ---------------------------------------------------------------- shapes
def test_grouped_conv_shape_and_exact_bismo_cycles():
    model = tiny_net().train()
    conv, fc = extract_layer_shapes(model, 10, batch=3)
    assert model.training, "the trace must restore the training flag"
    assert (conv.M, conv.K, conv.N, conv.groups) == (3 * 10 * 10, 2 * 3 * 3, 4, 2)
    assert (conv.n_inputs, conv.n_weights, conv.n_outputs) == (3 * 400, 8 * 2 * 9, 3 * 800)
    assert (fc.M, fc.K, fc.N) == (3, 800, 5)
    hw = bismo_edge()   # 8 x 256 x 8
    # per group: w*a * ceil(300/8) * ceil(4/8) * ceil(18/256) = 6 * 38 * 1 * 1; two groups
    assert hw.layer_cost(conv, 2, 3).compute_cycles == 2 * 6 * 38
    # 20 x 600 x 10 GEMM at w3a2: 6 * ceil(20/8) * ceil(10/8) * ceil(600/256) = 6 * 3 * 2 * 3
    assert hw.layer_cost(fc_shape(20, 600, 10), 3, 2).compute_cycles == 108


def test_real_forward_fallback_gives_the_same_shapes(monkeypatch):
    from lib.simulator import shapes as mod
    model = tiny_net()
    fast = extract_layer_shapes(model, 10, batch=2)

    def no_meta(*args):
        raise NotImplementedError("no meta kernel")
    monkeypatch.setattr(mod, "_forward_meta", no_meta)
    assert extract_layer_shapes(model, 10, batch=2) == fast
    assert next(model.parameters()).device.type == "cpu"


def test_network_layer_counts(net_shapes):
    mb, rn = net_shapes["mobilenetv2"], net_shapes["resnet50"]
    assert len(mb) == 53 and len(rn) == 54
    assert sum(s.depthwise for s in mb) == 17
    assert (mb[0].M, mb[0].K, mb[0].N) == (16 * 112 * 112, 27, 32)
    assert (rn[-1].kind, rn[-1].M, rn[-1].K, rn[-1].N) == ("linear", 16, 2048, 1000)


# ---------------------------------------------------------------- BISMO
def test_bismo_switches_from_memory_to_compute_bound_where_the_formula_says():
    # 256 x 256 x 256 at b bits on 8x256x8 / 64 bits per cycle, 32-bit outputs:
    #   compute = b^2 * 32 * 32 * 1 = 1024 b^2
    #   memory  = (b*65536 + b*65536 + 32*65536) / 64 = 2048 b + 32768
    # compute > memory  <=>  b^2 - 2b - 32 > 0  <=>  b > 1 + sqrt(33) = 6.74
    shape, hw = fc_shape(256, 256, 256), bismo_edge()
    for b in range(1, 9):
        cost = hw.layer_cost(shape, b, b)
        assert cost.compute_cycles == 1024 * b * b
        assert cost.memory_cycles == 2048 * b + 32768
        assert cost.bound == ("compute" if b >= 7 else "memory"), b
        assert cost.cycles == max(cost.compute_cycles, cost.memory_cycles) + hw.overhead_cycles
    assert hw.layer_cost(shape, 8, 8).latency_ms == pytest.approx((65536 + 1000) / 200e3)


def test_bismo_refetches_the_lhs_per_n_tile_when_it_overflows_the_buffer():
    hw = BismoConfig(name="tiny", dm=2, dk=64, dn=2, freq_mhz=100, dram_bits_per_cycle=8,
                     buffer_depth=4, out_bits=32, overhead_cycles=0)   # LHS buffer 512 bits
    fits, spills = fc_shape(4, 16, 6), fc_shape(8, 16, 6)               # 4*16*8 = 512 <= 512
    assert hw.layer_cost(fits, 8, 8).dram_bits == 8 * 96 + 8 * 64 + 32 * 24
    # K = 16 takes 1 word of dk bits per weight bit: the 4-deep RHS buffer holds
    # 4 // w column tiles of dn = 2: N = 6 needs 3 fills at w >= 3, 2 at w = 2, 1 at w = 1
    for w, fills in ((8, 3), (3, 3), (2, 2), (1, 1)):
        expected = w * 96 + 8 * 128 * fills + 32 * 48
        assert hw.layer_cost(spills, w, 8).dram_bits == expected, w


def test_strided_1x1_conv_reads_a_quarter_of_its_input():
    model = nn.Sequential(nn.Conv2d(16, 32, 1, stride=2))
    (s,) = extract_layer_shapes(model, 8, batch=1)
    hw = BismoConfig(name="big", dm=8, dk=256, dn=8, freq_mhz=100, dram_bits_per_cycle=64)
    assert hw.layer_cost(s, 8, 8).dram_bits == 8 * 512 + 8 * (16 * 64) // 4 + 32 * 32 * 16


def test_bismo_has_no_energy_model():
    with pytest.raises(UserError, match="bitfusion"):
        build_table([fc_shape(4, 4, 4)], "bismo_edge", "energy")


# ---------------------------------------------------------------- BitFusion
def test_bitfusion_rounds_widths_to_2_4_8(net_shapes):
    for metric in ("latency", "energy"):
        t = build_table(net_shapes["mobilenetv2"], "bitfusion", metric)
        for fused, widths in ((2, [1]), (4, [3]), (8, [5, 6, 7])):
            for b in widths:
                np.testing.assert_array_equal(t[:, b - 1, :], t[:, fused - 1, :])
                np.testing.assert_array_equal(t[:, :, b - 1], t[:, :, fused - 1])
        assert (t[:, 3, 3] < t[:, 7, 7]).any()


def test_bitfusion_throughput_scales_with_fused_products():
    shape, hw = fc_shape(1024, 4096, 256), bitfusion()   # compute-bound GEMM
    c8, c4, c2 = (hw.layer_cost(shape, b, b).compute_cycles for b in (8, 4, 2))
    assert c8 == 1024 * math.ceil(256 / 32) * math.ceil(4096 / 16)
    assert (c8 // c4, c8 // c2) == (4, 16)


# ---------------------------------------------------------------- tables
@pytest.mark.parametrize("hardware,metric", HW_METRICS)
def test_tables_non_decreasing_in_w_and_a(net_shapes, hardware, metric):
    for shapes in net_shapes.values():
        t = build_table(shapes, hardware, metric)
        assert t.shape == (len(shapes), 8, 8) and np.all(t > 0)
        assert np.all(np.diff(t, axis=1) >= 0), "must not decrease in w"
        assert np.all(np.diff(t, axis=2) >= 0), "must not decrease in a"


def test_get_table_shapes_cache_and_rebuild(tmp_path, nets):
    mb = nets["mobilenetv2"]
    t = get_table("mobilenetv2", "imagenet", "bismo_edge", "latency", 16, model=mb,
                  cache_dir=tmp_path)
    assert t.shape == (53, 8, 8)
    rn = get_table("resnet50", "imagenet", "bitfusion", "energy", 16,
                   model=nets["resnet50"], cache_dir=tmp_path)
    assert rn.shape == (54, 8, 8)
    path = tmp_path / "mobilenetv2_imagenet_224px_w1_batch16_bismo_edge_latency_table.npy"
    meta = json.loads(path.with_suffix(".meta.json").read_text())
    assert meta["unit"] == "ms" and len(meta["layers"]) == 53
    assert not list(tmp_path.glob("*.tmp"))
    np.save(path, np.zeros((53, 8, 8)))       # a cache hit returns the file's content ...
    assert not get_table("mobilenetv2", "imagenet", "bismo_edge", "latency", 16, model=mb,
                         cache_dir=tmp_path).any()
    smaller = get_table("mobilenetv2", "imagenet", "bismo_edge", "latency", 16,
                        model=get_model("mobilenetv2", width_mult=0.5), cache_dir=tmp_path)
    assert smaller.any(), "... but a table built for another model is rebuilt"


def test_wrong_shape_user_table_is_a_one_line_error(tmp_path, capsys):
    path = tmp_path / "mine.npy"
    np.save(path, np.ones((52, 8, 8)))
    with pytest.raises(UserError, match=r"expected \(53, 8, 8\)"):
        load_user_table(str(path), 53)

    def main(_):
        load_user_table(str(path), 53)
    with pytest.raises(SystemExit) as exc:
        run_cli(main, [])
    err = capsys.readouterr().err
    assert exc.value.code == 2 and err.count("\n") == 1 and "(53, 8, 8)" in err
    np.save(path, np.ones((53, 8, 8)))
    assert load_user_table(str(path), 53)[0].shape == (53, 8, 8)


# ---------------------------------------------------------------- cost objects
def test_size_cost():
    cost = SizeCost([100, 10, 1])
    assert cost([8, 4, 2]) == 842
    assert cost.reference() == 32 * 111
    assert cost.min_cost(2) == 222
    assert cost.unit == "bit" and cost.to_human(8 * 2 ** 20) == (1.0, "MB")
    with pytest.raises(UserError):
        cost([8, 8])


def test_table_cost():
    table = np.zeros((3, 8, 8))
    for i in range(3):
        table[i] = (i + 1) * np.outer(np.arange(1, 9), np.arange(1, 9))   # (i+1) * w * a
    cost = TableCost(table, min_bit=2, metric="latency")
    assert cost([[8, -1], [4, 2], [3, 3]]) == 64 + 2 * 8 + 3 * 9     # -1 costed as 8
    assert cost.reference() == 64 * (1 + 2 + 3)
    assert cost.min_policy() == [[8, -1], [2, 2], [8, 8]]
    assert cost.min_cost() == 64 + 2 * 4 + 3 * 64
    assert cost.unit == "ms" and cost.to_human(1.5) == (1.5, "ms")
    with pytest.raises(UserError):
        cost([[8, -1], [9, 2], [3, 3]])


# ---------------------------------------------------------------- CLI
def test_cli_summary_and_plot(tmp_path, capsys):
    png = tmp_path / "bars.png"
    cli_main(["--arch", "mobilenetv2", "--hardware", "bismo_cloud", "--metric", "latency",
              "--batch", "16", "--cache_dir", str(tmp_path), "--plot", str(png)])
    out = capsys.readouterr().out
    assert "(53, 8, 8)" in out and "ratio w4a4/w8a8" in out and "memory-bound at w8a8" in out
    assert png.stat().st_size > 0


@pytest.mark.parametrize("argv,needle", [
    (["--hardware", "tpu"], "invalid choice: 'tpu'"),
    (["--hardware", "bismo_edge", "--metric", "energy"], "latency"),
    (["--hardware", "bitfusion", "--metric", "power"], "unknown metric 'power'"),
    (["--hardware", "bitfusion", "--arch", "nonet"], "unknown arch 'nonet'"),
])
def test_cli_bad_input_is_a_one_line_error(tmp_path, capsys, argv, needle):
    argv = ["--arch", "mobilenetv2", "--cache_dir", str(tmp_path), "--no_plot"] + argv
    with pytest.raises(SystemExit) as exc:
        run_cli(cli_main, argv)
    err = capsys.readouterr().err
    assert exc.value.code == 2 and err.startswith("error: ") and needle in err
    assert err.count("\n") == 1


def test_presets_are_registered():
    assert set(HARDWARE) == {"bismo_edge", "bismo_cloud", "bitfusion"}
    assert bismo_edge().peak_binary_tops == pytest.approx(6.55, abs=0.01)


# ---------------------------------------------------------------- the cost-model interface
INTERFACE_SHAPES = [fc_shape(16, 512, 64), fc_shape(1024, 4096, 256), fc_shape(3, 7, 5)]


@pytest.mark.parametrize("name", list_hardware())
def test_every_registered_cost_model_satisfies_the_interface(name):
    hw = get_hardware(name)
    assert isinstance(hw, CostModel) and hw.name == name and get_hardware(hw) is hw
    assert "size" in hw.metrics and set(hw.metrics) <= set(METRICS)
    assert hw.max_bit >= 8 and isinstance(hw.label, str)
    fields = [f for m, f in (("latency", "latency_ms"), ("energy", "energy_mj"))
              if m in hw.metrics]
    for shape in INTERFACE_SHAPES:
        costs = {(w, a): hw.layer_cost(shape, w, a) for w in range(1, 9) for a in range(1, 9)}
        assert all(isinstance(c, LayerCost) for c in costs.values())
        for (w, a), c in costs.items():
            for field in fields:
                value = getattr(c, field)
                assert math.isfinite(value) and value > 0
                # one more bit of weights or activations never costs less
                if w < 8:
                    assert getattr(costs[w + 1, a], field) >= value, (field, w, a)
                if a < 8:
                    assert getattr(costs[w, a + 1], field) >= value, (field, w, a)
            assert c.cycles >= max(c.compute_cycles, c.memory_cycles)
        assert costs[8, 8].dram_bits > costs[1, 1].dram_bits
    # on a large GEMM every metric strictly grows from 2 to 8 bits (bit-serial passes,
    # fused bricks, bits moved); a tiny layer may fit one cycle at any width
    big = INTERFACE_SHAPES[1]
    for metric in hw.metrics:
        assert hw.table_entry(big, 8, 8, metric) > hw.table_entry(big, 2, 2, metric), metric


def test_the_registry_feeds_the_hardware_choices():
    import rl_quantize
    from lib.simulator.__main__ import get_args_parser as simulator_parser
    for parser in (rl_quantize.get_args_parser(), simulator_parser()):
        (action,) = [a for a in parser._actions if "--hardware" in a.option_strings]
        assert list(action.choices) == list_hardware()


@dataclass(frozen=True)
class ToyCost(CostModel):
    """An accelerator whose every product takes w * a cycles per weight (a registry test)."""
    name: str = "toy"
    label = "Toy"
    metrics = ("latency", "size")

    def layer_cost(self, shape, w_bits, a_bits):
        cycles = w_bits * a_bits * shape.n_weights
        return LayerCost(compute_cycles=cycles, memory_cycles=0, cycles=cycles,
                         latency_ms=cycles / 1e6, dram_bits=0)


def test_a_new_accelerator_is_one_class_and_one_registry_line(monkeypatch, capsys):
    from lib.simulator.__main__ import get_args_parser as simulator_parser
    monkeypatch.setitem(HARDWARE, "toy", ToyCost)
    assert "toy" in list_hardware() and get_hardware("toy") == ToyCost()
    assert simulator_parser().parse_args(["--arch", "x", "--hardware", "toy"]).hardware == "toy"
    t = build_table([fc_shape(2, 3, 4)], "toy", "latency")
    assert t[0, 3, 1] == 4 * 2 * 12 / 1e6
    with pytest.raises(UserError, match="Toy supports at most 8-bit operands; use --max_bit 8"):
        build_table([fc_shape(2, 3, 4)], "toy", "latency", max_bit=9)
    with pytest.raises(UserError, match="use --hardware bitfusion for energy"):
        build_table([fc_shape(2, 3, 4)], "toy", "energy")


def test_table_cache_keys_are_unchanged():
    """The cache fingerprint hashes the model's repr: tables cached before stay valid."""
    from lib.simulator.tables import fingerprint
    shapes = [fc_shape(16, 512, 64)]
    assert repr(bismo_edge()) == (
        "BismoConfig(name='bismo_edge', dm=8, dk=256, dn=8, freq_mhz=200.0, "
        "dram_bits_per_cycle=64, buffer_depth=1024, out_bits=32, overhead_cycles=1000)")
    assert repr(bitfusion()).startswith("BitFusionConfig(name='bitfusion', rows=16, cols=32, ")
    assert fingerprint(shapes, bismo_edge(), "latency", 8) == \
        "531e293cf45c54cdbc3fe5034c839898411daca5"
    assert fingerprint(shapes, bitfusion(), "energy", 8) == \
        "c08b276a943bc8b1324be42ba0afddc224401821"


def _write_table(path, kind):
    table = np.ones((53, 8, 8))
    if kind == "npz":   # named .npy, so only its content tells
        with open(path, "wb") as f:
            np.savez(f, table=table)
    elif kind == "object":
        np.save(path, table.astype(object), allow_pickle=True)
    elif kind == "complex":
        np.save(path, table + 1j)
    elif kind == "zero_reference":
        table[:, 7, 7] = 0.0
        np.save(path, table)
    elif kind == "inf_reference":   # every entry finite, their sum is not
        table[:, 7, 7] = 1e307
        np.save(path, table)


@pytest.mark.parametrize("kind, expected", [
    ("npz", "is an .npz archive"), ("object", "pickled objects"), ("complex", "complex128 values"),
    ("zero_reference", "reference cost .* is 0.0"), ("inf_reference", "reference cost .* is inf")])
def test_unusable_user_tables_are_one_line_errors(tmp_path, capsys, kind, expected):
    path = tmp_path / "mine.npy"
    _write_table(path, kind)

    def main(_):
        load_user_table(str(path), 53)
    with pytest.raises(SystemExit) as exc:
        run_cli(main, [])
    err = capsys.readouterr().err
    assert exc.value.code == 2 and err.count("\n") == 1 and err.startswith("error: ")
    assert re.search(expected, err), err


def test_user_table_is_recorded_and_a_changed_one_refused(tmp_path):
    path = tmp_path / "mine.npy"
    np.save(path, np.ones((53, 8, 8)))
    _, record = load_user_table(str(path), 53)
    assert record["path"] == str(path) and len(record["sha256"]) == 64
    assert load_user_table(str(path), 53, expected_sha256=record["sha256"])[1] == record
    np.save(path, 2 * np.ones((53, 8, 8)))
    with pytest.raises(UserError, match="has changed since the search recorded it"):
        load_user_table(str(path), 53, expected_sha256=record["sha256"])


def test_the_simulator_imports_nothing_above_it():
    """Cost models know nothing of the search: no lib/env, lib/rl or lib/report import at all."""
    import ast
    import os
    folder = os.path.dirname(os.path.abspath(get_hardware.__code__.co_filename))
    for name in (f for f in os.listdir(folder) if f.endswith(".py")):
        tree = ast.parse(open(os.path.join(folder, name)).read())
        modules = [a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names]
        modules += [("lib." if n.level == 2 else "") + (n.module or "")   # from ..env import
                    for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)]
        assert not [m for m in modules if m.split(".")[:2] in (["lib", "env"], ["lib", "rl"],
                                                                ["lib", "report"])], name
