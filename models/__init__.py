"""Network definitions and the registry (``get_model``, ``list_models``)."""
from . import mobilenet, mobilenetv2, resnet  # noqa: F401  (register the constructors)
from .pretrained import (TORCHVISION_WEIGHTS, load_pretrained_weights, rename_by_order,
                         resolve_weights_flag, weights_help)
from .registry import (default_pretrained_path, float_twin, get_model, is_known_model,
                       list_models, register_model)

__all__ = ["load_pretrained_weights", "rename_by_order", "get_model", "is_known_model", "list_models", "register_model", "default_pretrained_path", "float_twin",
           "TORCHVISION_WEIGHTS", "resolve_weights_flag", "weights_help"]
