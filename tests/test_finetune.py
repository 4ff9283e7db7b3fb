"""finetune.py: K-Means and linear fine-tuning, checkpoints, --evaluate, bad input, torchrun."""
import json
import math
import os
import re
import subprocess
import sys

import pytest
import torch

import finetune
from lib.utils.checkpoint import load_checkpoint
from lib.utils.errors import run_cli
from lib.utils.layers import quantizable_layers
from lib.utils.lr_schedule import make_lr_schedule

TINY = ["--width_mult", "0.25", "--train_subset", "32", "--train_batch", "16",
        "--test_batch", "32", "--device", "cpu", "--no-progress", "--lr", "0.01"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, tiny_pretrained):
    """The tiny 'pretrained' MobileNet-V2 (conftest) and two policies for it."""
    root = tmp_path_factory.mktemp("finetune")
    weights, model = tiny_pretrained
    names = [n for n, _ in quantizable_layers(model)]
    kmeans = {"mode": "kmeans", "layers": names, "strategy": [(2, 3, 7)[i % 3] for i in range(len(names))]}
    linear = {"mode": "linear", "layers": names,
              "strategy": [[8, -1]] + [[4, 4]] * (len(names) - 2) + [[8, 8]]}
    paths = {}
    for key, obj in (("kmeans", kmeans), ("linear", linear)):
        paths[key] = str(root / f"{key}.json")
        with open(paths[key], "w") as f:
            json.dump(obj, f)
    return {"root": root, "weights": weights, "names": names, **paths}


def _logged_top1(folder):
    rows = [line.split("\t") for line in open(os.path.join(folder, "log.txt")).read().splitlines()]
    assert rows[0][0] == "epoch"
    return {int(r[0]): float(r[5]) for r in rows[1:]}


def test_lr_schedules():
    cos = make_lr_schedule("cos", 0.1, epochs=10, warmup_epoch=2)
    assert cos(0.0) < 1e-4 and cos(1.0) == pytest.approx(0.05, rel=1e-3)
    assert cos(2.0) == pytest.approx(0.1) and cos(6.0) == pytest.approx(0.05) and cos(10.0) < 1e-12
    step = make_lr_schedule("step", 0.1, 10, gamma=0.1, schedule=[3, 6])
    assert [round(step(e), 6) for e in (0, 2.9, 3, 5.5, 6, 9)] == [0.1, 0.1, 0.01, 0.01, 0.001, 0.001]
    exp = make_lr_schedule("exp", 0.1, 10, gamma=0.5)
    assert exp(0.5) == 0.1 and exp(2.2) == pytest.approx(0.025)
    assert make_lr_schedule("fixed", 0.1, 10)(7.3) == 0.1


def test_kmeans_checkpoint_has_shared_weights_and_evaluate_reproduces(tiny):
    """Issue item 2: <= 2^b values per layer in the saved file; -e reproduces the logged top1."""
    out = str(tiny["root"] / "km")
    args = ["--strategy", tiny["kmeans"], "--pretrained_path", tiny["weights"], "-c", out,
            "--epochs", "2"] + TINY
    res = finetune.main(args + ["--epochs", "1"])   # free_high_bit: 7-bit layers clustered now
    assert res["quant_top1"] is not None and res["fp32_top1"] is not None
    finetune.main(args + ["--resume", os.path.join(out, "checkpoint.pth.tar")])
    ck = load_checkpoint(os.path.join(out, "checkpoint.pth.tar"))
    assert ck["epoch"] == 2 and ck["mode"] == "kmeans" and ck["policy"]["layers"] == tiny["names"]
    for name, bits in zip(ck["policy"]["layers"], ck["policy"]["strategy"]):
        values = ck["state_dict"][name + ".weight"].unique().numel()
        assert values <= 2 ** bits, (name, bits, values)
        cb = ck["codebooks"][name]
        assert torch.equal(cb["centroids"][cb["labels"].long()],
                           ck["state_dict"][name + ".weight"].flatten())
    logged = _logged_top1(out)
    assert sorted(logged) == [0, 1, 2] and logged[0] == pytest.approx(res["quant_top1"], abs=1e-6)
    best = load_checkpoint(os.path.join(out, "model_best.pth.tar"))
    va = finetune.main(["-e", "--resume", os.path.join(out, "model_best.pth.tar"),
                        "--device", "cpu", "--no-progress", "--test_batch", "32"])
    assert va["top1"] == best["acc"] == best["best_acc"]
    assert round(va["top1"], 6) == logged[best["epoch"]]
    results = json.load(open(os.path.join(out, "results.json")))
    assert results["best_top1"] == best["acc"] and results["quant_top1"] == res["quant_top1"]


def test_channels_last_finetune_keeps_codebooks_and_matches_contiguous(tiny):
    """--channels_last: the saved K-Means weights still equal centroids[labels] in row-major
    order, the accuracies are those of the contiguous run (up to a flipped image), and the
    checkpoint evaluates the same in a contiguous model."""
    runs = {}
    for flag in ([], ["--channels_last"]):
        out = str(tiny["root"] / ("km_cl" if flag else "km_plain"))
        runs[bool(flag)] = (out, finetune.main(["--strategy", tiny["kmeans"], "--pretrained_path",
                                                 tiny["weights"], "-c", out, "--epochs", "1"]
                                                + TINY + flag))
    out, res = runs[True]
    assert res["best_top1"] == pytest.approx(runs[False][1]["best_top1"], abs=100 / 32 + 1e-9)
    ck = load_checkpoint(os.path.join(out, "checkpoint.pth.tar"))
    for name, bits in zip(ck["policy"]["layers"], ck["policy"]["strategy"]):
        weight, cb = ck["state_dict"][name + ".weight"], ck["codebooks"][name]
        assert weight.unique().numel() <= 2 ** bits
        assert torch.equal(cb["centroids"][cb["labels"].long()], weight.flatten())
    va = finetune.main(["-e", "--resume", os.path.join(out, "checkpoint.pth.tar"),
                        "--device", "cpu", "--no-progress", "--test_batch", "32"])
    assert va["top1"] == pytest.approx(ck["acc"], abs=100 / 32 + 1e-9)


