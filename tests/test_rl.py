"""DDPG agent and replay memory (lib/rl): small, CPU-only, seconds."""
import numpy as np
import pytest
import torch

from lib.rl import DDPG, DDPGConfig, ReplayMemory, truncated_normal
from lib.rl.kernels import distance, float64_reference


def _small_agent(warmup=0, seed=0, n_steps=4, state_dim=9):
    torch.manual_seed(seed)
    cfg = DDPGConfig(hidden1=16, hidden2=16, warmup=warmup, bsize=8, rmsize=4)
    return DDPG(state_dim, n_steps, cfg, device=torch.device("cpu"), seed=seed)


def _fill(agent, n_episodes=3, reward=1.0):
    rng = np.random.default_rng(1)
    for ep in range(n_episodes):
        states = rng.uniform(size=(5, agent.state_dim))
        tr = [(states[i], rng.uniform(size=1), states[i + 1], i == 3) for i in range(4)]
        agent.store_episode(tr, reward * (ep + 1))


def test_ring_buffer_wraps():
    mem = ReplayMemory(3, state_dim=2)
    for i in range(5):
        mem.append([i, i], [i / 10], float(i), [i + 1, i + 1], i == 4)
    assert len(mem) == 3
    # The two oldest (0, 1) were overwritten by 3 and 4, in ring order.
    assert sorted(mem.rewards.tolist()) == [2.0, 3.0, 4.0]
    assert mem.rewards[0] == 3.0 and mem.rewards[1] == 4.0 and mem.next_index == 2
    s, a, r, s2, d = mem.sample(3, np.random.default_rng(0))
    assert sorted(r.tolist()) == [2.0, 3.0, 4.0]   # without replacement when enough stored
    np.testing.assert_allclose(s2 - s, 1.0)
    # With fewer stored than asked, it samples with replacement.
    assert mem.sample(7, np.random.default_rng(0))[0].shape == (7, 2)


def test_memory_state_round_trip():
    mem = ReplayMemory(4, state_dim=2)
    for i in range(6):
        mem.append([i, 0], [0.5], i, [0, i], False)
    other = ReplayMemory(4, state_dim=2)
    other.load_state_dict(mem.state_dict())
    assert other.size == 4 and other.next_index == mem.next_index
    np.testing.assert_array_equal(other.states, mem.states)


def test_truncated_normal_stays_in_bounds():
    rng = np.random.default_rng(0)
    for mu in (0.0, 0.3, 1.0):
        for sigma in (1e-4, 0.1, 0.5, 5.0):
            x = truncated_normal(np.full(2000, mu), sigma, 0.0, 1.0, rng)
            assert x.min() >= 0.0 and x.max() <= 1.0
    # Small sigma concentrates around the mean.
    x = truncated_normal(np.full(2000, 0.4), 0.01, 0.0, 1.0, rng)
    assert abs(x.mean() - 0.4) < 0.01


def test_actions_in_unit_interval_and_sigma_decays():
    agent = _small_agent(warmup=2)
    state = np.random.default_rng(0).uniform(size=9)
    for ep in range(6):
        for _ in range(20):
            a = agent.select_action(state, ep)
            assert a.shape == (1,) and 0.0 <= a[0] <= 1.0
    assert agent.sigma(2) == pytest.approx(0.5)
    assert agent.sigma(12) == pytest.approx(0.5 * 0.99 ** 10)
    assert 0.0 <= agent.deterministic_action(state)[0] <= 1.0


