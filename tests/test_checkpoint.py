import errno
import json
import math
import os
import re
import subprocess
import sys

import numpy as np
import pytest
import torch

from lib.utils.checkpoint import (atomic_write_json, load_checkpoint, load_pretrained,
                                  load_state_dict, remove_stale_tmp, save_checkpoint)
from lib.utils.errors import UserError
from lib.utils.logger import Logger, trim_log
from lib.utils.meters import accuracy
from models import get_model


def _small():
    torch.manual_seed(0)
    return get_model("mobilenetv2", num_classes=10, input_size=32, width_mult=0.25)


@pytest.mark.parametrize("prefix", ["", "module."])
def test_checkpoint_round_trip(tmp_path, prefix):
    src, dst = _small(), get_model("mobilenetv2", num_classes=10, input_size=32, width_mult=0.25)
    sd = {prefix + k: v for k, v in src.state_dict().items()}
    path = str(tmp_path / "ck.pth.tar")
    save_checkpoint({"state_dict": sd, "epoch": 3, "best_acc": 1.5, "optimizer": {}}, path)
    ckpt = load_pretrained(dst, path)
    assert ckpt["epoch"] == 3
    for (k, a), (_, b) in zip(src.state_dict().items(), dst.state_dict().items()):
        assert torch.equal(a, b), k
    assert not [f for f in os.listdir(tmp_path) if f.startswith(".tmp-")]


def test_missing_weight_is_refused_and_optional_buffers_are_not():
    model = _small()
    sd = model.state_dict()
    sd.pop("classifier.bias")
    with pytest.raises(UserError, match="'classifier.bias'"):
        load_state_dict(model, sd)
    sd = model.state_dict()
    sd.pop("features.0.1.num_batches_tracked")
    sd["extra.weight"] = torch.zeros(1)
    missing, unexpected = load_state_dict(model, sd)
    assert missing == ["features.0.1.num_batches_tracked"] and unexpected == ["extra.weight"]


def test_q_model_loads_its_float_twins_weights():
    """The float twin lacks activation_range/weight_range; every real weight is still loaded."""
    src = _small()
    q = get_model("qmobilenetv2", num_classes=10, input_size=32, width_mult=0.25)
    missing, _ = load_state_dict(q, src.state_dict())
    assert missing and all(k.endswith(("activation_range", "weight_range")) for k in missing)
    assert torch.equal(q.state_dict()["classifier.weight"], src.state_dict()["classifier.weight"])


@pytest.mark.parametrize("case", ["other_arch", "unrelated", "empty", "nan", "inf"])
def test_weights_that_do_not_fit_are_refused(case):
    model = _small()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    sd = {"other_arch": lambda: get_model("resnet18", num_classes=10, input_size=32).state_dict(),
          "unrelated": lambda: {"epoch": torch.tensor(3), "lr": torch.tensor(0.1)},
          "empty": dict, "nan": model.state_dict, "inf": model.state_dict}[case]()
    if case in ("nan", "inf"):
        sd = {k: v.clone() for k, v in sd.items()}
        sd["features.1.conv.0.weight"][0, 0, 0, 0] = math.nan if case == "nan" else math.inf
    expected = {"other_arch": "missing", "unrelated": "missing", "empty": "missing",
                "nan": "NaN/inf values in 'features.1.conv.0.weight'",
                "inf": "NaN/inf values in 'features.1.conv.0.weight'"}[case]
    with pytest.raises(UserError, match=expected) as exc:
        load_state_dict(model, sd, source="w.pth.tar")
    if case != "nan":
        assert "features.0.0.weight" in str(exc.value) or case == "inf"
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_shape_mismatch_is_user_error():
    model = _small()
    other = get_model("mobilenetv2", num_classes=5, input_size=32, width_mult=0.25)
    with pytest.raises(UserError, match="classifier.weight"):
        load_state_dict(model, other.state_dict())


def test_missing_and_corrupt_files(tmp_path):
    with pytest.raises(UserError, match="not found"):
        load_pretrained(_small(), str(tmp_path / "none.pth.tar"))
    bad = tmp_path / "bad.pth.tar"
    bad.write_text("not a checkpoint")
    with pytest.raises(UserError, match="could not be read"):
        load_checkpoint(str(bad))


