"""Which kernels run the agent's update: the reference ones or the faster CPU ones.

HAQ's agent is two 300-unit MLPs trained on minibatches of 64; an update is ten
64x300x300 products and elementwise work over the ~184k parameters, run once per
transition (106 times in a linear-mode episode of the embedded default). On the CPU
two kernels decide its cost, and both have a faster equivalent:

- the products: torch's CPU ``mm``/``linear`` call MKL's sgemm, which on an AMD EPYC
  (Zen 5) takes ~115 us for 64x300x300 on one thread (100 GFLOP/s); oneDNN's product
  (``torch.ops.mkldnn._linear_pointwise``, the kernel torch.compile's CPU backend gives
  linear layers; its AVX-512 code here) takes ~64 us (``bench/agent_bench.py`` prints
  both). Both accumulate in float32; they differ in summation order, that is in the last
  bits. Small products (the 10-wide state layers, the 1-wide heads) stay with torch, where
  oneDNN's ~10 us per call costs more than it saves (64x10x300: 6.3 vs 14.7 us).
- Adam and the soft target update: the reference runs ten whole-buffer passes per network
  (``torch.optim.Adam``'s foreach arithmetic, then a multiply and an add); torch's fused
  Adam kernel and one lerp do it in two (:func:`fused_adam_and_follow`).

Neither changes DDPG's maths: tests/test_rl.py checks that after an episode of fast updates
the networks are as close to a float64 run of autograd + ``torch.optim.Adam`` as the float32
reference is. Elsewhere (an accelerator, float64, a torch without these kernels) or with
``fast=False`` the reference kernels run, whose results equal autograd's bit for bit.
"""
import functools

import torch
import torch.nn.functional as F

# Products of at least this many multiply-adds go to oneDNN: 64x300x300 is 5.8M
# (1.7-1.8x faster there); 64x10x300 (0.19M) runs 2x slower there.
ONEDNN_MIN_MACS = 1 << 20


def _works(check):
    """Whether ``check()`` runs and returns True: a private kernel's probe. Builds differ (the
    CPU fused Adam came with torch 2.4; oneDNN's op is missing without mkldnn), and a search
    must not fail mid-way on one, so a kernel that raises here is simply not used."""
    try:
        return bool(check())
    except (RuntimeError, NotImplementedError, TypeError, AttributeError):
        return False


@functools.lru_cache(maxsize=None)
def _onednn_linear():
    """oneDNN's dense float32 linear op where it runs on strided CPU tensors, else None."""
    if not torch.backends.mkldnn.is_available():
        return None
    op = getattr(getattr(torch.ops, "mkldnn", None), "_linear_pointwise", None)
    if op is None:
        return None
    gen = torch.Generator().manual_seed(0)
    x, w = torch.randn(8, 16, generator=gen), torch.randn(16, 16, generator=gen)
    return op if _works(lambda: torch.allclose(op(x, w.t(), None, "none", [], ""), x @ w,
                                               rtol=1e-4, atol=1e-4)) else None


