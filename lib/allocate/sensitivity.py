"""Per-layer, per-width sensitivity scores for the integer program (docs/design.md, allocators).

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

Scores are arrays of shape (n_layers, n_widths), column j being the j-th allowed
width of the kind (``bits``; activations ``bits_a`` where they differ); pinned steps
(linear mode's first/last layers) score 0, and so do the steps whose width the cost
ignores (activations under a size budget, :func:`unscored_steps`): the integer program
keeps those at their widest width, so no score of theirs could change its policy; the
record names them under ``unscored``. The env
is used only for its model, layers, pretrained weights, loaders and quantizer
settings; nothing here knows of RL.
"""
import logging
import math
import time

import numpy as np
import torch
import torch.nn as nn

from lib.quantize.kmeans import clustering_values, kmeans_centroids, kmeans_quantize_layer
from lib.quantize.linear import calibrate
from lib.quantize.options import calibrate_weight_with_options, needs_weight_recalibration
from lib.utils.distributed import all_reduce_sum

from .staged import StagedLoss, _device, _loss

log = logging.getLogger(__name__)

METRICS = ("loss", "hessian")
NONFINITE_SCORE = 1e6   # a width whose loss is NaN/inf: worse than any real score; strict JSON


def bit_widths(env, kind="weight"):
    """The widths a free step of ``kind`` may take: the columns of its score table (an env-like
    object without ``widths`` has its ``cfg.min_bit..max_bit`` for both kinds)."""
    if not hasattr(env, "widths"):
        return list(range(env.cfg.min_bit, env.cfg.max_bit + 1))
    return list(env.widths[kind])


def activation_widths(env):
    """``{"bits_a": widths}`` when the activation columns differ from the weight ones, else {}
    (a cache written before separate ranges existed then still matches)."""
    if env.linear and bit_widths(env, "activation") != bit_widths(env):
        return {"bits_a": bit_widths(env, "activation")}
    return {}


def unscored_steps(env):
    """The linear-mode steps not scored: those the env's budget calls free (``free_steps``: the
    cost does not depend on their width, e.g. activations under ``--cost size``)."""
    if not env.linear or not hasattr(env, "free_steps"):
        return set()
    return set(env.free_steps())


