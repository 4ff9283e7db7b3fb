"""The search's data path at ImageNet shape: decoding JPEGs against the decoded-subset cache.

    python bench/imagenet_shape_bench.py [--data DIR | --build DIR --classes 20 --per_class 100]
        [--train_size 512 --val_size 256] [--episode_train 64 --episode_val 64]
        [--arch mobilenetv2 --width_mult 1.0] [--batch 32] [--rounds 2] [--min_s 1] [--threads 1]

Builds (or takes, ``--data``) an ImageFolder tree of ~500x375 JPEG textures and, at 224 px:

1. the data path alone: images/s of the search's training loader (random-resized crop + flip) and
   validation loader (resize + centre crop) decoding the JPEGs, against the same loaders reading the
   stores of ``--data_cache`` (lib/utils/subset_cache.py), in one process on the same cores, rounds
   alternating after an untimed warm-up pass, each path iterated for at least ``--min_s`` seconds,
   as images per wall-clock second and per CPU second of this process; the one-time build is timed
   apart;
2. one search episode (the short fine-tune + validation of lib/env/evaluator.py, float model, so the
   least compute an episode has) on each path, split into time waiting for the next batch and the rest.

Targets (issue 30): cached >= 10x the images/s of decoding; after the first episode <= 10% of an
episode waiting for data.
"""
import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time

import numpy as np
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from lib.env import FinetuneConfig, ShortFinetune  # noqa: E402
from lib.utils.data_utils import get_search_data  # noqa: E402
from models import get_model  # noqa: E402

SIZE = 224


