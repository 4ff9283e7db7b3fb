"""Linear (uniform) fake quantization for quantization-aware training (docs/design.md, quantizers).

:class:`QConv2d` / :class:`QLinear` are ``nn.Conv2d`` / ``nn.Linear`` plus

* ``w_bit``: weights, symmetric, ``scale = t / (2^(w-1) - 1)``, clamp to [-t, t], round.  t is
  the ``weight_range`` buffer: set once by :func:`calibrate` (max|w|, or for w <= kl_max_bit the
  released HAQ divergence clip, :func:`kl_clip`), then fixed for the whole fine-tune, saved in
  the state_dict and used as loaded (as released).  A layer used before any calibration takes
  max|w| of its weights at its first quantized forward and keeps it (the released lazy init);
* ``a_bit``: inputs; ``half_wave`` (input after a ReLU): clip to [0, r], ``scale = r / (2^a - 1)``;
  full-wave: symmetric, clip to [-r, r] with a - 1 bits of magnitude.  r is the trainable
  ``activation_range`` (PACT, Choi et al. 2018: dL/dr collects the gradient of the clipped
  inputs), initialised to 6 and set by calibration to min(6, max|x|), or for a magnitude of
  <= kl_max_bit bits to the smaller of that and the divergence clip;
* rounding with the straight-through estimator.  Inputs: gradient 1 inside the clip range, 0
  outside.  Weights: gradient 1 everywhere, clipped or not, as released -- with a mask the
  largest-magnitude weight of every layer (the one at t = max|w|) would never train;
  biases stay in floating point.  ``-1`` bits = not quantized; with both at -1 the layer
  computes exactly what the float layer does.

State-dict entries beyond the float layer's: ``activation_range`` [1] and ``weight_range`` [1],
the names the released HAQ checkpoints use (``weight_range`` <= 0: not set yet); with
per-channel scales (lib.quantize.options) ``weight_range`` is [C, 1, 1, 1] / [C, 1].  The
forward pass reads the bit widths from integer buffers outside the state_dict (``w_bit_tensor``,
``a_bit_tensor``), so that torch.compile makes one graph for every policy.
"""
import logging

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

logger = logging.getLogger(__name__)

# Bit widths <= kl_max_bit get the released divergence clip at calibration (HAQ: "< 5 bits",
# i.e. 4).  The default is 0 (max clip everywhere) because it measured better on the embedded
# MobileNet-V2 (finetune.py, demo settings, top-1 right after calibration -> after 2 epochs):
# uniform w4a4 max 92.0 -> 98.2 vs released rule 62.2 -> 96.9; the published MobileNet-V2 policy
# max 97.5 -> 98.3 vs 97.4 -> 98.4 (a tie).  The loss is in the activation clips (median half of
# max|x|; w4a4 after calibration: the rule on weights only 93.4, on inputs only 73.9), which
# count 2^(a-1) levels as released although a [0, r] input grid has 2^a.
RELEASED_KL_MAX_BIT = 4
DEFAULT_KL_MAX_BIT = 0
ACT_RANGE_INIT = 6.0  # ReLU6's range: the released code's initial/maximum activation clip
_MIN_RANGE = 1e-8  # keeps a dead (all-zero) input from giving a zero scale


def n_steps(bits, signed):
    """Quantization steps above zero: 2^(b-1) - 1 for a signed grid, 2^b - 1 for [0, r].

    ``bits`` >= 1, an int or an integer tensor; shifts, which torch.compile fuses into the
    quantizer's kernel (a power of an integer tensor it leaves as a separate call).
    """
    return (1 << (bits - 1)) - 1 if signed else (1 << bits) - 1


