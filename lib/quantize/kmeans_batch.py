"""The fast 1-D K-Means of many weight tensors at once, with the same centroids as one by one.

:func:`lib.quantize.kmeans.kmeans_centroids` seeds with greedy k-means++, k - 1
sequential rounds of a few numpy calls each on arrays of size ~k; for the 371
clusterings a sensitivity scan of a MobileNetV2 needs (53 layers x 7 widths) that is
~2.5 s of interpreter overhead. :class:`SortedLayers` runs the rounds of all layers
of one width in lockstep: every array gets a leading row axis, and the searches in
each row's sorted data become one search in their concatenation, keyed by
``(row, value)`` with the float32 values mapped to order-preserving integers. Each
row draws from its own generator as the single version does (one integer, then
``n_trials`` uniforms per round), row operations are elementwise or row-wise
(cumsum, sort, argmin along the row) and a row that runs out of distinct values
stops where the single version stops, so the centroids are identical, not merely
close: tests/test_quantize.py compares them bit for bit. Where numba is installed each
row is seeded by the compiled version instead (lib/quantize/kmeans_jit.py; the same
values again, and far sooner than the lockstep).
"""

import numpy as np
import torch

from .kmeans import METHODS, _fast_iters, _finish, _n_trials, _Sorted1D, kmeans_centroids

_PROBES = 64   # as _Cells.sample


def _order_keys(values):
    """float32 -> int64 keys with the same order (and -0.0 equal to 0.0)."""
    v = np.asarray(values, dtype=np.float32) + np.float32(0.0)   # -0.0 + 0.0 = +0.0
    u = v.view(np.uint32).astype(np.int64)
    return np.where(u >= 0x80000000, 0xFFFFFFFF - u, u | 0x80000000)


class SortedLayers:
    """The sorted data of several 1-D tensors, sorted once and clustered at any k."""

    def __init__(self, xs):
        self.raw = [np.asarray(x, dtype=np.float32).reshape(-1) for x in xs]
        self.rows = [_Sorted1D(x) for x in self.raw]
        self.n = np.array([d.n for d in self.rows], dtype=np.int64)
        self.xoff = np.concatenate(([0], np.cumsum(self.n)[:-1])).astype(np.int64)
        self.poff = self.xoff + np.arange(len(self.rows))   # prefix arrays hold n + 1 entries
        self.xs = np.concatenate([d.xs for d in self.rows]) if self.rows else np.zeros(0)
        self.p1 = np.concatenate([d.p1 for d in self.rows]) if self.rows else np.zeros(0)
        self.p2 = np.concatenate([d.p2 for d in self.rows]) if self.rows else np.zeros(0)
        for d, xo, po in zip(self.rows, self.xoff, self.poff):   # views: one copy in memory
            d.xs, d.p1, d.p2 = (self.xs[xo:xo + d.n], self.p1[po:po + d.n + 1],
                                self.p2[po:po + d.n + 1])
        row_of = np.repeat(np.arange(len(self.rows), dtype=np.int64), self.n)
        self.keys = (row_of << 32) + _order_keys(self.xs)

    def centroids(self, k, n_iter=3, seeds=None, min_iter=None, method="fast"):
        """``[kmeans_centroids(x_i, k, n_iter, method, seeds[i], min_iter) for each row i]``."""
        seeds = [None] * len(self.rows) if seeds is None else list(seeds)
        if method not in METHODS:
            raise ValueError(f"unknown k-means method {method!r}; expected one of {METHODS}")
        if method != "fast":
            return [kmeans_centroids(torch.from_numpy(x), k, n_iter, method, s, min_iter)
                    for x, s in zip(self.raw, seeds)]
        n_iter = _fast_iters(n_iter, min_iter)
        out = [None] * len(self.rows)
        ks = np.maximum(1, np.minimum(int(k), self.n))
        from . import kmeans_jit   # imports numba: only once something is clustered
        compiled = kmeans_jit.available()
        for kk in np.unique(ks):   # rows with fewer values than k cluster at their own k
            rows = np.flatnonzero(ks == kk)
            rngs = [np.random.default_rng(seeds[r]) for r in rows]
            if compiled:   # each row's compiled seeding beats the lockstep by far (same values)
                seeded = [kmeans_jit.kmeans_pp(self.rows[r], int(kk), g)
                          for r, g in zip(rows, rngs)]
            else:
                seeded = _Lockstep(self, rows, int(kk)).seed(rngs)
            for r, centers in zip(rows, seeded):
                out[r] = _finish(self.rows[r], centers, int(kk), n_iter)
        return out

    # -- the row-wise forms of _Sorted1D's methods (``rows``: row ids, leading axis)
    def split(self, rows, values):
        keys = (rows.reshape(-1, *[1] * (np.ndim(values) - 1)) << 32) + _order_keys(values)
        return np.searchsorted(self.keys, keys, side="left") - _col(self.xoff[rows], values)

    def sse(self, rows, lo, hi, c):
        base = _col(self.poff[rows], lo)
        s1 = self.p1[base + hi] - self.p1[base + lo]
        s2 = self.p2[base + hi] - self.p2[base + lo]
        return np.maximum(s2 - 2.0 * c * s1 + (hi - lo) * c * c, 0.0)


