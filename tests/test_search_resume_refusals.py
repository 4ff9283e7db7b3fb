"""A stopped search is continued only as the search it was (issue 16, probe leftovers).

- every flag that changes the environment, the agent or the short fine-tune must match;
- a state of an older format, or one whose agent does not fit, is a one-line error and
  nothing in the folder changes;
- ``--suffix`` is one piece of a folder name, never a path out of ``--output``.
"""
import os

import pytest
import torch

from helpers import folder_snapshot, tiny_search_argv
import rl_quantize
from lib.utils.checkpoint import load_checkpoint, save_checkpoint
from lib.utils.errors import run_cli


@pytest.fixture(scope="module")
def searched(tiny_pretrained, tmp_path_factory):
    """A finished one-episode search: (argv, its folder)."""
    out = tmp_path_factory.mktemp("search")
    argv = tiny_search_argv(tiny_pretrained[0], out, 1)
    rl_quantize.main(argv)
    (name,) = os.listdir(out)
    return argv, os.path.join(out, name)


def _refused(argv, capsys):
    with pytest.raises(SystemExit) as exc:
        run_cli(rl_quantize.main, argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert exc.value.code == 2 and "Traceback" not in "\n".join(err)
    return err[-1]


@pytest.mark.parametrize("flag,value", [("--rmsize", "7"), ("--free_high_bit", "False"),
                                        ("--preserve_ratio", "0.3"), ("--lr_a", "0.01"),
                                        ("--finetune_lr", "0.01"), ("--delta_decay", "0.5")])
def test_resume_refuses_a_changed_search_flag(searched, flag, value, capsys):
    argv, folder = searched
    before = folder_snapshot(folder)
    last = _refused(argv + [flag, value, "--train_episode", "2", "--resume_search", folder], capsys)
    assert last.startswith("error: --resume_search") and flag in last, last
    assert folder_snapshot(folder) == before


def _with_state(folder, tmp_path, edit):
    """A copy of ``folder`` whose search state went through ``edit``."""
    copy = tmp_path / "copy"
    copy.mkdir()
    for name, data in folder_snapshot(folder).items():
        (copy / name).write_bytes(data)
    state = load_checkpoint(str(copy / rl_quantize.STATE_FILE))
    edit(state)
    save_checkpoint(state, str(copy / rl_quantize.STATE_FILE))
    return str(copy)


def _older_format(state):      # before RNG states and all flags were recorded
    del state["rng"]
    del state["args"]["lr_c"]


def _unrecorded_flag(state):
    del state["args"]["finetune_lr"]


def _bigger_agent(state):      # tensors of another agent size under the same flags
    state["agent"]["actor"]["fc1.weight"] = torch.zeros(7, 3)


def _other_memory(state):
    state["agent"]["memory"]["states"] = torch.zeros(5, 2)


def _bad_history(state):
    state["history"] = state["history"] + state["history"]


@pytest.mark.parametrize("edit,expected", [
    (_older_format, "not a search state of this version"),
    (_unrecorded_flag, "records no --finetune_lr"),
    (_bigger_agent, "size mismatch for fc1.weight"),
    (_other_memory, "does not fit this search"),
    (_bad_history, "inconsistent"),
])
def test_resume_refuses_a_state_that_does_not_fit(searched, tmp_path, capsys, edit, expected):
    argv, folder = searched
    copy = _with_state(folder, tmp_path, edit)
    before = folder_snapshot(copy)
    last = _refused(argv + ["--train_episode", "2", "--resume_search", copy], capsys)
    assert last.startswith("error: --resume_search") and expected in last, last
    assert folder_snapshot(copy) == before


def test_resume_refuses_fewer_episodes_than_done(searched, tmp_path, capsys):
    argv, folder = searched
    copy = _with_state(folder, tmp_path, lambda s: None)
    state = load_checkpoint(os.path.join(copy, rl_quantize.STATE_FILE))
    assert state["episode"] == 1
    # a consistent state at episode 1 continues with --train_episode 2
    rl_quantize.main(argv + ["--train_episode", "2", "--resume_search", copy])
    with open(os.path.join(copy, "log.txt")) as f:
        assert [r.split("\t")[0] for r in f.read().splitlines()] == ["episode", "0", "1"]
    before = folder_snapshot(copy)
    last = _refused(argv + ["--train_episode", "1", "--resume_search", copy], capsys)
    assert "already run 2 episodes" in last and "at least 2" in last, last
    assert folder_snapshot(copy) == before


@pytest.mark.parametrize("suffix", ["a/b", "../up", "..", ".hidden", "x/../../y"])
def test_suffix_is_one_folder_name(tiny_pretrained, tmp_path, capsys, suffix):
    out = tmp_path / "out"
    last = _refused(tiny_search_argv(tiny_pretrained[0], out, 1) + ["--suffix", suffix], capsys)
    assert last.startswith("error: ") and "argument --suffix" in last and suffix in last, last
    assert os.listdir(tmp_path) == []   # no folder made, inside --output or out of it


def test_kmeans_search_refuses_a_cost_table_it_would_ignore(tiny_pretrained, tmp_path, capsys):
    """K-Means budgets the size; a user's latency table there was silently unused."""
    table = tmp_path / "table.npy"
    table.write_bytes(b"")
    out = tmp_path / "out"
    argv = tiny_search_argv(tiny_pretrained[0], out, 1)
    last = _refused(argv + ["--cost_table", str(table)], capsys)
    assert last.startswith("error: --cost_table") and "--linear_quantization" in last, last
    assert not out.exists()


def test_an_agent_too_big_for_memory_is_a_one_line_error(tiny_pretrained, tmp_path, capsys):
    """--rmsize at its parse-time maximum asks numpy for terabytes: refused, nothing written."""
    out = tmp_path / "out"
    argv = tiny_search_argv(tiny_pretrained[0], out, 1)
    last = _refused(argv + ["--rmsize", "2147483647"], capsys)
    assert last.startswith("error: the agent does not fit in memory (--rmsize 2147483647"), last
    assert not out.exists()


def _before_reuse_codebooks(state):     # a state saved before --reuse_codebooks existed
    del state["args"]["reuse_codebooks"]


def test_a_state_from_before_reuse_codebooks_resumes_without_it(searched, tmp_path, capsys):
    argv, folder = searched
    copy = _with_state(folder, tmp_path, _before_reuse_codebooks)
    last = _refused(argv + ["--reuse_codebooks", "--train_episode", "2", "--resume_search",
                            copy], capsys)
    assert "--reuse_codebooks False" in last, last     # it ran without reuse
    rl_quantize.main(argv + ["--train_episode", "2", "--resume_search", copy])
    with open(os.path.join(copy, "log.txt")) as f:
        assert [line.split("\t")[0] for line in f.read().splitlines()[1:]] == ["0", "1"]


def test_resume_keys_are_the_config_fields_that_are_flags():
    """The flags a resume must repeat come from the config dataclasses: a setting added to
    EnvConfig, DDPGConfig or FinetuneConfig (and given a flag) is checked without more code;
    output, logging and worker flags, --progress and --train_episode may change."""
    from dataclasses import fields

    from lib.env import EnvConfig, FinetuneConfig
    from lib.rl import DDPGConfig
    from lib.search import resume_defaults, resume_fields
    args = rl_quantize.get_args_parser().parse_args([])
    keys = {f.name for f in resume_fields(args)}
    for cls in (EnvConfig, DDPGConfig, FinetuneConfig):
        assert ({f.name for f in fields(cls)} & set(vars(args))) - {"progress"} <= keys, cls
    assert {"arch", "dataset", "method", "cost_batch", "finetune_lr", "rmsize"} <= keys
    assert not keys & {"train_episode", "progress", "output", "n_worker", "half", "suffix",
                       "debug", "resume_search", "device"}
    assert resume_defaults(args) == {"reuse_codebooks": False, "per_channel": False,
                                     "weight_clip": "max", "fold_bn": False,
                                     "bias_correction": False, "kl_max_bit": 0,
                                     "refine": 0, "min_bit_a": None, "max_bit_a": None,
                                     "bits": None, "bits_a": None, "pin": None,
                                     "bn_reestimate": 0}
