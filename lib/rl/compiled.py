"""The agent's update as eight compiled passes around its ten large products (CPU, float32).

:meth:`DDPG.update_policy` in torch is ~90 kernel calls per update, most on 64 x 300 or
smaller tensors, where each call's dispatch (~3 us) costs more than its work: at the
released sizes the ten 64x300x300 products take ~0.62 ms in oneDNN and the rest of the
update ~0.6 ms. Here everything but those products runs in eight numba functions, one
between each product and the next that depends on it, which read and write the networks'
flat buffers (:class:`~lib.rl.flat.FlatAdam`) in place: the minibatch gather and reward
baseline, the few-input first layers and the heads, ReLU and sigmoid and their derivatives,
the MSE loss, the small weight gradients, and Adam with the soft target update in one pass
over each network (~0.16 ms in all, ~0.02 ms of Python). The products stay with
:class:`~lib.rl.kernels.AgentKernels` (oneDNN), in the operand layouts oneDNN runs fastest
here: the second layers' outputs come out feature-major (W @ x^T; the passes add the bias
and apply the ReLU), their weight gradients are taken from feature-major output gradients
(g_t @ x), their input gradients from batch-major ones (g @ W); see :class:`CompiledUpdate`.

DDPG's maths is that of :func:`~lib.rl.ddpg._critic_forward` and its siblings, and Adam's
that of ``torch.optim.Adam`` (torch's fused CPU kernel's order of operations); sums run in
another order (``reassoc``, so that the loops vectorize), so results equal the reference
within float32 rounding (tests/test_rl.py checks single updates at several shapes and an
episode of updates against a float64 run). Used where numba imports and the agent is a
float32 CPU one with fast kernels; the first process on a machine compiles the passes
(~9 s, cached next to this module), later ones load them (~0.2 s).
"""
import math
from types import SimpleNamespace

import numpy as np
import torch

from lib.utils.numba_jit import available, jit

_FAST = {"reassoc", "contract"}   # vectorized sums and fused multiply-adds; no other license


# ----------------------------------------------------------------- small dense layers
@jit(fastmath=_FAST, error_model="numpy")
def _transpose_into(w, wt, k0):
    """wt[k0 + k, j] = w[j, k]: a few-input layer's weight, inputs first (loops: numba's slice
    assignment of a transposed view costs several times more)."""
    for j in range(w.shape[0]):
        for k in range(w.shape[1]):
            wt[k0 + k, j] = w[j, k]


@jit(fastmath=_FAST, error_model="numpy")
def _wide_relu(x, wt, b, out):
    """out = relu(x @ wt + b) for a layer of few inputs, its weight given transposed (inputs x
    300): the inner loops run along the 300 outputs, for two rows and four inputs at a time
    (fewer loads and stores of ``out`` per multiply-add), and a row pair's bias, sums and
    ReLU run while it sits in the L1 cache."""
    n, n_in = x.shape
    for i in range(0, n, 2):
        i1 = min(i + 1, n - 1)   # an odd last row is done twice over a scratch copy
        ra, rb = out[i], (out[i1] if i1 > i else out[i].copy())
        for j in range(ra.size):
            ra[j] = b[j]
            rb[j] = b[j]
        k = 0
        while k + 4 <= n_in:
            a0, a1, a2, a3 = x[i, k], x[i, k + 1], x[i, k + 2], x[i, k + 3]
            b0, b1, b2, b3 = x[i1, k], x[i1, k + 1], x[i1, k + 2], x[i1, k + 3]
            w0, w1, w2, w3 = wt[k], wt[k + 1], wt[k + 2], wt[k + 3]
            for j in range(ra.size):
                u0, u1, u2, u3 = w0[j], w1[j], w2[j], w3[j]
                ra[j] += a0 * u0 + a1 * u1 + a2 * u2 + a3 * u3
                rb[j] += b0 * u0 + b1 * u1 + b2 * u2 + b3 * u3
            k += 4
        while k < n_in:
            av, bv, wk = x[i, k], x[i1, k], wt[k]
            for j in range(ra.size):
                ra[j] += av * wk[j]
                rb[j] += bv * wk[j]
            k += 1
        for j in range(ra.size):
            ra[j] = max(ra[j], np.float32(0.0))
            rb[j] = max(rb[j], np.float32(0.0))


