"""bench/peer_bench.py's pure helpers (no MCT needed): MCT's layer names mapped to our
named_modules names, the size ratio, our strategy of MCT's bits and the table."""
import importlib.util
import os
import subprocess
import sys

import pytest

from lib.utils.layers import quantizable_layers
from models import get_model

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _bench(name="peer_bench"):
    spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, "bench", f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


pb = _bench()


def _names():
    model = get_model("mobilenetv2", num_classes=10, input_size=32, width_mult=0.5)
    return [n for n, _ in quantizable_layers(model, linear=False)]


def test_mct_names_map_to_every_named_module_once():
    names = _names()
    # MCT's fx node names: '.' -> '_', '_bn' where a BatchNorm was folded in (not the classifier)
    mct = [n.replace(".", "_") + ("" if n == "classifier" else "_bn") for n in names]
    mapping = pb.map_layer_names(mct, names)
    assert [mapping[m] for m in mct] == names


def test_name_mapping_takes_the_longest_match_and_refuses_strays():
    ours = ["features.1", "features.1.conv.0", "fc"]
    mapping = pb.map_layer_names(["features_1_conv_0_bn", "features_1_bn", "fc"], ours)
    assert mapping == {"features_1_conv_0_bn": "features.1.conv.0",
                       "features_1_bn": "features.1", "fc": "fc"}
    with pytest.raises(ValueError, match="none of our layers"):
        pb.map_layer_names(["head_0"], ours)
    with pytest.raises(ValueError, match="two MCT layers"):
        pb.map_layer_names(["fc_a", "fc_b"], ours)


def test_size_ratio_is_the_share_of_the_8bit_weights():
    assert pb.size_ratio([100, 300], [8, 8]) == 1.0
    assert pb.size_ratio([100, 300], [4, 2]) == pytest.approx((400 + 600) / 3200)


def test_linear_policy_leaves_the_first_input_unquantized():
    assert pb.linear_policy([8, 4, 2]) == [[8, -1], [4, 8], [2, 8]]


def test_strategy_keeps_the_searchs_options_and_drops_its_scores():
    template = {"arch": "qmobilenetv2", "mode": "linear", "metric": "size", "per_channel": True,
                "accuracy": 98.6, "reward": -0.1, "cost": 5.0, "layers": ["a", "b"],
                "strategy": [[8, -1], [3, 7]]}
    out = pb.strategy_with(template, [4, 2], "mct", 0.3)
    assert out["strategy"] == [[4, -1], [2, 8]]
    assert out["per_channel"] is True and out["layers"] == ["a", "b"]
    assert "accuracy" not in out and "reward" not in out and "cost" not in out
    assert out["method"] == "mct" and out["cost_ratio"] == 0.3


def test_table_rows_carry_bits_sizes_and_seed_spread():
    rows = [{"budget": 0.375, "allocator": "MCT {8,4,2}", "w_bits": [8, 4, 4, 2],
             "size_ratio": 0.375, "mct_quant_top1": 97.7, "ours_quant_top1": 70.6,
             "finetune_top1": [98.0, 98.0, 98.3], "alloc_seconds": 41.25,
             "alloc_load": 2.04, "alloc_cpu_seconds": 40.0},
            {"budget": 0.5, "allocator": "our ILP", "w_bits": [8, 5], "size_ratio": 0.5,
             "mct_quant_top1": None, "ours_quant_top1": 96.9, "finetune_top1": [98.2],
             "alloc_seconds": 26.8}]
    lines = pb.format_table(rows).splitlines()
    assert len(lines) == 4 and lines[0].count("|") == len(pb.TABLE_HEAD) + 1
    assert lines[2] == ("| 0.375 | MCT {8,4,2} | 8x1 4x2 2x1 | 0.3750 | 97.7 | 70.6 | "
                        "98.10 (spread 0.30: 98.0 / 98.0 / 98.3) | 41.2 (load 2.0) | 40.0 |")
    assert lines[3] == "| 0.5 | our ILP | 8x1 5x1 | 0.5000 | - | 96.9 | 98.20 | 26.8 | - |"
    assert pb.mean_spread([]) is None


@pytest.mark.parametrize("script", ["peer_bench.py", "peer_time.py"])
def test_without_mct_the_bench_says_how_to_install_it(script):
    if importlib.util.find_spec("model_compression_toolkit") is not None:
        pytest.skip("MCT is installed here")
    done = subprocess.run([sys.executable, os.path.join(ROOT, "bench", script)],
                          capture_output=True, text=True, cwd=ROOT)
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "pip install model-compression-toolkit==2.6.1" in lines[0]


def test_process_bench_reads_the_allocation_time_our_search_logs(tmp_path, caplog):
    """bench/peer_time.py finds the CPU seconds in the line plan_policy writes, not a copy."""
    import logging
    import time
    from lib.allocate import plan_policy
    from tests.test_allocate_unscored import size_env
    pt = _bench("peer_time")
    env = size_env()
    cpu = time.process_time()
    with caplog.at_level(logging.INFO):
        plan_policy(env, str(tmp_path), n_images=32, refine=4)
    spent = time.process_time() - cpu
    seconds = pt.allocation_cpu_seconds("other line\n" + caplog.text)
    assert seconds is not None and 0.0 <= seconds <= spent + 0.1
    assert pt.allocation_cpu_seconds("allocation done") is None


def test_process_bench_summary_takes_medians_and_per_round_ratios():
    pt = _bench("peer_time")
    rounds = [{"ours": {"process_cpu_s": o, "process_wall_s": o, "allocation_cpu_s": o / 2},
               "mct": {"process_cpu_s": m, "process_wall_s": m, "allocation_cpu_s": m}}
              for o, m in ((20.0, 40.0), (30.0, 30.0), (24.0, 32.0))]
    s = pt.summarise(rounds)
    assert s["process_cpu_s"]["ours"] == {"median": 24.0, "min": 20.0, "max": 30.0}
    assert s["process_cpu_s"]["ratio_ours_mct"] == {"median": 0.75, "min": 0.5, "max": 1.0}
    assert s["allocation_cpu_s"]["ratio_ours_mct"]["median"] == pytest.approx(0.375)
    assert "0.75 (0.50-1.00)" in pt.format_summary(s)
