"""Analytic accelerator models: BISMO-style bit-serial and BitFusion-style.

Both models take one :class:`~lib.simulator.shapes.LayerShape` and a (weight bits,
activation bits) pair and return a :class:`LayerCost`. Each is a roofline: the
layer takes ``max(compute cycles, memory cycles)`` (fetch and compute overlap, as
in both accelerators' decoupled fetch/execute pipelines) plus a fixed overhead.
The formulas are DESIGN.md section 5; the assumptions the papers leave open are
stated next to the code that makes them.
"""
from dataclasses import dataclass
from math import ceil

from lib.utils.errors import UserError

PJ_PER_MJ = 1e9


@dataclass(frozen=True)
class LayerCost:
    """Cost of one layer at one (w, a): cycles, milliseconds and (BitFusion) mJ."""
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


def _check_bits(w, a, max_bit=8):
    if not (1 <= w <= max_bit and 1 <= a <= max_bit):
        raise ValueError(f"bit widths must lie in 1..{max_bit}, got w={w}, a={a}")


# --------------------------------------------------------------------------------------
# BISMO (Umuroglu, Rasnayake, Sjalander, "BISMO: A Scalable Bit-Serial Matrix
# Multiplication Overlay for Reconfigurable Computing", FPL 2018)
# --------------------------------------------------------------------------------------
@dataclass(frozen=True)
class BismoConfig:
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
    metrics = ("latency", "size")

    @property
    def lhs_buffer_bits(self):
        """On-chip LHS capacity: dm row buffers of buffer_depth x dk bits."""
        return self.dm * self.buffer_depth * self.dk

    @property
    def peak_binary_tops(self):
        """Peak binary ops per second / 1e12: 2 * dm * dn * dk per cycle."""
        return 2 * self.dm * self.dn * self.dk * self.freq_mhz * 1e6 / 1e12


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


def lhs_elements(shape):
    """Input elements the GEMM actually reads: the input tensor, or the im2col matrix if smaller.

    A strided 1x1 convolution (ResNet's downsample) reads only every other pixel,
    so its LHS is the im2col matrix (M * K per group), a quarter of the input.
    """
    return min(shape.n_inputs, shape.groups * shape.M * shape.K)


