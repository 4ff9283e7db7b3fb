"""One run per output folder (lib.utils.lock): a second finetune.py or rl_quantize.py
--resume_search into a folder another process holds is refused with the holder named; a
holder killed with SIGKILL leaves a lock file that blocks nothing."""
import json
import os
import signal
import subprocess
import sys

import pytest

import finetune
import rl_quantize
from lib.utils.errors import UserError, run_cli
from lib.utils.layers import quantizable_layers
from lib.utils.lock import LOCK_FILE, FolderLock

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HOLD = ("import sys, time\nfrom lib.utils.lock import FolderLock\n"
        "FolderLock(sys.argv[1]).acquire()\nprint('held', flush=True)\ntime.sleep(600)\n")
TINY = ["--width_mult", "0.25", "--train_subset", "32", "--train_batch", "16",
        "--test_batch", "32", "--device", "cpu", "--no-progress", "--no-eval_fp32"]


@pytest.fixture
def holder():
    """``hold(folder)``: another process that holds ``folder``'s lock until killed."""
    procs = []

    def hold(folder):
        proc = subprocess.Popen([sys.executable, "-c", HOLD, str(folder)], cwd=ROOT,
                                stdout=subprocess.PIPE, text=True)
        procs.append(proc)
        assert proc.stdout.readline().strip() == "held"
        return proc
    yield hold
    for proc in procs:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
        proc.stdout.close()


def _kill9(proc):
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()


def test_second_lock_is_refused_naming_the_holder_and_sigkill_frees_it(tmp_path, holder):
    folder = tmp_path / "run"
    proc = holder(folder)
    with pytest.raises(UserError) as info:
        FolderLock(str(folder), "-c").acquire()
    msg = str(info.value)
    assert f"pid {proc.pid} on " in msg and "started" in msg and "in use by another run" in msg
    assert "\n" not in msg
    _kill9(proc)
    assert (folder / LOCK_FILE).exists()   # the dead holder's file is left behind ...
    with FolderLock(str(folder), "-c") as lock:   # ... and blocks nothing
        assert f"pid {os.getpid()} " in (folder / LOCK_FILE).read_text()
        with pytest.raises(UserError):   # held again: a new open of the file is refused
            FolderLock(str(folder)).acquire()
    assert lock.fd is None and not (folder / LOCK_FILE).exists()


def test_lock_of_a_new_folder_leaves_nothing_when_nothing_was_written(tmp_path):
    folder = tmp_path / "new"
    with FolderLock(str(folder)):
        assert folder.is_dir()
    assert not folder.exists()
    with FolderLock(str(folder)):
        (folder / "results.json").write_text("{}")
    assert os.listdir(folder) == ["results.json"]


@pytest.fixture(scope="module")
def kmeans_strategy(tmp_path_factory, tiny_pretrained):
    weights, model = tiny_pretrained
    names = [n for n, _ in quantizable_layers(model)]
    path = tmp_path_factory.mktemp("lock") / "km.json"
    path.write_text(json.dumps({"mode": "kmeans", "layers": names, "strategy": [4] * len(names)}))
    return str(path), weights


def test_finetune_into_a_held_folder_is_refused_then_runs_after_kill9(tmp_path, holder, capsys,
                                                                      kmeans_strategy):
    strategy, weights = kmeans_strategy
    out = tmp_path / "ft"
    argv = ["--strategy", strategy, "--pretrained_path", weights, "-c", str(out),
            "--epochs", "1"] + TINY
    proc = holder(out)
    with pytest.raises(SystemExit) as info:
        run_cli(finetune.main, argv)
    assert info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: -c/--checkpoint") and f"pid {proc.pid} " in err[-1], err
    assert os.listdir(out) == [LOCK_FILE]   # the refused run wrote nothing
    _kill9(proc)
    result = finetune.main(argv)
    assert result["epochs"] == 1 and (out / "results.json").is_file()
    assert not (out / LOCK_FILE).exists()   # released at the end


def test_resume_search_of_a_held_folder_is_refused(tmp_path, holder, capsys, tiny_pretrained):
    def argv(episodes):
        return ["--dataset", "mnist5k", "--width_mult", "0.25", "--pretrained_path",
                tiny_pretrained[0], "--train_size", "32", "--val_size", "32", "--data_bsize", "32",
                "--n_worker", "0", "--warmup", "1", "--train_episode", str(episodes), "--max_bit",
                "4", "--output", str(tmp_path), "--seed", "1"]
    folder = rl_quantize.main(argv(1))["output"]
    assert not os.path.exists(os.path.join(folder, LOCK_FILE))
    proc = holder(folder)
    state = os.path.join(folder, rl_quantize.STATE_FILE)
    before = os.path.getmtime(state), sorted(os.listdir(folder))
    with pytest.raises(SystemExit) as info:
        run_cli(rl_quantize.main, argv(2) + ["--resume_search", folder])
    assert info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: --resume_search") and f"pid {proc.pid} " in err[-1], err
    assert (os.path.getmtime(state), sorted(os.listdir(folder))) == before
    assert proc.poll() is None   # the holder was not disturbed


def test_pretrain_into_a_held_output_is_refused(tmp_path, holder, capsys):
    import pretrain
    out = tmp_path / "m.pth.tar"
    proc = holder(tmp_path / "m_log")
    with pytest.raises(SystemExit) as info:
        run_cli(pretrain.main, ["--width_mult", "0.25", "--train_subset", "16", "--epochs", "1",
                                "--output", str(out), "--no-progress", "--device", "cpu"])
    assert info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: --output") and f"pid {proc.pid} " in err[-1], err
    assert not out.exists() and os.listdir(tmp_path / "m_log") == [LOCK_FILE]


def test_a_file_system_without_flock_is_a_one_line_error(tmp_path, monkeypatch):
    import errno
    import fcntl

    def no_flock(fd, op):
        raise OSError(errno.ENOLCK, os.strerror(errno.ENOLCK))
    monkeypatch.setattr(fcntl, "flock", no_flock)
    with pytest.raises(UserError) as exc:
        FolderLock(str(tmp_path / "out"), "--output").acquire()
    message = str(exc.value)
    assert "refuses flock" in message and "No locks available" in message
    assert "\n" not in message
    assert not (tmp_path / "out").exists()   # the folder it made is gone again
