"""Linear mode for any model: swap its Conv2d/Linear layers for QConv2d/QLinear.

HAQ's linear mode (docs/design.md, quantizers and export) quantizes every layer's weights and its
*input* activation.  An input is quantized on the grid [0, r] when it can never be negative
("half-wave": it comes out of a ReLU, ReLU6, Hardsigmoid, ...), otherwise on the symmetric
grid [-r, r] with one bit for the sign ("full-wave").  The hand-written twins (qmobilenetv2,
qresnet50, ...) state this per layer; :func:`quantize_model` decides it from the model itself:

1. **structure** (default): the model is traced with ``torch.fx`` and each Conv2d/Linear's
   input node is followed back through the graph.  A node is non-negative when it is the
   output of a non-negative activation (:data:`NONNEG_MODULES`, :data:`NONNEG_OPS`: ReLU,
   ReLU6, Hardsigmoid, Sigmoid, Softmax, abs), or of a sign-preserving op whose tensor inputs
   are all non-negative (pooling, dropout, flatten/view/indexing; add, mul and cat of
   non-negative tensors and non-negative constants).  Everything else -- the image, BN, a
   conv, SiLU, Hardswish, GELU, the sum of a residual branch and a signed shortcut, any op
   not listed -- is signed.  A half-wave verdict is a proof (it holds for every input); an
   unknown op errs on the safe side, since a signed grid represents any input, at one bit
   less resolution.
2. **observation** (fallback when the model cannot be traced, or on request): forward
   pre-hooks record each layer's input on an example batch (``example_input``; a real
   calibration batch is best), and a layer is half-wave when no input value was negative.

With every bit width at -1 (the state right after the swap) a QConv2d/QLinear computes
exactly what the float layer did, so the swapped model's output is the float model's.
"""
import logging

import torch
import torch.fx
import torch.nn as nn

from lib.quantize.linear import QConv2d, QLinear, quant_layers
from lib.utils.errors import UserError

logger = logging.getLogger(__name__)

# The layers quantize_model swaps (and whose input sign is decided).
_LAYER_TYPES = (nn.Conv2d, nn.Linear)
# Modules whose output is >= 0 whatever their input.
NONNEG_MODULES = (nn.ReLU, nn.ReLU6, nn.Hardsigmoid, nn.Sigmoid, nn.Softmax)
# Modules whose output is >= 0 when their input is (order- and sign-preserving).
PASS_MODULES = (nn.MaxPool1d, nn.MaxPool2d, nn.AvgPool1d, nn.AvgPool2d, nn.AdaptiveAvgPool1d,
                nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d, nn.Dropout, nn.Dropout2d,
                nn.Identity, nn.Flatten, nn.Upsample)
# Functions/methods (by name) whose output is >= 0 whatever their input.
NONNEG_OPS = {"relu", "relu_", "relu6", "hardsigmoid", "sigmoid", "softmax", "abs"}
# Functions/methods whose first argument is the only tensor that matters for the sign.
PASS_FIRST_OPS = {"flatten", "view", "reshape", "getitem", "permute", "transpose", "squeeze",
                  "unsqueeze", "contiguous", "mean", "clone", "expand", "expand_as",
                  "max_pool2d", "avg_pool2d", "adaptive_avg_pool2d", "adaptive_max_pool2d",
                  "dropout", "stochastic_depth", "interpolate", "chunk", "split", "narrow"}
# Functions/methods whose output is >= 0 when every tensor/number argument is.
PASS_ALL_OPS = {"add", "add_", "iadd", "mul", "mul_", "imul", "cat", "concat", "stack", "max",
                "maximum", "truediv"}


def _op_name(node):
    """A call's name without module path or dunder wrapping (``operator.add`` -> 'add')."""
    target = node.target
    name = target if isinstance(target, str) else getattr(target, "__name__", str(target))
    return name.strip("_") if name.startswith("__") else name


def _flat_args(node):
    out = []

    def visit(a):
        if isinstance(a, (list, tuple)):
            for b in a:
                visit(b)
        else:
            out.append(a)
    visit(node.args)
    return out


class _SignAnalysis:
    """Which fx nodes of a traced model are non-negative for every input (memoised)."""

    def __init__(self, graph_module):
        self.gm = graph_module
        self.modules = dict(graph_module.named_modules())
        self.memo = {}

    def nonneg(self, value):
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return value >= 0
        if not isinstance(value, torch.fx.Node):
            return True          # None, dtypes, strings: no sign to carry
        if value not in self.memo:
            self.memo[value] = self._node(value)
        return self.memo[value]

    def _node(self, node):
        if node.op == "call_module":
            mod = self.modules[node.target]
            if isinstance(mod, NONNEG_MODULES):
                return True
            if isinstance(mod, PASS_MODULES):
                return self.nonneg(node.args[0])
            return False
        if node.op in ("call_function", "call_method"):
            name = _op_name(node)
            if name in NONNEG_OPS:
                return True
            if name in PASS_FIRST_OPS:
                return self.nonneg(node.args[0])
            if name in PASS_ALL_OPS:
                return all(self.nonneg(a) for a in _flat_args(node))
        return False             # placeholders (the image), get_attr, anything unknown


