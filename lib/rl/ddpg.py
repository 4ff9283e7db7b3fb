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
import logging
from dataclasses import dataclass
from types import SimpleNamespace

import numpy as np
import torch
import torch.nn as nn
from scipy.special import ndtr, ndtri

from . import compiled as compiled_update
from .flat import FlatAdam, flatten_parameters_
from .kernels import AgentKernels
from .memory import ReplayMemory

log = logging.getLogger(__name__)


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


# ------------------------------------------------------- hand-written backward passes
# Each mirrors what autograd runs for the modules above: F.linear on a batch is
# addmm(b, x, W^T), whose backward gives dx = g @ W, dW = g^T @ x (W is contiguous, so
# autograd computes this form) and db = g summed over the batch; ReLU and sigmoid use
# ATen's own backward kernels. With the reference kernels (AgentKernels(fast=False)) the
# results are those of loss.backward(), bit for bit; ``k`` picks the products' kernel.
# A network here is :func:`_layers`' namespace of (weight, bias) pairs.
def _layers(module):
    """``module``'s linear layers as (weight, bias) pairs by name: an update reads them ~90
    times, and each nn.Module attribute lookup costs ~0.25 us."""
    return SimpleNamespace(**{name: (m.weight, m.bias) for name, m in module.named_children()})


def _linear_backward(k, layer, x, grad, grads=None, need_input=True):
    """dL/dx for output gradient ``grad``; with ``grads`` (parameter -> gradient buffer,
    :attr:`FlatAdam.grads`) also write the layer's weight and bias gradients there."""
    weight, bias = layer
    if grads is not None:
        k.mm(grad.t(), x, out=grads[weight])
        torch.sum(grad, 0, out=grads[bias])
    return k.mm(grad, weight) if need_input else None


def _relu_backward(grad, out):
    return torch.ops.aten.threshold_backward(grad, out, 0)


def _critic_forward(k, critic, state, action):
    h1 = torch.relu_(k.linear(state, *critic.fc_state).add_(k.linear(action, *critic.fc_action)))
    h2 = k.linear(h1, *critic.fc2, relu=True)
    return k.linear(h2, *critic.fc3), (state, action, h1, h2)


def _critic_backward(k, critic, cache, dq, grads=None):
    """dL/daction for output gradient ``dq``; with ``grads`` also the critic's gradients."""
    state, action, h1, h2 = cache
    dh2 = _linear_backward(k, critic.fc3, h2, dq, grads)
    dz1 = _relu_backward(_linear_backward(k, critic.fc2, h1, _relu_backward(dh2, h2), grads), h1)
    if grads is not None:
        _linear_backward(k, critic.fc_state, state, dz1, grads, need_input=False)
    return _linear_backward(k, critic.fc_action, action, dz1, grads)


def _actor_forward(k, actor, state):
    x1 = k.linear(state, *actor.fc1, relu=True)
    x2 = k.linear(x1, *actor.fc2, relu=True)
    mu = torch.sigmoid_(k.linear(x2, *actor.fc3))
    return mu, (state, x1, x2, mu)


def _actor_backward(k, actor, cache, dmu, grads):
    state, x1, x2, mu = cache
    dx2 = _linear_backward(k, actor.fc3, x2, torch.ops.aten.sigmoid_backward(dmu, mu), grads)
    dx1 = _linear_backward(k, actor.fc2, x1, _relu_backward(dx2, x2), grads)
    _linear_backward(k, actor.fc1, state, _relu_backward(dx1, x1), grads, need_input=False)


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


