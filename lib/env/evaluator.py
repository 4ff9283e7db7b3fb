"""The short fine-tune + validation that scores one search episode (docs/design.md, "the search").

After a policy is applied, the model is fine-tuned for ``finetune_epoch`` epochs
(1 in the paper) over the search's training subset with SGD (momentum 0.9,
weight decay 4e-5, lr ``finetune_lr * finetune_gamma ** epoch``) and validated on
the search's held-out validation subset. Both passes are the project's one
training loop and one validation loop (lib.utils.train).

With ``compiled`` both passes run through one ``torch.compile`` of the model, made once
and kept for the whole search: the fake quantization reads its bit widths from tensors
(lib.quantize.linear), so a new policy every episode reuses the compiled graphs (one for
training, one for validation), and only switching a layer's quantizer on or off recompiles.

Under torchrun the fine-tune runs as DDP over each rank's shard of the training
subset (DistributedSampler, reshuffled every pass) and validation counts each
rank's shard once, all-reduced: every rank returns the same metrics.
"""
import contextlib
import logging
import math
import time
from dataclasses import dataclass, field

import torch
import torch.nn as nn

from lib.utils.distributed import broadcast_values, is_distributed, sync_buffers
from lib.utils.train import evaluate, train_one_epoch

log = logging.getLogger(__name__)


@dataclass
class FinetuneConfig:
    """The short fine-tune of every episode (rl_quantize.py's --finetune_* flags).

    ``progress`` only shows bars, so a resumed search may change it (``resume=False``).
    """
    finetune_flag: bool = True
    finetune_epoch: int = 1
    finetune_lr: float = 1e-3
    finetune_gamma: float = 0.8
    momentum: float = 0.9
    weight_decay: float = 4e-5
    max_train_batches: int = None   # cap per epoch (benchmarks, smoke runs)
    progress: bool = field(default=False, metadata={"resume": False})
    amp: object = None              # autocast dtype of fine-tune and validation; None = fp32
    # torch.compile of both passes (--compile): like amp, how it computes, not what, so not a
    # flag a resumed search must repeat
    compiled: bool = False


class ShortFinetune:
    """Scores a quantized model: optional short fine-tune, then validation.

    ``finetune(model, step_hook, scoring)`` returns the validation metrics of the
    best epoch (this project's rule for --finetune_epoch > 1, docs/fidelity.md: the release
    kept the best running *training* average; at the default 1 epoch there is one epoch)
    plus ``nonfinite`` when a NaN/inf loss cut the fine-tune short. A fine-tune that
    left non-finite weights scores 0% (the worst reward) instead of crashing.
    ``scoring`` (optional) returns a context manager that every validation after
    training runs in: K-Means mode re-clusters the free high-bit layers there, so
    only a fully quantized model is scored.
    """

    def __init__(self, train_loader, val_loader, device, config=None):
        self.train_loader, self.val_loader = train_loader, val_loader
        self.device = torch.device(device)
        self.cfg = config or FinetuneConfig()
        self.criterion = nn.CrossEntropyLoss()
        self.timings = {"finetune": 0.0, "validate": 0.0}   # seconds, for bench/episode_bench.py
        self.passes = 0      # training passes so far: the DistributedSampler's epoch
        self._ddp = None
        self._compiled = {}   # id(module): (module, torch.compile of it)

    def state_dict(self):
        return {"passes": self.passes}

    def load_state_dict(self, state):
        self.passes = int(state["passes"])

    def sync_from_main(self):
        self.passes = int(broadcast_values([self.passes])[0])

    def _net(self, model):
        """``model`` itself, or (torchrun) its DDP wrapper, built once and reused.

        DDP is told to look for unused parameters only when some exist (it warns on every
        run when told so in vain): see :func:`skipped_trainable`.
        """
        if not is_distributed():
            return model
        if self._ddp is None or self._ddp.module is not model:
            skipped = skipped_trainable(model)
            if skipped:
                log.debug("DDP: parameters the forward pass skips: %s", ", ".join(skipped))
            self._ddp = nn.parallel.DistributedDataParallel(
                model, find_unused_parameters=bool(skipped))
        return self._ddp

    def _run(self, net):
        """``net``, or with ``compiled`` its torch.compile, made once per module and reused
        (under torchrun: one of the model for validation, one of its DDP wrapper)."""
        if not self.cfg.compiled:
            return net
        kept = self._compiled.get(id(net))
        if kept is None or kept[0] is not net:
            kept = self._compiled[id(net)] = (net, torch.compile(net))
        return kept[1]

    def _next_pass(self):
        sampler = getattr(self.train_loader, "sampler", None)
        if hasattr(sampler, "set_epoch"):
            sampler.set_epoch(self.passes)
        self.passes += 1

    def validate(self, model):
        start = time.perf_counter()
        metrics = evaluate(self._run(model), self.val_loader, self.criterion, self.device,
                           progress=self.cfg.progress, desc="search val", amp=self.cfg.amp)
        self.timings["validate"] += time.perf_counter() - start
        return metrics

    def finetune(self, model, step_hook=None, scoring=None):
        """Fine-tune (when enabled) and validate; returns dict(top1, top5, loss, nonfinite)."""
        if not self.cfg.finetune_flag:
            return dict(self.validate(model), nonfinite=False)
        params = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.SGD(params, lr=self.cfg.finetune_lr, momentum=self.cfg.momentum,
                                    weight_decay=self.cfg.weight_decay)
        best, nonfinite = None, False
        for epoch in range(self.cfg.finetune_epoch):
            for group in optimizer.param_groups:
                group["lr"] = self.cfg.finetune_lr * self.cfg.finetune_gamma ** epoch
            start = time.perf_counter()
            self._next_pass()
            net = self._run(self._net(model))
            stats = train_one_epoch(net, self.train_loader, self.criterion, optimizer,
                                    self.device, epoch=epoch, step_hook=step_hook,
                                    max_batches=self.cfg.max_train_batches,
                                    progress=self.cfg.progress, desc="search finetune",
                                    amp=self.cfg.amp)
            self.timings["finetune"] += time.perf_counter() - start
            sync_buffers(model)   # rank 0's BN statistics: every rank validates the same model
            nonfinite = nonfinite or stats["nonfinite"]
            if not _finite_weights(model):
                log.warning("fine-tune left non-finite weights; scoring the episode as 0%%")
                return {"top1": 0.0, "top5": 0.0, "loss": math.inf, "nonfinite": True}
            with scoring() if scoring is not None else contextlib.nullcontext():
                metrics = self.validate(model)
            if best is None or metrics["top1"] > best["top1"]:
                best = metrics
            if stats["nonfinite"]:
                log.warning("non-finite loss during the search fine-tune; scoring the accuracy "
                            "reached so far")
                break
        return dict(best, nonfinite=nonfinite)


def skipped_trainable(model):
    """Names of the parameters that want a gradient but that the forward pass leaves out.

    The only such parameter is a Q layer's ``activation_range`` while its input is not
    quantized (a_bit <= 0: linear mode's first layer); ``set_bits`` freezes it then, and
    DDP ignores frozen parameters, so this is empty unless a range was unfrozen by hand.
    """
    return [f"{name}.activation_range" for name, m in model.named_modules()
            if hasattr(m, "activation_range") and getattr(m, "a_bit", 1) <= 0
            and m.activation_range.requires_grad]


def _finite_weights(model):
    return all(torch.isfinite(p).all() for p in model.parameters())
