"""The frontier's tables and goal checks are built from the runs' own result files (issue 13)."""
import json
import os

import pytest
import torch

from lib.report import frontier
from lib.utils.errors import UserError

WARMUP = 2
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def write_search(folder, name, accs, best_episode, cost_ratio, top1, policy=(4, 3)):
    """What rl_quantize + finetune leave: X.strategy -> run/strategy.json + log.txt, X_ft/results.json."""
    run = os.path.join(folder, name, "mobilenetv2_mnist5k-run1")
    os.makedirs(run)
    with open(os.path.join(run, "log.txt"), "w") as f:
        f.write("episode\treward\taccuracy\tcost_ratio\tcost\tnonfinite\tpolicy\n")
        for e, a in enumerate(accs):
            f.write(f"{e}\t{0.1 * (a - 99):.4f}\t{a}\t{cost_ratio}\t1.0\t0\t[4, 3]\n")
    with open(os.path.join(run, "strategy.json"), "w") as f:
        json.dump({"mode": "kmeans", "accuracy": max(accs), "episode": best_episode,
                   "cost_ratio": cost_ratio, "strategy": list(policy)}, f)
    with open(os.path.join(folder, name + ".strategy"), "w") as f:
        f.write(os.path.join(run, "strategy.json") + "\n")
    if top1 is not None:
        write_finetune(os.path.join(folder, name + "_ft"), list(policy),
                       {"best_top1": top1, "fp32_top1": 98.0, "quant_top1": 50.0})


def write_finetune(folder, policy, results):
    """What finetune.py leaves: results.json, and the policy it trained in its checkpoint."""
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "results.json"), "w") as f:
        json.dump(results, f)
    torch.save({"policy": {"mode": "kmeans", "strategy": policy}, "state_dict": {}},
               os.path.join(folder, "model_best.pth.tar"))


def write_uniform(folder, bits, cost_ratio, top1):
    with open(os.path.join(folder, f"w{bits}.json"), "w") as f:
        json.dump({"cost_ratio": cost_ratio, "uniform_bits": bits, "strategy": [bits, bits]}, f)
    write_finetune(os.path.join(folder, f"w{bits}_ft"), [bits, bits],
                   {"best_top1": top1, "fp32_top1": 98.0})


@pytest.fixture
def out(tmp_path):
    b = tmp_path / "kmeans" / "b0.07"
    b.mkdir(parents=True)
    # DDPG learns (warmup ~80, last quarter ~95); random stays flat.
    write_search(str(b), "ddpg_s0", [80, 82, 90, 94, 95, 96, 95, 96], 5, 0.069, 97.0)
    write_search(str(b), "ddpg_s1", [81, 79, 88, 93, 95, 94, 96, 95], 6, 0.070, 96.6)
    write_search(str(b), "random_s0", [80, 85, 78, 90, 82, 84, 79, 83], 3, 0.068, 95.0)
    write_search(str(b), "random_s1", [81, 83, 86, 80, 84, 88, 79, 82], 5, 0.069, 95.4)
    write_search(str(b), "ilp", [93.0], 0, 0.070, 96.0)
    write_search(str(b), "noise", [89.8, 90.2, 90.0, 90.4, 89.6], 3, 0.069, None)
    u = tmp_path / "kmeans" / "uniform"
    u.mkdir()
    write_uniform(str(u), 2, 0.062, 90.0)
    write_uniform(str(u), 3, 0.094, 97.8)
    return tmp_path


def test_tables_and_goals_come_from_the_runs_files(out):
    result, table = frontier.build(str(out), WARMUP)
    b = result["kmeans"]["budgets"]["0.07"]
    assert b["ddpg"]["top1_mean"] == pytest.approx(96.8)
    assert b["random"]["top1_mean"] == pytest.approx(95.2)
    assert b["noise"]["sd"] == pytest.approx(0.316, abs=1e-3)
    g = b["goals"]
    # learning: last quarter (2 episodes) minus the 2 warmup episodes, per seed
    assert g["learning"]["gains"] == pytest.approx([95.5 - 81.0, 95.5 - 80.0])
    assert g["learning"]["held"] and g["learning"]["best_after_warmup"] == 2
    assert g["vs_random"]["held"]
    # only the 2-bit uniform policy fits 0.07; it loses 8 points, and DDPG beats it
    assert g["vs_uniform"]["uniform_bits"] == 2 and g["vs_uniform"]["applies"]
    assert g["vs_uniform"]["held"] and g["vs_uniform"]["ilp_top1"] == 96.0
    assert g["signal"]["held"]
    assert "| kmeans | 0.07 | ddpg | 2 | 0.070 | 96.00 | 96.80 ± 0.28 |" in table
    saved = json.load(open(out / "frontier.json"))
    assert saved["kmeans"]["uniform"][0]["bits"] == 2
    assert os.path.getsize(out / "frontier.png") > 0 and os.path.getsize(out / "learning.png") > 0
    assert (out / "frontier.md").read_text() == table


