"""Replay memory for the DDPG agent: a fixed-size ring buffer of transitions.

HAQ stores every transition of an episode with the episode's final reward, so a
transition is ``(state, action, reward, next_state, terminal)`` and the buffer holds
``rmsize * n_layers`` of them (128 per quantizable layer in the released settings;
linear mode's two steps per layer share that).
When full, the oldest transition is overwritten.

The buffers are numpy arrays; ``state_dict`` hands them out as torch tensors so
the memory is saved with the search state (read back with
``torch.load(weights_only=True)``) and restored exactly.
"""
import numpy as np
import torch

_ARRAYS = ("states", "actions", "rewards", "next_states", "terminals")


class ReplayMemory:
    """Ring buffer of ``capacity`` transitions with ``state_dim``-dim states."""

    def __init__(self, capacity, state_dim, action_dim=1):
        if capacity < 1:
            raise ValueError(f"replay memory capacity must be >= 1, got {capacity}")
        self.capacity = int(capacity)
        self.states = np.zeros((self.capacity, state_dim), dtype=np.float32)
        self.actions = np.zeros((self.capacity, action_dim), dtype=np.float32)
        self.rewards = np.zeros(self.capacity, dtype=np.float32)
        self.next_states = np.zeros((self.capacity, state_dim), dtype=np.float32)
        self.terminals = np.zeros(self.capacity, dtype=np.float32)
        self.next_index = 0   # where the next transition goes
        self.size = 0         # how many slots hold a transition

    def __len__(self):
        return self.size

    def append(self, state, action, reward, next_state, terminal):
        """Store one transition, overwriting the oldest one when the buffer is full."""
        i = self.next_index
        self.states[i] = state
        self.actions[i] = action
        self.rewards[i] = reward
        self.next_states[i] = next_state
        self.terminals[i] = float(terminal)
        self.next_index = (i + 1) % self.capacity
        self.size = min(self.size + 1, self.capacity)

    def sample(self, batch_size, rng):
        """Draw a minibatch uniformly (without replacement when enough are stored).

        ``rng`` is a ``numpy.random.Generator`` owned by the caller, so sampling is
        reproducible and its state can be checkpointed.
        Returns ``(states, actions, rewards, next_states, terminals)``.
        """
        if self.size == 0:
            raise ValueError("cannot sample from an empty replay memory")
        idx = rng.choice(self.size, size=batch_size, replace=self.size < batch_size)
        return (self.states[idx], self.actions[idx], self.rewards[idx].copy(),
                self.next_states[idx], self.terminals[idx])

    def state_dict(self):
        """Tensors (copies of the buffers) and ints only."""
        state = {key: torch.from_numpy(getattr(self, key).copy()) for key in _ARRAYS}
        state.update(next_index=int(self.next_index), size=int(self.size))
        return state

    def load_state_dict(self, state):
        arrays = {key: np.asarray(state[key]) for key in _ARRAYS}
        if arrays["states"].shape != self.states.shape:
            raise ValueError(f"replay memory shape {arrays['states'].shape} does not match "
                             f"{self.states.shape}")
        counters = [state["next_index"], state["size"]]
        if not all(type(c) is int and 0 <= c <= len(self.states) for c in counters):
            raise ValueError(f"replay memory counters {counters} are not in [0, "
                             f"{len(self.states)}]")
        for key, value in arrays.items():
            getattr(self, key)[...] = value
        self.next_index, self.size = counters
