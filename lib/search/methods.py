"""The allocation methods of ``rl_quantize.py --method``: each one an action source and its options.

Every method plays the same episodes through the same environment (lib.search.loop);
they differ only in where an episode's actions come from. A new method is one entry
of :data:`METHODS`: its help text, a factory of its action source (an object with
``select_action``, ``store_episode``, ``state_dict`` and ``load_state_dict``) and the
options below. See docs/design.md, "allocation methods beside DDPG".
"""
import logging
from dataclasses import dataclass
from typing import Callable, Optional

from lib.utils.checkpoint import load_checkpoint
from lib.utils.errors import UserError, error_reason

log = logging.getLogger("rl_quantize")


@dataclass(frozen=True)
class Method:
    """One allocation method.

    ``make_agent(args, env, device)``: its action source. ``learns``: the agent is
    trained after the warmup, saves agent.pth.tar, logs its exploration sigma and may
    start from ``--resume`` weights. ``plot(args)``: (warmup episodes, (warmup label,
    label)) of the accuracy-vs-cost plot. ``prologue(args, env, search)``: work before
    the first episode, run on every rank (``search`` is None on ranks > 0).
    ``takes_policy``: it replays ``--policy``. ``one_episode``: it evaluates one policy.
    """
    help: str
    make_agent: Callable
    plot: Callable
    learns: bool = False
    prologue: Optional[Callable] = None
    takes_policy: bool = False
    one_episode: bool = False


def ddpg_agent(args, env, device):
    """The DDPG agent; rmsize x #layers transitions, as released (not x steps: linear mode
    takes 2 per layer)."""
    from lib.rl import DDPG, DDPGConfig
    from .config import config_from_args
    try:
        return DDPG(env.state_dim, len(env.layers), config_from_args(DDPGConfig, args),
                    device=device, seed=args.seed)
    except (MemoryError, RuntimeError) as exc:   # numpy's / torch's failed allocation
        if not isinstance(exc, MemoryError) and "allocate" not in str(exc):
            raise
        raise UserError(f"the agent does not fit in memory (--rmsize {args.rmsize} x "
                        f"{len(env.layers)} layers of replay memory, --hidden1 {args.hidden1}, "
                        f"--hidden2 {args.hidden2}); expected smaller values (released: 128, "
                        "300, 300)") from exc


def random_agent(args, env, device):
    from lib.allocate import UniformActions
    return UniformActions(args.seed)


def step_ranges(env):
    """Per step, the (narrowest, widest) free width: the span its actions map onto."""
    return [(w[0], w[-1]) for w in map(env.step_widths, range(env.n_steps))]


def planned_agent(args, env, device):
    """Fixed actions whose bits :func:`plan_ilp` sets before the first episode."""
    from lib.allocate import FixedActions
    return FixedActions(args.min_bit, args.max_bit, step_ranges=step_ranges(env))


def replay_agent(args, env, device):
    from lib.allocate import FixedActions
    return FixedActions(args.min_bit, args.max_bit, replay_bits(args, env),
                        step_ranges=step_ranges(env))