def test_a_changed_result_file_changes_the_table(out):
    """Nothing is cached or hard-coded: a worse DDPG fine-tune flips the goals it feeds."""
    with open(out / "kmeans" / "b0.07" / "ddpg_s0_ft" / "results.json", "w") as f:
        json.dump({"best_top1": 91.0, "fp32_top1": 98.0}, f)
    result, _ = frontier.build(str(out), WARMUP)
    g = result["kmeans"]["budgets"]["0.07"]["goals"]
    assert result["kmeans"]["budgets"]["0.07"]["ddpg"]["top1_mean"] == pytest.approx(93.8)
    assert not g["vs_random"]["held"]
    assert g["vs_uniform"]["held"] is False     # 93.8 - 90.0 < the seed SD of (91.0, 96.6)


def test_the_uniform_goal_is_n_a_where_uniform_loses_under_a_point(out):
    write_uniform(str(out / "kmeans" / "uniform"), 2, 0.062, 97.5)
    result, table = frontier.build(str(out), WARMUP)
    g = result["kmeans"]["budgets"]["0.07"]["goals"]["vs_uniform"]
    assert not g["applies"] and g["held"] is None
    assert "(uniform loses < 1 point here): n/a" in table


def test_noisy_rewards_fail_the_signal_and_learning_goals(out):
    noise = out / "kmeans" / "b0.07" / "noise"
    log = next(noise.glob("*/log.txt"))
    rows = log.read_text().splitlines()
    accs = [80, 95, 70, 99, 85]
    log.write_text("\n".join([rows[0]] + [f"{e}\t0\t{a}\t0.069\t1.0\t0\t[4, 3]"
                                          for e, a in enumerate(accs)]) + "\n")
    g = frontier.build(str(out), WARMUP)[0]["kmeans"]["budgets"]["0.07"]["goals"]
    assert not g["signal"]["held"] and not g["learning"]["held"]


def test_a_folder_without_runs_is_a_one_line_error(tmp_path):
    with pytest.raises(UserError, match="holds no linear/ or kmeans/"):
        frontier.build(str(tmp_path), WARMUP)


def test_unknown_folders_files_and_log_rows_are_skipped_and_named(out, caplog):
    """A backup budget folder, a stray uniform file, a damaged log row: named, no traceback."""
    import shutil
    shutil.copytree(out / "kmeans" / "b0.07", out / "kmeans" / "b0.08.bak")
    (out / "kmeans" / "uniform" / "w3_old.json").write_text("{}")
    (out / "kmeans" / "b0.07" / "notes.strategy").write_text("elsewhere\n")
    log = next((out / "kmeans" / "b0.07" / "ddpg_s0").glob("*/log.txt"))
    log.write_text(log.read_text() + "8\t0.1\tnot-a-number\t0.069\n")
    result, table = frontier.build(str(out), WARMUP)
    assert list(result["kmeans"]["budgets"]) == ["0.07"]
    assert [u["bits"] for u in result["kmeans"]["uniform"]] == [2, 3]
    notes = "\n".join(result["kmeans"]["notes"])
    assert "b0.08.bak: skipped" in notes and "w3_old.json: skipped" in notes
    assert "notes.strategy: skipped" in notes
    assert "b0.08.bak: skipped" in table
    assert "line 10: not an episode row" in caplog.text
    # the damaged row is left out; the other eight episodes still count
    assert result["kmeans"]["budgets"]["0.07"]["ddpg"]["learning"][0]["gain"] == \
        pytest.approx(95.5 - 81.0)


def test_a_rerun_search_is_not_paired_with_the_older_fine_tune(out):
    """run_frontier.sh reruns a search whose .strategy is gone but keeps its _ft results: the
    new policy's cost would sit beside the old policy's accuracy."""
    b = out / "kmeans" / "b0.07"
    run = next((b / "ilp").glob("*/strategy.json"))
    record = json.load(open(run))
    run.write_text(json.dumps(dict(record, strategy=[2, 2], cost_ratio=0.065)))
    result, table = frontier.build(str(out), WARMUP)
    ilp = result["kmeans"]["budgets"]["0.07"]["runs"]["ilp"][0]
    assert ilp["top1"] is None and ilp["cost_ratio"] == 0.065
    assert result["kmeans"]["budgets"]["0.07"]["goals"]["vs_uniform"]["ilp_top1"] is None
    assert "ilp_ft: left out, it fine-tuned another policy" in table


def test_a_run_over_its_budget_is_marked(out):
    write_search(str(out / "kmeans" / "b0.07"), "ddpg_s2", [90, 91], 1, 0.2, 97.5)
    result, table = frontier.build(str(out), WARMUP)
    runs = result["kmeans"]["budgets"]["0.07"]["runs"]["ddpg"]
    assert [r["over_budget"] for r in runs] == [False, False, True]
    assert "| kmeans | 0.07 | ddpg | 3 | 0.113 **over budget** |" in table


def test_the_report_cli_builds_the_frontier(out, capsys, tmp_path):
    from lib.report.__main__ import main
    table = main(["frontier", str(out), "--warmup", str(WARMUP)])
    assert capsys.readouterr().out == table == frontier.build(str(out), WARMUP)[1]
    with pytest.raises(UserError, match="is not a folder"):
        main(["frontier", str(tmp_path / "none")])
