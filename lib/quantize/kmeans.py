"""K-Means weight sharing (HAQ's model-size experiments; Han et al., "Deep Compression", 2016).

Behaviour: docs/design.md, quantizers.

Each quantized layer's weights are flattened to 1-D and clustered into k = 2^bits centroids;
every weight is replaced by its centroid and the cluster labels are kept so that fine-tuning can
keep the weights shared (:class:`CentroidSharer`).

Two clustering back-ends give the same objective, the within-cluster sum of squares
``sum_i (w_i - c_{l_i})^2`` (the K-Means "inertia"):

* ``'sklearn'`` -- scikit-learn's ``KMeans`` (k-means++, ``n_init=1``, ``max_iter=n_iter``), the
  reference and what the released HAQ code ran.
* ``'fast'`` (default) -- the same algorithm specialised to 1-D data.  On sorted data a cluster is
  a contiguous run bounded by the midpoints between neighbouring centroids, so with prefix sums
  of ``x`` and ``x^2`` every quantity k-means++ and Lloyd need (cell sizes, sums, potentials,
  D^2-sampling) costs O(log n) instead of O(n).  Seeding is scikit-learn's greedy k-means++
  (``2 + ln k`` candidates per centroid, the one lowering the potential most is kept); Lloyd
  iterations cost O(k log n), so it runs at least ``FAST_MIN_ITER`` of them.  The O(n) work is
  the sort, the prefix sums and the final label assignment.

Pruned layers (``is_pruned``) cluster only their non-zero weights; the zeros get the extra label
``k`` whose centroid is pinned at 0, so they stay zero through the shared updates.
"""
import logging
import math
import time
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import torch

from lib.quantize.policy import resolve_kmeans_policy

logger = logging.getLogger(__name__)

METHODS = ("fast", "sklearn")
# The fast path runs at least this many Lloyd iterations: each costs O(k log n) there, and
# 3 iterations from k-means++ leave ~5% of the objective on the table (bench/quant_bench.py).
FAST_MIN_ITER = 20
HIGH_BIT = 6  # free_high_bit: layers above this many bits are left to train freely
_CHUNK = 1 << 18  # elements per chunk when labelling, to keep temporaries small
_GRID = 1 << 16  # cells of the labelling grid (assign_labels)


def label_dtype(n_labels):
    """Smallest integer dtype that holds the labels ``0 .. n_labels - 1``."""
    if n_labels <= 256:
        return torch.uint8
    if n_labels <= 32768:
        return torch.int16
    return torch.int32


@dataclass
class Codebook:
    """One layer's K-Means codebook.

    ``centroids``: float32 [k] (sorted ascending), plus a trailing 0 when ``pruned``;
    ``labels``: flat [#weights] in :func:`label_dtype`, ``labels[i]`` indexes ``centroids``.
    """
    centroids: torch.Tensor
    labels: torch.Tensor
    bits: int
    pruned: bool = False

    @property
    def n_clusters(self):
        """Number of trainable centroids (the pinned zero of a pruned layer excluded)."""
        return self.centroids.numel() - int(self.pruned)

    def weight(self, shape):
        """The quantized weight ``centroids[labels]`` reshaped to ``shape``."""
        return self.centroids.to(self.labels.device)[self.labels.long()].reshape(shape)

    def state_dict(self):
        """Plain tensors/ints only, so ``torch.load(weights_only=True)`` accepts it."""
        return {"centroids": self.centroids, "labels": self.labels,
                "bits": int(self.bits), "pruned": bool(self.pruned)}

    @classmethod
    def from_state_dict(cls, state):
        return cls(state["centroids"], state["labels"], int(state["bits"]), bool(state["pruned"]))


def codebooks_state_dict(codebooks):
    """``{name: Codebook}`` -> a checkpoint-friendly ``{name: dict}``."""
    return {name: cb.state_dict() for name, cb in codebooks.items()}


def load_codebooks(state):
    """Inverse of :func:`codebooks_state_dict`."""
    return {name: Codebook.from_state_dict(s) for name, s in state.items()}


# --------------------------------------------------------------------------------------------
# 1-D K-Means on sorted data


