"""Allocators beside the DDPG search (docs/design.md, allocators); nothing here knows of RL.

They take an env-like object (lib.env) for its layers, costs, pins, bit range,
budget and quantizers::

    scores = cached_layer_scores(env, folder, metric="loss", n_images=100)  # sensitivity.json/.png
    flat_bits = allocate_bits(env, solver_scores(scores))   # exact integer program, env's budget
    flat_bits = plan_policy(env, folder, "loss")            # both of the above
    flat_bits = plan_policy(env, folder, "loss", refine=200)   # then a measured local search
    FixedActions(min_bit, max_bit, flat_bits)   # replays it through the env like an episode
    UniformActions(seed)                        # random search: uniform actions on [0, 1]
"""
import logging
import os
import time

from lib.utils.distributed import broadcast_values, get_rank

from .actions import FixedActions, UniformActions, bits_to_action
from .ilp import allocate_bits, layer_options, solve_choices
from .refine import PolicyLoss, refine_bits
from .scores_io import CACHE_FILE, HEATMAP_FILE, load_scores, plot_scores, save_scores
from .sensitivity import (METRICS, activation_widths, bit_widths, fixed_batches,
                          hutchinson_traces, layer_scores, solver_scores, unscored_names,
                          unscored_steps)

log = logging.getLogger(__name__)


def cached_layer_scores(env, folder, metric="loss", n_images=100, hessian_iters=16, seed=0):
    """Scores from ``folder``/sensitivity.json if made for this setting; else computed, cached.

    Under torchrun every rank calls it (``folder`` matters on rank 0 only): rank 0 says
    whether its cache holds the scores; if not, all ranks score together, each on its
    shard of the validation subset with the losses all-reduced, so the scores are those
    of the union of the shards on every rank. Returns the scores (None on ranks > 0 when
    rank 0 had them cached).
    """
    main = get_rank() == 0
    scores = None
    if main:
        expect = {"metric": metric, "bits": bit_widths(env), **activation_widths(env),
                  "layers": list(env.layer_names),
                  "requested_images": n_images,
                  "hessian_iters": hessian_iters if metric == "hessian" else None}
        kinds = ("weight", "activation") if env.linear else ("weight",)
        scores = load_scores(os.path.join(folder, CACHE_FILE), expect, kinds,
                             unscored_names(env, unscored_steps(env)))
    if broadcast_values([scores is None])[0]:
        scores = layer_scores(env, metric, n_images, hessian_iters, seed)
        if main:
            save_scores(os.path.join(folder, CACHE_FILE), scores)
    if main:
        plot_scores(os.path.join(folder, HEATMAP_FILE), scores)
    return scores


def plan_policy(env, folder, metric="loss", n_images=100, hessian_iters=16, seed=0, refine=0):
    """Per-step bits of the exact integer program on the (cached) sensitivity scores, then
    (``refine`` > 0) up to that many measured policies of :func:`refine_bits`.

    Under torchrun every rank calls it (see :func:`cached_layer_scores`); the bits are
    returned on rank 0 and None elsewhere. The refinement runs on every rank, each on its
    shard of the scoring images with the losses all-reduced, so all ranks take the same steps.
    """
    start, cpu = time.perf_counter(), time.process_time()
    scores = cached_layer_scores(env, folder, metric, n_images, hessian_iters, seed)
    bits = allocate_bits(env, solver_scores(scores)) if get_rank() == 0 else None
    if refine > 0:
        bits = [int(b) for b in broadcast_values(bits or [0] * env.n_steps)]
        batches = fixed_batches(env.evaluator.val_loader, n_images)
        bits = refine_bits(env, bits, PolicyLoss(env, batches), refine)
        env.restore_weights()
    # CPU time beside the wall time: the allocation's own work on a shared machine
    log.info("allocation (scores, integer program%s): %.1fs, %.1f CPU s of this process",
             ", refinement" if refine > 0 else "", time.perf_counter() - start,
             time.process_time() - cpu)
    return bits if get_rank() == 0 else None


__all__ = ["FixedActions", "UniformActions", "bits_to_action", "allocate_bits", "layer_options",
           "solve_choices", "CACHE_FILE", "HEATMAP_FILE", "load_scores", "plot_scores",
           "save_scores", "METRICS", "bit_widths", "hutchinson_traces", "layer_scores",
           "cached_layer_scores", "solver_scores", "plan_policy", "PolicyLoss", "refine_bits"]
