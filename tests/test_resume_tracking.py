"""Resuming never mixes cost models or repeats work.

- a search records its user cost table (path + sha256) in its state and strategy.json, refuses a
  resume under another table, and the summary costs its policy with the recorded table;
- strategy.json is strict JSON (a NaN becomes null);
- a search killed in its first episode resumes; finetune.py resumed from a checkpoint logs each
  epoch once.
"""
import hashlib
import json
import math
import os

import numpy as np
import pytest

import finetune
import rl_quantize
from lib.report.uniform import cost_model_for
from lib.utils.strategy import strategy_record
from lib.utils.checkpoint import load_checkpoint
from lib.utils.errors import UserError, run_cli
from lib.utils.layers import quantizable_layers


@pytest.fixture(scope="module")
def tables(tmp_path_factory):
    d = tmp_path_factory.mktemp("tables")
    base = np.linspace(1, 5, 53)[:, None, None] * np.outer(np.arange(1, 9), np.arange(1, 9))[None]
    paths = {}
    for name, table in (("a", base), ("b", base ** 1.5)):
        paths[name] = str(d / f"{name}.npy")
        np.save(paths[name], table)
    return paths


def _argv(weights, out, episodes=3):
    return ["--dataset", "mnist5k", "--width_mult", "0.25", "--pretrained_path", weights,
            "--train_size", "32", "--val_size", "32", "--data_bsize", "32", "--n_worker", "0",
            "--warmup", "1", "--train_episode", str(episodes), "--output", str(out), "--seed", "1"]


def _linear(weights, out, table, episodes=1):
    argv = _argv(weights, out, episodes) + ["--arch", "qmobilenetv2", "--linear_quantization",
                                            "--preserve_ratio", "0.5", "--min_bit", "5"]
    return argv + (["--cost_table", table] if table else [])


def _only_run(out):
    (d,) = os.listdir(out)
    return os.path.join(out, d)


def _log_rows(folder):
    """log.txt's lines without the episode's wall time, the one column that differs between runs."""
    with open(os.path.join(folder, "log.txt")) as f:
        rows = [ln.split("\t") for ln in f.read().splitlines()]
    drop = rows[0].index("seconds")
    return ["\t".join(r[:drop] + r[drop + 1:]) for r in rows]


def _sha256(path):
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def test_search_records_its_cost_table_and_refuses_another(tiny_pretrained, tables, tmp_path,
                                                           capsys):
    weights = tiny_pretrained[0]
    rl_quantize.main(_linear(weights, tmp_path, tables["a"]))
    folder = _only_run(tmp_path)
    record = {"path": os.path.abspath(tables["a"]), "sha256": _sha256(tables["a"])}
    with open(os.path.join(folder, "strategy.json")) as f:
        strategy = json.load(f)
    assert strategy["cost_table"] == record
    assert load_checkpoint(os.path.join(folder, rl_quantize.STATE_FILE))["cost_table"] == record
    before = os.listdir(folder), _log_rows(folder)
    for table, expected in ((tables["b"], "with other content"), (None, "no --cost_table")):
        with pytest.raises(SystemExit):
            run_cli(rl_quantize.main, _linear(weights, tmp_path, table, episodes=2)
                    + ["--resume_search", folder])
        err = capsys.readouterr().err.strip().splitlines()
        assert err[-1].startswith("error: --resume_search") and expected in err[-1], err[-1]
        assert (os.listdir(folder), _log_rows(folder)) == before   # nothing written
    # the summary costs the policy with the recorded table, not the simulator's
    cost, _ = cost_model_for(strategy)
    assert cost.reference() == pytest.approx(float(np.load(tables["a"])[:, 7, 7].sum()))
    assert cost(strategy["strategy"]) / cost.reference() == pytest.approx(strategy["cost_ratio"],
                                                                         abs=1e-6)


def test_summary_refuses_a_changed_or_missing_recorded_table(tables, tmp_path):
    path = str(tmp_path / "mine.npy")
    np.save(path, np.load(tables["a"]))
    strategy = {"arch": "qmobilenetv2", "mode": "linear", "metric": "latency",
                "hardware": "bismo_cloud", "dataset": "mnist5k", "width_mult": 0.25,
                "min_bit": 5, "max_bit": 8,
                "cost_table": {"path": path, "sha256": _sha256(path)}}
    assert cost_model_for(strategy)[0].source == strategy["cost_table"]
    np.save(path, np.load(tables["b"]))
    with pytest.raises(UserError, match="has changed since the search recorded it"):
        cost_model_for(strategy)
    os.remove(path)
    with pytest.raises(UserError, match="not found"):
        cost_model_for(strategy)


