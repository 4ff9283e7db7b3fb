"""Hardware cost models and lookup tables for HAQ's hardware-aware search.

HAQ (Wang et al., CVPR 2019) budgets the search on *direct* hardware feedback:
the latency or energy of each layer at each (weight bits, activation bits) pair
on the target accelerator, read from a lookup table. This package builds those
tables for any model from analytic models of the paper's targets
(docs/design.md, hardware cost models).

Public API (what lib/env and the CLIs import):

Shapes (``shapes.py``)
    ``LayerShape``                 GEMM view (M, K, N, groups) and element counts of a layer.
    ``extract_layer_shapes(model, input_size, batch=1, linear=False)``
                                   one LayerShape per quantizable layer, policy order.
Cost models (``base.py``, one file per accelerator, ``hardware.py`` the registry)
    ``CostModel``                  the interface: ``layer_cost(shape, w_bits, a_bits) -> LayerCost``
                                   (compute/memory cycles, ms, mJ, bound), ``name``, ``metrics``,
                                   ``max_bit``; ``table_entry(shape, w, a, metric)``.
    ``BismoConfig`` (``bismo.py``: ``bismo_edge()``, ``bismo_cloud()``) models latency;
    ``BitFusionConfig`` (``bitfusion.py``: ``bitfusion()``) latency and energy; size
    (``size.py``) is hardware-independent. Asking a model for a metric it lacks is a
    UserError that names the presets that have it.
    ``HARDWARE`` (name -> preset), ``list_hardware()``, ``get_hardware(name_or_model)``.
Tables (``tables.py``)
    ``build_table(model_or_shapes, hardware, metric, max_bit=8, input_size=224, batch=1)``
                                   -> ndarray (n_layers, max_bit, max_bit), [layer, w-1, a-1];
    ``get_table(arch, dataset, hardware, metric, batch, model=None, input_size=None, ...)``
                                   cached in lookup_tables/ as
                                   {arch}_{dataset}_{size}px_w{width}_batch{B}_{hardware}_{metric}_table.npy;
    ``load_user_table(path, n_layers, max_bit=8)``  a measured table (``--cost_table``)
                                   and its {path, sha256} record;
    ``UNITS``: latency in ms, energy in mJ, size in bits (cycles: ``LayerCost.cycles``).
Costs (``costs.py``)
    ``SizeCost(n_weights_per_layer, float_bit=32)``  K-Means mode, policy = [bits, ...];
    ``TableCost(table, min_bit=2, max_bit=8, float_bit=8, metric='latency')``
                                   linear mode, policy = [[w, a], ...], a == -1 costed at 8;
    both have ``__call__(policy)``, ``reference()``, ``min_cost(...)``, ``unit`` and
    ``to_human(value) -> (number, unit)`` (bits are shown as MB = 2^20 bytes).

CLI: ``python -m lib.simulator --arch ARCH --dataset DATASET --hardware H --metric M [--batch B]``.
"""
from lib.simulator.base import CostModel, LayerCost
from lib.simulator.bismo import BismoConfig, bismo_cloud, bismo_edge
from lib.simulator.bitfusion import BitFusionConfig, bitfusion
from lib.simulator.costs import SizeCost, TableCost, linear_cost_model, to_human
from lib.simulator.hardware import HARDWARE, get_hardware, list_hardware
from lib.simulator.shapes import LayerShape, extract_layer_shapes
from lib.simulator.tables import (METRICS, UNITS, build_table, get_table, load_user_table,
                                  table_path)

__all__ = [
    "LayerShape", "extract_layer_shapes",
    "CostModel", "LayerCost", "BismoConfig", "BitFusionConfig", "bismo_edge", "bismo_cloud",
    "bitfusion", "HARDWARE", "get_hardware", "list_hardware",
    "METRICS", "UNITS", "build_table", "get_table", "load_user_table", "table_path",
    "SizeCost", "TableCost", "linear_cost_model", "to_human",
]
