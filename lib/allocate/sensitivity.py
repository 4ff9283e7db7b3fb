"""Per-layer, per-width sensitivity scores for the integer program (DESIGN.md section 14).

Two metrics, both over a fixed part of the search's validation subset and both on
the env's own quantizers (K-Means codebooks as the K-Means mode builds them;
fake quantization calibrated as the linear mode calibrates it):

* ``loss``: the increase of the cross-entropy when only layer l is quantized at
  width b, everything else float (linear mode: weights and activations measured
  separately);
* ``hessian``: HAWQ-V2's weight score (Dong et al. 2020, eq. 5 / Yao et al. 2021,
  eq. 10), ``Tr(H_l) / n_l * ||W_l - Q_b(W_l)||^2`` with the trace of the layer's
  Hessian block estimated by Hutchinson's method (E[v^T H v] over Rademacher v);
  activations keep the ``loss`` score.

Scores are arrays of shape (n_layers, max_bit - min_bit + 1), column j being width
``min_bit + j``; pinned steps (linear mode's first/last layers) score 0. The env
is used only for its model, layers, pretrained weights, loaders and quantizer
settings; nothing here knows of RL.
"""
import logging
import math
import time

import numpy as np
import torch
import torch.nn as nn

from lib.quantize.kmeans import clustering_values, kmeans_quantize_layer
from lib.quantize.kmeans_batch import centroids_by_width
from lib.quantize.linear import calibrate
from lib.utils.distributed import all_reduce_sum
from lib.utils.layers import fold_batchnorm
from lib.utils.train import evaluate

log = logging.getLogger(__name__)

METRICS = ("loss", "hessian")
NONFINITE_SCORE = 1e6   # a width whose loss is NaN/inf: worse than any real score; strict JSON


def bit_widths(env):
    return list(range(env.cfg.min_bit, env.cfg.max_bit + 1))


def fixed_batches(loader, n_images):
    """The first ``n_images`` images of ``loader`` as a list of (inputs, targets) batches."""
    batches, count = [], 0
    for images, target in loader:
        take = min(len(target), n_images - count)
        batches.append((images[:take], target[:take]))
        count += take
        if count >= n_images:
            break
    if not batches:
        raise ValueError("the validation loader gave no images to score sensitivity on")
    return batches


def _device(model):
    return next(model.parameters()).device


def _loss(model, batches, device=None):
    """Mean cross-entropy of ``model`` on ``batches`` (the project's one validation loop)."""
    return evaluate(model, batches, nn.CrossEntropyLoss(), device or _device(model),
                    progress=False)["loss"]


class _Tail(nn.Module):
    """Stages applied in turn, held in a plain list rather than registered: the per-pass
    ``eval()`` and memory-format walk of :func:`evaluate` then visit no submodules (~0.4 ms a
    pass for a MobileNetV2 tail, 600 passes a scan). Its stages must already be in eval
    mode: :class:`StagedLoss` keeps the model and its folded copy so."""

    def __init__(self, stages):
        super().__init__()
        self.run = list(stages)

    def forward(self, x):
        for stage in self.run:
            x = stage(x)
        return x


class _Chain(_Tail):
    """A :class:`_Tail` whose stages are registered too, for copying, folding and moving."""

    def __init__(self, stages):
        super().__init__(stages)
        self.stages = nn.ModuleList(self.run)


