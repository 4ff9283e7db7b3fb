"""The episode loop shared by every allocation method: play, record, resume, write outputs.

An episode is one pass over the layers (lib.env): the method's action source picks
every step's action, the env evaluates the policy, and the search records it in the
output folder: log.txt (one line per episode), TensorBoard events, strategy.json (the
best policy so far), best_policy.png / accuracy_vs_cost.png, agent.pth.tar (learning
methods) and search_state.pth.tar, saved after every episode so a killed search
resumes where it stopped (lib.search.state).
"""
import json
import logging
import os
import time

import numpy as np

from lib.env.torchrun import release_followers, run_follower, sync_from_main
from lib.quantize.options import QuantOptions
from lib.utils.checkpoint import atomic_write_text, save_checkpoint
from lib.utils.errors import UserError, error_reason

from .chance import chance_warning
from .methods import METHODS
from .state import STATE_FILE, BEST_KEYS, check_resumable, cost_table_of, rng_states, set_rng_states

log = logging.getLogger("rl_quantize")

PLOT_INTERVAL_S = 60
# seconds: the episode's wall time; warmup: 1 for a learning method's random warmup episodes.
# Columns are only ever appended, so readers that go by the header keep working.
LOG_COLUMNS = ["episode", "reward", "accuracy", "cost_ratio", "cost", "nonfinite", "policy",
               "seconds", "warmup"]


def play_episode(env, agent, episode):
    """One pass over the layers; every transition is stored with the episode's final reward."""
    state, transitions, done = env.reset(), [], False
    while not done:
        action = agent.select_action(state, episode)
        next_state, reward, done, info = env.step(action)
        transitions.append((state, action, next_state, done))
        state = next_state
    agent.store_episode(transitions, reward)
    return transitions, info


def strategy_meta(args, env):
    """What strategy.json records beside the policy (docs/design.md, "strategy.json"): the
    model's settings in full, so the fine-tune and the report take them from it."""
    from lib.utils.data_utils import dataset_defaults
    meta = {"arch": args.arch, "mode": "linear" if args.linear_quantization else "kmeans",
            "metric": args.cost, "hardware": args.hardware if args.linear_quantization else None,
            "preserve_ratio": args.preserve_ratio, "dataset": args.dataset,
            "width_mult": args.width_mult, "min_bit": args.min_bit, "max_bit": args.max_bit,
            "method": args.method, "input_size": args.input_size,
            "num_classes": dataset_defaults(args.dataset, args.dataset_root).num_classes}
    if (table := cost_table_of(env)) is not None:
        meta["cost_table"] = table
    if not (options := QuantOptions.from_args(args)).is_default():
        meta["quant_options"] = options.record()
    if getattr(args, "weights_source", None) is not None:
        meta["weights"] = args.weights_source
    if args.linear_quantization:
        meta["kl_max_bit"] = getattr(args, "kl_max_bit", 0)
    # the width options beside the range, recorded only when given (older files stay as they were)
    for key in ("min_bit_a", "max_bit_a", "bits", "bits_a", "refine"):
        if getattr(args, key, None):
            meta[key] = getattr(args, key)
    if getattr(args, "pin", None):
        meta["pins"] = list(args.pin)
    return meta


def complete_log_header(path):
    """A resumed log.txt of an earlier version gets the columns appended since; its old rows
    simply lack them (readers go by the header)."""
    if not os.path.isfile(path):
        return
    with open(path) as f:
        lines = f.read().splitlines()
    header = lines[0].split("\t") if lines else []
    if header != LOG_COLUMNS and header == LOG_COLUMNS[:len(header)]:
        atomic_write_text(path, "\n".join(["\t".join(LOG_COLUMNS)] + lines[1:]) + "\n")