@jit(fastmath=_FAST, error_model="numpy")
def _dense_wide_relu(x, w, b, out):
    """out = relu(x @ w.T + b) for a layer of few inputs."""
    wt = np.empty((w.shape[1], w.shape[0]), dtype=w.dtype)
    _transpose_into(w, wt, 0)
    _wide_relu(x, wt, b, out)


@jit(fastmath=_FAST, error_model="numpy")
def _first_critic_layer(s, a, ws, bs, wa, ba, out):
    """relu(fc_state(s) + fc_action(a)), the critic's first hidden layer: one layer on the
    inputs (s, a) side by side."""
    n, n_s = s.shape
    x = np.empty((n, n_s + a.shape[1]), dtype=s.dtype)
    wt = np.empty((x.shape[1], ws.shape[0]), dtype=ws.dtype)
    for i in range(n):
        for k in range(n_s):
            x[i, k] = s[i, k]
        for k in range(a.shape[1]):
            x[i, n_s + k] = a[i, k]
    _transpose_into(ws, wt, 0)
    _transpose_into(wa, wt, n_s)
    _wide_relu(x, wt, bs + ba, out)


@jit(fastmath=_FAST, error_model="numpy")
def _outer_sum(u, v, out):
    """out[p, q] = sum_i u[i, p] * v[i, q] (a weight gradient g^T x, or its transpose), four
    rows of the minibatch at a time (a quarter of the loads and stores of ``out``)."""
    for p in range(out.shape[0]):
        row = out[p]
        for q in range(row.size):
            row[q] = 0.0
    n, i = u.shape[0], 0
    while i + 4 <= n:
        v0, v1, v2, v3 = v[i], v[i + 1], v[i + 2], v[i + 3]
        for p in range(u.shape[1]):
            c0, c1, c2, c3, row = u[i, p], u[i + 1, p], u[i + 2, p], u[i + 3, p], out[p]
            for q in range(row.size):
                row[q] += c0 * v0[q] + c1 * v1[q] + c2 * v2[q] + c3 * v3[q]
        i += 4
    while i < n:
        vi = v[i]
        for p in range(u.shape[1]):
            up, row = u[i, p], out[p]
            for q in range(row.size):
                row[q] += up * vi[q]
        i += 1


@jit(fastmath=_FAST, error_model="numpy")
def _column_sum(g, out):
    """A bias gradient: g summed over the minibatch."""
    for j in range(out.size):
        out[j] = 0.0
    for i in range(g.shape[0]):
        gi = g[i]
        for j in range(out.size):
            out[j] += gi[j]


@jit(fastmath=_FAST, error_model="numpy")
def _wide_grads(g, x, dw, db, acc):
    """Weight and bias gradients of a few-input layer: dw = g^T x (through its transpose
    ``acc``, so the sums run along the 300 outputs), db = sum of g."""
    _outer_sum(x, g, acc)
    for j in range(dw.shape[0]):
        for k in range(dw.shape[1]):
            dw[j, k] = acc[k, j]
    _column_sum(g, db)


@jit(fastmath=_FAST, error_model="numpy")
def _mask_(g, h):
    """g <- g where h > 0, else 0 (ReLU's backward, from its output)."""
    for i in range(g.shape[0]):
        for j in range(g.shape[1]):
            if not h[i, j] > 0:
                g[i, j] = 0.0


