"""A 32-px ImageFolder at its own size against the old forced 224 px, side by side.

    python bench/input_size_bench.py [--root /tmp/digits32] [--steps 10] [--e2e]

Writes the 5,000 mnist5k digits as 32x32 PNGs into an ImageFolder tree (4,000
train / 1,000 val, one folder per digit) unless ``--root`` already holds one.
Then times training steps of the width-0.5 MobileNet-V2 (the pretrain.py step:
loader + forward + backward + SGD, batch 32, this process's threads) at
``--input_size 32`` (Resize + pad/crop, CIFAR-style stem) and at 224 (ImageNet's
RandomResizedCrop, stride-2 stem), and prints ms per step, their ratio and the
implied epoch time. ``--e2e`` also runs pretrain -> search -> finetune on the
folder at 32 px with tiny settings and prints each stage's wall time.
"""
import argparse
import os
import subprocess
import sys
import time

import numpy as np
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from lib.utils.data_utils import SPLIT_SEED, get_dataset, mnist5k_arrays  # noqa: E402
from lib.utils.train import train_one_epoch  # noqa: E402
from models import get_model  # noqa: E402

NAME = "digits32"


def write_folder(root):
    """mnist5k as 32x32 grayscale PNGs in root/{train,val}/<digit>/ (skipped if present)."""
    from PIL import Image
    if os.path.isdir(os.path.join(root, "val")):
        return
    x, y = mnist5k_arrays()
    order = np.random.RandomState(SPLIT_SEED).permutation(len(x))
    for split, idx in (("train", order[:4000]), ("val", order[4000:])):
        for i in idx:
            d = os.path.join(root, split, str(int(y[i])))
            os.makedirs(d, exist_ok=True)
            img = np.pad(x[i].reshape(28, 28), 2)
            Image.fromarray(img, mode="L").save(os.path.join(d, f"{i:04d}.png"))


def step_time(root, size, steps, batch):
    """(median seconds per training step at ``size``, one warm-up step dropped; the train
    transform used)."""
    torch.manual_seed(0)
    model = get_model("mobilenetv2", num_classes=10, input_size=size, width_mult=0.5)
    model = model.to(memory_format=torch.channels_last)
    loader, _, _ = get_dataset(NAME, batch, 0, data_root=root, input_size=size,
                               train_subset=batch * (steps + 1))
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    crit = torch.nn.CrossEntropyLoss()
    times = []
    for i, batch_data in enumerate(loader):
        start = time.perf_counter()
        train_one_epoch(model, [batch_data], crit, opt, torch.device("cpu"), progress=False)
        times.append(time.perf_counter() - start)
    return float(np.median(times[1:])), loader.dataset.dataset.transform


def run_stage(name, cmd):
    start = time.perf_counter()
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if r.returncode != 0:
        sys.exit(f"error: {name} failed:\n{r.stderr[-3000:]}")
    print(f"  {name:9s} {wall:6.1f} s")
    return r, wall


def end_to_end(root, out):
    """pretrain -> search -> finetune on the folder at 32 px, tiny settings."""
    py, data = sys.executable, ["--dataset_root", root]
    ckpt = os.path.join(out, "pre.pth.tar")
    print(f"end to end at --input_size 32 (outputs in {out}):")
    total = 0.0
    _, t = run_stage("pretrain", [py, "pretrain.py", "--dataset", NAME] + data + [
        "--input_size", "32", "--width_mult", "0.5", "--epochs", "2", "--output", ckpt,
        "--no-progress"])
    total += t
    r, t = run_stage("search", [py, "rl_quantize.py", "--dataset", NAME] + data + [
        "--input_size", "32", "--width_mult", "0.5", "--pretrained_path", ckpt,
        "--linear_quantization", "--preserve_ratio", "0.5", "--min_bit", "3",
        "--train_size", "1000", "--val_size", "500", "--data_bsize", "100", "--n_worker", "0",
        "--train_episode", "6", "--warmup", "3", "--device", "cpu", "--output", out])
    total += t
    strategy = r.stdout.strip().splitlines()[-1]
    r, t = run_stage("finetune", [py, "finetune.py", "--strategy", strategy, "--data_name", NAME,
                                  "-d", root, "--pretrained_path", ckpt, "--epochs", "1",
                                  "--train_batch", "64", "--device", "cpu", "--no-progress",
                                  "-c", os.path.join(out, "ft"), "--overwrite"])
    total += t
    last = [ln for ln in r.stderr.splitlines() if "after quantization" in ln][-1]
    print(f"  total     {total:6.1f} s; {last.split(': ', 1)[-1]}")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--root", default=f"/tmp/{NAME}")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--e2e", action="store_true")
    p.add_argument("--out", default=f"/tmp/{NAME}_runs")
    a = p.parse_args(argv)
    write_folder(a.root)
    n_train = sum(len(f) for _, _, f in os.walk(os.path.join(a.root, "train")))
    per_step = {}
    for size in (32, 224):
        per_step[size], transform = step_time(a.root, size, a.steps, a.batch)
        epoch = per_step[size] * n_train / a.batch
        print(f"{size:3d} px: {1000 * per_step[size]:7.1f} ms per step of {a.batch} "
              f"-> {epoch / 60:5.1f} min per {n_train}-image epoch; "
              f"train transform {[type(t).__name__ for t in transform.transforms]}")
    print(f"224 px / 32 px per step = {per_step[224] / per_step[32]:.1f}x "
          f"({torch.get_num_threads()} thread(s))")
    if a.e2e:
        os.makedirs(a.out, exist_ok=True)
        end_to_end(a.root, a.out)


if __name__ == "__main__":
    main()
