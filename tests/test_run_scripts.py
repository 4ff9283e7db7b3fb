"""The run/*.sh scripts pass the released HAQ settings, in flags our CLIs accept."""
import os
import re
import shlex

import pytest

from tests.conftest import ROOT


def script_args(name):
    """The argument list a run script hands its CLI, with "${VAR:-default}" read as default."""
    text = open(os.path.join(ROOT, "run", name)).read()
    body = text[text.index("exec "):text.index('"$@"')]
    body = re.sub(r'"\$\{\w+:-([^}]*)\}"', r"\1", body.replace("\\\n", " "))
    body = re.sub(r'"\$(\w+)"', lambda m: {"DATA": "data/imagenet", "BATCH": "256"}.get(m[1], "X"),
                  body)
    words = shlex.split(body)
    start = next(i for i, w in enumerate(words) if w.endswith(".py"))
    return words[start + 1:]


def parsed(name):
    if "search" in name:
        from rl_quantize import get_args_parser
    else:
        from finetune import get_args_parser
    return get_args_parser().parse_args(script_args(name))


# Settings of mit-han-lab/haq's run/*.sh (plus the CLI defaults those scripts rely on).
RELEASED = {
    "run_linear_quantize_search.sh": dict(
        arch="qmobilenetv2", dataset="imagenet100", dataset_root="data/imagenet100",
        suffix="ratio0556bit28", preserve_ratio=0.556, float_bit=8, max_bit=8, min_bit=2,
        n_worker=32, data_bsize=128, train_size=20000, val_size=10000, linear_quantization=True,
        warmup=20, train_episode=600, seed=234, finetune_epoch=1, finetune_lr=0.001,
        cost_batch=16, kl_max_bit=4),
    "run_kmeans_quantize_search.sh": dict(
        arch="resnet50", dataset="imagenet", suffix="ratio010", preserve_ratio=0.1, n_worker=32,
        data_bsize=256, train_size=20000, val_size=10000, min_bit=1, max_bit=8, float_bit=32,
        warmup=20, train_episode=600, seed=234, finetune_epoch=1, finetune_lr=0.001,
        linear_quantization=False, weights="IMAGENET1K_V1"),
    "run_linear_quantize_finetune.sh": dict(
        arch="qmobilenetv2", data_name="imagenet", epochs=30, lr=0.01, train_batch=256, wd=4e-5,
        workers=32, pretrained=True, linear_quantization=True, test_batch=512, lr_type="cos",
        kl_max_bit=4),
    "run_kmeans_quantize_finetune.sh": dict(
        arch="resnet50", epochs=100, lr=0.01, train_batch=256, workers=32, pretrained=True,
        wd=1e-5, test_batch=512, lr_type="cos", free_high_bit=True, weights="IMAGENET1K_V1"),
    "run_linear_quantize_eval.sh": dict(
        arch="qmobilenetv2", workers=32, test_batch=512, linear_quantization=True, evaluate=True),
    "run_kmeans_quantize_eval.sh": dict(arch="resnet50", workers=32, test_batch=512,
                                        evaluate=True),
}


@pytest.mark.parametrize("name", sorted(RELEASED))
def test_script_uses_the_released_settings(name):
    args = vars(parsed(name))
    wrong = {k: (args.get(k), v) for k, v in RELEASED[name].items() if args.get(k) != v}
    assert not wrong, f"{name}: (ours, released) {wrong}"


def test_pretrain_script_uses_the_released_recipe():
    """run/run_pretrain.sh: the released MobileNet-V2 recipe (150 epochs, lr 0.05 cosine, wd 4e-5,
    batch 256, fp16, plain momentum SGD, nothing the release did not have)."""
    from pretrain import get_args_parser
    args = get_args_parser().parse_args(script_args("run_pretrain.sh"))
    assert (args.arch, args.epochs, args.lr, args.lr_type, args.wd, args.batch_size) == (
        "mobilenetv2", 150, 0.05, "cos", 4e-5, 256)
    assert args.half and args.half_type == "O1" and not args.nesterov and args.momentum == 0.9
    assert args.warmup_epochs == 0 and args.label_smoothing == 0 and args.ema_decay == 0
