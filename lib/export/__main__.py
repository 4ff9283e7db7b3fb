"""CLI: write or load the packed file of a fine-tuned policy.

    python -m lib.export --resume checkpoints/<run>/checkpoint.pth.tar --output model.haq
    python -m lib.export --load model.haq                      # rebuild, print the sizes
    python -m lib.export --load model.haq --resume CKPT        # ... and compare the logits
    python -m lib.export --format onnx --resume CKPT --output model.onnx   # ONNX, checked in ORT

Both print the file's size per part against the simulator's size prediction.  ``--load`` with
``--resume`` runs one batch (``--batch`` images of the dataset's size, standard normal) through
the rebuilt model and the checkpoint's and prints the largest logit difference.
``--format onnx`` (needs ``pip install -r requirements-onnx.txt``) writes an ONNX model that
ONNX Runtime has run on such a batch beside the checkpoint's model (:mod:`lib.export.onnx_export`).
"""
import logging
import os
import sys

import torch

from lib.utils import cli
from lib.utils.cli import ArgumentParser
from lib.utils.errors import UserError, run_cli

log = logging.getLogger("lib.export")


def get_args_parser():
    p = ArgumentParser(prog="python -m lib.export",
                       description="HAQ: a fine-tuned policy as a packed, bit-exact file")
    p.add_argument("--resume", default=None, help="finetune.py checkpoint to export (or compare)")
    p.add_argument("--output", default=None, help="packed file to write (e.g. model.haq)")
    p.add_argument("--load", default=None, help="packed file to rebuild a model from")
    p.add_argument("--batch", type=cli.number(int, 1, 4096), default=8,
                   help="images of the logit comparison (1..4096)")
    p.add_argument("--seed", type=cli.seed_int, default=0, help="seed of the comparison batch")
    p.add_argument("--format", choices=("packed", "onnx"), default="packed",
                   help="what --output holds: the packed file, or an ONNX model checked in "
                        "ONNX Runtime (needs requirements-onnx.txt)")
    return p


def export_onnx_file(args):
    """--format onnx: write the checked ONNX model and log what the check measured."""
    from lib.export.onnx_export import export_onnx, require_onnx
    require_onnx()
    check_export_output(args.resume, args.output)
    meta = export_onnx(args.resume, args.output, args.batch, args.seed)
    check = meta["check"]
    log.info("wrote %s (%s bytes); ONNX Runtime vs PyTorch on %d images: max |logit "
             "difference| %.3g (tolerance %.3g), same top-1", args.output,
             f"{os.path.getsize(args.output):,d}", check["images"], check["max_abs_logit_diff"],
             check["tolerance"])
    return 0


def compare_logits(model, reference, header, batch, seed):
    """Largest |logit difference| of two models on one standard-normal batch."""
    size = header["model_kwargs"].get("input_size", 224)
    x = torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        return float((model(x) - reference(x)).abs().max())


def check_export_output(source, output):
    """UserError unless ``output`` is a writable file path other than the checkpoint ``source``."""
    cli.check_output_file(output, "--output")
    if cli.same_file(source, output):
        raise UserError(f"--output '{output}' is the checkpoint given to --resume; expected "
                        "another path (the checkpoint is never overwritten)")


def main(argv=None):
    args = get_args_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    from lib.export import export_checkpoint, load_packed, model_from_checkpoint, size_report
    from lib.utils.checkpoint import load_checkpoint
    if args.format == "onnx":
        if args.load or not (args.resume and args.output):
            raise UserError("--format onnx expected --resume CKPT --output FILE (--load reads "
                            "packed files only)")
        return export_onnx_file(args)
    if args.load:
        model, header = load_packed(args.load)
        log.info("rebuilt %s from %s", header["arch"], args.load)
        if args.resume:
            reference = model_from_checkpoint(load_checkpoint(args.resume))
            diff = compare_logits(model, reference, header, args.batch, args.seed)
            log.info("max |logit difference| vs %s on %d images: %.3g", args.resume, args.batch,
                     diff)
    elif args.resume and args.output:
        check_export_output(args.resume, args.output)
        header = export_checkpoint(args.resume, args.output)
        log.info("wrote %s", args.output)
    else:
        raise UserError("expected --resume CKPT --output FILE (export) or --load FILE")
    for line in size_report(header):
        log.info("%s", line)
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main, sys.argv[1:]))
