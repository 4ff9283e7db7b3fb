import json
import os

import pytest

from lib.report.uniform import best_uniform, cost_model_for, uniform_policy

BASE = {"arch": "qmobilenetv2", "dataset": "mnist5k", "width_mult": 0.25, "min_bit": 2, "max_bit": 8}


def test_uniform_kmeans_is_widest_within_budget():
    s = dict(BASE, arch="mobilenetv2", mode="kmeans", metric="size", hardware=None, preserve_ratio=0.1)
    out = best_uniform(s)
    assert out["uniform_bits"] == 3 and out["strategy"] == [3] * 53
    assert abs(out["cost_ratio"] - 3 / 32) < 1e-9


def test_uniform_linear_keeps_pins_and_is_widest_within_budget():
    s = dict(BASE, mode="linear", metric="latency", hardware="bismo_cloud", preserve_ratio=0.5)
    out = best_uniform(s)
    b = out["uniform_bits"]
    assert out["strategy"][0] == [8, -1] and out["strategy"][-1] == [8, 8]
    assert out["cost_ratio"] <= 0.5
    cost, names = cost_model_for(s)
    wider = uniform_policy(b + 1, len(names), True)
    assert cost(wider) / cost.reference() > 0.5


def _write(path, obj):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        f.write(obj if isinstance(obj, str) else json.dumps(obj))


def _log(accs):
    rows = "".join(f"{e}\t0\t{a}\t0.05\t1\t0\t[1]\n" for e, a in enumerate(accs))
    return "episode\treward\taccuracy\tcost_ratio\tcost\tnonfinite\tpolicy\n" + rows


def _finetune(folder, strategy, top1):
    """What finetune.py leaves: results.json, and the trained policy in its checkpoint."""
    import torch
    _write(os.path.join(folder, "results.json"),
           {"best_top1": top1, "quant_top1": 10.0, "fp32_top1": 98.1})
    torch.save({"policy": strategy, "state_dict": {}}, os.path.join(folder, "model_best.pth.tar"))


@pytest.fixture
def demo(tmp_path):
    """A demo folder of the K-Means mode: search, replays, ILP, uniform, three fine-tunes."""
    s = dict(BASE, arch="mobilenetv2", mode="kmeans", metric="size", hardware=None,
             preserve_ratio=0.05, min_bit=1)
    layers = cost_model_for(s)[1]
    haq = dict(s, strategy=[2] * 20 + [1] * 33, accuracy=95.0, episode=20, layers=layers)
    ilp = dict(s, strategy=[1] * 53, accuracy=93.0, episode=0, layers=layers)
    _write(str(tmp_path / "kmeans_search/run1/strategy.json"), haq)
    _write(str(tmp_path / "kmeans_search/run1/log.txt"), _log([80, 95]))
    _write(str(tmp_path / "kmeans_ilp_search/run1/strategy.json"), ilp)
    _write(str(tmp_path / "kmeans_noise/run1/log.txt"), _log([94.0, 95.0, 96.0]))
    uniform = best_uniform(s)
    _write(str(tmp_path / "kmeans_uniform.json"), uniform)
    for name, strat, top1 in (("haq", haq, 96.5), ("ilp", ilp, 95.25), ("uniform", uniform, 52.5)):
        _finetune(str(tmp_path / f"kmeans_{name}"), strat, top1)
    return tmp_path, haq


def test_report_puts_ilp_and_the_noise_beside_the_gap(demo):
    """The demo's summary: uniform, ILP and HAQ rows, HAQ - uniform with the replays' SD beside it."""
    from lib.report.summary import report
    table = report(str(demo[0]))
    assert "| kmeans | ILP (sensitivity) | 95.25 |" in table
    assert "| kmeans | uniform 1-bit | 52.50 |" in table
    assert ("kmeans: HAQ - uniform 1-bit = +44.00 points after fine-tune (ILP - uniform = +42.75); "
            "noise: the searched policy's search accuracy over 3 evaluations has SD 1.00 points"
            in table)
    assert "over budget" not in table and "Notes" not in table


def test_a_newer_search_is_not_paired_with_an_older_fine_tune(demo):
    """A search rerun after the fine-tune: its policy was never fine-tuned, so no HAQ row and no
    HAQ - uniform gap (before: the new cost beside the old policy's accuracy)."""
    from lib.report.summary import report
    folder, haq = demo
    _write(str(folder / "kmeans_search/run1/strategy.json"), dict(haq, strategy=[3] * 53))
    table = report(str(folder))
    assert "HAQ (searched)" not in table and "HAQ - uniform" not in table
    assert "| kmeans | ILP (sensitivity) | 95.25 |" in table
    assert "kmeans_haq: left out, it fine-tuned another policy" in table
    saved = json.load(open(folder / "summary.json"))["kmeans"]
    assert saved["haq"]["matched"] is False and saved["haq"]["top1"] is None
    assert saved["ilp"]["matched"] is True and len(saved["notes"]) == 1


def test_a_fine_tune_that_records_no_policy_is_left_out(demo):
    from lib.report.summary import report
    os.remove(demo[0] / "kmeans_ilp" / "model_best.pth.tar")
    table = report(str(demo[0]))
    assert "ILP (sensitivity)" not in table and "(ILP - uniform" not in table
    assert "kmeans_ilp: left out, neither results.json nor a checkpoint" in table


def test_a_uniform_row_over_the_budget_is_marked(demo):
    """A uniform strategy from another budget (4 bits where the search allows 0.05 x fp32)."""
    from lib.report.summary import report
    from lib.report.uniform import uniform_strategy
    folder, haq = demo
    wide = uniform_strategy(dict(haq), 4)
    _write(str(folder / "kmeans_uniform.json"), wide)
    _finetune(str(folder / "kmeans_uniform"), wide, 97.0)
    table = report(str(folder))
    assert "| kmeans | uniform 4-bit | 97.00 | 10.00 | 0.125 **over budget** |" in table
    assert json.load(open(folder / "summary.json"))["kmeans"]["uniform"]["over_budget"] is True