def test_atomic_write_keeps_old_file_on_failure(tmp_path):
    path = str(tmp_path / "s.json")
    atomic_write_json(path, {"a": 1})

    class Boom:
        def __reduce__(self):
            raise RuntimeError("boom")

    with pytest.raises(TypeError, match="Boom"):
        save_checkpoint({"x": Boom()}, path)
    # refused before writing, so no file that load_checkpoint would refuse ever exists
    with pytest.raises(TypeError, match=r"\['x'\] is a ndarray"):
        save_checkpoint({"x": np.zeros(2)}, path)
    with pytest.raises(TypeError, match=r"\['acc'\] is a float64"):   # a float subclass
        save_checkpoint({"acc": np.float64(1.0)}, path)
    assert open(path).read().strip().startswith("{")
    assert os.listdir(tmp_path) == ["s.json"]


def _full_disk(exc):
    """A torch.save that writes part of the file, then fails as a full disk makes it fail."""
    def save(obj, f):
        f.write(b"PK partial")
        raise exc
    return save


@pytest.mark.parametrize("exc", [
    RuntimeError("[enforce fail at inline_container.cc:778] . unexpected pos 1024 vs 960"),
    OSError(errno.ENOSPC, "No space left on device"),
    OSError(errno.EDQUOT, "Disk quota exceeded")], ids=["torch", "enospc", "edquot"])
def test_full_disk_is_one_line_naming_the_path_and_keeps_the_old_file(tmp_path, monkeypatch, exc):
    path = str(tmp_path / "checkpoint.pth.tar")
    save_checkpoint({"epoch": 1}, path)
    before = open(path, "rb").read()
    monkeypatch.setattr(torch, "save", _full_disk(exc))
    with pytest.raises(UserError) as info:
        save_checkpoint({"epoch": 2}, path)
    msg = str(info.value)
    assert "\n" not in msg and f"'{path}'" in msg and f"free in '{tmp_path}'" in msg
    assert re.search(r"\d (GiB|MiB) free", msg)
    assert os.listdir(tmp_path) == ["checkpoint.pth.tar"]      # no temporary file left
    assert open(path, "rb").read() == before


def test_real_torch_save_on_a_full_disk(tmp_path, monkeypatch):
    """torch.save turns the file's ENOSPC into 'unexpected pos'; that reads as a full disk."""
    import lib.utils.checkpoint as checkpoint
    real_fdopen = os.fdopen

    class Full:
        def __init__(self, f):
            self.f = f

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.f.close()

        def write(self, data):
            raise OSError(errno.ENOSPC, "No space left on device")

    path = str(tmp_path / "checkpoint.pth.tar")
    save_checkpoint({"epoch": 1}, path)
    monkeypatch.setattr(checkpoint.os, "fdopen", lambda fd, mode: Full(real_fdopen(fd, mode)))
    with pytest.raises(UserError, match="could not write .*checkpoint.pth.tar.* free in"):
        save_checkpoint({"w": torch.zeros(1000)}, path)
    assert os.listdir(tmp_path) == ["checkpoint.pth.tar"]
    assert load_checkpoint(path) == {"epoch": 1}


def test_other_write_failures_are_not_called_a_full_disk(tmp_path, monkeypatch):
    path = str(tmp_path / "checkpoint.pth.tar")
    for exc in (RuntimeError("a bug"), OSError(errno.EACCES, "Permission denied")):
        monkeypatch.setattr(torch, "save", _full_disk(exc))
        with pytest.raises(type(exc)):
            save_checkpoint({"epoch": 2}, path)
        assert os.listdir(tmp_path) == []


def test_logger_and_accuracy(tmp_path):
    path = str(tmp_path / "log.txt")
    lg = Logger(path, ["epoch", "acc"])
    lg.append([1, 0.5])
    lg.close()
    lg = Logger(path, ["epoch", "acc"], resume=True)
    lg.append([2, 0.75])
    lg.close()
    assert open(path).read().splitlines() == ["epoch\tacc", "1\t0.500000", "2\t0.750000"]
    out = torch.tensor([[0.1, 0.9, 0.0], [0.8, 0.1, 0.1]])
    top1, top3 = accuracy(out, torch.tensor([1, 2]), (1, 3))
    assert top1 == 50.0 and top3 == 100.0


def test_json_is_strict(tmp_path):
    with pytest.raises(ValueError):
        atomic_write_json(str(tmp_path / "r.json"), {"acc": math.nan})
    assert not os.listdir(tmp_path)


