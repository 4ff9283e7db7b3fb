"""Output folders and files of the CLIs (issue 16 items 2, 8, 9 and 10's --plot).

Fine-tune runs never overwrite one another, runs that would produce nothing are refused,
output paths are checked before any work, and the remaining bad arguments (strategy
fields, deep JSON, agent files, make_data, the simulator's --plot) are one-line errors.
"""
import json
import os
import re

import pytest
import torch

import finetune
import pretrain
import rl_quantize
from lib.report import __main__ as report_cli
from lib.simulator import __main__ as simulator_cli
from lib.utils import make_data
from lib.utils.checkpoint import load_checkpoint, save_checkpoint
from lib.utils.errors import run_cli
from lib.utils.layers import quantizable_layers

TINY = ["--width_mult", "0.25", "--train_subset", "32", "--train_batch", "16", "--test_batch", "32",
        "--device", "cpu", "--no-progress", "--epochs", "1", "--no-eval_fp32"]


@pytest.fixture(scope="module")
def policies(tmp_path_factory, tiny_pretrained):
    """Two different K-Means policies for the tiny MobileNet-V2 of conftest."""
    root = tmp_path_factory.mktemp("policies")
    weights, model = tiny_pretrained
    names = [n for n, _ in quantizable_layers(model)]
    paths = {}
    for key, bits in (("a", [5, 3]), ("b", [4, 6])):
        path = root / f"{key}.json"
        path.write_text(json.dumps({"mode": "kmeans", "layers": names,
                                    "strategy": [bits[i % 2] for i in range(len(names))]}))
        paths[key] = str(path)
    return {"weights": weights, "names": names, **paths}


