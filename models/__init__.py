"""Network definitions and the registry (``get_model``, ``list_models``)."""
from . import mobilenet, mobilenetv2, resnet  # noqa: F401  (register the constructors)
from .pretrained import load_pretrained_weights, rename_by_order
from .registry import (default_pretrained_path, float_twin, get_model, is_known_model,
                       list_models, register_model)

__all__ = ["load_pretrained_weights", "rename_by_order", "get_model", "is_known_model", "list_models", "register_model", "default_pretrained_path", "float_twin"]
