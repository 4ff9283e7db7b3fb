"""Linear (uniform) fake quantization for quantization-aware training (DESIGN.md section 4).

:class:`QConv2d` / :class:`QLinear` are ``nn.Conv2d`` / ``nn.Linear`` plus

* ``w_bit``: weights, symmetric, ``scale = t / (2^(w-1) - 1)``, clamp to [-t, t], round; t is
  max|w|, or for w < 5 bits the clip minimising the KL divergence between the float and the
  quantized distributions (set by :func:`calibrate`, kept in the ``weight_range`` buffer);
* ``a_bit``: inputs; ``half_wave`` (input after a ReLU): clip to [0, r], ``scale = r / (2^a - 1)``;
  full-wave: symmetric, clip to [-r, r] with a - 1 bits of magnitude.  r is the trainable
  ``activation_range`` (PACT, Choi et al. 2018: dL/dr collects the gradient of the clipped
  inputs), initialised to 6 and set by calibration to min(6, max|x|) or, for a < 5, the KL clip;
* rounding with the straight-through estimator (gradient 1 inside the clip range, 0 outside);
  biases stay in floating point.  ``-1`` bits = not quantized; with both at -1 the layer computes
  exactly what the float layer does.

State-dict entries beyond the float layer's: ``activation_range`` [1] and ``weight_range`` [1],
the names the released HAQ checkpoints use.
"""
import logging
import math

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

logger = logging.getLogger(__name__)

# Bit widths <= kl_max_bit get the KL-optimal clip at calibration (HAQ: "< 5 bits", i.e. 4).
# The default is 0 (max clip everywhere): on the embedded MobileNet-V2 the KL clip of <= 4-bit
# layers collapses the model (uniform w4a4 right after calibration: 9.7% top-1 with KL, 90.1%
# with the max clip; w8a4 9.7% vs 95.9%), because a peaked post-ReLU histogram makes KL pick a
# clip of a few percent of the range. ``calibrate(..., kl_max_bit=4)`` restores HAQ's rule.
KL_MAX_BIT = 4
DEFAULT_KL_MAX_BIT = 0
ACT_RANGE_INIT = 6.0  # ReLU6's range: the released code's initial/maximum activation clip
_MIN_RANGE = 1e-8  # keeps a dead (all-zero) input from giving a zero scale


def n_steps(bits, signed):
    """Quantization steps above zero: 2^(b-1) - 1 for a signed grid, 2^b - 1 for [0, r]."""
    return 2 ** (bits - 1) - 1 if signed else 2 ** bits - 1


class _FakeQuant(torch.autograd.Function):
    """round(clamp(x, lo, r) / s) * s with s = r / steps and lo = -r (signed) or 0.

    Backward (straight-through estimator): dL/dx = dL/dy inside (lo, r), 0 outside (the
    boundary itself has measure zero, and after a ReLU its gradient is zero anyway);
    dL/dr = sum of dL/dy over x > r, minus the sum over x < -r when signed (PACT).  With
    ``steps == 0`` (1-bit signed) the output is ``r * sign(x)``.

    On the CPU the range is read once as a Python float: scalar clamps/compares run at about
    twice the speed of broadcast [1]-tensor ones, and hardtanh_backward gives the STE mask in
    one pass.  On an accelerator everything stays on the device (no host sync).
    """

    @staticmethod
    def forward(ctx, x, r, steps, signed):
        r = r.detach().clamp(min=_MIN_RANGE).to(x.dtype)
        if _host_scalars(x):
            r = float(r)
        lo = -r if signed else 0.0 * r
        ctx.signed, ctx.r = signed, r
        ctx.save_for_backward(x)
        if steps == 0:
            return torch.where(x >= 0, r, lo).to(x.dtype)
        scale = r / steps
        # one allocation, then in-place passes: activations are the big tensors here
        return torch.clamp(x, lo, r).div_(scale).round_().mul_(scale)

    @staticmethod
    def backward(ctx, grad):
        (x,), r, signed = ctx.saved_tensors, ctx.r, ctx.signed
        lo = -r if signed else 0.0 * r
        grad_x = grad_r = None
        if ctx.needs_input_grad[0]:
            grad_x = _pass_inside(grad, x, lo, r)
        if ctx.needs_input_grad[1]:
            grad_r = _pass_inside(grad, x, r, math.inf).sum()
            if signed:
                grad_r = grad_r - _pass_inside(grad, x, -math.inf, lo).sum()
            grad_r = grad_r.reshape(1)
        return grad_x, grad_r, None, None


