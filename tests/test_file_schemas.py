"""Saved files checked value by value on load (issue 31, items 3 and 6; "Must show" 2).

One schema per file kind: strategy.json, the search state, the sensitivity cache, the
fine-tune checkpoint and a user's cost table.  A state, strategy, checkpoint or table that
fails it is refused in one line naming the file and the field, before anything is written;
a cache that fails it is scored again.  The named cases of the issue come first, then the
generated ones: each field of a valid file made a wrong type, negative, huge, past a float's
range, NaN or missing, and an unknown key added to each object.
"""
import io
import json
import logging
import math
import os
import struct
import tracemalloc
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from helpers import folder_snapshot, get_path, tiny_search_argv, wrong_type
import finetune
import rl_quantize
from lib.allocate import cached_layer_scores, load_scores, save_scores
from lib.finetune import build_model, resolve_setup
from lib.search.config import resume_fields
from lib.search.loop import Search
from lib.search.state import STATE_FILE, load_search_state
from lib.simulator.tables import load_user_table
from lib.utils.checkpoint import (extract_state_dict, load_checkpoint, load_state_dict,
                                  save_checkpoint)
from lib.utils.errors import UserError, run_cli
from lib.utils.layers import quantizable_layers
from lib.utils.strategy import load_strategy, strategy_record

EXTRA = "zz_unknown"
TINY_FT = ["--width_mult", "0.25", "--train_subset", "32", "--train_batch", "16",
           "--test_batch", "32", "--device", "cpu", "--no-progress"]


def _one_line(exc, path):
    message = str(exc)
    return "\n" not in message and str(path) in message


# ------------------------------------------------------------------ generated mutations
VALUES = (("wrong type", None), ("negative", -7), ("huge", 10 ** 18),
          ("past float's range", 10 ** 400), ("NaN", math.nan), ("missing", None))


# The two slowest schema tests check every third field by default (each field with every kind of
# mutation) and every field under `-m slow`.
FIELD_STRIDES = [pytest.param(3, id="every-third-field"),
                 pytest.param(1, id="every-field", marks=pytest.mark.slow)]


def mutations(record, paths):
    """``(label, mutated copy, path)`` for each path and value, then an unknown key in each
    object holding a mutated field (path None)."""
    for path in paths:
        value = get_path(record, path)
        for label, new in VALUES:
            new = wrong_type(value) if label == "wrong type" else new
            if label != "missing" and type(new) is type(value) and new == value:
                continue
            yield f"{'.'.join(map(str, path))}: {label}", _edit(record, path, new, label), path
    objects = {p[:-1] for p in paths} | {()}
    for obj in sorted(o for o in objects if isinstance(get_path(record, o), dict)):
        yield (f"{'.'.join(map(str, obj)) or 'top'}: extra key",
               _edit(record, obj + (EXTRA,), 1, "extra"), None)


def _copy(node):
    """Deep copy of dicts and lists; tensors and scalars are shared (never mutated in place)."""
    if isinstance(node, dict):
        return {k: _copy(v) for k, v in node.items()}
    if isinstance(node, list):
        return [_copy(v) for v in node]
    return node


def _edit(record, path, new, label):
    out = _copy(record)
    parent = get_path(out, path[:-1])
    if label == "missing":
        del parent[path[-1]]
    else:
        parent[path[-1]] = new
    return out


def _leaves(record, prefix=(), depth=1):
    """Paths of every key of ``record`` and of the objects ``depth`` levels below it."""
    paths = []
    for key, value in record.items():
        paths.append(prefix + (key,))
        if depth and isinstance(value, dict):
            paths += _leaves(value, prefix + (key,), depth - 1)
    return paths


# ------------------------------------------------------------------ strategy.json
@pytest.fixture(scope="module")
def tiny_layers():
    from models import get_model
    model = get_model("mobilenetv2", num_classes=10, input_size=32, width_mult=0.25)
    return [name for name, _ in quantizable_layers(model)]


