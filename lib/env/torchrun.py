"""The search env under torchrun: rank 0 plays the episodes, every other rank follows.

The agent lives on rank 0 only (docs/design.md, "beyond one machine"). Every other rank
builds the same env and calls :func:`run_follower`: rank 0 broadcasts each episode's
bits as the episode ends (:func:`send_episode`), every rank applies them (the mode
shares rank 0's K-Means codebooks or calibrated ranges), fine-tunes its shard under DDP
and validates its shard, and the validation counts are all-reduced, so every rank
scores the same accuracy.
"""
import logging

import torch

from lib.utils.distributed import (broadcast_values, get_rank, is_distributed, model_tensors,
                                   ranks_agree)

log = logging.getLogger(__name__)


def send_episode(env, raw_bits):
    """Rank 0: tell the followers to evaluate ``raw_bits`` (flag 1 + one value per step)."""
    broadcast_values([1] + [int(b) for b in raw_bits], dtype=torch.int64)


def release_followers(env):
    """Rank 0, at the end of a search: the followers' :func:`follow` returns."""
    if is_distributed() and get_rank() == 0:
        broadcast_values([0] * (env.n_steps + 1), dtype=torch.int64)


def sync_from_main(env):
    """Every rank: take rank 0's acc_original and evaluator state (after a resume there)."""
    if not is_distributed():
        return
    org = -1.0 if env.org_acc is None else float(env.org_acc)
    org = broadcast_values([org])[0]
    env.org_acc = org if org >= 0 else None
    if hasattr(env.evaluator, "sync_from_main"):
        env.evaluator.sync_from_main()


def run_follower(env, resumed=False, prologue=None, verbose=False):
    """A rank > 0's whole search: the same collectives as rank 0, in the same order.

    Rank 0 measures acc_original (unless it resumes), loads any saved state, runs
    what comes before its episodes (``prologue``: the integer program's scoring),
    then evaluates its episodes; this rank joins each of those steps.
    """
    if not resumed:
        env.measure_original()
    sync_from_main(env)
    if prologue is not None:
        prologue()
    return follow(env, verbose)


def follow(env, verbose=False):
    """Ranks > 0: evaluate every episode rank 0 announces, until it releases them.

    Returns the number of episodes evaluated. Rank 0 alone logs the episodes; with
    ``verbose`` (the search's --debug) this rank logs its own line per episode too, at
    DEBUG, so the logs can show that all ranks applied the same policy and scored the
    same accuracy.
    """
    if verbose:   # this rank's root logger shows warnings only (lib.utils.logger)
        log.setLevel(logging.DEBUG)
    done = 0
    while True:
        msg = broadcast_values([0] * (env.n_steps + 1), dtype=torch.int64)
        if not msg[0]:
            return done
        info = env.finish_episode([int(b) for b in msg[1:]])
        done += 1
        log.debug("rank %d: policy %s accuracy %.4f", get_rank(), info["policy"],
                  info["accuracy"])


def check_ranks_agree(model, what):
    """Raise unless every rank holds the same model (after rank 0's quantization is shared)."""
    if is_distributed() and not ranks_agree(model_tensors(model)):
        raise RuntimeError(f"ranks hold different models after {what}")
