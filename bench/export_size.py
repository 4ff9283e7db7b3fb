"""Size of the packed file of a K-Means policy against the simulator's size prediction.

Applies a policy (a preset or strategy.json) to a model's weights -- as initialised (seeded),
or a pretrained checkpoint -- packs it with lib.export, rebuilds it from the file, checks the
logits are the quantized model's, and prints the size report (weights vs the size cost,
codebooks, float parts, whole file).

    python bench/export_size.py --strategy resnet50_kmeans_0.1 --arch resnet50     # ImageNet shapes
    python bench/export_size.py --strategy S.json --arch mobilenetv2 --dataset mnist5k \
        --pretrained_path checkpoints/pretrained/mobilenetv2_mnist5k.pth.tar
"""
import argparse
import logging
import os
import sys
import tempfile
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from lib.export import load_packed, size_report, write_packed  # noqa: E402
from lib.export.report import predicted_sizes  # noqa: E402
from lib.quantize import apply_kmeans_policy  # noqa: E402
from lib.utils.checkpoint import load_pretrained  # noqa: E402
from lib.utils.run_utils import model_kwargs_for  # noqa: E402
from lib.utils.strategy import load_strategy  # noqa: E402
from models import get_model  # noqa: E402

log = logging.getLogger("export_size")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--strategy", default="resnet50_kmeans_0.1")
    p.add_argument("--arch", default="resnet50")
    p.add_argument("--dataset", default="imagenet")
    p.add_argument("--pretrained_path", default=None, help="default: weights as initialised")
    p.add_argument("--output", default=None, help="packed file (default: a temporary file)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    torch.manual_seed(args.seed)
    strategy = load_strategy(args.strategy)
    kwargs = model_kwargs_for(args.arch, args.dataset, None, strategy.get("width_mult"))
    model = get_model(args.arch, **kwargs).eval()
    if args.pretrained_path:
        load_pretrained(model, args.pretrained_path)
    start = time.time()
    apply_kmeans_policy(model, strategy["strategy"], seed=args.seed)
    log.info("K-Means of %d layers: %.1fs", len(strategy["strategy"]), time.time() - start)
    out = args.output or os.path.join(tempfile.mkdtemp(), f"{args.arch}.haq")
    header = write_packed(out, model, args.arch, kwargs, "kmeans", strategy["strategy"])
    rebuilt, header = load_packed(out)
    size = kwargs["input_size"]
    x = torch.randn(2, 3, size, size)
    with torch.no_grad():
        diff = float((rebuilt(x) - model(x)).abs().max())
    pred = predicted_sizes(header)["weights"]
    log.info("file %s: %d bytes; weights %d bytes vs predicted %.0f (%+.4f%%); max |logit "
             "difference| after rebuilding %.3g", out, header["file_bytes"],
             header["sizes"]["weights"], pred, 100 * (header["sizes"]["weights"] / pred - 1), diff)
    for line in size_report(header):
        log.info("%s", line)


if __name__ == "__main__":
    main()
