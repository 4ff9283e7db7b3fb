"""Defaults that never waste a run and outputs a user can read (issue 33.2 and 33.4): the
warmup warning, subset sizes that fit, the fine-tune's batch per device, TensorBoard tags by
layer name, per-episode time and a warmup mark in log.txt, the budget in results.json."""
import json
import logging
import os
import re

import pytest

import rl_quantize
from lib.search import LOG_COLUMNS
from lib.utils.errors import UserError


def _search_args(*extra):
    return rl_quantize.get_args_parser().parse_args(["--dataset", "mnist5k", *extra])


@pytest.mark.parametrize("flags, warned", [
    (["--warmup", "20", "--train_episode", "8"], True),
    (["--warmup", "8", "--train_episode", "8"], True),
    (["--warmup", "7", "--train_episode", "8"], False),
    (["--warmup", "20", "--train_episode", "8", "--method", "random"], False),
])
def test_a_search_that_is_all_warmup_is_warned_in_one_line(caplog, flags, warned):
    from lib.search import check_method_args
    with caplog.at_level(logging.WARNING, logger="rl_quantize"):
        check_method_args(_search_args(*flags))
    lines = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(lines) == int(warned)
    if warned:
        assert "every episode is random" in lines[0] and "\n" not in lines[0]


def test_subsets_that_do_not_fit_get_sizes_that_do(tmp_path):
    from lib.utils.data_utils import split_indices
    with pytest.raises(UserError) as err:
        split_indices(120, 10000, 20000)
    m = re.search(r"--train_size (\d+) --val_size (\d+)", str(err.value))
    assert m, str(err.value)
    train, val = int(m.group(1)), int(m.group(2))
    assert (train, val) == (80, 40)   # the flags' 2:1 proportion, all 120 images
    val_idx, train_idx = split_indices(120, val, train)
    assert len(val_idx) == val and len(train_idx) == train


def test_finetune_batch_follows_the_device_when_not_given():
    import finetune
    from lib.finetune.run import default_train_batch
    assert finetune.get_args_parser().parse_args([]).train_batch is None
    assert default_train_batch("cpu", 224) == 32       # 256 at 224 px: about 20 GB
    assert default_train_batch("cpu", 32) == 256
    assert default_train_batch("cuda", 224) == 256
    assert finetune.get_args_parser().parse_args(["--train_batch", "8"]).train_batch == 8


@pytest.fixture(scope="module")
def search(tiny_pretrained, tmp_path_factory):
    out = tmp_path_factory.mktemp("search")
    res = rl_quantize.main(["--dataset", "mnist5k", "--width_mult", "0.25", "--pretrained_path",
                            tiny_pretrained[0], "--train_size", "16", "--val_size", "16",
                            "--data_bsize", "16", "--n_worker", "0", "--warmup", "1",
                            "--train_episode", "2", "--finetune_flag", "False", "--device",
                            "cpu", "--output", str(out), "--max_bit", "4", "--preserve_ratio",
                            "0.2"])
    return res["output"]


def test_tensorboard_tags_name_the_layers(search):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    with open(os.path.join(search, "strategy.json")) as f:
        layers = json.load(f)["layers"]
    events = EventAccumulator(search)
    events.Reload()
    tags = [t for t in events.Tags()["scalars"] if t.startswith("bits_w/")]
    assert tags and sorted(tags) == [f"bits_w/{i:03d}_{n}" for i, n in enumerate(layers)]
    assert len(events.Scalars(f"bits_w/000_{layers[0]}")) == 2     # one point per episode


def test_log_has_time_and_warmup_columns_and_readers_still_parse_it(search):
    from lib.report.runs import read_log
    with open(os.path.join(search, "log.txt")) as f:
        header, *rows = [ln.split("\t") for ln in f.read().splitlines()]
    assert header == LOG_COLUMNS
    assert header[:7] == ["episode", "reward", "accuracy", "cost_ratio", "cost", "nonfinite",
                          "policy"]
    cells = [dict(zip(header, r)) for r in rows]
    assert [c["warmup"] for c in cells] == ["1", "0"]      # --warmup 1: episode 0 random
    assert all(float(c["seconds"]) > 0 for c in cells)
    assert [r["episode"] for r in read_log(os.path.join(search, "log.txt"))] == [0, 1]


def test_a_resumed_older_log_gets_the_new_columns(tmp_path):
    from lib.report.runs import read_log
    from lib.search.loop import complete_log_header
    path = tmp_path / "log.txt"
    path.write_text("\t".join(LOG_COLUMNS[:7]) + "\n0\t0.5\t50.0\t0.1\t2.0\t0\t[2, 3]\n")
    complete_log_header(str(path))
    assert path.read_text().splitlines()[0].split("\t") == LOG_COLUMNS
    assert read_log(str(path))[0]["accuracy"] == 50.0


def test_results_json_holds_the_policy_and_its_budget(search, tiny_pretrained, tmp_path):
    import finetune
    path = os.path.join(search, "strategy.json")
    with open(path) as f:
        strategy = json.load(f)
    finetune.main(["--strategy", path, "--pretrained_path", tiny_pretrained[0], "-c",
                   str(tmp_path / "ft"), "--epochs", "1", "--train_subset", "16",
                   "--train_batch", "16", "--test_batch", "16", "--no-eval_fp32", "--device",
                   "cpu", "--no-progress"])
    with open(tmp_path / "ft" / "results.json") as f:
        results = json.load(f)
    assert results["policy"] == strategy["strategy"]
    assert results["layer_names"] == strategy["layers"]
    assert results["cost_ratio"] == strategy["cost_ratio"]
    assert (results["preserve_ratio"], results["metric"]) == (0.2, "size")
    assert results["model_kwargs"] == {"num_classes": 10, "input_size": 32, "width_mult": 0.25}