class _FakeQuant(torch.autograd.Function):
    """y = round(clamp(x, lo, r) / s) * s with s = r / steps and lo = -r (signed) or 0.

    Backward (straight-through estimator): with ``clip_grad`` (inputs), dL/dx = dL/dy inside
    (lo, r) and 0 outside (the boundary has measure zero, and after a ReLU its gradient is
    zero anyway); without it (weights, as released), dL/dx = dL/dy everywhere.  dL/dr = sum of
    dL/dy over x > r, minus the sum over x < -r when signed (PACT, Choi et al. 2018, eq. 3);
    weights' ``r`` is a buffer and gets none.  With ``steps == 0`` (1-bit signed) the output
    is ``r * sign(x)``.  The range and ``steps`` stay tensors on x's device: no host read, so
    an accelerator never waits, and torch.compile keeps one graph for every bit width (only
    ``signed`` and ``clip_grad``, fixed per layer, are Python values).
    """

    @staticmethod
    def forward(ctx, x, r, steps, signed, clip_grad):
        r = r.detach().clamp(min=_MIN_RANGE).to(x.dtype)
        ctx.signed, ctx.clip_grad = signed, clip_grad
        if clip_grad or ctx.needs_input_grad[1]:
            ctx.save_for_backward(x, r)
        lo = -r if signed else torch.zeros_like(r)
        # unsigned grids have steps >= 1; a signed one has 0 at 1 bit, kept off the division
        scale = r / steps.clamp(min=1)
        # one allocation, then in-place passes: activations are the big tensors here
        q = torch.clamp(x, lo, r).div_(scale).round_().mul_(scale)
        if signed:
            q = torch.where(steps > 0, q, torch.where(x >= 0, r, lo))
        return q

    @staticmethod
    def backward(ctx, grad):
        want_x, want_r = ctx.needs_input_grad[:2]
        grad_x = grad if want_x and not ctx.clip_grad else None
        grad_r = None
        if want_x and ctx.clip_grad or want_r:
            x, r = ctx.saved_tensors
            lo = -r if ctx.signed else torch.zeros_like(r)
            if want_x and ctx.clip_grad:
                grad_x = torch.where((x > lo) & (x < r), grad, 0)
            if want_r:
                grad_r = torch.where(x > r, grad, 0)
                if ctx.signed:
                    grad_r = grad_r - torch.where(x < lo, grad, 0)
                # summed over the dimensions r was broadcast along (one value per range)
                grad_r = grad_r.sum_to_size(r.shape)
        return grad_x, grad_r, None, None, None


def fake_quantize(x, r, bits, signed, clip_grad=True):
    """Fake-quantize ``x`` to ``bits`` (>= 1; an int, or an integer tensor on x's device) on the
    grid of range ``r`` (a tensor that broadcasts against x: [1], or one range per channel);
    see _FakeQuant.

    ``clip_grad=False`` passes the gradient of ``x`` straight through the clip too (weights).
    """
    bits = torch.as_tensor(bits, device=x.device)
    return _FakeQuant.apply(x, r, n_steps(bits, signed), signed, clip_grad)


def kl_clip(values, bits):
    """Clip of |values| for a grid of ``bits`` magnitude bits, by the released HAQ rule.

    The rule (HAQ's ``_compute_threshold``; the name "KL" is the release's): c = the CDF of a
    histogram of |x| over [0, max|x|] with numpy's ``'sqrt'`` bin count (about sqrt(N) bins of
    width h), exact zeros included.  Each candidate i = n+1 .. bins, with n = 2^(bits-1) levels,
    clips the CDF at bin i (p_j = c_j for j < i-1, 1 from i-1 on), samples its first i bins at
    n evenly spaced points and interpolates them back linearly to i bins (q_j = 1 beyond), and
    scores Jeffreys' divergence J(c, q) = sum_j (c_j - q_j) log2(c_j / q_j) (0 where c_j = q_j).
    Returns (i* + 1/2) h for the minimising i*, which can exceed max|x| by h/2 as released;
    max|x| if there are fewer than n+1 bins; 0 for an all-zero tensor.
    """
    v = values.detach().reshape(-1).abs().double().cpu().numpy()
    top = float(v.max()) if v.size else 0.0
    if top <= 0.0 or bits < 1:
        return top
    hist, edges = np.histogram(v, bins="sqrt", range=(0.0, top))
    cdf = np.cumsum(hist) / hist.sum()
    levels = 2 ** (bits - 1)
    if levels + 1 > len(hist):
        return top
    candidates = range(levels + 1, len(hist) + 1)
    scores = [_jeffreys(cdf, _resampled_cdf(cdf, i, levels)) for i in candidates]
    best = candidates[int(np.argmin(scores))]
    return float((best + 0.5) * (edges[1] - edges[0]))


