"""strategy.json: loading, validation against a model, writing, and the two published policies.

A strategy (docs/design.md section 9) is what the search writes and what finetune.py reads::

    {"arch": "qmobilenetv2", "mode": "linear", "metric": "latency", "hardware": "bismo_cloud",
     "preserve_ratio": 0.6, "cost_ratio": 0.598, "accuracy": 71.2, "episode": 412,
     "layers": ["features.0.0", ...],     # module names, in policy order
     "strategy": [[8, -1], [7, 7], ...]}   # K-Means mode: [6, 6, 5, ...]

plus, in linear mode when any is on, ``"quant_options": {"per_channel": ..., "weight_clip": ...,
"fold_bn": ..., "bias_correction": ..., "bn_reestimate": ...}`` (lib.quantize.options; absent: the
released quantizer).

:func:`load_strategy` reads a file or a preset name; :func:`validate_strategy` checks it
against the model's quantizable layers (length, names, bit ranges) and raises a
:class:`~lib.utils.errors.UserError` that says what was expected.
"""
import copy
import json
import os
from numbers import Integral, Real

from .checkpoint import atomic_write_json, finite_or_none, read_json
from .cli import INT_MAX
from .errors import UserError
from .schema import (INPUT_SIZES, MAX_CLASSES, MAX_WIDTH_MULT, is_int, is_real, is_str_list,
                     is_weights_record, shown)

MODES = ("kmeans", "linear")
UNQUANTIZED = -1   # linear mode: an activation left in floating point (the image input)
MAX_BIT = 8        # the widest width a search picks (--max_bit's limit)
# Linear mode's end layers: the search pins the first layer's weights and the last layer's
# weights and activations at this width whatever --max_bit is (lib.env.linear_env), as the
# release did, so validation admits it there even under a lower --max_bit.
LINEAR_PIN_BIT = 8

# The released search results (docs/design.md section 6), in model.modules() order. Presets carry
# no layer names: validation takes them from the model, so only the length is checked.
_RESNET50_KMEANS_01 = [6, 6, 6, 6, 5, 5, 6, 5, 5, 6, 5, 5, 6, 5, 5, 5, 5, 5, 4, 5, 4, 4, 5, 4, 4,
                       4, 3, 4, 4, 4, 3, 4, 4, 3, 4, 4, 3, 4, 4, 3, 4, 4, 3, 4, 3, 3, 2, 3, 2, 3,
                       3, 2, 3, 4]
_MOBILENETV2_LINEAR_06 = [
    [8, -1], [7, 7], [5, 6], [4, 6], [5, 6], [5, 7], [5, 6], [7, 4], [4, 6], [4, 6], [7, 7],
    [5, 6], [4, 6], [7, 3], [5, 7], [4, 7], [7, 3], [5, 7], [4, 7], [7, 7], [4, 7], [4, 7],
    [6, 4], [6, 7], [4, 7], [7, 4], [6, 7], [5, 7], [7, 4], [6, 7], [5, 7], [7, 4], [6, 7],
    [6, 7], [6, 4], [5, 7], [6, 7], [6, 4], [5, 7], [6, 7], [7, 7], [4, 7], [7, 7], [7, 7],
    [4, 7], [7, 7], [7, 7], [4, 7], [7, 7], [7, 7], [4, 7], [7, 7], [8, 8]]

PRESETS = {
    "resnet50_kmeans_0.1": {
        "arch": "resnet50", "mode": "kmeans", "metric": "size", "hardware": None,
        "preserve_ratio": 0.1, "layers": None, "strategy": _RESNET50_KMEANS_01,
        "note": "HAQ paper: ResNet-50 at 10% of the fp32 size, 75.48/92.42 top-1/5 on ImageNet "
                "after fine-tuning (fp32 76.15/92.87)"},
    "mobilenetv2_linear_0.6": {
        "arch": "qmobilenetv2", "mode": "linear", "metric": "latency", "hardware": "bismo_cloud",
        "preserve_ratio": 0.6, "layers": None, "strategy": _MOBILENETV2_LINEAR_06,
        "note": "HAQ paper: MobileNet-V2 at 0.6x the 8-bit latency, 71.23/90.00 top-1/5 on "
                "ImageNet after fine-tuning (fp32 72.05/90.49)"},
}