@jit(fastmath=_FAST, error_model="numpy")
def _bias_relu_t_(h_t, b):
    """h_t <- relu(h_t + b) for a layer's output stored feature-major (features x batch)."""
    for j in range(h_t.shape[0]):
        row, bj = h_t[j], b[j]
        for i in range(row.size):
            row[i] = max(row[i] + bj, np.float32(0.0))


@jit(fastmath=_FAST, error_model="numpy")
def _head_t(h_t, w, b, out):
    """out = h @ w.T + b for a head (few outputs) on a feature-major hidden layer ``h_t``:
    each feature adds its row (the whole minibatch) at once."""
    for o in range(w.shape[0]):
        for i in range(out.shape[0]):
            out[i, o] = b[o]
        for j in range(h_t.shape[0]):
            wj, row = w[o, j], h_t[j]
            for i in range(row.size):
                out[i, o] += wj * row[i]


@jit(fastmath=_FAST, error_model="numpy")
def _head_grads_t(g, h_t, w, dw, db, dh_t):
    """Back through a head on the feature-major ReLU output ``h_t`` for output gradient ``g``:
    the head's weight and bias gradients, and ``dh_t`` = (g @ w) where h > 0, else 0, the
    gradient before that ReLU, feature-major."""
    _column_sum(g, db)
    for j in range(h_t.shape[0]):
        hrow, drow = h_t[j], dh_t[j]
        for i in range(drow.size):
            drow[i] = 0.0
        for o in range(w.shape[0]):
            acc, wj = np.float32(0.0), w[o, j]
            for i in range(hrow.size):
                acc += g[i, o] * hrow[i]
                drow[i] += g[i, o] * wj
            dw[o, j] = acc
        for i in range(drow.size):
            drow[i] = drow[i] if hrow[i] > 0 else np.float32(0.0)


@jit(fastmath=_FAST, error_model="numpy")
def _transpose_rows(g_t, g, db):
    """g = g_t.T (feature-major to batch-major, in 8 x 8 tiles: 4 us here where a plain
    loop takes 10), and db = the rows' sums (a bias gradient)."""
    n_feat, n = g_t.shape
    for j in range(n_feat):
        row, acc = g_t[j], np.float32(0.0)
        for i in range(n):
            acc += row[i]
        db[j] = acc
    tile = 8
    for j0 in range(0, n_feat - tile + 1, tile):
        for i0 in range(0, n - tile + 1, tile):
            for jj in range(tile):
                for ii in range(tile):
                    g[i0 + ii, j0 + jj] = g_t[j0 + jj, i0 + ii]
    for j in range(n_feat - n_feat % tile, n_feat):   # the edges the tiles leave
        for i in range(n):
            g[i, j] = g_t[j, i]
    for j in range(n_feat - n_feat % tile):
        for i in range(n - n % tile, n):
            g[i, j] = g_t[j, i]


# --------------------------------------------------------------------------- Adam
@jit(fastmath=_FAST, error_model="numpy")
def _adam_follow(p, g, m, v, target, hp):
    """Adam on ``p`` with gradient ``g``, then the soft update of ``target``; ``hp`` =
    (1 - beta1, beta2, 1 - beta2, lr / (1 - beta1^t), sqrt(1 - beta2^t), eps, tau), the
    constants of torch's fused Adam. (Loops from 0 over slices: an offset index could be
    negative to the compiler, whose wrap-around test then keeps the loop from vectorizing.)"""
    one_minus_beta1, beta2, one_minus_beta2 = np.float32(hp[0]), np.float32(hp[1]), np.float32(hp[2])
    step_size, bc2_sqrt = np.float32(hp[3]), np.float32(hp[4])
    eps, tau = np.float32(hp[5]), np.float32(hp[6])
    for i in range(p.size):
        grad = g[i]
        mi = m[i] + one_minus_beta1 * (grad - m[i])
        vi = beta2 * v[i] + one_minus_beta2 * grad * grad
        m[i] = mi
        v[i] = vi
        pi = p[i] - step_size * mi / (np.sqrt(vi) / bc2_sqrt + eps)
        p[i] = pi
        target[i] += tau * (pi - target[i])


