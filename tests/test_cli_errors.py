"""Bad input across every CLI: one line on stderr, a non-zero exit, no half-written file.

The CLIs run in-process through ``run_cli`` (the same path ``python X.py`` takes) so the
table stays fast; tests/test_data.py and others also run a few as real subprocesses.
"""
import json
import os

import numpy as np
import pytest

import finetune
import pretrain
import rl_quantize
from lib.report import __main__ as report_cli
from lib.simulator import __main__ as simulator_cli
from lib.utils.errors import run_cli

SMALL = ["--dataset", "mnist5k", "--width_mult", "0.25", "--train_size", "64", "--val_size", "64",
         "--data_bsize", "32", "--n_worker", "0", "--train_episode", "1", "--warmup", "1"]


@pytest.fixture(scope="module")
def ckpt(tiny_pretrained):
    return tiny_pretrained[0]


def _strategy(tmp_path, content):
    path = tmp_path / f"s{len(list(tmp_path.glob('s*.json')))}.json"
    path.write_text(content if isinstance(content, str) else json.dumps(content))
    return str(path)


def _cases(tmp_path, ckpt):
    out = str(tmp_path / "out")
    search = SMALL + ["--pretrained_path", ckpt, "--output", out]
    linear = ["--arch", "qmobilenetv2", "--linear_quantization"]
    bad_table = str(tmp_path / "t.npy")
    np.save(bad_table, np.ones((3, 8, 8)))
    names = [f"l{i}" for i in range(53)]
    ok_policy = {"mode": "kmeans", "arch": "mobilenetv2", "dataset": "mnist5k", "width_mult": 0.25}
    ft = ["--width_mult", "0.25", "--pretrained_path", ckpt, "--epochs", "1", "-c", out,
          "--data_name", "mnist5k", "--no-progress"]
    return [
        ("rl: unknown arch", rl_quantize.main, ["--arch", "nope"] + search, "arch"),
        ("rl: missing dataset", rl_quantize.main,
         ["--dataset_root", str(tmp_path / "none")] + search[2:] + ["--dataset", "imagenet"],
         "not found"),
        ("rl: unreachable budget", rl_quantize.main,
         linear + search + ["--preserve_ratio", "0.01", "--min_bit", "2"], "unreachable"),
        ("rl: wrong cost table", rl_quantize.main, linear + search + ["--cost_table", bad_table],
         "(53, 8, 8)"),
        ("rl: junk boolean", rl_quantize.main, search + ["--finetune_flag", "maybe"], "boolean"),
        ("rl: latency without linear", rl_quantize.main, search + ["--cost", "latency"], "size"),
        ("rl: missing pretrained", rl_quantize.main,
         SMALL + ["--pretrained_path", str(tmp_path / "no.pth.tar"), "--output", out], "not found"),
        ("ft: missing strategy file", finetune.main, ft + ["--strategy", str(tmp_path / "x.json")],
         "x.json"),
        ("ft: malformed json", finetune.main, ft + ["--strategy", _strategy(tmp_path, "{oops")],
         "JSON"),
        ("ft: wrong length", finetune.main,
         ft + ["--strategy", _strategy(tmp_path, dict(ok_policy, strategy=[4] * 52))], "53"),
        ("ft: bit 9", finetune.main,
         ft + ["--strategy", _strategy(tmp_path, dict(ok_policy, strategy=[4] * 52 + [9]))], "9"),
        ("ft: bit 0", finetune.main,
         ft + ["--strategy", _strategy(tmp_path, dict(ok_policy, strategy=[0] + [4] * 52))], "0"),
        ("ft: unknown layer", finetune.main,
         ft + ["--strategy", _strategy(tmp_path, dict(ok_policy, strategy=[4] * 53, layers=names))],
         "l0"),
        ("ft: missing checkpoint", finetune.main,
         ["-e", "--resume", str(tmp_path / "gone.pth.tar"), "-c", out], "gone.pth.tar"),
        ("pretrain: unknown dataset", pretrain.main,
         ["--dataset", "nosuch", "--output", str(tmp_path / "out" / "p.pth.tar")], "nosuch"),
        ("pretrain: resume nothing", pretrain.main,
         ["--resume", "--output", str(tmp_path / "out" / "p.pth.tar")], "--resume"),
        ("pretrain: bad device", pretrain.main, ["--device", "tpu"], "device"),
        ("sim: unknown hardware", simulator_cli.main,
         ["--arch", "mobilenetv2", "--dataset", "mnist5k", "--hardware", "tpu", "--metric", "latency"],
         "tpu"),
        ("sim: bismo energy", simulator_cli.main,
         ["--arch", "mobilenetv2", "--dataset", "mnist5k", "--hardware", "bismo_edge", "--metric",
          "energy", "--no_plot"], "energy"),
        ("sim: unknown arch", simulator_cli.main,
         ["--arch", "nope", "--dataset", "mnist5k", "--hardware", "bismo_edge", "--metric", "latency",
          "--no_plot"], "nope"),
        ("summary: missing demo folder", report_cli.main, ["report", str(tmp_path / "nodemo")], "nodemo"),
    ]


def test_at_least_fifteen_cases(tmp_path, ckpt):
    cases = _cases(tmp_path, ckpt)
    assert len(cases) >= 15
    assert {c[1] for c in cases} >= {rl_quantize.main, finetune.main, pretrain.main,
                                      simulator_cli.main}


@pytest.mark.parametrize("index", range(21))
def test_bad_input_is_one_line_error(index, tmp_path, ckpt, capsys):
    name, main, argv, expect = _cases(tmp_path, ckpt)[index]
    capsys.readouterr()
    with pytest.raises(SystemExit) as exc:
        run_cli(main, argv)
    assert exc.value.code not in (0, None), name
    err = capsys.readouterr().err.strip().splitlines()
    # Progress logging may come first; the error itself is exactly one line, the last.
    errors = [line for line in err if line.startswith("error:")]
    assert len(errors) == 1 and err[-1] == errors[0], (name, err)
    assert "Traceback" not in "\n".join(err), name
    assert expect.lower() in errors[0].lower(), (name, errors[0])
    # Nothing half-written: no temp files anywhere, no checkpoint or strategy in the output.
    for root, _, files in os.walk(tmp_path):
        assert not [f for f in files if f.startswith(".tmp-") or f.endswith(".tmp")], (name, files)
        assert not [f for f in files if f.endswith(".pth.tar") or f == "strategy.json"], (name, files)