def list_presets():
    return sorted(PRESETS)


def infer_mode(policy):
    """'linear' when the policy's entries are [w, a] pairs, else 'kmeans'."""
    if isinstance(policy, list) and policy and isinstance(policy[0], (list, tuple)):
        return "linear"
    return "kmeans"


def _read_json(path):
    return read_json(path, "strategy file", "a strategy.json as written by rl_quantize.py")


def _finite_in(value, lo, hi):
    return is_real(value) and lo < value <= hi


# linear mode's quantizer options (lib.quantize.options.QuantOptions.record); absent = off
QUANT_OPTIONS_EXPECTED = ('an object {"per_channel": bool, "weight_clip": "max"|"mse", '
                          '"fold_bn": bool, "bias_correction": bool, '
                          '"bn_reestimate": integer >= 0}')


def _quant_options_ok(value):
    flags = ("per_channel", "fold_bn", "bias_correction")
    known = set(flags) | {"weight_clip", "bn_reestimate"}
    return (isinstance(value, dict) and set(value) <= known
            and all(isinstance(value.get(k, False), bool) for k in flags)
            and value.get("weight_clip", "max") in ("max", "mse")
            and is_int(value.get("bn_reestimate", 0), 0, INT_MAX))


# min_bit and max_bit share one check
_BIT_FIELD = (lambda v: is_int(v, 1, 8), "an integer in [1, 8]")

# field -> (check, what is expected); None is always allowed (the field is then unknown)
_FIELDS = {
    "mode": (lambda v: v in MODES, f"one of {', '.join(MODES)}"),
    "arch": (lambda v: isinstance(v, str) and v != "", "a model name (string)"),
    "dataset": (lambda v: isinstance(v, str) and v != "", "a dataset name (string)"),
    "metric": (lambda v: isinstance(v, str), "a cost metric name (string)"),
    "hardware": (lambda v: isinstance(v, str), "a hardware preset name (string)"),
    "method": (lambda v: isinstance(v, str), "an allocation method name (string)"),
    "width_mult": (lambda v: _finite_in(v, 0, MAX_WIDTH_MULT), "a number in (0, 8]"),
    "input_size": (lambda v: is_int(v, *INPUT_SIZES),
                   "an integer in [{}, {}] (pixels, as --input_size)".format(*INPUT_SIZES)),
    "num_classes": (lambda v: is_int(v, 1, MAX_CLASSES), f"an integer in [1, {MAX_CLASSES}]"),
    "preserve_ratio": (lambda v: _finite_in(v, 0, 1), "a number in (0, 1]"),
    "min_bit": _BIT_FIELD,
    "max_bit": _BIT_FIELD,
    "layers": (is_str_list, "a list of layer names (strings)"),
    "episode": (lambda v: is_int(v, 0, 1 << 62), "a non-negative integer"),
    "accuracy": (lambda v: is_real(v, 0, 100), "a percentage in [0, 100]"),
    "original_accuracy": (lambda v: is_real(v, 0, 100), "a percentage in [0, 100]"),
    "cost_ratio": (lambda v: is_real(v, 0), "a non-negative number"),
    "cost": (lambda v: is_real(v, 0), "a non-negative number"),
    "reward": (lambda v: is_real(v, -10, 10), "a number in [-10, 10] (0.1 x an accuracy "
               "difference in percent)"),
    "cost_table": (lambda v: isinstance(v, dict) and isinstance(v.get("path"), str)
                   and isinstance(v.get("sha256"), str), 'an object {"path", "sha256"}'),
    "quant_options": (_quant_options_ok, QUANT_OPTIONS_EXPECTED),
    "weights": (is_weights_record, 'an object {"name"} or {"path", "sha256"} (the pretrained '
                "weights' source)"),
    "kl_max_bit": (lambda v: is_int(v, 0, 8), "an integer in [0, 8] (--kl_max_bit)"),
}


def _check_fields(data, path):
    """Wrong-typed known fields are refused here, before anything uses them."""
    for key, (ok, expected) in _FIELDS.items():
        value = data.get(key)
        if value is not None and not ok(value):
            raise UserError(f"strategy file '{path}': '{key}' is {shown(value)}; "
                            f"expected {expected}")


