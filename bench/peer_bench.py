"""Side by side with Sony's Model Compression Toolkit (MCT) mixed precision (issue 34).

On the embedded default (mnist5k, width-0.5 MobileNet-V2, checkpoints/pretrained/
mobilenetv2_mnist5k.pth.tar, as run/run_demo.sh makes it), for each weights budget X (a share
of the all-8-bit weight size; activations 8-bit):

- MCT 2.6.1's PyTorch mixed-precision PTQ with the weights-memory target X * (8-bit weight
  bytes), weight widths {8, 4, 2} (its IMX500 v1.0 platform) or 2..8 (``--mct-bits 2..8``):
  its per-layer weight bits (named by our ``named_modules`` names), size and top-1 right after
  quantization in its own quantizer (BatchNorm folded, per-channel, its own clips);
- ours: ``rl_quantize.py --linear_quantization --cost size --preserve_ratio X --method ilp``
  plus ``--ours-args "..."`` (e.g. the quantizer options, ``--refine``, ``--min_bit_a``);
- both policies in our quantizer (MCT's policy cross-evaluated there), ours in MCT's where
  MCT offers all its widths (MCT's ``configuration_overwrite``), and both after the demo's
  2-epoch fine-tune (finetune.py with run/embedded_settings.sh's FT flags), one run per seed;
- one table (budget, allocator, bits, size ratio, top-1 after quantization in MCT's quantizer
  and in ours, after fine-tune mean and spread, allocation wall and CPU time at 1 thread),
  printed and written to ``--out`` as peer_bench.json and peer_bench.md.

Under the size cost activations cost nothing, so both policies run with every quantized
activation at 8 bits (ours: whatever the search picked is raised to 8; the first layer's
input stays unquantized, as the search pins it).

MCT is not a dependency of this tool or its tests; install it beside the tool in a venv that
reuses the installed torch, and run the bench with that venv's python:

    python -m venv --system-site-packages /work/mct-venv
    /work/mct-venv/bin/pip install model-compression-toolkit==2.6.1
    nice /work/mct-venv/bin/python bench/peer_bench.py --budgets 0.5 0.375 --seeds 1
    nice /work/mct-venv/bin/python bench/peer_bench.py --seeds 3 --mct-bits 8,4,2 2..8 \\
        --ours-args "--refine 20"
    # our search's policy found with per-channel scales; every policy fine-tuned (and scored
    # right after quantization) with the MSE clip and BatchNorm re-estimation on top
    nice /work/mct-venv/bin/python bench/peer_bench.py --seeds 3 --mct-bits 8,4,2 2..8 \
        --ours-args "--per_channel --refine 200" \
        --ft-args "--per_channel --weight_clip mse --bn_reestimate 512"

A rerun into the same ``--out`` reuses each finished stage (MCT, the ILP search, every
fine-tune seed) recorded there with the same settings, so ``--seeds 3`` after ``--seeds 1``
adds two seeds.
"""
import argparse
import json
import logging
import os
import resource
import shlex
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from lib.utils.checkpoint import atomic_write_json, atomic_write_text  # noqa: E402
from lib.utils.errors import UserError  # noqa: E402

log_bench = logging.getLogger("peer_bench")
INSTALL_HINT = ("model-compression-toolkit is not installed; expected it in a venv beside the "
                "tool: python -m venv --system-site-packages /work/mct-venv && "
                "/work/mct-venv/bin/pip install model-compression-toolkit==2.6.1, then run "
                "this bench with /work/mct-venv/bin/python")
CKPT = os.path.join("checkpoints", "pretrained", "mobilenetv2_mnist5k.pth.tar")
MODEL_KWARGS = {"num_classes": 10, "input_size": 32, "width_mult": 0.5}
# run/embedded_settings.sh: the search's data and the demo's fine-tune
SEARCH_DATA = ["--dataset", "mnist5k", "--train_size", "600", "--val_size", "500",
               "--data_bsize", "100", "--n_worker", "0", "--device", "cpu"]
FT = ["--train_batch", "64", "--test_batch", "500", "--lr", "0.01", "--device", "cpu",
      "--no-progress", "--overwrite", "--eval_fp32"]