def test_linear_finetune_and_evaluate(tiny):
    out = str(tiny["root"] / "lin")
    res = finetune.main(["--strategy", tiny["linear"], "--pretrained_path", tiny["weights"],
                         "-c", out, "--epochs", "1", "--no-eval_fp32"] + TINY)
    assert res["fp32_top1"] is None and res["mode"] == "linear" and res["arch"] == "qmobilenetv2"
    ck = load_checkpoint(os.path.join(out, "checkpoint.pth.tar"))
    sd = ck["state_dict"]
    assert ck["policy"]["strategy"][0] == [8, -1] and ck["codebooks"] is None
    assert sd["features.1.conv.0.activation_range"].shape == (1,)
    assert float(sd["features.1.conv.0.weight_range"]) > 0   # calibrated, saved with the weights
    va = finetune.main(["-e", "--resume", os.path.join(out, "checkpoint.pth.tar"),
                        "--device", "cpu", "--no-progress", "--test_batch", "32"])
    assert va["top1"] == ck["acc"] == _logged_top1(out)[1]
    half = finetune.main(["-e", "--resume", os.path.join(out, "checkpoint.pth.tar"), "--half",
                          "--device", "cpu", "--no-progress", "--test_batch", "32"])
    assert math.isfinite(half["loss"])


def _bad_policy_file(tiny, tmp_path, kind):
    names = tiny["names"]
    policy = {"mode": "kmeans", "layers": list(names), "strategy": [4] * len(names)}
    if kind == "length":
        policy["strategy"] = policy["strategy"][:-1]
    elif kind == "name":
        policy["layers"][3] = "features.99.conv"
    elif kind in ("bit0", "bit9"):
        policy["strategy"][5] = int(kind[-1])
    path = tmp_path / f"{kind}.json"
    path.write_text("{\"mode\": \"kmeans\", \"strategy\": [4, 4," if kind == "json"
                    else json.dumps(policy))
    return str(path)


@pytest.mark.parametrize("kind, expected", [
    ("length", "has 52 entries; expected 53"),
    ("name", "layer 3 is 'features.99.conv' \\(an unknown layer\\)"),
    ("bit0", "bit width 0 is out of range"),
    ("bit9", "bit width 9 is out of range"),
    ("json", "is not valid JSON"),
    ("resume", "checkpoint '.*missing.pth.tar' not found"),
    ("pretrained", "pretrained weights '.*nowhere.pth.tar' not found; train one with"),
    ("nothing", "expected --strategy PATH\\|PRESET"),
])
def test_bad_input_is_one_line_error(tiny, tmp_path, capsys, kind, expected):
    """Issue item 4 (in-process through run_cli, the CLI's own wrapper)."""
    args = ["--pretrained_path", tiny["weights"], "-c", str(tmp_path / "out")] + TINY
    if kind == "resume":
        args += ["--resume", str(tmp_path / "missing.pth.tar"), "--strategy", tiny["kmeans"]]
    elif kind == "pretrained":
        args += ["--strategy", tiny["kmeans"], "--pretrained_path", str(tmp_path / "nowhere.pth.tar")]
    elif kind != "nothing":
        args += ["--strategy", _bad_policy_file(tiny, tmp_path, kind)]
    with pytest.raises(SystemExit) as exit_info:
        run_cli(finetune.main, args)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()   # INFO log lines may precede it
    errors = [line for line in err if line.startswith("error: ")]
    assert len(errors) == 1 and err[-1] == errors[0] and "Traceback" not in "\n".join(err)
    assert re.search(expected, errors[0]), errors[0]
    assert not os.path.exists(tmp_path / "out" / "checkpoint.pth.tar")


def test_cli_exit_status(repo_root, tmp_path):
    """The same through a real process: one stderr line, exit status 2, no traceback."""
    bad = tmp_path / "bad.json"
    bad.write_text("[[8, -1], [4, 4]")
    r = subprocess.run([sys.executable, "finetune.py", "--strategy", str(bad), "--device", "cpu"],
                       cwd=repo_root, capture_output=True, text=True, timeout=120,
                       env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert r.returncode == 2
    assert r.stderr.strip().splitlines()[-1].startswith("error: strategy file")
    assert "Traceback" not in r.stderr


@pytest.mark.slow
def test_torchrun_two_process_gloo(repo_root, tiny, tmp_path):
    """Issue item 3: two CPU processes (gloo) fine-tune and rank 0 writes one checkpoint."""
    out = tmp_path / "ddp"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                        "--master_port", "29531", "finetune.py", "--strategy", tiny["kmeans"],
                        "--pretrained_path", tiny["weights"], "-c", str(out), "--epochs", "1"]
                       + TINY, cwd=repo_root, capture_output=True, text=True, timeout=600, env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "2 process(es) on cpu" in r.stderr
    files = sorted(f for f in os.listdir(out) if not f.startswith("events."))
    assert files == ["checkpoint.pth.tar", "log.txt", "model_best.pth.tar", "results.json"]
    ck = load_checkpoint(str(out / "checkpoint.pth.tar"))
    assert ck["epoch"] == 1 and not any(k.startswith("module.") for k in ck["state_dict"])
    for name, bits in zip(ck["policy"]["layers"], ck["policy"]["strategy"]):
        assert ck["state_dict"][name + ".weight"].unique().numel() <= 2 ** bits
