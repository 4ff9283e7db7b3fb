"""The registry of hardware presets: the ``--hardware`` names and the cost models behind them.

Adding an accelerator: write its cost model in one file (a :class:`CostModel`
subclass with ``layer_cost``, its ``metrics`` and ``max_bit``, and a preset
function), then add one line to :data:`HARDWARE`. The CLIs take their
``--hardware`` choices from :func:`list_hardware`.
"""
from lib.simulator.base import CostModel
from lib.simulator.bismo import bismo_cloud, bismo_edge
from lib.simulator.bitfusion import bitfusion
from lib.utils.errors import UserError

# preset name -> function returning its cost model (whose ``name`` is that preset name)
HARDWARE = {
    "bismo_edge": bismo_edge,
    "bismo_cloud": bismo_cloud,
    "bitfusion": bitfusion,
}


def list_hardware():
    """The preset names, in registration order (the ``--hardware`` choices)."""
    return list(HARDWARE)


def get_hardware(hw):
    """The cost model of a preset name (``--hardware``), or a cost model passed through."""
    if isinstance(hw, CostModel):
        return hw
    if hw not in HARDWARE:
        raise UserError(f"unknown hardware '{hw}'; expected one of: {', '.join(HARDWARE)}")
    return HARDWARE[hw]()


def hardware_for(metric):
    """Preset names whose cost model offers ``metric`` (for hints in error messages)."""
    return [name for name, preset in HARDWARE.items() if metric in preset().metrics]