class _Sorted1D:
    """Sorted 1-D data with float64 prefix sums of x and x^2 (index i = sum of the first i)."""

    def __init__(self, x):
        self.xs = np.sort(np.asarray(x, dtype=np.float32))
        self.n = self.xs.size
        self.p1 = np.zeros(self.n + 1)
        np.cumsum(self.xs, dtype=np.float64, out=self.p1[1:])
        # float32 squares (relative error 6e-8 each) summed in float64: ample for potentials
        self.p2 = np.zeros(self.n + 1)
        np.cumsum(np.square(self.xs), dtype=np.float64, out=self.p2[1:])

    def split(self, values):
        """Index of the first sorted point >= each value (cluster boundaries)."""
        return np.searchsorted(self.xs, np.asarray(values, dtype=np.float32), side="left")

    def sse(self, lo, hi, c):
        """sum_{lo <= i < hi} (xs_i - c)^2 for arrays lo, hi, c (prefix-sum form)."""
        s1 = self.p1[hi] - self.p1[lo]
        s2 = self.p2[hi] - self.p2[lo]
        return np.maximum(s2 - 2.0 * c * s1 + (hi - lo) * c * c, 0.0)

    def cells(self, centers):
        """Boundaries [k + 1] of the nearest-centre cells of sorted ``centers``."""
        mids = 0.5 * (centers[:-1] + centers[1:])
        return np.concatenate(([0], self.split(mids), [self.n]))


class _Cells:
    """Nearest-centre cells of sorted ``centers`` over the sorted data, with their potentials."""

    def __init__(self, data, centers):
        self.data = data
        self.centers = centers
        self.bounds = data.cells(centers)
        pot = data.sse(self.bounds[:-1], self.bounds[1:], centers)
        self.cum = np.concatenate(([0.0], np.cumsum(pot)))
        self.total = float(self.cum[-1])

    def prefix(self, j):
        """F(j) = sum_{i < j} D^2(xs_i) for an index array ``j`` (D: distance to nearest centre)."""
        t = np.minimum(np.searchsorted(self.bounds, j, side="right") - 1, self.centers.size - 1)
        return self.cum[t] + self.data.sse(self.bounds[t], j, self.centers[t])

    def sample(self, r, probes=64):
        """Indices j with F(j) <= r < F(j + 1): D^2 sampling.

        The cell is found from the cumulative cell potentials; inside it the within-cell
        prefix (monotone in j) is searched with ``probes`` evaluations per round, so a
        cell of m points takes log_probes(m) rounds.
        """
        t = np.minimum(np.searchsorted(self.cum, r, side="right") - 1, self.centers.size - 1)
        rest = (r - self.cum[t])[:, None]
        c = self.centers[t][:, None]
        lo, hi = self.bounds[t].copy(), self.bounds[t + 1].copy()
        base = lo[:, None]
        steps = np.arange(1, probes + 1)
        while np.any(hi - lo > 1):
            width = hi - lo
            j = lo[:, None] + (width[:, None] * steps) // (probes + 1)
            j = np.maximum(j, lo[:, None] + 1)
            ok = self.data.sse(base, j, c) <= rest  # monotone along the probe axis
            n_ok = ok.sum(axis=1)
            new_lo = np.where(n_ok > 0, j[np.arange(j.shape[0]), np.maximum(n_ok - 1, 0)], lo)
            new_hi = np.where(n_ok < probes, j[np.arange(j.shape[0]), np.minimum(n_ok, probes - 1)],
                              hi)
            lo, hi = new_lo, np.maximum(new_hi, new_lo + 1)
        return np.minimum(lo, self.data.n - 1)

    def potential_with(self, cand):
        """Potential after adding each candidate value in ``cand`` to the centres.

        A new centre y between neighbours a < y < b captures exactly the points in
        [(a + y) / 2, (y + b) / 2); only their contribution changes.
        """
        centers, data = self.centers, self.data
        pos = np.searchsorted(centers, cand)
        has_left, has_right = pos > 0, pos < centers.size
        left = centers[np.maximum(pos - 1, 0)]
        right = centers[np.minimum(pos, centers.size - 1)]
        lo = np.where(has_left, data.split(0.5 * (left + cand)), 0)
        hi = np.where(has_right, data.split(0.5 * (cand + right)), data.n)
        old = self.prefix(hi) - self.prefix(lo)
        return self.total - old + data.sse(lo, hi, cand)


def _n_trials(k):
    """Candidates per greedy k-means++ round: 2 + floor(ln k), scikit-learn's rule."""
    return 2 + int(math.log(k))