class StagedLoss:
    """Loss on fixed batches when one layer changes, recomputing only from that layer's stage on.

    Quantizing one layer leaves every stage before the one holding it unchanged, so
    each stage's float input on the batches is computed once and reused for every width
    of every layer in that stage (a prefix cache). The stages run from a copy with
    BatchNorm folded into the convs, in channels-last memory format: the same maths up
    to float rounding, about 4x faster on a CPU for a MobileNetV2. The changed layer's
    twin in that copy takes its effective weight times the BatchNorm factor (BN(conv(x,
    Q(W))) = conv(x, Q(W) * g/sigma) + b') and its input quantization. The chains are
    checked against the model once: a model without ``stages()`` (or whose chain
    differs) is run whole, a fold that changes the float loss is not used, and the
    first changed layer is also run live (a twin that differs there is not used). Layers
    are visited in module order; going back to an earlier stage starts the cache again
    from the images.
    """

    def __init__(self, model, batches, modules):
        self.model, self.batches, self.modules = model, batches, list(modules)
        self.device = _device(model)
        self.base = _loss(model, batches)
        self.stages, self.stage_of = self._split(model, modules)
        self.float_stages, self.twins, self.twin_checked = self.stages, None, False
        self._chains = {}
        if self.stages is not None and not self._same_loss(self.stages, batches):
            log.warning("%s.stages() does not reproduce its forward; scoring whole passes",
                        type(model).__name__)
            self.stages = None
        if self.stages is not None:
            self._fold(batches)
        self.k, self.inputs = 0, self.batches

    def _same_loss(self, stages, batches):
        return self._close(_loss(_Chain(stages), batches))

    def _close(self, loss):
        return math.isclose(loss, self.base, rel_tol=1e-5, abs_tol=1e-7)

    def _fold(self, batches):
        """Use BN-folded channels-last copies of the float stages if they give the same loss."""
        chain, scales = _Chain(self.stages), {}
        folded = fold_batchnorm(chain, scales).to(memory_format=torch.channels_last)
        fast = [(_channels_last(x), y) for x, y in batches]
        loss = _loss(folded, fast)
        if self._close(loss):
            self.float_stages, self.batches = list(folded.stages), fast
            self.base = loss   # scores are differences along one path
            # deepcopy keeps the module tree, so the walks pair each module with its copy
            twin_of = {id(m): t for m, t in zip(chain.modules(), folded.modules())}
            self.twins = [(twin_of[id(m)], scales.get(twin_of[id(m)])) for m in self.modules]
        else:
            log.warning("folding BatchNorm changes %s's loss; scoring without it",
                        type(self.model).__name__)

    @staticmethod
    def _split(model, modules):
        if not callable(getattr(model, "stages", None)):
            return None, None
        stages = list(model.stages())
        where = {id(m): k for k, stage in enumerate(stages) for m in stage.modules()}
        if not all(id(m) in where for m in modules):
            return None, None
        return stages, [where[id(m)] for m in modules]

    def __call__(self, layer):
        """Loss of the model as it stands now, where only layer index ``layer`` differs from float."""
        if self.stages is None:
            return _loss(self.model, self.batches)
        k = self.stage_of[layer]
        self._advance(k)
        live = self._chain(k, live=True)
        if self.twins is None:
            return _loss(live, self.inputs, self.device)
        loss = self._twin_loss(layer, k)
        if not self.twin_checked:
            self.twin_checked = True
            if not math.isclose(loss, _loss(live, self.inputs, self.device), rel_tol=1e-4,
                                abs_tol=1e-6):
                log.warning("a changed layer of %s differs in its BatchNorm-folded copy; "
                            "scoring its stage unfolded", type(self.model).__name__)
                self.twins = None
                return _loss(live, self.inputs, self.device)
        return loss

    def _chain(self, k, live=False):
        """Stage ``k`` (live: the model's own; else its folded copy) and the folded rest."""
        key = (k, live)
        if key not in self._chains:   # built once: a Module's construction is not free
            first = self.stages[k] if live else self.float_stages[k]
            self._chains[key] = _Tail([first, *self.float_stages[k + 1:]])
        if self.model.training:   # the live stage must not update BatchNorm statistics
            self.model.eval()
        return self._chains[key]

    def _twin_loss(self, layer, k):
        """The loss with layer ``layer``'s change carried into its twin in the folded copy."""
        module, (twin, scale) = self.modules[layer], self.twins[layer]
        folded_weight = twin.weight.detach().clone()
        with torch.no_grad():
            weight = module.quantized_weight() if hasattr(module, "quantized_weight") \
                else module.weight
            if scale is not None:
                weight = weight * scale.reshape(-1, *[1] * (weight.dim() - 1))
            twin.weight.copy_(weight)
            if getattr(module, "a_bit", -1) > 0:   # the input quantizer: same width and range
                twin.set_bits(a_bit=module.a_bit)
                twin.activation_range.copy_(module.activation_range)
        try:
            return _loss(self._chain(k), self.inputs, self.device)
        finally:
            with torch.no_grad():
                twin.weight.copy_(folded_weight)
            if hasattr(twin, "set_bits"):
                twin.set_bits(a_bit=-1)

    def _advance(self, k):
        if k < self.k:
            self.k, self.inputs = 0, self.batches
        if self.k == k:
            return
        device = _device(self.model)
        self.model.eval()
        with torch.no_grad():
            while self.k < k:
                stage = self.float_stages[self.k]
                self.inputs = [(stage(x.to(device)), y) for x, y in self.inputs]
                self.k += 1


def _channels_last(x):
    return x.contiguous(memory_format=torch.channels_last) if x.dim() == 4 else x


def _finite(scores):
    return np.nan_to_num(scores, nan=NONFINITE_SCORE, posinf=NONFINITE_SCORE,
                         neginf=-NONFINITE_SCORE)


# ------------------------------------------------------------------ K-Means mode
def _kmeans_centers(env):
    """``{(layer, bits): centroids}`` of every layer at every width, as
    ``apply_kmeans_policy(model, {name: bits}, seed=seed)`` clusters them (a one-layer policy
    uses the seed itself; tests/test_allocate.py checks), seeded in lockstep across the
    layers of a width: the same centroids, 3x sooner (lib.quantize.kmeans_batch)."""
    return centroids_by_width(
        [clustering_values(m.weight, env.is_pruned).numpy() for _, m in env.layers],
        bit_widths(env), env.n_iter, [env.cfg.seed] * len(env.layers), env.method)


