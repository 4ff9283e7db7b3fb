import os

import pytest
import torch

from lib.utils.checkpoint import (atomic_write_json, load_checkpoint, load_pretrained,
                                  load_state_dict, save_checkpoint)
from lib.utils.errors import UserError
from lib.utils.logger import Logger
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


def test_missing_and_unexpected_keys_are_reported():
    model = _small()
    sd = model.state_dict()
    sd.pop("classifier.bias")
    sd["extra.weight"] = torch.zeros(1)
    missing, unexpected = load_state_dict(model, sd)
    assert missing == ["classifier.bias"] and unexpected == ["extra.weight"]


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

    with pytest.raises(RuntimeError):
        save_checkpoint({"x": Boom()}, path)
    assert open(path).read().strip().startswith("{")
    assert os.listdir(tmp_path) == ["s.json"]


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
