from lib.env.summary import best_uniform, cost_model_for, uniform_policy

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
