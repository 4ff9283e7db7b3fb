"""Applying a quantization policy to a model, by layer order or by layer name.

A policy is what the search produces and what ``strategy.json`` stores (docs/design.md,
policies and file formats):

* K-Means mode: one weight bit width per ``nn.Conv2d``/``nn.Linear``, e.g. ``[6, 6, 5, ...]``;
* linear mode: one ``[w_bit, a_bit]`` pair per ``QConv2d``/``QLinear``, e.g.
  ``[[8, -1], [7, 7], ...]``.

Either may be a list in ``model.modules()`` order (its length must equal the number of
quantizable layers) or a dict ``{layer name: bits}`` naming a subset of the layers by their
``named_modules()`` name.  ``-1`` means "not quantized" (32 is accepted as a synonym in K-Means
mode, the float bit width).  Bad policies raise :class:`lib.utils.errors.UserError`.
"""
from collections.abc import Mapping, Sequence
from numbers import Integral, Real

from lib.utils.errors import UserError
from lib.utils.layers import quantizable_layers

MAX_BIT = 16  # k = 2^16 centroids / 16-bit fake quantization is already lossless in practice


def _check_bits(value, what, allow_float_32=False):
    """Validate one bit width; return it as int, or None for 'not quantized'."""
    if isinstance(value, bool) or not isinstance(value, Integral):
        if isinstance(value, Real) and float(value).is_integer():
            value = int(value)
        else:
            raise UserError(f"{what}: bit width {value!r} is not an integer; expected -1 "
                            f"(not quantized) or 1..{MAX_BIT}")
    value = int(value)
    if value == -1 or (allow_float_32 and value == 32):
        return None
    if not 1 <= value <= MAX_BIT:
        raise UserError(f"{what}: bit width {value} is out of range; expected -1 "
                        f"(not quantized) or 1..{MAX_BIT}")
    return value


def _unwrap(name):
    return name[len("module."):] if name.startswith("module.") else name


def _match(model, policy, linear):
    """Pair each entry of ``policy`` with its layer: ``[(name, module, entry)]``."""
    layers = quantizable_layers(model, linear=linear)
    kind = "QConv2d/QLinear" if linear else "Conv2d/Linear"
    if linear and not layers:
        raise UserError("the model has no QConv2d/QLinear layers; a linear-mode policy needs a "
                        "quantized model (e.g. qmobilenetv2 instead of mobilenetv2)")
    if hasattr(policy, "tolist"):  # numpy array / tensor from the agent
        policy = policy.tolist()
    if isinstance(policy, Mapping):
        # names match with or without a DataParallel/DDP "module." prefix on either side
        wanted = {_unwrap(n): entry for n, entry in policy.items()}
        known = {_unwrap(n) for n, _ in layers}
        unknown = [n for n in policy if _unwrap(n) not in known]
        if unknown:
            shown = ", ".join(n for n, _ in layers[:6]) + (", ..." if len(layers) > 6 else "")
            raise UserError(f"policy names unknown layer(s) {unknown}; expected names of the "
                            f"model's {len(layers)} {kind} layers ({shown})")
        return [(n, m, wanted[_unwrap(n)]) for n, m in layers if _unwrap(n) in wanted]
    if isinstance(policy, (str, bytes)) or not isinstance(policy, Sequence):
        raise UserError(f"policy must be a list (one entry per {kind} layer) or a dict "
                        f"layer name -> bits; got {type(policy).__name__}")
    if len(policy) != len(layers):
        raise UserError(f"policy has {len(policy)} entries; expected {len(layers)}, one per "
                        f"{kind} layer of the model in modules() order")
    return [(n, m, entry) for (n, m), entry in zip(layers, policy)]


def resolve_kmeans_policy(model, policy):
    """``[(name, module, bits or None)]`` for a K-Means policy (bits per Conv2d/Linear)."""
    plan = []
    for name, module, entry in _match(model, policy, linear=False):
        plan.append((name, module, _check_bits(entry, f"layer '{name}'", allow_float_32=True)))
    return plan


def resolve_linear_policy(model, policy):
    """``[(name, module, w_bit, a_bit)]`` (each -1 if not quantized) for a linear policy."""
    plan = []
    for name, module, entry in _match(model, policy, linear=True):
        if isinstance(entry, (str, bytes)) or not isinstance(entry, Sequence) or len(entry) != 2:
            raise UserError(f"layer '{name}': policy entry {entry!r} is not a [w_bit, a_bit] pair")
        w = _check_bits(entry[0], f"layer '{name}' weights")
        a = _check_bits(entry[1], f"layer '{name}' activations")
        plan.append((name, module, -1 if w is None else w, -1 if a is None else a))
    return plan


def apply_linear_policy(model, policy):
    """Set ``w_bit``/``a_bit`` of the model's QConv2d/QLinear layers; return the resolved plan.

    Ranges are not recomputed here: run :func:`lib.quantize.linear.calibrate` afterwards when
    bit widths change (the KL clip depends on them).
    """
    plan = resolve_linear_policy(model, policy)
    for _, module, w, a in plan:
        module.set_bits(w, a)
    return [(name, w, a) for name, _, w, a in plan]