def _kmeans_pp(data, k, rng):
    """Greedy k-means++ seeding (Arthur & Vassilvitskii 2007, scikit-learn's variant)."""
    n_trials = _n_trials(k)
    centers = np.array([float(data.xs[rng.integers(data.n)])])
    for _ in range(1, k):
        cells = _Cells(data, centers)
        if cells.total <= 0.0:  # fewer distinct values than clusters: nothing left to cover
            break
        r = rng.random(n_trials) * cells.total
        cand = data.xs[cells.sample(r)].astype(np.float64)
        best = cand[np.argmin(cells.potential_with(cand))]
        centers = np.sort(np.append(centers, best))
    return centers


def _lloyd(data, centers, n_iter):
    """``n_iter`` Lloyd iterations; each is O(k log n) thanks to the prefix sums."""
    for _ in range(n_iter):
        bounds = data.cells(centers)
        count = np.diff(bounds)
        sums = data.p1[bounds[1:]] - data.p1[bounds[:-1]]
        new = np.where(count > 0, sums / np.maximum(count, 1), centers)
        new.sort()
        if np.array_equal(new, centers):
            break
        centers = new
    return centers


def _fast_iters(n_iter, min_iter):
    """Lloyd iterations of the fast path: at least ``min_iter`` (default FAST_MIN_ITER)."""
    return max(n_iter, FAST_MIN_ITER if min_iter is None else min_iter)


def _finish(data, seeds, k, n_iter):
    """Lloyd steps from the k-means++ ``seeds``; degenerate data padded to ``k`` entries."""
    centers = _lloyd(data, seeds, n_iter)
    if centers.size < k:  # degenerate data: pad with copies so the codebook has k entries
        centers = np.sort(np.concatenate([centers, np.full(k - centers.size, centers[-1])]))
    return centers


def _fast_centroids(x, k, n_iter, rng):
    data = _Sorted1D(x)
    # the sorted copy and prefix sums (20 bytes per weight) go before labelling, with ``data``
    return _finish(data, _kmeans_pp(data, k, rng), k, n_iter)


def _sklearn_centroids(x, k, n_iter, seed):
    from sklearn.cluster import KMeans
    km = KMeans(n_clusters=k, init="k-means++", n_init=1, max_iter=n_iter,
                random_state=seed, algorithm="lloyd")
    km.fit(np.asarray(x, dtype=np.float32).reshape(-1, 1))
    return np.sort(km.cluster_centers_.ravel().astype(np.float64))


def _mids(centroids):
    c = np.asarray(centroids, dtype=np.float64)
    return (0.5 * (c[:-1] + c[1:])).astype(np.float32)


def assign_labels(x, centroids, dtype=None):
    """Nearest-centroid labels of the 1-D tensor ``x`` for sorted ``centroids``.

    label = number of midpoints between neighbouring centroids that are <= x.  Rather than a
    binary search per value, a uniform grid of ``_GRID`` cells over [min x, max x] is used:
    a value's cell is one multiply away, each cell knows how many midpoints lie below it, and
    a cell holding a midpoint adds one comparison.  The same monotone float32 arithmetic maps
    values and midpoints to cells, so the result equals the binary search exactly.
    """
    xn = x.detach().reshape(-1).float().cpu().numpy()
    mids = _mids(centroids)
    np_dtype = torch.empty(0, dtype=dtype or label_dtype(mids.size + 1)).numpy().dtype
    out = np.zeros(xn.size, dtype=np_dtype)
    if mids.size == 0 or xn.size == 0:
        return torch.from_numpy(out)
    lo, hi = np.float32(xn.min()), np.float32(xn.max())
    if hi <= lo:
        out[:] = np.count_nonzero(mids <= lo)
        return torch.from_numpy(out)
    scale = np.float32(_GRID / (float(hi) - float(lo)))

    def cell(v):
        g = ((v - lo) * scale).astype(np.int32)
        return np.clip(g, 0, _GRID - 1, out=g)

    mid_cell = cell(np.clip(mids, lo, hi))
    if np.unique(mid_cell).size < mid_cell.size:  # two midpoints share a cell: binary search
        for i in range(0, xn.size, _CHUNK):
            out[i:i + _CHUNK] = np.searchsorted(mids, xn[i:i + _CHUNK], side="right")
        return torch.from_numpy(out)
    below = np.searchsorted(mid_cell, np.arange(_GRID), side="left").astype(np_dtype)
    mid_at = np.full(_GRID, np.inf, dtype=np.float32)
    mid_at[mid_cell] = mids
    for i in range(0, xn.size, _CHUNK):
        chunk = xn[i:i + _CHUNK]
        g = cell(chunk)
        lab = below.take(g)
        lab += chunk >= mid_at.take(g)
        out[i:i + _CHUNK] = lab
    return torch.from_numpy(out)


