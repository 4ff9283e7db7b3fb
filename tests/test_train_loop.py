import torch
import torch.nn as nn
from torch.utils.data import DataLoader, TensorDataset

from lib.utils.train import evaluate, train_one_epoch


def _data(n=64):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, 4, generator=g)
    y = (x[:, 0] > 0).long()
    return DataLoader(TensorDataset(x, y), batch_size=16)


def test_training_improves_and_hook_runs_after_each_step():
    torch.manual_seed(0)
    model = nn.Linear(4, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    calls = []
    loader = _data()
    before = evaluate(model, loader, nn.CrossEntropyLoss(), torch.device("cpu"), progress=False)
    for e in range(5):
        st = train_one_epoch(model, loader, nn.CrossEntropyLoss(), opt, torch.device("cpu"), e,
                             step_hook=lambda: calls.append(1), progress=False)
    after = evaluate(model, loader, nn.CrossEntropyLoss(), torch.device("cpu"), progress=False)
    assert len(calls) == 5 * len(loader)
    assert after["loss"] < before["loss"] and after["top1"] >= 90.0
    assert st["nonfinite"] is False and st["batches"] == len(loader)


def test_nonfinite_loss_stops_without_raising():
    model = nn.Linear(4, 2)
    with torch.no_grad():
        model.weight.fill_(float("nan"))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    st = train_one_epoch(model, _data(), nn.CrossEntropyLoss(), opt, torch.device("cpu"),
                         progress=False)
    assert st["nonfinite"] is True and st["batches"] == 0


def test_max_batches_limits_the_epoch():
    model = nn.Linear(4, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    st = train_one_epoch(model, _data(), nn.CrossEntropyLoss(), opt, torch.device("cpu"),
                         max_batches=2, progress=False)
    assert st["batches"] == 2


def test_channels_last_model_gets_channels_last_batches_and_same_results():
    from lib.utils.train import input_format
    from models import get_model

    torch.manual_seed(0)
    plain = get_model("mobilenetv2", num_classes=10, input_size=32, width_mult=0.25)
    fast = get_model("mobilenetv2", num_classes=10, input_size=32, width_mult=0.25)
    fast.load_state_dict(plain.state_dict())
    fast = fast.to(memory_format=torch.channels_last)
    assert input_format(plain) == torch.contiguous_format
    assert input_format(fast) == torch.channels_last
    # no kernel that tells (none, or only 1x1 / depthwise ones): the batches keep their format
    assert input_format(nn.Linear(4, 2)) == torch.preserve_format
    tail = fast.features[-2].to(memory_format=torch.channels_last)   # 1x1 and depthwise only
    assert input_format(tail) == torch.preserve_format
    x = torch.randn(2, tail.conv[0].in_channels, 4, 4).contiguous(memory_format=torch.channels_last)
    assert x.to(memory_format=input_format(tail)).data_ptr() == x.data_ptr()   # no copy

    seen = []
    fast.features[0].register_forward_pre_hook(
        lambda m, inp: seen.append(inp[0].is_contiguous(memory_format=torch.channels_last)))
    g = torch.Generator().manual_seed(1)
    loader = DataLoader(TensorDataset(torch.randn(32, 3, 32, 32, generator=g),
                                      torch.randint(0, 10, (32,), generator=g)), batch_size=16)
    cpu, ce = torch.device("cpu"), nn.CrossEntropyLoss()
    a = evaluate(plain, loader, ce, cpu, progress=False)
    b = evaluate(fast, loader, ce, cpu, progress=False)
    assert seen and all(seen)
    assert abs(a["loss"] - b["loss"]) < 1e-4 and a["top1"] == b["top1"]


def test_progress_lines_without_a_bar(monkeypatch, caplog):
    """No bar (--no-progress or no terminal): a log line at least every PROGRESS_INTERVAL_S."""
    import logging

    import lib.utils.train as train
    monkeypatch.setattr(train, "PROGRESS_INTERVAL_S", 0.0)
    model = nn.Linear(4, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with caplog.at_level(logging.INFO, logger="lib.utils.train"):
        train_one_epoch(model, _data(), nn.CrossEntropyLoss(), opt, torch.device("cpu"),
                        progress=False, desc="tiny")
        evaluate(model, _data(), nn.CrossEntropyLoss(), torch.device("cpu"), progress=True)
    lines = [r.getMessage() for r in caplog.records]
    # 4 batches each: a line after batches 1-3 (the epoch's own summary follows batch 4);
    # pytest's stderr is no terminal, so progress=True shows no bar and logs too
    assert [ln.split("  ")[0] for ln in lines] == [f"tiny: batch {i}/4" for i in (1, 2, 3)] + \
        [f"eval: batch {i}/4" for i in (1, 2, 3)]
    assert all("eta" in ln for ln in lines)
