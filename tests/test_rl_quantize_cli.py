"""rl_quantize.py end to end on tiny data: outputs, flags, errors, kill + resume.

A random-init MobileNet-V2 (width 0.25) stands in for the pretrained model; one
batch of 32 training and 32 validation images of mnist5k, at most 4-bit K-Means
(16 centroids) and at least 5-bit linear quantization (no KL calibration) keep
an episode near a second.
"""
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

import rl_quantize
from lib.quantize.policy import resolve_kmeans_policy, resolve_linear_policy
from lib.utils.checkpoint import load_checkpoint
from lib.utils.errors import UserError, run_cli
from lib.utils.layers import quantizable_layers
from lib.utils.strategy import load_strategy, validate_strategy
from models import get_model

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RELEASED_FLAGS = """--suffix --dataset --dataset_root --preserve_ratio --min_bit --max_bit --float_bit
--linear_quantization --is_pruned --hidden1 --hidden2 --lr_c --lr_a --warmup --discount --bsize
--rmsize --window_length --tau --init_delta --delta_decay --n_update --max_episode_length --output
--debug --init_w --train_episode --epsilon --seed --n_worker --data_bsize --finetune_epoch
--finetune_gamma --finetune_lr --finetune_flag --use_top5 --train_size --val_size --resume
--arch -a --gpu_id --cost --hardware --cost_table --pretrained_path --device --resume_search""".split()


@pytest.fixture(scope="module")
def assets(tmp_path_factory, tiny_pretrained):
    d = tmp_path_factory.mktemp("rlq")
    ckpt = tiny_pretrained[0]
    scale = np.linspace(1, 5, 53)
    table = scale[:, None, None] * np.outer(np.arange(1, 9), np.arange(1, 9))[None]
    np.save(d / "table.npy", table)
    np.save(d / "bad_table.npy", table[:5])
    return {"ckpt": ckpt, "table": str(d / "table.npy"), "bad_table": str(d / "bad_table.npy")}


def common(assets, out, episodes=3):
    return ["--dataset", "mnist5k", "--width_mult", "0.25", "--pretrained_path", assets["ckpt"],
            "--train_size", "32", "--val_size", "32", "--data_bsize", "32", "--n_worker", "0",
            "--warmup", "2", "--train_episode", str(episodes), "--output", str(out), "--seed", "1"]


def run_dir(out):
    (d,) = [os.path.join(out, x) for x in os.listdir(out)]
    return d


def log_episodes(folder):
    with open(os.path.join(folder, "log.txt")) as f:
        lines = f.read().splitlines()
    assert lines[0].split("\t")[0] == "episode"
    return [int(ln.split("\t")[0]) for ln in lines[1:] if ln]


def check_outputs(folder, n_episodes):
    for name in ("strategy.json", "log.txt", "agent.pth.tar", "search_state.pth.tar",
                 "best_policy.png", "accuracy_vs_cost.png"):
        assert os.path.getsize(os.path.join(folder, name)) > 0, name
    assert any(f.startswith("events.out.tfevents") for f in os.listdir(folder))
    assert log_episodes(folder) == list(range(n_episodes))
    with open(os.path.join(folder, "strategy.json")) as f:
        return json.load(f)


def test_help_lists_every_released_flag():
    text = rl_quantize.get_args_parser().format_help()
    missing = [f for f in RELEASED_FLAGS if f not in text]
    assert not missing
    args = rl_quantize.get_args_parser().parse_args([])
    assert (args.preserve_ratio, args.min_bit, args.max_bit, args.float_bit, args.warmup,
            args.train_episode, args.seed, args.rmsize, args.bsize, args.tau) == \
        (0.1, 1, 8, 32, 20, 600, 234, 128, 64, 0.01)


@pytest.mark.parametrize("argv,value", [([], True), (["--finetune_flag"], True),
                                        (["--finetune_flag", "False"], False),
                                        (["--finetune_flag", "0"], False),
                                        (["--finetune_flag", "yes"], True)])
def test_boolean_flags_really_parse(argv, value):
    assert rl_quantize.get_args_parser().parse_args(argv).finetune_flag is value