def _strategy(layers):
    best = {"cost_ratio": 0.2, "accuracy": 61.5, "episode": 3, "reward": -0.4, "cost": 1234.0,
            "policy": [3 + i % 2 for i in range(len(layers))]}
    meta = {"arch": "mobilenetv2", "mode": "kmeans", "metric": "size", "hardware": None,
            "preserve_ratio": 0.2, "dataset": "mnist5k", "width_mult": 0.25, "input_size": 32,
            "min_bit": 3, "max_bit": 4, "original_accuracy": 70.0, "method": "ddpg",
            "cost_table": {"path": "/x/table.npy", "sha256": "ab" * 32}}
    return strategy_record(best, layers, meta)


def _write(path, record):
    path.write_text(json.dumps(record, allow_nan=True))


@pytest.mark.parametrize("value", ["abc", -5, 10 ** 6, 32.7, True])
def test_strategy_input_size_is_checked_before_the_model_builder(tiny_layers, tmp_path, value,
                                                                  capsys):
    path = tmp_path / "strategy.json"
    _write(path, dict(_strategy(tiny_layers), input_size=value))
    with pytest.raises(UserError, match=r"'input_size' is .*; expected an integer in \[8, 1024\]"):
        load_strategy(str(path))
    out = tmp_path / "ft"
    with pytest.raises(SystemExit) as stop:
        run_cli(finetune.main, ["--strategy", str(path), "-c", str(out), "--no-pretrained"]
                + TINY_FT)
    err = capsys.readouterr().err
    assert stop.value.code == 2 and "'input_size'" in err.splitlines()[-1] and not out.exists()


@pytest.mark.parametrize("entry", [99, 0, "4", [4, 4], 4.5])
def test_strategy_entries_are_widths(tiny_layers, tmp_path, entry):
    record = _strategy(tiny_layers)
    record["strategy"][5] = entry
    _write(tmp_path / "s.json", record)
    with pytest.raises(UserError, match="entry 5"):
        load_strategy(str(tmp_path / "s.json"))


def _finetune_args(path, tmp_path):
    return finetune.get_args_parser().parse_args(
        ["--strategy", str(path), "-c", str(tmp_path / "ft"), "--no-pretrained"] + TINY_FT)


def _harmless_strategy(label):
    """What may load: an unknown key, a field left out (finetune.py has defaults or does not
    read it), a negative reward, a later episode, a larger cost or cost ratio."""
    field, change = label.split(": ")
    return (change in ("missing", "extra key") or (field, change) in (
        ("reward", "negative"), ("episode", "huge"), ("cost", "huge"), ("cost_ratio", "huge")))


def test_every_mutated_strategy_field_is_refused_or_harmless(tiny_layers, tmp_path):
    """A loaded mutation must still build the model (or stop at a UserError there)."""
    valid = _strategy(tiny_layers)
    paths = _leaves(valid) + [("strategy", 0), ("strategy", len(tiny_layers) - 1),
                              ("layers", 0)]
    outcome = {"refused": 0, "loaded": 0, "refused by the model's checks": 0}
    path = tmp_path / "strategy.json"
    for label, record, _ in mutations(valid, paths):
        _write(path, record)
        before = folder_snapshot(tmp_path)
        try:
            load_strategy(str(path))
        except UserError as exc:
            assert _one_line(exc, path), label
            outcome["refused"] += 1
            continue
        assert _harmless_strategy(label), label
        args = _finetune_args(path, tmp_path)
        try:
            build_model(resolve_setup(args), args, "cpu")
            outcome["loaded"] += 1
        except UserError:
            outcome["refused by the model's checks"] += 1
        assert folder_snapshot(tmp_path) == before, label
    print(f"strategy: {sum(outcome.values())} generated cases: {outcome}")
    assert outcome["refused"] >= 100 and outcome["loaded"] >= 10


# ------------------------------------------------------------------ search state
class _Stop(Exception):
    pass


