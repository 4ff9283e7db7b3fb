"""One fine-tune run: the model, its data, its quantized policy and the epoch loop.

Every accuracy is taken of a fully quantized model (:class:`QuantizedPolicy`); rank 0
writes the files (:class:`RunOutputs`). Under torchrun the model trains as DDP on each
rank's shard and validation counts every image once over all ranks.
"""
import logging

import torch
import torch.nn as nn

from lib.quantize import codebooks_state_dict
from lib.utils.checkpoint import extract_state_dict, load_state_dict
from lib.utils.data_utils import get_dataset
from lib.utils.distributed import is_distributed, sync_buffers
from lib.utils.errors import UserError
from lib.utils.lr_schedule import make_lr_schedule
from lib.utils.run_utils import lr_setter
from lib.utils.train import autocast_dtype, evaluate, train_one_epoch
from models import load_pretrained_weights

from .outputs import RunOutputs
from .quantized import QuantizedPolicy
from .setup import CKPT_EXPECTED, build_model

log = logging.getLogger("finetune")


def evaluate_model(model, loader, criterion, device, args):
    rank0 = not is_distributed() or torch.distributed.get_rank() == 0
    return evaluate(model, loader, criterion, device, progress=args.progress and rank0,
                    amp=autocast_dtype(args, device))


RELEASED_BATCH = 256
# a MobileNet-V2 training step at 224 px holds about 80 MB per image on the CPU: 3.4 GB at
# batch 32, about 20 GB at 256 (peak RSS of one float step)
CPU_LARGE_IMAGE_BATCH = 32


def default_train_batch(device, input_size):
    """--train_batch when not given: the released 256 on a GPU or for small images (<= 64 px);
    on the CPU at larger sizes 32, so a first run fits a laptop's memory."""
    if torch.device(device).type != "cpu" or (input_size or 224) <= 64:
        return RELEASED_BATCH
    log.info("--train_batch %d (not given: the CPU default above 64 px; the released %d needs "
             "about 20 GB for MobileNet-V2 at 224 px)", CPU_LARGE_IMAGE_BATCH, RELEASED_BATCH)
    return CPU_LARGE_IMAGE_BATCH