def _one_line_error(capsys, main, argv):
    """Run a CLI in-process; return its single 'error:' line (asserting exit != 0, no traceback)."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as exc:
        run_cli(main, argv)
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.startswith("error:")]
    assert exc.value.code not in (0, None) and len(lines) == 1, err
    assert "Traceback" not in err and err.strip().splitlines()[-1] == lines[0]
    return lines[0]


def _ft(policies, strategy, *extra):
    return ["--strategy", policies[strategy], "--pretrained_path", policies["weights"]] + TINY + \
        list(extra)


def _policy_of(path):
    return load_checkpoint(path)["policy"]["strategy"]


def _strategy_bits(policies, key):
    return json.load(open(policies[key]))["strategy"]


# ------------------------------------------------------------------ item 2: no lost results
def test_two_finetunes_with_the_default_folder_keep_both_bests(policies, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    finetune.main(_ft(policies, "a"))
    finetune.main(_ft(policies, "b"))
    runs = sorted(os.listdir(tmp_path / "checkpoints"))
    assert runs == ["mobilenetv2_mnist5k_kmeans_finetune-run1",
                    "mobilenetv2_mnist5k_kmeans_finetune-run2"]
    for run, key in zip(runs, "ab"):
        folder = tmp_path / "checkpoints" / run
        assert _policy_of(folder / "model_best.pth.tar") == _strategy_bits(policies, key)
        assert json.load(open(folder / "results.json"))["strategy_source"] == policies[key]

    # a resume without -c continues in the checkpoint's own folder, no new run folder
    run1 = tmp_path / "checkpoints" / runs[0]
    finetune.main(["--resume", str(run1 / "checkpoint.pth.tar")] + TINY[:-3] + ["--epochs", "2"])
    assert sorted(os.listdir(tmp_path / "checkpoints")) == runs
    ck = load_checkpoint(run1 / "checkpoint.pth.tar")
    assert ck["epoch"] == 2 and ck["policy"]["strategy"] == _strategy_bits(policies, "a")
    epochs = [ln.split("\t")[0] for ln in open(run1 / "log.txt").read().splitlines()[1:]]
    assert epochs == ["0", "1", "2"]


def test_a_folder_with_another_runs_results_is_refused_unless_overwrite(policies, tmp_path,
                                                                         capsys):
    out = str(tmp_path / "ft")
    finetune.main(_ft(policies, "a", "-c", out))
    best = os.path.join(out, "model_best.pth.tar")
    before = open(best, "rb").read()
    err = _one_line_error(capsys, finetune.main, _ft(policies, "b", "-c", out))
    assert "--overwrite" in err and out in err
    assert open(best, "rb").read() == before          # untouched, policy a inside
    assert _policy_of(best) == _strategy_bits(policies, "a")

    finetune.main(_ft(policies, "b", "-c", out, "--overwrite"))
    assert _policy_of(best) == _strategy_bits(policies, "b")
    rows = open(os.path.join(out, "log.txt")).read().splitlines()
    assert [r.split("\t")[0] for r in rows[1:]] == ["0", "1"]   # only the new run's rows
    events = [f for f in os.listdir(out) if f.startswith("events.out.tfevents")]
    assert len(events) == 1                                   # the old run's events are gone


# ------------------------------------------------------------------ item 8: no empty successes
def test_runs_that_would_train_nothing_are_refused(policies, tmp_path, capsys):
    out = str(tmp_path / "ft")
    assert "--epochs" in _one_line_error(capsys, finetune.main,
                                         _ft(policies, "a", "-c", out, "--epochs", "0"))
    err = _one_line_error(capsys, finetune.main,
                          _ft(policies, "a", "-c", out, "--start_epoch", "1"))
    assert "--start_epoch" in err
    assert not os.path.exists(out)
    finetune.main(_ft(policies, "a", "-c", out))
    ckpt = os.path.join(out, "checkpoint.pth.tar")
    stamp = os.stat(ckpt).st_mtime_ns
    err = _one_line_error(capsys, finetune.main, ["--resume", ckpt] + TINY)   # epoch 1 of 1
    assert "already trained 1 epochs" in err and os.stat(ckpt).st_mtime_ns == stamp
    for flag in ("--epochs", "--train_subset"):
        err = _one_line_error(capsys, pretrain.main,
                              ["--output", str(tmp_path / "p.pth.tar"), flag, "0"])
        assert flag in err
    assert not os.path.exists(tmp_path / "p.pth.tar") and not os.path.exists(tmp_path / "p_log")
    # pretrain --resume of a run that has already reached --epochs: refused, file untouched
    out = str(tmp_path / "p.pth.tar")
    small = ["--output", out, "--train_subset", "32", "--epochs", "1", "--width_mult", "0.25",
             "--device", "cpu", "--no-progress"]
    pretrain.main(small)
    stamp = os.stat(out).st_mtime_ns
    assert "already trained 1 epochs" in _one_line_error(capsys, pretrain.main, small + ["--resume"])
    assert os.stat(out).st_mtime_ns == stamp and load_checkpoint(out)["epoch"] == 1


def test_output_paths_are_checked_before_any_work(policies, tmp_path, capsys):
    a_file = tmp_path / "file"
    a_file.write_text("x")
    folder = tmp_path / "folder"
    folder.mkdir()
    # pretrain: --output a folder (used to fail after a whole epoch), or under a file
    for bad in (str(folder), str(folder) + "/", str(a_file / "m.pth.tar")):
        err = _one_line_error(capsys, pretrain.main, ["--output", bad, "--train_subset", "32",
                                                      "--device", "cpu", "--no-progress"])
        assert "--output" in err
    assert os.listdir(folder) == []
    assert "-c/--checkpoint" in _one_line_error(capsys, finetune.main,
                                                _ft(policies, "a", "-c", str(a_file)))
    assert "--output" in _one_line_error(
        capsys, rl_quantize.main, ["--dataset", "mnist5k", "--output", str(a_file / "x")])
    assert "--plot" in _one_line_error(
        capsys, simulator_cli.main, ["--arch", "mobilenetv2", "--hardware", "bismo_edge",
                                     "--dataset", "mnist5k", "--cache_dir", str(tmp_path / "c"),
                                     "--plot", str(folder)])
    assert "--cache_dir" in _one_line_error(
        capsys, simulator_cli.main, ["--arch", "mobilenetv2", "--hardware", "bismo_edge",
                                     "--cache_dir", str(a_file)])
    assert sorted(os.listdir(tmp_path)) == ["file", "folder"]


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_read_only_output_folder_is_refused(policies, tmp_path, capsys):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        err = _one_line_error(capsys, finetune.main, _ft(policies, "a", "-c", str(ro / "ft")))
        assert "not writable" in err
    finally:
        ro.chmod(0o755)


def test_summary_never_overwrites_its_input(tmp_path, capsys):
    strategy = tmp_path / "strategy.json"
    content = json.dumps({"arch": "mobilenetv2", "mode": "kmeans", "metric": "size",
                          "preserve_ratio": 0.1, "dataset": "mnist5k", "width_mult": 0.25,
                          "strategy": [4] * 53})
    strategy.write_text(content)
    link = tmp_path / "alias.json"
    link.symlink_to(strategy)
    for out in (str(strategy), str(tmp_path / "." / "strategy.json"), str(link)):
        err = _one_line_error(capsys, report_cli.main, ["uniform", str(strategy), out])
        assert "is the input" in err
    assert strategy.read_text() == content
    out = tmp_path / "uniform.json"
    report_cli.main(["uniform", str(strategy), str(out)])
    assert json.load(open(out))["uniform_bits"] == 3


# ------------------------------------------------------------------ item 9: the rest
@pytest.mark.parametrize("field,value", [("mode", 5), ("mode", "fast"), ("arch", 3),
                                         ("arch", ["mobilenetv2"]), ("width_mult", "half"),
                                         ("width_mult", -1), ("dataset", {}),
                                         ("preserve_ratio", 2)])
def test_wrong_typed_strategy_fields(policies, tmp_path, capsys, field, value):
    data = json.load(open(policies["a"]))
    data[field] = value
    path = tmp_path / "s.json"
    path.write_text(json.dumps(data))
    err = _one_line_error(capsys, finetune.main, ["--strategy", str(path), "-c",
                                                  str(tmp_path / "out")] + TINY)
    assert f"'{field}'" in err and "expected" in err
    assert not os.path.exists(tmp_path / "out")


def test_deeply_nested_json(tmp_path, capsys):
    path = tmp_path / "deep.json"
    path.write_text("[" * 200000 + "]" * 200000)
    err = _one_line_error(capsys, finetune.main, ["--strategy", str(path), "-c",
                                                  str(tmp_path / "out")] + TINY)
    assert "nested too deeply" in err
    err = _one_line_error(capsys, report_cli.main, ["uniform", str(path), str(tmp_path / "u.json")])
    assert "nested too deeply" in err
    assert sorted(os.listdir(tmp_path)) == ["deep.json"]


def test_agent_resume_file_that_does_not_fit(tmp_path, capsys, tiny_pretrained):
    out = tmp_path / "out"
    base = ["--dataset", "mnist5k", "--width_mult", "0.25", "--train_size", "32", "--val_size",
            "32", "--data_bsize", "32", "--n_worker", "0", "--train_episode", "1", "--warmup", "1",
            "--pretrained_path", tiny_pretrained[0], "--output", str(out), "--device", "cpu"]
    wrong_shape = tmp_path / "shape.pth.tar"
    save_checkpoint({"actor": {"fc1.weight": torch.zeros(3, 3)},
                     "critic": {"fc1.weight": torch.zeros(3, 3)}}, str(wrong_shape))
    no_keys = tmp_path / "keys.pth.tar"
    save_checkpoint({"state_dict": {"w": torch.zeros(1)}}, str(no_keys))
    for path in (wrong_shape, no_keys):
        err = _one_line_error(capsys, rl_quantize.main, base + ["--resume", str(path)])
        assert "--resume" in err and "expected agent.pth.tar" in err
    assert not out.exists()


def test_make_data_bad_arguments(tmp_path, capsys):
    src = tmp_path / "imagenet"
    for split in ("train", "val"):
        (src / split / "n00000001").mkdir(parents=True)
    classes = tmp_path / "classes.txt"
    a_file = tmp_path / "file"
    a_file.write_text("x")
    cases = [("n00000001\n../../etc\n", str(tmp_path / "d1"), "WordNet id"),
             ("", str(tmp_path / "d2"), "no ids"),
             ("n00000001\nn00000001\n", str(tmp_path / "d3"), "twice"),
             ("n00000001\n", str(a_file), "is a file"),
             ("n00000001\n", str(a_file / "sub"), "is a file"),
             ("n00000001\n", str(src), "is --src"),
             # the second class is missing: refused before any link is made
             ("n00000001\nn00000002\n", str(tmp_path / "d4"), "n00000002")]
    for text, dst, expect in cases:
        classes.write_text(text)
        err = _one_line_error(capsys, make_data.main, ["--src", str(src), "--dst", dst,
                                                       "--classes", str(classes)])
        assert expect in err, (text, dst, err)
    assert sorted(os.listdir(tmp_path)) == ["classes.txt", "file", "imagenet"]
    classes.write_bytes(b"\xff\xfe\x00n0")
    assert "could not be read" in _one_line_error(
        capsys, make_data.main, ["--src", str(src), "--dst", str(tmp_path / "d5"),
                                 "--classes", str(classes)])
    classes.write_text("n00000001\n")
    assert make_data.main(["--src", str(src), "--dst", str(tmp_path / "d6"),
                           "--classes", str(classes)]) == 2
    assert os.readlink(tmp_path / "d6" / "val" / "n00000001") == str(src / "val" / "n00000001")


def test_plot_reports_the_file_it_wrote(tmp_path, capsys):
    base = ["--arch", "mobilenetv2", "--hardware", "bismo_edge", "--dataset", "mnist5k",
            "--width_mult", "0.25", "--cache_dir", str(tmp_path / "cache")]
    # a path the PNG writer would have renamed (plot -> plot.png) is refused up front
    assert "--plot" in _one_line_error(capsys, simulator_cli.main,
                                       base + ["--plot", str(tmp_path / "plot")])
    assert not list(tmp_path.glob("plot*"))
    simulator_cli.main(base + ["--plot", str(tmp_path / "costs.png")])
    reported = re.findall(r"^plot: (.+)$", capsys.readouterr().out, re.M)
    assert reported == [str(tmp_path / "costs.png")]
    with open(reported[0], "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"


def test_make_data_never_writes_inside_its_source(tmp_path, capsys):
    """A --dst under --src (or above it) is refused: the source's class folders stay as they were."""
    src = tmp_path / "imagenet"
    for split in ("train", "val"):
        (src / split / "n00000001").mkdir(parents=True)
    classes = tmp_path / "classes.txt"
    classes.write_text("n00000001\n")
    before = sorted(p.relative_to(src).as_posix() for p in src.rglob("*"))
    for dst in (src / "train" / "subset", src / "subset", tmp_path):
        err = _one_line_error(capsys, make_data.main, ["--src", str(src), "--dst", str(dst),
                                                       "--classes", str(classes)])
        assert "one inside the other" in err, (dst, err)
        assert sorted(p.relative_to(src).as_posix() for p in src.rglob("*")) == before
    classes.write_text("[" * 5000 + "\n")   # the message quotes at most 40 characters of it
    err = _one_line_error(capsys, make_data.main, ["--src", str(src), "--dst",
                                                   str(tmp_path / "d"), "--classes", str(classes)])
    assert "WordNet id" in err and len(err) < 300
