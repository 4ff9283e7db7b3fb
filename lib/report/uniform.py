"""Uniform-precision baselines: the same bits in every layer, costed like the search's policy.

``python -m lib.report uniform SEARCH/strategy.json OUT.json`` writes the best
*uniform* policy (linear mode keeps the pinned first/last layers) whose cost fits
the search's budget; with ``--bits B`` the uniform B-bit policy whatever its cost
(the frontier's uniform curve). Either is a strategy.json that finetune.py takes.
"""
import logging

from lib.utils.checkpoint import atomic_write_json
from lib.utils.cli import check_output_file, same_file
from lib.utils.errors import UserError
from lib.utils.strategy import load_strategy

log = logging.getLogger(__name__)


def recorded_cost_table(strategy):
    """(path, sha256) of the user table a strategy.json records, or (None, None)."""
    record = strategy.get("cost_table")
    if record is None:
        return None, None
    if not (isinstance(record, dict) and isinstance(record.get("path"), str)
            and isinstance(record.get("sha256"), str)):
        raise UserError("the strategy's 'cost_table' must be {\"path\": ..., \"sha256\": ...}; "
                        f"got {record!r:.80}")
    return record["path"], record["sha256"]


def cost_model_for(strategy):
    """(cost model, layer names) of the model and budget a strategy.json describes.

    A search on a user table is costed with that table, loaded from its recorded
    path and refused if its content no longer has the recorded sha256.
    """
    from lib.simulator import SizeCost, linear_cost_model
    from lib.utils.layers import quantizable_layers
    from lib.utils.run_utils import model_kwargs_for
    from models import get_model

    arch, dataset, linear = strategy["arch"], strategy["dataset"], strategy["mode"] == "linear"
    kwargs = model_kwargs_for(arch, dataset, None, strategy.get("width_mult"),
                              strategy.get("input_size"))
    model = get_model(arch, linear=linear, **kwargs)
    layers = quantizable_layers(model, linear=linear)
    if not linear:
        return SizeCost([m.weight.numel() for _, m in layers]), [n for n, _ in layers]
    table, sha256 = recorded_cost_table(strategy)
    cost = linear_cost_model(model, arch, dataset, strategy["hardware"], strategy["metric"],
                             min_bit=strategy.get("min_bit", 1), max_bit=strategy.get("max_bit", 8),
                             cost_table=table, width_mult=strategy.get("width_mult"),
                             cost_table_sha256=sha256, input_size=kwargs["input_size"])
    return cost, [n for n, _ in layers]


def uniform_policy(bits, n_layers, linear):
    """Same bits everywhere; linear mode pins the first layer to [8, -1] and the last to [8, 8]."""
    if not linear:
        return [bits] * n_layers
    return [[8, -1]] + [[bits, bits]] * (n_layers - 2) + [[8, 8]]


def uniform_strategy(strategy, bits, cost=None, names=None):
    """The uniform ``bits`` policy of ``strategy``'s model, as a strategy.json dict.

    Its ``preserve_ratio`` is the search's; ``cost_ratio`` is the uniform policy's own.
    """
    if cost is None:
        cost, names = cost_model_for(strategy)
    policy = uniform_policy(bits, len(names), strategy["mode"] == "linear")
    # the model's settings in full, so finetune.py builds the search's model (docs/design.md,
    # "source of truth"); an older K-Means search without input_size passes on its absence
    out = {k: strategy.get(k) for k in ("arch", "mode", "metric", "hardware", "preserve_ratio",
                                          "dataset", "width_mult", "input_size", "num_classes",
                                          "min_bit", "max_bit")}
    if strategy.get("cost_table") is not None:
        out["cost_table"] = strategy["cost_table"]
    if strategy.get("quant_options") is not None:   # the search's quantizer, to compare alike
        out["quant_options"] = strategy["quant_options"]
    out.update(cost_ratio=cost(policy) / cost.reference(), layers=names, strategy=policy,
               uniform_bits=bits, accuracy=None, episode=None)
    return out


def best_uniform(strategy):
    """The widest uniform policy within the strategy's budget, as a strategy.json dict."""
    cost, names = cost_model_for(strategy)
    lo, hi = strategy.get("min_bit", 1), strategy.get("max_bit", 8)
    for bits in range(hi, lo - 1, -1):
        out = uniform_strategy(strategy, bits, cost, names)
        if out["cost_ratio"] <= strategy["preserve_ratio"]:
            return out
    raise UserError(f"no uniform policy of {lo}..{hi} bits fits preserve ratio "
                    f"{strategy['preserve_ratio']}")


def uniform_label(uniform):
    b = uniform["uniform_bits"]
    return f"uniform w{b}a{b}" if uniform["mode"] == "linear" else f"uniform {b}-bit"


def check_not_input(output, source):
    """The output must not be the input file (under any name): the search's result stays."""
    if same_file(output, source):
        raise UserError(f"output '{output}' is the input '{source}'; expected another path (the "
                        "input is never overwritten)")


def read_search_strategy(path):
    """A search's strategy.json with the fields the uniform baseline needs, type-checked."""
    strategy = load_strategy(path)
    # linear mode's cost depends on the image size, K-Means mode's (weights) does not
    needed = ["arch", "preserve_ratio", "dataset"] + (
        ["metric", "hardware", "input_size"] if strategy["mode"] == "linear" else [])
    missing = [k for k in needed if strategy.get(k) is None]
    if missing:
        raise UserError(f"strategy file '{path}' has no '{missing[0]}'; expected a strategy.json "
                        "written by rl_quantize.py")
    return strategy


def write_uniform(strategy_path, output, bits=None):
    """The ``uniform`` command: the baseline of the search at ``strategy_path``, to ``output``."""
    check_not_input(output, strategy_path)
    check_output_file(output, "output")
    strategy = read_search_strategy(strategy_path)
    out = best_uniform(strategy) if bits is None else uniform_strategy(strategy, bits)
    atomic_write_json(output, out)
    log.info("%s: cost ratio %.3f", uniform_label(out), out["cost_ratio"])
    return out
