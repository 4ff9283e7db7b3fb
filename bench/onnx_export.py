"""ONNX export of a fine-tuned checkpoint: sizes, agreement on a dataset, ONNX Runtime latency.

For one finetune.py checkpoint it writes the packed file and the ONNX model (both through
``python -m lib.export``), then prints

* the ONNX file's bytes against the packed file's and the predicted size (lib.export.report);
* ONNX Runtime against the PyTorch fake-quant model on the dataset's test split: top-1 of each,
  the images whose top-1 differs, the largest |logit difference|;
* ONNX Runtime latency of the exported model against the float ONNX model of the same network
  (quantization off), measured side by side in this run, alternating, median of the repeats.

    python bench/onnx_export.py --resume runs/lin_ft/checkpoint.pth.tar --dataset mnist5k
"""
import argparse
import logging
import os
import statistics
import sys
import tempfile
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from lib.export.__main__ import main as export_main  # noqa: E402
from lib.export.onnx_export import (float_twin, ort_session, run_session,  # noqa: E402
                                    torch_to_onnx)
from lib.export import export_checkpoint  # noqa: E402
from lib.export.onnx_graph import GraphEditor  # noqa: E402
from lib.export.report import model_from_checkpoint, predicted_sizes  # noqa: E402
from lib.utils.checkpoint import load_checkpoint  # noqa: E402
from lib.utils.data_utils import build_datasets  # noqa: E402

log = logging.getLogger("onnx_export")


def agreement(session, model, dataset, batch):
    """(ORT top-1 %, PyTorch top-1 %, #images whose top-1 differs, max |logit diff|, images)."""
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch, shuffle=False)
    right_ort = right_pt = flips = n = 0
    worst = 0.0
    for x, y in loader:
        got = run_session(session, x)
        with torch.no_grad():
            want = model(x)
        right_ort += int((got.argmax(1) == y).sum())
        right_pt += int((want.argmax(1) == y).sum())
        flips += int((got.argmax(1) != want.argmax(1)).sum())
        worst = max(worst, float((got - want).abs().max()))
        n += len(y)
    return 100.0 * right_ort / n, 100.0 * right_pt / n, flips, worst, n


def latency(sessions, x, repeats):
    """{name: median ms per run} of each session on ``x``, the sessions alternating."""
    times = {name: [] for name in sessions}
    for session in sessions.values():
        run_session(session, x)                       # warm-up
    for _ in range(repeats):
        for name, session in sessions.items():
            start = time.perf_counter()
            run_session(session, x)
            times[name].append(1000 * (time.perf_counter() - start))
    return {name: statistics.median(t) for name, t in times.items()}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--resume", required=True, help="finetune.py checkpoint")
    p.add_argument("--dataset", default="mnist5k")
    p.add_argument("--batch", type=int, default=100, help="images per batch of the agreement")
    p.add_argument("--latency_batch", type=int, nargs="+", default=[1, 32])
    p.add_argument("--repeats", type=int, default=50)
    p.add_argument("--out", default=None, help="folder for the two files (default: a temp dir)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    out = args.out or tempfile.mkdtemp(prefix="onnx_bench_")
    os.makedirs(out, exist_ok=True)
    packed, onnx_path = os.path.join(out, "model.haq"), os.path.join(out, "model.onnx")
    header = export_checkpoint(args.resume, packed)
    export_main(["--format", "onnx", "--resume", args.resume, "--output", onnx_path])

    ckpt = load_checkpoint(args.resume)
    model = model_from_checkpoint(ckpt)
    predicted = sum(predicted_sizes(header).values())
    print(f"{ckpt['arch']} ({ckpt['mode']}): ONNX {os.path.getsize(onnx_path):,d} B, packed "
          f"{os.path.getsize(packed):,d} B, predicted {predicted:,.0f} B")

    quantized = ort_session(open(onnx_path, "rb").read())
    size = (ckpt.get("model_kwargs") or {}).get("input_size") or 224
    _, test_set = build_datasets(args.dataset, input_size=size)
    ort_top1, pt_top1, flips, worst, n = agreement(quantized, model, test_set, args.batch)
    print(f"top-1 on {n} test images: ONNX Runtime {ort_top1:.2f}%, PyTorch {pt_top1:.2f}%; "
          f"top-1 differs on {flips}; max |logit difference| {worst:.3g}")

    # finish(): the same clean-up as the exported graph (no per-node export trace)
    float_graph = GraphEditor(torch_to_onnx(float_twin(model, ckpt["mode"]), size)).finish()
    float_graph = float_graph.SerializeToString()
    sessions = {"float ONNX": ort_session(float_graph), "exported": quantized}
    print(f"float ONNX model of the same network: {len(float_graph):,d} B")
    for b in args.latency_batch:
        x = torch.randn(b, 3, size, size, generator=torch.Generator().manual_seed(0))
        ms = latency(sessions, x, args.repeats)
        print(f"ORT latency, batch {b}, {torch.get_num_threads()} thread(s): float "
              f"{ms['float ONNX']:.3f} ms, exported {ms['exported']:.3f} ms, exported/float "
              f"{ms['exported'] / ms['float ONNX']:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