@jit(fastmath=_FAST, error_model="numpy")
def _adam_network(flat, grad, big_grad, big_offset, m, v, target, hp):
    """One Adam step and soft update of a whole network; the gradient of its large weight
    (``big_grad``, from the product kernel) is read where it lies, the rest from ``grad``."""
    lo, hi = big_offset, big_offset + big_grad.size
    _adam_follow(flat[:lo], grad[:lo], m[:lo], v[:lo], target[:lo], hp)
    _adam_follow(flat[lo:hi], big_grad.reshape(big_grad.size), m[lo:hi], v[lo:hi], target[lo:hi], hp)
    _adam_follow(flat[hi:], grad[hi:], m[hi:], v[hi:], target[hi:], hp)


# ------------------------------------------------------- the passes between products
@jit(fastmath=_FAST, error_model="numpy")
def _targets_in(idx, mem_s, mem_a, mem_r, mem_s2, mem_d, baseline, s, a, r, s2, d, w1, b1, x1t):
    """The minibatch (rewards less the baseline), and the target actor's first layer on s'."""
    for i in range(idx.size):
        j = idx[i]
        for k in range(s.shape[1]):
            s[i, k] = mem_s[j, k]
            s2[i, k] = mem_s2[j, k]
        for k in range(a.shape[1]):
            a[i, k] = mem_a[j, k]
        r[i, 0] = mem_r[j] - baseline
        d[i, 0] = mem_d[j]
    _dense_wide_relu(s2, w1, b1, x1t)


@jit(fastmath=_FAST, error_model="numpy")
def _sigmoid_head_t(x_t, b2, w, b, out):
    """The actor's output mu = sigmoid(fc3(relu(x + b2))) from its second layer's product
    ``x_t`` (feature-major, without bias), which becomes relu(x + b2) in place."""
    _bias_relu_t_(x_t, b2)
    _head_t(x_t, w, b, out)
    for i in range(out.shape[0]):
        for o in range(out.shape[1]):
            out[i, o] = np.float32(1.0) / (np.float32(1.0) + np.exp(-out[i, o]))


@jit(fastmath=_FAST, error_model="numpy")
def _target_critic_in(x2t, b2, w3, b3, s2, ws, bs, wa, ba, mu2, h1t):
    """mu'(s') from the target actor's second layer; the target critic's first on (s', mu')."""
    _sigmoid_head_t(x2t, b2, w3, b3, mu2)
    _first_critic_layer(s2, mu2, ws, bs, wa, ba, h1t)


@jit(fastmath=_FAST, error_model="numpy")
def _critic_in(h2t, b2t, w3t, b3t, r, d, discount, s, a, ws, bs, wa, ba, w1, b1, qn, y, h1, x1):
    """The TD target y = r + discount * (1 - done) * Q'(s', mu'(s')); the critic's first layer
    on (s, a) and the actor's on s (the actor is not updated before the critic)."""
    _bias_relu_t_(h2t, b2t)
    _head_t(h2t, w3t, b3t, qn)
    for i in range(y.shape[0]):
        y[i, 0] = r[i, 0] + discount * (np.float32(1.0) - d[i, 0]) * qn[i, 0]
    _first_critic_layer(s, a, ws, bs, wa, ba, h1)
    _dense_wide_relu(s, w1, b1, x1)


@jit(fastmath=_FAST, error_model="numpy")
def _critic_loss(h2, b2, w3, b3, y, q, gq, gw3, gb3, g2_t, g2, gb2):
    """Q(s, a), the MSE loss against y and its gradient back to the critic's second hidden
    layer before its ReLU (feature-major ``g2_t`` and batch-major ``g2``); returns the loss."""
    _bias_relu_t_(h2, b2)
    _head_t(h2, w3, b3, q)
    n = q.shape[0]
    total = 0.0
    for i in range(n):
        diff = q[i, 0] - y[i, 0]
        total += diff * diff
        gq[i, 0] = diff * np.float32(2.0 / n)
    _head_grads_t(gq, h2, w3, gw3, gb3, g2_t)
    _transpose_rows(g2_t, g2, gb2)
    return total / n


