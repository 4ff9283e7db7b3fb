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


def plot_history(path, history, best_episode, warmup, preserve_ratio, metric,
                 labels=("warmup (random)", "DDPG")):
    """Accuracy vs cost ratio of every episode; warmup (random) episodes, learned ones, the best.

    ``labels``: legend names of the episodes before and from ``warmup`` (other methods).
    """
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(5.5, 4.0))
    rand = [h for h in history if h["episode"] < warmup]
    learned = [h for h in history if h["episode"] >= warmup]
    if rand:
        ax.scatter([h["cost_ratio"] for h in rand], [h["accuracy"] for h in rand], s=12,
                   c="#999999", label=labels[0])
    if learned:
        ax.scatter([h["cost_ratio"] for h in learned], [h["accuracy"] for h in learned], s=12,
                   c=[h["episode"] for h in learned], cmap="viridis", label=labels[1])
    best = [h for h in history if h["episode"] == best_episode]
    if best:
        ax.scatter([best[0]["cost_ratio"]], [best[0]["accuracy"]], s=120, marker="*",
                   c="#d62728", label=f"best (episode {best_episode})", zorder=3)
    ax.axvline(preserve_ratio, color="#d62728", lw=0.8, ls="--", label="budget")
    ax.set_xlabel(f"{metric} / reference")
    ax.set_ylabel("accuracy after the short fine-tune (%)")
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