def _check_policy(data, path):
    """Every entry a width in [1, 8] ([w_bit, a_bit] pairs in linear mode, a_bit -1 allowed);
    the length and the model's own range are checked later (:func:`validate_strategy`)."""
    policy = data["strategy"]
    if not policy:
        raise UserError(f"strategy file '{path}': 'strategy' is empty; expected one entry per "
                        "quantizable layer")
    for i, entry in enumerate(policy):
        where = f"strategy file '{path}': entry {i}"
        if data["mode"] == "kmeans":
            _as_bit(entry, where, 1, MAX_BIT, allow_unquantized=False)
        elif not isinstance(entry, list) or len(entry) != 2:
            raise UserError(f"{where} is {shown(entry)}; expected a [w_bit, a_bit] pair")
        else:
            _as_bit(entry[0], where + " weights", 1, MAX_BIT, False)
            _as_bit(entry[1], where + " activations", 1, MAX_BIT, True)


def load_strategy(path_or_preset, flag="--strategy"):
    """Return the strategy dict of a strategy.json file or a preset name.

    A file may also hold a bare policy list; its mode is inferred from the entries.
    The dict always has ``strategy`` (the policy), ``mode``, and ``layers`` (a name
    list, or None when the source gave none); ``source`` records where it came from.
    """
    if path_or_preset in PRESETS:
        strategy = copy.deepcopy(PRESETS[path_or_preset])
        strategy["source"] = f"preset:{path_or_preset}"
        return strategy
    if not os.path.isfile(path_or_preset):
        raise UserError(f"{flag} '{path_or_preset}' is neither a file nor a preset; expected "
                        f"a strategy.json path or one of: {', '.join(list_presets())}")
    data = _read_json(path_or_preset)
    if isinstance(data, list):
        data = {"strategy": data}
    if not isinstance(data, dict) or not isinstance(data.get("strategy"), list):
        raise UserError(f"strategy file '{path_or_preset}' has no 'strategy' list; expected "
                        '{"mode": ..., "layers": [...], "strategy": [...]} (docs/design.md section 9)')
    _check_fields(data, path_or_preset)
    if data.get("mode") is None:
        data["mode"] = infer_mode(data["strategy"])
    data.setdefault("layers", None)
    _check_policy(data, path_or_preset)
    data["source"] = os.path.abspath(path_or_preset)
    return data


def _as_bit(value, where, lo, hi, allow_unquantized):
    """One bit width as int; UserError naming ``where`` and the allowed range otherwise."""
    allowed = f"{'-1 or ' if allow_unquantized else ''}an integer in [{lo}, {hi}]"
    if isinstance(value, bool) or not isinstance(value, Real):
        raise UserError(f"{where}: bit width {shown(value)} is not a number; expected {allowed}")
    if not isinstance(value, Integral):
        if not float(value).is_integer():
            raise UserError(f"{where}: bit width {shown(value)} is not an integer; "
                            f"expected {allowed}")
        value = int(value)
    if allow_unquantized and value == UNQUANTIZED:
        return UNQUANTIZED
    if not lo <= value <= hi:
        raise UserError(f"{where}: bit width {value} is out of range; expected {allowed}")
    return int(value)


def _pinned_hi(value, end, max_bit):
    """The upper bound for one linear bit width: an end layer may hold the search's pin width.

    Pinning the end layers at min(8, max_bit) would have made the two agree as well, but it
    changes what a search below 8 bits evaluates; accepting the pin here leaves every search
    as it was and the default (max_bit 8) unchanged too.
    """
    pinned = end and not isinstance(value, bool) and value == LINEAR_PIN_BIT
    return max(max_bit, LINEAR_PIN_BIT) if pinned else max_bit


def _check_layers(names, layer_names):
    """The strategy's layer names must be the model's, in the same order."""
    if not isinstance(names, list):
        raise UserError(f"strategy 'layers' must be a list of layer names; got {type(names).__name__}")
    if len(names) != len(layer_names):
        raise UserError(f"strategy lists {len(names)} layer names; expected {len(layer_names)} "
                        f"(the model's quantizable layers, '{layer_names[0]}' ... "
                        f"'{layer_names[-1]}')")
    known = set(layer_names)
    for i, (got, want) in enumerate(zip(names, layer_names)):
        if got != want:
            what = "an unknown layer" if got not in known else "out of order"
            raise UserError(f"strategy layer {i} is '{got}' ({what}); expected '{want}' "
                            "(layer names of the model in modules() order; wrong --arch?)")