@pytest.fixture(scope="module")
def searched(tiny_pretrained, tmp_path_factory, request):
    """A two-episode search: (argv, its folder, its state, the resuming run's args/env/agent)."""
    out = tmp_path_factory.mktemp("search")
    argv = tiny_search_argv(tiny_pretrained[0], out, 2)
    rl_quantize.main(argv)
    (name,) = os.listdir(out)
    folder = os.path.join(out, name)
    made = {}
    real_agent = rl_quantize.build_agent

    def keep_agent(*a, **k):
        made["agent"] = real_agent(*a, **k)
        return made["agent"]

    def stop(path, args, env):
        made.update(args=args, env=env)
        raise _Stop
    patch = pytest.MonkeyPatch()
    patch.setattr(rl_quantize, "build_agent", keep_agent)
    patch.setattr(rl_quantize, "load_search_state", stop)
    try:
        with pytest.raises(_Stop):
            rl_quantize.main(argv + ["--train_episode", "3", "--resume_search", folder])
    finally:
        patch.undo()
    return argv, folder, load_checkpoint(os.path.join(folder, STATE_FILE)), made


def _with_state(folder, tmp_path, state):
    copy = tmp_path / "copy"
    copy.mkdir(exist_ok=True)
    for name, data in folder_snapshot(folder).items():
        (copy / name).write_bytes(data)
    save_checkpoint(state, str(copy / STATE_FILE))
    return str(copy)


def _best(state, **changes):
    state = _copy(state)
    state["best"].update(changes)
    return state


@pytest.mark.parametrize("edit,expected", [
    (lambda s: _best(s, policy=[99] * len(s["best"]["policy"])), "'best.policy[0]' is 99"),
    (lambda s: _best(s, policy=s["best"]["policy"][:-1]), "53 entries"),
    (lambda s: _best(s, accuracy="61.5"), "'best.accuracy' is '61.5'"),
    (lambda s: _best(s, cost=math.nan), "'best.cost' is nan"),
    (lambda s: dict(s, history=[dict(s["history"][0], accuracy="x")] + s["history"][1:]),
     "'history[0].accuracy'"),
    (lambda s: dict(s, env=dict(s["env"], org_acc="70")), "'env.org_acc'"),
    (lambda s: dict(s, cost_table="table.npy"), "'cost_table'"),
])
def test_resume_refuses_a_state_with_wrong_values(searched, tmp_path, capsys, edit, expected):
    argv, folder, state, _ = searched
    copy = _with_state(folder, tmp_path, edit(state))
    before = folder_snapshot(copy)
    with pytest.raises(SystemExit) as stop:
        run_cli(rl_quantize.main, argv + ["--train_episode", "3", "--resume_search", copy])
    err = capsys.readouterr().err.strip().splitlines()
    assert stop.value.code == 2 and "Traceback" not in "\n".join(err)
    assert err[-1].startswith("error: --resume_search") and expected in err[-1], err[-1]
    assert folder_snapshot(copy) == before       # strategy.json keeps its policy


def _state_paths(state):
    paths = _leaves(state, depth=0)
    paths += [("best", k) for k in state["best"]] + [("best", "policy", 0),
                                                     ("best", "policy", -1)]
    paths += [("history", 0, k) for k in state["history"][0]]
    # generators' states are whole values to their own loaders (numpy's, torch's, Python's)
    paths += _leaves(state["env"], ("env",), depth=0) + [("env", "evaluator", "passes")]
    paths += _leaves(state["agent"], ("agent",), depth=0)
    paths += [("agent", "memory", k) for k in ("next_index", "size")]
    paths += _leaves(state["rng"], ("rng",), depth=0) + _leaves(state["args"], ("args",), 0)
    return paths


def _unused(path, label, flags):
    """A mutation a resume may accept: an unknown key; a flag that does not define the search,
    or one left out (it takes its default, then must match); no user table (as None); the
    target networks left out (an older state: they start as copies of the networks); a past
    episode's cost ratio at another finite value (only plotted; no policy to check it by); a
    negative reward baseline (rewards are negative below the original accuracy)."""
    return (path is None or (path[0] == "args" and (path[1] not in flags or label.endswith(
        "missing"))) or (label.endswith("missing") and path in (
            ("cost_table",), ("agent", "actor_target"), ("agent", "critic_target")))
        or (path == ("history", 0, "cost_ratio") and label.endswith("huge"))
        or (path == ("agent", "moving_average") and label.endswith("negative")))