def test_strategy_json_has_no_nan():
    best = {"episode": 3, "reward": math.nan, "accuracy": math.nan, "cost_ratio": 0.5,
            "cost": math.inf, "policy": [4, 4]}
    meta = {"arch": "mobilenetv2", "mode": "kmeans", "metric": "size", "preserve_ratio": 0.5,
            "original_accuracy": math.nan}
    record = strategy_record(best, ["a", "b"], meta)
    assert record["accuracy"] is None and record["reward"] is None and record["cost"] is None
    assert record["original_accuracy"] is None and record["cost_ratio"] == 0.5
    json.dumps(record, allow_nan=False)


def test_search_killed_in_its_first_episode_resumes(tiny_pretrained, tmp_path, monkeypatch):
    """The state exists before episode 0 ends; the resumed log equals an uninterrupted run's."""
    weights = tiny_pretrained[0]
    km = ["--arch", "mobilenetv2", "--max_bit", "4", "--preserve_ratio", "0.2"]
    rl_quantize.main(_argv(weights, tmp_path / "whole") + km)
    whole = _log_rows(_only_run(tmp_path / "whole"))

    real = rl_quantize.Search.run_episode

    def killed(self, episode):
        assert os.path.isfile(os.path.join(self.out, rl_quantize.STATE_FILE))
        raise KeyboardInterrupt

    monkeypatch.setattr(rl_quantize.Search, "run_episode", killed)
    argv = _argv(weights, tmp_path / "killed") + km
    with pytest.raises(SystemExit):
        run_cli(rl_quantize.main, argv)
    folder = _only_run(tmp_path / "killed")
    assert load_checkpoint(os.path.join(folder, rl_quantize.STATE_FILE))["episode"] == 0
    monkeypatch.setattr(rl_quantize.Search, "run_episode", real)
    rl_quantize.main(argv + ["--resume_search"])
    rows = _log_rows(folder)
    assert [r.split("\t")[0] for r in rows] == ["episode", "0", "1", "2"]
    assert rows == whole


def test_finetune_resume_logs_each_epoch_once(tiny_pretrained, tmp_path):
    """A kill after epoch 2's log row but before its checkpoint: the resumed log has it once."""
    weights, model = tiny_pretrained
    names = [n for n, _ in quantizable_layers(model)]
    strategy = tmp_path / "s.json"
    strategy.write_text(json.dumps({"mode": "kmeans", "layers": names, "strategy": [4] * 53}))
    out = str(tmp_path / "ft")
    tiny = ["--width_mult", "0.25", "--train_subset", "32", "--train_batch", "16",
            "--test_batch", "32", "--device", "cpu", "--no-progress", "-c", out]
    finetune.main(["--strategy", str(strategy), "--pretrained_path", weights, "--epochs", "1"]
                  + tiny)
    log_path = os.path.join(out, "log.txt")
    rows = open(log_path).read().splitlines()
    assert [r.split("\t")[0] for r in rows] == ["epoch", "0", "1"]
    with open(log_path, "a") as f:   # epoch 2 logged, then killed before its checkpoint
        f.write(rows[-1].replace("1\t", "2\t", 1) + "\n")
    finetune.main(["--resume", os.path.join(out, "checkpoint.pth.tar"), "--epochs", "2"] + tiny)
    epochs = [r.split("\t")[0] for r in open(log_path).read().splitlines()]
    assert epochs == ["epoch", "0", "1", "2"]
    assert load_checkpoint(os.path.join(out, "checkpoint.pth.tar"))["epoch"] == 2


def test_summary_refuses_nan_in_its_inputs(tmp_path, capsys):
    from lib.report import __main__ as report_cli
    (tmp_path / "s.json").write_text('{"mode": "kmeans", "accuracy": NaN}')
    with pytest.raises(SystemExit):
        run_cli(report_cli.main, ["uniform", str(tmp_path / "s.json"), str(tmp_path / "u.json")])
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: ") and "NaN is not a number in strict JSON" in err[-1]
    assert not (tmp_path / "u.json").exists()
