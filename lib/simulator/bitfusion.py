"""BitFusion-style accelerator: latency and energy (and size).

Sharma et al., "Bit Fusion: Bit-Level Dynamically Composable Architecture for
Accelerating Deep Neural Networks", ISCA 2018. The formulas are in docs/design.md
(hardware cost models); the assumptions the paper leaves open are stated next to
the code that makes them.
"""
from dataclasses import dataclass
from math import ceil

from lib.simulator.base import PJ_PER_MJ, CostModel, LayerCost, lhs_elements


def fusion_width(bits):
    """Operand width a fusion unit runs ``bits`` at: 2, 4 or 8 (1,2->2; 3->4; 5..7->8)."""
    if not 1 <= bits <= 8:
        raise ValueError(f"BitFusion supports 1..8-bit operands, got {bits}")
    return 2 if bits <= 2 else 4 if bits <= 4 else 8


@dataclass(frozen=True)
class BitFusionConfig(CostModel):
    """A BitFusion array of ``rows x cols`` fusion units (16 BitBricks of 2x2 bits each).

    ``rows`` (N) spans input channels, ``cols`` (M) output channels. Buffer sizes
    in bytes; energies in pJ (per cycle for the core, per bit for buffers/DRAM).
    """
    name: str
    rows: int = 16
    cols: int = 32
    freq_mhz: float = 500.0
    dram_bits_per_cycle: int = 192
    wbuf_bytes: int = 64 * 1024
    abuf_bytes: int = 32 * 1024
    obuf_bytes: int = 16 * 1024
    out_bits: int = 8
    psum_bits: int = 32
    overhead_cycles: int = 0
    e_core_pj: float = 235.104
    e_wbuf_pj: tuple = (0.021, 0.029)    # (read, write) per bit
    e_abuf_pj: tuple = (0.059, 0.114)
    e_obuf_pj: tuple = (0.033, 0.073)
    e_dram_pj: float = 15.0
    label = "BitFusion"
    metrics = ("latency", "energy", "size")
    max_bit = 8    # the widest fused operand

    def layer_cost(self, shape, w_bits, a_bits):
        """BitFusion latency and energy of one layer at ``w_bits``/``a_bits``.

        Compute (per group, fc = 1x1 conv; ``factor`` = products per fusion unit per
        cycle = floor(8 / a') * floor(8 / w') with a', w' the fused widths):

            cycles = B*OH*OW * ceil(OC/cols) * KH*KW * ceil(IC / (rows * factor)).

        Memory: weights once, inputs (:func:`lhs_elements`) once (again for every
        weight-buffer refill when a group's inputs exceed the activation buffer),
        outputs at ``out_bits``; all at the fused widths, since operands are stored as
        the array runs them. Energy: :meth:`energy_pj`.
        """
        wf, af = fusion_width(w_bits), fusion_width(a_bits)
        factor = (8 // af) * (8 // wf)
        g = shape.groups
        kh, kw = shape.kernel
        ic_g = shape.K // (kh * kw)
        steps = kh * kw * ceil(ic_g / (self.rows * factor))
        compute = g * shape.M * ceil(shape.N / self.cols) * steps

        w_bits_moved = wf * shape.n_weights
        wbuf_fills = ceil(w_bits_moved / g / (8 * self.wbuf_bytes))
        in_bits = af * lhs_elements(shape)
        in_fetches = wbuf_fills if in_bits / g > 8 * self.abuf_bytes else 1
        dram_bits = w_bits_moved + in_bits * in_fetches + self.out_bits * shape.n_outputs
        memory = ceil(dram_bits / self.dram_bits_per_cycle)
        cycles = max(compute, memory) + self.overhead_cycles
        energy = self.energy_pj(shape, wf, af, compute, steps, in_bits * in_fetches, dram_bits)
        return LayerCost(compute_cycles=compute, memory_cycles=memory, cycles=cycles,
                         latency_ms=cycles / (self.freq_mhz * 1e3), dram_bits=dram_bits,
                         energy_mj=energy / PJ_PER_MJ)

    def energy_pj(self, shape, wf, af, compute, steps, in_bits_moved, dram_bits):
        """Energy = cycles * E_core + buffer bits * per-bit energy + DRAM bits * 15 pJ.

        Buffer traffic follows the dataflow: every MAC reads its weight from the
        unit's weight buffer; an input is read once per row and broadcast to the
        ``min(cols, OC)`` busy columns; each output's 32-bit partial sum is read and
        written once per accumulation step (``steps``); buffers are written with what
        comes from DRAM.
        """
        wbuf = wf * shape.macs * self.e_wbuf_pj[0] + wf * shape.n_weights * self.e_wbuf_pj[1]
        abuf = (af * shape.macs / min(self.cols, shape.N) * self.e_abuf_pj[0]
                + in_bits_moved * self.e_abuf_pj[1])
        obuf = self.psum_bits * shape.n_outputs * steps * (self.e_obuf_pj[0] + self.e_obuf_pj[1])
        return compute * self.e_core_pj + wbuf + abuf + obuf + dram_bits * self.e_dram_pj


def bitfusion():
    """BitFusion's edge configuration bf_e (docs/design.md, hardware cost models).

    16 x 32 fusion units at 500 MHz, a 192-bit memory interface, 64 KB weight / 32 KB
    activation / 16 KB output buffers, the paper's core and buffer energies and
    15 pJ/bit for DRAM. Outputs are written back requantized to 8 bits (the array's
    widest operand); partial sums are 32 bits in the output buffer.
    """
    return BitFusionConfig(name="bitfusion")
