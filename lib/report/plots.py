"""The search's figures, in the paper's style, and the matplotlib set-up every report shares.

Per-layer bits of the best policy as bars (weights, and activations in linear mode),
and accuracy against cost ratio of every episode with the best one marked.
"""


def pyplot():
    """matplotlib's pyplot on the file-only Agg backend."""
    import matplotlib
    matplotlib.use("Agg")   # files only; never needs a display
    import matplotlib.pyplot as plt
    return plt


def plot_policy(path, policy, layer_names, title=""):
    """Bars of weight (and activation) bits per layer, the paper's Fig. 3/4 style."""
    plt = pyplot()
    linear = bool(policy) and isinstance(policy[0], (list, tuple))
    n = len(policy)
    # margins from the longest name instead of tight_layout (which measures every label again)
    width, height = max(6.0, 0.22 * n + 2), 4.6
    bottom = 0.55 + 0.032 * max((len(str(name)) for name in layer_names), default=0)
    fig, ax = plt.subplots(figsize=(width, height))
    fig.subplots_adjust(left=0.6 / width, right=1 - 0.15 / width, bottom=bottom / height,
                        top=1 - 0.35 / height)
    idx = list(range(n))
    if linear:
        w = [p[0] for p in policy]
        a = [max(p[1], 0) for p in policy]   # -1 (unquantized input) drawn as no bar
        ax.bar([i - 0.2 for i in idx], w, width=0.4, label="weight bits", color="#1f77b4")
        ax.bar([i + 0.2 for i in idx], a, width=0.4, label="activation bits", color="#ff7f0e")
        ax.legend(loc="upper center", ncol=2, fontsize=8, frameon=False)
    else:
        ax.bar(idx, policy, width=0.7, label="weight bits", color="#1f77b4")
    ax.set_xlabel("layer")
    ax.set_ylabel("bits")
    ax.set_xlim(-1, n)
    ax.set_ylim(0, max(max(p) if linear else p for p in policy) + 2)   # room for the legend
    ax.set_title(title, fontsize=9)
    # Every layer by its named_modules() name; past ~60 bars the names would overlap.
    step = max(1, (n + 59) // 60)
    ax.set_xticks(idx[::step])
    ax.set_xticklabels(list(layer_names)[::step], fontsize=5, rotation=90)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def episode_points(fig, ax, history, **kwargs):
    """Episodes' accuracy against cost ratio, coloured by episode, with a colour bar saying so."""
    points = ax.scatter([h["cost_ratio"] for h in history], [h["accuracy"] for h in history],
                        c=[h["episode"] for h in history], cmap="viridis", **kwargs)
    fig.colorbar(points, ax=ax, pad=0.02).set_label("episode", fontsize=8)
    return points


def legend_below(ax, ncol=2):
    """The legend under the axes, where it cannot cover a point (saved with bbox 'tight')."""
    ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.16), ncol=ncol,
              frameon=False)


def save(plt, fig, path):
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)


def history_figure(history, best_episode, warmup, preserve_ratio, metric,
                   labels=("warmup (random)", "DDPG")):
    """The figure of :func:`plot_history` (returned open, for a caller or a test to inspect)."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6.0, 4.0))
    rand = [h for h in history if h["episode"] < warmup]
    learned = [h for h in history if h["episode"] >= warmup]
    if rand:
        ax.scatter([h["cost_ratio"] for h in rand], [h["accuracy"] for h in rand], s=12,
                   c="#999999", label=labels[0])
    if learned:
        episode_points(fig, ax, learned, s=12, label=labels[1])
    best = [h for h in history if h["episode"] == best_episode]
    if best:
        ax.scatter([best[0]["cost_ratio"]], [best[0]["accuracy"]], s=120, marker="*",
                   c="#d62728", label=f"best (episode {best_episode})", zorder=3)
    ax.axvline(preserve_ratio, color="#d62728", lw=0.8, ls="--", label="budget")
    ax.set_xlabel(f"{metric} / reference")
    ax.set_ylabel("accuracy after the short fine-tune (%)")
    legend_below(ax)
    return plt, fig


def plot_history(path, history, best_episode, warmup, preserve_ratio, metric,
                 labels=("warmup (random)", "DDPG")):
    """Accuracy vs cost ratio of every episode; warmup (random) episodes, learned ones, the best.

    ``labels``: legend names of the episodes before and from ``warmup`` (other methods).
    """
    save(*history_figure(history, best_episode, warmup, preserve_ratio, metric, labels), path)


def search_figure(history, marks, budget, metric, title):
    """Left: every episode's accuracy vs cost with the fine-tuned policies marked; right: reward.

    ``marks``: (label, marker, colour, cost ratio, top-1 after the full fine-tune) per policy.
    """
    plt = pyplot()
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    if history:
        episode_points(fig, ax, history, s=10, label="search episodes (short fine-tune)")
    for label, marker, color, cost_ratio, top1 in marks:
        ax.scatter([cost_ratio], [top1], marker=marker, s=140, c=color, zorder=3,
                   edgecolors="k", label=f"{label}, after full fine-tune")
    if budget is not None:
        ax.axvline(budget, color="#d62728", lw=0.8, ls="--", label="budget")
    ax.set_xlabel(f"{metric} / reference")
    ax.set_ylabel("top-1 (%)")
    ax.set_title(f"{title}: accuracy vs cost", fontsize=9)
    legend_below(ax)
    ax2.plot([h["episode"] for h in history], [h["reward"] for h in history], lw=0.8, marker=".")
    ax2.set_xlabel("episode")
    ax2.set_ylabel("reward = 0.1 x (acc - acc_fp32)")
    ax2.set_title(f"{title}: reward over episodes", fontsize=9)
    return plt, fig
