"""K-Means / model-size mode of the search (HAQ section 4.3, "model size constrained").

One action per Conv2d/Linear layer: its weight bit width. A policy is applied by
K-Means weight sharing (k = 2^bits centroids, 3 Lloyd iterations during the
search) and fine-tuned with the centroid-shared update after every optimizer
step, so a layer never holds more than 2^bits values. As in the released search,
layers above 6 bits are left to train freely during the short fine-tune
(``free_high_bit``); unlike it, they are clustered again before every
validation, so only the fully quantized model is scored (:func:`shared_training`).
Cost = model size ``sum(bits_i * #weights_i)`` against
``float_bit * sum(#weights_i)`` (lib.simulator.SizeCost); a pruned model
(``is_pruned``) counts only its non-zero weights in both, as released.
"""
import logging
import time

import torch

from lib.quantize.kmeans import CentroidSharer, Codebook, fully_quantized
from lib.quantize.kmeans import apply_kmeans_policy
from lib.simulator.costs import SizeCost
from lib.utils.distributed import broadcast_tensors, broadcast_values, get_rank, is_distributed

from .base import QuantizeEnv
from .torchrun import check_ranks_agree

log = logging.getLogger(__name__)


def shared_training(model, codebooks, free_bits=None, *, n_iter, seed, is_pruned=False,
                    method="fast", free_high_bit=False):
    """The two halves of fine-tuning a K-Means model, for the search's episodes and finetune.py.

    Returns ``(sharer, scoring)``. ``sharer.step()`` runs after every optimizer step: the
    centroid-shared update of every layer with a codebook, except those ``free_high_bit``
    leaves free (above 6 bits). ``free_bits`` (``{name: bits}``) names further layers that
    train in float without a codebook (finetune.py's until its last epoch); a pruned
    model's free layers keep their zeros. ``scoring()`` is the context every accuracy is
    measured in: all free layers clustered (``n_iter`` iterations, ``seed``: the same model
    each time), their float weights back afterwards, so only a fully quantized model is
    ever scored.
    """
    keep_zero = list(free_bits or ()) if is_pruned else []
    sharer = CentroidSharer(model, codebooks, free_high_bit=free_high_bit, keep_zero=keep_zero)
    free = {**sharer.free_layers(), **(free_bits or {})}

    def scoring():
        return fully_quantized(model, free, n_iter=n_iter, method=method, is_pruned=is_pruned,
                               seed=seed)

    return sharer, scoring