def _col(per_row, like):
    """``per_row`` [R] shaped to broadcast against ``like`` [R, ...]."""
    return per_row.reshape(-1, *[1] * (np.ndim(like) - 1))


def _take(a, idx):
    return np.take_along_axis(a, idx, axis=1)


class _Lockstep:
    """Greedy k-means++ (kmeans._kmeans_pp) for the rows ``rows`` of ``data``, all at one k."""

    def __init__(self, data, rows, k):
        self.data, self.rows, self.k = data, np.asarray(rows, dtype=np.int64), k
        self.n_trials = _n_trials(k)

    def seed(self, rngs):
        d, k, T = self.data, self.k, self.n_trials
        first = [d.xs[d.xoff[r] + rng.integers(int(d.n[r]))] for r, rng in zip(self.rows, rngs)]
        # each row's generator in the single version's order: one integer, then T per round
        draws = np.stack([rng.random((k - 1) * T) for rng in rngs]).reshape(len(rngs), k - 1, T)
        centers = np.array(first, dtype=np.float64).reshape(-1, 1)
        live = np.arange(len(self.rows))   # positions still seeding
        result = [None] * len(self.rows)
        for it in range(k - 1):
            rows = self.rows[live]
            bounds, cum = self._cells(rows, centers)
            done = cum[:, -1] <= 0.0   # fewer distinct values than clusters: stop there
            for i in np.flatnonzero(done):
                result[live[i]] = centers[i]
            if done.any():
                keep = ~done
                live, rows, centers, bounds, cum = (a[keep] for a in (live, rows, centers,
                                                                       bounds, cum))
                if live.size == 0:
                    break
            r = draws[live, it] * cum[:, -1:]
            j = self._sample(rows, centers, bounds, cum, r)
            cand = d.xs[_col(d.xoff[rows], j) + j].astype(np.float64)
            pot = self._potential_with(rows, centers, bounds, cum, cand)
            best = _take(cand, np.argmin(pot, axis=1)[:, None])
            centers = np.sort(np.concatenate([centers, best], axis=1), axis=1)
        for i, c in zip(live, centers):
            if result[i] is None:
                result[i] = c
        return result

    def _cells(self, rows, centers):
        d = self.data
        mids = 0.5 * (centers[:, :-1] + centers[:, 1:])
        bounds = np.concatenate([np.zeros((len(rows), 1), dtype=np.int64), d.split(rows, mids),
                                 d.n[rows][:, None]], axis=1)
        pot = d.sse(rows, bounds[:, :-1], bounds[:, 1:], centers)
        cum = np.concatenate([np.zeros((len(rows), 1)), np.cumsum(pot, axis=1)], axis=1)
        return bounds, cum

    def _sample(self, rows, centers, bounds, cum, r):
        """Row-wise _Cells.sample: D^2 sampling, probing each row's trials until all converge."""
        d, m = self.data, centers.shape[1]
        t = np.minimum((cum[:, None, :] <= r[:, :, None]).sum(axis=2) - 1, m - 1)
        rest = (r - _take(cum, t))[..., None]
        c = _take(centers, t)[..., None]
        lo, hi = _take(bounds, t), _take(bounds, t + 1)
        base = lo[..., None]
        steps = np.arange(1, _PROBES + 1)
        while True:
            # the single version probes while any trial *of its own* row is unresolved
            active = np.any(hi - lo > 1, axis=1)
            if not active.any():
                break
            j = lo[..., None] + ((hi - lo)[..., None] * steps) // (_PROBES + 1)
            j = np.maximum(j, lo[..., None] + 1)
            ok = d.sse(rows, base, j, c) <= rest
            n_ok = ok.sum(axis=2)
            new_lo = np.where(n_ok > 0, _take3(j, np.maximum(n_ok - 1, 0)), lo)
            new_hi = np.where(n_ok < _PROBES, _take3(j, np.minimum(n_ok, _PROBES - 1)), hi)
            new_hi = np.maximum(new_hi, new_lo + 1)
            lo = np.where(active[:, None], new_lo, lo)
            hi = np.where(active[:, None], new_hi, hi)
        return np.minimum(lo, _col(d.n[rows], lo) - 1)

    def _prefix(self, rows, centers, bounds, cum, j):
        m = centers.shape[1]
        t = np.minimum((bounds[:, None, :] <= j[:, :, None]).sum(axis=2) - 1, m - 1)
        return _take(cum, t) + self.data.sse(rows, _take(bounds, t), j, _take(centers, t))

    def _potential_with(self, rows, centers, bounds, cum, cand):
        d, m = self.data, centers.shape[1]
        pos = (centers[:, None, :] < cand[:, :, None]).sum(axis=2)   # searchsorted, left
        left = _take(centers, np.maximum(pos - 1, 0))
        right = _take(centers, np.minimum(pos, m - 1))
        lo = np.where(pos > 0, d.split(rows, 0.5 * (left + cand)), 0)
        hi = np.where(pos < m, d.split(rows, 0.5 * (cand + right)), _col(d.n[rows], cand))
        old = self._prefix(rows, centers, bounds, cum, hi) - self._prefix(rows, centers, bounds,
                                                                          cum, lo)
        return cum[:, -1:] - old + d.sse(rows, lo, hi, cand)


def _take3(a, idx):
    """``a[r, t, idx[r, t]]``."""
    return np.take_along_axis(a, idx[..., None], axis=2)[..., 0]


def centroids_by_width(xs, widths, n_iter=3, seeds=None, method="fast", min_iter=None,
                       max_values=1 << 22):
    """``{(i, bits): kmeans_centroids(xs[i], 2**bits, n_iter, method, seeds[i], min_iter)}``.

    Rows are sorted once for all widths, in groups of at most ``max_values`` values (about
    30 bytes each while a group is held). Empty rows are left out.
    """
    seeds = [None] * len(xs) if seeds is None else list(seeds)
    todo = [i for i, x in enumerate(xs) if np.size(x) > 0]
    out = {}
    while todo:
        group, size = [], 0
        while todo and (not group or size + np.size(xs[todo[0]]) <= max_values):
            size += np.size(xs[todo[0]])
            group.append(todo.pop(0))
        data = SortedLayers([xs[i] for i in group])
        for bits in widths:
            found = data.centroids(2 ** bits, n_iter, [seeds[i] for i in group], min_iter, method)
            out.update({(i, bits): c for i, c in zip(group, found)})
    return out
