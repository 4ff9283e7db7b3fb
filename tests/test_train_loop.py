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
