"""K-Means / model-size mode of the search (HAQ section 4.3, "model size constrained").

One action per Conv2d/Linear layer: its weight bit width. A policy is applied by
K-Means weight sharing (k = 2^bits centroids, 3 Lloyd iterations during the
search) and fine-tuned with the centroid-shared update after every optimizer
step, so a layer never holds more than 2^bits values. Cost = model size
``sum(bits_i * #weights_i)`` against ``float_bit * sum(#weights_i)`` (lib.simulator.SizeCost).
"""
import logging
import time

from lib.quantize.kmeans import CentroidSharer
from lib.quantize.policy import apply_kmeans_policy
from lib.simulator.costs import SizeCost

from .base import QuantizeEnv

log = logging.getLogger(__name__)


class KMeansQuantizeEnv(QuantizeEnv):
    """K-Means weight quantization under a model-size budget."""

    linear = False
    actions_per_layer = 1

    def __init__(self, model, evaluator, config, is_pruned=False, n_iter=3, method="fast"):
        super().__init__(model, evaluator, config)
        self.is_pruned, self.n_iter, self.method = is_pruned, n_iter, method
        self.size_cost = SizeCost([s.n_weights for s in self.shapes], float_bit=config.float_bit)
        self.timings = {"quantize": 0.0}

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
        codebooks = apply_kmeans_policy(self.model, policy, n_iter=self.n_iter,
                                        method=self.method, is_pruned=self.is_pruned, seed=seed)
        sharer = CentroidSharer(self.model, codebooks)
        self.timings["quantize"] += time.perf_counter() - start
        return self.evaluator.finetune(self.model, step_hook=sharer.step)