@pytest.mark.parametrize("stride", FIELD_STRIDES)
def test_every_mutated_search_state_field_is_refused_or_harmless(searched, tmp_path, stride):
    """Through the resume's own load and restore, which write nothing: a UserError naming the
    state, or (an unknown key) a state that restores."""
    _, folder, state, made = searched
    flags = {f.name for f in resume_fields(made["args"])}
    outcome = {"refused": 0, "restored": 0}
    for label, mutated, path in mutations(state, list(_state_paths(state))[::stride]):
        copy = _with_state(folder, tmp_path, mutated)
        before = folder_snapshot(copy)
        search = Search.__new__(Search)
        search.args, search.env, search.agent, search.out = (made["args"], made["env"],
                                                             made["agent"], copy)
        try:
            search._restore(load_search_state(copy, made["args"], made["env"]))
        except UserError as exc:
            assert "\n" not in str(exc) and copy in str(exc), (label, str(exc))
            outcome["refused"] += 1
        else:
            assert _unused(path, label, flags), f"{label}: restored"
            outcome["restored"] += 1
        assert folder_snapshot(copy) == before, label
    print(f"search state: {sum(outcome.values())} generated cases: {outcome}")
    assert outcome["refused"] >= 300 // stride and outcome["restored"] >= 5 // stride


# ------------------------------------------------------------------ sensitivity cache
LAYERS = ["features.0.0", "features.1.conv.0", "classifier"]
EXPECT = {"metric": "loss", "bits": [2, 3, 4], "layers": LAYERS, "requested_images": 10,
          "hessian_iters": None}
KINDS = ("weight", "activation")


def _scores():
    rows = [[0.5, 0.2, 0.1], [0.9, 0.3, 0.0], [2.0, 1.0, 0.5]]
    return dict(EXPECT, weight=rows, activation=[r[::-1] for r in rows], n_images=10,
                baseline_loss=2.3, seconds=0.5)


@pytest.mark.parametrize("score", [None, 1e308, -1e308, "0.5", True])
def test_a_cache_with_a_score_no_run_writes_is_scored_again(tmp_path, caplog, score):
    path = tmp_path / "sensitivity.json"
    record = _scores()
    record["weight"][1][2] = score
    _write(path, record)
    with caplog.at_level(logging.WARNING):
        assert load_scores(str(path), EXPECT, KINDS) is None
    assert "scoring again" in caplog.text and "'weight'" in caplog.text


def test_a_linear_cache_without_activation_scores_is_scored_again(tmp_path):
    path = tmp_path / "sensitivity.json"
    _write(path, dict(_scores(), activation=None))
    assert load_scores(str(path), EXPECT, KINDS) is None
    assert load_scores(str(path), EXPECT, ("weight",)) is not None


def test_a_bad_cache_is_recomputed_and_replaced(tmp_path, monkeypatch):
    """Through the search's own entry: the scores are computed again and the cache rewritten."""
    _write(tmp_path / "sensitivity.json", dict(_scores(), weight=[[None] * 3] * 3))
    env = SimpleNamespace(cfg=SimpleNamespace(min_bit=2, max_bit=4), layer_names=LAYERS,
                          linear=True)
    fresh = dict(_scores(), weight=np.ones((3, 3)), activation=np.zeros((3, 3)))
    calls = []
    monkeypatch.setattr("lib.allocate.layer_scores", lambda *a, **k: calls.append(1) or fresh)
    monkeypatch.setattr("lib.allocate.plot_scores", lambda *a: None)
    scores = cached_layer_scores(env, str(tmp_path), "loss", n_images=10)
    assert calls == [1] and scores is fresh
    assert np.array_equal(load_scores(str(tmp_path / "sensitivity.json"), EXPECT, KINDS)[
        "weight"], np.ones((3, 3)))