def _resampled_cdf(cdf, i, levels):
    """The CDF clipped at bin i, seen through ``levels`` evenly spaced samples of its first i bins."""
    clipped = cdf[:i].copy()
    clipped[-1] = 1.0
    fine = np.linspace(0.0, 1.0, i)
    coarse = np.linspace(0.0, 1.0, levels)
    q = np.ones_like(cdf)
    q[:i] = np.interp(fine, coarse, np.interp(coarse, fine, clipped))
    return q


def _jeffreys(c, q):
    """Jeffreys' divergence sum (c - q) log2(c / q) of two CDFs; a 0/0 bin counts 0, 0 vs q > 0 inf."""
    differ = c != q
    with np.errstate(divide="ignore"):
        terms = (c[differ] - q[differ]) * (np.log2(c[differ]) - np.log2(q[differ]))
    return float(terms.sum())


class _QuantMixin:
    """Quantization state and forward helpers shared by QConv2d and QLinear."""

    # How code below lib/quantize (lib.utils.layers.quantizable_layers) tells a fake-quantized
    # layer from a float one without importing this module.
    fake_quantized = True
    # Quantizer options (lib.quantize.options.prepare_model sets them; these are the released
    # quantizer's): read by calibration only.
    per_channel = False
    weight_clip = "max"
    bias_correction = False
    weight_calibrator = None   # a function(layer) that sets weight_range in their stead

    def _init_quant(self, w_bit, a_bit, half_wave):
        ref = self.weight
        self.half_wave = bool(half_wave)
        self.calibrating = False
        self.kl_max_bit = DEFAULT_KL_MAX_BIT   # read by calibration only; calibrate() sets it
        self.activation_range = nn.Parameter(
            torch.full((1,), ACT_RANGE_INIT, device=ref.device, dtype=ref.dtype))
        self.register_buffer("weight_range",
                             torch.full((1,), -1.0, device=ref.device, dtype=ref.dtype))
        # The widths as the forward pass reads them: integer tensors on the layer's device,
        # so that a new policy changes data, not a compiled graph.  Not in the state_dict
        # (set_bits sets them; checkpoints keep the released entries).
        for name in ("w_bit_tensor", "a_bit_tensor"):
            self.register_buffer(name, torch.zeros((), dtype=torch.long, device=ref.device),
                                 persistent=False)
        self.set_bits(w_bit, a_bit)

    def set_bits(self, w_bit=None, a_bit=None):
        """Set the bit widths (-1 = not quantized); None leaves one unchanged.

        Ranges stay as they are: :func:`calibrate` afterwards sets them for the new widths.
        An unquantized input makes ``activation_range`` frozen (requires_grad False) so that
        DistributedDataParallel does not wait for a gradient it never gets.  The forward pass
        reads the widths from tensors and whether each is quantized from a bool: under
        torch.compile only switching a quantizer on or off recompiles, not a new width.
        """
        if w_bit is not None:
            self.w_bit = int(w_bit)
            self.w_quantized = self.w_bit > 0
            self.w_bit_tensor.fill_(max(self.w_bit, 0))
        if a_bit is not None:
            self.a_bit = int(a_bit)
            self.a_quantized = self.a_bit > 0
            self.a_bit_tensor.fill_(max(self.a_bit, 0))
            self.activation_range.requires_grad_(self.a_quantized)
        return self

    def quantized_input(self, x):
        """The fake-quantized input; during calibration its range is set and x passes as is."""
        if self.calibrating:
            self._calibrate_activation(x)
            self._calibration_input = x if self.bias_correction else None
            return x
        if not self.a_quantized:
            return x
        return fake_quantize(x, self.activation_range, self.a_bit_tensor,
                             signed=not self.half_wave)

    def quantized_weight(self):
        """The weight fake-quantized on the stored ``weight_range`` (float while calibrating)."""
        if self.calibrating:
            self._calibrate_weight()
            return self.weight
        if not self.w_quantized:
            return self.weight
        self._init_weight_range()
        return fake_quantize(self.weight, self.weight_range, self.w_bit_tensor, signed=True,
                             clip_grad=False)

    @torch.no_grad()
    def _init_weight_range(self):
        """Never calibrated (range <= 0): max|w| now, kept from then on (the released lazy init).

        A select on the device rather than a test on the host, which would wait for an
        accelerator at every layer and break a compiled graph.
        """
        r = self.weight_range
        r.copy_(torch.where(r > 0, r, self.weight.abs().max().to(r.dtype)))

    @torch.no_grad()
    def _calibrate_weight(self):
        if self.weight_calibrator is not None:
            self.weight_calibrator(self)
            return
        if 0 < self.w_bit <= self.kl_max_bit:
            t = kl_clip(self.weight, self.w_bit)
        else:
            t = float(self.weight.abs().max())
        self.weight_range.fill_(t)

    @torch.no_grad()
    def _calibrate_activation(self, x):
        signed = not self.half_wave
        top = x.abs().max() if signed else x.clamp(min=0).max()
        r = min(ACT_RANGE_INIT, float(top))
        magnitude_bits = self.a_bit - 1 if signed else self.a_bit
        if 0 < self.a_bit and magnitude_bits <= self.kl_max_bit:
            r = min(r, kl_clip(x, magnitude_bits))
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