def test_update_changes_actor_and_critic_and_targets_follow_softly():
    agent = _small_agent()
    _fill(agent)
    before = {k: {n: p.clone() for n, p in getattr(agent, k).state_dict().items()}
              for k in ("actor", "critic", "actor_target", "critic_target")}
    vloss, ploss = agent.update_policy()
    assert np.isfinite(vloss) and np.isfinite(ploss)
    for k in ("actor", "critic"):
        changed = [n for n, p in getattr(agent, k).state_dict().items()
                   if not torch.equal(p, before[k][n])]
        assert changed, f"{k} did not change"
    # Target moved by tau * (new - old) for the critic's output layer weights.
    tau = agent.cfg.tau
    w_new = agent.critic.fc3.weight.detach()
    w_old_t = before["critic_target"]["fc3.weight"]
    expect = (1 - tau) * w_old_t + tau * w_new
    torch.testing.assert_close(agent.critic_target.fc3.weight.detach(), expect)


def test_moving_average_baseline():
    agent = _small_agent()
    r = agent._baseline(np.array([2.0, 4.0]))
    assert agent.moving_average == pytest.approx(3.0)
    np.testing.assert_allclose(r, [-1.0, 1.0])
    agent._baseline(np.array([7.0]))
    assert agent.moving_average == pytest.approx(3.0 + 0.5 * (7.0 - 3.0))


def test_warmup_actions_are_uniform_random():
    agent = _small_agent(warmup=5)
    state = np.zeros(9)
    acts = np.array([agent.select_action(state, 0)[0] for _ in range(500)])
    # mu(s) would be ~0.5 with a tiny spread; uniform draws fill [0, 1].
    assert acts.min() < 0.05 and acts.max() > 0.95


def test_state_dict_round_trip_reproduces_next_steps():
    a1 = _small_agent(seed=3)
    _fill(a1)
    a1.update_policy()
    snap = a1.state_dict()
    a2 = _small_agent(seed=99)
    a2.load_state_dict(snap)
    s = np.linspace(0, 1, 9)
    assert a1.select_action(s, 5)[0] == a2.select_action(s, 5)[0]
    v1, p1 = a1.update_policy()
    v2, p2 = a2.update_policy()
    assert v1 == pytest.approx(v2) and p1 == pytest.approx(p2)


def test_agent_state_survives_a_weights_only_file(tmp_path):
    """The saved agent (networks, optimizers, replay memory, generator) needs no pickled objects."""
    from lib.utils.checkpoint import load_checkpoint, save_checkpoint
    a1 = _small_agent(seed=3)
    _fill(a1)
    a1.update_policy()
    path = str(tmp_path / "agent_state.pth.tar")
    save_checkpoint(a1.state_dict(), path)
    snap = torch.load(path, weights_only=True)
    assert isinstance(snap["memory"]["states"], torch.Tensor)
    a2 = _small_agent(seed=99)
    a2.load_state_dict(load_checkpoint(path))
    assert np.array_equal(a1.memory.states, a2.memory.states)
    assert a1.memory.next_index == a2.memory.next_index and len(a1.memory) == len(a2.memory)
    s = np.linspace(0, 1, 9)
    assert a1.select_action(s, 5)[0] == a2.select_action(s, 5)[0]
    assert a1.update_policy() == pytest.approx(a2.update_policy())


@pytest.mark.parametrize("hidden", [16, 300])
def test_hand_written_update_equals_autograd_over_an_episode(hidden):
    """An episode's worth of updates (one per transition) on a fixed seed: with the reference
    kernels the hand-written gradients give the networks, targets, optimizer moments and
    losses of loss.backward(), bit for bit (the released sizes, 300 x 300, included)."""
    agents = []
    for _ in range(2):
        torch.manual_seed(3)
        cfg = DDPGConfig(hidden1=hidden, hidden2=hidden, warmup=0, bsize=16, rmsize=8)
        agent = DDPG(7, 6, cfg, device=torch.device("cpu"), seed=3, fast_kernels=False)
        _fill(agent, n_episodes=6)
        agents.append(agent)
    fast, ref = agents
    for _ in range(24):
        assert fast.update_policy() == ref.autograd_update()
    for part in ("actor", "critic", "actor_target", "critic_target"):
        for (name, p), q in zip(getattr(fast, part).named_parameters(),
                                getattr(ref, part).parameters()):
            assert torch.equal(p, q), (part, name)
    for opt in ("actor_optim", "critic_optim"):
        for sa, sb in zip(getattr(fast, opt).state.values(), getattr(ref, opt).state.values()):
            assert torch.equal(sa["exp_avg"], sb["exp_avg"])
            assert torch.equal(sa["exp_avg_sq"], sb["exp_avg_sq"])


