"""Released spellings (issue 11 item 8): one boolean style in every CLI, --eval, --half_type,
and the released run scripts' exact command lines."""
import argparse
import shlex

import pytest
import torch

import finetune
import pretrain
import rl_quantize
from lib.simulator import __main__ as simulator_cli
from lib.utils.cli import BoolAction
from lib.utils.train import _autocast, autocast_dtype

PARSERS = {"finetune": finetune.get_args_parser, "pretrain": pretrain.get_args_parser,
           "rl_quantize": rl_quantize.get_args_parser, "simulator": simulator_cli.get_args_parser}
# arguments a parser needs besides the flag under test
REQUIRED = {"simulator": ["--arch", "mobilenetv2", "--hardware", "bismo_edge"]}

# values after the flag -> the value it must give ([]: the bare flag)
SPELLINGS = [([], True), (["True"], True), (["False"], False), (["true"], True), (["false"], False),
             (["1"], True), (["0"], False), (["yes"], True), (["no"], False)]


def _bool_actions(parser):
    return [a for a in parser._actions if isinstance(a, BoolAction)]


def _cases():
    for cli, make in PARSERS.items():
        for action in _bool_actions(make()):
            yield cli, action


@pytest.mark.parametrize("cli", sorted(PARSERS))
def test_every_boolean_is_one_style(cli):
    """No store_true / BooleanOptionalAction left: every value-less flag is a BoolAction."""
    parser = PARSERS[cli]()
    for action in parser._actions:
        if isinstance(action, argparse._HelpAction):
            continue
        if action.nargs == 0 or isinstance(action, argparse.BooleanOptionalAction):
            pytest.fail(f"{cli}: {action.option_strings} is not a bool_flag")
    assert _bool_actions(parser)


@pytest.mark.parametrize("cli,action", list(_cases()),
                         ids=[f"{c}:{a.dest}" for c, a in _cases()])
def test_each_released_spelling_parses(cli, action):
    parser = PARSERS[cli]()
    base = REQUIRED.get(cli, [])
    for name in action.option_strings:
        if name in action.negations:
            assert getattr(parser.parse_args(base + [name]), action.dest) is False, name
            continue
        for extra, want in SPELLINGS:
            got = getattr(parser.parse_args(base + [name] + extra), action.dest)
            assert got is want, (name, extra, got)
        if name.startswith("--"):
            assert getattr(parser.parse_args(base + [f"{name}=False"]), action.dest) is False
    first_long = next(n for n in action.option_strings if n.startswith("--"))
    if action.dest.startswith("no"):   # --no_plot: already a negation
        assert action.negations == ()
    else:
        assert action.negations == (f"--no-{first_long[2:]}",)


def test_flag_defaults_unchanged_by_the_new_style():
    ft = finetune.get_args_parser().parse_args([])
    assert (ft.pretrained, ft.free_high_bit, ft.eval_fp32, ft.evaluate, ft.half) == \
        (True, True, True, False, False)
    assert ft.linear_quantization is None     # unset: the strategy decides
    pre = pretrain.get_args_parser().parse_args([])
    assert (pre.channels_last, pre.resume, pre.progress) == (True, False, True)
    rl = rl_quantize.get_args_parser().parse_args([])
    assert (rl.finetune_flag, rl.linear_quantization, rl.progress) == (True, False, False)


def test_eval_is_evaluate_and_free_high_bit_false_parses():
    p = finetune.get_args_parser()
    for spelling in (["-e"], ["--evaluate"], ["--eval"], ["--eval", "True"]):
        assert p.parse_args(spelling).evaluate is True
    assert p.parse_args(["--free_high_bit", "False"]).free_high_bit is False
    assert p.parse_args(["--no-free_high_bit"]).free_high_bit is False
    assert p.parse_args(["--linear_quantize"]).linear_quantization is True


@pytest.mark.parametrize("half_type,cpu,cuda", [
    ("O0", None, None), ("O1", torch.bfloat16, torch.float16), ("O2", torch.bfloat16, torch.float16),
    ("O3", torch.bfloat16, torch.float16), ("fp16", torch.float16, torch.float16),
    ("bf16", torch.bfloat16, torch.bfloat16)])
def test_half_type_maps_to_an_autocast_dtype(half_type, cpu, cuda):
    p = finetune.get_args_parser()
    args = p.parse_args(["--half", "--half_type", half_type])
    assert autocast_dtype(args, torch.device("cpu")) == cpu
    assert autocast_dtype(args, torch.device("cuda")) == cuda
    # without --half, --half_type changes nothing (as released: apex only ran under --half)
    assert autocast_dtype(p.parse_args(["--half_type", half_type]),
                                   torch.device("cpu")) is None
    if cpu is not None:   # the dtype reaches the train/eval loops' autocast
        conv = torch.nn.Conv2d(3, 4, 3)
        with _autocast(torch.device("cpu"), cpu):
            assert conv(torch.randn(1, 3, 8, 8)).dtype == cpu


