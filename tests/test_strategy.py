"""strategy.json loading/validation and the two published presets (lib/utils/strategy.py)."""
import json
import re

import pytest

from lib.utils.errors import UserError
from lib.utils.layers import quantizable_layers
from lib.utils.strategy import PRESETS, list_presets, load_strategy, validate_strategy
from models import get_model

NAMES = [f"layer{i}" for i in range(5)]


def _write(tmp_path, obj, name="s.json"):
    path = tmp_path / name
    path.write_text(obj if isinstance(obj, str) else json.dumps(obj))
    return str(path)


def test_presets_fit_the_published_models():
    assert list_presets() == ["mobilenetv2_linear_0.6", "resnet50_kmeans_0.1"]
    resnet = [n for n, _ in quantizable_layers(get_model("resnet50", 10, 32))]
    s = validate_strategy(load_strategy("resnet50_kmeans_0.1"), resnet, "kmeans")
    assert len(s["strategy"]) == 54 and s["layers"] == resnet
    qmb = get_model("qmobilenetv2", 10, 32, width_mult=0.25)
    names = [n for n, _ in quantizable_layers(qmb, linear=True)]
    s = validate_strategy(load_strategy("mobilenetv2_linear_0.6"), names, "linear")
    assert s["strategy"][0] == [8, -1] and s["strategy"][-1] == [8, 8] and len(names) == 53
    # presets are copies: editing one result does not change the next load
    s["strategy"][0][0] = 1
    assert PRESETS["mobilenetv2_linear_0.6"]["strategy"][0] == [8, -1]


def test_load_file_and_bare_list(tmp_path):
    s = load_strategy(_write(tmp_path, {"mode": "kmeans", "layers": NAMES, "strategy": [4] * 5}))
    assert s["mode"] == "kmeans" and s["source"].endswith("s.json")
    bare = load_strategy(_write(tmp_path, [[8, -1], [4, 4]], "bare.json"))
    assert bare["mode"] == "linear" and bare["layers"] is None


def test_search_output_validates(tmp_path):
    from lib.utils.strategy import write_strategy
    path = str(tmp_path / "strategy.json")
    best = {"cost_ratio": 0.5, "accuracy": 90.0, "episode": 3, "reward": -0.1, "cost": 1.0,
            "policy": [[8, -1], [5, 6], [4, 3], [6, 7], [8, 8]]}
    write_strategy(path, best, NAMES, {"arch": "qmobilenetv2", "mode": "linear",
                                       "metric": "latency", "preserve_ratio": 0.5})
    s = validate_strategy(load_strategy(path), NAMES, "linear")
    assert s["strategy"] == best["policy"]


@pytest.mark.parametrize("text, expected", [
    ("{not json", "not valid JSON"),
    ('{"mode": "kmeans"}', "no 'strategy' list"),
    ('"just a string"', "no 'strategy' list"),
])
def test_malformed_files(tmp_path, text, expected):
    with pytest.raises(UserError, match=expected):
        load_strategy(_write(tmp_path, text))


def test_missing_file_names_presets(tmp_path):
    with pytest.raises(UserError, match="neither a file nor a preset.*resnet50_kmeans_0.1"):
        load_strategy(str(tmp_path / "nope.json"))


@pytest.mark.parametrize("mode, policy, layers, expected", [
    ("kmeans", [4] * 4, None, "has 4 entries; expected 5"),
    ("kmeans", [4] * 5, NAMES[:4] + ["fc"], "layer 4 is 'fc' \\(an unknown layer\\); expected 'layer4'"),
    ("kmeans", [4] * 5, NAMES[::-1], "out of order"),
    ("kmeans", [4, 0, 4, 4, 4], None, "entry 1 .*bit width 0 is out of range; expected an integer in \\[1, 8\\]"),
    ("kmeans", [4, 4, 9, 4, 4], None, "entry 2 .*bit width 9 is out of range"),
    ("kmeans", [4, 4, -1, 4, 4], None, "bit width -1 is out of range"),
    ("kmeans", [4, 4, 4.5, 4, 4], None, "not an integer"),
    ("kmeans", [4, True, 4, 4, 4], None, "not a number"),
    ("linear", [[8, -1]] * 4 + [8], None, "expected a \\[w_bit, a_bit\\] pair"),
    ("linear", [[8, -1]] * 4 + [[-1, 8]], None, "weights: bit width -1 is out of range"),
    ("linear", [[8, -1]] * 4 + [[8, 9]], None, "activations: bit width 9 .*expected -1 or"),
    ("linear", [4] * 5, None, "expected a \\[w_bit, a_bit\\] pair"),
])
def test_bad_policies(mode, policy, layers, expected):
    with pytest.raises(UserError, match=expected):
        validate_strategy({"strategy": policy, "layers": layers}, NAMES, mode)


def test_mode_mismatch_and_clean_copy():
    with pytest.raises(UserError, match="for linear mode but fine-tuning runs in kmeans mode"):
        validate_strategy({"mode": "linear", "strategy": [[8, 8]] * 5}, NAMES, "kmeans")
    raw = {"strategy": [4.0, 3, 2, 1, 8], "accuracy": 1.5}
    s = validate_strategy(raw, NAMES, "kmeans")
    assert s["strategy"] == [4, 3, 2, 1, 8] and all(type(b) is int for b in s["strategy"])
    assert s["accuracy"] == 1.5 and s["layers"] == NAMES and raw["strategy"][0] == 4.0
    s = validate_strategy({"strategy": [2] * 5}, NAMES, "kmeans", min_bit=2, max_bit=3)
    with pytest.raises(UserError, match="\\[2, 3\\]"):
        validate_strategy({"strategy": [1] * 5}, NAMES, "kmeans", min_bit=2, max_bit=3)


def test_a_binary_file_given_as_strategy_is_named_as_such(tmp_path):
    """A checkpoint passed to --strategy: the error says a JSON text was expected, not 'NaN'."""
    path = tmp_path / "model.pth.tar"
    path.write_bytes(b"\x80\x02}q\x00.")   # a pickle's first bytes
    with pytest.raises(UserError) as exc:
        load_strategy(str(path))
    message = str(exc.value)
    assert "is not text" in message and "strict JSON" not in message and "finite" not in message


def test_linear_end_layers_may_hold_the_search_pin_below_max_bit():
    """The search pins the end layers at 8 bits under any --max_bit; only there, only 8."""
    names = ["a", "b", "c"]
    ok = validate_strategy({"strategy": [[8, -1], [6, 5], [8, 8]]}, names, "linear", 5, 6)
    assert ok["strategy"] == [[8, -1], [6, 5], [8, 8]]
    for policy, expected in (([[8, -1], [8, 5], [8, 8]], "entry 1 (layer 'b') weights"),
                             ([[7, -1], [6, 5], [8, 8]], "entry 0 (layer 'a') weights"),
                             ([[8, -1], [6, 5], [8, 7]], "entry 2 (layer 'c') activations")):
        with pytest.raises(UserError, match=re.escape(expected)):
            validate_strategy({"strategy": policy}, names, "linear", 5, 6)
