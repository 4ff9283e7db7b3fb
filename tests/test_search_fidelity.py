"""The search as released (issue 11 items 4-7): free high-bit layers, pruned models, replay
memory size, and the fc row of the state.

Small models and a few random batches: every test runs in about a second.
"""
import numpy as np
import pytest
import torch
import torch.nn as nn

import rl_quantize
from test_env import tiny_cnn
from lib.env import (EnvConfig, FinetuneConfig, KMeansQuantizeEnv, LinearQuantizeEnv,
                     ShortFinetune, layer_features)
from lib.simulator.costs import TableCost

BITS = [7, 2, 3, 8]   # tiny_cnn: 216, 72, 256 and 320 weights


def pruned_cnn():
    """tiny_cnn with half of its weights zero, unevenly: 162/216, 0/72, 128/256, 142/320."""
    model = tiny_cnn()
    gen = torch.Generator().manual_seed(1)
    layers = [m for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    with torch.no_grad():
        for layer, zeros in zip(layers, [162, 0, 128, 142]):
            flat = layer.weight.view(-1)
            flat[torch.randperm(flat.numel(), generator=gen)[:zeros]] = 0.0
    return model


def action_for(bits, min_bit=1, max_bit=8):
    """The middle of ``bits``' interval of [0, 1] (lib.env.action_to_bits)."""
    return (bits - min_bit + 0.5) / (max_bit - min_bit + 1)


def distinct(t, nonzero=False):
    t = t.detach().flatten()
    return torch.unique(t[t != 0] if nonzero else t).numel()


class SpyFinetune(ShortFinetune):
    """The real short fine-tune, recording the layers' weights after every step and whenever
    the episode is validated."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.layers, self.after_step, self.at_validation = [], [], []
        self._in_episode = False

    def _weights(self):
        return [m.weight.detach().clone() for _, m in self.layers]

    def finetune(self, model, step_hook=None, scoring=None):
        def hook():
            step_hook()
            self.after_step.append(self._weights())
        self._in_episode = True
        try:
            kwargs = {} if scoring is None else {"scoring": scoring}
            return super().finetune(model, hook, **kwargs)
        finally:
            self._in_episode = False

    def validate(self, model):
        if self._in_episode:
            self.at_validation.append(self._weights())
        return super().validate(model)


def spy_env(model, is_pruned=False, free_high_bit=True, epochs=1):
    torch.manual_seed(2)
    x, y = torch.randn(16, 3, 16, 16), torch.randint(0, 10, (16,))
    spy = SpyFinetune([(x[:8], y[:8]), (x[8:], y[8:])], [(x, y)], torch.device("cpu"),
                      FinetuneConfig(finetune_lr=0.05, finetune_epoch=epochs))
    cfg = EnvConfig(preserve_ratio=1.0, min_bit=1, max_bit=8, input_size=16)
    # free_high_bit is the default (as released); only the strict run names it
    extra = {} if free_high_bit else {"free_high_bit": False}
    env = KMeansQuantizeEnv(model, spy, cfg, is_pruned=is_pruned, **extra)
    spy.layers = env.layers
    env.measure_original()
    return env, spy


def play(env, bits):
    env.reset()
    for b in bits:
        _, reward, done, info = env.step(np.array([action_for(b)]))
    assert done and info["policy"] == bits
    return info


# ------------------------------------------------------------------ item 4: free_high_bit
def test_search_high_bit_layers_train_freely_and_are_reclustered_for_validation():
    env, spy = spy_env(tiny_cnn(), epochs=2)
    play(env, BITS)
    assert len(spy.after_step) == 4 and len(spy.at_validation) == 2
    for weights in spy.after_step:
        # > 6 bits: trained freely, more than 2^b values after a step (as released)
        assert distinct(weights[0]) > 2 ** 7 and distinct(weights[3]) > 2 ** 8
        # <= 6 bits: centroid-shared throughout
        assert distinct(weights[1]) <= 2 ** 2 and distinct(weights[2]) <= 2 ** 3
    for weights in spy.at_validation:   # only the fully quantized model is scored
        for w, b in zip(weights, BITS):
            assert distinct(w) <= 2 ** b
    # the clustering was for scoring only: the second epoch trained the float weights on
    first_val, second_epoch = spy.at_validation[0][0], spy.after_step[2][0]
    assert distinct(env.layers[0][1].weight) > 2 ** 7
    assert not torch.equal(second_epoch, first_val)


def test_search_strict_flag_keeps_high_bit_layers_shared():
    env, spy = spy_env(tiny_cnn(), free_high_bit=False)
    play(env, BITS)
    for weights in spy.after_step + spy.at_validation:
        for w, b in zip(weights, BITS):
            assert distinct(w) <= 2 ** b


def test_rl_quantize_free_high_bit_flag():
    parse = rl_quantize.get_args_parser().parse_args
    assert parse([]).free_high_bit is True
    assert parse(["--free_high_bit", "False"]).free_high_bit is False


# ------------------------------------------------------------------ item 5: pruned models
def test_pruned_size_counts_nonzero_weights_as_released():
    model = pruned_cnn()
    nnz = [54, 72, 128, 178]
    env, _ = spy_env(model, is_pruned=True)
    assert env.size_cost.n_weights.tolist() == nnz
    # released: cost = sum(bits * nnz), reference = float_bit * sum(nnz), ratio = cost / reference
    assert env.reference_cost() == 32 * sum(nnz)
    assert env.cost(BITS) == sum(b * n for b, n in zip(BITS, nnz))
    info = play(env, BITS)
    assert info["cost"] == sum(b * n for b, n in zip(BITS, nnz))
    assert info["cost_ratio"] == pytest.approx(info["cost"] / (32 * sum(nnz)))
    # the budget wall works on the same counts
    env.cfg.preserve_ratio = 0.1
    walled = env.action_wall([8, 8, 8, 8])
    assert env.cost(walled) <= 0.1 * 32 * sum(nnz)
    # an unpruned search of the same model counts every weight
    dense, _ = spy_env(pruned_cnn())
    assert dense.reference_cost() == 32 * 864


def test_pruned_zeros_stay_zero_and_out_of_the_clusters():
    model = pruned_cnn()
    masks = [m.weight.detach() == 0 for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    env, spy = spy_env(model, is_pruned=True)
    play(env, BITS)
    assert spy.after_step and spy.at_validation
    for weights in spy.after_step + spy.at_validation:
        for w, mask, b in zip(weights, masks, BITS):
            # zeros stay zero and no kept weight joins them: zero was never a shared centroid
            assert torch.equal(w == 0, mask)
    for weights in spy.at_validation:
        for w, b in zip(weights, BITS):
            assert distinct(w, nonzero=True) <= 2 ** b
    # 3-bit layer, 128 kept weights: all 8 centroids are spent on the non-zero weights
    assert distinct(spy.at_validation[0][2], nonzero=True) == 8


# ------------------------------------------------------------------ item 6: replay memory
class _Stub:
    def validate(self, model):
        return {"top1": 50.0, "top5": 90.0, "loss": 1.0}

    def finetune(self, model, step_hook=None, scoring=None):
        return {"top1": 40.0, "top5": 80.0, "loss": 1.0, "nonfinite": False}


def _linear_env():
    from models import get_model
    torch.manual_seed(0)
    model = get_model("qmobilenetv2", num_classes=10, input_size=32, width_mult=0.25)
    table = np.ones((53, 8, 8)) * np.outer(np.arange(1, 9), np.arange(1, 9))[None]
    cfg = EnvConfig(preserve_ratio=0.5, min_bit=2, max_bit=8, float_bit=8, input_size=32)
    return LinearQuantizeEnv(model, _Stub(), cfg, TableCost(table, min_bit=2, max_bit=8),
                             [], torch.device("cpu"))


def test_replay_memory_is_rmsize_per_layer_in_both_modes():
    parse = rl_quantize.get_args_parser().parse_args
    linear = _linear_env()
    assert len(linear.layers) == 53 and linear.n_steps == 106
    agent = rl_quantize.build_agent(parse(["--linear_quantization", "--rmsize", "4"]), linear,
                                    torch.device("cpu"))
    assert agent.memory.capacity == 4 * 53 and agent.memory.states.shape == (4 * 53, 10)
    kmeans = KMeansQuantizeEnv(tiny_cnn(), _Stub(), EnvConfig(input_size=16))
    agent = rl_quantize.build_agent(parse(["--rmsize", "4"]), kmeans, torch.device("cpu"))
    assert agent.memory.capacity == 4 * 4


def test_rmsize_help_says_per_layer():
    action = next(a for a in rl_quantize.get_args_parser()._actions if a.dest == "rmsize")
    assert "x #layers" in action.help and "per quantizable layer" in action.help


# ------------------------------------------------------------------ item 7: state details
def test_fc_feature_map_column_is_in_features():
    env = KMeansQuantizeEnv(tiny_cnn(), _Stub(), EnvConfig(input_size=16))
    raw = layer_features(env.shapes)
    assert raw[:, 6].tolist() == [16 * 16, 16 * 16, 8 * 8, 32]   # fc: in_features, as released
    linear = _linear_env()
    raw = layer_features(linear.shapes)
    assert raw[-1, 6] == linear.layers[-1][1].in_features