def _episode_agents(hidden, bsize=64, n_steps=20):
    """Three agents on one seed and replay memory: the fast kernels, the reference kernels,
    and autograd + torch.optim.Adam in float64 (DDPG's maths with next to no rounding)."""
    agents = []
    for fast in (True, False, False):
        torch.manual_seed(4)
        cfg = DDPGConfig(hidden1=hidden, hidden2=hidden, warmup=0, bsize=bsize, rmsize=8)
        agent = DDPG(7, n_steps, cfg, device=torch.device("cpu"), seed=4, fast_kernels=fast)
        rng = np.random.default_rng(2)
        for ep in range(6):
            states = rng.uniform(size=(n_steps + 1, 7))
            agent.store_episode([(states[i], rng.uniform(size=1), states[i + 1], i == n_steps - 1)
                                 for i in range(n_steps)], float(rng.uniform()))
        agents.append(agent)
    float64_reference(agents[2])
    return agents


@pytest.mark.parametrize("compiled", [False, True])
def test_fast_kernels_keep_the_updates_within_float32_rounding(compiled):
    """oneDNN products and the fused Adam step (and, ``compiled``, the numba passes around the
    products) change the rounding, not the maths: after an episode of updates (the released
    minibatch of 64, hidden layers large enough for oneDNN) the networks are as close to a
    float64 run as the float32 reference is (both drift as training amplifies rounding: 1e-6
    to 1e-2 after 20-100 updates, by seed and size)."""
    from lib.rl.kernels import ONEDNN_MIN_MACS
    hidden = 160
    assert 64 * hidden * hidden >= ONEDNN_MIN_MACS
    fast, ref, exact = _episode_agents(hidden)
    if not (fast.kernels.onednn and fast.kernels.fused_adam):
        pytest.skip("this torch build has neither oneDNN's linear nor the fused Adam kernel")
    if compiled and fast._compiled is None:
        pytest.skip("numba is not available")
    if not compiled:
        fast._compiled = None
    assert not ref.kernels.onednn and not ref.kernels.fused_adam and ref._compiled is None
    for _ in range(20):
        losses = fast.update_policy(), ref.update_policy(), exact.autograd_update()
        for loss in losses[:2]:
            assert loss == pytest.approx(losses[2], rel=1e-3, abs=1e-6)
    assert distance(fast, ref) > 0   # the fast kernels did run
    assert distance(fast, exact) <= max(4 * distance(ref, exact), 1e-5)


def test_agent_kernels_that_fail_their_probe_are_not_used(monkeypatch):
    """A torch build whose oneDNN op or CPU fused Adam raises (torch < 2.4 has no CPU fused
    Adam) gets the reference kernels instead of a search that fails mid-way."""
    from lib.rl import kernels

    def broken(*args, **kwargs):
        raise NotImplementedError("no kernel for this backend")

    monkeypatch.setattr(torch, "_fused_adam_", broken)
    monkeypatch.setattr(torch.ops.mkldnn, "_linear_pointwise", broken, raising=False)
    for probe in (kernels._fused_adam, kernels._onednn_linear):
        probe.cache_clear()
    try:
        k = kernels.AgentKernels(torch.device("cpu"))
        assert not k.onednn and not k.fused_adam
        agent = DDPG(7, 6, DDPGConfig(hidden1=16, hidden2=16, warmup=0, bsize=8, rmsize=4),
                     device=torch.device("cpu"), seed=0)
        _fill(agent)
        assert agent.update_policy()[0] is not None   # runs on the reference kernels
    finally:
        monkeypatch.undo()
        for probe in (kernels._fused_adam, kernels._onednn_linear):
            probe.cache_clear()


