"""The search environment shared by both quantization modes (HAQ section 3; docs/design.md, "the search").

An episode is one pass over the quantizable layers. At every step the agent
gives an action in [0, 1]; the environment turns it into a bit width
(:func:`action_to_bits`), and after the last step it

1. applies the mode's pins (linear mode: first layer [8, -1], last [8, 8]),
2. enforces the budget (:meth:`PolicyBudget.action_wall`, "limit action space"
   in the paper, section 3.3),
3. restores the pretrained weights, applies the policy, fine-tunes shortly and
   validates (the mode's :meth:`QuantizeEnv.evaluate_policy`),
4. returns the reward ``R = lambda * (acc_quant - acc_origin)`` with
   lambda = 0.1 (paper eq. 4 and the released code).

The base class owns layer discovery, the state embedding, action -> bits, the
budget wall and the reward; a mode subclass only says how many actions a layer
takes, how a policy is applied to the model, and what a policy costs. Nothing
here knows about the agent: the CLI passes numpy states to it and actions back.

Under torchrun the agent lives on rank 0 only; the other ranks follow its
episodes (lib.env.torchrun).
"""
import logging
import math
from dataclasses import dataclass, field
from typing import Optional

import numpy as np

from lib.simulator.shapes import extract_layer_shapes
from lib.utils.distributed import get_rank, is_distributed
from lib.utils.errors import UserError
from lib.utils.layers import quantizable_layers
from lib.utils.strategy import MAX_BIT as STRATEGY_MAX_BIT

from .budget import PolicyBudget
from .torchrun import send_episode

log = logging.getLogger(__name__)

REWARD_SCALE = 0.1   # lambda of the paper's reward (eq. 4)
MAX_PIN_BIT = STRATEGY_MAX_BIT   # the widest width a strategy.json may hold


@dataclass
class EnvConfig:
    """What the search's budget and action space are (the rl_quantize.py flags)."""
    preserve_ratio: float = 0.1
    min_bit: int = 1
    max_bit: int = 8
    float_bit: int = 32
    input_size: int = 224        # for tracing the feature-map sizes of the state
    use_top5: bool = False       # reward on top-5 instead of top-1
    seed: int = 234              # seeds the env's own generator (K-Means seeding)
    # Added after the first release (a saved search without them ran with None): activation
    # range (None: min_bit/max_bit), width sets (None: the whole range) and layer pins.
    min_bit_a: Optional[int] = field(default=None, metadata={"added_later": True})
    max_bit_a: Optional[int] = field(default=None, metadata={"added_later": True})
    bits: Optional[list] = field(default=None, metadata={"added_later": True})
    bits_a: Optional[list] = field(default=None, metadata={"added_later": True})
    pin: Optional[list] = field(default=None, metadata={"added_later": True})


def action_to_bits(action, min_bit, max_bit):
    """Map a in [0, 1] to bits = round(lb + a * (rb - lb)), lb = min_bit - 0.5, rb = max_bit + 0.5.

    Every bit width gets an interval of the same length 1 / (max_bit - min_bit + 1)
    of [0, 1]. ``floor(x + 0.5)`` rounds halves up (Python's ``round`` would send
    a = 0 to min_bit - 1 by rounding half to even) and a = 1 lands on max_bit + 1,
    so the result is clipped to [min_bit, max_bit].
    """
    return action_to_width(action, range(min_bit, max_bit + 1))


def action_to_width(action, widths):
    """The allowed width nearest to ``lb + a * (rb - lb)``, lb/rb = the widths' ends -/+ 0.5.

    On a whole range this is :func:`action_to_bits`' rounding (halves go up); on a set
    such as {2, 4, 8} the action's real-valued width goes to the nearest member.
    """
    widths = sorted(widths)
    a = float(np.clip(np.asarray(action, dtype=np.float64).reshape(-1)[0], 0.0, 1.0))
    lb, rb = widths[0] - 0.5, widths[-1] + 0.5
    x = min(max(math.floor(lb + a * (rb - lb) + 0.5), widths[0]), widths[-1])
    return int(min(widths, key=lambda w: (abs(w - x), -w)))


def width_choices(lo, hi, chosen):
    """The sorted widths a step may take: the set ``chosen`` if given, else ``lo..hi``."""
    return sorted({int(b) for b in chosen}) if chosen else list(range(lo, hi + 1))


def normalize_columns(features):
    """Min-max normalise each column over the layers (released HAQ's embedding).

    A constant column carries no information; it is kept as is when already in
    [0, 1] (layer-type, stride 1) and otherwise clipped into [0, 1], so every state
    value lies in [0, 1] whatever the model.
    """
    x = np.asarray(features, dtype=np.float64).copy()
    lo, hi = x.min(axis=0), x.max(axis=0)
    for j in range(x.shape[1]):
        if hi[j] > lo[j]:
            x[:, j] = (x[:, j] - lo[j]) / (hi[j] - lo[j])
        else:
            x[:, j] = np.clip(x[:, j], 0.0, 1.0)
    return x


