"""``python -m lib.report runs``: a report of any search and fine-tune folders (issue 33 item 3),
every row one policy (issue 31 item 4), and legible plots (issue 33 item 5)."""
import json
import os

import numpy as np
import pytest
import torch

import finetune
import rl_quantize
from lib.report import anyruns
from lib.report.__main__ import main as report_main
from lib.utils.errors import run_cli

TINY_FT = ["--epochs", "1", "--no-eval_fp32", "--width_mult", "0.25", "--train_subset", "32",
           "--train_batch", "16", "--test_batch", "32", "--device", "cpu", "--no-progress"]


def test_report_on_two_arbitrary_run_folders(tmp_path, tiny_pretrained):
    """A real search and a real fine-tune of its policy, in folders of no set name or layout."""
    weights = tiny_pretrained[0]
    search_out = tmp_path / "my searches" / "try 1"
    rl_quantize.main(["--dataset", "mnist5k", "--width_mult", "0.25", "--pretrained_path",
                      weights, "--train_size", "32", "--val_size", "32", "--data_bsize", "32",
                      "--n_worker", "0", "--warmup", "2", "--train_episode", "2", "--max_bit",
                      "4", "--preserve_ratio", "0.2", "--method", "random", "--seed", "1",
                      "--output", str(search_out)])
    (search,) = [p for p in search_out.iterdir() if (p / "strategy.json").is_file()]
    ft = tmp_path / "elsewhere" / "ft"
    finetune.main(["--strategy", str(search / "strategy.json"), "--pretrained_path", weights,
                   "-c", str(ft)] + TINY_FT)
    out = tmp_path / "report"
    table = report_main(["runs", str(tmp_path / "my searches"), str(ft), "--out", str(out)])
    rows = json.load(open(out / "runs.json"))["rows"]
    assert len(rows) == 1, rows   # the fine-tune joined the search's row: same policy
    (row,) = rows
    strategy = json.load(open(search / "strategy.json"))
    results = json.load(open(ft / "results.json"))
    assert row["search"] == str(search) and row["finetune"] == str(ft)
    assert row["cost_ratio"] == strategy["cost_ratio"] and row["budget"] == 0.2
    assert row["top1"] == results["best_top1"] and row["search_top1"] == strategy["accuracy"]
    assert row["over_budget"] is False
    assert f"| {row['top1']:.2f} | {os.path.join('elsewhere', 'ft')} |" in table
    stem = anyruns.file_stem(row["run"])
    for name in ("runs.md", "runs.png", f"{stem}_search.png", f"{stem}_policy.png"):
        assert os.path.getsize(out / name) > 0, name


def _write(path, obj):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        f.write(obj if isinstance(obj, str) else json.dumps(obj))


def _search(folder, policy, cost_ratio, budget=0.1):
    _write(os.path.join(folder, "strategy.json"),
           {"mode": "kmeans", "metric": "size", "preserve_ratio": budget, "method": "ddpg",
            "cost_ratio": cost_ratio, "accuracy": 90.0, "strategy": policy,
            "layers": ["a", "b", "c"]})
    _write(os.path.join(folder, "log.txt"),
           "episode\treward\taccuracy\tcost_ratio\n0\t-1\t80\t0.09\n1\t-0.5\t90\t0.1\n")


def _finetune(folder, strategy, top1, checkpoint=True):
    _write(os.path.join(folder, "results.json"), {"best_top1": top1, "fp32_top1": 99.0})
    if checkpoint:
        torch.save({"policy": strategy, "state_dict": {}},
                   os.path.join(folder, "checkpoint.pth.tar"))


@pytest.fixture
def runs(tmp_path):
    _search(str(tmp_path / "a" / "s1"), [4, 3, 2], 0.09)
    _finetune(str(tmp_path / "a" / "ft_of_s1"), {"mode": "kmeans", "strategy": [4, 3, 2]}, 95.0)
    return tmp_path


def test_each_row_is_one_policy(runs):
    """A fine-tune of another policy than the search's (the search was rerun) does not lend it
    its accuracy: it gets its own row, costed from the policy it trained."""
    _search(str(runs / "a" / "s1"), [2, 2, 2], 0.06)
    rows, table = anyruns.build([str(runs / "a")], str(runs / "out"))
    by_run = {r["run"]: r for r in rows}
    assert by_run["s1"]["top1"] is None
    assert by_run["s1"]["cost_ratio"] == 0.06
    mine = by_run["ft_of_s1"]
    assert mine["top1"] == 95.0 and mine["search"] is None and mine["cost_ratio"] is None
    assert len({r["policy_sha256"] for r in rows}) == 2