def calibration_key(model, kl_max_bit=DEFAULT_KL_MAX_BIT):
    """What :func:`calibrate` reads of each layer's policy: the widths that take the divergence
    clip (0 where max|.| is taken). Calibration runs the float model, so for the same weights
    and batch, equal keys give equal ranges; with ``kl_max_bit`` 0 the key is all zeros."""
    key = []
    for m in quant_layers(model):
        magnitude = m.a_bit if m.half_wave else m.a_bit - 1
        by_width = 0 < m.w_bit <= kl_max_bit or (
            m.w_bit > 0 and (m.weight_clip != "max" or m.bias_correction))
        key.append((m.w_bit if by_width else 0,
                    magnitude if 0 < m.a_bit and 0 < magnitude <= kl_max_bit else 0))
    return tuple(key)


def get_ranges(model):
    """Copies of every Q layer's (weight_range, activation_range), in :func:`quant_layers` order;
    a layer with bias correction adds its (corrected) bias, which calibration also sets."""
    return [(m.weight_range.detach().clone(), m.activation_range.detach().clone())
            + ((m.bias.detach().clone(),) if m.bias_correction else ())
            for m in quant_layers(model)]


@torch.no_grad()
def set_ranges(model, ranges):
    """Put back ranges from :func:`get_ranges` (same model structure)."""
    for m, (w, a, *bias) in zip(quant_layers(model), ranges, strict=True):
        m.weight_range.copy_(w)
        m.activation_range.copy_(a)
        if bias:
            m.bias.copy_(bias[0])


@torch.no_grad()
def calibrate(model, loader, device=None, kl_max_bit=DEFAULT_KL_MAX_BIT):
    """Set every Q layer's ``weight_range`` and ``activation_range`` from one batch.

    ``loader`` yields ``(inputs, targets)`` batches (or inputs), or is an input tensor.  The
    model runs in eval mode (BN statistics untouched) and, as released, in floating point: each
    layer sees the float model's input.  Its mode is restored afterwards.  Weights of
    ``kl_max_bit`` bits or fewer, and inputs with that many magnitude bits or fewer, get the
    released divergence clip (:func:`kl_clip`), the rest max|.| (inputs: at most 6); 0 = max
    everywhere (see DEFAULT_KL_MAX_BIT for the default).  The ranges then stay fixed: weights'
    for good, inputs' until training moves them (PAC
    Layers prepared with quantizer options (lib.quantize.options) take their weight clips by
    those, and with bias correction their biases absorb the mean output shift of their
    quantized weights on this batch: call it on the float (uncorrected) weights.
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
            m._calibration_input = None
        model.train(was_training)
    for m in layers:
        shift = m.__dict__.pop("_bias_shift", None)
        if shift is not None:   # after the pass: every layer saw the float model's input
            m.bias.add_(shift.to(m.bias.dtype))
    logger.debug("calibrated %d layers on a batch of %d", len(layers), inputs.shape[0])
    return model
