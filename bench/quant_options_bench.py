"""Top-1 right after quantization with each linear quantizer option alone and all together
(docs/results.md, "Quantizer options"), on the embedded default (mnist5k, width-0.5
MobileNet-V2, the demo's fine-tune settings; no training: finetune.py -e calibrates on the
first training batch of 64 and evaluates the 1000 validation images).

Policies: uniform w4a8, w3a8 and w2a8 (first layer w8 with the image unquantized, last layer
w8a8, as the search pins them) and each --ilp strategy.json with its activations set to 8 bits.
Each (policy, options) pair is one `finetune.py -e` process; the table is printed as markdown.

    python bench/quant_options_bench.py --ilp save/<ilp run>/strategy.json [--ilp ...] --out DIR

``--bn_reestimate N`` swaps the columns for BatchNorm re-estimation on N training images, on
per-channel scales with and without the MSE clip (docs/results.md, "Quantizer options").
"""
import argparse
import json
import os
import re
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OPTIONS = {
    "released (none)": [],
    "--per_channel": ["--per_channel"],
    "--weight_clip mse": ["--weight_clip", "mse"],
    "--fold_bn": ["--fold_bn"],
    "--bias_correction": ["--bias_correction"],
    "all four": ["--per_channel", "--weight_clip", "mse", "--fold_bn", "--bias_correction"],
}


def bn_reestimate_options(n):
    """The columns of --bn_reestimate N: per-channel, then with the MSE clip, each without and
    with the re-estimation."""
    bnre = ["--bn_reestimate", str(n)]
    pc, mse = ["--per_channel"], ["--per_channel", "--weight_clip", "mse"]
    return {"--per_channel": pc, f"--per_channel --bn_reestimate {n}": pc + bnre,
            "--per_channel --weight_clip mse": mse,
            f"--per_channel --weight_clip mse --bn_reestimate {n}": mse + bnre}


FT = ["-e", "--train_batch", "64", "--test_batch", "500", "--device", "cpu", "--no-progress",
      "--no-eval_fp32", "--overwrite"]
N_LAYERS = 53   # the embedded MobileNet-V2's quantizable layers


def uniform(w_bit):
    return [[8, -1]] + [[w_bit, 8]] * (N_LAYERS - 2) + [[8, 8]]


def with_8bit_activations(path):
    with open(path) as f:
        policy = json.load(f)["strategy"]
    return [[policy[0][0], -1]] + [[w, 8] for w, _ in policy[1:]]


def top1_after_quantization(strategy, flags, folder, seed=None):
    cmd = [sys.executable, "finetune.py", "--strategy", strategy, "-c", folder] + FT + flags
    if seed is not None:   # another shuffle of the training split: other calibration images
        cmd += ["--manualSeed", str(seed)]
    run = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, check=False)
    found = re.search(r"acc after quantization: top1 ([0-9.]+)", run.stderr)
    if run.returncode != 0 or not found:
        sys.exit(f"{' '.join(cmd)} failed:\n{run.stderr[-2000:]}")
    return float(found.group(1))


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--ilp", action="append", default=[], help="an ILP search's strategy.json")
    p.add_argument("--out", required=True, help="folder for the strategies and -e run folders")
    p.add_argument("--widths", default="4,3,2",
                   help="weight widths of the uniform policies, comma-separated ('' for none)")
    p.add_argument("--bn_reestimate", type=int, default=0, metavar="N",
                   help="columns: BatchNorm re-estimation on N training images (with "
                        "--per_channel, with and without --weight_clip mse); 0: the option table")
    p.add_argument("--seed", type=int, default=None,
                   help="finetune.py --manualSeed (default: its own), which draws the "
                        "calibration and re-estimation images")
    args = p.parse_args()
    options = bn_reestimate_options(args.bn_reestimate) if args.bn_reestimate > 0 else OPTIONS
    os.makedirs(args.out, exist_ok=True)
    policies = {f"w{b}a8": uniform(int(b)) for b in args.widths.split(",") if b}
    for i, path in enumerate(args.ilp):
        policies[f"ILP {i + 1} (a8)"] = with_8bit_activations(path)
    rows = []
    for name, policy in policies.items():
        slug = re.sub(r"\W+", "_", name)
        strategy = os.path.join(args.out, slug + ".json")
        with open(strategy, "w") as f:
            json.dump({"mode": "linear", "arch": "qmobilenetv2", "dataset": "mnist5k",
                       "strategy": policy}, f)
        row = []
        for j, flags in enumerate(options.values()):
            folder = os.path.join(args.out, f"run_{slug}_{j}")
            row.append(top1_after_quantization(strategy, flags, folder, args.seed))
            print(f"{name} {list(options)[j]}: {row[-1]:.1f}", file=sys.stderr, flush=True)
        rows.append((name, row))
    print("| policy | " + " | ".join(f"`{o}`" if o.startswith("--") else o for o in options)
          + " |")
    print("|---" * (len(options) + 1) + "|")
    for name, row in rows:
        print(f"| {name} | " + " | ".join(f"{v:.1f}" for v in row) + " |")


if __name__ == "__main__":
    main()
