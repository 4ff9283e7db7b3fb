"""The sensitivity cache (sensitivity.json in the search's output folder) and its heat map.

The cache is strict JSON written atomically; a resumed run reuses it when it was
made for the same layers, widths, metric and image count, and recomputes it
otherwise. Scores skipped because the cost ignored their steps (``unscored``) are zeros
in the tables: such a cache serves only a run whose cost ignores those steps too. The heat map shows layers (by their ``named_modules()`` name) against
widths, one panel per kind (weights; activations in linear mode).
"""
import logging
import os

import numpy as np

from lib.utils.checkpoint import atomic_write_json, read_json
from lib.utils.errors import UserError
from lib.utils.schema import is_int, is_real, shown

log = logging.getLogger(__name__)

CACHE_FILE = "sensitivity.json"
HEATMAP_FILE = "sensitivity.png"
KINDS = ("weight", "activation")
# Past any score a run computes (a non-finite loss is cached as 1e6, NONFINITE_SCORE): the
# solver sums a few hundred of them, which must stay finite.
MAX_SCORE = 1e12
MAX_SECONDS = 1e9   # a scoring time past 30 years is not a measurement


def save_scores(path, scores):
    record = {k: (v.tolist() if isinstance(v, np.ndarray) else v) for k, v in scores.items()}
    atomic_write_json(path, record)


def _check_record(record, expect, kinds):
    """ValueError naming the first field that does not hold what a scoring run writes."""
    if not isinstance(record, dict):
        raise ValueError(f"it holds a {type(record).__name__}, not the scores' object")
    for kind in KINDS:
        columns = expect.get("bits_a", expect["bits"]) if kind == "activation" else expect["bits"]
        shape = (len(expect["layers"]), len(columns))
        value = record.get(kind)
        if value is None and kind in kinds:
            raise ValueError(f"it has no '{kind}' scores")
        if value is not None and not (isinstance(value, list) and len(value) == shape[0] and all(
                isinstance(row, list) and len(row) == shape[1]
                and all(is_real(v, -MAX_SCORE, MAX_SCORE) for v in row) for row in value)):
            raise ValueError(f"'{kind}' is not {shape[0]} rows of {shape[1]} numbers in "
                             f"[-{MAX_SCORE:g}, {MAX_SCORE:g}]")
    unscored = record.get("unscored", {})
    if not (isinstance(unscored, dict) and all(
            kind in KINDS and isinstance(names, list) and all(n in expect["layers"] for n in names)
            for kind, names in unscored.items())):
        raise ValueError("'unscored' is not {kind: [layer names]}")
    most = expect.get("requested_images")
    for key, ok in (("n_images", lambda v: is_int(v, 1, most)),
                    ("baseline_loss", lambda v: is_real(v, 0, MAX_SCORE)),
                    ("seconds", lambda v: is_real(v, 0, MAX_SECONDS))):
        if not ok(record.get(key)):
            raise ValueError(f"'{key}' is {shown(record.get(key))}")


def load_scores(path, expect, kinds=("weight",), unscored_ok=None):
    """The cached scores at ``path`` if they match ``expect`` (metric, bits, layers, n_images).

    ``kinds``: the score tables the caller needs; ``unscored_ok``: ``{kind: layer names}``
    whose scores it may do without (a cache that left out any other is scored again).
    Returns None (and the caller scores again) when the file is missing, unreadable, made
    for something else, or holds a value no scoring run writes: a score that is not a finite
    number within +-MAX_SCORE, a table of the wrong shape, a non-numeric count.
    """
    if not os.path.isfile(path):
        return None
    try:
        record = read_json(path, "sensitivity cache", "the scores of an earlier run")
        if isinstance(record, dict):
            differs = [k for k, v in expect.items() if record.get(k) != v]
            if differs:
                log.info("%s was scored with another %s; scoring again", path, differs[0])
                return None
        _check_record(record, expect, kinds)
    except (UserError, ValueError) as exc:
        log.warning("ignoring %s (%s); scoring again", path, exc)
        return None
    lacking = _lacking(record.get("unscored", {}), unscored_ok or {})
    if lacking:
        log.info("%s has no scores of %s, which this run's cost depends on; scoring again",
                 path, lacking)
        return None
    for kind in KINDS:
        if record.get(kind) is not None:
            record[kind] = np.asarray(record[kind], dtype=np.float64)
    log.info("sensitivity scores from %s (%s, %.1fs when computed)", path, record["metric"],
             record["seconds"])
    return record


