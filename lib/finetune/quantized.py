"""The policy's quantization of the model being fine-tuned, and the --free_high_bit plumbing.

K-Means mode shares weights by cluster; with ``--free_high_bit`` the layers above 6 bits
train in float until the last epoch clusters them (as released). Only a fully quantized
model is scored or saved as the best: every measurement before then runs inside
:meth:`QuantizedPolicy.all_quantized`, where the free layers are clustered as the last
epoch will cluster them (lib.env's :func:`shared_training`, the search's own helper).
Linear mode applies the bits and calibrates the ranges, or adopts recorded ones; with
``--bn_reestimate N`` the BatchNorm statistics are then measured again on the first N images
of the training loader (lib.quantize.options.reestimate_batchnorm), so the accuracy after
quantization and the fine-tune start from them. Under torchrun each rank measures on its
own shard and DDP's construction then gives every rank rank 0's statistics.
"""
import contextlib
import logging
import time

from lib.env import shared_training
from lib.quantize import apply_kmeans_policy, apply_linear_policy, calibrate, load_codebooks
from lib.quantize.options import prepare_model, reestimate_batchnorm
from lib.utils.errors import UserError
from lib.utils.layers import quantizable_layers

from .setup import CKPT_EXPECTED

log = logging.getLogger("finetune")

KMEANS_ITERS = 50   # Lloyd iterations when fine-tuning (the search uses 3)


class QuantizedPolicy:
    """K-Means codebooks (and the layers left float) or linear mode's range rule of one run."""

    def __init__(self, model, setup, args):
        self.model, self.setup, self.args = model, setup, args
        self.codebooks = None
        # the rule that set the weight ranges: this run's, or the resumed checkpoint's
        self.kl_max_bit = args.kl_max_bit if setup.mode == "linear" else None
        self.sharer = self._scoring = None

    def _share(self):
        """The centroid sharer and the fully quantized scoring of the current codebooks."""
        self.sharer, self._scoring = shared_training(
            self.model, self.codebooks, self.free_layers(), n_iter=KMEANS_ITERS,
            seed=self.args.manualSeed, is_pruned=self.args.is_pruned)

    def quantize(self, train_loader, device):
        """Apply the policy to the float weights (linear: calibrate the ranges on the first
        batch of ``train_loader``, then re-estimate the BatchNorm statistics when asked)."""
        policy = self.setup.strategy["strategy"]
        if self.setup.mode == "linear":
            prepare_model(self.model, self.setup.options)   # on the pretrained float weights
            apply_linear_policy(self.model, policy)
            self._calibrate(train_loader, device)
            return
        start = time.time()
        # --evaluate scores the whole policy, so no layer is left free there
        free = self.args.free_high_bit and not self.args.evaluate
        self.codebooks = apply_kmeans_policy(self.model, policy, n_iter=KMEANS_ITERS,
                                             is_pruned=self.args.is_pruned, free_high_bit=free,
                                             seed=self.args.manualSeed)
        log.info("K-Means (%d iterations) of %d layers took %.1fs", KMEANS_ITERS,
                 len(self.codebooks), time.time() - start)
        self._share()

    def restore(self, ckpt):
        """Bits, codebooks or ranges of a finetune.py checkpoint whose weights are loaded.

        Its stored ranges are used as they are (never recalibrated).
        """
        if self.setup.mode == "linear":
            apply_linear_policy(self.model, self.setup.strategy["strategy"])
            recorded = ckpt.get("kl_max_bit")
            if recorded is not None and recorded != self.args.kl_max_bit:
                log.warning("--kl_max_bit %d ignored: %s holds ranges calibrated with "
                            "--kl_max_bit %d", self.args.kl_max_bit, self.args.resume, recorded)
            self.kl_max_bit = recorded
        elif ckpt.get("codebooks") is not None:
            self.codebooks = self._recorded_codebooks(ckpt["codebooks"])
            self._share()

    def _recorded_codebooks(self, state):
        """The checkpoint's codebooks, each for a layer of this model; UserError otherwise."""
        unknown = [n for n in state if n not in self.setup.layer_names]
        if unknown:
            raise UserError(f"--resume '{self.args.resume}' holds codebooks of layers this "
                            f"model lacks ({', '.join(map(repr, unknown[:4]))}); "
                            f"{CKPT_EXPECTED}")
        try:
            return load_codebooks(state)
        except (KeyError, TypeError, ValueError, RuntimeError) as exc:
            raise UserError(f"--resume '{self.args.resume}' holds codebooks that cannot be "
                            f"read ({type(exc).__name__}: {str(exc)[:120]}); "
                            f"{CKPT_EXPECTED}") from exc

    def adopt_foreign(self, calib_loader, device):
        """Other weights (e.g. a released checkpoint): linear mode calibrates unless they hold
        ranges, which are then used as stored (by a rule not recorded there)."""
        if self.setup.mode != "linear":
            return
        prepare_model(self.model, self.setup.options)
        apply_linear_policy(self.model, self.setup.strategy["strategy"])
        ranges = [m.weight_range for _, m in quantizable_layers(self.model, linear=True)]
        if all(float(r.max()) < 0 for r in ranges):   # never calibrated
            self._calibrate(calib_loader, device)
        else:
            self.kl_max_bit = None

    def _calibrate(self, train_loader, device):
        """Linear mode: the ranges, then (--bn_reestimate) the BatchNorm statistics."""
        calibrate(self.model, train_loader, device, kl_max_bit=self.args.kl_max_bit)
        reestimate_batchnorm(self.model, train_loader, self.setup.options.bn_reestimate, device)

    def free_layers(self):
        """{name: bits} of the K-Means layers that --free_high_bit leaves float at this point."""
        if self.codebooks is None:
            return {}
        return {n: b for n, b in zip(self.setup.layer_names, self.setup.strategy["strategy"])
                if n not in self.codebooks}

    def all_quantized(self):
        """Context in which the model is fully quantized, to be scored or saved as the policy's.

        Yields the free layers' temporary codebooks; on leaving they get their float weights
        back, so training goes on unchanged.
        """
        return self._scoring() if self._scoring is not None else contextlib.nullcontext({})

    def scored_note(self):
        """What a logged accuracy was measured on, when layers train float for now."""
        n = len(self.free_layers())
        return (f" (all layers quantized: the {n} layers above 6 bits, float in training until "
                "the last epoch (--free_high_bit), clustered for this measurement)") if n else ""

    def step_hook(self, epoch):
        """K-Means: the centroid-shared update of ``epoch``; the last one first clusters the
        --free_high_bit layers (as released). None in linear mode."""
        if self.codebooks is None:
            return None
        deferred = self.free_layers()
        if deferred and epoch == self.args.epochs - 1:
            log.info("last epoch: clustering the %d layers above 6 bits (%d iterations)",
                     len(deferred), KMEANS_ITERS)
            self.codebooks.update(apply_kmeans_policy(self.model, deferred, n_iter=KMEANS_ITERS,
                                                      is_pruned=self.args.is_pruned,
                                                      seed=self.args.manualSeed))
            self._share()
        return self.sharer.step
