"""Property-style check of every numeric flag of every CLI (issue 16, "must show 2").

For each flag, a generated set of values — 0, -1, NaN, +-inf, 1e30, a 20-digit integer,
plus the flag's own out-of-range values — minus those the table marks valid for that flag,
is fed to the CLI in-process (``run_cli``, the path ``python X.py`` takes). Each must end
with a non-zero exit, exactly one stderr line ``error: ...`` naming the flag, no traceback,
and no file anywhere under the run's folder. The flags are read from the parsers, so a new
numeric flag without a row here fails the test.
"""
import argparse
import os

import pytest

import finetune
import pretrain
import rl_quantize
from lib.simulator import __main__ as simulator_cli
from lib.utils.cli import BoolAction, name_part
from lib.utils.errors import run_cli

GENERIC = ("0", "-1", "nan", "-inf", "inf", "1e30", "99999999999999999999")

# flag -> (generic values that are valid for it, extra values that are not); the extras of
# --start_epoch / --warmup_epoch(s) sit just past the default --epochs (30 finetune, 15 pretrain)
FINETUNE = {
    "--workers": ({"0"}, ["1025"]), "--epochs": ((), ["2.5"]), "--start_epoch": ({"0"}, ["30"]),
    "--warmup_epoch": ({"0"}, ["31"]), "--train_batch": ((), []), "--test_batch": ((), []),
    "--lr": ((), ["11"]), "--schedule": ((), []), "--gamma": ((), ["1.5"]),
    "--momentum": ({"0"}, ["1"]), "--wd": ({"0"}, ["1"]), "--width_mult": ((), ["9"]),
    "--min_bit": ((), ["9"]), "--max_bit": ((), ["9"]), "--kl_max_bit": ({"0"}, ["9"]), "--manualSeed": ({"0"}, ["4294967296"]),
    "--train_subset": ((), []), "--input_size": ((), ["7", "1025"]), "--threads": ((), ["1025"]),
    "--bn_reestimate": ({"0"}, ["2.5"]),
}
PRETRAIN = {
    "--width_mult": ((), ["9"]), "--epochs": ((), []), "--batch_size": ((), []),
    "--lr": ((), ["11"]), "--momentum": ({"0"}, ["1"]), "--wd": ({"0"}, ["1"]),
    "--warmup_epochs": ({"0"}, ["16"]), "--label_smoothing": ({"0"}, ["1"]),
    "--ema_decay": ({"0"}, ["1"]), "--workers": ({"0"}, ["1025"]),
    "--seed": ({"0"}, ["4294967296"]), "--train_subset": ((), []),
    "--input_size": ((), ["7", "1025"]), "--threads": ((), ["1025"]),
    "--schedule": ((), []), "--gamma": ((), ["1.5"]),
}
RL = {
    "--preserve_ratio": ((), ["1.5"]), "--min_bit": ((), ["9"]), "--max_bit": ((), ["9"]),
    "--float_bit": ((), ["33", "4"]), "--hidden1": ((), ["4097"]), "--hidden2": ((), ["4097"]),
    "--lr_c": ((), ["11"]), "--lr_a": ((), ["11"]), "--warmup": ({"0"}, []),
    "--discount": ({"0"}, ["1.5"]), "--bsize": ((), []), "--rmsize": ((), []),
    "--window_length": ((), ["2"]), "--tau": ((), ["1.5"]), "--init_delta": ({"0"}, ["11"]),
    "--delta_decay": ((), ["1.5"]), "--n_update": ((), []), "--sensitivity_images": ((), []), "--hessian_iters": ((), []), "--max_episode_length": ((), []),
    "--init_w": ((), ["2"]), "--train_episode": ((), []), "--epsilon": ({"0"}, []),
    "--seed": ({"0"}, ["4294967296"]), "--n_worker": ({"0"}, ["1025"]), "--data_bsize": ((), []),
    "--finetune_epoch": ((), []), "--finetune_gamma": ((), ["1.5"]), "--finetune_lr": ((), ["11"]),
    "--train_size": ((), []), "--val_size": ((), []), "--cost_batch": ((), []),
    "--width_mult": ((), ["9"]), "--input_size": ((), ["7", "1025"]), "--threads": ((), ["1025"]),
    "--kl_max_bit": ({"0"}, ["9"]), "--min_bit_a": ((), ["9"]), "--max_bit_a": ((), ["9"]),
    "--bits": ((), ["9", "2,9", "2,x"]), "--bits_a": ((), ["9", ""]), "--pin": ((), ["x", "x=2,3,4"]),
    "--refine": ({"0"}, ["2.5"]),
    "--bn_reestimate": ({"0"}, ["2.5"]),
}
SIMULATOR = {
    "--batch": ((), []), "--input_size": ((), ["7", "1025"]), "--width_mult": ((), ["9"]),
    "--max_bit": ((), ["7", "17"]), "--top": ({"0"}, []),
}


