"""Time to build every cost table of ResNet-50 at 224 px, batch 16 (docs/design.md section 11).

Prints the shape-trace time (meta device, and a real CPU forward pass side by side
for the ratio), the time of each (hardware, metric) table, and the total.
Nothing is written: tables are built in memory. Run: ``python bench/table_bench.py``.
"""
import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from lib.simulator import HARDWARE, build_table, extract_layer_shapes, get_hardware  # noqa: E402
from lib.simulator import shapes as shapes_mod  # noqa: E402
from models import get_model  # noqa: E402


def timed(fn, *args, **kwargs):
    start = time.perf_counter()
    out = fn(*args, **kwargs)
    return out, time.perf_counter() - start


def real_trace(model, size, batch):
    """The same trace with the meta-device pass disabled (what a plain forward costs)."""
    meta = shapes_mod._forward_meta
    shapes_mod._forward_meta = shapes_mod._forward_real
    try:
        return extract_layer_shapes(model, size, batch=batch)
    finally:
        shapes_mod._forward_meta = meta


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--arch", default="resnet50")
    p.add_argument("--input_size", type=int, default=224)
    p.add_argument("--batch", type=int, default=16)
    args = p.parse_args()

    model, t_model = timed(get_model, args.arch, input_size=args.input_size)
    shapes, t_meta = timed(extract_layer_shapes, model, args.input_size, batch=args.batch)
    real, t_real = timed(real_trace, model, args.input_size, args.batch)
    assert real == shapes
    print(f"{args.arch} at {args.input_size}px, batch {args.batch}: {len(shapes)} layers "
          f"(model construction {t_model:.2f} s, not counted)")
    print(f"trace: meta device {t_meta:.3f} s, real forward {t_real:.3f} s "
          f"(ratio {t_real / t_meta:.1f}x)")
    total = t_meta
    for name in HARDWARE:
        for metric in get_hardware(name).metrics:
            table, t = timed(build_table, shapes, name, metric)
            total += t
            print(f"  {name:<12} {metric:<8} {tuple(table.shape)}  {t:.3f} s")
    print(f"all tables (trace + build): {total:.2f} s")


if __name__ == "__main__":
    main()
