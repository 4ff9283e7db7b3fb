"""Where finetune.py writes and what: the output-folder policy and the run's files.

A fresh run writes to a new ``checkpoints/<arch>_<data>_<mode>_finetune-runN`` folder, made
when training starts; ``-c`` names one, which must not hold another run's results unless
``--overwrite`` replaces them; a resumed run continues in its checkpoint's folder. The
folder receives checkpoint.pth.tar (to resume from), model_best.pth.tar (the best fully
quantized model), log.txt (one row per epoch, row 0 right after quantization), TensorBoard
events and results.json. Rank 0 holds the folder's lock (lib.utils.lock) from before the
check for earlier results until the run ends, so a second run into it is refused.
"""
import glob
import logging
import math
import os

from lib.utils.checkpoint import (atomic_write_json, finite_or_none, remove_stale_tmp,
                                  save_checkpoint)
from lib.utils.cli import check_output_dir
from lib.utils.data_utils import dataset_label
from lib.utils.errors import UserError
from lib.utils.lock import FolderLock
from lib.utils.logger import trim_log
from lib.utils.run_utils import new_run_folder, open_run_logs

log = logging.getLogger("finetune")

CHECKPOINT_PARENT = "checkpoints"
RESULT_FILES = ("checkpoint.pth.tar", "model_best.pth.tar", "results.json", "log.txt")
LOG_COLUMNS = ["epoch", "lr", "train_loss", "train_top1", "val_loss", "val_top1", "val_top5",
               "best_top1"]


def default_run_name(setup):
    """Base name of the default output folders: checkpoints/<this>-runN."""
    return f"{setup.arch}_{dataset_label(setup.dataset)}_{setup.mode}_finetune"


def output_folder(args, setup):
    """The folder this run writes to; None means a new ``-runN`` folder under checkpoints/.

    A resumed run continues in its checkpoint's folder (as released) unless -c says otherwise.
    """
    if args.checkpoint:
        return args.checkpoint
    if setup.ckpt is not None:
        return os.path.dirname(os.path.abspath(args.resume))
    return None


def earlier_results(folder):
    """Result files of an earlier run in ``folder`` (TensorBoard events included)."""
    if not os.path.isdir(folder):
        return []
    paths = [os.path.join(folder, n) for n in RESULT_FILES]
    events = glob.glob(os.path.join(glob.escape(folder), "events.out.tfevents.*"))
    return [p for p in paths if os.path.exists(p)] + sorted(events)


def lock_output(args, folder, rank):
    """Rank 0's lock of a -c or resumed folder (None when nothing is written or the folder is
    a new -runN one, locked when made). Taken before :func:`check_output`, so no other run can
    write results after that check has passed."""
    if args.evaluate or folder is None or rank != 0:
        return None
    check_output_dir(folder, "-c/--checkpoint")
    return FolderLock(folder, "-c/--checkpoint").acquire()


def check_output(args, setup, folder):
    """Before any work: something left to train, a writable folder, no other run's results in it.

    Returns the earlier result files that --overwrite will replace (removed when training
    starts, so bad input later on loses nothing).
    """
    if args.evaluate:
        return []
    if setup.ckpt is not None and setup.ckpt.get("epoch", 0) >= args.epochs:
        raise UserError(f"--resume '{args.resume}' has already trained {setup.ckpt['epoch']} "
                        f"epochs; expected --epochs above that to continue, or -e to evaluate")
    if folder is None:
        check_output_dir(CHECKPOINT_PARENT, f"-c (default: a new folder under {CHECKPOINT_PARENT}/)")
        return []
    check_output_dir(folder, "-c/--checkpoint")
    continuing = (setup.ckpt is not None and os.path.abspath(folder)
                  == os.path.dirname(os.path.abspath(args.resume)))
    found = [] if continuing else earlier_results(folder)
    if found and not args.overwrite:
        raise UserError(f"-c '{folder}' already holds an earlier fine-tune's results "
                        f"({os.path.basename(found[0])}); expected a new folder (leave -c out for a "
                        "new -runN folder), --resume of its checkpoint to continue it, or "
                        "--overwrite to replace them")
    return found