class Finetune:
    """One run: the model, its data, its quantization state and the epoch loop."""

    def __init__(self, args, setup, device, rank, folder=None, replaced=()):
        self.args, self.setup, self.device, self.rank = args, setup, device, rank
        self.outputs = RunOutputs(args, setup, folder, replaced)
        self.criterion = nn.CrossEntropyLoss()
        self.model = build_model(setup, args, device)
        if args.train_batch is None:
            args.train_batch = default_train_batch(device, setup.model_kwargs.get("input_size"))
        self.train_loader, self.val_loader, _ = get_dataset(
            setup.dataset, args.train_batch, args.workers, args.data, distributed=is_distributed(),
            train_subset=args.train_subset, val_batch_size=args.test_batch,
            input_size=setup.model_kwargs.get("input_size"))
        self.policy = QuantizedPolicy(self.model, setup, args)
        self.results = {"fp32_top1": None, "quant_top1": None, "best_top1": 0.0}
        self.net = self.model

    @property
    def kl_max_bit(self):
        return self.policy.kl_max_bit

    def validate(self):
        """Accuracy on the validation split, every image counted once over all ranks.

        Rank 0's BN statistics go to every rank first (after an epoch each holds its
        own last batch's), so all ranks score the same model.
        """
        sync_buffers(self.model)
        return evaluate_model(self.model, self.val_loader, self.criterion, self.device, self.args)

    def prepare_fresh(self):
        """Pretrained float weights -> fp32 accuracy -> quantize -> accuracy after quantization."""
        args, setup = self.args, self.setup
        args.weights_source = None   # recorded in the checkpoint's args and results.json
        if args.pretrained:
            args.weights_source = load_pretrained_weights(
                self.model, setup.arch, setup.dataset, args.pretrained_path, args.weights)
        else:
            log.warning("--no-pretrained: quantizing randomly initialised weights")
        if args.eval_fp32:
            self.results["fp32_top1"] = self.validate()["top1"]
            log.info("fp32 accuracy: top1 %.2f", self.results["fp32_top1"])
        self.policy.quantize(self.train_loader, self.device)
        self.wrap_ddp()
        with self.policy.all_quantized():
            va = self.validate()
        self.results["quant_top1"] = va["top1"]
        log.info("acc after quantization: top1 %.2f top5 %.2f%s", va["top1"], va["top5"],
                 self.policy.scored_note())
        return va

    def prepare_resumed(self):
        """Weights, bits and codebooks of a finetune.py checkpoint."""
        ckpt = self.setup.ckpt
        load_state_dict(self.model, extract_state_dict(ckpt), source=self.args.resume)
        self.args.weights_source = (ckpt.get("args") or {}).get("weights_source")
        self.policy.restore(ckpt)
        for key in ("fp32_top1", "quant_top1"):
            self.results[key] = ckpt.get(key)
        self.results["best_top1"] = ckpt.get("best_acc", 0.0)
        self.wrap_ddp()
        log.info("loaded %s (epoch %d, recorded top1 %.2f)", self.args.resume, ckpt["epoch"],
                 ckpt.get("acc", float("nan")))

    def prepare_foreign(self):
        """Evaluation of other weights (e.g. a released checkpoint) under the given policy."""
        load_state_dict(self.model, extract_state_dict(self.setup.foreign), self.args.resume)
        self.policy.adopt_foreign(self.train_loader, self.device)

    def wrap_ddp(self):
        """DDP wrapper; its construction broadcasts rank 0's weights and calibrated ranges."""
        if is_distributed():
            self.net = nn.parallel.DistributedDataParallel(self.model)

    def optimizer(self):
        """SGD, with the resumed checkpoint's state (before any output is written)."""
        a = self.args
        optimizer = torch.optim.SGD(self.model.parameters(), lr=a.lr, momentum=a.momentum,
                                    weight_decay=a.wd)
        if self.setup.ckpt is not None:
            try:
                optimizer.load_state_dict(self.setup.ckpt["optimizer"])
            except (KeyError, TypeError, ValueError, RuntimeError) as exc:
                raise UserError(f"--resume '{a.resume}': its optimizer state does not fit "
                                f"this model ({str(exc)[:120]}); {CKPT_EXPECTED}") from exc
        return optimizer

    def train(self, optimizer):
        """The epochs left; returns the last validation's metrics."""
        args = self.args
        start_epoch = args.start_epoch if self.setup.ckpt is None else self.setup.ckpt["epoch"]
        lr_at = make_lr_schedule(args.lr_type, args.lr, args.epochs, args.warmup_epoch,
                                 args.gamma, args.schedule)
        amp = autocast_dtype(args, self.device)
        scaler = (torch.amp.GradScaler("cuda") if amp == torch.float16 and self.device.type == "cuda"
                  else None)
        final = None
        # the compiled module shares self.net's parameters; checkpoints still save self.model
        net = torch.compile(self.net) if args.compile else self.net
        for epoch in range(start_epoch, args.epochs):
            if is_distributed():
                self.train_loader.sampler.set_epoch(epoch)
            tr = train_one_epoch(net, self.train_loader, self.criterion, optimizer,
                                 self.device, epoch, step_hook=self.policy.step_hook(epoch),
                                 lr_fn=lr_setter(optimizer, lr_at, epoch), amp=amp,
                                 scaler=scaler, progress=args.progress and self.rank == 0)
            if tr["nonfinite"]:
                raise UserError(f"training diverged (NaN/inf loss) in epoch {epoch + 1}; "
                                "expected a smaller --lr")
            final = self.score_epoch(epoch, optimizer, tr)
        return final

    def score_epoch(self, epoch, optimizer, tr):
        """Validate the fully quantized model, keep the best, log and save the epoch."""
        note = self.policy.scored_note()
        # Only a fully quantized model is scored and saved as the best (--free_high_bit).
        with self.policy.all_quantized() as clustered:
            va = self.validate()
            is_best = va["top1"] > self.results["best_top1"]
            self.results["best_top1"] = max(self.results["best_top1"], va["top1"])
            if self.rank == 0 and is_best:
                self.outputs.save(checkpoint_dict(self, epoch + 1, va["top1"], optimizer,
                                                  clustered), best=True)
        if self.rank == 0:
            self.outputs.report_epoch(epoch, optimizer.param_groups[0]["lr"], tr, va,
                                      self.results["best_top1"], note)
            self.outputs.save(checkpoint_dict(self, epoch + 1, va["top1"], optimizer))
        return va


def checkpoint_dict(run, epoch, acc, optimizer, clustered=None):
    """What a checkpoint holds; ``clustered``: codebooks of free layers clustered for saving."""
    s, r, codebooks = run.setup, run.results, run.policy.codebooks
    if codebooks is not None:
        codebooks = codebooks_state_dict({**codebooks, **(clustered or {})})
    return {"state_dict": run.model.state_dict(), "epoch": epoch, "acc": acc,
            "best_acc": r["best_top1"], "optimizer": optimizer.state_dict(),
            "arch": s.arch, "dataset": s.dataset, "model_kwargs": s.model_kwargs,
            "mode": s.mode, "policy": s.strategy, "kl_max_bit": run.policy.kl_max_bit,
            "codebooks": codebooks, "fp32_top1": r["fp32_top1"], "quant_top1": r["quant_top1"],
            "args": vars(run.args)}