FIRST_SEED = 2019          # finetune.py's default --manualSeed: seed 1 is the demo's run
MCT_BIT_SETS = {"8,4,2": (8, 4, 2), "2..8": (8, 7, 6, 5, 4, 3, 2)}
ACT_BITS = 8


# ------------------------------------------------------------------ pure helpers
def map_layer_names(mct_names, our_names):
    """{MCT layer name: our named_modules name}.

    MCT names a layer after its torch.fx node, the module path with '.' -> '_', plus a
    suffix where it rewrote the node (e.g. '_bn' once a BatchNorm is folded in). Each
    MCT name maps to the longest of our names whose underscored form equals it or is
    followed by '_' in it. Raises ValueError unless the mapping is one to one.
    """
    keyed = sorted(((n.replace(".", "_"), n) for n in our_names), key=lambda kn: -len(kn[0]))
    out = {}
    for m in mct_names:
        match = next((n for k, n in keyed if m == k or m.startswith(k + "_")), None)
        if match is None:
            raise ValueError(f"MCT layer '{m}' matches none of our layers")
        out[m] = match
    taken = sorted(out.values())
    if len(set(taken)) != len(taken):
        raise ValueError("two MCT layers map to one of our layers: "
                         + ", ".join(n for n in set(taken) if taken.count(n) > 1))
    return out


def size_ratio(numels, w_bits, ref_bits=8):
    """Weight size of ``w_bits`` (per layer) as a share of all layers at ``ref_bits``: the
    ``--cost size`` ratio of the search in linear mode."""
    total = sum(numels)
    return sum(n * b for n, b in zip(numels, w_bits)) / (total * ref_bits)


def linear_policy(w_bits, act_bits=ACT_BITS):
    """Our linear [w, a] pairs; the first layer's input stays unquantized (-1), as the
    search pins it."""
    return [[int(w), -1 if i == 0 else act_bits] for i, w in enumerate(w_bits)]


def bits_summary(w_bits):
    """'8x14 4x30 2x9': how many layers take each weight width, widest first."""
    counts = {b: list(w_bits).count(b) for b in set(w_bits)}
    return " ".join(f"{b}x{counts[b]}" for b in sorted(counts, reverse=True))


def mean_spread(values):
    """(mean, spread) of seed results; spread = max - min (0 for one value); None if empty."""
    vals = [v for v in values if v is not None]
    if not vals:
        return None
    return statistics.fmean(vals), max(vals) - min(vals)


def _fmt(value, digits=1):
    return "-" if value is None else f"{value:.{digits}f}"


def _fmt_ft(values):
    ms = mean_spread(values)
    if ms is None:
        return "-"
    if len(values) == 1:
        return _fmt(ms[0], 2)
    return f"{ms[0]:.2f} (spread {ms[1]:.2f}: {' / '.join(_fmt(v) for v in values)})"


TABLE_HEAD = ["budget", "allocator", "weight bits (layers per width)", "size ratio",
              "top-1 after quant., MCT's quantizer", "top-1 after quant., ours",
              "after the demo's fine-tune (mean; spread: seeds)",
              "allocation s, 1 thread (1-min load average after it)", "allocation CPU s"]


def format_table(rows):
    """The markdown table of the bench's rows (dicts as :func:`run_budget` makes them)."""
    lines = ["| " + " | ".join(TABLE_HEAD) + " |", "|" + "---|" * len(TABLE_HEAD)]
    for r in rows:
        cells = [f"{r['budget']:g}", r["allocator"], bits_summary(r["w_bits"]),
                 _fmt(r["size_ratio"], 4), _fmt(r["mct_quant_top1"]),
                 _fmt(r["ours_quant_top1"]), _fmt_ft(r["finetune_top1"]),
                 _fmt(r["alloc_seconds"]) + ("" if r.get("alloc_load") is None
                                             else f" (load {r['alloc_load']:.1f})"),
                 _fmt(r.get("alloc_cpu_seconds"))]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