def kmeans_centroids(x, k, n_iter=3, method="fast", seed=None, min_iter=None):
    """Sorted float64 centroids (numpy, <= k of them distinct) of the 1-D tensor ``x``.

    k-means++ seeding, then Lloyd steps: ``'sklearn'`` runs ``n_iter``; ``'fast'`` runs
    ``max(n_iter, min_iter)`` (they are nearly free there; ``min_iter`` defaults to
    ``FAST_MIN_ITER``, and 0 gives the reference's schedule exactly), stopping early at a
    fixed point.  ``seed`` makes the
    k-means++ draws reproducible.
    """
    if method not in METHODS:
        raise ValueError(f"unknown k-means method {method!r}; expected one of {METHODS}")
    xn = x.detach().reshape(-1).float().cpu().numpy()
    k = max(1, min(int(k), xn.size))
    if method == "fast":
        return _fast_centroids(xn, k, _fast_iters(n_iter, min_iter), np.random.default_rng(seed))
    return _sklearn_centroids(xn, k, n_iter, seed)


def kmeans_1d(x, k, n_iter=3, method="fast", seed=None, min_iter=None):
    """Cluster the 1-D tensor ``x`` into ``k`` groups; see :func:`kmeans_centroids`.

    Returns ``(centroids, labels)``: sorted float32 centroids [k] and the labels of ``x``.
    """
    centers = kmeans_centroids(x, k, n_iter, method, seed, min_iter)
    return torch.from_numpy(centers).float(), assign_labels(x, centers)


def inertia(x, centroids, labels):
    """The K-Means objective ``sum_i (x_i - c_{l_i})^2`` (within-cluster sum of squares)."""
    x = x.detach().reshape(-1).cpu()
    total = 0.0
    c = centroids.double()
    for i in range(0, x.numel(), _CHUNK):
        d = x[i:i + _CHUNK].double() - c[labels[i:i + _CHUNK].long()]
        total += float(d.square().sum())
    return total


# --------------------------------------------------------------------------------------------
# Model level


def clustering_values(weight, is_pruned=False):
    """The 1-D float32 values k-means runs on for ``weight``: all of them, or the non-zero ones."""
    cpu = weight.detach().reshape(-1).float().cpu()
    return cpu[cpu != 0] if is_pruned else cpu


@torch.no_grad()
def kmeans_quantize_layer(weight, bits, n_iter=3, method="fast", is_pruned=False, seed=None,
                          min_iter=None, centers=None):
    """K-Means-quantize one weight tensor in place to ``2^bits`` shared values; return its Codebook.

    Labels follow the weight's logical (row-major) flattening, whatever its memory layout.
    ``centers``: the sorted float64 centroids :func:`kmeans_centroids` gives for
    :func:`clustering_values` (precomputed, e.g. by the sensitivity scan); None clusters.
    """
    flat = _flat(weight)
    cpu = flat.detach().float().cpu()
    k = 2 ** int(bits)
    if is_pruned:
        keep = cpu != 0
        kept = cpu[keep]
        if kept.numel() == 0:  # fully pruned: a single zero centroid, nothing to cluster
            centroids = torch.zeros(1)
        else:
            if centers is None:
                centers = kmeans_centroids(kept, k, n_iter, method, seed, min_iter)
            centroids = torch.from_numpy(centers).float()
        labels = assign_labels(cpu, centroids, label_dtype(centroids.numel() + 1))
        labels[~keep] = centroids.numel()
        centroids = torch.cat([centroids, torch.zeros(1)])
    elif centers is None:
        centroids, labels = kmeans_1d(cpu, k, n_iter, method, seed, min_iter)
    else:
        centroids, labels = torch.from_numpy(centers).float(), assign_labels(cpu, centers)
    cb = Codebook(centroids, labels, int(bits), bool(is_pruned))
    _write_back(flat, cb)
    _commit(weight, flat)
    return cb


