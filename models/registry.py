"""Model registry: name -> constructor (timm-style).

``list_models()`` feeds argparse ``choices``. Our own constructors (MobileNet-V1/V2,
ResNet and their quantized twins) come first; any torchvision classification model
can also be built by name (K-Means mode only needs Conv2d/Linear layers).
"""
import inspect
import os

from lib.utils.errors import UserError

_REGISTRY = {}


def register_model(fn=None, *, name=None):
    """Decorator: register ``fn`` under ``name`` (default: the function's name)."""
    def wrap(f):
        _REGISTRY[name or f.__name__] = f
        return f
    return wrap(fn) if fn is not None else wrap


def _torchvision_names():
    import torchvision   # imported on demand: it costs ~1 s, and the registry's models need none
    return sorted(torchvision.models.list_models(module=torchvision.models))


def is_known_model(name):
    """Whether ``name`` is a registry model or a torchvision classifier (looked up only if needed)."""
    return name in _REGISTRY or name in _torchvision_names()


def list_models(include_torchvision=False):
    """Registered names; with ``include_torchvision`` also torchvision's classifiers."""
    names = sorted(_REGISTRY)
    if include_torchvision:
        names += [n for n in _torchvision_names() if n not in _REGISTRY]
    return names


def get_model(name, num_classes=1000, input_size=224, width_mult=None, linear=False, **kwargs):
    """Build model ``name`` for ``num_classes`` classes at ``input_size`` pixels.

    Small inputs (<= 64 px) get a CIFAR-style stem (stride 1) in our own models.
    ``width_mult`` applies to the MobileNets; None means 1.0.  ``linear``: a model for
    linear mode -- a Q twin as is, any other model with its Conv2d/Linear layers swapped
    for QConv2d/QLinear (:func:`lib.quantize.swap.quantize_model`).
    """
    model = _build(name, num_classes, input_size, width_mult, **kwargs)
    if linear:
        from lib.quantize.swap import linear_mode
        model = linear_mode(model)
    return model


def _build(name, num_classes, input_size, width_mult, **kwargs):
    if name in _REGISTRY:
        fn = _REGISTRY[name]
        params = inspect.signature(fn).parameters
        if width_mult is not None:
            if "width_mult" not in params:
                if width_mult != 1.0:
                    raise UserError(f"--width_mult is not supported by '{name}'; expected 1.0")
            else:
                kwargs["width_mult"] = width_mult
        return fn(num_classes=num_classes, input_size=input_size, **kwargs)
    if name in _torchvision_names():
        if width_mult not in (None, 1.0):
            raise UserError(f"--width_mult is not supported by torchvision's '{name}'")
        import torchvision
        return torchvision.models.get_model(name, weights=None, num_classes=num_classes, **kwargs)
    raise UserError(f"unknown arch '{name}'; expected one of: {', '.join(list_models())} "
                    "or a torchvision classification model name")


def float_twin(name):
    """Name of the float model whose weights a quantized arch starts from."""
    if name.startswith("q") and name[1:] in _REGISTRY:
        return name[1:]
    return name


def default_pretrained_path(arch, dataset, root="checkpoints/pretrained"):
    """Where pretrain.py writes (and the search/finetune look for) weights.

    ImageNet weights are ``<arch>.pth.tar`` (docs/design.md, checkpoints); weights trained
    on another dataset are ``<arch>_<dataset>.pth.tar`` (a dataset given as a folder by its
    last component, see ``dataset_label``). Quantized archs share their
    float twin's file.
    """
    from lib.utils.data_utils import dataset_label
    base = float_twin(arch)
    fname = f"{base}.pth.tar" if dataset == "imagenet" else f"{base}_{dataset_label(dataset)}.pth.tar"
    return os.path.join(root, fname)