def _host_scalars(x):
    """Whether the range may be read to the host (free on the CPU; a sync on a GPU)."""
    return x.device.type == "cpu"


def _pass_inside(grad, x, lo, hi):
    """grad where lo < x < hi, else 0 (one fused pass on the CPU via hardtanh_backward)."""
    if torch.is_tensor(lo) or torch.is_tensor(hi):
        return torch.where((x > lo) & (x < hi), grad, 0)
    return torch.ops.aten.hardtanh_backward(grad, x, lo, hi)


def fake_quantize(x, r, bits, signed):
    """Fake-quantize ``x`` to ``bits`` on the grid of range ``r`` (tensor [1]); see _FakeQuant."""
    return _FakeQuant.apply(x, r, n_steps(bits, signed), signed)


def kl_clip(values, bits, signed, bins=2048, max_candidates=256):
    """KL-optimal clip of ``values`` for a ``bits``-bit grid (entropy calibration, TensorRT-style).

    The histogram of |x| (of max(x, 0) for an unsigned grid) over [0, max] is cut at each
    candidate bin i; P = the first i bins with the tail folded into the last, Q = P merged into
    the grid's levels and spread back over each level's non-empty bins.  Returns the
    threshold i * bin_width minimising KL(P || Q); it never exceeds max|x|.
    """
    v = values.detach().float().reshape(-1)
    v = v.abs() if signed else v.clamp(min=0)
    # Exact zeros (most of a post-ReLU tensor) sit on the grid at no error; left in,
    # their spike in the first bin drags the optimum to a tiny clip.
    v = v[v > 0]
    top = float(v.max()) if v.numel() else 0.0
    if top <= 0.0:
        return top
    hist = torch.histc(v.cpu(), bins=bins, min=0.0, max=top).double().numpy()
    levels = 2 ** (bits - 1) if signed else 2 ** bits
    if levels >= bins:
        return top
    stride = max(1, (bins - levels) // max_candidates)
    best_i, best_kl = bins, np.inf
    for i in list(range(levels, bins, stride)) + [bins]:
        p = hist[:i].copy()
        p[-1] += hist[i:].sum()
        nonzero = p > 0  # Q lives where P does (the folded tail included)
        group = np.arange(i) * levels // i
        mass = np.bincount(group, weights=hist[:i], minlength=levels)
        width = np.bincount(group, weights=nonzero, minlength=levels)
        q = np.where(nonzero, (mass / np.maximum(width, 1))[group], 0.0)
        kl = _kl(p, q)
        if kl < best_kl:
            best_i, best_kl = i, kl
    return best_i * top / bins


def _kl(p, q, eps=1e-10):
    """KL(p || q) of two unnormalised histograms; q's empty bins get eps so P's tail counts."""
    p = p / p.sum()
    q = np.maximum(q / max(q.sum(), eps), eps)
    mask = p > 0
    return float(np.sum(p[mask] * np.log(p[mask] / q[mask])))


class _QuantMixin:
    """Quantization state and forward helpers shared by QConv2d and QLinear."""

    def _init_quant(self, w_bit, a_bit, half_wave):
        ref = self.weight
        self.half_wave = bool(half_wave)
        self.calibrating = False
        self.kl_max_bit = DEFAULT_KL_MAX_BIT
        self.activation_range = nn.Parameter(
            torch.full((1,), ACT_RANGE_INIT, device=ref.device, dtype=ref.dtype))
        self.register_buffer("weight_range",
                             torch.full((1,), -1.0, device=ref.device, dtype=ref.dtype))
        self.set_bits(w_bit, a_bit)

    def set_bits(self, w_bit=None, a_bit=None):
        """Set the bit widths (-1 = not quantized); None leaves one unchanged.

        An unquantized input makes ``activation_range`` frozen (requires_grad False) so that
        DistributedDataParallel does not wait for a gradient it never gets.
        """
        if w_bit is not None:
            self.w_bit = int(w_bit)
        if a_bit is not None:
            self.a_bit = int(a_bit)
            self.activation_range.requires_grad_(self.a_bit > 0)
        return self

    def quantized_input(self, x):
        if self.calibrating:
            self._calibrate_activation(x)
        if self.a_bit <= 0:
            return x
        return fake_quantize(x, self.activation_range, self.a_bit, signed=not self.half_wave)

    def quantized_weight(self):
        if self.calibrating:
            self._calibrate_weight()
        w = self.weight
        if self.w_bit <= 0:
            return w
        t = w.detach().abs().max().reshape(1)
        if self.w_bit <= self.kl_max_bit:  # the calibrated KL clip, until calibration max|w|
            t = torch.where(self.weight_range > 0, self.weight_range, t)
        return fake_quantize(w, t, self.w_bit, signed=True)

    @torch.no_grad()
    def _calibrate_weight(self):
        if 0 < self.w_bit <= self.kl_max_bit:
            t = kl_clip(self.weight, self.w_bit, signed=True)
        else:
            t = float(self.weight.abs().max())
        self.weight_range.fill_(t)

    @torch.no_grad()
    def _calibrate_activation(self, x):
        signed = not self.half_wave
        if 0 < self.a_bit <= self.kl_max_bit:
            r = kl_clip(x, self.a_bit, signed=signed)
        else:
            top = x.abs().max() if signed else x.clamp(min=0).max()
            r = min(ACT_RANGE_INIT, float(top))
        self.activation_range.fill_(max(r, _MIN_RANGE))

    def extra_repr(self):
        return (super().extra_repr()
                + f", w_bit={self.w_bit}, a_bit={self.a_bit}, half_wave={self.half_wave}")


class QConv2d(_QuantMixin, nn.Conv2d):
    """``nn.Conv2d`` with fake-quantized weights (``w_bit``) and input (``a_bit``)."""

    def __init__(self, in_channels, out_channels, kernel_size, stride=1, padding=0, dilation=1,
                 groups=1, bias=True, w_bit=-1, a_bit=-1, half_wave=True, **factory_kwargs):
        super().__init__(in_channels, out_channels, kernel_size, stride=stride, padding=padding,
                         dilation=dilation, groups=groups, bias=bias, **factory_kwargs)
        self._init_quant(w_bit, a_bit, half_wave)

    def forward(self, x):
        return self._conv_forward(self.quantized_input(x), self.quantized_weight(), self.bias)


class QLinear(_QuantMixin, nn.Linear):
    """``nn.Linear`` with fake-quantized weights (``w_bit``) and input (``a_bit``)."""

    def __init__(self, in_features, out_features, bias=True, w_bit=-1, a_bit=-1, half_wave=True,
                 **factory_kwargs):
        super().__init__(in_features, out_features, bias=bias, **factory_kwargs)
        self._init_quant(w_bit, a_bit, half_wave)

    def forward(self, x):
        return F.linear(self.quantized_input(x), self.quantized_weight(), self.bias)


def quant_layers(model):
    """The model's QConv2d/QLinear modules, in modules() order."""
    return [m for m in model.modules() if isinstance(m, (QConv2d, QLinear))]


@torch.no_grad()
def calibrate(model, loader, device=None, kl_max_bit=DEFAULT_KL_MAX_BIT):
    """Set every Q layer's ``weight_range`` and ``activation_range`` from one batch.

    ``loader`` yields ``(inputs, targets)`` batches (or inputs), or is an input tensor.  The
    model runs in eval mode (BN statistics untouched); its mode is restored afterwards.
    Layers of ``kl_max_bit`` bits or fewer get the KL-optimal clip, the rest max|.| (see
    DEFAULT_KL_MAX_BIT for why the default is 0).
    """
    layers = quant_layers(model)
    if not layers:
        logger.warning("calibrate: the model has no QConv2d/QLinear layers")
        return model
    if isinstance(loader, torch.Tensor):
        inputs = loader
    else:
        batch = next(iter(loader))
        inputs = batch[0] if isinstance(batch, (list, tuple)) else batch
    if device is None:
        device = layers[0].weight.device
    was_training = model.training
    model.eval()
    for m in layers:
        m.calibrating = True
        m.kl_max_bit = kl_max_bit
    try:
        model(inputs.to(device))
    finally:
        for m in layers:
            m.calibrating = False
        model.train(was_training)
    logger.debug("calibrated %d layers on a batch of %d", len(layers), inputs.shape[0])
    return model