class RunOutputs:
    """Rank 0's files of one training run: the folder, its logs, checkpoints and results.json."""

    def __init__(self, args, setup, folder=None, replaced=()):
        self.args, self.setup = args, setup
        self.folder = folder            # None: a new -runN folder, made when training starts
        self.replaced = list(replaced)  # an earlier run's files that --overwrite replaces
        self.lock = None                # lock_output's, else taken when the -runN folder is made
        self.writer = self.logger = None

    def open(self, results):
        """As training starts: claim the folder, then open the logs (row 0 of a fresh run:
        right after quantization, before any training)."""
        if self.folder is None:
            self.folder = new_run_folder(CHECKPOINT_PARENT, default_run_name(self.setup))
            self.lock = FolderLock(self.folder, "-c/--checkpoint").acquire()
        for path in self.replaced:
            log.warning("--overwrite: removing %s of an earlier run", path)
            os.remove(path)
        log.info("output folder %s", self.folder)
        remove_stale_tmp(self.folder)
        resumed = self.setup.ckpt is not None
        if resumed:   # rows after the checkpoint's epoch are trained again
            trim_log(os.path.join(self.folder, "log.txt"), self.setup.ckpt["epoch"] + 1)
        self.writer, self.logger = open_run_logs(self.folder, LOG_COLUMNS, resume=resumed)
        if not resumed:
            q = results["quant_top1"]
            self.logger.append([0, 0.0, math.nan, math.nan, math.nan, q, math.nan, math.nan])
            self.writer.add_scalar("val/top1", q, 0)
            if results["fp32_top1"] is not None:
                self.writer.add_scalar("val/fp32_top1", results["fp32_top1"], 0)

    def report_epoch(self, epoch, lr, tr, va, best, note=""):
        log.info("epoch %d/%d  lr %.5f  train loss %.4f top1 %.2f  val loss %.4f top1 %.2f top5 "
                 "%.2f  best %.2f%s", epoch + 1, self.args.epochs, lr, tr["loss"], tr["top1"],
                 va["loss"], va["top1"], va["top5"], best, note)
        self.logger.append([epoch + 1, lr, tr["loss"], tr["top1"], va["loss"], va["top1"],
                            va["top5"], best])
        for key, value in (("train/loss", tr["loss"]), ("train/top1", tr["top1"]),
                           ("val/loss", va["loss"]), ("val/top1", va["top1"]),
                           ("val/top5", va["top5"]), ("lr", lr)):
            self.writer.add_scalar(key, value, epoch + 1)

    def save(self, state, best=False):
        """checkpoint.pth.tar (the training state, free layers float, to resume from) or
        model_best.pth.tar (the fully quantized model that scored best)."""
        name = "model_best.pth.tar" if best else "checkpoint.pth.tar"
        save_checkpoint(state, os.path.join(self.folder, name))

    def close(self, results, final, elapsed, kl_max_bit):
        """Close the logs and write results.json; returns what it holds."""
        self.writer.close()
        self.logger.close()
        s, r = self.setup, results
        out = {"arch": s.arch, "dataset": s.dataset, "mode": s.mode,
               "strategy_source": s.strategy.get("source"), "layers": len(s.layer_names),
               # what was fine-tuned and its budget, as the strategy records them (None
               # where it records none, e.g. a bare policy list)
               "policy": s.strategy["strategy"], "layer_names": list(s.layer_names),
               "metric": s.strategy.get("metric"), "cost_ratio": s.strategy.get("cost_ratio"),
               "preserve_ratio": s.strategy.get("preserve_ratio"),
               "model_kwargs": s.model_kwargs,
               "kl_max_bit": kl_max_bit,
               # the linear quantizer the accuracies were measured with (None: K-Means mode)
               "quant_options": (s.options.record() if s.mode == "linear"
                                 and getattr(s, "options", None) is not None else None),
               "weights": getattr(self.args, "weights_source", None),
               "fp32_top1": finite_or_none(r["fp32_top1"]),
               "quant_top1": finite_or_none(r["quant_top1"]),
               "best_top1": finite_or_none(r["best_top1"]),
               "final_top1": finite_or_none(final["top1"]) if final else None,
               "epochs": self.args.epochs, "seconds": round(elapsed, 1),
               "checkpoint": os.path.join(self.folder, "checkpoint.pth.tar"),
               "best_checkpoint": os.path.join(self.folder, "model_best.pth.tar")}
        atomic_write_json(os.path.join(self.folder, "results.json"), out)
        self.release()
        return out

    def release(self):
        """Let another run into the folder (at the end, or when the run stops on an error)."""
        if self.lock is not None:
            self.lock.release()
