"""The CPU fake quantization's elementwise passes compiled with numba: the values of the
torch passes (PACT's dL/dr, a sum, within rounding), in fewer passes over memory.

- Forward, ``round(clamp(x, lo, hi) / scale) * scale``: torch runs four in-place passes
  (clamp, div, round, mul; lib/quantize/linear.py), ~1.2 ms per 3.1M values on one
  thread even block by block in cache; the compiled loop reads and writes each value
  once, ~0.65 ms. The same IEEE single operations in the same order: the bounds and
  the scale rounded to the tensor's dtype as torch rounds a Python scalar, ``rint``
  rounding half to even as ``torch.round`` does, NaN passing the clamp as in
  ``torch.clamp``.
- Backward, the straight-through estimator: dL/dx inside the clip, and PACT's dL/dr (the
  gradient summed above the clip, minus below it when signed), in one pass that writes
  dL/dx and keeps the sums in float64 registers. torch needs a ``hardtanh_backward`` per
  mask and a sum over each: 0.25 against 0.74 ms per 1.6M values at one thread, 0.17
  against 0.42 ms per 1M at two. dL/dx is torch's bit for bit; dL/dr, a sum, is rounded
  once from float64 instead of by torch's float32 summation (closer to the exact sum).

This was most of what a linear-mode search episode paid over the float model beyond
the agent (issue 17). The loops are single-threaded; lib/quantize/linear.py
(``compiled_passes``) runs them at up to two torch threads, where both were measured to
beat torch's passes. tests/test_speed.py compares values and gradients with the torch
passes.
"""
import numpy as np
import torch

from ..utils.numba_jit import available, jit

_NUMPY_DTYPES = {torch.float32: np.float32, torch.float64: np.float64}
_EMPTY = {t: np.empty(0, dtype=d) for t, d in _NUMPY_DTYPES.items()}   # "not wanted" outputs


@jit
def _clamp_round_scale(x, y, lo, hi, scale):
    for i in range(x.size):
        v = x[i]
        if v < lo:
            v = lo
        elif v > hi:   # NaN fails both tests and passes on, as in torch.clamp
            v = hi
        y[i] = np.rint(v / scale) * scale


# 'reassoc' lets LLVM split the two sums over vector lanes (0.25 instead of 3.1 ms per 1.6M
# values); it touches nothing else here, the rest being compares and selects.
@jit(fastmath={"reassoc"})
def _ste_pass(g, x, lo, hi, gx, signed):
    """The straight-through estimator in one pass: ``gx`` = g where lo < x < hi, else +0
    (as ``aten.hardtanh_backward`` writes it; a zero-length ``gx`` is not written), and
    PACT's two sums, of g where hi < x < inf and where -inf < x < lo (``signed`` only),
    accumulated in float64. A NaN in x gives 0 and adds nothing."""
    want_x = gx.size > 0
    above = 0.0
    below = 0.0
    for i in range(x.size):
        v = x[i]
        gi = g[i]
        if want_x:
            gx[i] = gi if (v > lo and v < hi) else 0.0
        above += np.float64(gi) if (v > hi and v < np.inf) else 0.0
        if signed:
            below += np.float64(gi) if (v > -np.inf and v < lo) else 0.0
    return above, below


def applies(flat_x):
    """Whether the passes can run on this 1-D CPU view: numba importable and a dtype numpy
    has. (lib/quantize/linear.py's ``compiled_passes`` decides when they do.)"""
    return flat_x.dtype in _NUMPY_DTYPES and available()


def quantize(flat_x, flat_y, lo, hi, scale):
    """Write ``round(clamp(flat_x, lo, hi) / scale) * scale`` into ``flat_y`` (1-D CPU views
    of the same length and dtype, where :func:`applies`)."""
    cast = _NUMPY_DTYPES[flat_x.dtype]
    _clamp_round_scale(flat_x.detach().numpy(), flat_y.detach().numpy(),
                       cast(lo), cast(hi), cast(scale))


def ste(flat_g, flat_x, lo, hi, flat_gx, signed):
    """:func:`_ste_pass` on 1-D CPU views where :func:`applies` (``flat_gx`` None: not
    wanted); returns dL/dr = the sum above minus the sum below, a Python float."""
    cast = _NUMPY_DTYPES[flat_x.dtype]
    gx = _EMPTY[flat_x.dtype] if flat_gx is None else flat_gx.detach().numpy()
    above, below = _ste_pass(flat_g.detach().numpy(), flat_x.detach().numpy(), cast(lo),
                             cast(hi), gx, signed)
    return above - below
