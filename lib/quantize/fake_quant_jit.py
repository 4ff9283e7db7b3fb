"""The CPU fake quantization's elementwise passes compiled with numba: the values of the
torch passes, in fewer passes over memory.

- Forward, ``round(clamp(x, lo, hi) / scale) * scale``: torch runs four in-place passes
  (clamp, div, round, mul; lib/quantize/linear.py), ~1.2 ms per 3.1M values on one
  thread even block by block in cache; the compiled loop reads and writes each value
  once, ~0.65 ms. The same IEEE single operations in the same order: the bounds and
  the scale rounded to the tensor's dtype as torch rounds a Python scalar, ``rint``
  rounding half to even as ``torch.round`` does, NaN passing the clamp as in
  ``torch.clamp``.
- Backward, the straight-through estimator's masks (dL/dx inside the clip, and the
  values PACT's dL/dr sums above and below it): one pass instead of one
  ``hardtanh_backward`` per mask, ~1.7 against 2.2 ms; the sums stay torch's.

This was most of what a linear-mode search episode paid over the float model beyond
the agent (issue 17). The loops are single-threaded; lib/quantize/linear.py
(``compiled_passes``) runs the forward at up to two torch threads and the STE at one,
where each was measured to beat torch's passes. tests/test_speed.py compares values and
gradients with the torch passes, bit for bit.
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


@jit
def _pass_inside(g, x, lo, hi, gx, above, below):
    """The straight-through estimator's three masks in one pass: ``gx`` = g where
    lo < x < hi, ``above`` where hi < x < inf, ``below`` where -inf < x < lo, else +0, as
    ``aten.hardtanh_backward`` writes them. A zero-length output is not written. A NaN in
    x gives 0, as torch's vectorised loop does (its scalar tail lets g through)."""
    want_x, want_above, want_below = gx.size > 0, above.size > 0, below.size > 0
    for i in range(x.size):
        v = x[i]
        gi = g[i]
        if want_x:
            gx[i] = gi if (v > lo and v < hi) else 0.0
        if want_above:
            above[i] = gi if (v > hi and v < np.inf) else 0.0
        if want_below:
            below[i] = gi if (v > -np.inf and v < lo) else 0.0


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


def pass_inside(flat_g, flat_x, lo, hi, flat_gx, above, below):
    """:func:`_pass_inside` on 1-D CPU views where :func:`applies` (None: not wanted)."""
    cast = _NUMPY_DTYPES[flat_x.dtype]
    none = _EMPTY[flat_x.dtype]
    _pass_inside(flat_g.detach().numpy(), flat_x.detach().numpy(), cast(lo), cast(hi),
                 *(none if t is None else t.detach().numpy() for t in (flat_gx, above, below)))