def _kmeans_weight(env, centers, layer, module, bits):
    """A copy of ``module``'s weight K-Means-quantized at ``bits`` with the env's settings."""
    w = module.weight.detach().clone()
    kmeans_quantize_layer(w, bits, env.n_iter, env.method, env.is_pruned, env.cfg.seed,
                          centers=centers.get((layer, bits)))
    return w


def _kmeans_loss_scores(env, batches):
    model, widths = env.model, bit_widths(env)
    loss = StagedLoss(model, batches, [m for _, m in env.layers])
    scores = np.zeros((len(env.layers), len(widths)))
    centers = _kmeans_centers(env)
    for layer, (name, module) in enumerate(env.layers):
        original = module.weight.detach().clone()
        for j, bits in enumerate(widths):
            kmeans_quantize_layer(module.weight, bits, env.n_iter, env.method, env.is_pruned,
                                  env.cfg.seed, centers=centers.get((layer, bits)))
            scores[layer, j] = loss(layer) - loss.base
            module.weight.data.copy_(original)
        log.debug("loss sensitivity of %s: %s", name, np.round(scores[layer], 4).tolist())
    return {"weight": scores}, loss.base


# ------------------------------------------------------------------- linear mode
class _FloatCalibration:
    """The linear model in float with the ranges a single quantized layer gets.

    The env calibrates every range on one batch after applying a policy. With only
    layer l quantized, l's input comes from float layers, so its range equals the
    one a float calibration gives, unless the width is at or below the KL threshold
    (then the clip depends on the width and is recalibrated for that one score).
    """

    def __init__(self, env):
        self.env, self.model = env, env.model
        batch = next(iter(env.calib_loader))
        self.inputs = batch[0] if isinstance(batch, (list, tuple)) else batch
        env.unquantize()
        calibrate(self.model, self.inputs, _device(self.model))
        self.ranges = {m: (m.activation_range.detach().clone(), m.weight_range.detach().clone())
                       for _, m in env.layers}
        self.recalibrated = False

    def set(self, module, w_bit=-1, a_bit=-1):
        module.set_bits(w_bit, a_bit)
        if 0 < max(w_bit, a_bit) <= module.kl_max_bit:
            calibrate(self.model, self.inputs, _device(self.model))
            self.recalibrated = True

    def reset(self, module):
        """Float again; the float ranges back (every layer's if a calibration moved them)."""
        module.set_bits(-1, -1)
        with torch.no_grad():
            for m in self.ranges if self.recalibrated else [module]:
                act, wr = self.ranges[m]
                m.activation_range.copy_(act)
                m.weight_range.copy_(wr)
        self.recalibrated = False


def _linear_loss_scores(env, batches, calib, kinds=("weight", "activation")):
    widths = bit_widths(env)
    loss = StagedLoss(env.model, batches, [m for _, m in env.layers])
    scores = {k: np.zeros((len(env.layers), len(widths))) for k in kinds}
    for layer, (name, module) in enumerate(env.layers):
        for kind in kinds:
            step = 2 * layer + (kind == "activation")
            if step in env.pins:
                continue
            for j, bits in enumerate(widths):
                if kind == "weight":
                    calib.set(module, w_bit=bits)
                else:
                    calib.set(module, a_bit=bits)
                scores[kind][layer, j] = loss(layer) - loss.base
                calib.reset(module)
        log.debug("loss sensitivity of %s: %s", name,
                  {k: np.round(v[layer], 4).tolist() for k, v in scores.items()})
    return scores, loss.base


def _linear_weight(calib, module, bits):
    calib.set(module, w_bit=bits)
    w = module.quantized_weight().detach().clone()
    calib.reset(module)
    return w


# ---------------------------------------------------------------------- hessian
def hutchinson_traces(loss, params, n_iter, generator=None):
    """Tr of each parameter's Hessian block, E[v^T H v] over Rademacher v (Hutchinson 1990).

    One Hessian-vector product per iteration serves every block at once: the cross
    terms v_l^T H_lk v_k (k != l) have zero mean. Returns a float64 numpy array.
    """
    grads = torch.autograd.grad(loss, params, create_graph=True)
    traces = np.zeros(len(params))
    for _ in range(n_iter):
        vs = [torch.randint(0, 2, p.shape, generator=generator, dtype=p.dtype).to(p.device) * 2 - 1
              for p in params]
        hvs = torch.autograd.grad(grads, params, grad_outputs=vs, retain_graph=True)
        traces += np.array([float((v * hv).sum()) for v, hv in zip(vs, hvs)])
    return traces / n_iter