def test_every_mutated_cache_field_is_scored_again_or_harmless(tmp_path, caplog):
    valid = _scores()
    path = tmp_path / "sensitivity.json"
    _write(path, valid)
    reference = load_scores(str(path), EXPECT, KINDS)
    paths = _leaves(valid) + [(k, i) for k in KINDS for i in (0, 2)] + [
        (k, 1, j) for k in KINDS for j in (0, 2)]
    outcome = {"scored again": 0, "used": 0}
    for label, record, mutated in mutations(valid, paths):
        _write(path, record)
        caplog.clear()
        with caplog.at_level(logging.INFO):
            loaded = load_scores(str(path), EXPECT, KINDS)
        if loaded is None:
            assert "scoring again" in caplog.text, label
            outcome["scored again"] += 1
            continue
        if mutated is not None and len(mutated) == 3 and label.endswith("negative"):
            # a loss can fall by chance when a layer is quantized: a real, negative score
            assert loaded[mutated[0]][mutated[1:]] == -7, label
        else:
            # an unknown key, or hessian_iters left out (it is null for the loss metric)
            assert mutated in (None, ("hessian_iters",)), f"{label}: used"
            for kind in KINDS:
                assert np.array_equal(loaded[kind], reference[kind]), label
        outcome["used"] += 1
    print(f"sensitivity cache: {sum(outcome.values())} generated cases: {outcome}")
    assert outcome["scored again"] >= 80 and outcome["used"] == 6


# ------------------------------------------------------------------ fine-tune checkpoint
@pytest.fixture(scope="module")
def trained(kmeans_finetune_checkpoint):
    path = kmeans_finetune_checkpoint(lambda i: 3)
    return path, load_checkpoint(path)


