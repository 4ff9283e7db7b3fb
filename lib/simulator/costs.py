"""Cost objects the search calls: ``cost(policy)``, ``reference()``, ``min_cost()``.

As docs/design.md describes the search, the K-Means search is budgeted on model size,
``sum(bits_i * #weights_i)`` against a float_bit (32) reference; the linear search
on a lookup table, ``sum(table[i, w_i - 1, a_i - 1])`` against the all-8-bit
policy. Every cost object carries ``unit`` (the unit of its values) and
``to_human(value) -> (number, unit)`` for logs and reports.
"""
import numpy as np

from lib.simulator.tables import UNITS
from lib.utils.errors import UserError

BITS_PER_MB = 8 * 2 ** 20   # the HAQ paper's "MB" is 2^20 bytes (ResNet-50 fp32 = 97.5 MB)


def to_human(value, unit):
    """``(number, unit)`` for display: bits become MB, other units pass through."""
    if unit == "bit":
        return value / BITS_PER_MB, "MB"
    return value, unit


def _check_bits(bits, lo, hi, what):
    if not lo <= bits <= hi:
        raise UserError(f"{what} = {bits} is out of range; expected {lo}..{hi}")


class SizeCost:
    """Model size in bits of a K-Means policy (one weight bit width per layer)."""

    unit = "bit"

    def __init__(self, n_weights_per_layer, float_bit=32):
        self.n_weights = np.asarray(n_weights_per_layer, dtype=np.int64)
        self.float_bit = float_bit

    def __call__(self, policy):
        """Bits of the weights when layer i uses ``policy[i]`` bits."""
        if len(policy) != len(self.n_weights):
            raise UserError(f"policy has {len(policy)} layers; expected {len(self.n_weights)}")
        return int(np.dot(np.asarray(policy, dtype=np.int64), self.n_weights))

    def reference(self):
        """The full-precision model: float_bit bits per weight."""
        return int(self.float_bit * self.n_weights.sum())

    def min_cost(self, min_bit):
        """Every layer at ``min_bit`` (K-Means mode pins no layer)."""
        return int(min_bit * self.n_weights.sum())

    def to_human(self, value):
        return to_human(value, self.unit)


class TableCost:
    """Latency/energy/size of a linear-mode policy ``[[w_bit, a_bit], ...]`` from a table.

    ``a_bit == -1`` marks an unquantized input (the first layer reads the image,
    which is already 8-bit), so it is costed at ``float_bit`` (8), as are the
    reference's entries.
    """

    def __init__(self, table, min_bit=2, max_bit=8, float_bit=8, metric="latency", source=None):
        self.source = source   # {"path", "sha256"} of a user table; None for the simulator's
        self.table = np.asarray(table, dtype=np.float64)
        if self.table.ndim != 3 or self.table.shape[1] < max_bit or self.table.shape[2] < max_bit:
            raise UserError(f"cost table has shape {self.table.shape}; expected "
                            f"(n_layers, {max_bit}, {max_bit})")
        self.min_bit, self.max_bit, self.float_bit = min_bit, max_bit, float_bit
        self.unit = UNITS.get(metric, metric)

    @property
    def n_layers(self):
        return self.table.shape[0]

    def __call__(self, policy):
        """Sum over layers of table[i, w_i - 1, a_i - 1] (a_i == -1 costed as float_bit)."""
        if len(policy) != self.n_layers:
            raise UserError(f"policy has {len(policy)} layers; expected {self.n_layers}")
        total = 0.0
        for i, (w, a) in enumerate(policy):
            a = self.float_bit if a == -1 else a
            _check_bits(w, 1, self.max_bit, f"layer {i} weight bits")
            _check_bits(a, 1, self.max_bit, f"layer {i} activation bits")
            total += self.table[i, w - 1, a - 1]
        return float(total)

    def reference(self):
        """Every layer at float_bit weights and activations: sum(table[i, 7, 7])."""
        f = self.float_bit - 1
        return float(self.table[:, f, f].sum())

    def min_policy(self):
        """The cheapest policy the search can reach: linear mode's pins, the rest at min_bit.

        The first layer stays [8, -1] and the last [8, 8] (docs/design.md, the search's budget).
        """
        n, f, lo = self.n_layers, self.float_bit, self.min_bit
        policy = [[lo, lo] for _ in range(n)]
        policy[0] = [f, -1]
        if n > 1:
            policy[-1] = [f, f]
        return policy

    def min_cost(self):
        """Cost of :meth:`min_policy`."""
        return self(self.min_policy())

    def to_human(self, value):
        return to_human(value, self.unit)


def linear_cost_model(model, arch, dataset, hardware, metric, batch=16, min_bit=1, max_bit=8,
                      cost_table=None, width_mult=None, cost_table_sha256=None,
                      input_size=None):
    """The linear-mode TableCost of ``model``: a user's .npy table, or the simulator's (cached).

    A user table is recorded in the cost model's ``source`` (path and sha256); with
    ``cost_table_sha256`` (a recorded table) it must still have that content.

    The model itself is traced (not rebuilt from its name) so a reduced width is costed as
    such, at ``input_size`` (default: the dataset's); pinned layers are 8-bit whatever
    ``max_bit`` is, so the table has >= 8 bits.
    """
    from lib.simulator.tables import get_table, load_user_table
    from lib.utils.layers import quantizable_layers
    table_bits = max(8, max_bit)
    source = None
    if cost_table:
        table, source = load_user_table(cost_table, len(quantizable_layers(model, linear=True)),
                                        table_bits, expected_sha256=cost_table_sha256)
    else:
        table = get_table(arch, dataset, hardware, metric, batch, model=model, max_bit=table_bits,
                          linear=True, width_mult=width_mult, input_size=input_size)
    return TableCost(table, min_bit=min_bit, max_bit=table_bits, float_bit=8, metric=metric,
                     source=source)