class Search:
    """The episode loop plus its bookkeeping (log, TensorBoard, best policy, state)."""

    def __init__(self, args, env, agent, out_dir, state=None):
        from lib.utils.logger import Logger, trim_log
        from tensorboardX import SummaryWriter
        self.args, self.env, self.agent, self.out = args, env, agent, out_dir
        self.method = METHODS[args.method]
        self.meta = strategy_meta(args, env)
        self.start, self.best, self.history = 0, None, []
        self._last_plot = time.time()
        log_path = os.path.join(out_dir, "log.txt")
        if state is not None:
            self._restore(state)
            trim_log(log_path, self.start)
            complete_log_header(log_path)
            log.info("resuming %s at episode %d", out_dir, self.start)
        self.meta["original_accuracy"] = env.org_acc
        self.logger = Logger(log_path, LOG_COLUMNS, resume=state is not None)
        self.writer = SummaryWriter(out_dir, purge_step=self.start if state is not None else None)
        if self.best is not None:   # strategy.json may be newer than the saved state
            self._write_best()
        if state is None:   # so a search killed in its first episode can be resumed
            self._save_state(0)

    def _restore(self, state):
        """Agent, env, progress and generators of a saved state; UserError if they do not fit.

        Nothing is written before this succeeds, so a refused state loses nothing.
        """
        try:
            self.agent.load_state_dict(state["agent"])
            self.env.load_state_dict(state["env"])
            set_rng_states(state["rng"])
            start, best, history = int(state["episode"]), state["best"], list(state["history"])
        except (KeyError, TypeError, ValueError, RuntimeError, IndexError) as exc:
            raise UserError(f"--resume_search: the state in '{self.out}' does not fit this "
                            f"search ({type(exc).__name__}: {error_reason(exc)}); expected the "
                            "state of a search with the same model and flags") from exc
        check_resumable(self.out, start, best, history, self.args.train_episode)
        self.start, self.best, self.history = start, best, history

    def run_episode(self, episode):
        transitions, info = play_episode(self.env, self.agent, episode)
        losses = []
        if self.method.learns and episode >= self.args.warmup:
            for _ in range(len(transitions) * self.args.n_update):
                losses.append(self.agent.update_policy())
        return info, losses

    def run(self):
        total = self.args.train_episode
        t0 = time.time()
        for episode in range(self.start, total):
            start = time.time()
            info, losses = self.run_episode(episode)
            elapsed = time.time() - start
            info.update(episode=episode, seconds=elapsed)
            self.record(episode, info, losses)
            left = (time.time() - t0) / (episode - self.start + 1) * (total - episode - 1)
            log.info("episode %d/%d  reward %.3f  acc %.2f  cost %.4f  (best %.2f @ %d, %.4f)  "
                     "%.1fs  eta %dm%02ds%s", episode + 1, total, info["reward"], info["accuracy"],
                     info["cost_ratio"], self.best["accuracy"], self.best["episode"],
                     self.best["cost_ratio"], elapsed, left // 60, left % 60,
                     "  (warmup: random)" if self.method.learns and episode < self.args.warmup
                     else "")
            if self.method.learns and episode + 1 == min(self.args.warmup, total):
                self._warn_if_warmup_at_chance()
        self.writer.close()
        self.logger.close()
        if self.best is not None:
            self._plots()
        return self.best

    def record(self, episode, info, losses):
        """Log, track the best, then save the state (after the log line, see trim_log)."""
        warmup = int(self.method.learns and episode < self.args.warmup)
        self.logger.append([episode, float(info["reward"]), float(info["accuracy"]),
                            float(info["cost_ratio"]), float(info["cost"]), int(info["nonfinite"]),
                            json.dumps(info["policy"]), round(float(info.get("seconds", 0.0)), 3),
                            warmup])
        self.history.append({k: info[k] for k in ("episode", "reward", "accuracy", "cost_ratio")})
        # a NaN best (never expected: diverged episodes score 0%) must not block every later one
        improved = (self.best is None or info["reward"] > self.best["reward"]
                    or not np.isfinite(self.best["reward"]))
        if improved:
            self.best = {k: info[k] for k in BEST_KEYS}
            self._write_best()
        self._tensorboard(episode, info, losses)
        self._save_state(episode + 1)
        # Plots follow the best during long searches (not every time: matplotlib is slow).
        if improved and time.time() - self._last_plot > PLOT_INTERVAL_S:
            self._plots()

    def _warn_if_warmup_at_chance(self):
        """Once, after the last warmup episode (lib.search.chance)."""
        warmup = [h["accuracy"] for h in self.history[:self.args.warmup]]
        message = chance_warning(warmup, self.meta["num_classes"], self.env.org_acc,
                                 self.args.val_size, {"metric": self.args.cost,
                                                      "min_bit": self.args.min_bit,
                                                      "preserve_ratio": self.args.preserve_ratio},
                                 top_k=5 if self.args.use_top5 else 1)
        if message:
            log.warning(message)

    def _tensorboard(self, episode, info, losses):
        w = self.writer
        w.add_scalar("reward/last", info["reward"], episode)
        w.add_scalar("reward/best", self.best["reward"], episode)
        w.add_scalar("info/accuracy", info["accuracy"], episode)
        w.add_scalar("info/cost_ratio", info["cost_ratio"], episode)
        if self.method.learns:
            w.add_scalar("info/exploration_sigma", self.agent.sigma(episode)
                         if episode >= self.args.warmup else 1.0, episode)
        # tags by layer name, the index first so TensorBoard lists them in model order
        for i, (name, bits) in enumerate(zip(self.env.layer_names, info["policy"])):
            w_bits, a_bits = bits if isinstance(bits, list) else (bits, None)
            w.add_scalar(f"bits_w/{i:03d}_{name}", w_bits, episode)
            if a_bits is not None:
                w.add_scalar(f"bits_a/{i:03d}_{name}", a_bits, episode)
        losses = [lv for lv in losses if lv[0] is not None]
        if losses:
            w.add_scalar("loss/value", float(np.mean([lv[0] for lv in losses])), episode)
            w.add_scalar("loss/policy", float(np.mean([lv[1] for lv in losses])), episode)

    def _write_best(self):
        from lib.utils.strategy import write_strategy
        write_strategy(os.path.join(self.out, "strategy.json"), self.best, self.env.layer_names,
                       self.meta)

    def _save_state(self, next_episode):
        if self.method.learns:
            save_checkpoint(self.agent.weights(), os.path.join(self.out, "agent.pth.tar"))
        save_checkpoint({"episode": next_episode, "agent": self.agent.state_dict(),
                         "env": self.env.state_dict(), "best": self.best,
                         "history": self.history, "rng": rng_states(),
                         "cost_table": cost_table_of(self.env), "args": vars(self.args)},
                        os.path.join(self.out, STATE_FILE))

    def _plots(self):
        from lib.report.plots import plot_history, plot_policy
        self._last_plot = time.time()
        b = self.best
        plot_policy(os.path.join(self.out, "best_policy.png"), b["policy"], self.env.layer_names,
                    f"{self.args.arch} best policy (episode {b['episode']}): "
                    f"acc {b['accuracy']:.2f}%, {self.args.cost} ratio {b['cost_ratio']:.3f}")
        warmup, labels = self.method.plot(self.args)
        plot_history(os.path.join(self.out, "accuracy_vs_cost.png"), self.history, b["episode"],
                     warmup, self.args.preserve_ratio, self.args.cost, labels=labels)