def bismo_layer_cost(shape, w, a, hw):
    """BISMO latency of one layer at ``w``-bit weights and ``a``-bit activations.

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
    _check_bits(w, a, max_bit=64)
    g = shape.groups
    k_words = ceil(shape.K / hw.dk)
    compute = g * w * a * ceil(shape.M / hw.dm) * ceil(shape.N / hw.dn) * k_words
    lhs = lhs_elements(shape)
    n_tile = hw.dn * max(1, hw.buffer_depth // (w * k_words))
    lhs_fetches = ceil(shape.N / n_tile) if a * lhs // g > hw.lhs_buffer_bits else 1
    dram_bits = w * shape.n_weights + a * lhs * lhs_fetches + hw.out_bits * shape.n_outputs
    memory = ceil(dram_bits / hw.dram_bits_per_cycle)
    cycles = max(compute, memory) + hw.overhead_cycles
    return LayerCost(compute_cycles=compute, memory_cycles=memory, cycles=cycles,
                     latency_ms=cycles / (hw.freq_mhz * 1e3), dram_bits=dram_bits)


# --------------------------------------------------------------------------------------
# BitFusion (Sharma et al., "Bit Fusion: Bit-Level Dynamically Composable Architecture
# for Accelerating Deep Neural Networks", ISCA 2018)
# --------------------------------------------------------------------------------------
@dataclass(frozen=True)
class BitFusionConfig:
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
    metrics = ("latency", "energy", "size")


def bitfusion():
    """BitFusion's edge configuration bf_e (DESIGN.md section 5).

    16 x 32 fusion units at 500 MHz, a 192-bit memory interface, 64 KB weight / 32 KB
    activation / 16 KB output buffers, the paper's core and buffer energies and
    15 pJ/bit for DRAM. Outputs are written back requantized to 8 bits (the array's
    widest operand); partial sums are 32 bits in the output buffer.
    """
    return BitFusionConfig(name="bitfusion")


def fusion_width(bits):
    """Operand width a fusion unit runs ``bits`` at: 2, 4 or 8 (1,2->2; 3->4; 5..7->8)."""
    if not 1 <= bits <= 8:
        raise ValueError(f"BitFusion supports 1..8-bit operands, got {bits}")
    return 2 if bits <= 2 else 4 if bits <= 4 else 8


def bitfusion_layer_cost(shape, w, a, hw):
    """BitFusion latency and energy of one layer at ``w``/``a`` bits.

    Compute (per group, fc = 1x1 conv; ``factor`` = products per fusion unit per
    cycle = floor(8 / a') * floor(8 / w') with a', w' the fused widths):

        cycles = B*OH*OW * ceil(OC/cols) * KH*KW * ceil(IC / (rows * factor)).

    Memory: weights once, inputs (:func:`lhs_elements`) once (again for every
    weight-buffer refill when a group's inputs exceed the activation buffer),
    outputs at ``out_bits``; all at the fused widths, since operands are stored as
    the array runs them.

    Energy = cycles * E_core + buffer bits * per-bit energy + DRAM bits * 15 pJ,
    with buffer traffic from the dataflow: every MAC reads its weight from the
    unit's weight buffer; an input is read once per row and broadcast to the
    ``min(cols, OC)`` busy columns; each output's 32-bit partial sum is read and
    written once per accumulation step (KH*KW*ceil(IC/(rows*factor)) steps);
    buffers are written with what comes from DRAM.
    """
    wf, af = fusion_width(w), fusion_width(a)
    factor = (8 // af) * (8 // wf)
    g = shape.groups
    kh, kw = shape.kernel
    ic_g = shape.K // (kh * kw)
    steps = kh * kw * ceil(ic_g / (hw.rows * factor))
    compute = g * shape.M * ceil(shape.N / hw.cols) * steps

    w_bits = wf * shape.n_weights
    wbuf_fills = ceil(w_bits / g / (8 * hw.wbuf_bytes))
    in_bits = af * lhs_elements(shape)
    in_fetches = wbuf_fills if in_bits / g > 8 * hw.abuf_bytes else 1
    out_bits = hw.out_bits * shape.n_outputs
    dram_bits = w_bits + in_bits * in_fetches + out_bits
    memory = ceil(dram_bits / hw.dram_bits_per_cycle)
    cycles = max(compute, memory) + hw.overhead_cycles

    wbuf = wf * shape.macs * hw.e_wbuf_pj[0] + w_bits * hw.e_wbuf_pj[1]
    abuf = (af * shape.macs / min(hw.cols, shape.N) * hw.e_abuf_pj[0]
            + in_bits * in_fetches * hw.e_abuf_pj[1])
    obuf = hw.psum_bits * shape.n_outputs * steps * (hw.e_obuf_pj[0] + hw.e_obuf_pj[1])
    energy_pj = compute * hw.e_core_pj + wbuf + abuf + obuf + dram_bits * hw.e_dram_pj
    return LayerCost(compute_cycles=compute, memory_cycles=memory, cycles=cycles,
                     latency_ms=cycles / (hw.freq_mhz * 1e3), dram_bits=dram_bits,
                     energy_mj=energy_pj / PJ_PER_MJ)


HARDWARE = {"bismo_edge": bismo_edge, "bismo_cloud": bismo_cloud, "bitfusion": bitfusion}


def get_hardware(hw):
    """A config object from a preset name (``--hardware``) or a config passed through."""
    if isinstance(hw, (BismoConfig, BitFusionConfig)):
        return hw
    if hw not in HARDWARE:
        raise UserError(f"unknown hardware '{hw}'; expected one of: {', '.join(HARDWARE)}")
    return HARDWARE[hw]()


def layer_cost(shape, w, a, hw):
    """Dispatch to the model of ``hw`` (a config object)."""
    if isinstance(hw, BismoConfig):
        return bismo_layer_cost(shape, w, a, hw)
    if isinstance(hw, BitFusionConfig):
        return bitfusion_layer_cost(shape, w, a, hw)
    raise TypeError(f"unknown hardware config type {type(hw).__name__}")
