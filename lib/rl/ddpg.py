"""DDPG agent of HAQ (Wang et al., CVPR 2019, section 3.2; Lillicrap et al., ICLR 2016).

The agent sees one numpy state per step (a layer's embedding) and answers one
continuous action in [0, 1] that the environment maps to a bit width. It knows
nothing of models, data or quantization.

- actor ``mu(s)``: state -> hidden1 -> ReLU -> hidden2 -> ReLU -> 1 -> sigmoid;
- critic ``Q(s, a)``: fc(state) -> hidden1 plus fc(action) -> hidden1, ReLU,
  hidden2, ReLU, 1;
- targets ``mu'``, ``Q'`` follow by soft updates ``theta' <- tau*theta + (1-tau)*theta'``;
- critic loss ``(Q(s,a) - (r - b + gamma * (1 - done) * Q'(s', mu'(s'))))^2`` where ``b``
  is a moving average of the minibatch rewards (the variance-reduction baseline
  of the paper's eq. for the reward, alpha = 0.5); actor loss ``-Q(s, mu(s))``;
- exploration: ``a ~ TN(mu(s), sigma^2)`` truncated to [0, 1], with
  ``sigma = init_delta * delta_decay ** (episode - warmup)`` (paper: sigma 0.5 decaying by 0.99);
- warmup episodes take uniform random actions and do not train.
"""
import copy
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn as nn
from scipy.special import ndtr, ndtri

from .memory import ReplayMemory

@dataclass
class DDPGConfig:
    """Hyper-parameters; defaults are the released HAQ search's."""
    hidden1: int = 300
    hidden2: int = 300
    lr_c: float = 1e-3
    lr_a: float = 1e-4
    warmup: int = 20
    discount: float = 1.0
    bsize: int = 64
    rmsize: int = 128         # transitions per quantizable layer
    tau: float = 0.01
    init_delta: float = 0.5
    delta_decay: float = 0.99
    init_w: float = 0.003
    moving_alpha: float = 0.5
    lbound: float = 0.0
    rbound: float = 1.0


def _fanin_uniform_(linear):
    """DDPG's hidden-layer init: U(-1/sqrt(fan_in), 1/sqrt(fan_in))."""
    bound = 1.0 / np.sqrt(linear.weight.shape[1])
    nn.init.uniform_(linear.weight, -bound, bound)
    nn.init.uniform_(linear.bias, -bound, bound)


class Actor(nn.Module):
    def __init__(self, state_dim, action_dim, hidden1, hidden2, init_w):
        super().__init__()
        self.fc1 = nn.Linear(state_dim, hidden1)
        self.fc2 = nn.Linear(hidden1, hidden2)
        self.fc3 = nn.Linear(hidden2, action_dim)
        _fanin_uniform_(self.fc1)
        _fanin_uniform_(self.fc2)
        # A small last layer keeps the initial sigmoid outputs near 0.5.
        nn.init.uniform_(self.fc3.weight, -init_w, init_w)
        nn.init.uniform_(self.fc3.bias, -init_w, init_w)

    def forward(self, state):
        x = torch.relu(self.fc1(state))
        x = torch.relu(self.fc2(x))
        return torch.sigmoid(self.fc3(x))


class Critic(nn.Module):
    def __init__(self, state_dim, action_dim, hidden1, hidden2, init_w):
        super().__init__()
        self.fc_state = nn.Linear(state_dim, hidden1)
        self.fc_action = nn.Linear(action_dim, hidden1)
        self.fc2 = nn.Linear(hidden1, hidden2)
        self.fc3 = nn.Linear(hidden2, 1)
        for layer in (self.fc_state, self.fc_action, self.fc2):
            _fanin_uniform_(layer)
        nn.init.uniform_(self.fc3.weight, -init_w, init_w)
        nn.init.uniform_(self.fc3.bias, -init_w, init_w)

    def forward(self, state, action):
        x = torch.relu(self.fc_state(state) + self.fc_action(action))
        x = torch.relu(self.fc2(x))
        return self.fc3(x)


