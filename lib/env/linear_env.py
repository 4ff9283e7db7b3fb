"""Linear / latency-or-energy mode of the search (HAQ sections 4.1-4.2).

Two actions per QConv2d/QLinear layer: weight bits, then activation bits (the
state's last column says which). A policy ``[[w, a], ...]`` is applied by
setting each layer's fake-quantization widths and calibrating the ranges on one
training batch, then fine-tuned. Cost comes from a hardware lookup table
(lib.simulator.TableCost: ``sum(table[i, w_i - 1, a_i - 1])`` against the
all-8-bit policy). The first layer is pinned to 8-bit weights with an
unquantized input (the image is already 8-bit) and the last layer to w8a8 in
every episode, and the budget wall never lowers them. The released code applied
these pins only while its budget wall was lowering bits, so a policy already
within budget kept the agent's bits there; pinning every episode is a deliberate
difference (docs/fidelity.md, "The search").

With ``bn_reestimate`` N > 0 (--bn_reestimate), each episode then measures the BatchNorm
statistics again on the first N images of the fine-tune's training loader
(lib.quantize.options.reestimate_batchnorm) before the short fine-tune. Only the scored
episode does: ``quantize_policy``, which the integer program's refinement measures with, does
not. Under torchrun each rank measures on its shard and rank 0's statistics are then copied to
every rank.
"""
import logging
import time

import torch

from lib.quantize.linear import (DEFAULT_KL_MAX_BIT, calibrate, calibration_key, get_ranges,
                                 quant_layers, set_ranges)
from lib.quantize.options import reestimate_batchnorm
from lib.quantize.policy import apply_linear_policy
from lib.utils.distributed import broadcast_tensors, get_rank, is_distributed, sync_buffers
from lib.utils.strategy import LINEAR_PIN_BIT

from .base import QuantizeEnv
from .torchrun import check_ranks_agree

log = logging.getLogger(__name__)

PIN_BIT = LINEAR_PIN_BIT   # first/last layers keep 8 bits, whatever --max_bit is
UNQUANTIZED = -1     # the first layer's input (the image)


class LinearQuantizeEnv(QuantizeEnv):
    """Linear weight + activation quantization under a latency/energy budget.

    ``cost_model``: a callable ``policy -> cost`` with ``reference()`` (the all-8-bit
    cost), e.g. ``lib.simulator.costs.TableCost``. ``calib_loader``: batches for
    calibration (the search's training subset). ``device``: where calibration runs.
    ``kl_max_bit``: calibration's divergence-clip threshold (lib.quantize.linear.calibrate;
    --kl_max_bit 4 is the released rule). ``bn_reestimate``: training images the BatchNorm
    statistics are re-estimated on in each episode (0: off, as released).
    """

    linear = True
    actions_per_layer = 2

    def __init__(self, model, evaluator, config, cost_model, calib_loader, device,
                 reuse_calibration=True, kl_max_bit=DEFAULT_KL_MAX_BIT, bn_reestimate=0):
        super().__init__(model, evaluator, config)
        self.cost_model = cost_model
        self.calib_loader, self.device = calib_loader, device
        self.reuse_calibration = reuse_calibration
        self.kl_max_bit = kl_max_bit
        self.bn_reestimate = bn_reestimate
        self._calibration = None   # (calibration_key, ranges) of the last calibration
        self.timings = {"quantize": 0.0}

    def default_pins(self):
        n = len(self.layers)
        pins = {0: PIN_BIT, 1: UNQUANTIZED}
        if n > 1:
            pins.update({2 * n - 2: PIN_BIT, 2 * n - 1: PIN_BIT})
        return pins

    def policy_from_bits(self, flat_bits):
        return [[int(flat_bits[2 * i]), int(flat_bits[2 * i + 1])] for i in range(len(self.layers))]

    def cost(self, policy):
        return self.cost_model(policy)

    def reference_cost(self):
        return self.cost_model.reference()

    def evaluate_policy(self, policy):
        start = time.perf_counter()
        self.quantize_policy(policy)
        if self.bn_reestimate:
            reestimate_batchnorm(self.model, self.evaluator.train_loader, self.bn_reestimate,
                                 self.device)
            sync_buffers(self.model)
        self.timings["quantize"] += time.perf_counter() - start
        return self.evaluator.finetune(self.model)

    def quantize_policy(self, policy):
        self.restore_weights()
        apply_linear_policy(self.model, policy)
        self.calibrate(reuse=self.reuse_calibration)   # the weights are the pretrained ones

    def calibrate(self, reuse=False):
        """Set the ranges on one batch: on rank 0, then broadcast (every rank the same ranges).

        ``reuse``: the model holds the pretrained weights, so an earlier calibration's ranges
        may stand in (:meth:`_calibrate_or_reuse`).
        """
        if get_rank() == 0:
            self._calibrate_or_reuse(reuse)
        if is_distributed():
            broadcast_tensors([t for m in quant_layers(self.model)
                               for t in (m.weight_range, m.activation_range)
                               + ((m.bias,) if m.bias_correction else ())])
            check_ranks_agree(self.model, "calibration")

    def _calibrate_or_reuse(self, reuse):
        """Calibrate, or (``reuse``) put back the last calibration's ranges where they would
        come out equal.

        Calibration runs the float model (the restored pretrained weights) on one fixed
        batch, so its ranges change with the policy only through :func:`calibration_key`
        (none at kl_max_bit 0): the first episode's forward pass serves all
        (tests/test_linear_ranges.py compares with calibrating every episode). Not
        reading the batch must not shift the random stream the fine-tune shuffles with:
        creating a DataLoader iterator draws its base seed, so that draw is still made.
        """
        key = calibration_key(self.model, self.kl_max_bit)
        if reuse and self._calibration is not None and self._calibration[0] == key:
            if isinstance(self.calib_loader, torch.utils.data.DataLoader):
                torch.empty((), dtype=torch.int64).random_(generator=self.calib_loader.generator)
            set_ranges(self.model, self._calibration[1])
            return
        calibrate(self.model, self.calib_loader, self.device, kl_max_bit=self.kl_max_bit)
        if reuse:   # only a calibration of the pretrained weights may stand in for another
            self._calibration = (key, get_ranges(self.model))

    def unquantize(self):
        """Back to float (w_bit = a_bit = -1 everywhere), e.g. to measure acc_original."""
        apply_linear_policy(self.model, [[UNQUANTIZED, UNQUANTIZED]] * len(self.layers))

    def measure_original(self):
        self.unquantize()
        return super().measure_original()