def run_search(args, env, agent, out_dir, state=None, device="cpu"):
    """Rank 0's search: the original accuracy (unless resumed), the method's prologue, the
    episodes. Returns the best episode's record."""
    method = METHODS[args.method]
    if state is None:
        acc = env.measure_original()
        log.info("%s on %s: %d layers, %d steps per episode, original accuracy %.2f%%, "
                 "budget %.3f of the reference %s", args.arch, args.dataset, len(env.layers),
                 env.n_steps, acc, args.preserve_ratio, args.cost)
    log.info("output folder %s (%s)", out_dir, device)
    search = Search(args, env, agent, out_dir, state)
    sync_from_main(env)
    started = time.perf_counter()
    if method.prologue is not None:
        method.prologue(args, env, search)
    best = search.run()
    # the method's own time (ilp: scores + solve + its episode), without the start-up and
    # the original-accuracy pass every method pays; bench/allocate_bench.sh reads this line
    log.info("search time %.1fs (%s, episodes %d-%d)", time.perf_counter() - started,
             args.method, search.start + 1, args.train_episode)
    release_followers(env)
    return best


def follow_search(args, env):
    """A rank > 0 under torchrun: join rank 0's collectives (one agent and one set of outputs,
    on rank 0; docs/design.md, "beyond one machine")."""
    method = METHODS[args.method]
    prologue = None if method.prologue is None else (lambda: method.prologue(args, env))
    run_follower(env, resumed=args.resume_search is not None, prologue=prologue,
                 verbose=args.debug)