def texture(rng, w, h):
    """A smooth random colour field with grain: JPEG sizes and decode cost like photographs'."""
    from PIL import Image
    coarse = rng.integers(0, 256, (max(2, h // 24), max(2, w // 24), 3), dtype=np.uint8)
    image = np.asarray(Image.fromarray(coarse).resize((w, h), Image.BICUBIC), dtype=np.int16)
    grain = rng.normal(0, 18, (h, w, 3))
    return Image.fromarray(np.clip(image + grain, 0, 255).astype(np.uint8))


def build_tree(root, classes, per_class, seed=0):
    """root/{train,val}/nXXXXXXXX/*.JPEG (val: 2 a class, the search reads only train/)."""
    marker = os.path.join(root, f".built_{classes}x{per_class}")
    if os.path.isfile(marker):
        return root
    shutil.rmtree(root, ignore_errors=True)
    rng = np.random.default_rng(seed)
    start = time.perf_counter()
    for split, count in (("train", per_class), ("val", 2)):
        for c in range(classes):
            folder = os.path.join(root, split, f"n{c:08d}")
            os.makedirs(folder)
            for i in range(count):
                w, h = (500, 375) if rng.random() < 0.7 else (375, 500)
                texture(rng, w, h).save(os.path.join(folder, f"img_{i:05d}.JPEG"), quality=90)
    open(marker, "w").close()
    print(f"built {classes} classes x {per_class} JPEGs in {root} "
          f"({time.perf_counter() - start:.0f} s)")
    return root


def images_per_s(loader, limit, min_s):
    """(wall, CPU) images/s of iterating ``loader``: whole passes of at most ``limit`` images,
    repeated until ``min_s`` seconds have passed. The CPU rate (this process's CPU seconds)
    is the one a shared machine's other jobs disturb least; both paths run in this one
    process and thread, so they compare on the same core either way."""
    n, start, cpu = 0, time.perf_counter(), time.process_time()
    while n == 0 or time.perf_counter() - start < min_s:
        seen = 0
        for images, _ in loader:
            seen += len(images)
            if seen >= limit:
                break
        n += seen
    return n / (time.perf_counter() - start), n / (time.process_time() - cpu)


def gather_per_s(store, batch, rounds=3):
    """Images/s of reading shuffled uint8 batches from a store: the CPU's whole share of the
    cached path when the crops and the normalisation run on a GPU."""
    n, start = 0, time.perf_counter()
    for _ in range(rounds):
        order = np.random.permutation(len(store))
        for i in range(0, len(order), batch):
            n += len(torch.from_numpy(store.pixels[order[i:i + batch]]))
    return n / (time.perf_counter() - start)


class TimedLoader:
    """A loader whose iteration records the seconds spent waiting for each next batch."""

    def __init__(self, loader):
        self.loader, self.sampler, self.wait = loader, getattr(loader, "sampler", None), 0.0

    def __len__(self):
        return len(self.loader)

    def __iter__(self):
        start = time.perf_counter()
        it = iter(self.loader)
        while True:
            try:
                batch = next(it)
            except StopIteration:
                self.wait += time.perf_counter() - start
                return
            self.wait += time.perf_counter() - start
            yield batch
            start = time.perf_counter()


def episode(model, data, device):
    """(seconds, seconds waiting for data) of one short fine-tune + validation."""
    train, val = TimedLoader(data.train), TimedLoader(data.val)
    scorer = ShortFinetune(train, val, device, FinetuneConfig())
    start = time.perf_counter()
    scorer.finetune(model)
    return time.perf_counter() - start, train.wait + val.wait


def bench_data_path(a, root, cache):
    kw = dict(data_root=root, input_size=SIZE, val_size=a.val_size, train_size=a.train_size)
    decoding = get_search_data(root, a.batch, a.n_worker, **kw)
    start = time.perf_counter()
    cached = get_search_data(root, a.batch, a.n_worker, data_cache=cache, device=a.device, **kw)
    built = time.perf_counter() - start
    print(f"\ndata path, {a.train_size} train / {a.val_size} val images at {SIZE} px, batch "
          f"{a.batch}, {a.n_worker} worker(s), {torch.get_num_threads()} thread(s)")
    print(f"  cache build (decodes each subset image once): {built:.1f} s "
          f"({(a.train_size + a.val_size) / built:.0f} images/s)")
    rates = {k: [] for k in ("train decode", "train cached", "val decode", "val cached")}
    for r in range(a.rounds + 1):   # round 0 warms the allocator and the page cache: dropped
        for split, size in (("train", a.train_size), ("val", a.val_size)):
            for path, data in (("decode", decoding), ("cached", cached)):
                rate = images_per_s(getattr(data, split), size, a.min_s if r else 0)
                if r:
                    rates[f"{split} {path}"].append(rate)
    gather = gather_per_s(cached.train.store, a.batch)
    decode_wall = statistics.median(w for w, _ in rates["train decode"])
    print(f"  train uint8 batches read from the store alone (the CPU's share when the device is a "
          f"GPU): {gather:.0f} images/s = {gather / decode_wall:.0f}x decoding")
    for split in ("train", "val"):
        # workers' CPU seconds are not this process's: with workers, wall time only
        for clock, name in ((0, "wall"), (1, "CPU "))[:1 if a.n_worker else 2]:
            dec = [r[clock] for r in rates[f"{split} decode"]]
            cac = [r[clock] for r in rates[f"{split} cached"]]
            ratios = sorted(c / d for c, d in zip(cac, dec))
            print(f"  {split:5s} ({name} time): decoding {statistics.median(dec):7.0f} images/s, "
                  f"cached {statistics.median(cac):7.0f} images/s, cached / decoding "
                  f"{statistics.median(ratios):.1f}x (rounds {ratios[0]:.1f}-{ratios[-1]:.1f}x; "
                  "goal >= 10x)")


def bench_episode(a, root, cache, n_class):
    kw = dict(data_root=root, input_size=SIZE, val_size=a.episode_val,
              train_size=a.episode_train)
    paths = {"decoding": get_search_data(root, a.batch, a.n_worker, **kw),
             "cached": get_search_data(root, a.batch, a.n_worker, data_cache=cache,
                                       device=a.device, **kw)}
    model = get_model(a.arch, num_classes=n_class, input_size=SIZE,
                      width_mult=a.width_mult).to(a.device)
    print(f"\nsearch episode ({a.arch} x{a.width_mult}, float), fine-tune {a.episode_train} + "
          f"validate {a.episode_val} images, batch {a.batch}, {a.device}")
    times = {k: [] for k in paths}
    for r in range(a.rounds + 1):   # round 0 warms the allocator and the page cache: dropped
        for name, data in paths.items():
            total, wait = episode(model, data, a.device)
            if r:
                times[name].append((total, wait))
    for name, runs in times.items():
        shares = sorted(w / t for t, w in runs)
        total = statistics.median(t for t, _ in runs)
        print(f"  {name:8s}: episode {total:6.2f} s, waiting for data "
              f"{statistics.median(w for _, w in runs):6.2f} s = {100 * statistics.median(shares):.1f}%"
              f" (rounds {100 * shares[0]:.1f}-{100 * shares[-1]:.1f}%; goal <= 10% cached)")
    ratio = sorted(d[0] / c[0] for d, c in zip(times["decoding"], times["cached"]))
    print(f"  episode decoding / cached: {statistics.median(ratio):.2f}x "
          f"(rounds {ratio[0]:.2f}-{ratio[-1]:.2f}x)")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", default=None, help="an ImageFolder tree to take instead of building one")
    p.add_argument("--build", default=os.path.join(tempfile.gettempdir(), "haq_imagenet_shape"),
                   help="where the generated tree is built (reused when built alike)")
    p.add_argument("--classes", type=int, default=20)
    p.add_argument("--per_class", type=int, default=50, help="training JPEGs per class")
    p.add_argument("--cache", default=None, help="--data_cache folder (default: a fresh temporary one)")
    p.add_argument("--train_size", type=int, default=512)
    p.add_argument("--val_size", type=int, default=256)
    p.add_argument("--episode_train", type=int, default=64)
    p.add_argument("--episode_val", type=int, default=64)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--n_worker", type=int, default=0, help="DataLoader workers of the decoding path")
    p.add_argument("--arch", default="mobilenetv2")
    p.add_argument("--width_mult", type=float, default=1.0)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--min_s", type=float, default=1.0,
                   help="least seconds each data-path measurement iterates its loader")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--skip_episode", action="store_true")
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    root = a.data or build_tree(a.build, a.classes, a.per_class)
    cache = a.cache or tempfile.mkdtemp(prefix="haq_cache_")
    try:
        bench_data_path(a, root, cache)
        if not a.skip_episode:
            n_class = len([d for d in os.listdir(os.path.join(root, "train"))
                           if not d.startswith(".")])
            bench_episode(a, root, cache, n_class)
    finally:
        if not a.cache:
            shutil.rmtree(cache, ignore_errors=True)


if __name__ == "__main__":
    from lib.utils.errors import run_cli
    run_cli(main)