class DDPG:
    """DDPG with HAQ's warmup, truncated-normal exploration and reward baseline.

    ``state_dim``: length of a state vector; ``n_layers``: quantizable layers of the
    model (the replay memory holds ``rmsize * n_layers`` transitions, as released,
    whatever the number of actions per layer); ``device``: a
    ``torch.device`` for the networks; ``seed``: seeds the agent's own numpy
    generator (random actions, noise, minibatches). Network initialisation uses
    torch's RNG, which the caller seeds once. ``fast_kernels``: run the update's products
    and optimizer step on the faster CPU kernels where they apply
    (:class:`~lib.rl.kernels.AgentKernels`; equal within float32 rounding); off, the
    updates equal autograd + ``torch.optim.Adam`` bit for bit. ``compiled``: with the fast
    kernels on the CPU and numba importable, run everything but the large products in
    compiled passes (:class:`~lib.rl.compiled.CompiledUpdate`; equal within float32 rounding).
    """

    def __init__(self, state_dim, n_layers, config=None, device=None, seed=None, action_dim=1,
                 fast_kernels=True, compiled=True):
        self.cfg = config or DDPGConfig()
        self.device = torch.device(device or "cpu")
        self.state_dim, self.action_dim = state_dim, action_dim
        c = self.cfg
        self.actor = Actor(state_dim, action_dim, c.hidden1, c.hidden2, c.init_w).to(self.device)
        self.critic = Critic(state_dim, action_dim, c.hidden1, c.hidden2, c.init_w).to(self.device)
        # Targets start as exact copies (hard update).
        self.actor_target = copy.deepcopy(self.actor)
        self.critic_target = copy.deepcopy(self.critic)
        # Each network's parameters (and the trained ones' gradients and moments) live in
        # one flat buffer, so an Adam step or a soft update is a few whole-network kernels.
        self.actor_adam = FlatAdam(self.actor, c.lr_a)
        self.critic_adam = FlatAdam(self.critic, c.lr_c)
        self.actor_optim, self.critic_optim = self.actor_adam.optim, self.critic_adam.optim
        self._target_flat = (flatten_parameters_(self.actor_target),
                             flatten_parameters_(self.critic_target))
        self.memory = ReplayMemory(c.rmsize * n_layers, state_dim, action_dim)
        self.kernels = AgentKernels(self.device, fast=fast_kernels)
        self._nets = SimpleNamespace(**{name: _layers(getattr(self, name)) for name in
                                        ("actor", "critic", "actor_target", "critic_target")})
        self._constants = {}   # tensors every update of a batch size reuses
        self._compiled = (compiled_update.CompiledUpdate(self)
                          if compiled and compiled_update.usable(self.kernels) else None)
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

    def _update_baseline(self, rewards):
        """Update the moving-average baseline with this minibatch's rewards; return it."""
        batch_mean = float(np.mean(rewards))
        if self.moving_average is None:
            self.moving_average = batch_mean
        else:
            self.moving_average += self.cfg.moving_alpha * (batch_mean - self.moving_average)
        return self.moving_average

    def _baseline(self, rewards):
        """Update the moving-average baseline with this minibatch and subtract it."""
        return rewards - self._update_baseline(rewards)

    def _minibatch(self):
        """A sampled minibatch as tensors (state, action, reward - baseline, next state, done)."""
        states, actions, rewards, next_states, terminals = self.memory.sample(self.cfg.bsize,
                                                                              self.rng)
        rewards = self._baseline(rewards)
        t = lambda x: torch.as_tensor(x, dtype=torch.float32, device=self.device)  # noqa: E731
        return (t(states), t(actions), t(rewards).unsqueeze(1), t(next_states),
                t(terminals).unsqueeze(1))

    def update_policy(self):
        """One critic and one actor step on a minibatch; returns (value_loss, policy_loss).

        The gradients are written out (:func:`_linear_backward` and ATen's own backward
        formulas) instead of recorded by autograd, into flat gradient buffers that one
        Adam step (:class:`~lib.rl.flat.FlatAdam`) reads whole: the operations autograd
        and ``torch.optim.Adam`` run for these two small MLPs, without a graph or per-tensor
        kernels. With the reference kernels the results are identical to autograd's
        (tests/test_rl.py checks them bit for bit over an episode); by default the large
        products run in oneDNN and Adam in torch's fused kernel where they apply
        (:class:`~lib.rl.kernels.AgentKernels`), the same maths in another rounding, and on
        the CPU with numba everything else runs in compiled passes between the products
        (:class:`~lib.rl.compiled.CompiledUpdate`). ``bench/agent_bench.py`` times the four.
        """
        if len(self.memory) == 0:
            return None, None
        if self._compiled is not None:
            losses = self._compiled()
            self.n_updates += 1
            return losses
        s, a, r, s2, done = self._minibatch()
        k, tau = self.kernels, self.cfg.tau
        actor_target, critic_target = self._target_flat
        nets, n = self._nets, s.shape[0]
        if n not in self._constants:   # dL/dloss = 1; d(-mean Q)/dQ = -1/n for each row
            self._constants[n] = (torch.ones((), device=self.device),
                                  torch.full((n, 1), -1.0, device=self.device) / n)
        one, dq_policy = self._constants[n]
        with torch.no_grad():
            q_next, _ = _critic_forward(k, nets.critic_target, s2,
                                        _actor_forward(k, nets.actor_target, s2)[0])
            target = r + self.cfg.discount * (1.0 - done) * q_next

            q, cache = _critic_forward(k, nets.critic, s, a)
            value_loss = nn.functional.mse_loss(q, target)
            dq = torch.ops.aten.mse_loss_backward(one, q, target, 1)
            _critic_backward(k, nets.critic, cache, dq, self.critic_adam.grads)
            # the critic's target is not read again in this update: it follows at once
            self.critic_adam.step_and_follow(critic_target, tau, k.fused_adam)

            # the actor's loss -mean Q(s, mu(s)) needs dQ/da only from the (updated) critic
            mu, acache = _actor_forward(k, nets.actor, s)
            q, cache = _critic_forward(k, nets.critic, s, mu)
            policy_loss = -q.mean()
            _actor_backward(k, nets.actor, acache, _critic_backward(k, nets.critic, cache, dq_policy),
                            self.actor_adam.grads)
            self.actor_adam.step_and_follow(actor_target, tau, k.fused_adam)
        self.n_updates += 1
        return value_loss.item(), policy_loss.item()

    def autograd_update(self):
        """:meth:`update_policy` done the straightforward way (loss.backward() on the modules,
        a loop of soft updates): the reference the hand-written one equals bit for bit, kept
        for tests/test_rl.py and bench/agent_bench.py."""
        s, a, r, s2, done = self._minibatch()
        with torch.no_grad():
            q_next = self.critic_target(s2, self.actor_target(s2))
            target = r + self.cfg.discount * (1.0 - done) * q_next
        value_loss = nn.functional.mse_loss(self.critic(s, a), target)
        self.critic_optim.zero_grad(set_to_none=True)
        value_loss.backward()
        self.critic_optim.step()
        policy_loss = -self.critic(s, self.actor(s)).mean()
        self.actor_optim.zero_grad(set_to_none=True)
        policy_loss.backward()
        self.actor_optim.step()
        with torch.no_grad():
            for target_net, net in ((self.actor_target, self.actor),
                                    (self.critic_target, self.critic)):
                for tp, p in zip(target_net.parameters(), net.parameters()):
                    tp.mul_(1.0 - self.cfg.tau).add_(p, alpha=self.cfg.tau)
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
        self.actor_adam.load_state_dict(state["actor_optim"])
        self.critic_adam.load_state_dict(state["critic_optim"])
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