def unscored_names(env, steps):
    """``{kind: [layer names]}`` of linear-mode ``steps`` (step 2l: weight, 2l + 1: activation)."""
    names = {}
    for step in sorted(steps):
        kind = "activation" if step % 2 else "weight"
        names.setdefault(kind, []).append(env.layer_names[step // 2])
    return names


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


def _finite(scores):
    return np.nan_to_num(scores, nan=NONFINITE_SCORE, posinf=NONFINITE_SCORE,
                         neginf=-NONFINITE_SCORE)


# ------------------------------------------------------------------ K-Means mode
def _kmeans_centers(env):
    """``{(layer, bits): centroids}`` of every layer at every width, as
    ``apply_kmeans_policy(model, {name: bits}, seed=seed)`` clusters them (a one-layer policy
    uses the seed itself; tests/test_allocate.py checks). A fully pruned layer has none."""
    centers = {}
    for layer, (_, module) in enumerate(env.layers):
        values = clustering_values(module.weight, env.is_pruned)
        if values.numel() == 0:
            continue
        for bits in bit_widths(env):
            centers[(layer, bits)] = kmeans_centroids(values, 2 ** bits, env.n_iter, env.method,
                                                      env.cfg.seed)
    return centers


def _kmeans_weight(env, centers, layer, module, bits):
    """A copy of ``module``'s weight K-Means-quantized at ``bits`` with the env's settings."""
    w = module.weight.detach().clone()
    kmeans_quantize_layer(w, bits, env.n_iter, env.method, env.is_pruned, env.cfg.seed,
                          centers=centers.get((layer, bits)))
    return w


def _staged_scores(env, batches, changes):
    """``({key: loss - base}, base)`` over what ``changes`` yields, ``(key, layer)`` while the
    model holds that change (a generator that changes the model, yields, and undoes it)."""
    loss = StagedLoss(env.model, batches, [m for _, m in env.layers])
    return {key: loss(layer) - loss.base for key, layer in changes}, loss.base


def _kmeans_loss_scores(env, batches):
    widths = bit_widths(env)
    centers = _kmeans_centers(env)

    def changes():
        for layer, (_, module) in enumerate(env.layers):
            original = module.weight.detach().clone()
            for j, bits in enumerate(widths):
                kmeans_quantize_layer(module.weight, bits, env.n_iter, env.method, env.is_pruned,
                                      env.cfg.seed, centers=centers.get((layer, bits)))
                yield (layer, j), layer
                module.weight.data.copy_(original)

    found, base = _staged_scores(env, batches, changes())
    scores = np.zeros((len(env.layers), len(widths)))
    for (layer, j), score in found.items():
        scores[layer, j] = score
    for layer, (name, _) in enumerate(env.layers):
        log.debug("loss sensitivity of %s: %s", name, np.round(scores[layer], 4).tolist())
    return {"weight": scores}, base


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
                       + ((m.bias.detach().clone(),) if m.bias_correction else ())
                       for _, m in env.layers}
        self.recalibrated = False

    def set(self, module, w_bit=-1, a_bit=-1):
        """Quantize ``module`` alone; its ranges (and corrected bias) as the env would set them:
        the quantizer options' weight clip and bias correction depend on the width too."""
        module.set_bits(w_bit, a_bit)
        if 0 < max(w_bit, a_bit) <= module.kl_max_bit or (w_bit > 0 and module.bias_correction):
            calibrate(self.model, self.inputs, _device(self.model))
            self.recalibrated = True
        elif w_bit > 0 and needs_weight_recalibration(module):
            calibrate_weight_with_options(module)   # no data needed: the weights alone

    def reset(self, module):
        """Float again; the float ranges back (every layer's if a calibration moved them)."""
        module.set_bits(-1, -1)
        with torch.no_grad():
            for m in self.ranges if self.recalibrated else [module]:
                act, wr, *bias = self.ranges[m]
                m.activation_range.copy_(act)
                m.weight_range.copy_(wr)
                if bias:
                    m.bias.copy_(bias[0])
        self.recalibrated = False


def _linear_loss_scores(env, batches, calib, kinds=("weight", "activation"), skip=()):
    """Loss scores of ``kinds``; steps in ``skip`` (and pins) are not measured and score 0."""
    widths = {kind: bit_widths(env, kind) for kind in kinds}

    def changes():
        for layer, (_, module) in enumerate(env.layers):
            for kind in kinds:
                step = 2 * layer + (kind == "activation")
                if step in env.pins or step in skip:
                    continue
                for j, bits in enumerate(widths[kind]):
                    calib.set(module, **{"w_bit" if kind == "weight" else "a_bit": bits})
                    yield (kind, layer, j), layer
                    calib.reset(module)

    found, base = _staged_scores(env, batches, changes())
    scores = {k: np.zeros((len(env.layers), len(widths[k]))) for k in kinds}
    for (kind, layer, j), score in found.items():
        scores[kind][layer, j] = score
    for layer, (name, _) in enumerate(env.layers):
        log.debug("loss sensitivity of %s: %s", name,
                  {k: np.round(v[layer], 4).tolist() for k, v in scores.items()})
    return scores, base


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


def _hessian_weight_scores(env, traces, quantized_weight, skip=()):
    """Tr(H_l) / n_l * ||W_l - Q_b(W_l)||^2 for every layer and width (linear-mode steps in
    ``skip`` and pins: 0).

    ``quantized_weight(layer, module, bits)``: Q_b of that layer's weight, a copy."""
    widths = bit_widths(env)
    scores = np.zeros((len(env.layers), len(widths)))
    for layer, (name, module) in enumerate(env.layers):
        if env.linear and (2 * layer in env.pins or 2 * layer in skip):
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


def _scores(env, metric, batches, hessian_iters, seed, skip=()):
    """(scores, baseline loss, Hessian traces or None) of ``metric``; linear-mode steps in
    ``skip`` are not scored."""
    if metric == "loss":
        if env.linear:
            return _linear_loss_scores(env, batches, _FloatCalibration(env), skip=skip) + (None,)
        return _kmeans_loss_scores(env, batches) + (None,)
    if env.linear:
        calib = _FloatCalibration(env)   # one float calibration serves both kinds of score
        scores, base = _linear_loss_scores(env, batches, calib, ("activation",), skip)
        traces = _hessian_traces(env, batches, hessian_iters, seed)
        scores["weight"] = _hessian_weight_scores(
            env, traces, lambda _, m, b: _linear_weight(calib, m, b), skip)
        return scores, base, traces
    base = _loss(env.model, batches)
    traces = _hessian_traces(env, batches, hessian_iters, seed)
    centers = _kmeans_centers(env)
    return {"weight": _hessian_weight_scores(
        env, traces, lambda i, m, b: _kmeans_weight(env, centers, i, m, b))}, base, traces


# ------------------------------------------------------------------------- entry
def layer_scores(env, metric="loss", n_images=100, hessian_iters=16, seed=0):
    """Sensitivity of every layer at every width of the env's range; a dict for the cache.

    Keys: ``metric``, ``bits`` (the widths of the columns), ``layers`` (names),
    ``weight`` and, in linear mode, ``activation`` (n_layers x n_widths arrays),
    ``baseline_loss``, ``n_images`` (used; ``requested_images`` asked), ``hessian_iters``,
    ``seconds`` and ``unscored`` (``{kind: [layer names]}`` of the steps not measured,
    :func:`unscored_steps`). The model is left holding its pretrained weights (float).
    """
    if metric not in METRICS:
        raise ValueError(f"unknown sensitivity metric {metric!r}; expected one of {METRICS}")
    start = time.perf_counter()
    batches = fixed_batches(env.evaluator.val_loader, n_images)
    env.restore_weights()
    skip = unscored_steps(env)
    scores, base, traces = _scores(env, metric, batches, hessian_iters, seed, skip)
    if traces is not None:
        log.info("Hessian traces / #weights: %s",
                 np.round(traces / [m.weight.numel() for _, m in env.layers], 6).tolist())
    env.restore_weights()
    if env.linear:
        env.unquantize()
    seconds = time.perf_counter() - start
    widths, n_used = bit_widths(env), sum(len(y) for _, y in batches)
    log.info("%s sensitivity of %d layers x %d widths on %d images: %.1fs%s", metric,
             len(env.layers), len(widths), n_used, seconds,
             f" ({len(skip)} steps the cost ignores not scored)" if skip else "")
    result = {"metric": metric, "bits": widths, "layers": list(env.layer_names),
              **activation_widths(env),
              "n_images": n_used, "requested_images": n_images,
              "hessian_iters": hessian_iters if metric == "hessian" else None,
              "baseline_loss": float(base) if math.isfinite(base) else NONFINITE_SCORE,
              "seconds": seconds, "unscored": unscored_names(env, skip)}
    for kind, table in scores.items():
        result[kind] = _finite(table)
    return result