def _hessian_traces(env, batches, n_iter, seed):
    model = env.model
    model.eval()
    device = _device(model)
    inputs = torch.cat([x for x, _ in batches]).to(device)
    targets = torch.cat([y for _, y in batches]).to(device)
    loss = nn.functional.cross_entropy(model(inputs), targets)
    params = [m.weight for _, m in env.layers]
    generator = torch.Generator().manual_seed(seed)
    traces = hutchinson_traces(loss, params, n_iter, generator)
    # torchrun: each rank's loss is the mean over its shard, so the union's trace is the
    # shard traces weighted by shard size (every rank draws the same v from the same seed).
    weighted = torch.tensor(np.append(traces * len(targets), len(targets)), dtype=torch.float64)
    weighted = all_reduce_sum(weighted).numpy()
    return weighted[:-1] / weighted[-1]


def _hessian_weight_scores(env, traces, quantized_weight):
    """Tr(H_l) / n_l * ||W_l - Q_b(W_l)||^2 for every layer and width.

    ``quantized_weight(layer, module, bits)``: Q_b of that layer's weight, a copy."""
    widths = bit_widths(env)
    scores = np.zeros((len(env.layers), len(widths)))
    for layer, (name, module) in enumerate(env.layers):
        if env.linear and 2 * layer in env.pins:
            continue
        w = module.weight.detach()
        for j, bits in enumerate(widths):
            error = float(((w - quantized_weight(layer, module, bits)) ** 2).sum())
            scores[layer, j] = traces[layer] / w.numel() * error
    return scores


def solver_scores(scores):
    """The scores the integer program minimises: each row non-increasing in bits and >= 0.

    A narrower width never helps in expectation, but a score measured on a few hundred
    images can dip below zero or below a wider width's by chance; the running maximum
    from the widest width down (clipped at 0) keeps the solver from spending the budget
    on such noise. Returns a new dict; the cached raw scores are untouched.
    """
    out = dict(scores)
    for kind in ("weight", "activation"):
        table = scores.get(kind)
        if table is not None:
            rows = np.maximum(np.asarray(table, dtype=np.float64), 0.0)
            out[kind] = np.maximum.accumulate(rows[:, ::-1], axis=1)[:, ::-1]
    return out


# ------------------------------------------------------------------------- entry
def layer_scores(env, metric="loss", n_images=100, hessian_iters=16, seed=0):
    """Sensitivity of every layer at every width of the env's range; a dict for the cache.

    Keys: ``metric``, ``bits`` (the widths of the columns), ``layers`` (names),
    ``weight`` and, in linear mode, ``activation`` (n_layers x n_widths arrays),
    ``baseline_loss``, ``n_images`` (used; ``requested_images`` asked), ``hessian_iters``
    and ``seconds``. The model is left holding its
    pretrained weights (float).
    """
    if metric not in METRICS:
        raise ValueError(f"unknown sensitivity metric {metric!r}; expected one of {METRICS}")
    start = time.perf_counter()
    batches = fixed_batches(env.evaluator.val_loader, n_images)
    env.restore_weights()
    if metric == "loss":
        scores, base = (_linear_loss_scores(env, batches, _FloatCalibration(env)) if env.linear
                        else _kmeans_loss_scores(env, batches))
    else:
        if env.linear:
            calib = _FloatCalibration(env)   # one float calibration serves both kinds of score
            scores, base = _linear_loss_scores(env, batches, calib, kinds=("activation",))
            traces = _hessian_traces(env, batches, hessian_iters, seed)
            scores["weight"] = _hessian_weight_scores(
                env, traces, lambda _, m, b: _linear_weight(calib, m, b))
        else:
            base = _loss(env.model, batches)
            traces = _hessian_traces(env, batches, hessian_iters, seed)
            centers = _kmeans_centers(env)
            scores = {"weight": _hessian_weight_scores(
                env, traces, lambda i, m, b: _kmeans_weight(env, centers, i, m, b))}
        log.info("Hessian traces / #weights: %s",
                 np.round(traces / [m.weight.numel() for _, m in env.layers], 6).tolist())
    env.restore_weights()
    if env.linear:
        env.unquantize()
    seconds = time.perf_counter() - start
    widths, n_used = bit_widths(env), sum(len(y) for _, y in batches)
    log.info("%s sensitivity of %d layers x %d widths on %d images: %.1fs", metric,
             len(env.layers), len(widths), n_used, seconds)
    result = {"metric": metric, "bits": widths, "layers": list(env.layer_names),
              "n_images": n_used, "requested_images": n_images,
              "hessian_iters": hessian_iters if metric == "hessian" else None,
              "baseline_loss": float(base) if math.isfinite(base) else NONFINITE_SCORE,
              "seconds": seconds}
    for kind, table in scores.items():
        result[kind] = _finite(table)
    return result
