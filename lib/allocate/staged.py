"""The loss of a model on fixed batches when one layer changes, recomputed from that layer on.

The sensitivity scan (lib.allocate.sensitivity) asks for hundreds of such losses, one
per layer and width. :class:`StagedLoss` answers each from a cache of every stage's float
input and a BatchNorm-folded, channels-last copy of the float stages, in which the
changed layer runs as its folded twin. Both savings are algorithmic (less arithmetic per
pass), so they hold on every device.
"""
import logging
import math

import torch
import torch.nn as nn

from lib.utils.layers import fold_batchnorm
from lib.utils.train import evaluate

log = logging.getLogger(__name__)


def _device(model):
    return next(model.parameters()).device


def _loss(model, batches, device=None):
    """Mean cross-entropy of ``model`` on ``batches`` (the project's one validation loop)."""
    return evaluate(model, batches, nn.CrossEntropyLoss(), device or _device(model),
                    progress=False)["loss"]


class _Tail(nn.Module):
    """Stages applied in turn, held in a plain list rather than registered: the per-pass
    ``eval()`` and memory-format walk of :func:`evaluate` then visit no submodules (the
    scan makes hundreds of passes). Its stages must already be in eval mode:
    :class:`StagedLoss` keeps the model and its folded copy so."""

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
    to float rounding with fewer operations a pass. A changed layer runs as its twin in
    that copy: BN(conv(x, Q(W))) = conv(x, Q(W) * g/sigma) + b', with the layer's input
    quantization (same width and range). The chains are checked against the model once:
    a model without ``stages()`` (or whose chain differs) is run whole, a fold that
    changes the float loss is not used, and the first changed layer is also run live (a
    twin that differs there is not used). Layers are visited in module order; going
    back to an earlier stage starts the cache again from the images.

    Call it with a layer's index while the model holds that layer's change.
    """

    def __init__(self, model, batches, modules):
        self.model, self.batches, self.modules = model, batches, list(modules)
        self.device = _device(model)
        self.base = _loss(model, batches)
        self.stages, self.stage_of = self._split(model, modules)
        self.float_stages, self.twins, self.twin_checked = self.stages, None, False
        self._live_chains, self._folded_chains = {}, {}
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
        stages, twins = fold_twins(self.stages, self.modules)
        fast = [(_channels_last(x), y) for x, y in batches]
        loss = _loss(_Tail(stages), fast, self.device)
        if self._close(loss):
            self.float_stages, self.batches, self.twins = stages, fast, twins
            self.base = loss   # scores are differences along one path
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
        """Loss of the model as it stands, where only layer index ``layer`` differs from float."""
        if self.stages is None:
            return _loss(self.model, self.batches)
        k = self.stage_of[layer]
        self._advance(k)
        if self.twins is None:
            return _loss(self._live_chain(k), self.inputs, self.device)
        loss = self._twin_loss(layer, k)
        if not self.twin_checked:
            self.twin_checked = True
            live = _loss(self._live_chain(k), self.inputs, self.device)
            if not math.isclose(loss, live, rel_tol=1e-4, abs_tol=1e-6):
                log.warning("a changed layer of %s differs in its BatchNorm-folded copy; "
                            "scoring its stage unfolded", type(self.model).__name__)
                self.twins = None
                return live
        return loss

    def _live_chain(self, k):
        """The model's own stage ``k``, then the folded rest."""
        if k not in self._live_chains:
            self._live_chains[k] = _Tail([self.stages[k], *self.float_stages[k + 1:]])
        if self.model.training:   # the live stage must not update BatchNorm statistics
            self.model.eval()
        return self._live_chains[k]

    def _folded_chain(self, k):
        """The folded stages from ``k`` on (built once: a Module's construction is not free)."""
        if k not in self._folded_chains:
            self._folded_chains[k] = _Tail(self.float_stages[k:])
        return self._folded_chains[k]

    def _twin_loss(self, layer, k):
        """The loss with layer ``layer``'s change carried into its twin in the folded copy:
        its effective weight times the BatchNorm factor, and its input quantization."""
        module, (twin, scale) = self.modules[layer], self.twins[layer]
        float_weight = twin.weight.detach().clone()
        a_bit = getattr(module, "a_bit", -1)
        with torch.no_grad():
            twin.weight.copy_(folded_weight(module, scale))
            if a_bit > 0:
                twin.set_bits(a_bit=a_bit)
                twin.activation_range.copy_(module.activation_range)
        try:
            return _loss(self._folded_chain(k), self.inputs, self.device)
        finally:
            with torch.no_grad():
                twin.weight.copy_(float_weight)
            if hasattr(twin, "set_bits"):
                twin.set_bits(a_bit=-1)

    def _advance(self, k):
        if k < self.k:
            self.k, self.inputs = 0, self.batches
        if self.k == k:
            return
        self.model.eval()
        with torch.no_grad():
            while self.k < k:
                stage = self.float_stages[self.k]
                self.inputs = [(stage(x.to(self.device)), y) for x, y in self.inputs]
                self.k += 1


def fold_twins(stages, modules):
    """A BatchNorm-folded, channels-last copy of the (eval-mode) ``stages`` and each of
    ``modules``' twin in it: ``(folded stages, [(twin, scale)])``, ``scale`` the factor
    g / sigma the twin's weight took (None where no BatchNorm follows it)."""
    chain, scales = _Chain(stages), {}
    folded = fold_batchnorm(chain, scales).to(memory_format=torch.channels_last)
    # deepcopy keeps the module tree, so the walks pair each module with its copy
    twin_of = {id(m): t for m, t in zip(chain.modules(), folded.modules())}
    return list(folded.stages), [(twin_of[id(m)], scales.get(twin_of[id(m)])) for m in modules]


def folded_weight(module, scale):
    """``module``'s effective weight (quantized, if it quantizes) times the BatchNorm factor."""
    with torch.no_grad():
        weight = module.quantized_weight() if hasattr(module, "quantized_weight") \
            else module.weight
        if scale is not None:
            weight = weight * scale.reshape(-1, *[1] * (weight.dim() - 1))
    return weight


def _channels_last(x):
    return x.contiguous(memory_format=torch.channels_last) if x.dim() == 4 else x
