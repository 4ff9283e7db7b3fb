"""The loss of a model on fixed batches when one layer changes, recomputed from that layer on.

The sensitivity scan (lib.allocate.sensitivity) asks for hundreds of such losses, one
per layer and width. :class:`StagedLoss` answers each from a cache of every stage's float
input and a BatchNorm-folded, channels-last copy of the float stages; on a CPU with two or
more intra-op threads it runs the passes side by side on copies of that folded model
(*lanes*, see :func:`scan_lanes`), since one pass of a small model at a time leaves part
of each core idle.
"""
import contextlib
import copy
import logging
import math
import queue
import threading
from concurrent.futures import Future, ThreadPoolExecutor

import torch
import torch.nn as nn

from lib.utils.distributed import is_distributed
from lib.utils.layers import fold_batchnorm
from lib.utils.train import evaluate

log = logging.getLogger(__name__)

# More lanes than this gain little (memory traffic) and each holds a copy of the model.
MAX_LANES = 4


def _device(model):
    return next(model.parameters()).device


def _loss(model, batches, device=None):
    """Mean cross-entropy of ``model`` on ``batches`` (the project's one validation loop)."""
    return evaluate(model, batches, nn.CrossEntropyLoss(), device or _device(model),
                    progress=False)["loss"]


@contextlib.contextmanager
def scan_lanes(device):
    """How many passes the scan runs side by side: on a CPU with n >= 2 intra-op threads,
    min(n, MAX_LANES) lanes of n // lanes threads each (the process-wide thread count is
    set for the scan and restored after it); one lane on an accelerator (its kernels are
    queued, nothing to gain) and under torchrun (every pass all-reduces: the ranks must
    call in the same order). On the 2-core CPU two one-thread lanes scored the embedded
    default 1.07-1.14x sooner than one two-thread lane (bench/scan_bench.py), scores identical.
    Each lane holds a copy of the folded model and one pass's activations."""
    threads = torch.get_num_threads()
    lanes = 1 if device.type != "cpu" or is_distributed() or threads < 2 \
        else min(threads, MAX_LANES)
    if lanes == 1:
        yield 1
        return
    torch.set_num_threads(threads // lanes)
    try:
        yield lanes
    finally:
        torch.set_num_threads(threads)


class _Tail(nn.Module):
    """Stages applied in turn, held in a plain list rather than registered: the per-pass
    ``eval()`` and memory-format walk of :func:`evaluate` then visit no submodules (~0.4 ms a
    pass for a MobileNetV2 tail, 600 passes a scan). Its stages must already be in eval
    mode: :class:`StagedLoss` keeps the model and its folded copies so."""

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


class _Lane:
    """Folded float stages on which changed layers run as their twins, one pass at a time.

    A change is ``(weight, a_bit, activation_range)`` of the live layer: its effective
    weight times the BatchNorm factor, BN(conv(x, Q(W))) = conv(x, Q(W) * g/sigma) + b',
    and its input quantization (same width and range)."""

    def __init__(self, stages, twins):
        self.stages, self.twins, self.chains = stages, twins, {}

    def loss(self, layer, k, change, inputs, device):
        twin = self.twins[layer][0]
        weight, a_bit, a_range = change
        folded_weight = twin.weight.detach().clone()
        with torch.no_grad():
            twin.weight.copy_(weight)
            if a_bit > 0:
                twin.set_bits(a_bit=a_bit)
                twin.activation_range.copy_(a_range)
        try:
            if k not in self.chains:   # built once: a Module's construction is not free
                self.chains[k] = _Tail(self.stages[k:])
            return _loss(self.chains[k], inputs, device)
        finally:
            with torch.no_grad():
                twin.weight.copy_(folded_weight)
            if hasattr(twin, "set_bits"):
                twin.set_bits(a_bit=-1)


def _done(value):
    future = Future()
    future.set_result(value)
    return future


class StagedLoss:
    """Loss on fixed batches when one layer changes, recomputing only from that layer's stage on.

    Quantizing one layer leaves every stage before the one holding it unchanged, so
    each stage's float input on the batches is computed once and reused for every width
    of every layer in that stage (a prefix cache). The stages run from a copy with
    BatchNorm folded into the convs, in channels-last memory format: the same maths up
    to float rounding, about 4x faster on a CPU for a MobileNetV2; the changed layer runs
    as its twin there (:class:`_Lane`). The chains are checked against the model once: a
    model without ``stages()`` (or whose chain differs) is run whole, a fold that changes
    the float loss is not used, and the first changed layer is also run live (a twin
    that differs there is not used). Layers are visited in module order; going back to an
    earlier stage starts the cache again from the images.

    ``lanes`` > 1 (from :func:`scan_lanes`): :meth:`submit` runs the passes on that many
    copies of the folded stages side by side; call :meth:`close` (or use ``with``) after.
    """

    def __init__(self, model, batches, modules, lanes=1):
        self.model, self.batches, self.modules = model, batches, list(modules)
        self.device = _device(model)
        self.base = _loss(model, batches)
        self.stages, self.stage_of = self._split(model, modules)
        self.float_stages, self.twins, self.twin_checked = self.stages, None, False
        self._live_chains, self._folded = {}, None
        if self.stages is not None and not self._same_loss(self.stages, batches):
            log.warning("%s.stages() does not reproduce its forward; scoring whole passes",
                        type(model).__name__)
            self.stages = None
        if self.stages is not None:
            self._fold(batches)
        self.k, self.inputs = 0, self.batches
        self.n_lanes, self._pool = max(1, int(lanes)), None

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
            self.float_stages, self.batches, self._folded = list(folded.stages), fast, folded
            self.base = loss   # scores are differences along one path
            # deepcopy keeps the module tree, so the walks pair each module with its copy
            twin_of = {id(m): t for m, t in zip(chain.modules(), folded.modules())}
            self.twins = [(twin_of[id(m)], scales.get(twin_of[id(m)])) for m in self.modules]
            self._lane = _Lane(self.float_stages, self.twins)
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

    def submit(self, layer):
        """:meth:`__call__` as a future: the change is read from the model now, its pass may
        run later on a free lane (so the caller may change the model again at once)."""
        if self.n_lanes == 1 or self.twins is None or not self.twin_checked:
            return _done(self(layer))
        if self._pool is None:
            self._start_lanes()
        k = self.stage_of[layer]
        self._advance(k)
        self._slots.acquire()   # bounds the changes held in the queue
        return self._pool.submit(self._on_a_lane, layer, k, self._change(layer), self.inputs)

    def _start_lanes(self):
        """Lanes on copies of the folded stages: the pristine ones keep feeding the cache."""
        self._free = queue.SimpleQueue()
        for _ in range(self.n_lanes):
            copied = copy.deepcopy(self._folded)
            twin_of = {id(m): t for m, t in zip(self._folded.modules(), copied.modules())}
            self._free.put(_Lane(list(copied.stages),
                                 [(twin_of[id(t)], s) for t, s in self.twins]))
        self._slots = threading.BoundedSemaphore(2 * self.n_lanes)
        self._pool = ThreadPoolExecutor(self.n_lanes, thread_name_prefix="staged-loss")

    def _on_a_lane(self, layer, k, change, inputs):
        lane = self._free.get()
        try:
            return lane.loss(layer, k, change, inputs, self.device)
        finally:
            self._free.put(lane)
            self._slots.release()

    def close(self):
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def _live_chain(self, k):
        """The model's own stage ``k``, then the folded rest."""
        if k not in self._live_chains:
            self._live_chains[k] = _Tail([self.stages[k], *self.float_stages[k + 1:]])
        if self.model.training:   # the live stage must not update BatchNorm statistics
            self.model.eval()
        return self._live_chains[k]

    def _change(self, layer):
        """The live layer's change as its twin takes it: (weight, a_bit, activation_range)."""
        module, scale = self.modules[layer], self.twins[layer][1]
        with torch.no_grad():
            weight = module.quantized_weight() if hasattr(module, "quantized_weight") \
                else module.weight
            weight = weight * scale.reshape(-1, *[1] * (weight.dim() - 1)) \
                if scale is not None else weight.detach().clone()
            a_bit = getattr(module, "a_bit", -1)
            a_range = module.activation_range.detach().clone() if a_bit > 0 else None
        return weight, a_bit, a_range

    def _twin_loss(self, layer, k):
        """The loss with layer ``layer``'s change carried into its twin in the folded copy."""
        return self._lane.loss(layer, k, self._change(layer), self.inputs, self.device)

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