def _lacking(unscored, allowed):
    """The first ``kind layer`` left unscored in a cache that the caller needs, or None."""
    for kind, names in unscored.items():
        for name in names:
            if name not in allowed.get(kind, ()):
                return f"{kind} {name}"
    return None


def heatmap_scale(values):
    """(matrix to draw, colour normalisation, colour bar label) of a layers x widths score map.

    Scores fall steeply as widths grow, so on one linear scale the narrowest column takes
    the whole colour range and the others are one colour: the scale is logarithmic. A score
    below zero is measurement noise (quantizing cannot lower the true loss), so when there
    are such scores the band up to the largest of them is drawn linearly (symmetric log).
    """
    from matplotlib.colors import LogNorm, SymLogNorm
    v = np.asarray(values, dtype=np.float64)
    v = np.where(np.isfinite(v), v, np.nan)
    if np.all(np.isnan(v)):
        return v, None, "score"
    lo, hi = np.nanmin(v), np.nanmax(v)
    if lo > 0:
        return v, LogNorm(lo, hi), "score (log scale)"
    positive = v[v > 0]
    band = -lo if lo < 0 else (positive.min() if positive.size else 1.0)
    return v, SymLogNorm(band, vmin=lo, vmax=max(hi, band), base=10), \
        f"score (log scale; linear within ±{band:.2g}, the noise)"


def scores_figure(scores):
    """The heat map of :func:`plot_scores`, returned open (pyplot, figure)."""
    import matplotlib
    matplotlib.use("Agg")   # files only; never needs a display
    import matplotlib.pyplot as plt
    kinds = [k for k in KINDS if scores.get(k) is not None]
    layers, bits = scores["layers"], scores["bits"]
    left = 0.3 + 0.032 * max((len(n) for n in layers), default=0)   # inches, 5-pt names
    width, height = 3.2 * len(kinds) + 1.0 + left, max(4.0, 0.16 * len(layers) + 1.5)
    fig, axes = plt.subplots(1, len(kinds), figsize=(width, height), squeeze=False, sharey=True)
    fig.subplots_adjust(left=left / width, right=1 - 0.75 / width, bottom=0.6 / height,
                        top=1 - 0.35 / height, wspace=0.45)
    for ax, kind in zip(axes[0], kinds):
        values, norm, label = heatmap_scale(_masked(scores, kind))
        image = ax.imshow(values, aspect="auto", cmap="viridis", norm=norm,
                          interpolation="nearest")
        ax.set_xticks(range(len(bits)))
        ax.set_xticklabels(bits)
        ax.set_xlabel(f"{kind} bits")
        ax.set_title(f"{kind} sensitivity ({scores['metric']})", fontsize=9)
        fig.colorbar(image, ax=ax, fraction=0.08).set_label(label, fontsize=7)
    axes[0][0].set_yticks(range(len(layers)))
    axes[0][0].set_yticklabels(layers, fontsize=5)
    return plt, fig


def _masked(scores, kind):
    """The ``kind`` table with its unscored rows blank (NaN), not drawn as measured zeros."""
    table = np.array(scores[kind], dtype=np.float64)
    unscored = set(scores.get("unscored", {}).get(kind, ()))
    for row, name in enumerate(scores["layers"]):
        if name in unscored:
            table[row] = np.nan
    return table


def plot_scores(path, scores):
    """Heat map of the scores, layers x widths (one panel per kind, layer names on the left).

    Margins are set from the longest name rather than by ``tight_layout``, which measures
    every tick label again (half the drawing time of a 53-layer map).
    """
    plt, fig = scores_figure(scores)
    fig.savefig(path, dpi=120)
    plt.close(fig)