def _flat(weight):
    """A flat row-major view of the weight (a copy if its layout is not contiguous)."""
    w = weight.data
    return w.view(-1) if w.is_contiguous() else w.contiguous().view(-1)


def _commit(weight, flat):
    """Copy ``flat`` back when :func:`_flat` had to make a copy."""
    if not weight.data.is_contiguous():
        weight.data.copy_(flat.view(weight.shape))


def _cluster_sums(flat, labels, n):
    """Float64 sums of ``flat`` per label, ``n`` bins.

    Sums in float64: a float32 running sum over ~10^6 members drifts by ~1e-2 relative, far
    more than one optimizer step moves a centroid.  ``index_add_`` into a fixed number of bins
    rather than ``bincount``, which reads the largest label back to the host to size its
    output (a wait per layer per step on an accelerator).  Chunk by chunk, so that the int64
    labels and float64 weights it wants are small copies, not 16 bytes per weight at once.
    """
    sums = torch.zeros(n, dtype=torch.float64, device=flat.device)
    labels = labels.to(flat.device)
    for i in range(0, flat.numel(), _CHUNK):
        sums.index_add_(0, labels[i:i + _CHUNK].long(), flat[i:i + _CHUNK].double())
    return sums


def _write_back(flat, cb):
    """flat[:] = centroids[labels] without a full-size int64 copy of the labels."""
    c = cb.centroids.to(device=flat.device, dtype=flat.dtype)
    # chunks: the int32 copy of the 1-byte labels stays small
    for i in range(0, flat.numel(), _CHUNK):
        idx = cb.labels[i:i + _CHUNK].to(device=flat.device, dtype=torch.int32)
        torch.index_select(c, 0, idx, out=flat[i:i + _CHUNK])


def kmeans_quantize_model(model, policy, n_iter=3, method="fast", is_pruned=False,
                          free_high_bit=False, seed=None, min_iter=None):
    """K-Means-quantize ``model``'s Conv2d/Linear layers in place; return ``{name: Codebook}``.

    ``policy``: bits per layer, a list in ``model.modules()`` order or a dict name -> bits
    (layers a dict leaves out, and entries of -1 or 32, stay float).  ``free_high_bit`` leaves
    layers above 6 bits float (they are clustered later by :meth:`CentroidSharer.recluster`).
    ``seed`` (int) makes the result reproducible; layer i uses ``seed + i``.  ``min_iter``:
    see :func:`kmeans_centroids` (fast path only).
    """
    plan = resolve_kmeans_policy(model, policy)
    codebooks = {}
    start = time.perf_counter()
    for i, (name, module, bits) in enumerate(plan):
        if bits is None or (free_high_bit and bits > HIGH_BIT):
            continue
        layer_seed = None if seed is None else seed + i
        codebooks[name] = kmeans_quantize_layer(module.weight, bits, n_iter, method,
                                                is_pruned, layer_seed, min_iter)
    logger.debug("k-means (%s, %d iters) of %d layers took %.2fs", method, n_iter,
                 len(codebooks), time.perf_counter() - start)
    return codebooks


# under the name of its linear twin, lib.quantize.policy.apply_linear_policy
apply_kmeans_policy = kmeans_quantize_model


