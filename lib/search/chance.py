"""Is every random warmup policy at chance? (issue 33: a budget or bit range that leaves the
random policies no accuracy gives the agent nothing to learn from, and nothing said so.)

Chance is ``100 * k / num_classes`` percent for a top-k reward (``--use_top5``: k = 5): what
a model that no longer tells the classes apart scores (a constant prediction on balanced
classes, e.g. linear mode's 1-bit signed weights, which round to zero). A warmup policy counts as *near chance* when its accuracy is within

    margin = GAP_SHARE * (original - chance) + NOISE_SIGMAS * 100 * sqrt(p (1 - p) / n),
    p = min(1, k / num_classes), n = the validation images,

of chance: a tenth of the way from chance to the full-precision accuracy (a policy that keeps
less than that is useless whatever the agent does), plus two standard deviations of a
chance-level accuracy measured on ``n`` images, so a small validation subset does not hide a
chance-level policy behind its sampling noise. Weights that are themselves within the margin
are not warned about: the budget is then not the cause.
"""
import math

GAP_SHARE = 0.1
NOISE_SIGMAS = 2.0


def chance_margin(p, original, n_images):
    """Percentage points above chance ``100 p`` that still count as chance (module docstring)."""
    noise = NOISE_SIGMAS * 100.0 * math.sqrt(p * (1.0 - p) / max(1, n_images))
    return GAP_SHARE * max(0.0, original - 100.0 * p) + noise


def chance_warning(accuracies, num_classes, original, n_images, flags, top_k=1):
    """The one-line warning when every accuracy in ``accuracies`` (percent) is near chance and the
    original accuracy is not; None otherwise. ``flags`` holds the search's ``min_bit``,
    ``preserve_ratio`` and ``metric`` (the budget's cost), named in the advice."""
    if not accuracies or not num_classes or num_classes < 2 or original is None:
        return None
    p = min(1.0, top_k / num_classes)
    chance = 100.0 * p
    limit = chance + chance_margin(p, original, n_images)
    if original <= limit or max(accuracies) > limit:
        return None
    return (f"all {len(accuracies)} warmup policies scored near chance (best {max(accuracies):.2f}%, "
            f"chance {chance:.2f}% of {num_classes} classes, original {original:.2f}%, "
            f"near = at most {limit:.2f}%): the bit range or the {flags['metric']} budget leaves random "
            f"policies no accuracy, so the agent learns from noise; raise --min_bit (now "
            f"{flags['min_bit']}) or loosen --preserve_ratio (now {flags['preserve_ratio']})")