@jit(fastmath=_FAST, error_model="numpy")
def _critic_step(dh1, h1, s, a, gws, gbs, gwa, gba, acc_s, acc_a, flat, grad, big_grad, big_offset,
                 m, v, target, hp, x2, b2, w3, b3, mu, ws, bs, wa, ba, h1p):
    """The critic's first-layer gradients, its Adam step and soft update; then mu(s) and the
    updated critic's first layer on (s, mu(s)) for the actor's loss."""
    _mask_(dh1, h1)
    _wide_grads(dh1, s, gws, gbs, acc_s)
    _wide_grads(dh1, a, gwa, gba, acc_a)
    _adam_network(flat, grad, big_grad, big_offset, m, v, target, hp)
    _sigmoid_head_t(x2, b2, w3, b3, mu)
    _first_critic_layer(s, mu, ws, bs, wa, ba, h1p)


@jit(fastmath=_FAST, error_model="numpy")
def _policy_in(h2p, b2, w3, b3, q, gq, g2_t, g2, dw, db, rows):
    """Q(s, mu(s)), the actor's loss -mean Q and its gradient back to the critic's second
    hidden layer (batch-major ``g2``; ``g2_t``, ``dw``, ``db``, ``rows`` are scratch: the
    critic's gradients are not wanted here); returns the loss."""
    _bias_relu_t_(h2p, b2)
    _head_t(h2p, w3, b3, q)
    n = q.shape[0]
    total = 0.0
    for i in range(n):
        total += q[i, 0]
        gq[i, 0] = np.float32(-1.0 / n)
    _head_grads_t(gq, h2p, w3, dw, db, g2_t)
    _transpose_rows(g2_t, g2, rows)
    return -total / n


@jit(fastmath=_FAST, error_model="numpy")
def _actor_back(dh1p, h1p, wa, mu, dmu, x2, w3, gw3, gb3, gx2_t, gx2, gb2):
    """dQ/da through the critic's action layer, then back through the actor's sigmoid head
    to its second hidden layer before the ReLU (feature-major and batch-major), with the
    head's and that layer's bias gradients."""
    _mask_(dh1p, h1p)
    for i in range(dmu.shape[0]):
        for o in range(dmu.shape[1]):
            acc = np.float32(0.0)
            for j in range(dh1p.shape[1]):
                acc += dh1p[i, j] * wa[j, o]
            dmu[i, o] = acc * (np.float32(1.0) - mu[i, o]) * mu[i, o]
    _head_grads_t(dmu, x2, w3, gw3, gb3, gx2_t)
    _transpose_rows(gx2_t, gx2, gb2)


@jit(fastmath=_FAST, error_model="numpy")
def _actor_step(dx1, x1, s, gw1, gb1, acc_s, flat, grad, big_grad, big_offset, m, v, target, hp):
    """The actor's first-layer gradients, its Adam step and soft update."""
    _mask_(dx1, x1)
    _wide_grads(dx1, s, gw1, gb1, acc_s)
    _adam_network(flat, grad, big_grad, big_offset, m, v, target, hp)


# ------------------------------------------------------------------------ the driver
def usable(kernels):
    """Whether the compiled update can run for an agent with these :class:`AgentKernels`."""
    return kernels.fast and available()


def _np(t):
    return t.detach().numpy()