def test_agent_kernels_pick_onednn_for_large_cpu_products_only():
    """oneDNN takes the large float32 CPU products (equal to torch's within rounding); small
    ones, other devices and ``fast=False`` stay with torch's kernels, bit for bit."""
    import torch.nn.functional as F
    from lib.rl.kernels import AgentKernels
    for device in ("cuda", "meta"):
        kernels = AgentKernels(torch.device(device))
        assert not kernels.onednn and not kernels.fused_adam
    assert not AgentKernels(torch.device("cpu"), fast=False).onednn
    assert not AgentKernels(torch.device("cpu"), dtype=torch.float64).onednn
    kernels = AgentKernels(torch.device("cpu"))
    if not kernels.onednn:
        pytest.skip("this torch build has no oneDNN linear")
    gen = torch.Generator().manual_seed(0)
    x, w, b = (torch.randn(*shape, generator=gen) for shape in ((64, 300), (300, 300), (300,)))
    exact = (x.double() @ w.double().t() + b.double()).float()
    fast = kernels.linear(x, w, b)
    torch.testing.assert_close(fast, exact, rtol=1e-5, atol=1e-4)
    out = torch.empty(300, 300)
    assert kernels.mm(x.t(), x, out=out) is out
    torch.testing.assert_close(out, (x.double().t() @ x.double()).float(), rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(kernels.mm(x, w), (x.double() @ w.double()).float(),
                               rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(kernels.linear(x, w, b, relu=True), exact.clamp_min(0),
                               rtol=1e-5, atol=1e-4)
    small_x, small_w = x[:, :10], w[:, :10]
    assert torch.equal(kernels.linear(small_x, small_w, b), F.linear(small_x, small_w, b))
    assert torch.equal(kernels.linear(small_x, small_w, b, relu=True),
                       F.linear(small_x, small_w, b).relu())
    narrow = torch.empty(300, 10)   # a 10-input layer's weight gradient, g^T x
    assert kernels.mm(x.t(), small_x, out=narrow) is narrow
    torch.testing.assert_close(narrow, (x.double().t() @ small_x.double()).float(),
                               rtol=1e-5, atol=1e-5)


def _adam_pair(eps=1e-8):
    """Two identical two-layer nets: one under FlatAdam, one under torch.optim.Adam(foreach)."""
    from lib.rl.flat import FlatAdam
    nets = []
    for _ in range(2):
        torch.manual_seed(5)
        nets.append(torch.nn.Sequential(torch.nn.Linear(7, 33), torch.nn.ReLU(),
                                        torch.nn.Linear(33, 3)))
    flat = FlatAdam(nets[0], lr=1e-3)
    flat.optim.param_groups[0]["eps"] = eps
    ref = torch.optim.Adam(nets[1].parameters(), lr=1e-3, eps=eps, foreach=True)
    return nets, flat, ref


def _adam_steps(nets, flat, ref, n, seed=0):
    """``n`` steps on gradients with exact zeros (dead units) and squares below the
    smallest normal float, the values the square-root shortcut must not change."""
    gen = torch.Generator().manual_seed(seed)
    u = [torch.rand(p.shape, generator=gen) for p in nets[0].parameters()]
    for _ in range(n):
        for p, q, ui in zip(nets[0].parameters(), nets[1].parameters(), u):
            g = torch.randn(p.shape, generator=gen) * 1e-3
            g[ui < 0.3] = 0.0                         # dead units: always exactly zero
            g[(ui >= 0.3) & (ui < 0.4)] = 3e-21       # g^2 and the moment are subnormal
            flat.grads[p].copy_(g)
            q.grad = g.clone()
        flat.step()
        ref.step()


@pytest.mark.parametrize("eps", [1e-8, 1e-30])   # 1e-30: the plain square root is taken
def test_flat_adam_equals_torch_adam_bit_for_bit(eps):
    """Parameters and moments after 25 steps equal torch.optim.Adam's exactly, zeros in the
    second moment included (the square root of those is taken another way)."""
    from lib.rl.flat import _tiny_vanishes
    assert _tiny_vanishes(1e-3 ** 0.5, 1e-8) and not _tiny_vanishes(1.0, 1e-30)
    nets, flat, ref = _adam_pair(eps)
    _adam_steps(nets, flat, ref, 25)
    for p, q in zip(nets[0].parameters(), nets[1].parameters()):
        assert torch.equal(p, q)
        assert torch.equal(flat.optim.state[p]["exp_avg_sq"], ref.state[q]["exp_avg_sq"])
    v = torch.cat([ref.state[q]["exp_avg_sq"].reshape(-1) for q in nets[1].parameters()])
    assert (v == 0).any() and ((v > 0) & (v < torch.finfo(v.dtype).smallest_normal)).any()
    assert float(flat.optim.state[nets[0][0].weight]["step"]) == 25.0


def test_fused_adam_and_soft_update_equal_the_reference_within_rounding():
    """FlatAdam.step_and_follow with torch's fused kernel and a lerp: parameters, moments, step
    counts and the followed target network as the ten-pass reference, within float32 rounding."""
    from lib.rl.flat import FlatAdam
    from lib.rl.kernels import AgentKernels
    if not AgentKernels(torch.device("cpu")).fused_adam:
        pytest.skip("this torch build has no fused Adam kernel")
    runs = []
    for fused in (True, False):
        torch.manual_seed(5)
        net = torch.nn.Sequential(torch.nn.Linear(7, 33), torch.nn.ReLU(), torch.nn.Linear(33, 3))
        adam = FlatAdam(net, lr=1e-3)
        start = adam.flat.clone()
        target = start * 0.5
        gen = torch.Generator().manual_seed(1)
        for _ in range(30):
            adam.grad.copy_(torch.randn(adam.grad.shape, generator=gen) * 1e-2)
            adam.step_and_follow(target, 0.01, fused=fused)
        runs.append((adam, target))
    (fa, ft), (ra, rt) = runs
    for x, y in ((fa.flat, ra.flat), (fa.exp_avg, ra.exp_avg), (fa.exp_avg_sq, ra.exp_avg_sq),
                 (ft, rt)):
        torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-7)
    assert torch.equal(fa.steps, ra.steps) and float(fa.steps[0]) == 30.0
    # 30 steps of lr 1e-3 move each parameter by up to 0.03; the target, 1 - 0.99^30 = 26% of
    # the way from half the start to the parameters
    assert 0.01 < float((fa.flat - start).abs().max()) <= 0.031
    assert float((ft - 0.5 * start).abs().max()) > 0.02


def test_flat_adam_loads_torch_adam_state_and_goes_on_identically():
    """A state dict (torch.optim.Adam's format, as saved searches hold) loads into the flat
    buffers, parameters stay views of them, and the next steps match the original's."""
    from lib.rl.flat import FlatAdam
    nets, flat, ref = _adam_pair()
    _adam_steps(nets, flat, ref, 5)
    torch.manual_seed(9)
    other = torch.nn.Sequential(torch.nn.Linear(7, 33), torch.nn.ReLU(), torch.nn.Linear(33, 3))
    resumed = FlatAdam(other, lr=1e-3)
    empty = torch.optim.Adam(other.parameters(), lr=1e-3).state_dict()   # before any step
    resumed.load_state_dict(empty)
    assert int(resumed.steps.sum()) == 0 and not resumed.exp_avg.any()
    other.load_state_dict(nets[1].state_dict())
    resumed.load_state_dict(ref.state_dict())
    flat_storage = resumed.flat.untyped_storage().data_ptr()
    assert all(p.untyped_storage().data_ptr() == flat_storage for p in other.parameters())
    _adam_steps([other, nets[1]], resumed, ref, 5, seed=1)
    for p, q in zip(other.parameters(), nets[1].parameters()):
        assert torch.equal(p, q)


def _twin_agents(hidden1, hidden2, bsize, state_dim, action_dim, compiled=True):
    """A compiled-update agent and a reference-kernel one on one seed and replay memory."""
    agents = []
    for fast in (True, False):
        torch.manual_seed(5)
        cfg = DDPGConfig(hidden1=hidden1, hidden2=hidden2, warmup=0, bsize=bsize, rmsize=8)
        agent = DDPG(state_dim, 6, cfg, device=torch.device("cpu"), seed=5, action_dim=action_dim,
                     fast_kernels=fast, compiled=compiled)
        rng = np.random.default_rng(3)
        for _ in range(4):
            states = rng.uniform(size=(7, state_dim))
            agent.store_episode([(states[i], rng.uniform(size=action_dim), states[i + 1], i == 5)
                                 for i in range(6)], float(rng.uniform()))
        agents.append(agent)
    return agents


@pytest.mark.parametrize("shape", [(300, 300, 64, 10, 1), (37, 29, 13, 7, 2), (16, 24, 8, 3, 1)])
def test_compiled_update_equals_the_reference_update_within_rounding(shape):
    """One update of the compiled passes (the released sizes, and odd ones: hidden layers of
    different widths not a multiple of the tiles, an odd minibatch, two actions) against the
    reference kernels: the same minibatch and baseline, and every parameter, target, Adam
    moment and step count equal within float32 rounding."""
    compiled, ref = _twin_agents(*shape)
    if compiled._compiled is None:
        pytest.skip("numba is not available")
    for _ in range(2):
        assert compiled.update_policy() == pytest.approx(ref.update_policy(), rel=1e-5, abs=1e-7)
    assert compiled.moving_average == ref.moving_average
    assert compiled.rng.bit_generator.state == ref.rng.bit_generator.state
    assert compiled.n_updates == ref.n_updates == 2
    assert distance(compiled, ref) < 1e-5
    assert 0 < distance(compiled, ref)   # the compiled passes did run
    for opt in ("actor_optim", "critic_optim"):
        for p, (sa, sb) in zip(getattr(compiled, opt).param_groups[0]["params"],
                               zip(getattr(compiled, opt).state.values(),
                                   getattr(ref, opt).state.values())):
            assert float(sa["step"]) == float(sb["step"]) == 2.0
            torch.testing.assert_close(sa["exp_avg"], sb["exp_avg"], rtol=1e-4, atol=1e-9)
            torch.testing.assert_close(sa["exp_avg_sq"], sb["exp_avg_sq"], rtol=1e-4, atol=1e-12)


def test_compiled_update_resumes_from_a_state_dict_exactly():
    """A compiled-update agent saved mid-way and loaded into a fresh one goes on with the same
    updates, bit for bit (the compiled passes read the flat buffers the load fills in place)."""
    a, _ = _twin_agents(24, 24, 8, 5, 1)
    if a._compiled is None:
        pytest.skip("numba is not available")
    for _ in range(3):
        a.update_policy()
    b, _ = _twin_agents(24, 24, 8, 5, 1)
    b.load_state_dict(a.state_dict())
    for _ in range(3):
        assert a.update_policy() == b.update_policy()
    assert distance(a, b) == 0


def test_the_update_runs_in_torch_without_numba(monkeypatch):
    """Without numba (or with ``compiled=False``) the agent takes the torch update."""
    from lib.rl import compiled
    monkeypatch.setattr(compiled, "available", lambda: False)
    agent, _ = _twin_agents(16, 16, 8, 5, 1)
    assert agent._compiled is None
    assert agent.update_policy()[0] is not None
    monkeypatch.undo()
    assert _twin_agents(16, 16, 8, 5, 1, compiled=False)[0]._compiled is None