def layer_features(shapes):
    """The 8 static values per layer: [is_depthwise, c_in, c_out, stride, kernel, #weights, h*w, index].

    ``shapes`` are lib.simulator LayerShape records (traced at the search's input
    size). A fully-connected row has type 0, stride 0, kernel 1, and its in/out
    features as channels (docs/design.md, "the search"); its "h*w" is in_features, as in the
    released code (its tracer took the fc input's (1, in_features) shape as h x w).
    """
    rows = []
    for i, s in enumerate(shapes):
        if s.kind == "linear":
            rows.append([0.0, s.in_channels, s.out_channels, 0.0, 1.0, s.n_weights,
                         s.in_channels, i])
        else:
            depthwise = float(s.in_channels == s.groups)
            rows.append([depthwise, s.in_channels, s.out_channels, s.stride[0], s.kernel[0],
                         s.n_weights, s.in_h * s.in_w, i])
    return np.asarray(rows, dtype=np.float64)


class QuantizeEnv(PolicyBudget):
    """Base environment: one episode = one action per step over the quantizable layers.

    ``model``: the network, already holding its pretrained weights (they are
    copied now and restored before every evaluation). ``evaluator``: an object
    with ``validate(model) -> dict(top1, top5, ...)`` and ``finetune(model,
    step_hook=None, scoring=None) -> dict(top1, top5, nonfinite, ...)`` (see
    :class:`lib.env.evaluator.ShortFinetune`); tests may pass a stub.
    Subclasses set ``linear`` and ``actions_per_layer`` and implement
    :meth:`policy_from_bits`, :meth:`cost`, :meth:`reference_cost` and
    :meth:`evaluate_policy`.
    """

    linear = False
    actions_per_layer = 1

    def __init__(self, model, evaluator, config):
        self.model = model
        self.evaluator = evaluator
        self.cfg = config
        if not 1 <= config.min_bit <= config.max_bit:
            raise UserError(f"--min_bit {config.min_bit} / --max_bit {config.max_bit}: "
                            "expected 1 <= min_bit <= max_bit")
        lo_a = config.min_bit if config.min_bit_a is None else config.min_bit_a
        hi_a = config.max_bit if config.max_bit_a is None else config.max_bit_a
        if not 1 <= lo_a <= hi_a:
            raise UserError(f"--min_bit_a {lo_a} / --max_bit_a {hi_a}: expected "
                            "1 <= min_bit_a <= max_bit_a")
        # the free widths of a weight step and of an activation step (linear mode)
        self.widths = {"weight": width_choices(config.min_bit, config.max_bit, config.bits),
                       "activation": width_choices(lo_a, hi_a, config.bits_a)}
        if not 0 < config.preserve_ratio:
            raise UserError(f"--preserve_ratio {config.preserve_ratio}: expected a positive ratio")
        self.layers = quantizable_layers(model, linear=self.linear)
        if not self.layers:
            kind = "QConv2d/QLinear" if self.linear else "Conv2d/Linear"
            raise UserError(f"the model has no {kind} layers to quantize")
        self.layer_names = [name for name, _ in self.layers]
        self.shapes = extract_layer_shapes(model, config.input_size, batch=1, linear=self.linear)
        self.static_features = normalize_columns(layer_features(self.shapes))
        # A copy of the pretrained weights: every episode starts from it.
        self.pretrained_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        self.rng = np.random.default_rng(config.seed)
        self.n_steps = len(self.layers) * self.actions_per_layer
        self.state_dim = self.static_features.shape[1] + self.actions_per_layer
        self.pins = self.default_pins()   # step index -> fixed bits
        self.pins.update(self.user_pins(config.pin or []))
        self.org_acc = None
        self._bits = []

    def evaluate_policy(self, policy):
        """Apply ``policy`` to the (restored) model, fine-tune, validate; return the metrics dict."""
        raise NotImplementedError

    def quantize_policy(self, policy):
        """Restore the pretrained weights and apply ``policy`` as an episode does, without
        fine-tuning (the allocators measure a policy's loss through it)."""
        raise NotImplementedError

    # ------------------------------------------------------------- widths and pins
    def default_pins(self):
        """The mode's own pins (step -> bits); ``--pin`` overrides them."""
        return {}

    def step_kind(self, step):
        return "activation" if step % self.actions_per_layer == 1 else "weight"

    def step_widths(self, step):
        """The widths a free step may take (its kind's set or range)."""
        return self.widths[self.step_kind(step)]

    def max_width(self):
        """The widest free width: the state's bit column is divided by it."""
        kinds = ("weight", "activation")[:self.actions_per_layer]
        return max(self.widths[k][-1] for k in kinds)

    def user_pins(self, specs):
        """``{step: bits}`` of ``--pin NAME=W[,A]`` strings (layers by ``named_modules()`` name)."""
        index = {name: i for i, name in enumerate(self.layer_names)}
        pins = {}
        for spec in specs:
            name, _, value = str(spec).partition("=")
            try:
                widths = [int(v) for v in value.split(",")] if value else []
            except ValueError:
                widths = []
            if name not in index:
                shown = ", ".join(self.layer_names[:4]) + ", ..."
                raise UserError(f"--pin {spec}: no quantizable layer '{name}'; expected one of "
                                f"the model's named_modules() names ({shown})")
            ok = 1 <= len(widths) <= self.actions_per_layer and 1 <= widths[0] <= MAX_PIN_BIT \
                and all(a == -1 or 1 <= a <= MAX_PIN_BIT for a in widths[1:])
            if not ok:
                form = "NAME=W,A or NAME=W" if self.linear else "NAME=W (K-Means: weights only)"
                raise UserError(f"--pin {spec}: expected {form} with widths in 1..{MAX_PIN_BIT} "
                                "(an activation may be -1, unquantized)")
            for k, bits in enumerate(widths):
                pins[index[name] * self.actions_per_layer + k] = bits
        return pins

    # ------------------------------------------------------------- episodes
    def embed(self, step, prev_bits):
        """State of ``step``: the layer's 8 static values, previous bits / max_bit, [is_weight]."""
        layer = step // self.actions_per_layer
        row = list(self.static_features[layer]) + [prev_bits / self.max_width()]
        if self.actions_per_layer == 2:
            row.append(1.0 if step % 2 == 0 else 0.0)
        return np.asarray(row, dtype=np.float32)

    def reset(self):
        """Start an episode; returns the first state (the 'previous' action counts as max_bit)."""
        self._bits = []
        return self.embed(0, self.max_width())

    def step(self, action):
        """Take one action; returns ``(next_state, reward, done, info)``.

        Intermediate steps have reward 0; the last returns the episode's reward, and
        ``info`` holds the evaluated policy, its accuracy and cost.
        """
        if len(self._bits) >= self.n_steps:
            raise RuntimeError("episode is over; call reset()")
        bits = action_to_width(action, self.step_widths(len(self._bits)))
        self._bits.append(bits)
        step = len(self._bits)
        if step < self.n_steps:
            return self.embed(step, bits), 0.0, False, {"bits": bits}
        info = self.finish_episode(self._bits)
        # The terminal transition's next state is never bootstrapped from (done = True).
        return self.embed(self.n_steps - 1, bits), info["reward"], True, info

    def finish_episode(self, raw_bits):
        """Pins, wall, evaluation and reward of a complete episode's bits.

        Under torchrun rank 0's bits are sent to the followers first (see lib.env.torchrun).
        """
        if is_distributed() and get_rank() == 0:
            send_episode(self, raw_bits)
        bits = list(raw_bits)
        for i, b in self.pins.items():
            bits[i] = b
        bits = self.action_wall(bits)
        policy = self.policy_from_bits(bits)
        metrics = self.evaluate_policy(policy)
        acc = metrics["top5" if self.cfg.use_top5 else "top1"]
        cost = self.cost(policy)
        return {"policy": policy, "raw_bits": list(raw_bits), "accuracy": acc,
                "reward": self.reward(acc), "cost": cost,
                "cost_ratio": cost / self.reference_cost(),
                "nonfinite": bool(metrics.get("nonfinite", False)), "metrics": metrics}

    def reward(self, acc):
        """R = 0.1 * (acc - acc_original) (paper eq. 4), accuracies in percent."""
        if self.org_acc is None:
            raise RuntimeError("call measure_original() before scoring an episode")
        return REWARD_SCALE * (acc - self.org_acc)

    # ------------------------------------------------------------- weights
    def restore_weights(self):
        """Put the pretrained weights back (start of every evaluation)."""
        self.model.load_state_dict(self.pretrained_state)

    def measure_original(self):
        """Accuracy of the unquantized model on the search's validation subset."""
        self.restore_weights()
        metrics = self.evaluator.validate(self.model)
        self.org_acc = metrics["top5" if self.cfg.use_top5 else "top1"]
        return self.org_acc

    def state_dict(self):
        """What a resumed search needs from the env (its generator, acc_original and the
        evaluator's pass counter, which orders the sharded training data).

        Plain dicts, ints and floats, so the search state loads with weights_only=True.
        """
        org_acc = None if self.org_acc is None else float(self.org_acc)
        state = {"rng": self.rng.bit_generator.state, "org_acc": org_acc}
        if hasattr(self.evaluator, "state_dict"):
            state["evaluator"] = self.evaluator.state_dict()
        return state

    def load_state_dict(self, state):
        self.rng.bit_generator.state = state["rng"]
        self.org_acc = state["org_acc"]
        if "evaluator" in state and hasattr(self.evaluator, "load_state_dict"):
            self.evaluator.load_state_dict(state["evaluator"])