def test_unknown_policies_are_left_out_and_over_budget_marked(runs):
    _finetune(str(runs / "b" / "no_record"), None, 60.0, checkpoint=False)
    uniform = {"mode": "kmeans", "metric": "size", "preserve_ratio": 0.1, "cost_ratio": 0.125,
               "uniform_bits": 4, "strategy": [4, 4, 4]}
    _finetune(str(runs / "b" / "uniform4"), uniform, 97.0)
    os.makedirs(runs / "b" / "empty")
    rows, table = anyruns.build([str(runs / "a"), str(runs / "b"), str(runs / "b" / "empty")],
                                str(runs / "out"))
    assert [r["top1"] for r in rows] == [95.0, 97.0]
    assert "| uniform 4-bit | kmeans | size <= 0.1 | 0.125 **over budget** |" in table
    assert "no_record: left out, neither results.json nor a checkpoint" in table
    assert "empty: holds no search" in table
    saved = json.load(open(runs / "out" / "runs.json"))
    assert saved["rows"][1]["over_budget"] is True and len(saved["notes"]) == 2


def test_bad_arguments_are_one_line_errors(tmp_path, capsys):
    for argv, words in ((["runs", str(tmp_path / "none"), "--out", str(tmp_path / "o")],
                         "is not a folder"),
                        (["runs", str(tmp_path), "--out", str(tmp_path / "o")],
                         "no search or fine-tune found")):
        with pytest.raises(SystemExit) as exc:
            run_cli(report_main, argv)
        err = capsys.readouterr().err.strip().splitlines()
        assert exc.value.code == 2 and len(err) == 1 and words in err[0], err
    assert not (tmp_path / "o").exists()


# ------------------------------------------------------------------ legible plots
def _overlaps(a, b):
    return a.x0 < b.x1 and b.x0 < a.x1 and a.y0 < b.y1 and b.y0 < a.y1


def _legend_clear_and_colour_bar(fig, ax):
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    legend = ax.get_legend().get_window_extent(renderer)
    assert not _overlaps(legend, ax.get_window_extent(renderer))
    bars = [a for a in fig.axes if a.get_label() == "<colorbar>"]
    assert len(bars) == 1 and bars[0].get_ylabel() == "episode"


def test_accuracy_vs_cost_legend_outside_and_colour_bar():
    from lib.report.plots import history_figure, search_figure
    history = [{"episode": e, "accuracy": 10.0 + e, "cost_ratio": 0.05 + 0.01 * e,
                "reward": -1.0 + 0.1 * e} for e in range(12)]
    plt, fig = history_figure(history, 11, 4, 0.1, "size")
    _legend_clear_and_colour_bar(fig, fig.axes[0])
    plt.close(fig)
    plt, fig = search_figure(history, [("HAQ", "*", "r", 0.1, 20.0)], 0.1, "size", "kmeans")
    _legend_clear_and_colour_bar(fig, fig.axes[0])
    plt.close(fig)


def test_sensitivity_map_shows_every_column():
    """A 2-bit column 1000x the others: on one linear scale the 3..8-bit columns would all be
    the lowest colour; drawn on a log scale they span a good part of the range, also when
    some scores are below zero."""
    from matplotlib.colors import LogNorm, SymLogNorm
    from lib.allocate.scores_io import heatmap_scale, scores_figure
    rng = np.random.default_rng(0)
    scores = rng.uniform(1, 2, (5, 7)) * 4.0 ** -np.arange(7)[None]
    scores[:, 0] *= 1000
    values, norm, _ = heatmap_scale(scores)
    assert isinstance(norm, LogNorm)
    linear = scores[:, 1:] / scores.max()
    assert np.ptp(linear) < 0.001 and np.ptp(norm(values[:, 1:])) > 0.4
    # a negative score (noise) has no logarithm: linear within the noise, log beyond it
    scores[0, 6] = -1e-4
    values, norm, label = heatmap_scale(scores)
    assert isinstance(norm, SymLogNorm) and norm.linthresh == pytest.approx(1e-4)
    assert "the noise" in label and np.ptp(norm(values[:, 1:6])) > 0.2
    plt, fig = scores_figure({"weight": scores, "layers": list("abcde"), "bits": list(range(2, 9)),
                              "metric": "hessian"})
    assert [a.get_label() for a in fig.axes].count("<colorbar>") == 1
    plt.close(fig)


def test_a_policy_recorded_in_results_json_is_read_without_a_checkpoint(runs):
    _write(str(runs / "c" / "ft" / "results.json"),
           {"best_top1": 91.0, "policy": [4, 3, 2], "cost_ratio": 0.09})
    rows, _ = anyruns.build([str(runs / "a" / "s1"), str(runs / "c")], str(runs / "out"))
    assert [(r["top1"], r["search"]) for r in rows] == [(91.0, str(runs / "a" / "s1"))]


def test_damaged_records_are_left_out_not_a_traceback(runs):
    """Fields of the wrong type in a checkpoint's policy or a strategy.json: rows stay readable."""
    _finetune(str(runs / "d" / "tensor_policy"), {"strategy": [torch.tensor(4)] * 3}, 50.0)
    _finetune(str(runs / "d" / "odd_fields"),
              {"mode": ["kmeans"], "method": 3, "cost_ratio": float("nan"), "uniform_bits": "x",
               "strategy": [5, 5, 5]}, 70.0)
    rows, table = anyruns.build([str(runs / "a"), str(runs / "d")], str(runs / "out"))
    odd = rows[-1]
    assert (odd["top1"], odd["mode"], odd["method"], odd["cost_ratio"]) == (70.0, None, None, None)
    assert len(rows) == 2 and "tensor_policy: left out" in table
