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
    import json
    import os
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        f.write(obj if isinstance(obj, str) else json.dumps(obj))


def _log(accs):
    rows = "".join(f"{e}\t0\t{a}\t0.05\t1\t0\t[1]\n" for e, a in enumerate(accs))
    return "episode\treward\taccuracy\tcost_ratio\tcost\tnonfinite\tpolicy\n" + rows


def test_report_puts_ilp_and_the_noise_beside_the_gap(tmp_path):
    """The demo's summary: uniform, ILP and HAQ rows, HAQ - uniform with the replays' SD beside it."""
    from lib.report.summary import report
    s = dict(BASE, arch="mobilenetv2", mode="kmeans", metric="size", hardware=None,
             preserve_ratio=0.05, min_bit=1)
    layers = cost_model_for(s)[1]
    haq = dict(s, strategy=[2] * 20 + [1] * 33, accuracy=95.0, episode=20, layers=layers)
    ilp = dict(s, strategy=[1] * 53, accuracy=93.0, episode=0, layers=layers)
    _write(str(tmp_path / "kmeans_search/run1/strategy.json"), haq)
    _write(str(tmp_path / "kmeans_search/run1/log.txt"), _log([80, 95]))
    _write(str(tmp_path / "kmeans_ilp_search/run1/strategy.json"), ilp)
    _write(str(tmp_path / "kmeans_noise/run1/log.txt"), _log([94.0, 95.0, 96.0]))
    _write(str(tmp_path / "kmeans_uniform.json"), best_uniform(s))
    for name, top1 in (("haq", 96.5), ("ilp", 95.25), ("uniform", 52.5)):
        _write(str(tmp_path / f"kmeans_{name}/results.json"),
               {"best_top1": top1, "quant_top1": 10.0, "fp32_top1": 98.1})
    table = report(str(tmp_path))
    assert "| kmeans | ILP (sensitivity) | 95.25 |" in table
    assert "| kmeans | uniform 1-bit | 52.50 |" in table
    assert ("kmeans: HAQ - uniform 1-bit = +44.00 points after fine-tune (ILP - uniform = +42.75); "
            "noise: the searched policy's search accuracy over 3 evaluations has SD 1.00 points"
            in table)
