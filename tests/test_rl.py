"""DDPG agent and replay memory (lib/rl): small, CPU-only, seconds."""
import numpy as np
import pytest
import torch

from lib.rl import DDPG, DDPGConfig, ReplayMemory, truncated_normal


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


NETWORKS = ("actor", "critic", "actor_target", "critic_target")


def _assert_same(a1, a2):
    """Networks, Adam moments and step counts, baseline and generator equal bit for bit."""
    for part in NETWORKS:
        for (name, p), q in zip(getattr(a1, part).named_parameters(),
                                getattr(a2, part).parameters()):
            assert torch.equal(p, q), (part, name)
    for opt in ("actor_optim", "critic_optim"):
        s1, s2 = getattr(a1, opt).state_dict(), getattr(a2, opt).state_dict()
        assert s1["param_groups"] == s2["param_groups"]
        for i, state in s1["state"].items():
            for key, value in state.items():
                assert torch.equal(value, s2["state"][i][key]), (opt, i, key)
    assert a1.moving_average == a2.moving_average and a1.n_updates == a2.n_updates
    assert a1.rng.bit_generator.state == a2.rng.bit_generator.state


def _go_on_alike(a1, a2, n=3):
    """``n`` more actions and updates of both agents, equal bit for bit."""
    s = np.linspace(0, 1, a1.state_dim)
    for _ in range(n):
        assert a1.select_action(s, 5)[0] == a2.select_action(s, 5)[0]
        assert a1.update_policy() == a2.update_policy()
    _assert_same(a1, a2)


def test_state_dict_round_trip_goes_on_like_an_uninterrupted_agent():
    a1 = _small_agent(seed=3)
    _fill(a1)
    a1.update_policy()
    a2 = _small_agent(seed=99)
    a2.load_state_dict(a1.state_dict())
    _assert_same(a1, a2)
    _go_on_alike(a1, a2)


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
    _go_on_alike(a1, a2)


def test_a_state_saved_before_the_first_update_resumes():
    a1 = _small_agent(seed=3)
    _fill(a1)
    a2 = _small_agent(seed=99)
    a2.load_state_dict(a1.state_dict())
    _go_on_alike(a1, a2)


def test_a_state_of_the_flat_buffer_versions_resumes(tmp_path):
    """Earlier versions saved ``torch.optim.Adam`` state dicts with ``foreach=True`` whose
    moments and step counts were views of one buffer per network. Such a file loads, the
    resumed optimizer keeps this version's kernel choice, and the agent goes on as the
    uninterrupted one."""
    from lib.utils.checkpoint import load_checkpoint, save_checkpoint
    a1 = _small_agent(seed=3)
    _fill(a1)
    a1.update_policy()
    old = a1.state_dict()
    for opt in ("actor_optim", "critic_optim"):
        group, states = old[opt]["param_groups"][0], old[opt]["state"]
        group["foreach"] = True
        steps = torch.stack([states[i]["step"] for i in group["params"]])
        for key in ("exp_avg", "exp_avg_sq"):
            flat = torch.cat([states[i][key].reshape(-1) for i in group["params"]])
            offset = 0
            for i in group["params"]:
                n = states[i][key].numel()
                states[i][key] = flat[offset:offset + n].view_as(states[i][key])
                offset += n
        for j, i in enumerate(group["params"]):
            states[i]["step"] = steps[j]
    path = str(tmp_path / "old_agent.pth.tar")
    save_checkpoint(old, path)
    a2 = _small_agent(seed=99)
    a2.load_state_dict(load_checkpoint(path))
    assert a2.actor_optim.param_groups[0]["foreach"] is None
    _go_on_alike(a1, a2)


def test_an_update_draws_one_minibatch_from_the_agents_generator():
    """A seeded search samples the minibatches it sampled before: an update takes one
    ``choice`` of the stored slots (without replacement when enough are stored) and nothing
    else from the agent's generator, and moves the baseline by that minibatch's mean reward."""
    agent = _small_agent(seed=3)
    _fill(agent)
    twin, average = np.random.default_rng(3), None
    for _ in range(3):
        slots = twin.choice(len(agent.memory), size=agent.cfg.bsize, replace=False)
        mean = float(np.mean(agent.memory.rewards[slots]))
        average = mean if average is None else average + 0.5 * (mean - average)
        agent.update_policy()
        assert agent.moving_average == pytest.approx(average)
    assert agent.rng.bit_generator.state == twin.bit_generator.state


TARGETS = np.array([0.1, 0.9, 0.3, 0.7, 0.5])   # the best action at each of five steps


def _step_state(t):
    """A toy state that says the step: one-hot over the steps (all zeros after the last)."""
    return np.eye(len(TARGETS) + 1)[t, :len(TARGETS)]


def _policy_error(agent):
    """Largest |mu(s_t) - target_t| of the deterministic policy."""
    actions = [agent.deterministic_action(_step_state(t))[0] for t in range(len(TARGETS))]
    return float(np.abs(np.array(actions) - TARGETS).max())


def test_the_agent_learns_the_best_action_of_each_step():
    """DDPG finds the known optimum of a 5-step toy search: reward 1 - mean((a_t - target_t)^2),
    stored with every transition of its episode and one update per transition after the
    warmup, as the search does. Before training the policy is ~0.5 everywhere (0.4 from the
    outer targets); after 300 episodes every step is within 0.15 of its target (0.04-0.13 on
    seeds 0-4). A smaller replay memory than the search's keeps mostly recent episodes: with
    one reward for every step, old episodes (worse at every step at once) tie the reward to
    where the policy moved, not to each step's own action."""
    n, episodes, tolerance = len(TARGETS), 300, 0.15
    torch.manual_seed(0)
    cfg = DDPGConfig(hidden1=64, hidden2=64, warmup=10, rmsize=32)
    agent = DDPG(n, n, cfg, device=torch.device("cpu"), seed=0)
    assert _policy_error(agent) > 0.3
    for episode in range(episodes):
        actions = [agent.select_action(_step_state(t), episode) for t in range(n)]
        reward = 1.0 - float(np.mean((np.concatenate(actions) - TARGETS) ** 2))
        agent.store_episode([(_step_state(t), actions[t], _step_state(t + 1), t == n - 1)
                             for t in range(n)], reward)
        if episode >= cfg.warmup:
            for _ in range(n):
                agent.update_policy()
    assert _policy_error(agent) < tolerance
