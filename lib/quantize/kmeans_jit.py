"""Greedy k-means++ seeding compiled with numba: :func:`lib.quantize.kmeans._kmeans_pp`'s centroids,
value for value, some 40x sooner.

The numpy version spends its time in the interpreter: k - 1 sequential rounds of
~100 numpy calls on arrays of a few elements (~80 us a round; 21-32 ms for a
256-centroid layer), which made K-Means clustering the largest cost of a K-Means
search episode beyond the fp32 pass (issue 17). Here the same rounds run as one
compiled loop:

- the cells of the sorted centres are updated where the new centre lands (its
  neighbours' bounds and potentials, computed by the same expressions as the
  numpy version's full rebuild) and the cumulative potentials summed again in
  order, so every float equals the numpy version's;
- D^2 sampling finds, inside the drawn cell, the last point whose within-cell
  prefix potential is <= the remaining mass by bisection; the numpy version
  probes 64 points a round. Both return the unique such point as long as the
  prefix is monotone, as it is mathematically (rounding could only break a tie
  far below the spacing of the draws);
- the random numbers are drawn up front from the caller's generator in the
  order the numpy version draws them (one integer, then ``n_trials`` uniforms a
  round), so a seed gives the same centres.

tests/test_quantize.py compares the two on random, tied, constant and pruned data
and on real layers, bit for bit. numba is in requirements.txt; without it
:func:`available` is False and the numpy version runs. Compiled code is cached
next to this file (numba's ``cache=True``): the first process compiles (~1.5 s),
later ones load it (~0.3 s, plus numba's import, ~0.2 s).
"""
import numpy as np

from ..utils import numba_jit as _numba
from ..utils.numba_jit import jit as _jit
from .kmeans import _n_trials


def available():
    """Whether the compiled seeding can run (numba importable)."""
    return _numba.available()


@_jit
def _sse(p1, p2, lo, hi, c):
    """sum_{lo <= i < hi} (xs_i - c)^2 from the prefix sums: kmeans._Sorted1D.sse, one value."""
    s1 = p1[hi] - p1[lo]
    s2 = p2[hi] - p2[lo]
    v = s2 - 2.0 * c * s1 + (hi - lo) * c * c
    if v != v:   # NaN passes, as numpy.maximum lets it
        return v
    return v if v > 0.0 else 0.0


@_jit
def _search(a, size, v, right):
    """np.searchsorted(a[:size], v, side='right' if right else 'left')."""
    lo, hi = 0, size
    while lo < hi:
        mid = (lo + hi) >> 1
        if a[mid] < v or (right and a[mid] == v):
            lo = mid + 1
        else:
            hi = mid
    return lo


@_jit
def _split(xs, v):
    """np.searchsorted(xs, float32(v), side='left'): kmeans._Sorted1D.split, one value."""
    return _search(xs, xs.size, np.float32(v), False)


@_jit
def _prefix(p1, p2, centers, bounds, cum, m, j):
    """kmeans._Cells.prefix: potential of the sorted points before index j."""
    t = min(_search(bounds, m + 1, j, True) - 1, m - 1)
    return cum[t] + _sse(p1, p2, bounds[t], j, centers[t])


@_jit
def _sample(xs, p1, p2, centers, bounds, cum, m, r):
    """kmeans._Cells.sample for one draw ``r``: the point j with F(j) <= r < F(j + 1)."""
    t = min(_search(cum, m + 1, r, True) - 1, m - 1)
    rest = r - cum[t]
    c = centers[t]
    lo, hi = bounds[t], bounds[t + 1]
    base = lo
    while hi - lo > 1:
        mid = (lo + hi) >> 1
        if _sse(p1, p2, base, mid, c) <= rest:
            lo = mid
        else:
            hi = mid
    return min(lo, xs.size - 1)


@_jit
def _potential_with(xs, p1, p2, centers, bounds, cum, m, y):
    """kmeans._Cells.potential_with for one candidate centre ``y``."""
    n = xs.size
    pos = _search(centers, m, y, False)
    lo = _split(xs, 0.5 * (centers[pos - 1] + y)) if pos > 0 else 0
    hi = _split(xs, 0.5 * (y + centers[pos])) if pos < m else n
    old = (_prefix(p1, p2, centers, bounds, cum, m, hi)
           - _prefix(p1, p2, centers, bounds, cum, m, lo))
    return cum[m] - old + _sse(p1, p2, lo, hi, y)


@_jit
def _insert(xs, p1, p2, centers, bounds, pot, m, y):
    """Add centre ``y`` to the m sorted ones; recompute the cells whose bounds moved."""
    n = xs.size
    p = _search(centers, m, y, False)
    for i in range(m, p, -1):
        centers[i] = centers[i - 1]
        pot[i] = pot[i - 1]
    centers[p] = y
    for i in range(m + 1, p + 1, -1):
        bounds[i] = bounds[i - 1]
    bounds[m + 1] = n
    m += 1
    a, b = max(p - 1, 0), min(p + 2, m)
    for i in range(a + 1, b):
        bounds[i] = _split(xs, 0.5 * (centers[i - 1] + centers[i]))
    for i in range(a, b):
        pot[i] = _sse(p1, p2, bounds[i], bounds[i + 1], centers[i])
    return m


@_jit
def _seed(xs, p1, p2, k, first, draws):
    """The rounds of kmeans._kmeans_pp from its first centre and its uniforms [k - 1, n_trials]."""
    n_trials = draws.shape[1]
    centers = np.empty(k)
    bounds = np.empty(k + 1, dtype=np.int64)
    pot = np.empty(k)
    cum = np.empty(k + 1)
    centers[0], bounds[0], bounds[1] = first, 0, xs.size
    pot[0] = _sse(p1, p2, 0, xs.size, first)
    m = 1
    for step in range(k - 1):
        cum[0] = 0.0
        for i in range(m):
            cum[i + 1] = cum[i] + pot[i]
        total = cum[m]
        if total <= 0.0:   # fewer distinct values than clusters: nothing left to cover
            break
        best, best_pot = 0.0, np.inf
        for i in range(n_trials):
            y = np.float64(xs[_sample(xs, p1, p2, centers, bounds, cum, m, draws[step, i] * total)])
            v = _potential_with(xs, p1, p2, centers, bounds, cum, m, y)
            if v < best_pot:   # the first of equal minima, as numpy.argmin
                best, best_pot = y, v
        m = _insert(xs, p1, p2, centers, bounds, pot, m, best)
    return centers[:m].copy()


def kmeans_pp(data, k, rng):
    """:func:`lib.quantize.kmeans._kmeans_pp` (``data``: a ``_Sorted1D``), compiled."""
    n_trials = _n_trials(k)
    first = float(data.xs[rng.integers(data.n)])
    draws = rng.random((k - 1) * n_trials).reshape(k - 1, n_trials)
    return _seed(data.xs, data.p1, data.p2, int(k), first, draws)
