"""The interface every hardware cost model implements, and what the models share.

A cost model is an object holding an accelerator's parameters that answers
``layer_cost(shape, w_bits, a_bits)`` with a :class:`LayerCost` (a roofline:
``max(compute cycles, memory cycles)`` plus a fixed overhead, since fetch and
compute overlap in the decoupled pipelines these accelerators use). The table
builder reads a few more facts off the model instead of checking its name:
``name``, the ``metrics`` it models and ``max_bit``, the widest operand it supports.
The GEMM view of a layer is described in docs/design.md (hardware cost models).
"""
from dataclasses import dataclass

from lib.simulator.size import size_bits

PJ_PER_MJ = 1e9

# metric -> the LayerCost field a table stores; "size" comes from lib.simulator.size instead
METRIC_FIELDS = {"latency": "latency_ms", "energy": "energy_mj"}


@dataclass(frozen=True)
class LayerCost:
    """Cost of one layer at one (w, a): cycles, milliseconds and (where modelled) mJ."""
    compute_cycles: int
    memory_cycles: int
    cycles: int               # max(compute, memory) + overhead
    latency_ms: float
    dram_bits: int
    energy_mj: float = float("nan")   # NaN where the model gives no energy

    @property
    def bound(self):
        """'memory' when moving the data takes longer than computing on it."""
        return "memory" if self.memory_cycles > self.compute_cycles else "compute"


class CostModel:
    """Base of the hardware cost models; subclasses are usually frozen dataclasses.

    A subclass must give ``name`` (the ``--hardware`` preset name, also part of the
    table file name) and implement :meth:`layer_cost`. Its class attributes say what
    the table builder may ask of it: ``label`` (the architecture's name in messages),
    ``metrics`` (table metrics it models; size is hardware-independent and always
    listed) and ``max_bit`` (the widest weight or activation width it models).
    The attributes are deliberately left unannotated in subclasses: as plain class
    attributes they are not dataclass fields, so they stay out of ``repr``, which
    the table cache fingerprints.
    """
    label = "this accelerator"
    metrics = ("latency", "size")
    max_bit = 8

    def layer_cost(self, shape, w_bits, a_bits):
        """:class:`LayerCost` of ``shape`` (a LayerShape) at ``w_bits`` x ``a_bits``."""
        raise NotImplementedError

    def table_entry(self, shape, w_bits, a_bits, metric):
        """One table value in the metric's unit (ms, mJ or bits)."""
        if metric == "size":
            return size_bits(shape, w_bits)
        return getattr(self.layer_cost(shape, w_bits, a_bits), METRIC_FIELDS[metric])


def check_bits(w, a, max_bit):
    if not (1 <= w <= max_bit and 1 <= a <= max_bit):
        raise ValueError(f"bit widths must lie in 1..{max_bit}, got w={w}, a={a}")


def lhs_elements(shape):
    """Input elements the GEMM actually reads: the input tensor, or the im2col matrix if smaller.

    A strided 1x1 convolution (ResNet's downsample) reads only every other pixel,
    so its LHS is the im2col matrix (M * K per group), a quarter of the input.
    """
    return min(shape.n_inputs, shape.groups * shape.M * shape.K)