def _bases(out):
    """Per CLI: (main, parser, table, argv that is valid except where it fails fast).

    Each base fails quickly on a missing file or unknown name should a bad value ever be
    accepted, so a regression shows as a wrong error message, not a long run.
    """
    missing = os.path.join(out, "missing")
    return {
        "finetune": (finetune.main, finetune.get_args_parser(), FINETUNE,
                     ["--strategy", missing + ".json", "-c", os.path.join(out, "ft"),
                      "--device", "cpu", "--no-progress"]),
        "pretrain": (pretrain.main, pretrain.get_args_parser(), PRETRAIN,
                     ["--dataset", "mnist5k", "--dataset_root", missing, "--device", "cpu",
                      "--output", os.path.join(out, "p.pth.tar"), "--no-progress"]),
        "rl_quantize": (rl_quantize.main, rl_quantize.get_args_parser(), RL,
                        ["--dataset", "mnist5k", "--dataset_root", missing, "--device", "cpu",
                         "--output", os.path.join(out, "rl")]),
        "simulator": (simulator_cli.main, simulator_cli.get_args_parser(), SIMULATOR,
                      ["--arch", "nope", "--hardware", "bismo_edge", "--dataset", "mnist5k",
                       "--cache_dir", os.path.join(out, "cache"),
                       "--plot", os.path.join(out, "p.png")]),
    }


def numeric_flags(parser):
    """The first long name of every flag whose value is a number (typed, not boolean)."""
    flags = set()
    for action in parser._actions:
        textual = action.type in (None, str, name_part)
        if isinstance(action, (BoolAction, argparse._HelpAction)) or textual:
            continue
        longs = [o for o in action.option_strings if o.startswith("--")]
        flags.add(longs[0] if longs else action.option_strings[0])
    return flags


def bad_cases(out):
    """[(cli, flag, value)] for every numeric flag of every CLI."""
    cases = []
    for name, (_, _, table, _) in _bases(out).items():
        for flag, (valid, extra) in table.items():
            cases += [(name, flag, v) for v in GENERIC if v not in valid]
            cases += [(name, flag, v) for v in extra]
    return cases


def _aliases(parser, flag):
    action = next(a for a in parser._actions if flag in a.option_strings)
    return action.option_strings


def test_every_numeric_flag_has_a_row(tmp_path):
    for name, (_, parser, table, _) in _bases(str(tmp_path)).items():
        canonical = {_aliases(parser, f)[0] if f not in numeric_flags(parser) else f
                     for f in table}
        assert canonical == numeric_flags(parser), name


def test_values_marked_valid_parse(tmp_path):
    """The table's valid generic values really parse (so only bad ones are fed below)."""
    for name, (_, parser, table, base) in _bases(str(tmp_path)).items():
        for flag, (valid, _) in table.items():
            for value in valid:
                parser.parse_args(base + [f"{flag}={value}"])


def test_bad_numeric_values_are_one_line_errors(tmp_path, monkeypatch, capsys):
    out = str(tmp_path / "out")
    monkeypatch.chdir(tmp_path)          # default output paths land in tmp_path too
    bases = _bases(out)
    cases = bad_cases(out)
    failures = []
    for name, flag, value in cases:
        main, parser, _, base = bases[name]
        capsys.readouterr()
        with pytest.raises(SystemExit) as exc:
            run_cli(main, base + [f"{flag}={value}"])
        err = capsys.readouterr().err.splitlines()
        names = _aliases(parser, flag)
        ok = (exc.value.code not in (0, None) and len(err) == 1 and err[0].startswith("error: ")
              and any(n in err[0] for n in names) and "Traceback" not in err[0])
        if not ok:
            failures.append((name, flag, value, exc.value.code, err[-3:]))
    written = [os.path.join(r, f) for r, _, files in os.walk(tmp_path) for f in files]
    assert not failures, failures[:5]
    assert written == [] and not os.path.exists(out)
    assert len(cases) > 400
    print(f"{len(cases)} bad-value cases")