class KMeansQuantizeEnv(QuantizeEnv):
    """K-Means weight quantization under a model-size budget."""

    linear = False
    actions_per_layer = 1

    def __init__(self, model, evaluator, config, is_pruned=False, n_iter=3, method="fast",
                 free_high_bit=True, reuse_codebooks=False):
        super().__init__(model, evaluator, config)
        self.is_pruned, self.n_iter, self.method = is_pruned, n_iter, method
        self.free_high_bit = free_high_bit
        self.reuse_codebooks = reuse_codebooks
        self._codebooks = {}   # (layer name, bits) -> Codebook of the pretrained weights
        self.size_cost = SizeCost(self.weight_counts(), float_bit=config.float_bit)
        self.timings = {"quantize": 0.0}

    def weight_counts(self):
        """#weights per layer that the size counts: the non-zero ones of a pruned model.

        The released search sized a pruned model by its non-zero weights, reference
        included (``float_bit * sum(nnz)``), so the ratio is that of the stored weights.
        """
        if not self.is_pruned:
            return [s.n_weights for s in self.shapes]
        return [int(torch.count_nonzero(module.weight.detach())) for _, module in self.layers]

    def policy_from_bits(self, flat_bits):
        return [int(b) for b in flat_bits]

    def cost(self, policy):
        return self.size_cost(policy)

    def reference_cost(self):
        return self.size_cost.reference()

    def evaluate_policy(self, policy):
        self.restore_weights()
        start = time.perf_counter()
        # One seed per episode from the env's own generator: reproducible and resumable.
        seed = int(self.rng.integers(2 ** 31 - 1))
        if self.reuse_codebooks:
            seed = self.cfg.seed
        codebooks = self.cluster(policy, seed) if get_rank() == 0 else None
        if is_distributed():
            codebooks = self.share_codebooks(codebooks, policy)
            check_ranks_agree(self.model, "K-Means")
        # Under torchrun every rank clusters its own copy of the free layers for scoring:
        # DDP keeps the weights equal and the seed is shared, so the ranks get the same clusters.
        sharer, scoring = shared_training(self.model, codebooks, n_iter=self.n_iter, seed=seed,
                                          is_pruned=self.is_pruned, method=self.method,
                                          free_high_bit=self.free_high_bit)
        self.timings["quantize"] += time.perf_counter() - start
        return self.evaluator.finetune(self.model, step_hook=sharer.step, scoring=scoring)

    def quantize_policy(self, policy):
        """The pretrained weights K-Means-quantized by ``policy`` with the search's seed (no
        draw from the env's generator, so the episodes' seeds stay as they were)."""
        self.restore_weights()
        apply_kmeans_policy(self.model, policy, n_iter=self.n_iter, method=self.method,
                            is_pruned=self.is_pruned, seed=self.cfg.seed)

    def cluster(self, policy, seed):
        """K-Means-quantize the (restored) pretrained weights by ``policy``; return the codebooks.

        Released behaviour: every episode clusters every layer with its own seed, so the
        same policy gets other codebooks each time. With ``reuse_codebooks`` a (layer, bits)
        pair is clustered once per search, with the search's seed, and reused by every
        episode that picks it: the same codebooks as clustering again with that seed,
        without the clustering time, and a reward that no longer varies with the codebooks.
        """
        kw = dict(n_iter=self.n_iter, method=self.method, is_pruned=self.is_pruned, seed=seed)
        if not self.reuse_codebooks:
            return apply_kmeans_policy(self.model, policy, **kw)
        pairs = list(zip(self.layer_names, (int(b) for b in policy)))
        missing = {name: bits for name, bits in pairs if (name, bits) not in self._codebooks}
        # the whole list (-1: left alone), so layer i keeps the seed it has in a full policy
        todo = [missing.get(name, -1) for name in self.layer_names]
        for name, cb in apply_kmeans_policy(self.model, todo, **kw).items():
            self._codebooks[(name, missing[name])] = cb
        codebooks = {}
        for (name, module), pair in zip(self.layers, pairs):
            cached = self._codebooks[pair]
            # the sharer replaces a codebook's centroids as they train: each episode its own
            codebooks[name] = Codebook(cached.centroids.clone(), cached.labels, cached.bits,
                                       cached.pruned)
            if pair[0] not in missing:
                with torch.no_grad():
                    module.weight.copy_(cached.weight(module.weight.shape))
        return codebooks

    def share_codebooks(self, codebooks, policy):
        """Rank 0's K-Means result on every rank: clustered once, then broadcast.

        Clustering on every rank would give the same result on CPUs, but not
        reliably on GPUs (atomic adds), and labels that disagree across ranks would
        break the centroid sharing under DDP. Sent: per layer the centroid count and
        label dtype, then the centroids, labels and quantized weight.
        """
        modules = dict(self.model.named_modules())
        dtypes = (torch.uint8, torch.int16, torch.int32, torch.int64)
        header = [0] * (2 * len(self.layer_names))
        if codebooks is not None:
            header = [v for name in self.layer_names for v in
                      (codebooks[name].centroids.numel(), dtypes.index(codebooks[name].labels.dtype))]
        header = broadcast_values(header, dtype=torch.int64)
        shared = {}
        for i, name in enumerate(self.layer_names):
            weight = modules[name].weight
            n, dtype = int(header[2 * i]), dtypes[int(header[2 * i + 1])]
            if codebooks is None:
                cb = Codebook(torch.empty(n), torch.empty(weight.numel(), dtype=dtype),
                              int(policy[i]), self.is_pruned)
            else:
                cb = codebooks[name]
            # labels travel as int32: not every backend broadcasts 8/16-bit integers
            labels = cb.labels.to(torch.int32)
            broadcast_tensors([cb.centroids, labels, weight.data])
            cb.labels = labels.to(dtype)
            shared[name] = cb
        return shared
