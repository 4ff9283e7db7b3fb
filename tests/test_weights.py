"""--weights and --kl_max_bit (issue 29): which pretrained weights a search and a fine-tune start
from, where that is recorded, and the released calibration rule inside the search.

No network: torchvision's weights API is replaced in each test that uses it (monkeypatch), and
files are random-init models written here.
"""
import enum
import hashlib
import json
import os

import pytest
import torch

import finetune
import rl_quantize
from helpers import fake_imagenet, tiny_search_argv
from lib.utils.checkpoint import load_checkpoint, save_checkpoint
from lib.utils.errors import UserError, run_cli
from models import get_model, load_pretrained_weights
from test_linear_ranges import _released_rule_by_hand

WNIDS = ["n01440764", "n01443537", "n01484850"]
TINY = dict(num_classes=1000, input_size=32, width_mult=0.25)


def _state(seed):
    torch.manual_seed(seed)
    return get_model("mobilenetv2", **TINY).state_dict()


@pytest.fixture
def torchvision_weights(monkeypatch):
    """torchvision's weights API for every model: V1 and V2 are two random-init state dicts of
    the tiny ImageNet MobileNet-V2, DEFAULT an alias of V2 (as torchvision's enums are)."""
    import torchvision
    states = {"v1": _state(1), "v2": _state(2)}
    fetched = []

    class FakeWeights(enum.Enum):
        IMAGENET1K_V1 = "v1"
        IMAGENET1K_V2 = "v2"
        DEFAULT = "v2"

        def get_state_dict(self, progress=False):
            fetched.append(self.name)
            return states[self.value]

    monkeypatch.setattr(torchvision.models, "get_model_weights", lambda name: FakeWeights)
    return states, fetched


def _same_weights(model, state):
    return all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), state.values()))


@pytest.mark.parametrize("name,key,recorded", [("IMAGENET1K_V1", "v1", "IMAGENET1K_V1"),
                                               ("IMAGENET1K_V2", "v2", "IMAGENET1K_V2"),
                                               ("DEFAULT", "v2", "IMAGENET1K_V2")])
def test_a_torchvision_name_loads_those_weights(torchvision_weights, name, key, recorded):
    states, _ = torchvision_weights
    model = get_model("mobilenetv2", **TINY)
    source = load_pretrained_weights(model, "mobilenetv2", "imagenet", name=name)
    assert source == {"name": recorded}     # DEFAULT is recorded as what it is today
    assert _same_weights(model, states[key])


def test_a_name_wins_over_a_local_file_and_a_file_is_recorded_by_content(
        torchvision_weights, tmp_path):
    states, _ = torchvision_weights
    path = tmp_path / "mine.pth.tar"
    save_checkpoint({"state_dict": _state(3)}, str(path))
    model = get_model("mobilenetv2", **TINY)
    assert load_pretrained_weights(model, "mobilenetv2", "imagenet", str(path),
                                   "IMAGENET1K_V1") == {"name": "IMAGENET1K_V1"}
    assert _same_weights(model, states["v1"])
    source = load_pretrained_weights(model, "mobilenetv2", "imagenet", str(path))
    assert source == {"path": str(path), "sha256": hashlib.sha256(path.read_bytes()).hexdigest()}
    assert _same_weights(model, _state(3))


def test_names_need_imagenet_and_torchvision_must_know_them(torchvision_weights):
    model = get_model("mobilenetv2", num_classes=10, input_size=32, width_mult=0.25)
    with pytest.raises(UserError, match="expected --dataset imagenet"):
        load_pretrained_weights(model, "mobilenetv2", "mnist5k", name="IMAGENET1K_V1")
    with pytest.raises(UserError, match="do not fit"):   # 10 classes against 1000
        load_pretrained_weights(model, "mobilenetv2", "imagenet", name="IMAGENET1K_V1")