# ------------------------------------------------------------------ MCT
def _cpu_seconds():
    """CPU seconds of this process and its waited-for children (MCT's solver, our CLIs): an
    allocation's cost that other jobs on a shared machine move less than its wall time."""
    own, kids = (resource.getrusage(who) for who in (resource.RUSAGE_SELF,
                                                      resource.RUSAGE_CHILDREN))
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


def _float_model():
    """The float MobileNet-V2 with the pretrained weights, and our layer names and sizes."""
    from lib.utils.layers import quantizable_layers
    from models import get_model, load_pretrained_weights
    model = get_model("mobilenetv2", **MODEL_KWARGS)
    load_pretrained_weights(model, "mobilenetv2", "mnist5k", os.path.join(ROOT, CKPT))
    layers = quantizable_layers(model, linear=False)
    return model.eval(), [n for n, _ in layers], [m.weight.numel() for _, m in layers]


def _loaders(calib_images, calib_batch):
    """(calibration batches from the train split without augmentation, test loader)."""
    import torch
    from lib.utils.data_utils import build_datasets
    train, test = build_datasets("mnist5k", train_transform=False)
    loader = torch.utils.data.DataLoader(train, batch_size=calib_batch, shuffle=False)
    batches = [x for _, (x, _y) in zip(range(-(-calib_images // calib_batch)), loader)]
    return batches, torch.utils.data.DataLoader(test, batch_size=500, shuffle=False)


def _top1(model, loader):
    import torch
    from lib.utils.train import evaluate
    return evaluate(model, loader, torch.nn.CrossEntropyLoss(), torch.device("cpu"),
                    progress=False)["top1"]


class _StdoutToFile:
    """Sends file descriptor 1 to a log file: MCT's MILP solver (CBC) prints its whole log on
    stdout, which is this bench's table."""

    def __init__(self, path):
        self.path = path

    def __enter__(self):
        sys.stdout.flush()
        self.saved = os.dup(1)
        self.log = open(self.path, "a")
        os.dup2(self.log.fileno(), 1)

    def __exit__(self, *exc):
        sys.stdout.flush()
        os.dup2(self.saved, 1)
        os.close(self.saved)
        self.log.close()


def _mct_platform(mct, bit_set):
    """MCT's IMX500 v1.0 platform ({8, 4, 2} weight options) or the same with ``bit_set``."""
    if tuple(bit_set) == MCT_BIT_SETS["8,4,2"]:
        return mct.get_target_platform_capabilities()
    from model_compression_toolkit.target_platform_capabilities.constants import (
        KERNEL_ATTR, WEIGHTS_N_BITS)
    from model_compression_toolkit.target_platform_capabilities.tpc_models.imx500_tpc.v1_0 import \
        tpc as imx500
    base, _, default = imx500.get_op_quantization_configs()
    options = [base if b == 8 else
               base.clone_and_edit(attr_to_edit={KERNEL_ATTR: {WEIGHTS_N_BITS: b}})
               for b in bit_set]
    return imx500.generate_tpc(default_config=default, base_config=base,
                               mixed_precision_cfg_list=options, name="imx500_tpc_2to8")


def _mct_bits(qmodel, names):
    """Weight bits of MCT's quantized model, in our layer order."""
    found = {n: int(m.weights_quantizers["weight"].num_bits) for n, m in qmodel.named_modules()
             if hasattr(m, "weights_quantizers") and "weight" in m.weights_quantizers}
    by_ours = {ours: found[m] for m, ours in map_layer_names(list(found), names).items()}
    if sorted(by_ours) != sorted(names):
        raise ValueError(f"MCT quantized {len(by_ours)} of our {len(names)} layers")
    return [by_ours[n] for n in names]


def run_mct(budget, bit_set, calib, log_path, policy=None):
    """MCT's mixed-precision PTQ at ``budget`` of the 8-bit weight memory (one thread).

    ``calib``: (representative images, their batch, mixed-precision images). ``policy``: our
    weight bits (layer order), each in ``bit_set``, that MCT then takes instead of searching
    (its ``configuration_overwrite``: per configurable layer in graph order, the index of the
    width among its options, widest first). Returns the weight bits (our layer order), size
    ratio, top-1 of the quantized model on the test split and the wall seconds of the PTQ call
    (statistics, sensitivity, MILP, quantization).
    """
    try:
        import model_compression_toolkit as mct
    except ImportError:
        raise UserError(INSTALL_HINT) from None
    import torch
    torch.set_num_threads(1)
    model, names, numels = _float_model()
    batches, test = _loaders(calib[0], calib[1])

    def data():
        for x in batches:
            yield [x]

    tpc = _mct_platform(mct, bit_set)
    overwrite = None if policy is None else [sorted(bit_set, reverse=True).index(b) for b in policy]
    config = mct.core.CoreConfig(mixed_precision_config=mct.core.MixedPrecisionQuantizationConfig(
        num_of_images=calib[2], configuration_overwrite=overwrite))
    log_bench.info("budget %g: MCT, widths %s%s", budget, bit_set,
                   "" if policy is None else ", our policy")
    with _StdoutToFile(log_path):
        full = mct.core.pytorch_resource_utilization_data(model, data, config,
                                                          target_platform_capabilities=tpc)
        start, cpu = time.perf_counter(), _cpu_seconds()
        qmodel, _ = mct.ptq.pytorch_post_training_quantization(
            model, data, target_resource_utilization=mct.core.ResourceUtilization(
                weights_memory=budget * full.weights_memory),
            core_config=config, target_platform_capabilities=tpc)
        seconds, cpu = time.perf_counter() - start, _cpu_seconds() - cpu
    w_bits = _mct_bits(qmodel, names)
    if policy is not None and w_bits != list(policy):
        raise ValueError("MCT did not take the given policy (its layer order differs from ours)")
    return {"w_bits": w_bits, "layers": names, "size_ratio": size_ratio(numels, w_bits),
            "own_quant_top1": _top1(qmodel, test), "alloc_seconds": seconds,
            "alloc_load": os.getloadavg()[0], "alloc_cpu_seconds": cpu,
            "weights_memory_8bit": float(full.weights_memory)}


# ------------------------------------------------------------------ ours
def _run(cmd, log_path):
    """Run one of our CLIs (stderr to ``log_path``); its stdout, or UserError on failure."""
    with open(log_path, "a") as log:
        log.write("$ " + shlex.join(cmd) + "\n")
        log.flush()
        done = subprocess.run(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=log, text=True)
    if done.returncode != 0:
        raise UserError(f"'{shlex.join(cmd[1:3])} ...' failed (exit {done.returncode}); "
                        f"see {log_path}")
    return done.stdout


def run_ours(budget, ours_args, folder, python):
    """Our ILP search at ``budget`` (one thread): its strategy dict and wall seconds."""
    cmd = [python, "rl_quantize.py", "--arch", "qmobilenetv2", "--linear_quantization",
           "--cost", "size", "--preserve_ratio", str(budget), "--min_bit", "2", "--max_bit", "8",
           "--method", "ilp", *SEARCH_DATA, "--threads", "1", "--output",
           os.path.join(folder, "ilp_search"), *ours_args]
    log_bench.info("budget %g: our ILP search", budget)
    start, cpu = time.perf_counter(), _cpu_seconds()
    out = _run(cmd, os.path.join(folder, "ilp_search.log"))
    seconds, cpu = time.perf_counter() - start, _cpu_seconds() - cpu
    path = out.strip().splitlines()[-1]
    with open(os.path.join(ROOT, path) if not os.path.isabs(path) else path) as f:
        return json.load(f), seconds, cpu


def strategy_with(template, w_bits, method, ratio):
    """``template`` (our search's strategy.json, whose quantizer options it keeps) with the
    weight bits ``w_bits``, activations at 8 bits and the search's score fields dropped."""
    out = {k: v for k, v in template.items()
           if k not in ("accuracy", "reward", "episode", "cost", "original_accuracy", "strategy")}
    out.update(strategy=linear_policy(w_bits), method=method, cost_ratio=round(ratio, 6))
    return out


def finetune(strategy_path, folder, seed, epochs, threads, python, ft_args=()):
    """The demo's fine-tune of one policy, one seed: (top-1 after quantization, best top-1).

    ``ft_args``: extra finetune.py flags (e.g. quantizer options over the strategy's); a
    finished run is reused only for the same policy, epochs and flags."""
    results, flags = os.path.join(folder, "results.json"), list(ft_args)
    if os.path.isfile(results):
        with open(results) as f:
            done = json.load(f)
        with open(strategy_path) as f:
            policy = json.load(f)["strategy"]
        if (done.get("policy") == policy and done.get("epochs") == epochs
                and done.get("bench_ft_args", []) == flags):
            return done["quant_top1"], done["best_top1"]
    log_bench.info("fine-tune %s, seed %d", os.path.basename(strategy_path), seed)
    _run([python, "finetune.py", "--strategy", strategy_path, "--epochs", str(epochs), *FT,
          "--manualSeed", str(seed), "--threads", str(threads), "-c", folder, *flags],
         folder.rstrip("/") + ".log")
    with open(results) as f:
        done = json.load(f)
    if flags:   # remembered beside finetune.py's own record, for the reuse check above
        atomic_write_json(results, dict(done, bench_ft_args=flags))
    return done["quant_top1"], done["best_top1"]


# ------------------------------------------------------------------ the comparison
def _cached(path, settings, make):
    """``make()``'s dict, stored at ``path`` with ``settings``; reused while they match."""
    if os.path.isfile(path):
        with open(path) as f:
            stored = json.load(f)
        if stored.get("settings") == settings:
            return stored["result"]
    result = make()
    atomic_write_json(path, {"settings": settings, "result": result})
    return result


def _timing(stage):
    """The allocation's wall seconds, CPU seconds and load of a (cached) stage's result."""
    return {"alloc_seconds": stage["alloc_seconds"],
            "alloc_cpu_seconds": stage.get("alloc_cpu_seconds"),
            "alloc_load": stage.get("alloc_load")}


def _mct_rows(budget, args, folder, ours_w):
    """MCT at each ``--mct-bits``: [(file tag, its bits, label, seconds, top-1 in its
    quantizer)], and our policy's top-1 in MCT's quantizer (None where no set fits it)."""
    calib = (args.calib_images, args.calib_batch, args.mp_images)
    out, in_mct = [], None
    for name in args.mct_bits:
        bit_set = MCT_BIT_SETS[name]
        tag = "mct" + name.replace(",", "").replace("..", "to")
        settings = {"budget": budget, "bits": list(bit_set), "calib_images": calib[0],
                    "calib_batch": calib[1], "mp_images": calib[2]}
        log = os.path.join(folder, f"{tag}.log")
        mct = _cached(os.path.join(folder, f"{tag}.json"), settings,
                      lambda: run_mct(budget, bit_set, calib, log))
        out.append((tag, mct["w_bits"], f"MCT {{{name}}}",
                    _timing(mct), mct["own_quant_top1"]))
        if in_mct is None and set(ours_w) <= set(bit_set):
            try:
                in_mct = _cached(os.path.join(folder, f"ours_in_{tag}.json"),
                                 dict(settings, policy=ours_w),
                                 lambda: run_mct(budget, bit_set, calib, log, policy=ours_w))
            except ValueError as exc:   # MCT's configurable layers in another order than ours
                log_bench.warning("our policy in MCT's quantizer: %s", exc)
            else:
                in_mct = in_mct["own_quant_top1"]
    return out, in_mct


def run_budget(budget, args, names, numels):
    """The rows of one budget: MCT at each ``--mct-bits``, then ours."""
    folder = os.path.join(args.out, f"budget_{budget:g}")
    os.makedirs(folder, exist_ok=True)
    ours_args = shlex.split(args.ours_args)

    def search():
        strategy, seconds, cpu = run_ours(budget, ours_args, folder, args.python)
        return {"strategy": strategy, "alloc_seconds": seconds, "alloc_load": os.getloadavg()[0],
                "alloc_cpu_seconds": cpu}

    ours = _cached(os.path.join(folder, "ours.json"), {"budget": budget, "ours_args": ours_args},
                   search)
    template = ours["strategy"]
    ours_w = [w for w, _a in template["strategy"]]
    if template["layers"] != names:
        raise ValueError("our search's layers differ from the float model's")
    policies, in_mct = _mct_rows(budget, args, folder, ours_w)
    policies.append(("ours", ours_w, "our ILP" + (f" {args.ours_args}" if ours_args else ""),
                     _timing(ours), in_mct))
    rows = []
    for tag, w_bits, label, timing, mct_top1 in policies:
        ratio = size_ratio(numels, w_bits)
        path = os.path.join(folder, f"{tag}_strategy.json")
        atomic_write_json(path, strategy_with(template, w_bits, tag, ratio))
        seeds = [FIRST_SEED + i for i in range(args.seeds)]
        runs = [finetune(path, os.path.join(folder, f"ft_{tag}_seed{seed}"), seed, args.epochs,
                         args.ft_threads, args.python, shlex.split(args.ft_args))
                for seed in seeds]
        rows.append({"budget": budget, "allocator": label, "layers": names, "w_bits": w_bits,
                     "size_ratio": ratio, "mct_quant_top1": mct_top1,
                     "ours_quant_top1": (mean_spread([q for q, _ in runs]) or [None])[0],
                     "finetune_top1": [b for _, b in runs], "finetune_seeds": seeds,
                     **timing})
    return rows


def _budget(text):
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not 0.0 < value <= 1.0:
        raise argparse.ArgumentTypeError(f"expected a share of the 8-bit weight size in (0, 1], "
                                         f"got '{text}'")
    return value


def _positive(text, least=1):
    if not text.isdigit() or int(text) < least:
        raise argparse.ArgumentTypeError(f"expected an integer >= {least}, got '{text}'")
    return int(text)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--budgets", type=_budget, nargs="+", default=[0.5, 0.375],
                   help="weights budgets as shares of the 8-bit weight size")
    p.add_argument("--mct-bits", choices=sorted(MCT_BIT_SETS), nargs="+", default=["8,4,2"],
                   help="MCT's weight width options, one MCT row each (its IMX500 platform: 8,4,2)")
    p.add_argument("--seeds", type=lambda t: _positive(t, 0), default=1,
                   help="fine-tune seeds per policy (0: allocate and time only)")
    p.add_argument("--epochs", type=_positive, default=2, help="fine-tune epochs (the demo's 2)")
    p.add_argument("--ours-args", default="",
                   help="extra rl_quantize.py flags of our search, one quoted string")
    p.add_argument("--out", default=os.path.join("outputs", "peer_bench"))
    p.add_argument("--calib-images", type=_positive, default=256,
                   help="MCT's representative images (train split, no augmentation)")
    p.add_argument("--calib-batch", type=_positive, default=32)
    p.add_argument("--mp-images", type=_positive, default=32,
                   help="MCT's mixed-precision sensitivity images (its default 32)")
    p.add_argument("--ft-threads", type=_positive, default=1, help="threads of each fine-tune")
    p.add_argument("--ft-args", default="",
                   help="extra finetune.py flags for every policy's fine-tune, MCT's included "
                        "(e.g. quantizer options over the ones our search recorded)")
    p.add_argument("--python", default=sys.executable, help="python that runs our CLIs")
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    args.out = os.path.abspath(args.out)
    try:
        import model_compression_toolkit  # noqa: F401
    except ImportError:
        raise UserError(INSTALL_HINT) from None
    if not os.path.isfile(os.path.join(ROOT, CKPT)):
        raise UserError(f"no pretrained checkpoint at {CKPT}; expected the embedded default's "
                        "(python pretrain.py --arch mobilenetv2 --dataset mnist5k)")
    _, names, numels = _float_model()
    rows = [row for budget in args.budgets for row in run_budget(budget, args, names, numels)]
    table = format_table(rows)
    command = "python bench/peer_bench.py " + shlex.join(argv if argv is not None else sys.argv[1:])
    stamp = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    os.makedirs(args.out, exist_ok=True)
    atomic_write_json(os.path.join(args.out, "peer_bench.json"),
                      {"command": command, "date": stamp, "rows": rows})
    atomic_write_text(os.path.join(args.out, "peer_bench.md"),
                      f"`{command}` ({stamp})\n\n{table}\n")
    print(table)


if __name__ == "__main__":
    from lib.utils.errors import run_cli
    run_cli(main)