def half_wave_by_structure(model):
    """``{layer name: half_wave}`` from the model's fx graph (see the module docstring).

    Raises whatever ``torch.fx.symbolic_trace`` raises when the model is not traceable.
    """
    gm = torch.fx.symbolic_trace(model)
    analysis = _SignAnalysis(gm)
    result = {}
    for node in gm.graph.nodes:
        if node.op == "call_module" and isinstance(analysis.modules[node.target], _LAYER_TYPES):
            # a module called twice must be non-negative on every call to be half-wave
            result[node.target] = result.get(node.target, True) and analysis.nonneg(node.args[0])
    return result


@torch.no_grad()
def half_wave_by_observation(model, example_input):
    """``{layer name: half_wave}``: no negative value in the layer's input on ``example_input``."""
    seen, handles = {}, []
    for name, mod in model.named_modules():
        if isinstance(mod, _LAYER_TYPES):
            def hook(_, args, name=name):
                seen[name] = seen.get(name, True) and bool((args[0] >= 0).all())
            handles.append(mod.register_forward_pre_hook(hook))
    was_training = model.training
    model.eval()
    try:
        model(example_input)
    finally:
        model.train(was_training)
        for h in handles:
            h.remove()
    return seen


def infer_half_wave(model, example_input=None, method="auto"):
    """``{layer name: half_wave}`` for every Conv2d/Linear of ``model``.

    ``method``: 'structure' (fx), 'observation' (hooks on ``example_input``) or 'auto'
    (structure, falling back to observation when the model cannot be traced).
    """
    if method in ("auto", "structure"):
        try:
            return half_wave_by_structure(model)
        except Exception as exc:  # torch.fx raises many types on data-dependent control flow
            if method == "structure":
                raise UserError(f"the model cannot be traced with torch.fx ({type(exc).__name__}: "
                                f"{exc}); expected a traceable model or method='observation'")
            logger.info("fx trace failed (%s): deciding half-wave inputs from an example batch",
                        type(exc).__name__)
    if example_input is None:
        raise UserError("the model cannot be traced with torch.fx; expected an example input "
                        "batch to observe which layer inputs are non-negative")
    return half_wave_by_observation(model, example_input)


def _swap_one(mod, half_wave):
    """The QConv2d/QLinear equivalent of ``mod``, sharing its Parameters (bits -1: float)."""
    factory = {"device": mod.weight.device, "dtype": mod.weight.dtype}
    if isinstance(mod, nn.Conv2d):
        q = QConv2d(mod.in_channels, mod.out_channels, mod.kernel_size, stride=mod.stride,
                    padding=mod.padding, dilation=mod.dilation, groups=mod.groups,
                    bias=mod.bias is not None, half_wave=half_wave,
                    padding_mode=mod.padding_mode, **factory)
    else:
        q = QLinear(mod.in_features, mod.out_features, bias=mod.bias is not None,
                    half_wave=half_wave, **factory)
    q.weight = mod.weight
    if mod.bias is not None:
        q.bias = mod.bias
    q.train(mod.training)
    return q


def quantize_model(model, example_input=None, half_wave=None, method="auto"):
    """Replace every ``nn.Conv2d``/``nn.Linear`` of ``model`` by QConv2d/QLinear, in place.

    Weights, biases, stride, padding, dilation, groups and padding mode are kept (the new
    layers share the original Parameters); bit widths start at -1, so the output is unchanged
    until a policy is applied.  ``half_wave``: ``{layer name: bool}`` to override the
    decision of :func:`infer_half_wave` (``example_input``/``method`` are passed to it).
    Layers that already are QConv2d/QLinear are left alone.  Returns ``model``.
    """
    decided = infer_half_wave(model, example_input, method)
    decided.update(half_wave or {})
    targets = [(n, m) for n, m in model.named_modules()
               if isinstance(m, _LAYER_TYPES) and not isinstance(m, (QConv2d, QLinear))]
    for name, mod in targets:
        if name not in decided:   # not called in this forward (e.g. an auxiliary head)
            logger.info("layer '%s' is not called in the forward: full-wave input", name)
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, _swap_one(mod, decided.get(name, False)))
    logger.info("linear mode: %d layers swapped to QConv2d/QLinear (%d half-wave inputs)",
                len(targets), sum(decided.get(n, False) for n, _ in targets))
    return model


def linear_mode(model, example_input=None):
    """``model`` ready for linear mode: unchanged when it already has Q layers, else swapped."""
    if quant_layers(model):
        return model
    return quantize_model(model, example_input)