@pytest.mark.parametrize("argv,expected", [
    (["--weights", "IMAGENET1K_V3"], "neither a file nor a torchvision weights name"),
    (["--weights", "IMAGENET1K_V1", "--pretrained_path", "x.pth.tar"], "two sources"),
])
def test_bad_weights_flags_are_one_line_errors(argv, expected, capsys, tmp_path):
    for cli in (rl_quantize, finetune):
        extra = ["--output", str(tmp_path)] if cli is rl_quantize else [
            "--strategy", "mobilenetv2_linear_0.6"]
        with pytest.raises(SystemExit) as exc:
            run_cli(cli.main, argv + extra)
        err = capsys.readouterr().err.strip().splitlines()
        assert exc.value.code == 2 and expected in err[-1] and "Traceback" not in "\n".join(err)


def test_a_file_search_and_finetune_record_the_file(tiny_pretrained, tmp_path):
    """--weights PATH: strategy.json, the search state and results.json hold its path and
    sha256; the summary shows it; a resume from other weights is refused."""
    weights = tiny_pretrained[0]
    sha = hashlib.sha256(open(weights, "rb").read()).hexdigest()
    record = {"path": os.path.abspath(weights), "sha256": sha}
    argv = tiny_search_argv(weights, tmp_path / "s", 1)
    argv[argv.index("--pretrained_path")] = "--weights"
    out = rl_quantize.main(argv)["output"]
    strategy = json.loads(open(os.path.join(out, "strategy.json")).read())
    assert strategy["weights"] == record
    state = load_checkpoint(os.path.join(out, rl_quantize.STATE_FILE))
    assert state["args"]["weights_source"] == record
    res = finetune.main(["--strategy", os.path.join(out, "strategy.json"), "--weights", weights,
                         "-c", str(tmp_path / "ft"), "--epochs", "1", "--train_subset", "16",
                         "--train_batch", "16", "--test_batch", "16", "--device", "cpu",
                         "--no-progress", "--no-eval_fp32"])
    assert res["weights"] == record
    assert json.loads((tmp_path / "ft" / "results.json").read_text())["weights"] == record
    from lib.report.__main__ import main as report_main
    table = report_main(["runs", out, str(tmp_path / "ft"), "--out", str(tmp_path / "report")])
    assert f"| {os.path.basename(weights)} ({sha[:8]}) |" in table

    other = tmp_path / "other.pth.tar"
    ck = load_checkpoint(weights)
    ck["state_dict"] = {k: v + 1 if v.is_floating_point() else v
                        for k, v in ck["state_dict"].items()}
    save_checkpoint(ck, str(other))
    with pytest.raises(UserError, match="was searched from the weights"):
        rl_quantize.main(argv[:argv.index("--weights")] + ["--weights", str(other)]
                         + argv[argv.index("--weights") + 2:]
                         + ["--train_episode", "2", "--resume_search", out])
    # a state written before weights and kl_max_bit were recorded still resumes
    del state["args"]["weights_source"], state["args"]["kl_max_bit"]
    save_checkpoint(state, os.path.join(out, rl_quantize.STATE_FILE))
    rl_quantize.main(argv + ["--train_episode", "2", "--resume_search", out])
    assert len(open(os.path.join(out, "log.txt")).read().splitlines()) == 3   # header + 2


@pytest.mark.parametrize("field,value,ok", [("weights", None, True),
                                            ("weights", {"name": "IMAGENET1K_V1"}, True),
                                            ("weights", {"path": "w.pth.tar", "sha256": "ab"}, True),
                                            ("weights", {"name": 3}, False),
                                            ("weights", "IMAGENET1K_V1", False),
                                            ("weights", {"path": "w.pth.tar"}, False),
                                            ("kl_max_bit", 4, True), ("kl_max_bit", 9, False),
                                            ("kl_max_bit", True, False)])
def test_strategy_files_may_lack_the_new_fields_but_not_mistype_them(tmp_path, field, value, ok):
    from lib.utils.strategy import load_strategy
    data = {"mode": "kmeans", "strategy": [4, 4]}
    if value is not None:
        data[field] = value
    path = tmp_path / "s.json"
    path.write_text(json.dumps(data))
    if ok:
        assert load_strategy(str(path)).get(field) == value
    else:
        with pytest.raises(UserError, match=f"'{field}' is"):
            load_strategy(str(path))