def _dead_pid():
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_interrupted_saves_leave_no_tmp_files_on_the_next_run(tmp_path):
    dead = _dead_pid()
    for name in (f".tmp-{dead}-abc_123-checkpoint.pth.tar", ".tmp-k2j_x9-checkpoint.pth.tar",
                 f".tmp-{dead}-zzz-model_best.pth.tar"):
        (tmp_path / name).write_bytes(b"half a checkpoint")
    alive = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        busy = tmp_path / f".tmp-{alive.pid}-q1-checkpoint.pth.tar"   # another run, still writing
        busy.write_bytes(b"in progress")
        save_checkpoint({"epoch": 1}, str(tmp_path / "checkpoint.pth.tar"))
        assert sorted(os.listdir(tmp_path)) == sorted(
            ["checkpoint.pth.tar", busy.name, f".tmp-{dead}-zzz-model_best.pth.tar"])
        remove_stale_tmp(str(tmp_path))   # what a run does on its folder when it starts
        assert sorted(os.listdir(tmp_path)) == sorted(["checkpoint.pth.tar", busy.name])
    finally:
        alive.kill()
        alive.wait()


def test_written_files_and_caches_are_group_readable(tmp_path):
    from lib.simulator.tables import get_table
    old = os.umask(0o022)
    try:
        save_checkpoint({"epoch": 1}, str(tmp_path / "ck.pth.tar"))
        atomic_write_json(str(tmp_path / "r.json"), {"a": 1})
        get_table("qmobilenetv2", "mnist5k", "bismo_edge", "latency", 1, cache_dir=tmp_path,
                  linear=True, width_mult=0.25)
    finally:
        os.umask(old)
    files = sorted(os.listdir(tmp_path))
    assert any(f.endswith("_table.npy") for f in files) and any(f.endswith(".meta.json")
                                                              for f in files)
    assert {f: oct(os.stat(tmp_path / f).st_mode & 0o777) for f in files} == \
        {f: oct(0o644) for f in files}


def test_trim_log_keeps_rows_before_the_saved_state(tmp_path):
    path = str(tmp_path / "log.txt")
    with open(path, "w") as f:
        f.write("epoch\tacc\n0\t1.0\n1\t2.0\n2\t3.0\n")
    trim_log(path, 2)
    assert open(path).read().splitlines() == ["epoch\tacc", "0\t1.0", "1\t2.0"]
    json.dumps({})


def test_a_model_that_checks_module_versions_loads_from_our_files(tmp_path):
    """torchvision's MNASNet refuses a state_dict without version metadata, which a checkpoint
    saved through a plain dict has lost: the search's weights, finetune.py's checkpoint and the
    packed file all load it back with the same weights and logits."""
    from lib.export import export_checkpoint, load_packed
    from lib.export.report import model_from_checkpoint
    from lib.quantize import apply_linear_policy, calibrate, quant_layers
    torch.manual_seed(0)
    kwargs = {"num_classes": 10, "input_size": 32}
    src = get_model("mnasnet0_5", linear=True, **kwargs)
    n = len(quant_layers(src))
    policy = [[8, -1]] + [[4, 8]] * (n - 2) + [[8, 8]]
    apply_linear_policy(src, policy)
    calibrate(src, torch.randn(8, 3, 32, 32))
    src.eval()
    plain = dict(src.state_dict())
    with pytest.raises(ValueError, match="version"):   # what happened without the fix
        get_model("mnasnet0_5", linear=True, **kwargs).load_state_dict(plain)
    path = str(tmp_path / "mnas.pth.tar")
    save_checkpoint({"state_dict": plain, "arch": "mnasnet0_5", "mode": "linear",
                     "model_kwargs": kwargs, "epoch": 1,
                     "policy": {"mode": "linear", "strategy": policy, "layers": None}}, path)
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        want = src(x)
    dst = get_model("mnasnet0_5", linear=True, **kwargs)
    load_state_dict(dst, load_checkpoint(path)["state_dict"])
    assert all(torch.equal(a, b) for a, b in zip(dst.state_dict().values(), plain.values()))
    restored = model_from_checkpoint(load_checkpoint(path))
    with torch.no_grad():
        assert torch.equal(restored(x), want)
    packed = str(tmp_path / "mnas.haq")
    export_checkpoint(path, packed)
    unpacked, _ = load_packed(packed)
    with torch.no_grad():
        assert torch.allclose(unpacked(x), want, atol=1e-4 * float(want.abs().max()))
