"""Layer shapes of a model, recorded from a traced forward pass.

Every cost model in this package works on the GEMM view of a layer (docs/design.md,
hardware cost models): a convolution lowered im2col-style is ``groups`` independent GEMMs of
an ``M x K`` activation matrix (the LHS) by a ``K x N`` weight matrix (the RHS) with

    M = batch * out_h * out_w,   K = (in_channels / groups) * kh * kw,
    N = out_channels / groups,

and a fully-connected layer is one GEMM with M = batch (times any extra leading
dimensions), K = in_features, N = out_features. Feature-map sizes depend on the
input resolution and on the model's strides, so they are read from forward hooks
rather than re-derived from the module attributes.
"""
import logging
from dataclasses import dataclass

import torch
import torch.nn as nn
from torch.func import functional_call

from lib.utils.layers import quantizable_layers

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class LayerShape:
    """GEMM view and tensor sizes of one quantizable layer at a given batch.

    Element counts (``n_inputs``, ``n_outputs``) cover the whole batch;
    ``n_weights`` excludes the bias (it stays in floating point, see
    docs/design.md on quantization operators, and is not part of the quantized model size).
    """
    name: str
    kind: str                 # 'conv' or 'linear'
    batch: int
    in_channels: int          # in_features for a linear layer
    out_channels: int         # out_features for a linear layer
    kernel: tuple             # (kh, kw); (1, 1) for a linear layer
    stride: tuple             # (sh, sw); (1, 1) for a linear layer
    groups: int
    in_h: int
    in_w: int
    out_h: int
    out_w: int
    M: int                    # GEMM rows per group (batch * out_h * out_w)
    K: int                    # GEMM reduction length per group
    N: int                    # GEMM columns per group
    n_inputs: int
    n_weights: int
    n_outputs: int

    @property
    def depthwise(self):
        """True for a depthwise convolution (one input channel per group)."""
        return self.kind == "conv" and self.groups > 1 and self.groups == self.in_channels

    @property
    def macs(self):
        """Multiply-accumulates of the layer over the whole batch."""
        return self.groups * self.M * self.K * self.N

    @property
    def layer_type(self):
        """Short label used in reports: 'dw', 'pw' (1x1 conv), 'conv' or 'fc'."""
        if self.kind == "linear":
            return "fc"
        if self.depthwise:
            return "dw"
        return "pw" if self.kernel == (1, 1) else "conv"


def _pair(v):
    return tuple(v) if isinstance(v, (tuple, list)) else (v, v)


def _shape_from_hook(name, module, x, y, batch, trace_batch):
    """Build a LayerShape from one hooked call; sizes are rescaled to ``batch``.

    Conv and linear layers treat samples independently, so a batch-``B`` layer is
    the traced batch-``trace_batch`` layer with every per-sample count times B.
    """
    if isinstance(module, nn.Conv2d):
        _, cin, in_h, in_w = x.shape
        _, cout, out_h, out_w = y.shape
        kh, kw = _pair(module.kernel_size)
        g = module.groups
        return LayerShape(
            name=name, kind="conv", batch=batch, in_channels=cin, out_channels=cout,
            kernel=(kh, kw), stride=_pair(module.stride), groups=g,
            in_h=in_h, in_w=in_w, out_h=out_h, out_w=out_w,
            M=batch * out_h * out_w, K=(cin // g) * kh * kw, N=cout // g,
            n_inputs=batch * cin * in_h * in_w, n_weights=module.weight.numel(),
            n_outputs=batch * cout * out_h * out_w)
    # nn.Linear: any leading dimensions beyond the batch (tokens) are extra GEMM rows.
    fin, fout = module.in_features, module.out_features
    rows = x.numel() // (fin * trace_batch)
    return LayerShape(
        name=name, kind="linear", batch=batch, in_channels=fin, out_channels=fout,
        kernel=(1, 1), stride=(1, 1), groups=1, in_h=1, in_w=1, out_h=1, out_w=1,
        M=batch * rows, K=fin, N=fout, n_inputs=batch * rows * fin,
        n_weights=module.weight.numel(), n_outputs=batch * rows * fout)


def _input_channels(layers):
    """Channels of the image the model expects: those of its first layer."""
    first = layers[0][1]
    return first.in_channels if isinstance(first, nn.Conv2d) else None


def _forward_meta(model, channels, h, w):
    """Run the model on the meta device: shapes only, no arithmetic, no weight copy.

    ``functional_call`` swaps in shape-only stand-ins for the parameters and
    buffers for the duration of the call, so the user's model is left untouched.
    """
    state = {k: torch.empty_like(v, device="meta")
             for k, v in [*model.named_parameters(), *model.named_buffers()]}
    functional_call(model, state, (torch.zeros(1, channels, h, w, device="meta"),))


def _forward_real(model, channels, h, w):
    param = next(model.parameters(), None)
    device = param.device if param is not None else torch.device("cpu")
    model(torch.zeros(1, channels, h, w, device=device))


def extract_layer_shapes(model, input_size, batch=1, linear=False, in_channels=None):
    """Record the :class:`LayerShape` of every quantizable layer, in policy order.

    The layers are those of :func:`lib.utils.layers.quantizable_layers` (``linear``
    selects QConv2d/QLinear), in ``model.modules()`` order, i.e. the order of a
    HAQ policy. Forward hooks record each layer's input and output sizes during one
    pass of a batch-1 image of ``input_size`` pixels, in eval mode under
    ``torch.no_grad`` (batch norm then neither needs two samples nor updates its
    statistics); counts are scaled to ``batch``. The pass runs on the meta device
    (no arithmetic: a ResNet-50 traces in a fraction of a second on a busy CPU)
    and falls back to a real forward for a model with data-dependent operations.
    The model's training flag is restored afterwards.
    """
    layers = quantizable_layers(model, linear=linear)
    if not layers:
        raise ValueError("model has no quantizable (Conv2d/Linear) layers")
    h, w = _pair(input_size)
    channels = in_channels or _input_channels(layers) or 3

    shapes, handles = {}, []
    for name, module in layers:
        def hook(mod, inputs, output, name=name):
            # A layer called twice (weight sharing) keeps its first call's shape.
            if name not in shapes:
                shapes[name] = _shape_from_hook(name, mod, inputs[0], output, batch, 1)
        handles.append(module.register_forward_hook(hook))
    was_training = model.training
    try:
        model.eval()
        with torch.no_grad():
            try:
                _forward_meta(model, channels, h, w)
            except (NotImplementedError, RuntimeError) as exc:
                log.debug("meta-device trace failed (%s); tracing a real forward pass", exc)
                shapes.clear()
                _forward_real(model, channels, h, w)
    finally:
        model.train(was_training)
        for handle in handles:
            handle.remove()

    missing = [name for name, _ in layers if name not in shapes]
    if missing:
        raise ValueError(f"layers never called in the forward pass: {', '.join(missing)}")
    log.debug("traced %d layers at %s px, batch %d", len(layers), input_size, batch)
    return [shapes[name] for name, _ in layers]
