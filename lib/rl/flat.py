"""One contiguous buffer per network for the agent's parameter arithmetic.

A DDPG update ends with two Adam steps and two soft target updates, elementwise
work over every parameter. Done per tensor (``torch.optim.Adam(foreach=True)``
falls back to a loop of per-tensor kernels on the CPU) it cost half as much as
the update's matmuls: one small kernel per tensor (6 in the actor, 8 in the
critic) for each operation, plus the optimizer's Python bookkeeping. Here each
network's parameters, gradients and Adam moments are views of one flat buffer, so
each operation is a single kernel.

Elementwise kernels give every element the same result whatever tensor it sits
in, so the arithmetic is ``torch.optim.Adam``'s foreach path value for value
(tests/test_rl.py compares the two bit for bit over an episode of updates). One
step is rearranged without changing a value: ATen's CPU ``sqrt`` takes a slow path
on exact zeros (0.23 ms instead of 0.03 ms on 93k values, 30% of them zero), and
Adam's second moments are full of them, since a ReLU unit that never fires gets
exactly zero gradients. The second moment is raised to the smallest normal float
first: any value that small gives ``sqrt(v) / sqrt(1 - beta2^t)`` below half an ulp
of ``eps``, so the denominator ``... + eps`` is exactly ``eps`` either way (checked
per step; with a smaller ``eps`` the plain square root is taken).
"""
import numpy as np
import torch

from .kernels import fused_adam_and_follow

_TINY = float(torch.finfo(torch.float32).smallest_normal)


def flatten_parameters_(module):
    """Make ``module``'s parameters views of one new contiguous buffer; return the buffer.

    The parameters keep their values, shapes and identities (``load_state_dict``
    copies into them in place, so the sharing survives a reload).
    """
    params = list(module.parameters())
    flat = torch.cat([p.detach().reshape(-1) for p in params])
    for p, view in zip(params, _views(flat, params)):
        p.data = view
    return flat


def _views(flat, like):
    """Views of ``flat`` shaped like each tensor of ``like``, in order."""
    out, offset = [], 0
    for t in like:
        out.append(flat[offset:offset + t.numel()].view_as(t))
        offset += t.numel()
    return out


def _tiny_vanishes(bc2_sqrt, eps):
    """Whether sqrt(smallest normal) / bc2_sqrt, with a factor 4 to spare, adds nothing to eps
    in float32 (then raising second moments below the smallest normal changes no step)."""
    eps32 = np.float32(eps)
    return eps32 + np.float32(4 * np.sqrt(_TINY) / bc2_sqrt) == eps32


class FlatAdam:
    """Adam (Kingma & Ba, 2015; torch's defaults betas=(0.9, 0.999), eps=1e-8) on a flat network.

    ``grads`` maps each parameter to the view of the flat gradient the caller writes
    into. ``optim`` is an ordinary ``torch.optim.Adam`` whose state tensors are views
    of the flat moments: it holds the hyper-parameters and gives the checkpoint format
    (``state_dict`` / ``load_state_dict``), so saved searches load either way.
    """

    def __init__(self, module, lr):
        self.params = list(module.parameters())
        self.flat = flatten_parameters_(module)
        self.grad = torch.zeros_like(self.flat)
        self.grads = dict(zip(self.params, _views(self.grad, self.params)))
        self.exp_avg = torch.zeros_like(self.flat)
        self.exp_avg_sq = torch.zeros_like(self.flat)
        self._denom = torch.empty_like(self.flat)
        # torch keeps one float32 step count per parameter (on the CPU): here, elements of one.
        self.steps = torch.zeros(len(self.params))
        self.optim = torch.optim.Adam(self.params, lr=lr, foreach=True)
        self._attach_state()

    def _attach_state(self):
        """Point the optimizer's state at the flat moments and step counts."""
        avg, avg_sq = _views(self.exp_avg, self.params), _views(self.exp_avg_sq, self.params)
        for i, p in enumerate(self.params):
            self.optim.state[p] = {"step": self.steps[i], "exp_avg": avg[i],
                                   "exp_avg_sq": avg_sq[i]}

    def _hyper(self):
        group = self.optim.param_groups[0]
        return group["lr"], group["betas"], group["eps"]

    def step(self):
        """One Adam step from ``self.grad``, in the operations of torch's foreach Adam."""
        lr, (beta1, beta2), eps = self._hyper()
        self.steps.add_(1.0)
        t = self.steps[0].item()
        self.exp_avg.lerp_(self.grad, 1 - beta1)
        self.exp_avg_sq.mul_(beta2).addcmul_(self.grad, self.grad, value=1 - beta2)
        step_size = (lr / (1 - beta1 ** t)) * -1
        bc2_sqrt = (1 - beta2 ** t) ** 0.5
        denom = self._denom
        if _tiny_vanishes(bc2_sqrt, eps):
            torch.sqrt(torch.clamp_min(self.exp_avg_sq, _TINY, out=denom), out=denom)
        else:
            torch.sqrt(self.exp_avg_sq, out=denom)
        denom.div_(bc2_sqrt).add_(eps)
        self.flat.addcdiv_(self.exp_avg, denom, value=step_size)

    def step_and_follow(self, target, tau, fused=False):
        """An Adam step, then the soft update ``target <- (1 - tau) * target + tau * params``
        of the flat target network ``target``; ``fused``: in two passes
        (:func:`~lib.rl.kernels.fused_adam_and_follow`, equal within float32 rounding)."""
        if not fused:
            self.step()
            target.mul_(1.0 - tau).add_(self.flat, alpha=tau)
            return
        lr, (beta1, beta2), eps = self._hyper()
        self.steps.add_(1.0)
        fused_adam_and_follow(self, target, tau, lr, beta1, beta2, eps)

    def state_dict(self):
        return self.optim.state_dict()

    def load_state_dict(self, state):
        """Load a ``torch.optim.Adam`` state dict and move its moments into the flat buffers."""
        self.optim.load_state_dict(state)
        loaded = [self.optim.state.get(p) for p in self.params]
        if any(s is None for s in loaded):   # saved before the first step: nothing to restore
            self.exp_avg.zero_()
            self.exp_avg_sq.zero_()
            self.steps.zero_()
        else:
            for key, flat in (("exp_avg", self.exp_avg), ("exp_avg_sq", self.exp_avg_sq)):
                for view, s in zip(_views(flat, self.params), loaded):
                    view.copy_(s[key])
            self.steps.copy_(torch.stack([torch.as_tensor(s["step"]).float().cpu()
                                          for s in loaded]))
        self._attach_state()
