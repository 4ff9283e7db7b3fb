"""The warning when every random warmup policy scores near chance (lib.search.chance, issue 33)."""
import pytest
from PIL import Image

from lib.search.chance import chance_margin, chance_warning

FLAGS = {"metric": "latency", "min_bit": 1, "preserve_ratio": 0.5}
WARNING = "warmup policies scored near chance"


def test_margin_is_a_tenth_of_the_gap_plus_two_sigmas_of_sampling_noise():
    # 10 classes, 98% original, 10,000 images: 8.8 points of the gap + 2 x 0.3 points of noise
    assert chance_margin(0.1, 98.0, 10000) == pytest.approx(8.8 + 0.6)
    # the noise term dominates on a handful of images: 2 x 100 x sqrt(0.25 / 16) = 25 points
    assert chance_margin(0.5, 100.0, 16) == pytest.approx(5.0 + 25.0)


def test_warns_only_when_every_warmup_policy_is_near_chance():
    message = chance_warning([9.5, 11.0, 15.0], 10, 98.0, 10000, FLAGS)
    assert message and "\n" not in message
    assert "--min_bit (now 1)" in message and "--preserve_ratio (now 0.5)" in message
    assert "latency budget" in message and "chance 10.00% of 10 classes" in message
    assert chance_warning([9.5, 11.0, 30.0], 10, 98.0, 10000, FLAGS) is None   # one learned
    assert chance_warning([9.5, 10.0], 10, 10.5, 10000, FLAGS) is None   # weights at chance
    assert chance_warning([], 10, 98.0, 10000, FLAGS) is None


def test_top5_chance_is_five_classes_in_n():
    assert chance_warning([52.0], 10, 99.0, 10000, FLAGS, top_k=5) is not None
    assert chance_warning([52.0], 10, 99.0, 10000, FLAGS) is None
    assert chance_warning([100.0], 5, 100.0, 10000, FLAGS, top_k=5) is None   # nothing to lose


@pytest.fixture(scope="module")
def two_colours(tmp_path_factory):
    """A red/blue 32-px ImageFolder and weights pretrain.py trains on it to 100%."""
    import pretrain
    root = tmp_path_factory.mktemp("colours")
    for split, n in (("train", 16), ("val", 4)):
        for name, colour in (("red", (220, 30, 30)), ("blue", (30, 30, 220))):
            (root / split / name).mkdir(parents=True)
            for i in range(n):
                shade = tuple(min(255, c + 3 * i) for c in colour)
                Image.new("RGB", (32, 32), shade).save(root / split / name / f"{i}.png")
    weights = str(root / "weights.pth.tar")
    pretrain.main(["--arch", "mobilenetv2", "--dataset", str(root), "--input_size", "32",
                   "--width_mult", "0.25", "--epochs", "12", "-b", "8", "--lr", "0.05",
                   "--ema_decay", "0", "--device", "cpu", "--output", weights, "--no-progress"])
    return weights


def _search(weights, out, bits, capsys):
    import rl_quantize
    capsys.readouterr()
    res = rl_quantize.main(["--pretrained_path", weights, "--linear_quantization", "--min_bit",
                            bits, "--max_bit", bits, "--preserve_ratio", "1.0", "--train_size",
                            "16", "--val_size", "16", "--data_bsize", "16", "--n_worker", "0",
                            "--warmup", "2", "--train_episode", "3", "--finetune_flag", "False",
                            "--device", "cpu", "--output", str(out)])
    return res, capsys.readouterr().err


def test_a_search_whose_warmup_is_at_chance_warns_once(two_colours, tmp_path, capsys):
    """1-bit signed weights round to zero: every policy predicts one class."""
    res, err = _search(two_colours, tmp_path, "1", capsys)
    assert res["accuracy"] < 80.0
    lines = [line for line in err.splitlines() if WARNING in line]
    assert len(lines) == 1, err[-3000:]
    assert "WARNING" in lines[0] and "raise --min_bit (now 1)" in lines[0]
    # logged after the last warmup episode, before the first of the agent's
    order = [line for line in err.splitlines() if "episode 2/3" in line or "episode 3/3" in line
             or WARNING in line]
    assert WARNING in order[1]


def test_a_search_whose_warmup_is_not_at_chance_does_not_warn(two_colours, tmp_path, capsys):
    res, err = _search(two_colours, tmp_path, "8", capsys)
    assert res["accuracy"] == 100.0
    assert WARNING not in err