def test_a_torchvision_search_and_finetune_record_the_name(torchvision_weights, tmp_path):
    """--weights IMAGENET1K_V1 on a (fake) ImageNet: the name in strategy.json, the search state
    and results.json; a resume with V2 is refused."""
    _, fetched = torchvision_weights
    root = fake_imagenet(tmp_path / "imagenet", WNIDS, per_class=4, size=32)
    argv = ["--dataset", "imagenet", "--dataset_root", root, "--weights", "IMAGENET1K_V1",
            "--width_mult", "0.25", "--input_size", "32", "--train_size", "6", "--val_size", "6",
            "--data_bsize", "6", "--n_worker", "0", "--warmup", "1", "--train_episode", "1",
            "--output", str(tmp_path / "s"), "--max_bit", "4", "--preserve_ratio", "0.2",
            "--device", "cpu"]
    out = rl_quantize.main(argv)["output"]
    assert fetched == ["IMAGENET1K_V1"]
    strategy = json.loads(open(os.path.join(out, "strategy.json")).read())
    assert strategy["weights"] == {"name": "IMAGENET1K_V1"}
    state = load_checkpoint(os.path.join(out, rl_quantize.STATE_FILE))
    assert state["args"]["weights_source"] == {"name": "IMAGENET1K_V1"}
    res = finetune.main(["--strategy", os.path.join(out, "strategy.json"), "--weights",
                         "IMAGENET1K_V1", "-d", root, "-c", str(tmp_path / "ft"), "--epochs", "1",
                         "--train_batch", "6", "--test_batch", "6", "--device", "cpu",
                         "--no-progress", "--no-eval_fp32"])
    assert res["weights"] == {"name": "IMAGENET1K_V1"}
    argv[argv.index("IMAGENET1K_V1")] = "IMAGENET1K_V2"
    with pytest.raises(UserError, match="searched from the weights IMAGENET1K_V1"):
        rl_quantize.main(argv + ["--train_episode", "2", "--resume_search", out])


def _linear_search_env(weights, kl_max_bit):
    args = rl_quantize.get_args_parser().parse_args(
        ["--linear_quantization", "--dataset", "mnist5k", "--width_mult", "0.25",
         "--pretrained_path", weights, "--train_size", "32", "--val_size", "32", "--data_bsize",
         "32", "--n_worker", "0", "--device", "cpu", "--min_bit", "2", "--kl_max_bit",
         str(kl_max_bit)])
    rl_quantize.check_args(args)
    loaders = rl_quantize.build_loaders(args)
    model, info = rl_quantize.build_model(args, "cpu")
    return rl_quantize.build_env(args, model, info, loaders, "cpu")


def test_search_calibration_with_kl_max_bit_4_is_the_released_rule(tiny_pretrained):
    """The search env built from --kl_max_bit 4 calibrates weights of <= 4 bits by the released
    divergence rule (the test's by-hand reference of the release) and wider ones by max|w|;
    with 0, max|w| everywhere."""
    from lib.quantize.linear import quant_layers
    from lib.quantize.policy import apply_linear_policy
    weights = tiny_pretrained[0]
    for kl_max_bit in (4, 0):
        env = _linear_search_env(weights, kl_max_bit)
        n = len(env.layers)
        policy = [[8, -1]] + [[3, 8] if i % 2 else [6, 8] for i in range(1, n - 1)] + [[8, 8]]
        env.restore_weights()
        apply_linear_policy(env.model, policy)
        env.calibrate()
        layers = quant_layers(env.model)
        for i in (1, 2, 3, 4):
            w = layers[i].weight.detach()
            got = layers[i].weight_range.item()
            if kl_max_bit and layers[i].w_bit <= 4:
                reference = _released_rule_by_hand(w.numpy().reshape(-1), layers[i].w_bit)
                assert got == pytest.approx(reference, rel=1e-6)
                assert got != pytest.approx(w.abs().max().item())   # the rule, not max|w|
            else:
                assert got == pytest.approx(w.abs().max().item())
