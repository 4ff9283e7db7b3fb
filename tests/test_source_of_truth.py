"""The pretrained checkpoint and strategy.json as the one source of the model's settings
(issue 33.1): arch, width, input size, number of classes and dataset reach the search,
the uniform baseline and the fine-tune without flags; a flag that disagrees is refused."""
import json
import os

import pytest
import torch

from lib.utils.errors import UserError

SMALL = ["--train_size", "8", "--val_size", "8", "--data_bsize", "8", "--n_worker", "0",
         "--warmup", "1", "--train_episode", "1", "--finetune_flag", "False", "--device", "cpu",
         "--preserve_ratio", "0.5", "--max_bit", "4"]
FINETUNE = ["--epochs", "1", "--train_batch", "8", "--test_batch", "8", "--no-eval_fp32",
            "--device", "cpu", "--no-progress"]


@pytest.fixture(scope="module")
def folder_and_weights(tmp_path_factory):
    """A 2-class ImageFolder (ImageNet-sized default: 224 px) and weights pretrained on it as
    pretrain.py records them: 32 px, width 0.25."""
    from PIL import Image

    from lib.utils.checkpoint import save_checkpoint
    from lib.utils.run_utils import model_kwargs_for
    from models import get_model
    root = tmp_path_factory.mktemp("digits")
    for split in ("train", "val"):
        for c, value in (("a", 40), ("b", 200)):
            d = root / split / c
            d.mkdir(parents=True)
            for i in range(8):
                Image.new("RGB", (28, 28), (value, i * 30, 0)).save(d / f"{i}.png")
    kwargs = model_kwargs_for("mobilenetv2", str(root), width_mult=0.25, input_size=32)
    torch.manual_seed(0)
    model = get_model("mobilenetv2", **kwargs)
    weights = str(root / "pre.pth.tar")
    save_checkpoint({"state_dict": model.state_dict(), "epoch": 1, "arch": "mobilenetv2",
                     "dataset": str(root), "model_kwargs": kwargs}, weights)
    return str(root), weights


@pytest.fixture(scope="module")
def search(folder_and_weights, tmp_path_factory):
    import rl_quantize
    _, weights = folder_and_weights
    out = tmp_path_factory.mktemp("search")
    res = rl_quantize.main(["--pretrained_path", weights, "--output", str(out)] + SMALL)
    with open(os.path.join(res["output"], "strategy.json")) as f:
        return os.path.join(res["output"], "strategy.json"), json.load(f)


def test_search_takes_every_setting_from_the_checkpoint(folder_and_weights, search):
    root, _ = folder_and_weights
    _, strategy = search
    assert (strategy["dataset"], strategy["input_size"], strategy["width_mult"],
            strategy["num_classes"], strategy["arch"]) == (root, 32, 0.25, 2, "mobilenetv2")


def test_uniform_baseline_of_a_32_px_search_fine_tunes_at_32_px(search, tmp_path):
    import finetune
    from lib.report.uniform import write_uniform
    from lib.utils.checkpoint import load_checkpoint
    path, strategy = search
    uniform = write_uniform(path, str(tmp_path / "uniform.json"), bits=4)
    for key in ("dataset", "input_size", "width_mult", "num_classes", "arch"):
        assert uniform[key] == strategy[key], key
    # no pretrained checkpoint to fall back on: the strategy alone must say 32 px
    finetune.main(["--strategy", str(tmp_path / "uniform.json"), "--no-pretrained",
                   "-c", str(tmp_path / "ft")] + FINETUNE)
    kwargs = load_checkpoint(str(tmp_path / "ft" / "checkpoint.pth.tar"))["model_kwargs"]
    assert kwargs == {"num_classes": 2, "input_size": 32, "width_mult": 0.25}


def test_finetune_takes_the_size_and_width_from_the_checkpoint(folder_and_weights, tmp_path):
    """A bare policy (no settings of its own): the pretrained checkpoint gives them all."""
    import finetune
    from lib.utils.checkpoint import load_checkpoint
    root, weights = folder_and_weights
    policy = tmp_path / "bare.json"
    policy.write_text(json.dumps({"mode": "kmeans", "strategy": [4] * 53}))
    finetune.main(["--strategy", str(policy), "--pretrained_path", weights,
                   "-c", str(tmp_path / "ft")] + FINETUNE)
    ckpt = load_checkpoint(str(tmp_path / "ft" / "checkpoint.pth.tar"))
    assert ckpt["dataset"] == root
    assert ckpt["model_kwargs"] == {"num_classes": 2, "input_size": 32, "width_mult": 0.25}


@pytest.mark.parametrize("flags, named", [
    (["--input_size", "64"], ("--input_size 64", "32")),
    (["--width_mult", "0.5"], ("--width_mult 0.5", "0.25")),
    (["--dataset", "mnist5k"], ("--dataset mnist5k", "digits")),
    (["--arch", "resnet18"], ("--arch resnet18", "mobilenetv2")),
])
def test_search_refuses_a_flag_that_disagrees_with_the_checkpoint(folder_and_weights, tmp_path,
                                                                  flags, named):
    import rl_quantize
    _, weights = folder_and_weights
    with pytest.raises(UserError) as err:
        rl_quantize.main(["--pretrained_path", weights, "--output", str(tmp_path)] + SMALL + flags)
    assert all(n in str(err.value) for n in named) and "\n" not in str(err.value)
    assert not os.listdir(tmp_path)   # refused before anything is written