class CentroidSharer:
    """Keeps K-Means-quantized weights shared during fine-tuning (docs/design.md, quantizers).

    Call :meth:`step` after every ``optimizer.step()``: each centroid becomes the mean of its
    members' updated weights and the members are reset to it.  Labels never change, so the
    cluster sizes are computed once here; an update is one ``index_add_`` (weighted sums) and
    one gather (write-back) per layer, O(#weights) in total, instead of one masked pass per
    centroid (:func:`_cluster_sums`, :func:`_write_back`).

    With ``free_high_bit`` the layers above 6 bits are skipped (they train freely) until
    :meth:`recluster` clusters them again, e.g. before the last epoch.

    Pruned models keep their zeros whatever the bit width (docs/design.md, quantizers): a free
    layer whose codebook is pruned, and every float layer named in ``keep_zero`` (e.g. layers
    not clustered yet), has the weights that are zero now put back to zero after every step.
    """

    def __init__(self, model, codebooks, free_high_bit=False, keep_zero=()):
        self.model = model
        self.codebooks = codebooks
        self.free_high_bit = free_high_bit
        modules = dict(model.named_modules())
        missing = [name for name in list(codebooks) + list(keep_zero) if name not in modules]
        if missing:
            raise KeyError(f"codebooks name layers the model does not have: {missing}")
        self._layers = {name: modules[name] for name in codebooks}
        self._counts = {}
        for name in codebooks:
            self._prepare(name)
        self._zeros = {name: modules[name].weight.detach() == 0 for name in keep_zero}
        for name in self.free_layers():
            cb = self.codebooks[name]
            if cb.pruned:
                mask = (cb.labels == cb.n_clusters).reshape(self._layers[name].weight.shape)
                self._zeros[name] = mask.to(self._layers[name].weight.device)
        self._zero_layers = {name: modules[name] for name in self._zeros}

    def _prepare(self, name):
        """Cluster sizes (fixed: labels never change) and labels on the weight's device."""
        cb = self.codebooks[name]
        device = self._layers[name].weight.device
        cb.labels = cb.labels.to(device)
        self._counts[name] = torch.bincount(cb.labels.int(),
                                            minlength=cb.centroids.numel()).double()

    def active(self):
        """Names of the layers :meth:`step` updates."""
        return [n for n, cb in self.codebooks.items()
                if not (self.free_high_bit and cb.bits > HIGH_BIT)]

    def free_layers(self):
        """``{name: bits}`` of the layers left to train freely (``free_high_bit``, > 6 bits)."""
        active = set(self.active())
        return {n: cb.bits for n, cb in self.codebooks.items() if n not in active}

    @torch.no_grad()
    def step(self):
        """One centroid-shared update of every active layer; pruned zeros of float layers back to 0."""
        for name in self.active():
            weight = self._layers[name].weight
            flat = _flat(weight)
            self._update(flat, self.codebooks[name], self._counts[name])
            _commit(weight, flat)
        for name, mask in self._zeros.items():
            self._zero_layers[name].weight.masked_fill_(mask, 0.0)

    @staticmethod
    def _update(flat, cb, count):
        sums = _cluster_sums(flat, cb.labels, count.numel())
        count = count.to(sums.device)
        # an empty cluster keeps its centroid; a pruned layer's zero slot stays exactly 0
        new = torch.where(count > 0, sums / count.clamp(min=1),
                          cb.centroids.to(sums.device, torch.float64))
        if cb.pruned:
            new[-1] = 0.0
        cb.centroids = new.to(torch.float32)   # on the weight's device: no copy to the host
        _write_back(flat, cb)

    def recluster(self, n_iter=50, method="fast", is_pruned=None, seed=None, names=None):
        """Re-run K-Means on ``names`` (default: the high-bit layers skipped by :meth:`step`)."""
        if names is None:
            names = [n for n in self.codebooks if n not in self.active()]
        for name in names:
            old = self.codebooks[name]
            pruned = old.pruned if is_pruned is None else is_pruned
            cb = kmeans_quantize_layer(self._layers[name].weight, old.bits, n_iter, method,
                                       pruned, seed)
            self.codebooks[name] = cb
            self._prepare(name)
        return names


@contextmanager
def fully_quantized(model, free_bits, n_iter=3, method="fast", is_pruned=False, seed=None):
    """Score a model whose ``free_bits`` layers (``{name: bits}``) train in float: within the
    ``with`` block they are K-Means-quantized to 2^bits values; on leaving it their float weights
    come back, so training continues where it was.

    ``free_high_bit`` lets layers above 6 bits train freely (the released search and
    fine-tune); only a fully quantized model may be scored (docs/design.md, quantizers), so
    every accuracy of such a model is measured inside this block. Yields the temporary codebooks
    (``{name: Codebook}``), e.g. to save the scored model. The clustering is
    :func:`kmeans_quantize_model`'s with the same arguments, so the same float weights and
    ``seed`` give the same quantized model each time.
    """
    if not free_bits:
        yield {}
        return
    modules = dict(model.named_modules())
    saved = {name: modules[name].weight.detach().clone() for name in free_bits}
    try:
        yield kmeans_quantize_model(model, dict(free_bits), n_iter=n_iter, method=method,
                                    is_pruned=is_pruned, seed=seed)
    finally:
        with torch.no_grad():
            for name, weight in saved.items():
                modules[name].weight.copy_(weight)