def test_half_type_default_and_bad_value():
    p = finetune.get_args_parser()
    assert p.parse_args([]).half_type == "O1"    # the released default
    from lib.utils.errors import UserError
    with pytest.raises(UserError, match="half_type"):
        p.parse_args(["--half_type", "O4"])


# The released scripts' command lines (mit-han-lab/haq run/*.sh), after `python -W ignore X`.
RELEASED = {
    "run_linear_quantize_eval.sh": ("finetune", """
        -a qmobilenetv2 --resume checkpoints/mobilenetv2/qmobilenetv2_0.6_71.23.pth.tar
        --workers 32 --test_batch 512 --gpu_id 0,1,2,3 --free_high_bit False
        --linear_quantization --eval""",
        dict(arch="qmobilenetv2", resume="checkpoints/mobilenetv2/qmobilenetv2_0.6_71.23.pth.tar",
             workers=32, test_batch=512, gpu_id="0,1,2,3", free_high_bit=False,
             linear_quantization=True, evaluate=True)),
    "run_kmeans_quantize_eval.sh": ("finetune", """
        -a resnet50 --resume checkpoints/resnet50/resnet50_0.1_75.48.pth.tar --workers 32
        --test_batch 512 --free_high_bit False --eval""",
        dict(arch="resnet50", workers=32, test_batch=512, free_high_bit=False, evaluate=True)),
    "run_eval.sh": ("finetune", """
        -a resnet50 --resume checkpoints/resnet50/resnet50_0.1_75.48.pth.tar --workers 32
        --test_batch 512 --gpu_id 0,1,2,3 --free_high_bit False --eval""",
        dict(arch="resnet50", gpu_id="0,1,2,3", free_high_bit=False, evaluate=True)),
    "run_linear_quantize_finetune.sh": ("finetune", """
        -a qmobilenetv2 -c checkpoints/imagenet_qmobilenetv2_lr010e30_ratio060
        --data_name imagenet --data data/imagenet/ --epochs 30 --lr 0.01 --train_batch 256
        --wd 4e-5 --workers 32 --pretrained --linear_quantize""",
        dict(checkpoint="checkpoints/imagenet_qmobilenetv2_lr010e30_ratio060", data_name="imagenet",
             data="data/imagenet/", epochs=30, lr=0.01, train_batch=256, wd=4e-5, workers=32,
             pretrained=True, linear_quantization=True, evaluate=False)),
    "run_kmeans_quantize_finetune.sh": ("finetune", """
        -a resnet50 -c checkpoints/resnet50 --epochs 100 --lr 0.01 --train_batch 256
        --workers 32 --pretrained""",
        dict(arch="resnet50", checkpoint="checkpoints/resnet50", epochs=100, lr=0.01,
             pretrained=True)),
    "run_finetune.sh": ("finetune", """
        -a resnet50 -c checkpoints/resnet50 --epochs 100 --lr 0.01 --train_batch 256
        --workers 32 --pretrained --gpu_id 0,1,2,3""",
        dict(epochs=100, gpu_id="0,1,2,3")),
    "run_linear_quantize_search.sh": ("rl_quantize", """
        --arch qmobilenetv2 --dataset imagenet100 --dataset_root data/imagenet100
        --suffix ratio0556bit28 --preserve_ratio 0.556 --float_bit 8 --max_bit 8 --min_bit 2
        --n_worker 32 --data_bsize 128 --train_size 20000 --val_size 10000 --linear_quantization""",
        dict(arch="qmobilenetv2", dataset="imagenet100", preserve_ratio=0.556, float_bit=8,
             min_bit=2, data_bsize=128, linear_quantization=True)),
    "run_kmeans_quantize_search.sh": ("rl_quantize", """
        --arch resnet50 --dataset imagenet --suffix ratio010 --preserve_ratio 0.1 --n_worker 32
        --data_bsize 256 --train_size 20000 --val_size 10000""",
        dict(arch="resnet50", suffix="ratio010", preserve_ratio=0.1, linear_quantization=False)),
}


@pytest.mark.parametrize("script", sorted(RELEASED))
def test_released_command_lines_parse(script):
    cli, line, want = RELEASED[script]
    args = PARSERS[cli]().parse_args(shlex.split(line))
    got = {k: getattr(args, k) for k in want}
    assert got == want
