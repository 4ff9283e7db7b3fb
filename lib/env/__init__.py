"""Search environments: a shared base and the K-Means/size and linear/latency-energy modes.

The env sees numpy actions in [0, 1] and returns numpy states; it never imports
the agent (the CLI connects them). Layer order is ``model.modules()`` order
(lib.utils.layers).
"""
from .budget import PolicyBudget
from .base import (EnvConfig, QuantizeEnv, action_to_bits, action_to_width, layer_features,
                   normalize_columns)
from .evaluator import FinetuneConfig, ShortFinetune
from .kmeans_env import KMeansQuantizeEnv, shared_training
from .linear_env import LinearQuantizeEnv

__all__ = ["PolicyBudget", "EnvConfig", "QuantizeEnv", "action_to_bits", "action_to_width",
           "layer_features", "normalize_columns", "FinetuneConfig", "ShortFinetune", "KMeansQuantizeEnv",
           "LinearQuantizeEnv", "shared_training"]
