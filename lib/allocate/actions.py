"""Action sources that drive a search environment without learning (docs/design.md, allocators).

A search environment takes one action in [0, 1] per step and maps it to bits
(``lib.env.action_to_bits``: every width owns an interval of the same length).
These sources give the env its actions through the same two calls the episode
loop makes of any source, ``select_action(state, episode)`` and
``store_episode(transitions, reward)``, so the pins, the budget wall and the
evaluation stay the env's:

* :class:`UniformActions` - every action uniform on [0, 1] (the distribution of
  DDPG's warmup episodes): random search, the honest baseline for the RL search.
* :class:`FixedActions` - replays one fixed list of per-step bit widths, e.g. the
  integer program's policy, so that policy is evaluated exactly like an episode.
"""
import numpy as np


def bits_to_action(bits, min_bit, max_bit):
    """The centre of the action interval that ``action_to_bits`` maps to ``bits``.

    Widths outside [min_bit, max_bit] (pinned steps such as 8 or -1) are clipped: the
    env overrides pinned steps whatever the action. On a width set spanning
    ``min_bit..max_bit`` (``lib.env.action_to_width``) the action lands exactly on
    ``bits``, so a member of the set maps back to itself.
    """
    b = min(max(int(bits), min_bit), max_bit)
    return (b - min_bit + 0.5) / (max_bit - min_bit + 1)


class UniformActions:
    """Uniform random actions on [0, 1] from a generator of its own (resumable)."""

    def __init__(self, seed=None):
        self.rng = np.random.default_rng(seed)

    def select_action(self, state, episode):
        return self.rng.uniform(0.0, 1.0, size=1)

    def store_episode(self, transitions, reward):
        """Nothing to learn from an episode."""

    def state_dict(self):
        return {"rng": self.rng.bit_generator.state}

    def load_state_dict(self, state):
        self.rng.bit_generator.state = state["rng"]


class FixedActions:
    """Replays ``flat_bits`` (one width per env step) as actions, one episode after another.

    The plan may be set after construction (:meth:`plan`), e.g. once sensitivity scores
    exist; the step counter restarts with each episode of ``len(flat_bits)`` steps.
    ``step_ranges``: per step, the (narrowest, widest) width its actions span when the
    steps differ (linear mode's separate activation range); default ``(min_bit, max_bit)``.
    """

    def __init__(self, min_bit, max_bit, flat_bits=None, step_ranges=None):
        self.min_bit, self.max_bit = min_bit, max_bit
        self.step_ranges = step_ranges
        self.flat_bits = None
        self._step = 0
        if flat_bits is not None:
            self.plan(flat_bits)

    def plan(self, flat_bits):
        self.flat_bits = [int(b) for b in flat_bits]
        self._step = 0

    def select_action(self, state, episode):
        if self.flat_bits is None:
            raise RuntimeError("FixedActions: no plan; call plan(flat_bits) first")
        lo, hi = (self.min_bit, self.max_bit) if self.step_ranges is None \
            else self.step_ranges[self._step]
        bits = self.flat_bits[self._step]
        self._step = (self._step + 1) % len(self.flat_bits)
        return np.array([bits_to_action(bits, lo, hi)])

    def store_episode(self, transitions, reward):
        """Nothing to learn from an episode."""

    def state_dict(self):
        return {"flat_bits": self.flat_bits}

    def load_state_dict(self, state):
        if state.get("flat_bits") is not None:
            self.plan(state["flat_bits"])
