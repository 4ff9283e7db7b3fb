"""Accelerator checks of the quantized training step (issue 17, goal 4), for a machine with a GPU.

(a) host synchronisation: one training step (forward, backward, SGD step) of qmobilenetv2 at
    w4a4, and of K-Means-quantized mobilenetv2 with the centroid-shared update, run under
    ``torch.cuda.set_sync_debug_mode("error")``: any operation that waits for the GPU (a
    tensor read to the host, a device-to-host copy) raises, naming the operation.
(b) QAT step time (forward+backward) of qmobilenetv2 w4a4 against mobilenetv2 fp32, same batch,
    in fp32 and under bf16 autocast (the --half path), CUDA events, median of --steps.

    python bench/gpu_check.py                  # batch 64 at 224, ImageNet-sized models
    python bench/gpu_check.py --batch 16 --size 96 --steps 10
"""
import argparse
import os
import statistics
import sys

import torch
import torch.nn as nn

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from lib.quantize.kmeans import CentroidSharer, kmeans_quantize_model  # noqa: E402
from lib.quantize.linear import calibrate  # noqa: E402
from lib.quantize.policy import apply_linear_policy  # noqa: E402
from lib.utils.layers import quantizable_layers  # noqa: E402
from models import get_model  # noqa: E402


def _data(args, device):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(args.batch, 3, args.size, args.size, generator=g).to(device)
    y = torch.randint(0, 1000, (args.batch,), generator=g).to(device)
    return x, y


def linear_model(args, device):
    torch.manual_seed(0)
    model = get_model("qmobilenetv2", num_classes=1000, input_size=args.size).to(device)
    n = len(quantizable_layers(model, linear=True))
    apply_linear_policy(model, [[4, -1]] + [[4, 4]] * (n - 1))   # the image stays unquantized
    calibrate(model, _data(args, device)[0][:4], device)
    return model.train()


def kmeans_model(args, device):
    torch.manual_seed(0)
    model = get_model("mobilenetv2", num_classes=1000, input_size=args.size).to(device)
    codebooks = kmeans_quantize_model(model, [4] * len(quantizable_layers(model)), seed=0)
    return model.train(), CentroidSharer(model, codebooks)


def sync_check(name, model, x, y, after_step=None):
    """One SGD step with every host synchronisation turned into an error."""
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    for step in range(2):   # the second step runs with the optimizer state already made
        if step == 1:
            torch.cuda.synchronize()
            torch.cuda.set_sync_debug_mode("error")
        try:
            optimizer.zero_grad(set_to_none=True)
            nn.functional.cross_entropy(model(x), y).backward()
            optimizer.step()
            if after_step is not None:
                after_step()
        except RuntimeError as exc:
            torch.cuda.set_sync_debug_mode("default")
            print(f"(a) {name}: host synchronisation in the step: {str(exc).splitlines()[0]}")
            return False
        finally:
            torch.cuda.set_sync_debug_mode("default")
    print(f"(a) {name}: forward + backward + SGD step"
          f"{' + centroid update' if after_step else ''} ran with no host synchronisation")
    return True


def step_time(model, x, y, steps, amp):
    times = []
    for i in range(steps + 3):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        model.zero_grad(set_to_none=True)
        start.record()
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=amp):
            loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        end.record()
        torch.cuda.synchronize()
        if i >= 3:    # warm-up steps
            times.append(start.elapsed_time(end))
    return statistics.median(times)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--steps", type=int, default=20)
    args = p.parse_args()
    if not torch.cuda.is_available():
        sys.exit("error: no CUDA device; expected a machine with a GPU")
    device = torch.device("cuda")
    torch.backends.cudnn.benchmark = True
    print(f"device: {torch.cuda.get_device_name()}, torch {torch.__version__}, batch "
          f"{args.batch} at {args.size}px")
    x, y = _data(args, device)
    qmodel = linear_model(args, device)
    ok = sync_check("qmobilenetv2 w4a4 (linear QAT)", qmodel, x, y)
    kmodel, sharer = kmeans_model(args, device)
    ok &= sync_check("mobilenetv2 K-Means 4-bit", kmodel, x, y, after_step=sharer.step)
    torch.manual_seed(0)
    fmodel = get_model("mobilenetv2", num_classes=1000, input_size=args.size).to(device).train()
    for amp in (False, True):
        tf = step_time(fmodel, x, y, args.steps, amp)
        tq = step_time(qmodel, x, y, args.steps, amp)
        print(f"(b) QAT step{' bf16 autocast' if amp else ' fp32'}: w4a4 {tq:.1f} ms vs fp32 "
              f"{tf:.1f} ms -> {tq / tf:.2f}x (median of {args.steps})")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