def validate_strategy(strategy, layer_names, mode, min_bit=1, max_bit=8):
    """Check ``strategy`` (a dict from :func:`load_strategy`) against a model; return a clean copy.

    ``layer_names``: the model's quantizable layers in policy order; ``mode``: 'kmeans' or
    'linear'. K-Means entries are weight bits in [min_bit, max_bit]; linear entries are
    [w_bit, a_bit] pairs with w_bit in [min_bit, max_bit] and a_bit in [min_bit, max_bit]
    or -1 (unquantized input); the first and last layers may also hold LINEAR_PIN_BIT. The copy
    has int bits, ``mode`` and ``layers`` filled in.
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if not isinstance(strategy, dict) or not isinstance(strategy.get("strategy"), list):
        raise UserError("strategy must be a dict with a 'strategy' list (docs/design.md section 9)")
    declared = strategy.get("mode", mode)
    if declared != mode:
        flag = "without" if declared == "kmeans" else "with"
        raise UserError(f"strategy is for {declared} mode but fine-tuning runs in {mode} mode; "
                        f"expected a {mode} strategy (or run {flag} --linear_quantization)")
    policy = strategy["strategy"]
    if len(policy) != len(layer_names):
        raise UserError(f"strategy has {len(policy)} entries; expected {len(layer_names)}, one "
                        f"per quantizable layer of the model (wrong --arch or strategy file?)")
    if strategy.get("layers") is not None:
        _check_layers(strategy["layers"], layer_names)
    clean = []
    for i, (name, entry) in enumerate(zip(layer_names, policy)):
        where = f"strategy entry {i} (layer '{name}')"
        if mode == "kmeans":
            clean.append(_as_bit(entry, where, min_bit, max_bit, allow_unquantized=False))
            continue
        if not isinstance(entry, (list, tuple)) or len(entry) != 2:
            raise UserError(f"{where} is {entry!r}; expected a [w_bit, a_bit] pair")
        end = i in (0, len(layer_names) - 1)
        clean.append([_as_bit(entry[0], where + " weights", min_bit,
                              _pinned_hi(entry[0], end, max_bit), False),
                      _as_bit(entry[1], where + " activations", min_bit,
                              _pinned_hi(entry[1], end, max_bit), True)])
    out = dict(strategy, mode=mode, layers=list(layer_names), strategy=clean)
    return out


def _rounded(value, digits):
    value = finite_or_none(value)
    return None if value is None else round(value, digits)


def strategy_record(best, layer_names, meta):
    """The strategy.json dict of ``best`` (an episode's info) plus search metadata ``meta``.

    Layer names come from ``named_modules()``, the policy in the same order. The file
    is strict JSON: a NaN/inf number (e.g. the accuracy of a diverged episode) is
    written as null. A search on a user table carries its ``cost_table`` record
    ``{"path", "sha256"}``.
    """
    record = {"arch": meta["arch"], "mode": meta["mode"], "metric": meta["metric"],
              "hardware": meta.get("hardware"), "preserve_ratio": meta["preserve_ratio"],
              "cost_ratio": _rounded(best["cost_ratio"], 6),
              "accuracy": _rounded(best["accuracy"], 4), "episode": int(best["episode"]),
              "layers": list(layer_names), "strategy": best["policy"]}
    # Extra context (finetune.py needs only the fields above).
    for key in ("dataset", "width_mult", "input_size", "num_classes", "min_bit", "max_bit",
                "original_accuracy", "method", "cost_table", "quant_options",
                "weights", "kl_max_bit",
                "min_bit_a", "max_bit_a", "bits", "bits_a", "pins", "refine"):
        if key in meta:
            record[key] = meta[key]
    if "original_accuracy" in meta:
        record["original_accuracy"] = finite_or_none(meta["original_accuracy"])
    record["reward"] = _rounded(best["reward"], 6)
    record["cost"] = finite_or_none(best["cost"])
    return record


def write_strategy(path, best, layer_names, meta):
    """Write the search's best policy to ``path`` atomically (a crash leaves the old file)."""
    atomic_write_json(path, strategy_record(best, layer_names, meta))