def _ft_refused(argv, capsys):
    with pytest.raises(SystemExit) as stop:
        run_cli(finetune.main, argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert stop.value.code == 2 and "Traceback" not in "\n".join(err)
    return err[-1]


@pytest.mark.parametrize("field,value", [("best_acc", "51.2"), ("best_acc", math.nan),
                                         ("acc", None), ("args", "lr=0.1"),
                                         ("args", {"data": 7}), ("kl_max_bit", "2"),
                                         ("policy", "a policy"), ("fp32_top1", 1e9),
                                         ("model_kwargs", {"num_classes": 10,
                                                           "input_size": 10 ** 6})])
def test_resume_refuses_a_checkpoint_field_of_the_wrong_kind(trained, tmp_path, capsys, field,
                                                             value):
    folder = tmp_path / "run"
    folder.mkdir()
    path = folder / "checkpoint.pth.tar"
    save_checkpoint(dict(trained[1], **{field: value}), str(path))
    before = folder_snapshot(folder)
    last = _ft_refused(["--resume", str(path), "--epochs", "3"] + TINY_FT, capsys)
    assert last.startswith(f"error: --resume '{path}': '{field}' is"), last
    assert folder_snapshot(folder) == before


def test_integer_weights_in_a_float_model_are_refused(trained, tmp_path, capsys):
    """Weights stored as int64 (truncated) used to load, copied into the float parameters."""
    ckpt = _copy(trained[1])
    key = next(k for k, v in ckpt["state_dict"].items() if v.is_floating_point())
    ckpt["state_dict"][key] = ckpt["state_dict"][key].round().long()
    folder = tmp_path / "run"
    folder.mkdir()
    path = folder / "checkpoint.pth.tar"
    save_checkpoint(ckpt, str(path))
    before = folder_snapshot(folder)
    last = _ft_refused(["--resume", str(path), "-e"] + TINY_FT, capsys)
    assert "holds int64 values" in last and key in last and "floating-point" in last, last
    assert folder_snapshot(folder) == before


def _ft_paths(ckpt):
    paths = _leaves(ckpt, depth=0) + _leaves(ckpt["model_kwargs"], ("model_kwargs",), 0)
    paths += [("args", k) for k in ("data", "train_subset", "lr")]
    paths += [("policy", k) for k in ("strategy", "mode", "layers")] + [("policy", "strategy", 0)]
    key = next(iter(ckpt["state_dict"]))
    return paths + [("state_dict", key)]


def _harmless_ft(label, evaluate):
    """What a resume may load: an unknown key, a field an older version did not write, a flag
    of the run other than the data flags (recorded, never read), the optimizer when only
    evaluating, a larger epoch or data subset (refused by --epochs / all the data)."""
    field, change = label.split(": ")
    return (change in ("missing", "extra key") or field == "args.lr"
            or (field == "optimizer" and evaluate)
            or (field in ("epoch", "args.train_subset") and change == "huge"))


@pytest.mark.parametrize("stride", FIELD_STRIDES)
def test_every_mutated_checkpoint_field_is_refused_or_harmless(trained, tmp_path, stride):
    """Through the resume's set-up, model and weight loading (which write nothing)."""
    path, valid = trained
    outcome, loaded = {"refused": 0, "loaded": 0}, []
    folder = tmp_path / "run"
    folder.mkdir()
    bad = folder / "checkpoint.pth.tar"
    for label, ckpt, extra in mutations(valid, list(_ft_paths(valid))[::stride]):
        save_checkpoint(ckpt, str(bad))
        before = folder_snapshot(folder)
        for evaluate in ([], ["-e"]):
            args = finetune.get_args_parser().parse_args(
                ["--resume", str(bad), "--epochs", "3"] + evaluate + TINY_FT)
            try:
                setup = resolve_setup(args)
                model = build_model(setup, args, "cpu")
                load_state_dict(model, extract_state_dict(setup.ckpt), str(bad))
            except UserError as exc:
                assert _one_line(exc, bad), (label, str(exc))
                outcome["refused"] += 1
            else:
                outcome["loaded"] += 1
                assert _harmless_ft(label, evaluate), label
                loaded.append(label)
        assert folder_snapshot(folder) == before, label
    print(f"fine-tune checkpoint: {sum(outcome.values())} generated cases: {outcome}")
    print(f"loaded: {', '.join(sorted(set(loaded)))}")
    assert outcome["refused"] >= 150 // stride


# ------------------------------------------------------------------ cost table (.npy)
N_LAYERS = 53


def _table():
    return np.linspace(1, 5, N_LAYERS)[:, None, None] * np.outer(np.arange(1, 9),
                                                                 np.arange(1, 9))[None]


def _npy(header, data=b"", version=(1, 0)):
    """A .npy file of this header dict (as np.save writes it) followed by ``data``."""
    text = repr(header).encode("latin1")
    size = "<H" if version == (1, 0) else "<I"
    pad = -(len(text) + 1 + 8 + struct.calcsize(size)) % 64
    text += b" " * pad + b"\n"
    return b"\x93NUMPY" + bytes(version) + struct.pack(size, len(text)) + text + data


def _header(**changes):
    return dict({"descr": "<f8", "fortran_order": False, "shape": (N_LAYERS, 8, 8)}, **changes)


def test_a_header_claiming_1e11_elements_is_refused_without_allocating(tmp_path):
    path = tmp_path / "t.npy"
    path.write_bytes(_npy(_header(shape=(10 ** 5, 10 ** 3, 10 ** 3)), bytes(64)))
    tracemalloc.start()
    with pytest.raises(UserError, match=r"has shape \(100000, 1000, 1000\); expected \(53, 8, 8\)"):
        load_user_table(str(path), N_LAYERS)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert peak < 1 << 20


def test_a_2_gb_file_is_refused_before_it_is_read(tmp_path):
    path = tmp_path / "t.npy"
    with open(path, "wb") as f:
        np.save(f, _table())
        f.truncate(2 << 30)      # sparse: no disk used
    tracemalloc.start()
    with pytest.raises(UserError, match="is 2147483648 bytes; its header describes 27264"):
        load_user_table(str(path), N_LAYERS)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert peak < 1 << 20


@pytest.mark.parametrize("content", [b"layer,w,a,ms\n0,1,1,0.5\n", b"\x80\x04K\x07.", b""])
def test_a_file_that_is_not_npy_is_named_so(tmp_path, content):
    path = tmp_path / "t.npy"
    path.write_bytes(content)
    with pytest.raises(UserError, match=r"is not a \.npy file") as exc:
        load_user_table(str(path), N_LAYERS)
    assert "pickled" not in str(exc.value)


@pytest.mark.parametrize("axis,expected", [
    (1, "layer 0 costs 8 at w1a1 but 7 at w2a1; expected costs that do not fall as weight"),
    (2, "layer 0 costs 8 at w1a1 but 7 at w1a2; expected costs that do not fall as activation")])
def test_a_table_whose_cost_falls_as_bits_grow_is_refused(tmp_path, capsys, axis, expected):
    """Axes reversed: every policy under a budget looked unreachable ("expected a preserve
    ratio >= 29.16"); now the table is refused naming the layer and widths."""
    table = np.flip(np.outer(np.arange(1, 9), np.arange(1, 9)), axis - 1)[None].repeat(
        N_LAYERS, 0).astype(float)
    table[:, 7, 7] = 64.0
    path = tmp_path / "t.npy"
    np.save(path, table)
    with pytest.raises(UserError) as exc:
        load_user_table(str(path), N_LAYERS)
    assert expected in str(exc.value) and "\n" not in str(exc.value)


def _table_mutations():
    """(label, file bytes): each header field and the data, mutated."""
    data = _table().astype("<f8").tobytes()
    valid = _header()
    for key in valid:
        for label, new in VALUES + (("other", {"descr": "|O", "fortran_order": "yes",
                                               "shape": (N_LAYERS, 8)}[key]),):
            header = dict(valid)
            if label == "missing":
                del header[key]
            else:
                header[key] = wrong_type(valid[key]) if label == "wrong type" else new
            yield f"header.{key}: {label}", _npy(header, data)
    yield "header: extra key", _npy(dict(valid, **{EXTRA: 1}), data)
    yield "header: version 3", _npy(valid, data, version=(3, 0))
    yield "header: length past the file", _npy(valid)[:8] + b"\xff\xff" + _npy(valid)[10:]
    for label, value in (("negative", -7.0), ("huge", 1e308), ("NaN", math.nan),
                         ("inf", math.inf), ("falls", 0.5)):
        table = _table()
        table[4, 2, 3] = value
        yield f"data[4, 2, 3]: {label}", _npy(valid, table.astype("<f8").tobytes())
    yield "data: missing", _npy(valid)
    yield "data: truncated", _npy(valid, data[:-8])
    yield "data: extra bytes", _npy(valid, data + bytes(8))
    for dtype in ("<c16", "<U8", "|b1", "<M8[s]", "|V8"):
        yield f"descr {dtype}", _npy(_header(descr=dtype), bytes(N_LAYERS * 64 * 16))
    buffer = io.BytesIO()
    np.savez(buffer, table=_table())
    yield "an .npz archive", buffer.getvalue()


def test_every_mutated_table_field_is_refused(tmp_path):
    path = tmp_path / "t.npy"
    path.write_bytes(_npy(_header(), _table().astype("<f8").tobytes()))
    assert np.array_equal(load_user_table(str(path), N_LAYERS)[0], _table())
    outcome = {"refused": 0, "loaded": 0}
    for label, content in _table_mutations():
        path.write_bytes(content)
        try:
            table, _ = load_user_table(str(path), N_LAYERS)
        except UserError as exc:
            assert _one_line(exc, path), (label, str(exc))
            outcome["refused"] += 1
        else:
            assert label == "header: extra key" and np.array_equal(table, _table()), label
            outcome["loaded"] += 1
        assert os.listdir(tmp_path) == ["t.npy"], label
    print(f"cost table: {sum(outcome.values())} generated cases: {outcome}")
    assert outcome["refused"] >= 25