def _buffers(cfg, s_dim, a_dim):
    """The minibatch and its activations and gradients, allocated once (torch's allocator
    aligns to 64 bytes, numpy's to 16: oneDNN reads the products' operands faster so)."""
    n, h1, h2 = cfg.bsize, cfg.hidden1, cfg.hidden2
    shapes = dict(s=(n, s_dim), s2=(n, s_dim), a=(n, a_dim), mu=(n, a_dim), mu2=(n, a_dim),
                  dmu=(n, a_dim), acc_s=(s_dim, h1), acc_a=(a_dim, h1),
                  **{name: (n, 1) for name in ("r", "d", "y", "q", "gq")},
                  **{name: (n, h1) for name in ("x1t", "h1t", "h1", "x1", "h1p")},
                  # gradients at the second hidden layers: batch-major for dx = g @ W,
                  # feature-major for dW = g^T x (oneDNN runs g_t @ x in 58 us, g.T @ x in 70)
                  **{name: (n, h2) for name in ("g2", "g2p", "gx2")},
                  **{name: (h2, n) for name in ("g2_t", "g2p_t", "gx2_t")})
    return SimpleNamespace(**{name: torch.zeros(shape).numpy() for name, shape in shapes.items()})


class CompiledUpdate:
    """:meth:`DDPG.update_policy` for a float32 CPU agent: numba passes around the products.

    Holds numpy views of the agent's parameters, gradients, Adam moments, targets (all views
    of the flat buffers, which ``load_state_dict`` fills in place) and replay memory, and the
    minibatch's activations, allocated once for the configured batch size; each pass's
    arguments are bound once, so an update spends next to nothing in Python.
    """

    def __init__(self, agent):
        self.agent = agent
        c, b = agent.cfg, _buffers(agent.cfg, agent.state_dim, agent.action_dim)
        t = SimpleNamespace(**{name: torch.from_numpy(getattr(b, name)) for name in (
            "x1t", "h1t", "h1", "x1", "h1p", "g2", "g2p", "gx2", "g2_t", "gx2_t")})
        at, ct, ac, cr = (SimpleNamespace(**{layer: (_np(w), _np(bias)) for layer, (w, bias)
                                             in vars(getattr(agent._nets, name)).items()})
                          for name in ("actor_target", "critic_target", "actor", "critic"))
        # the large weights for the product kernel, detached (no autograd graph is wanted)
        w2 = SimpleNamespace(**{name: getattr(agent._nets, name).fc2[0].detach()
                                for name in ("actor_target", "critic_target", "actor", "critic")})
        k = agent.kernels
        # The second layers' products come out feature-major, W @ x^T (60 us, against 69 for
        # x @ W^T with oneDNN's bias and ReLU): the passes that read them add the bias and
        # apply the ReLU, and the heads sum along features.
        self.products = SimpleNamespace(   # in the order an update runs them
            x2t=k.bind_linear(w2.actor_target, t.x1t), h2t=k.bind_linear(w2.critic_target, t.h1t),
            h2=k.bind_linear(w2.critic, t.h1), x2=k.bind_linear(w2.actor, t.x1),
            dh1=k.bind_mm(t.g2, w2.critic), critic_dw=k.bind_mm(t.g2_t, t.h1),
            h2p=k.bind_linear(w2.critic, t.h1p), dh1p=k.bind_mm(t.g2p, w2.critic),
            dx1=k.bind_mm(t.gx2, w2.actor), actor_dw=k.bind_mm(t.gx2_t, t.x1))
        self.steps = (_np(agent.critic_adam.steps), _np(agent.actor_adam.steps))
        cadam, cg = self._optimizer(agent.critic_adam, w2.critic, agent._target_flat[1])
        aadam, ag = self._optimizer(agent.actor_adam, w2.actor, agent._target_flat[0])
        # critic grads: fc_state w, b; fc_action w, b; fc2 w, b; fc3 w, b; actor: fc1, fc2, fc3
        mem = self.memory = agent.memory
        self.args = SimpleNamespace(
            targets_in=((mem.states, mem.actions, mem.rewards, mem.next_states, mem.terminals),
                        (b.s, b.a, b.r, b.s2, b.d, *at.fc1, b.x1t)),
            target_critic_in=(at.fc2[1], *at.fc3, b.s2, *ct.fc_state, *ct.fc_action, b.mu2, b.h1t),
            critic_in=(ct.fc2[1], *ct.fc3, b.r, b.d, np.float32(c.discount), b.s, b.a,
                       *cr.fc_state, *cr.fc_action, *ac.fc1, b.q, b.y, b.h1, b.x1),
            critic_loss=(cr.fc2[1], *cr.fc3, b.y, b.q, b.gq, cg[6], cg[7], b.g2_t, b.g2, cg[5]),
            critic_step=((b.h1, b.s, b.a, cg[0], cg[1], cg[2], cg[3], b.acc_s, b.acc_a,
                          *cadam[:2]), cadam[2:],
                         (ac.fc2[1], *ac.fc3, b.mu, *cr.fc_state, *cr.fc_action, b.h1p)),
            # the actor's loss needs no critic gradients: scratch takes them
            policy_in=(cr.fc2[1], *cr.fc3, b.q, b.gq, b.g2p_t, b.g2p, np.zeros_like(cg[6]),
                       np.zeros_like(cg[7]), np.zeros_like(cg[5])),
            actor_back=(b.h1p, cr.fc_action[0], b.mu, b.dmu),
            actor_back2=(ac.fc3[0], ag[4], ag[5], b.gx2_t, b.gx2, ag[3]),
            actor_step=((b.x1, b.s, ag[0], ag[1], b.acc_s, *aadam[:2]), aadam[2:]))

    @staticmethod
    def _optimizer(adam, big, target):
        """The arrays one Adam step and soft update of a network reads and writes (flat
        parameters and gradient; where its large weight ``big`` sits, moments, target), and
        its layers' gradients (numpy views of :attr:`FlatAdam.grads`)."""
        offset = (big.data_ptr() - adam.flat.data_ptr()) // adam.flat.element_size()
        return ((_np(adam.flat), _np(adam.grad), offset, _np(adam.exp_avg), _np(adam.exp_avg_sq),
                 _np(target)), [_np(adam.grads[p]) for p in adam.params])

    def _hyper(self, adam, steps):
        """Adam's per-step constants after advancing the step count (torch's fused kernel's)."""
        lr, (beta1, beta2), eps = adam._hyper()
        steps += 1.0
        t = float(steps[0])
        return (1.0 - beta1, beta2, 1.0 - beta2, lr / (1.0 - beta1 ** t),
                math.sqrt(1.0 - beta2 ** t), eps, self.agent.cfg.tau)

    def __call__(self):
        """One update; returns (value_loss, policy_loss) as :meth:`DDPG.update_policy` does."""
        agent, p, args = self.agent, self.products, self.args
        idx = self.memory.sample_indices(agent.cfg.bsize, agent.rng)
        baseline = np.float32(agent._update_baseline(self.memory.rewards[idx]))
        _targets_in(idx, *args.targets_in[0], baseline, *args.targets_in[1])
        _target_critic_in(p.x2t().numpy(), *args.target_critic_in)
        _critic_in(p.h2t().numpy(), *args.critic_in)
        value_loss = _critic_loss(p.h2().numpy(), *args.critic_loss)
        x2 = p.x2().numpy()
        pre, moments, post = args.critic_step
        _critic_step(p.dh1().numpy(), *pre, p.critic_dw().numpy(), *moments,
                     self._hyper(agent.critic_adam, self.steps[0]), x2, *post)
        policy_loss = _policy_in(p.h2p().numpy(), *args.policy_in)
        _actor_back(p.dh1p().numpy(), *args.actor_back, x2, *args.actor_back2)
        pre, moments = args.actor_step
        _actor_step(p.dx1().numpy(), *pre, p.actor_dw().numpy(), *moments,
                    self._hyper(agent.actor_adam, self.steps[1]))
        return float(value_loss), float(policy_loss)