def truncated_normal(mean, sigma, low, high, rng):
    """Sample N(mean, sigma^2) truncated to [low, high] by inverting the CDF.

    Inversion needs one uniform draw per value (reproducible from ``rng``) and is
    stable here because ``low <= mean <= high``, so the interval always contains
    the mode and its CDF mass never underflows.
    """
    mean = np.asarray(mean, dtype=np.float64)
    if sigma <= 0:
        return np.clip(mean, low, high)
    a = ndtr((low - mean) / sigma)
    b = ndtr((high - mean) / sigma)
    u = rng.uniform(size=mean.shape)
    x = mean + sigma * ndtri(a + u * (b - a))
    # Guard against rounding at the interval ends.
    return np.clip(x, low, high)


# Adam's state-dict entries that choose how a step is computed, not what it computes: an
# optimizer that loads a state keeps its own.
_KERNEL_CHOICES = ("foreach", "fused", "capturable", "differentiable")


def _load_adam(optim, state):
    """Load ``torch.optim.Adam``'s state dict ``state`` into ``optim``, keeping ``optim``'s
    kernel choices.

    Earlier versions kept each network's moments in one flat buffer but saved them in this
    format, with ``foreach=True``: their moments and step counts are Adam's and resume as
    they are, on the kernel this version picks (the same maths, rounded alike to a fresh run).
    """
    groups = [dict(saved, **{key: mine[key] for key in _KERNEL_CHOICES if key in mine})
              for saved, mine in zip(state["param_groups"], optim.param_groups)]
    optim.load_state_dict(dict(state, param_groups=groups))


def _soft_update(target, source, tau):
    """theta' <- tau * theta + (1 - tau) * theta' for every parameter (Lillicrap et al.,
    Algorithm 1)."""
    with torch.no_grad():
        for tp, p in zip(target.parameters(), source.parameters()):
            tp.mul_(1.0 - tau).add_(p, alpha=tau)