class AgentKernels:
    """The products and the optimizer step of :meth:`DDPG.update_policy`.

    ``fast`` asks for the faster CPU kernels; each is used only where it applies
    (``onednn``, ``fused_adam`` say which), else torch's.
    """

    def __init__(self, device, dtype=torch.float32, fast=True):
        cpu = torch.device(device).type == "cpu"
        self.fast = fast and cpu and dtype == torch.float32
        self._onednn = _onednn_linear() if self.fast else None
        self.onednn = self._onednn is not None
        # (on an accelerator the flat step counts, kept on the CPU as torch keeps them,
        # would have to move for the fused kernel: the reference runs there)
        self.fused_adam = fast and cpu and _fused_adam() is not None

    def _big(self, m, k, n):
        return self.onednn and m * k * n >= ONEDNN_MIN_MACS

    def linear(self, x, weight, bias=None, relu=False):
        """``x @ weight.T + bias`` (F.linear), then ReLU with ``relu`` (fused into oneDNN's)."""
        m, k = x.shape
        if self._big(m, k, weight.shape[0]):
            return self._onednn(x, weight, bias, "relu" if relu else "none", [], "")
        y = F.linear(x, weight, bias)
        return torch.relu_(y) if relu else y

    def bind_linear(self, x, weight, bias=None, relu=False):
        """``lambda: self.linear(x, weight, bias, relu)`` for fixed operands (whose values may
        change), with the kernel chosen now: a product called per update costs no Python."""
        if self._big(*x.shape, weight.shape[0]):
            return functools.partial(self._onednn, x, weight, bias, "relu" if relu else "none",
                                     [], "")
        return functools.partial(self.linear, x, weight, bias, relu)

    def bind_mm(self, a, b):
        """``lambda: self.mm(a, b)`` for fixed operands, the kernel chosen now."""
        if self._big(*a.shape, b.shape[1]):
            return functools.partial(self._onednn, a, b.t(), None, "none", [], "")
        return functools.partial(self.mm, a, b)

    def mm(self, a, b, out=None):
        """``a @ b``, into ``out`` when given (strided operands are fine for both kernels)."""
        m, k, n = a.shape[0], a.shape[1], b.shape[1]
        if self._big(m, k, n):
            product = self._onednn(a, b.t(), None, "none", [], "")
            return product if out is None else out.copy_(product)
        if self.fast and out is not None and a.stride(0) == 1 and n < m:
            # A weight gradient g^T x of a narrow layer (300 x 10): MKL's sgemm takes 21 us
            # for it transposed this way, 7 us for the product (x^T g)^T.
            return out.copy_(torch.mm(b.t(), a.t()).t())
        return torch.mm(a, b, out=out)


@functools.lru_cache(maxsize=None)
def _fused_adam():
    """torch's one-pass Adam kernel (what ``torch.optim.Adam(fused=True)`` calls) where it runs
    on the CPU, else None."""
    kernel = getattr(torch, "_fused_adam_", None)
    if kernel is None:
        return None

    def first_step_moves_by_lr():   # Adam's first step is lr * sign(g)
        p = torch.ones(4)
        kernel([p], [torch.ones(4)], [torch.zeros(4)], [torch.zeros(4)], [], [torch.ones(1)],
               lr=0.1, beta1=0.9, beta2=0.999, weight_decay=0.0, eps=1e-8, amsgrad=False,
               maximize=False)
        return torch.allclose(p, torch.full((4,), 0.9))
    return kernel if _works(first_step_moves_by_lr) else None


def fused_adam_and_follow(adam, target, tau, lr, beta1, beta2, eps):
    """One Adam step on a :class:`~lib.rl.flat.FlatAdam`'s buffers in torch's fused kernel (its
    step count already advanced), then the soft update ``target <- target + tau * (params -
    target)`` as one lerp: two passes where the reference takes ten."""
    _fused_adam()([adam.flat], [adam.grad], [adam.exp_avg], [adam.exp_avg_sq], [],
                  [adam.steps[:1]], lr=lr, beta1=beta1, beta2=beta2, weight_decay=0.0,
                  eps=eps, amsgrad=False, maximize=False)
    target.lerp_(adam.flat, tau)


# ------------------------------------------------- how far an update's rounding drifts
NETWORKS = ("actor", "critic", "actor_target", "critic_target")


def float64_reference(agent):
    """Turn a :class:`~lib.rl.ddpg.DDPG` into a float64 one for :meth:`DDPG.autograd_update`
    (networks, fresh ``torch.optim.Adam``s, minibatches): DDPG's maths with next to no
    rounding, which float32 updates are measured against (tests, ``bench/agent_bench.py``)."""
    agent.kernels, agent._compiled = AgentKernels(agent.device, fast=False), None
    for part in NETWORKS:
        getattr(agent, part).double()
    agent.actor_optim = torch.optim.Adam(agent.actor.parameters(), lr=agent.cfg.lr_a)
    agent.critic_optim = torch.optim.Adam(agent.critic.parameters(), lr=agent.cfg.lr_c)
    minibatch = agent._minibatch
    agent._minibatch = lambda: tuple(t.double() for t in minibatch())
    return agent


def distance(agent, other):
    """Largest |difference| of any parameter of the two agents' four networks, relative to
    that tensor's largest |value| in ``other``."""
    return max(((p.double() - q.double()).abs().max() / q.double().abs().max()).item()
               for part in NETWORKS
               for p, q in zip(getattr(agent, part).parameters(), getattr(other, part).parameters()))
