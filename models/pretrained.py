"""Pretrained weights: a local checkpoint, or torchvision's weights API for ImageNet.

``--weights`` picks the source: a torchvision weights name (``IMAGENET1K_V1``,
``IMAGENET1K_V2`` or ``DEFAULT``) or a checkpoint file. Without it a local file wins
(``--pretrained_path``, else ``checkpoints/pretrained/<arch>.pth.tar``); without one,
ImageNet models whose float twin has torchvision weights get torchvision's ``DEFAULT``
(needs network access); anything else is a one-line error naming the path.

The paper started ResNet-50 from the V1 weights (76.15 top-1; V2 reaches 80.86 with another
recipe), so the run scripts that reproduce it pass ``--weights IMAGENET1K_V1``. Every load
returns where its weights came from, ``{"name": ...}`` or ``{"path": ..., "sha256": ...}``,
which strategy.json, the search state and results.json record.
"""
import logging
import os

from lib.utils.checkpoint import file_sha256, load_pretrained, load_state_dict
from lib.utils.errors import UserError

from .registry import default_pretrained_path, float_twin

log = logging.getLogger(__name__)
_QUANT_KEYS = ("activation_range", "weight_range")
TORCHVISION_WEIGHTS = ("IMAGENET1K_V1", "IMAGENET1K_V2", "DEFAULT")


def rename_by_order(source, model):
    """Map ``source`` (a state_dict of the same network with other names) onto ``model``'s keys.

    Our MobileNet-V2 and ResNets hold the same tensors in the same order as torchvision's
    (only the module names differ, e.g. ``features.1.conv.0.0`` vs ``features.1.conv.0``); the
    quantized twins add only ``activation_range``/``weight_range``, which stay as initialised.
    """
    own = [(k, v) for k, v in model.state_dict().items() if not k.endswith(_QUANT_KEYS)]
    src = list(source.items())
    if len(own) != len(src) or any(a.shape != b.shape for (_, a), (_, b) in zip(own, src)):
        raise UserError("torchvision's weights do not fit this model tensor for tensor; "
                        "expected the same architecture (pass --pretrained_path instead)")
    return {k: v for (k, _), (_, v) in zip(own, src)}


def resolve_weights_flag(args):
    """Settle ``--weights`` against ``--pretrained_path`` on a parsed namespace.

    A torchvision name stays in ``args.weights``; a file path moves to ``args.pretrained_path``
    (``args.weights`` becomes None), so every later reader looks in one place. Both flags
    naming different sources is a UserError.
    """
    weights = getattr(args, "weights", None)
    if weights is None or weights in TORCHVISION_WEIGHTS:
        if weights is not None and args.pretrained_path:
            raise UserError(f"--weights {weights} and --pretrained_path {args.pretrained_path} "
                            "name two sources; expected one of them")
        return
    if args.pretrained_path and os.path.abspath(args.pretrained_path) != os.path.abspath(weights):
        raise UserError(f"--weights {weights} and --pretrained_path {args.pretrained_path} name "
                        "two files; expected one of them")
    if not os.path.isfile(weights):
        raise UserError(f"--weights '{weights}' is neither a file nor a torchvision weights "
                        f"name; expected a checkpoint path or one of "
                        f"{', '.join(TORCHVISION_WEIGHTS)}")
    args.pretrained_path, args.weights = weights, None


def _torchvision_weights(arch, name):
    """(the torchvision weights enum member of ``float_twin(arch)`` called ``name``)."""
    import torchvision
    enum = torchvision.models.get_model_weights(float_twin(arch))
    try:
        return enum[name]
    except KeyError:
        known = ", ".join(m for m in TORCHVISION_WEIGHTS if m in enum.__members__)
        raise UserError(f"--weights {name}: torchvision has no such weights for "
                        f"'{float_twin(arch)}'; expected one of {known}") from None


def _load_torchvision(model, arch, dataset, name, explicit):
    if dataset != "imagenet":
        raise UserError(f"--weights {name} are torchvision's ImageNet weights; expected "
                        f"--dataset imagenet (got {dataset}), or a checkpoint file")
    try:
        weights = _torchvision_weights(arch, name)
        state = weights.get_state_dict(progress=False)
    except UserError:
        raise
    except Exception as exc:  # unknown to torchvision, or no network
        hint = ("check the network" if explicit else
                "put a checkpoint there or pass --pretrained_path")
        raise UserError(f"torchvision's {name} weights for '{float_twin(arch)}' could not be "
                        f"fetched ({type(exc).__name__}); {hint}") from exc
    load_state_dict(model, rename_by_order(state, model), source="torchvision weights")
    log.info("loaded torchvision's %s ImageNet weights for %s", weights.name, float_twin(arch))
    return {"name": weights.name}


def load_pretrained_weights(model, arch, dataset, path=None, name=None):
    """Load pretrained weights into ``model``; returns where they came from.

    ``name``: a torchvision weights name (``--weights``), which wins over any file; it is
    recorded as the name it resolves to (``DEFAULT`` -> ``IMAGENET1K_V2`` today). A file is
    recorded as ``{"path", "sha256"}``, so a moved copy is recognised as the same weights.
    """
    if name is not None:
        return _load_torchvision(model, arch, dataset, name, explicit=True)
    default_path = default_pretrained_path(arch, dataset)
    path = path or default_path
    if os.path.isfile(path) or dataset != "imagenet":
        load_pretrained(model, path, hint=f"train one with 'python pretrain.py --arch "
                        f"{float_twin(arch)} --dataset {dataset}' or pass --pretrained_path")
        return {"path": os.path.abspath(path), "sha256": file_sha256(path)}
    try:
        return _load_torchvision(model, arch, dataset, "DEFAULT", explicit=False)
    except UserError as exc:
        raise UserError(f"pretrained weights '{path}' not found and {exc}") from exc


def weights_help(flag_for_path="--pretrained_path"):
    """The ``--weights`` help text the CLIs share."""
    return (f"pretrained weights: torchvision's {', '.join(TORCHVISION_WEIGHTS)} (ImageNet; "
            "the paper's ResNet-50 is IMAGENET1K_V1) or a checkpoint file (as "
            f"{flag_for_path}); default: {flag_for_path}'s file, else torchvision's DEFAULT")