def test_boolean_flag_rejects_junk():
    with pytest.raises(UserError, match="not a boolean"):
        rl_quantize.get_args_parser().parse_args(["--use_top5", "maybe"])


def test_kmeans_search_writes_valid_strategy(assets, tmp_path):
    best = rl_quantize.main(common(assets, tmp_path) + ["--arch", "mobilenetv2", "--max_bit",
                                                       "4", "--preserve_ratio", "0.1"])
    folder = run_dir(tmp_path)
    s = check_outputs(folder, 3)
    model = get_model("mobilenetv2", num_classes=10, input_size=32, width_mult=0.25)
    names = [n for n, _ in quantizable_layers(model)]
    assert s["mode"] == "kmeans" and s["metric"] == "size" and s["layers"] == names
    assert len(s["strategy"]) == 53 and all(1 <= b <= 4 for b in s["strategy"])
    assert s["cost_ratio"] <= 0.1 and s["episode"] == best["episode"]
    # finetune.py's validation and the policy application accept it, by name and by order.
    validate_strategy(load_strategy(os.path.join(folder, "strategy.json")), names, "kmeans",
                      min_bit=1, max_bit=4)
    resolve_kmeans_policy(model, dict(zip(s["layers"], s["strategy"])))
    resolve_kmeans_policy(model, s["strategy"])


def test_linear_search_writes_valid_strategy(assets, tmp_path):
    rl_quantize.main(common(assets, tmp_path) + [
        "--arch", "qmobilenetv2", "--linear_quantization", "--cost_table", assets["table"],
        "--preserve_ratio", "0.5", "--min_bit", "5"])
    folder = run_dir(tmp_path)
    s = check_outputs(folder, 3)
    assert s["mode"] == "linear" and s["metric"] == "latency" and s["hardware"] == "bismo_cloud"
    assert s["strategy"][0] == [8, -1] and s["strategy"][-1] == [8, 8]
    assert all(5 <= b <= 8 for w, a in s["strategy"][1:] for b in (w, a))
    assert s["cost_ratio"] <= 0.5
    model = get_model("qmobilenetv2", num_classes=10, input_size=32, width_mult=0.25)
    names = [n for n, _ in quantizable_layers(model, linear=True)]
    validate_strategy(load_strategy(os.path.join(folder, "strategy.json")), names, "linear",
                      min_bit=5, max_bit=8)
    resolve_linear_policy(model, dict(zip(s["layers"], s["strategy"])))


def test_linear_search_below_8_bits_feeds_finetune_at_the_same_max_bit(assets, tmp_path):
    """--max_bit 6: the search pins its end layers at 8 bits; finetune.py --max_bit 6 takes them."""
    import finetune
    out = tmp_path / "search"
    rl_quantize.main(common(assets, out, episodes=2) + [
        "--arch", "qmobilenetv2", "--linear_quantization", "--cost_table", assets["table"],
        "--preserve_ratio", "0.5", "--min_bit", "5", "--max_bit", "6"])
    path = os.path.join(run_dir(out), "strategy.json")
    s = load_strategy(path)
    assert s["strategy"][0] == [8, -1] and s["strategy"][-1] == [8, 8]
    assert all(5 <= b <= 6 for w, a in s["strategy"][1:-1] for b in (w, a))
    res = finetune.main(["--strategy", path, "--pretrained_path", assets["ckpt"], "--min_bit", "5",
                         "--max_bit", "6", "-c", str(tmp_path / "ft"), "--epochs", "1",
                         "--no-eval_fp32", "--width_mult", "0.25", "--train_subset", "32",
                         "--train_batch", "16", "--test_batch", "32", "--device", "cpu",
                         "--no-progress"])
    assert res["mode"] == "linear"
    ck = load_checkpoint(os.path.join(tmp_path, "ft", "checkpoint.pth.tar"))
    assert ck["policy"]["strategy"] == s["strategy"]