class DDPG:
    """DDPG with HAQ's warmup, truncated-normal exploration and reward baseline.

    ``state_dim``: length of a state vector; ``n_layers``: quantizable layers of the
    model (the replay memory holds ``rmsize * n_layers`` transitions, as released,
    whatever the number of actions per layer); ``device``: a
    ``torch.device`` for the networks; ``seed``: seeds the agent's own numpy
    generator (random actions, noise, minibatches). Network initialisation uses
    torch's RNG, which the caller seeds once.
    """

    def __init__(self, state_dim, n_layers, config=None, device=None, seed=None, action_dim=1):
        self.cfg = config or DDPGConfig()
        self.device = torch.device(device or "cpu")
        self.state_dim, self.action_dim = state_dim, action_dim
        c = self.cfg
        self.actor = Actor(state_dim, action_dim, c.hidden1, c.hidden2, c.init_w).to(self.device)
        self.critic = Critic(state_dim, action_dim, c.hidden1, c.hidden2, c.init_w).to(self.device)
        # Targets start as exact copies (hard update).
        self.actor_target = copy.deepcopy(self.actor)
        self.critic_target = copy.deepcopy(self.critic)
        self.actor_optim = torch.optim.Adam(self.actor.parameters(), lr=c.lr_a)
        self.critic_optim = torch.optim.Adam(self.critic.parameters(), lr=c.lr_c)
        self.memory = ReplayMemory(c.rmsize * n_layers, state_dim, action_dim)
        self.rng = np.random.default_rng(seed)
        self.moving_average = None   # reward baseline b
        self.n_updates = 0

    # ---------------------------------------------------------------- acting
    def sigma(self, episode):
        """Exploration std at ``episode``: init_delta * delta_decay ** (episode - warmup)."""
        return self.cfg.init_delta * self.cfg.delta_decay ** max(0, episode - self.cfg.warmup)

    def random_action(self):
        """Uniform action in [lbound, rbound] (warmup episodes)."""
        return self.rng.uniform(self.cfg.lbound, self.cfg.rbound, size=self.action_dim)

    @torch.no_grad()
    def deterministic_action(self, state):
        """The actor's output mu(s) without noise."""
        s = torch.as_tensor(np.asarray(state, dtype=np.float32), device=self.device)
        return self.actor(s.reshape(1, -1)).squeeze(0).cpu().numpy().astype(np.float64)

    def select_action(self, state, episode):
        """Action for ``state`` at ``episode``: random during warmup, else mu(s) + noise."""
        if episode < self.cfg.warmup:
            return self.random_action()
        mu = self.deterministic_action(state)
        return truncated_normal(mu, self.sigma(episode), self.cfg.lbound, self.cfg.rbound,
                                self.rng)

    # -------------------------------------------------------------- learning
    def store_episode(self, transitions, reward):
        """Store every ``(state, action, next_state, done)`` of an episode with its final reward."""
        for state, action, next_state, done in transitions:
            self.memory.append(state, action, reward, next_state, done)

    def _baseline(self, rewards):
        """Move the baseline b toward this minibatch's mean reward (rate ``moving_alpha``) and
        return ``rewards - b``."""
        batch_mean = float(np.mean(rewards))
        if self.moving_average is None:
            self.moving_average = batch_mean
        else:
            self.moving_average += self.cfg.moving_alpha * (batch_mean - self.moving_average)
        return rewards - self.moving_average

    def _minibatch(self):
        """A sampled minibatch as tensors (state, action, reward - baseline, next state, done)."""
        states, actions, rewards, next_states, terminals = self.memory.sample(self.cfg.bsize,
                                                                              self.rng)
        rewards = self._baseline(rewards)
        t = lambda x: torch.as_tensor(x, dtype=torch.float32, device=self.device)  # noqa: E731
        return (t(states), t(actions), t(rewards).unsqueeze(1), t(next_states),
                t(terminals).unsqueeze(1))

    def update_policy(self):
        """One critic step, one actor step and the soft target updates on a minibatch
        (Lillicrap et al., Algorithm 1, with HAQ's reward baseline ``b``).

        Critic: minimise ``(Q(s, a) - y)^2`` with ``y = r - b + gamma * (1 - done) *
        Q'(s', mu'(s'))``; actor: minimise ``-Q(s, mu(s))`` through the updated critic
        (the released order). Returns ``(value_loss, policy_loss)``, or ``(None, None)``
        while the memory is empty.
        """
        if len(self.memory) == 0:
            return None, None
        s, a, r, s2, done = self._minibatch()
        with torch.no_grad():
            q_next = self.critic_target(s2, self.actor_target(s2))
            target = r + self.cfg.discount * (1.0 - done) * q_next
        value_loss = nn.functional.mse_loss(self.critic(s, a), target)
        self.critic_optim.zero_grad()
        value_loss.backward()
        self.critic_optim.step()

        policy_loss = -self.critic(s, self.actor(s)).mean()
        self.actor_optim.zero_grad()
        policy_loss.backward()
        self.actor_optim.step()

        _soft_update(self.actor_target, self.actor, self.cfg.tau)
        _soft_update(self.critic_target, self.critic, self.cfg.tau)
        self.n_updates += 1
        return value_loss.item(), policy_loss.item()

    # ----------------------------------------------------------- persistence
    def state_dict(self):
        """Everything needed to resume: networks, optimizers, memory, RNG, baseline.

        Only tensors, numbers, strings, lists and dicts (the generator's state is a
        dict of ints), so it is saved and loaded with ``weights_only=True``.
        """
        # Deep copies: an optimizer loading this dict would otherwise share (and
        # later see in-place updates of) this agent's moment tensors.
        return copy.deepcopy({
            "actor": self.actor.state_dict(), "critic": self.critic.state_dict(),
            "actor_target": self.actor_target.state_dict(),
            "critic_target": self.critic_target.state_dict(),
            "actor_optim": self.actor_optim.state_dict(),
            "critic_optim": self.critic_optim.state_dict(),
            "memory": self.memory.state_dict(),
            "rng": self.rng.bit_generator.state,
            "moving_average": None if self.moving_average is None else float(self.moving_average),
            "n_updates": int(self.n_updates)})

    def load_state_dict(self, state):
        self.load_weights(state)
        _load_adam(self.actor_optim, state["actor_optim"])
        _load_adam(self.critic_optim, state["critic_optim"])
        self.memory.load_state_dict(state["memory"])
        self.rng.bit_generator.state = state["rng"]
        self.moving_average = state["moving_average"]
        self.n_updates = int(state["n_updates"])

    def weights(self):
        """Actor and critic weights (what ``--resume`` warm-starts from)."""
        return {"actor": self.actor.state_dict(), "critic": self.critic.state_dict()}

    def load_weights(self, state):
        """Load actor/critic (and their targets when present, else copies)."""
        self.actor.load_state_dict(state["actor"])
        self.critic.load_state_dict(state["critic"])
        self.actor_target.load_state_dict(state.get("actor_target", state["actor"]))
        self.critic_target.load_state_dict(state.get("critic_target", state["critic"]))