@pytest.mark.parametrize("flags, named", [
    (["--input_size", "64"], ("--input_size 64", "32")),
    (["--width_mult", "0.5"], ("--width_mult 0.5", "0.25")),
])
def test_finetune_refuses_a_flag_that_disagrees(search, folder_and_weights, tmp_path, flags,
                                                named):
    import finetune
    path, _ = search
    _, weights = folder_and_weights
    for source in (["--no-pretrained"], ["--pretrained_path", weights]):
        with pytest.raises(UserError) as err:
            finetune.main(["--strategy", path, "-c", str(tmp_path / "ft")] + source + FINETUNE
                          + flags)
        assert all(n in str(err.value) for n in named)
    assert not os.path.exists(tmp_path / "ft")


def test_an_older_strategy_without_input_size(search, folder_and_weights, tmp_path):
    """Read where a record settles the size (the checkpoint); refused where the ImageFolder's
    224-px default would be a guess."""
    import finetune
    from lib.utils.checkpoint import load_checkpoint
    path, strategy = search
    _, weights = folder_and_weights
    older = tmp_path / "older.json"
    older.write_text(json.dumps({k: v for k, v in strategy.items()
                                 if k not in ("input_size", "num_classes")}))
    with pytest.raises(UserError, match="records no input_size.*expected --input_size"):
        finetune.main(["--strategy", str(older), "--no-pretrained", "-c",
                       str(tmp_path / "a")] + FINETUNE)
    finetune.main(["--strategy", str(older), "--pretrained_path", weights, "-c",
                   str(tmp_path / "b")] + FINETUNE)
    kwargs = load_checkpoint(str(tmp_path / "b" / "checkpoint.pth.tar"))["model_kwargs"]
    assert kwargs["input_size"] == 32


def test_a_policy_may_be_fine_tuned_on_another_dataset(search, tmp_path):
    """As released (searched on imagenet100, fine-tuned on imagenet): --data_name overrides the
    strategy's dataset; its size and width still hold."""
    import finetune
    from lib.utils.checkpoint import load_checkpoint
    path, _ = search
    finetune.main(["--strategy", path, "--data_name", "mnist5k", "--no-pretrained",
                   "--train_subset", "8", "-c", str(tmp_path / "ft")] + FINETUNE)
    ckpt = load_checkpoint(str(tmp_path / "ft" / "checkpoint.pth.tar"))
    assert ckpt["dataset"] == "mnist5k"
    assert ckpt["model_kwargs"] == {"num_classes": 10, "input_size": 32, "width_mult": 0.25}


def test_the_same_folder_spelled_otherwise_agrees(folder_and_weights):
    from lib.utils.recorded import settle
    root, _ = folder_and_weights
    assert settle("--dataset", root + "/./", root, "x") == root + "/./"
    assert settle("--width_mult", 0.25, 0.25, "x") == 0.25
    with pytest.raises(UserError, match=r"--dataset mnist5k disagrees .* or no --dataset"):
        settle("--dataset", "mnist5k", root, "x")


def test_resume_refuses_a_size_its_checkpoint_was_not_built_at(kmeans_finetune_checkpoint):
    import finetune
    ckpt = kmeans_finetune_checkpoint(lambda i: 4)
    with pytest.raises(UserError, match=r"--input_size 64 disagrees with 32 recorded in --resume"):
        finetune.main(["--resume", ckpt, "-e", "--input_size", "64", "--device", "cpu"])


@pytest.mark.parametrize("mode, dropped", [("kmeans", "dataset"), ("linear", "input_size")])
def test_uniform_refuses_a_strategy_without_a_field_it_needs(tmp_path, mode, dropped):
    """No guessed dataset (it was imagenet) nor, for a latency budget, a guessed image size."""
    from lib.report.uniform import write_uniform
    strategy = {"arch": "qmobilenetv2", "mode": mode, "preserve_ratio": 0.5, "metric": "latency",
                "hardware": "bismo_cloud", "dataset": "mnist5k", "input_size": 32,
                "width_mult": 0.25, "strategy": [[8, -1], [8, 8]] if mode == "linear" else [8, 8]}
    del strategy[dropped]
    path = tmp_path / "s.json"
    path.write_text(json.dumps(strategy))
    with pytest.raises(UserError, match=f"has no '{dropped}'"):
        write_uniform(str(path), str(tmp_path / "u.json"))
    assert not os.path.exists(tmp_path / "u.json")


def test_real_pretrain_checkpoint_reaches_search_and_finetune(folder_and_weights, tmp_path):
    """What pretrain.py itself records (not a hand-made checkpoint) is what the others read."""
    import finetune
    import pretrain
    import rl_quantize
    from lib.utils.checkpoint import load_checkpoint
    root, _ = folder_and_weights
    weights = str(tmp_path / "pre.pth.tar")
    pretrain.main(["--dataset", root, "--input_size", "32", "--width_mult", "0.25", "--epochs",
                   "1", "--batch_size", "8", "--workers", "0", "--output", weights,
                   "--no-progress", "--device", "cpu"])
    res = rl_quantize.main(["--pretrained_path", weights, "--output", str(tmp_path / "s")] + SMALL)
    strategy = os.path.join(res["output"], "strategy.json")
    finetune.main(["--strategy", strategy, "--pretrained_path", weights, "-c",
                   str(tmp_path / "ft")] + FINETUNE)
    ckpt = load_checkpoint(str(tmp_path / "ft" / "checkpoint.pth.tar"))
    assert (ckpt["dataset"], ckpt["model_kwargs"]) == (
        root, {"num_classes": 2, "input_size": 32, "width_mult": 0.25})
