"""Quantization operators for HAQ (docs/design.md, quantizers).  Knows nothing of RL or the
search env.

K-Means weight sharing (:mod:`lib.quantize.kmeans`)::

    codebooks = kmeans_quantize_model(model, policy, n_iter=3, method="fast",
                                      is_pruned=False, free_high_bit=False, seed=None,
                                      min_iter=None)
        # policy: bits per Conv2d/Linear in modules() order, or {layer name: bits};
        # -1/32 = keep float.  Weights are replaced in place; returns {name: Codebook}.
        # method: "fast" (1-D sorted/prefix-sum k-means, >= FAST_MIN_ITER=20 Lloyd steps)
        # or "sklearn" (the reference: KMeans k-means++, n_init=1, max_iter=n_iter).
    Codebook(centroids, labels, bits, pruned)   # centroids float32 [k(+1 pinned 0 if pruned)],
                                                # labels flat in the smallest int dtype
    sharer = CentroidSharer(model, codebooks, free_high_bit=False, keep_zero=())
    sharer.step()                        # after every optimizer.step(): centroid-shared update
                                         # (+ pruned zeros of free / keep_zero float layers back to 0)
    sharer.recluster(n_iter=50)          # free_high_bit: cluster the skipped (> 6 bit) layers
    sharer.free_layers() -> {name: bits} # the layers sharer.step() leaves free
    with fully_quantized(model, {name: bits}, n_iter, method, is_pruned, seed) as codebooks:
        ...                              # free layers clustered here (to score/save), float again after
    codebooks_state_dict(codebooks) / load_codebooks(state)   # checkpoint (weights_only-safe)
    kmeans_1d(x, k, n_iter=3, method="fast", seed=None, min_iter=None) -> (centroids, labels)
    inertia(x, centroids, labels) -> float                     # the objective, float64
    apply_kmeans_policy(model, policy, **kmeans_kwargs)        # kmeans_quantize_model's other name

Linear fake quantization (:mod:`lib.quantize.linear`)::

    QConv2d(in, out, kernel_size, stride=1, padding=0, dilation=1, groups=1, bias=True,
            w_bit=-1, a_bit=-1, half_wave=True)
    QLinear(in_features, out_features, bias=True, w_bit=-1, a_bit=-1, half_wave=True)
        .set_bits(w_bit=None, a_bit=None); .w_bit / .a_bit; .activation_range; .weight_range
    calibrate(model, loader, device=None, kl_max_bit=0)  # one batch sets every range, then fixed
    fake_quantize(x, r, bits, signed, clip_grad=True)   # the STE/PACT fake-quant op
    kl_clip(x, bits)                        # the released divergence clip (kl_max_bit's rule)

Quantizer options beside the released linear quantizer (:mod:`lib.quantize.options`; all off
by default)::

    QuantOptions(per_channel=False, weight_clip="max", fold_bn=False, bias_correction=False,
                 bn_reestimate=0)
        .record() / QuantOptions.from_record(d)   # strategy.json's and the packed header's field
    prepare_model(model, options)         # fold BN, per-channel ranges, biases; then calibrate()
    mse_clip(weight, bits, per_channel=False)   # argmin_t ||Q(w; t) - w||^2 on a 100-step grid
    reestimate_batchnorm(model, loader, n_images, device)   # BN statistics of the quantized model

Linear mode for any model (:mod:`lib.quantize.swap`)::

    quantize_model(model, example_input=None, half_wave=None, method="auto")
        # every Conv2d/Linear -> QConv2d/QLinear in place (Parameters shared, bits -1 = float)
    infer_half_wave(model, example_input=None, method="auto") -> {name: bool}
        # non-negative inputs from the torch.fx graph (fallback: hooks on an example batch)
    linear_mode(model)                    # Q twins unchanged, anything else swapped

Policies (:mod:`lib.quantize.policy`), by layer order or by name, UserError on a bad one::

    apply_linear_policy(model, [[w, a], ...] or {name: [w, a]}) -> [(name, w, a)]
    resolve_kmeans_policy(model, policy) / resolve_linear_policy(model, policy)
"""
from lib.quantize.kmeans import (FAST_MIN_ITER, CentroidSharer, Codebook, apply_kmeans_policy,
                                 codebooks_state_dict, fully_quantized, inertia, kmeans_1d,
                                 kmeans_quantize_layer, kmeans_quantize_model, load_codebooks)
from lib.quantize.linear import QConv2d, QLinear, calibrate, fake_quantize, kl_clip, quant_layers
from lib.quantize.swap import infer_half_wave, linear_mode, quantize_model
from lib.quantize.policy import apply_linear_policy, resolve_kmeans_policy, resolve_linear_policy

__all__ = [
    "FAST_MIN_ITER", "CentroidSharer", "Codebook", "codebooks_state_dict", "fully_quantized",
    "inertia", "kmeans_1d",
    "kmeans_quantize_layer", "kmeans_quantize_model", "load_codebooks",
    "QConv2d", "QLinear", "calibrate", "fake_quantize", "kl_clip", "quant_layers",
    "infer_half_wave", "linear_mode", "quantize_model",
    "apply_kmeans_policy", "apply_linear_policy", "resolve_kmeans_policy", "resolve_linear_policy",
]
