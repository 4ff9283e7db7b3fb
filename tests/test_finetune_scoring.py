"""finetune.py --free_high_bit: only a fully quantized model is scored or saved as the best
(issue 16 item 3).

Layers above 6 bits train in float until the last epoch; every accuracy (right after
quantization, each epoch's, -e of any checkpoint) is measured with them clustered, and
model_best.pth.tar holds that clustered model.
"""
import copy
import json
import os

import pytest
import torch

import finetune
import lib.finetune.outputs
import lib.finetune.run
from lib.utils.checkpoint import save_checkpoint
from lib.utils.layers import quantizable_layers

TINY = ["--width_mult", "0.25", "--train_subset", "32", "--train_batch", "16",
        "--test_batch", "32", "--device", "cpu", "--no-progress", "--lr", "0.01"]
EVAL = ["--device", "cpu", "--no-progress", "--test_batch", "32"]


def distinct(t):
    return torch.unique(t.detach()).numel()


@pytest.fixture
def policy(tmp_path, tiny_pretrained):
    """2/3/7 bits by turns: several 7-bit layers have more than 2^7 weights."""
    weights, model = tiny_pretrained
    layers = quantizable_layers(model)
    bits = [(2, 3, 7)[i % 3] for i in range(len(layers))]
    big_free = [n for (n, m), b in zip(layers, bits) if b == 7 and m.weight.numel() > 2 ** 7]
    assert big_free
    path = tmp_path / "kmeans.json"
    path.write_text(json.dumps({"mode": "kmeans", "layers": [n for n, _ in layers],
                                "strategy": bits}))
    return {"path": str(path), "weights": weights, "bits": dict(zip([n for n, _ in layers], bits)),
            "big_free": big_free}


def test_free_high_bit_scores_and_saves_only_fully_quantized_models(policy, tmp_path, monkeypatch):
    bits = policy["bits"]
    scored = []   # per accuracy measurement: the most distinct values any layer had over 2^b

    real_evaluate = lib.finetune.run.evaluate_model

    def spy_evaluate(model, *args, **kwargs):
        scored.append(max(distinct(model.get_submodule(n).weight) / 2 ** b
                          for n, b in bits.items()))
        return real_evaluate(model, *args, **kwargs)

    saved = []
    real_save = lib.finetune.outputs.save_checkpoint

    def spy_save(state, path):
        saved.append((os.path.basename(path), copy.deepcopy(state)))
        real_save(state, path)

    monkeypatch.setattr(lib.finetune.run, "evaluate_model", spy_evaluate)
    monkeypatch.setattr(lib.finetune.outputs, "save_checkpoint", spy_save)
    out = str(tmp_path / "run")
    res = finetune.main(["--strategy", policy["path"], "--pretrained_path", policy["weights"],
                         "-c", out, "--epochs", "3", "--no-eval_fp32"] + TINY)
    # after quantization + 3 epochs, and every one with all layers at <= 2^b values
    assert len(scored) == 4 and max(scored) <= 1.0, scored

    best = [s for name, s in saved if name == "model_best.pth.tar"]
    ckpts = {s["epoch"]: s for name, s in saved if name == "checkpoint.pth.tar"}
    assert best and best[0]["epoch"] == 1   # saved while the 7-bit layers still train in float
    for state in best:
        for name, b in bits.items():
            weight = state["state_dict"][name + ".weight"]
            assert distinct(weight) <= 2 ** b, (state["epoch"], name)
            cb = state["codebooks"][name]
            assert torch.equal(cb["centroids"][cb["labels"].long()], weight.flatten())
    # the training state keeps the free layers float until the last epoch
    free = policy["big_free"][0]
    assert distinct(ckpts[1]["state_dict"][free + ".weight"]) > 2 ** 7
    assert free not in ckpts[1]["codebooks"]
    assert distinct(ckpts[3]["state_dict"][free + ".weight"]) <= 2 ** 7

    # every recorded accuracy re-evaluates exactly from the saved file
    for i, state in enumerate(best + [ckpts[1]]):
        path = str(tmp_path / f"saved{i}.pth.tar")
        real_save(state, path)
        va = finetune.main(["-e", "--resume", path] + EVAL)
        assert va["top1"] == state["acc"], (i, state["epoch"])
    assert max(scored) <= 1.0
    results = json.load(open(os.path.join(out, "results.json")))
    assert results["best_top1"] == best[-1]["acc"] == res["best_top1"]


def test_pruned_zeros_stay_zero_in_free_and_shared_layers(policy, tmp_path, tiny_pretrained,
                                                          monkeypatch):
    """--is_pruned: the zeros of the pretrained weights are still zero in every saved file,
    including the 7-bit layers that train in float before the last epoch."""
    _, model = tiny_pretrained
    state = copy.deepcopy(model.state_dict())
    gen = torch.Generator().manual_seed(0)
    zeros = {}
    for name in policy["bits"]:
        w = state[name + ".weight"].view(-1)
        w[torch.randperm(w.numel(), generator=gen)[: w.numel() // 2]] = 0.0
        zeros[name] = state[name + ".weight"] == 0
    weights = str(tmp_path / "pruned.pth.tar")
    save_checkpoint({"state_dict": state}, weights)

    saved = []
    real_save = lib.finetune.outputs.save_checkpoint
    monkeypatch.setattr(lib.finetune.outputs, "save_checkpoint",
                        lambda s, path: (saved.append(copy.deepcopy(s)), real_save(s, path)))
    finetune.main(["--strategy", policy["path"], "--pretrained_path", weights, "--is_pruned",
                   "-c", str(tmp_path / "run"), "--epochs", "2", "--no-eval_fp32"] + TINY)
    free = policy["big_free"][0]
    first = next(s for s in saved if s["epoch"] == 1 and free not in s["codebooks"])
    assert distinct(first["state_dict"][free + ".weight"]) > 2 ** 7   # trained in float
    assert {s["epoch"] for s in saved} == {1, 2}
    for s in saved:
        for name, mask in zeros.items():
            assert torch.equal(s["state_dict"][name + ".weight"] == 0, mask), (s["epoch"], name)