def test_crash_between_log_and_state_save_resumes_exactly_once(assets, tmp_path,
                                                               kill_before_state_save):
    """The worst moment to die: episode 2 is in log.txt but not in the saved state."""
    argv = common(assets, tmp_path, episodes=4) + ["--arch", "mobilenetv2", "--max_bit", "4",
                                                   "--preserve_ratio", "0.2"]
    kill_before_state_save(3)
    with pytest.raises(SystemExit):
        run_cli(rl_quantize.main, argv)
    folder = run_dir(tmp_path)
    assert log_episodes(folder) == [0, 1, 2]
    assert load_checkpoint(os.path.join(folder, rl_quantize.STATE_FILE))["episode"] == 2
    kill_before_state_save(None)
    rl_quantize.main(argv + ["--resume_search"])
    assert log_episodes(folder) == [0, 1, 2, 3]
    state = load_checkpoint(os.path.join(folder, rl_quantize.STATE_FILE))
    assert state["episode"] == 4 and [h["episode"] for h in state["history"]] == [0, 1, 2, 3]
    with open(os.path.join(folder, "strategy.json")) as f:
        assert json.load(f)["episode"] == state["best"]["episode"]


@pytest.mark.slow
def test_killed_search_resumes_each_episode_exactly_once(assets, tmp_path):
    """A real SIGKILL of the CLI process after its second logged episode, then --resume_search."""
    argv = common(assets, tmp_path, episodes=5) + ["--arch", "mobilenetv2", "--max_bit", "4",
                                                   "--preserve_ratio", "0.2"]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=ROOT)
    with open(tmp_path / "stderr.txt", "w") as err:
        proc = subprocess.Popen([sys.executable, "rl_quantize.py"] + argv, cwd=ROOT, env=env,
                                stdout=subprocess.DEVNULL, stderr=err)
        deadline = time.time() + 120
        folder = None
        while time.time() < deadline and proc.poll() is None:
            dirs = os.listdir(tmp_path / "") if os.path.isdir(tmp_path) else []
            runs = [d for d in dirs if "-run" in d]
            if runs:
                folder = str(tmp_path / runs[0])
                if os.path.isfile(os.path.join(folder, "log.txt")) and \
                        len(log_episodes(folder)) >= 2:
                    break
            time.sleep(0.05)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert folder is not None, open(tmp_path / "stderr.txt").read()
    before = log_episodes(folder)
    assert 2 <= len(before) < 5, before
    saved = load_checkpoint(os.path.join(folder, rl_quantize.STATE_FILE))["episode"]
    assert saved in (len(before), len(before) - 1)   # killed before or after the state save
    rl_quantize.main(argv + ["--resume_search"])
    assert log_episodes(folder) == [0, 1, 2, 3, 4]
    state = load_checkpoint(os.path.join(folder, rl_quantize.STATE_FILE))
    assert state["episode"] == 5 and len(state["history"]) == 5
    assert [h["episode"] for h in state["history"]] == [0, 1, 2, 3, 4]


def _error_line(capsys, argv):
    with pytest.raises(SystemExit) as exc:
        run_cli(rl_quantize.main, argv)
    assert exc.value.code != 0
    err = capsys.readouterr().err.strip().splitlines()
    assert err and err[-1].startswith("error: ") and not any("Traceback" in ln for ln in err)
    return err[-1]


def test_bad_arch_is_one_line_error(assets, tmp_path, capsys):
    line = _error_line(capsys, common(assets, tmp_path) + ["--arch", "nonet"])
    assert "unknown arch 'nonet'" in line


def test_missing_dataset_is_one_line_error(assets, tmp_path, capsys):
    argv = common(assets, tmp_path) + ["--arch", "mobilenetv2"]
    argv[argv.index("mnist5k")] = str(tmp_path / "no_such_dataset")
    line = _error_line(capsys, argv)
    assert "no_such_dataset" in line
    assert not os.listdir(tmp_path)     # nothing written


def test_unreachable_budget_is_one_line_error(assets, tmp_path, capsys):
    line = _error_line(capsys, common(assets, tmp_path) + [
        "--arch", "mobilenetv2", "--preserve_ratio", "0.01", "--min_bit", "2"])
    assert "unreachable" in line and "0.0625" in line


def test_wrong_cost_table_is_one_line_error(assets, tmp_path, capsys):
    line = _error_line(capsys, common(assets, tmp_path) + [
        "--arch", "qmobilenetv2", "--linear_quantization", "--cost_table", assets["bad_table"]])
    assert "(53, 8, 8)" in line