def replay_bits(args, env):
    """Per-step bits of the ``--policy`` strategy, checked against the env's layers and budget."""
    from lib.utils.strategy import load_strategy, validate_strategy
    mode = "linear" if env.linear else "kmeans"
    widths = [w for i in range(env.n_steps) for w in [env.pins.get(i)] + env.step_widths(i)
              if w is not None and w > 0]
    strategy = validate_strategy(load_strategy(args.policy, "--policy"), env.layer_names, mode,
                                 min(widths), max(widths))
    warn_other_quantizer(args, strategy)
    policy = strategy["strategy"]
    given = [b for pair in policy for b in pair] if env.linear else list(policy)
    flat = [env.pins.get(i, b) for i, b in enumerate(given)]
    if env.policy_from_bits(flat) != policy:
        raise UserError(f"--policy {args.policy}: steps are pinned to {env.pins} (step: bits); "
                        f"expected a policy that keeps them")
    stray = [i for i, b in enumerate(flat) if i not in env.pins and b not in env.step_widths(i)]
    if stray:
        i = stray[0]
        name = env.layer_names[i // env.actions_per_layer]
        raise UserError(f"--policy {args.policy}: layer '{name}' has {env.step_kind(i)} width "
                        f"{flat[i]}; expected one of "
                        f"{env.step_widths(i)} (the search's widths)")
    ratio = env.cost(policy) / env.reference_cost()
    if ratio > args.preserve_ratio + 1e-9:
        raise UserError(f"--policy {args.policy} costs {ratio:.4f} of the reference {args.cost}; "
                        f"expected --preserve_ratio >= {ratio:.4f} so the budget wall keeps it")
    return flat


def warn_other_quantizer(args, strategy):
    """Warn when the replayed ``strategy`` was searched with other quantizer settings than this
    run's flags: the replay then measures the policy in another quantizer than it was found in."""
    from lib.quantize.options import QuantOptions
    from lib.search.build import search_quant_options
    if not args.linear_quantization:
        return
    recorded = QuantOptions.from_record(strategy.get("quant_options"),
                                        f"--policy {args.policy}: quant_options")
    ours, kl = search_quant_options(args).record(), getattr(args, "kl_max_bit", 0)
    differ = [f"{k} {v!r} (here {ours[k]!r})" for k, v in recorded.record().items()
              if v != ours[k]]
    if "kl_max_bit" in strategy and strategy["kl_max_bit"] != kl:
        differ.append(f"kl_max_bit {strategy['kl_max_bit']} (here {kl})")
    if differ:
        log.warning("--policy %s was searched with %s: this replay's quantizer differs; pass "
                    "the same flags to replay it as found", args.policy, ", ".join(differ))


def plan_ilp(args, env, search=None):
    """Score the layers (or reuse the cached scores) and plan the integer program's policy.

    Rank 0 passes its ``search``; under torchrun the other ranks call it too (without
    one) and join the scoring, which runs on every rank's shard of the validation subset.
    """
    from lib.allocate import plan_policy
    from lib.utils.distributed import broadcast_values
    pending = search is not None and search.start < search.args.train_episode
    if not broadcast_values([pending])[0]:
        return
    if search is not None:
        search._save_state(search.start)   # a kill while scoring can now be resumed
    bits = plan_policy(env, search.out if search else None, args.sensitivity,
                       args.sensitivity_images, args.hessian_iters, args.seed,
                       refine=args.refine)
    if search is not None:
        search.agent.plan(bits)


METHODS = {
    "ddpg": Method("the RL search", ddpg_agent, learns=True,
                   plot=lambda args: (args.warmup, ("warmup (random)", "DDPG"))),
    "ilp": Method("sensitivity scores + exact integer program, one evaluated episode",
                  planned_agent, prologue=plan_ilp, one_episode=True,
                  plot=lambda args: (0, ("", "integer program"))),
    "random": Method("uniform random actions, same episodes", random_agent,
                     plot=lambda args: (args.train_episode, ("random", ""))),
    "replay": Method("every episode evaluates the --policy strategy again (the reward's noise: "
                     "same policy, a new fine-tune data order each time)", replay_agent,
                     takes_policy=True, plot=lambda args: (0, ("", "replayed policy"))),
}


def build_agent(args, env, device):
    """The source of each episode's actions for ``--method``."""
    return METHODS[args.method].make_agent(args, env, device)


def methods_help():
    return "; ".join(f"{name}: {m.help}" for name, m in METHODS.items())


def check_method_args(args):
    """The method's flag rules (UserError); returns its :class:`Method`."""
    method = METHODS[args.method]
    if not method.learns and args.resume != "default":
        raise UserError(f"--resume loads DDPG agent weights; expected --method ddpg "
                        f"(got --method {args.method})")
    if method.takes_policy != (args.policy is not None):
        raise UserError("--policy goes with --method replay (and replay needs it); expected "
                        "both or neither")
    if method.learns and args.warmup >= args.train_episode:
        log.warning("--warmup %d >= --train_episode %d: every episode is random, the agent never "
                    "acts; expected --warmup below --train_episode (or --method random)",
                    args.warmup, args.train_episode)
    if method.one_episode and args.train_episode != 1:
        log.info("--method %s evaluates one policy: one episode (--train_episode ignored)",
                 args.method)
        args.train_episode = 1
    return method


def load_agent_weights(agent, path):
    """--resume: actor/critic weights of an earlier search; UserError when they do not fit."""
    state = load_checkpoint(path)
    expected = ("expected agent.pth.tar of a search with the same model, --hidden1 and "
                "--hidden2")
    if not isinstance(state, dict) or not all(isinstance(state.get(k), dict)
                                              for k in ("actor", "critic")):
        raise UserError(f"--resume '{path}' holds no 'actor' and 'critic' weights; {expected}")
    try:
        agent.load_weights(state)
    except (RuntimeError, KeyError, TypeError, ValueError) as exc:
        raise UserError(f"--resume '{path}' does not fit this agent ({error_reason(exc, 200)}); "
                        f"{expected}") from exc
    log.info("agent weights from %s", path)
