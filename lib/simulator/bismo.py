"""BISMO-style bit-serial accelerator: latency (and size).

Umuroglu, Rasnayake, Sjalander, "BISMO: A Scalable Bit-Serial Matrix
Multiplication Overlay for Reconfigurable Computing", FPL 2018. The formulas are
in docs/design.md (hardware cost models); the assumptions the paper leaves open
are stated next to the code that makes them.
"""
from dataclasses import dataclass
from math import ceil

from lib.simulator.base import CostModel, LayerCost, check_bits, lhs_elements


@dataclass(frozen=True)
class BismoConfig(CostModel):
    """A BISMO overlay instance: a ``dm x dn`` array of ``dk``-bit binary dot-product units.

    ``buffer_depth`` is the number of ``dk``-bit entries of each LHS row buffer
    (and RHS column buffer); ``out_bits`` the width results are written back at;
    ``overhead_cycles`` a fixed per-layer cost (instruction issue, pipeline fill
    and drain, host synchronisation).
    """
    name: str
    dm: int
    dk: int
    dn: int
    freq_mhz: float
    dram_bits_per_cycle: int
    buffer_depth: int = 1024
    out_bits: int = 32
    overhead_cycles: int = 1000
    label = "BISMO"
    metrics = ("latency", "size")
    max_bit = 64   # bit-serial: any width is w * a binary passes

    @property
    def lhs_buffer_bits(self):
        """On-chip LHS capacity: dm row buffers of buffer_depth x dk bits."""
        return self.dm * self.buffer_depth * self.dk

    @property
    def peak_binary_tops(self):
        """Peak binary ops per second / 1e12: 2 * dm * dn * dk per cycle."""
        return 2 * self.dm * self.dn * self.dk * self.freq_mhz * 1e6 / 1e12

    def layer_cost(self, shape, w_bits, a_bits):
        """BISMO latency of one layer at ``w_bits`` weights and ``a_bits`` activations.

        Bit-serial arithmetic: a w x a product is w * a binary GEMMs, each tiled onto
        the array, so per group (BISMO paper, section III)

            compute = w * a * ceil(M / dm) * ceil(N / dn) * ceil(K / dk)   cycles.

        Memory traffic: weights (RHS) once at w bits, inputs (LHS, :func:`lhs_elements`)
        at a bits, results at ``out_bits``. The RHS buffer holds ``buffer_depth //
        (w * ceil(K / dk))`` column tiles of ``dn`` columns at a time (at least one);
        when one group's LHS does not fit the LHS buffer it is streamed again for each
        such N tile. The lowering is assumed to happen on the fly from the fetched
        feature map, so im2col's k*k duplication costs no DRAM traffic.
        """
        w, a = w_bits, a_bits
        check_bits(w, a, self.max_bit)
        g = shape.groups
        k_words = ceil(shape.K / self.dk)
        compute = g * w * a * ceil(shape.M / self.dm) * ceil(shape.N / self.dn) * k_words
        lhs = lhs_elements(shape)
        n_tile = self.dn * max(1, self.buffer_depth // (w * k_words))
        lhs_fetches = ceil(shape.N / n_tile) if a * lhs // g > self.lhs_buffer_bits else 1
        dram_bits = w * shape.n_weights + a * lhs * lhs_fetches + self.out_bits * shape.n_outputs
        memory = ceil(dram_bits / self.dram_bits_per_cycle)
        cycles = max(compute, memory) + self.overhead_cycles
        return LayerCost(compute_cycles=compute, memory_cycles=memory, cycles=cycles,
                         latency_ms=cycles / (self.freq_mhz * 1e3), dram_bits=dram_bits)


def bismo_edge():
    """PYNQ-Z1 (Zynq-7020) BISMO, the configuration the BISMO paper measures.

    8 x 256 x 8 at 200 MHz = 6.5 binary TOPS peak, fed through one 64-bit AXI HP port
    (64 bits per accelerator cycle = 1.6 GB/s). 1024-entry buffers (the overlay's
    default): 256 KB of LHS and 256 KB of RHS, which fits the part's 4.9 Mb BRAM.
    Results leave the array as 32-bit accumulators (the overlay writes them raw; the
    host requantizes). Per-layer overhead: 1000 cycles (5 us), our assumption.
    """
    return BismoConfig(name="bismo_edge", dm=8, dk=256, dn=8, freq_mhz=200.0,
                       dram_bits_per_cycle=64, buffer_depth=1024)


def bismo_cloud():
    """BISMO scaled to a Xilinx VU9P (AWS F1 class), HAQ's cloud target; our assumptions.

    The BISMO papers give no VU9P build, so this preset scales the edge one by the
    part's resources. BISMO's dot-product units are LUT logic (AND + popcount); the
    VU9P has 1,182K LUTs, 22x the Zynq-7020's 53K, so we assume 16x the edge array
    (32 x 256 x 32 = 262,144 binary lanes), leaving room for the 3-SLR routing and
    the F1 shell. 250 MHz is the F1 shell's default kernel clock: peak 131 binary TOPS.
    Memory: the four DDR4 channels of an F1 card, each presented as a 512-bit AXI port
    at 250 MHz, give 2048 bits per cycle (64 GB/s). Buffers: 4096 entries deep
    (4 MB LHS + 4 MB RHS), which the part's 270 Mb of UltraRAM holds. Results are 32
    bits and the per-layer overhead is 1000 cycles, as on the edge preset.
    """
    return BismoConfig(name="bismo_cloud", dm=32, dk=256, dn=32, freq_mhz=250.0,
                       dram_bits_per_cycle=2048, buffer_depth=4096)
