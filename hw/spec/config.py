"""One parameter set for the whole system.

The hardware generators, the golden models, the firmware (assembler, compiler,
driver) and the performance model all read the same :class:`SystemConfig`.
Every part is a frozen dataclass, checked when it is constructed; a variant is a
copy with a few fields changed (:meth:`SystemConfig.replace`).

Three presets:

``tiny``
    For unit tests: few banks, short rows and short DRAM timings, so that a
    Verilator build takes seconds and a test a few thousand cycles.
``default``
    What ``make demo`` simulates in RTL: GDDR6-AiM geometry (16 banks, 2 KB
    rows, 16 BF16 lanes per column, 2 KB global buffer) and the paper's DRAM
    timings at a 1 GHz command clock, over 2 channels (Verilator's build cost
    grows with every bank) with 4096 rows per bank (256 MB): enough for the
    12 decoder layers of GPT-2 small with up to ~1,000 tokens of KV cache.
``ianus``
    The paper's Table 1 system (8 channels of GDDR6-AiM, 4 NPU cores with a
    128x64 systolic array, 12 MB + 4 MB scratchpads). Used for performance
    projection, not for RTL.

Clocking convention: the PIM command bus is modelled at ``pim_mhz`` (1 GHz for
AiM: one column command, i.e. one 16-lane MAC per bank, per ns; real GDDR6 has a
2 GHz CK with separate row and column command slots, which the 1 GHz model folds
into one slot per cycle). DRAM timings are stored in cycles of that clock.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field

__all__ = [
    "ConfigError",
    "COMBINE_ROW_BIT",
    "PimGeometry",
    "DramTiming",
    "NpuConfig",
    "Clocks",
    "SramPimConfig",
    "SystemConfig",
    "TIMING_NS_IANUS",
    "timing_from_ns",
]


class ConfigError(ValueError):
    """A configuration value breaks a rule. The message names the field, the value and the rule."""

    def __init__(self, where: str, field_name: str, value, rule: str):
        self.where = where
        self.field_name = field_name
        self.value = value
        self.rule = rule
        super().__init__(f"{where}.{field_name} must be {rule}, not {value!r}")


def _is_pow2(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1 and value & (value - 1) == 0


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


class _Checked:
    """Mixin: helpers for ``__post_init__`` validation."""

    def _fail(self, name, rule):
        raise ConfigError(type(self).__name__, name, getattr(self, name), rule)

    def _pow2(self, *names):
        for name in names:
            if not _is_pow2(getattr(self, name)):
                self._fail(name, "a power of two")

    def _at_least(self, minimum, *names, unit=""):
        for name in names:
            value = getattr(self, name)
            if not _is_int(value) or value < minimum:
                self._fail(name, f"an integer of at least {minimum}{unit}")


# Low-precision PIM unit fields of PimGeometry (issue 19) and their defaults (today's BF16 unit). A field at its
# default is left out of ``repr``, so the configurations (and the Verilog module names and build-cache keys
# derived from ``repr``) of every BF16 preset are what they were before the fields existed.
LOWPREC_DEFAULTS = {"weight_format": "bf16", "act_format": "bf16", "quant_group": 128, "scale_format": "fp16",
                    "grid_choice": False, "acc_slots": 1}
# Pipeline depths of the BF16 processing unit (issue 15; :class:`hw.mac_unit.MacUnit`) and their defaults (today's
# unit). Left out of ``repr`` at their defaults as well, for the same reason.
PIPE_DEFAULTS = {"mul_stages": 1, "tree_stages": 2, "acc_stages": 1}
PIPE_RANGES = {"mul_stages": (1, 2), "tree_stages": (1, 2, 3, 4), "acc_stages": (1, 2, 3, 4)}
# The memory controller's pipeline (issue 15; :class:`hw.memctrl.MemoryController`): ``pick_stages`` 0 decides
# the FR-FCFS pick and issues it in the same cycle, 1 registers the pick and issues it the cycle after. Left out of
# ``repr`` at its default as well.
CTRL_DEFAULTS = {"pick_stages": 0}
COMBINE_ROW_BIT = 0
"""Row-field bit of a MACSB / MACAB that marks a combining MAC (``acc_stages > 1``; :mod:`hw.pim.bank`)."""
WEIGHT_FORMATS = ("bf16", "int4", "fp4")
ACT_FORMATS = ("bf16", "fp8_e4m3")
SCALE_FORMATS = ("fp16", "bf16")


@dataclass(frozen=True, repr=False)
class PimGeometry(_Checked):
    """Geometry of the GDDR6-AiM-style PIM memory.

    Parameters
    ----------
    channels : int
        PIM channels (each with its own command bus, memory controller and
        global buffer). Power of two.
    banks : int
        Banks per channel, each with a processing unit. Power of two.
    rows : int
        Rows per bank. Power of two.
    columns : int
        Columns per row. Power of two.
    lanes : int
        BF16 values per column, i.e. multipliers per processing unit.
    column_bits : int
        Width of one column access; must equal ``lanes * 16``.
    gb_bytes : int
        Global-buffer size per channel in bytes; a whole number of columns and
        at most one row.
    af_rows : int
        Rows at the top of every bank reserved for activation-function lookup
        tables (AiM keeps its AF tables in DRAM).
    row_buffers : int
        Row buffers per bank: 1 (AiM / IANUS: normal and PIM traffic share the
        bank's row, so a macro PIM command blocks normal requests) or 2
        (NeuPIMs: a separate PIM row buffer, so the memory controller serves
        normal requests while a PIM GEMV streams; see :mod:`hw.pim.commands`).
    channel_interleave : int
        Bytes a run of consecutive addresses stays in one channel (issue 14).
        0: the paper's Row-Channel-Bank-Column map (a channel holds 32 KB runs at
        paper scale: ``banks`` whole rows). Otherwise a power of two from one
        column to one row: Row-Bank-ColumnHigh-Channel-ColumnLow, so a DMA
        stream moves to the next channel every ``channel_interleave`` bytes
        while every DRAM row of every bank (what a PIM GEMV reads) stays whole;
        ``row_bytes`` gives Row-Bank-Channel-Column (a bank row is contiguous).
        See :class:`hw.memif.AddressMap`.
    weight_format : str
        Weights of the processing units (issue 19, P3-LLM): ``"bf16"`` (16 per column, today's unit),
        ``"int4"`` or ``"fp4"`` (64 4-bit codes per column, :class:`hw.pim.lowprec_unit.LowPrecMacUnit`
        with fused dequantization; the low-precision commands LDSCAB / LDSLAB exist only then).
    act_format : str
        Activations in the global buffer: ``"bf16"`` or ``"fp8_e4m3"`` (4-bit weights only).
    quant_group : int
        Inputs per group sharing one scale (4-bit weights): a power of two, a multiple of 64.
    scale_format : str
        Group scales: ``"fp16"`` or ``"bf16"`` bit patterns.
    grid_choice : bool
        ``fp4`` only: code ``0b1000`` takes its group's extra value (BitMoD), chosen by a 2-bit selector.
    acc_slots : int
        Accumulators per bank: 1, or 2 (4-bit weights) so that one tile's results are read out while the
        next tile's MACs go into the other slot (the slot is bit 4 of the MAC / WRBIAS / RDMAC row field).
    mul_stages : int
        Pipeline depth of the BF16 processing unit's multipliers: 1 (default) or 2 (issue 15;
        :class:`hw.mac_unit.MacUnit`).
    tree_stages : int
        Pipeline depth of each level of its FP32 adder tree: 1 to 4 (default 2).
    acc_stages : int
        Its accumulator: 1 (default, one FP32 addition in a one-cycle loop) or ``P`` in 2 to 4 interleaved
        partial sums behind a ``P``-stage adder, combined pairwise after a MAC that carries the combine flag
        (``row`` bit :data:`COMBINE_ROW_BIT`; :mod:`hw.pim.bank`). The summation order is that
        of :func:`hw.spec.fp.accumulate` with ``stages=P`` per run of MACs between a preload and a combine.
        The device's ``tMAC`` must cover the deeper pipeline (:func:`hw.pim.bank.check_pu_timing`).
    pick_stages : int
        The memory controllers' FR-FCFS pick (issue 15): 0 (default) picks a normal request and issues its
        command in the same cycle; 1 registers the pick (computed from the countdowns as they will be one cycle
        later) and issues it the cycle after, dropping it when the command issued in between touched its bank
        or its channel-wide window (:class:`hw.memctrl_queue.Scheduler`). Normal requests take one cycle more;
        the policy is the same.
    """

    channels: int = 1
    banks: int = 16
    rows: int = 64
    columns: int = 64
    lanes: int = 16
    column_bits: int = 256
    gb_bytes: int = 2048
    af_rows: int = 1
    row_buffers: int = 1
    channel_interleave: int = 0
    weight_format: str = "bf16"
    act_format: str = "bf16"
    quant_group: int = 128
    scale_format: str = "fp16"
    grid_choice: bool = False
    acc_slots: int = 1
    mul_stages: int = 1
    tree_stages: int = 2
    acc_stages: int = 1
    pick_stages: int = 0

    def __repr__(self):
        defaults = {**LOWPREC_DEFAULTS, **PIPE_DEFAULTS, **CTRL_DEFAULTS}
        parts = [f"{f.name}={getattr(self, f.name)!r}" for f in dataclasses.fields(self)
                 if f.name not in defaults or getattr(self, f.name) != defaults[f.name]]
        return f"{type(self).__qualname__}({', '.join(parts)})"

    def __post_init__(self):
        self._pow2("channels", "banks", "rows", "columns", "lanes")
        if self.row_buffers not in (1, 2) or isinstance(self.row_buffers, bool):
            self._fail("row_buffers", "1 (AiM) or 2 (NeuPIMs dual row buffers)")
        if self.lanes < 2:
            self._fail("lanes", "a power of two of at least 2")
        if self.column_bits != self.lanes * 16:
            self._fail("column_bits", f"lanes x 16 bits = {self.lanes * 16}")
        column_bytes = self.column_bits // 8
        if not _is_int(self.gb_bytes) or self.gb_bytes < column_bytes or self.gb_bytes % column_bytes:
            self._fail("gb_bytes", f"a positive multiple of the column size ({column_bytes} bytes)")
        if self.gb_bytes > self.row_bytes:
            self._fail("gb_bytes", f"at most one row ({self.row_bytes} bytes)")
        if not _is_pow2(self.gb_bytes // column_bytes):
            self._fail("gb_bytes", "a power-of-two number of columns")
        if not _is_int(self.af_rows) or not 0 <= self.af_rows < self.rows:
            self._fail("af_rows", f"an integer in [0, rows={self.rows})")
        if self.af_rows and self.row_bytes < 128:
            self._fail("af_rows", f"0 when a row holds fewer than 16 AF segments ({self.row_bytes} bytes)")
        il = self.channel_interleave
        if not _is_int(il) or (il != 0 and not (_is_pow2(il) and column_bytes <= il <= self.row_bytes)):
            self._fail("channel_interleave", f"0 (Row-Channel-Bank-Column) or a power of two from one column "
                                             f"({column_bytes} bytes) to one row ({self.row_bytes} bytes)")
        self._check_lowprec()
        self._check_pipe()

    def _check_pipe(self):
        for name, allowed in PIPE_RANGES.items():
            value = getattr(self, name)
            if not _is_int(value) or value not in allowed:
                self._fail(name, f"an integer in {allowed[0]}..{allowed[-1]}")
        if self.lowprec:
            for name, default in PIPE_DEFAULTS.items():
                if getattr(self, name) != default:
                    self._fail(name, f"{default} with {self.weight_format} weights (the low-precision unit has "
                                     f"its own pipeline)")
        if not _is_int(self.pick_stages) or self.pick_stages not in (0, 1):
            self._fail("pick_stages", "0 (pick and issue in one cycle) or 1 (registered pick)")
        if self.acc_stages > 1 and self.row_addr_bits < 1:
            self._fail("acc_stages", "1 with a single row per bank (the MAC's row field carries the combine "
                                     "flag in bit 0)")

    @property
    def pipelined(self) -> bool:
        """The BF16 unit has interleaved partial sums (``acc_stages > 1``): MACs carry the combine flag."""
        return self.acc_stages > 1

    @property
    def combine_flag(self) -> int:
        """The ``row`` field of a combining MAC: ``1 << COMBINE_ROW_BIT`` with a pipelined unit, else 0."""
        return 1 << COMBINE_ROW_BIT if self.pipelined else 0

    def _check_lowprec(self):
        if self.weight_format not in WEIGHT_FORMATS:
            self._fail("weight_format", f"one of {', '.join(WEIGHT_FORMATS)}")
        if self.act_format not in ACT_FORMATS:
            self._fail("act_format", f"one of {', '.join(ACT_FORMATS)}")
        if self.scale_format not in SCALE_FORMATS:
            self._fail("scale_format", f"one of {', '.join(SCALE_FORMATS)}")
        if not isinstance(self.grid_choice, bool):
            self._fail("grid_choice", "True or False")
        if self.acc_slots not in (1, 2) or isinstance(self.acc_slots, bool):
            self._fail("acc_slots", "1 or 2")
        if not self.lowprec:
            for name in ("act_format", "grid_choice", "acc_slots"):
                if getattr(self, name) != LOWPREC_DEFAULTS[name]:
                    self._fail(name, f"{LOWPREC_DEFAULTS[name]!r} with bf16 weights (4-bit weights only)")
            return
        if self.grid_choice and self.weight_format != "fp4":
            self._fail("grid_choice", "False with int4 weights (the grid choice is fp4's)")
        q = self.quant_group
        if not _is_pow2(q) or q < 64:
            self._fail("quant_group", "a power of two and a multiple of 64 (the 4-bit codes of one column)")
        if self.column_bits != 256:
            self._fail("column_bits", "256 with 4-bit weights (the low-precision unit takes 64 codes per column)")
        slot_bits = 5 if self.acc_slots == 2 else 4
        if self.row_addr_bits < slot_bits:
            self._fail("rows", f"at least {1 << slot_bits} with {self.weight_format} weights and "
                               f"{self.acc_slots} accumulator slot(s): the MAC's row field carries the scale slot "
                               f"(bits 0-3)" + (" and the accumulator slot (bit 4)" if self.acc_slots == 2 else ""))
        if self.gb_columns < self.act_ratio or self.gb_slots * 64 < q:
            self._fail("gb_bytes", f"enough for one group of {q} {self.act_format} activations "
                                   f"({q // 64 * self.act_ratio * self.column_bytes} bytes) with 4-bit weights")

    # Derived values ------------------------------------------------------
    @property
    def lowprec(self) -> bool:
        """4-bit weights: the banks have the low-precision unit (:class:`hw.pim.lowprec_unit.LowPrecMacUnit`)."""
        return self.weight_format != "bf16"

    @property
    def act_ratio(self) -> int:
        """Global-buffer columns one 4-bit MAC consumes (64 activations): 4 for BF16, 2 for FP8 (1 with
        BF16 weights)."""
        if not self.lowprec:
            return 1
        return 64 * (16 if self.act_format == "bf16" else 8) // self.column_bits

    @property
    def gb_slots(self) -> int:
        """MAC-wide global-buffer slots: a MAC of column ``col`` reads slot ``col mod gb_slots``."""
        return self.gb_columns // self.act_ratio

    @property
    def column_bytes(self) -> int:
        return self.column_bits // 8

    @property
    def row_bytes(self) -> int:
        return self.columns * self.column_bytes

    @property
    def bank_bytes(self) -> int:
        return self.rows * self.row_bytes

    @property
    def channel_bytes(self) -> int:
        return self.banks * self.bank_bytes

    @property
    def total_bytes(self) -> int:
        return self.channels * self.channel_bytes

    @property
    def gb_columns(self) -> int:
        """Columns (of ``lanes`` BF16 values) in the global buffer."""
        return self.gb_bytes // self.column_bytes

    @property
    def gb_values(self) -> int:
        """BF16 values the global buffer holds: the longest input-vector chunk of one PIM tile."""
        return self.gb_bytes // 2

    @property
    def data_rows(self) -> int:
        """Rows per bank available for data (the rest hold AF tables)."""
        return self.rows - self.af_rows

    @property
    def af_segments(self) -> int:
        """Activation-function LUT segments in one reserved row: (slope, intercept) FP32 pairs.

        The segments split [-8, 8) evenly; inputs outside use the end segments' lines."""
        return self.row_bytes // 8

    @property
    def af_scale_log2(self) -> int:
        """Segment index = floor(x * 2**af_scale_log2) + af_segments / 2 (clamped)."""
        return (self.af_segments // 16).bit_length() - 1

    @property
    def banks_per_word(self) -> int:
        """FP32 accumulators packed in one column word (WRBIAS, RDMAC, RDAF)."""
        return self.column_bits // 32

    @property
    def acc_groups(self) -> int:
        """Column words needed to read or preload every bank's accumulator."""
        return -(-self.banks // self.banks_per_word)

    @property
    def interleave_columns(self) -> int:
        """Columns of a channel's run of consecutive addresses inside one bank row (``columns`` when
        ``channel_interleave`` is 0 or one row)."""
        return self.channel_interleave // self.column_bytes if self.channel_interleave else self.columns

    # Address bit widths (the fields of hw.memif.AddressMap; their order depends on channel_interleave).
    @property
    def column_offset_bits(self) -> int:
        return (self.column_bytes - 1).bit_length()

    @property
    def column_addr_bits(self) -> int:
        return (self.columns - 1).bit_length()

    @property
    def bank_addr_bits(self) -> int:
        return (self.banks - 1).bit_length()

    @property
    def channel_addr_bits(self) -> int:
        return (self.channels - 1).bit_length()

    @property
    def row_addr_bits(self) -> int:
        return (self.rows - 1).bit_length()

    @property
    def addr_bits(self) -> int:
        """Byte-address width of the whole device memory."""
        return (self.total_bytes - 1).bit_length()


@dataclass(frozen=True)
class DramTiming(_Checked):
    """DRAM timing constraints in command-clock cycles.

    Row timings (``tRCD*``, ``tRP``, ``tRAS``, ``tWR``, ``tRTP``) are per bank;
    ``tRRD`` and ``tFAW`` limit activations across banks of a channel; ``tCCD``
    is the column-command spacing (RD, WR, MAC, WRGB); ``tRFC`` is the
    all-bank refresh time and ``tREFI`` the average refresh interval. A channel
    that goes ``refresh_deadline`` cycles without REF violates refresh.
    """

    tRCDRD: int = 4
    tRCDWR: int = 3
    tRP: int = 4
    tRAS: int = 6
    tCCD: int = 1
    tRRD: int = 1
    tFAW: int = 4
    tWR: int = 4
    tRTP: int = 2
    tRFC: int = 12
    tREFI: int = 400
    tRL: int = 2
    """Read latency: cycles from RD/RDMAC/RDAF to its data on the bus."""
    tMAC: int = 11
    """PIM MAC latency: cycles from a MAC command until WRBIAS, RDMAC or AF may
    touch the accumulators (the processing unit's pipeline depth; the RTL
    refuses a value below its own depth)."""
    tAF: int = 5
    """Activation-function latency: cycles from AF until RDAF may read its result."""
    refresh_postpone: int = 8
    """REF commands that may be postponed (JEDEC allows 8): the deadline is
    ``tREFI * (refresh_postpone + 1)`` cycles after the previous REF."""

    def __post_init__(self):
        self._at_least(1, "tRCDRD", "tRCDWR", "tRP", "tRAS", "tCCD", "tRRD", "tFAW", "tWR",
                       "tRTP", "tRFC", "tREFI", "tRL", "tMAC", "tAF", unit=" cycle")
        self._at_least(0, "refresh_postpone")
        if self.tFAW < self.tRRD:
            self._fail("tFAW", f"at least tRRD={self.tRRD}")
        if self.tREFI <= self.tRFC:
            self._fail("tREFI", f"greater than tRFC={self.tRFC}")

    @property
    def tRC(self) -> int:
        return self.tRAS + self.tRP

    @property
    def refresh_deadline(self) -> int:
        return self.tREFI * (self.refresh_postpone + 1)

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


# Pipeline depths of the systolic array's processing elements (issue 15; :class:`hw.npu.systolic.ProcessingElement`)
# and their defaults (today's one-stage PE). Left out of ``repr`` at their defaults, as PimGeometry's above.
PE_PIPE_DEFAULTS = {"pe_mul_stages": 1, "pe_add_stages": 1}
PE_PIPE_RANGES = {"pe_mul_stages": (1, 2, 3), "pe_add_stages": (1, 2, 3, 4, 5, 6, 7, 8)}
# Pipeline depth of the vector unit's row accumulator (issue 15; :class:`hw.npu.vector_reduce.VectorReduce`) and its
# default (today's one-cycle accumulator). Left out of ``repr`` at its default, as the PE depths above.
VEC_PIPE_DEFAULTS = {"vec_acc_stages": 1}
VEC_PIPE_RANGES = {"vec_acc_stages": (1, 2, 3, 4)}


@dataclass(frozen=True, repr=False)
class NpuConfig(_Checked):
    """NPU sizes.

    Parameters
    ----------
    array_rows, array_cols : int
        Systolic array shape (processing elements).
    macs_per_pe : int
        MACs per processing element (the paper's PE does 4); the RTL array has 1.
    vector_lanes : int
        FP32 lanes of the vector unit.
    act_spm_words, wgt_spm_words, acc_spm_words : int
        Scratchpad depths in words of one array row/column of BF16 (act, wgt)
        or FP32 (acc) values.
    cores : int
        NPU cores sharing the PIM channels (projection only; the RTL has one).
    vector_spm_words : int
        Depth of the vector unit's scratchpad in words of ``vector_lanes`` FP32 values.
    pe_mul_stages, pe_add_stages : int
        Pipeline depths of every processing element's BF16 multiplier (1 or 2; 3 without a DSP block) and FP32
        adder (1 to 8; issue 15): the partial sums move one array row every ``pe_add_stages`` cycles, the array's
        latency is :func:`hw.spec.pipeline.array_latency` (``R + C`` at the defaults, 1 and 1). The numerics do
        not change.
    vec_acc_stages : int
        The vector unit's row accumulator (issue 15): 1 (default) one FP32 addition per beat in a one-cycle loop;
        ``P`` in 2 to 4: ``P`` interleaved partial sums behind a ``P``-stage FP32 adder, combined pairwise at the
        row's end (:class:`hw.npu.vector_reduce.VectorReduce`). Changes the order of a row's sum (the golden
        :func:`sim.golden.vector.row_sum` with ``acc_stages=P``) and the reduction latency
        (:func:`hw.spec.vector_isa.reduce_latency`).
    """

    array_rows: int = 4
    array_cols: int = 4
    macs_per_pe: int = 1
    vector_lanes: int = 4
    act_spm_words: int = 1024
    wgt_spm_words: int = 1024
    acc_spm_words: int = 1024
    cores: int = 1
    vector_spm_words: int = 1024
    pe_mul_stages: int = 1
    pe_add_stages: int = 1
    vec_acc_stages: int = 1

    def __repr__(self):
        defaults = {**PE_PIPE_DEFAULTS, **VEC_PIPE_DEFAULTS}
        parts = [f"{f.name}={getattr(self, f.name)!r}" for f in dataclasses.fields(self)
                 if f.name not in defaults or getattr(self, f.name) != defaults[f.name]]
        return f"{type(self).__qualname__}({', '.join(parts)})"

    def __post_init__(self):
        self._at_least(1, "array_rows", "array_cols", "macs_per_pe", "cores")
        for name, allowed in {**PE_PIPE_RANGES, **VEC_PIPE_RANGES}.items():
            value = getattr(self, name)
            if not _is_int(value) or value not in allowed:
                self._fail(name, f"an integer in {allowed[0]}..{allowed[-1]}")
        self._pow2("vector_lanes")
        for name in ("act_spm_words", "wgt_spm_words", "acc_spm_words", "vector_spm_words"):
            self._pow2(name)
        if self.act_spm_words < self.array_rows:
            self._fail("act_spm_words", f"at least array_rows={self.array_rows}")
        if self.wgt_spm_words < self.array_rows:
            self._fail("wgt_spm_words", f"at least array_rows={self.array_rows}")
        if self.acc_spm_words < self.array_rows:
            self._fail("acc_spm_words", f"at least array_rows={self.array_rows}")

    @property
    def peak_macs_per_cycle(self) -> int:
        return self.array_rows * self.array_cols * self.macs_per_pe


@dataclass(frozen=True)
class Clocks(_Checked):
    """Clock frequencies in MHz. The RTL runs one clock domain at ``pim_mhz``."""

    npu_mhz: float = 1000.0
    pim_mhz: float = 1000.0
    host_link_gbps: float = 64.0
    """Host link bandwidth in GB/s (PCIe 5.0 x16 is about 64 GB/s per direction)."""

    def __post_init__(self):
        for name in ("npu_mhz", "pim_mhz", "host_link_gbps"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or isinstance(value, bool) or not value > 0 \
                    or not math.isfinite(value):
                self._fail(name, "a positive finite number")


@dataclass(frozen=True)
class SramPimConfig(_Checked):
    """The SRAM-PIM attention unit (HPIM, issue 20; :class:`hw.npu.sram_pim.SramPimUnit`) behind its queue
    (:mod:`hw.npu.spu`). Optional: ``SystemConfig.spu`` is ``None`` in every preset without ``-hpim``.

    Parameters
    ----------
    macros, rows, word_lanes, mac_lanes, read_latency : int
        The unit's parameters (:class:`hw.npu.sram_pim.SramPimUnit`: ``macros`` SRAM macros of ``rows``
        rows of ``word_lanes`` BF16, ``mac_lanes`` multipliers per macro, ``read_latency`` cycles).
    units : int
        Units per system (one per NPU core in the projection; the RTL SoC has one).
    """

    macros: int = 4
    rows: int = 64
    word_lanes: int = 64
    mac_lanes: int = 16
    read_latency: int = 1
    units: int = 1

    def __post_init__(self):
        self._pow2("macros", "word_lanes", "mac_lanes", "units")
        if self.mac_lanes < 2 or self.mac_lanes > self.word_lanes:
            self._fail("mac_lanes", f"a power of two in 2..word_lanes={self.word_lanes}")
        if self.macros > self.mac_lanes:
            self._fail("macros", f"at most mac_lanes={self.mac_lanes} (a group's scores leave in one beat)")
        if self.word_lanes < 16:
            self._fail("word_lanes", "a power of two of at least 16 (a line is whole 32-byte columns)")
        if not _is_int(self.rows) or not 2 <= self.rows <= 65536:
            self._fail("rows", "an integer in 2..65536")
        if not _is_int(self.read_latency) or not 1 <= self.read_latency <= 8:
            self._fail("read_latency", "an integer in 1..8")

    @property
    def lines(self) -> int:
        return self.macros * self.rows

    @property
    def line_bytes(self) -> int:
        return 2 * self.word_lanes


@dataclass(frozen=True)
class SystemConfig:
    """The whole system: PIM geometry, DRAM timing, NPU and clocks (and an optional SRAM-PIM unit, ``spu``)."""

    name: str = "custom"
    pim: PimGeometry = field(default_factory=PimGeometry)
    timing: DramTiming = field(default_factory=DramTiming)
    npu: NpuConfig = field(default_factory=NpuConfig)
    clocks: Clocks = field(default_factory=Clocks)
    spu: SramPimConfig | None = None

    def __repr__(self):
        # ``spu`` is left out while it is None, so that every configuration without the unit keeps its repr (the
        # Verilog module names and build-cache keys derive from it).
        parts = [f"{f.name}={getattr(self, f.name)!r}" for f in dataclasses.fields(self)
                 if f.name != "spu" or self.spu is not None]
        return f"{type(self).__qualname__}({', '.join(parts)})"

    def __post_init__(self):
        for name, cls in (("pim", PimGeometry), ("timing", DramTiming), ("npu", NpuConfig),
                          ("clocks", Clocks)):
            if not isinstance(getattr(self, name), cls):
                raise ConfigError("SystemConfig", name, getattr(self, name), f"a {cls.__name__}")
        if self.pim.gb_values < self.npu.vector_lanes:
            raise ConfigError("SystemConfig", "pim.gb_bytes", self.pim.gb_bytes,
                              f"large enough for one vector of {self.npu.vector_lanes} lanes")
        if self.spu is not None:
            if not isinstance(self.spu, SramPimConfig):
                raise ConfigError("SystemConfig", "spu", self.spu, "None or a SramPimConfig")
            # The queue's operand reader takes one scratchpad row per operand beat and the result writer writes
            # one result beat (up to mac_lanes FP32) into one row (hw.npu.spu).
            row_bits = max(32 * self.npu.vector_lanes, 256)
            if 32 * self.spu.mac_lanes > row_bits:
                raise ConfigError("SystemConfig", "spu.mac_lanes", self.spu.mac_lanes,
                                  f"at most {row_bits // 32} (a result beat of mac_lanes FP32 values fits one "
                                  f"{row_bits}-bit vector-scratchpad row)")
            if self.pim.column_bits != 256:
                raise ConfigError("SystemConfig", "pim.column_bits", self.pim.column_bits,
                                  "256 with an SRAM-PIM unit (SLOAD moves 32-byte columns)")

    def replace(self, **changes) -> "SystemConfig":
        """A copy with fields changed; nested fields as ``"pim.banks"=8`` or ``pim__banks=8``.

        >>> preset("tiny").replace(**{"pim.banks": 8}).pim.banks
        8
        """
        nested: dict[str, dict] = {}
        top = {}
        for key, value in changes.items():
            key = key.replace("__", ".")
            if "." in key:
                part, sub = key.split(".", 1)
                if part not in ("pim", "timing", "npu", "clocks", "spu"):
                    raise ConfigError("SystemConfig", part, value, "one of pim, timing, npu, clocks, spu")
                if part == "spu" and self.spu is None and "spu" not in top:
                    raise ConfigError("SystemConfig", "spu", None, "a SramPimConfig before spu.* can be changed")
                nested.setdefault(part, {})[sub] = value
            else:
                top[key] = value
        for part, subchanges in nested.items():
            obj = top.get(part, getattr(self, part))
            names = {f.name for f in dataclasses.fields(obj)}
            for sub in subchanges:
                if sub not in names:
                    raise ConfigError(type(obj).__name__, sub, subchanges[sub],
                                      f"an existing field ({', '.join(sorted(names))})")
            top[part] = dataclasses.replace(obj, **subchanges)
        return dataclasses.replace(self, **top)

    # Derived system figures ---------------------------------------------
    @property
    def pim_peak_internal_gbps(self) -> float:
        """Peak internal (all-bank MAC) bandwidth in GB/s: every bank reads one column per tCCD."""
        per_bank = self.pim.column_bytes * self.clocks.pim_mhz * 1e6 / self.timing.tCCD
        return per_bank * self.pim.banks * self.pim.channels / 1e9

    @property
    def pim_peak_external_gbps(self) -> float:
        """Peak external bandwidth in GB/s: one column per tCCD per channel."""
        return self.pim.column_bytes * self.clocks.pim_mhz * 1e6 / self.timing.tCCD \
            * self.pim.channels / 1e9

    @property
    def pim_peak_gflops(self) -> float:
        """Peak PIM compute: 2 FLOP per lane per bank per MAC command."""
        return 2 * self.pim.lanes * self.pim.banks * self.pim.channels * self.clocks.pim_mhz \
            / self.timing.tCCD / 1e3

    def summary(self) -> dict:
        return {
            "name": self.name,
            "pim": dataclasses.asdict(self.pim),
            "timing": dataclasses.asdict(self.timing),
            "npu": dataclasses.asdict(self.npu),
            "clocks": dataclasses.asdict(self.clocks),
            "memory_mib": self.pim.total_bytes / 2**20,
            "pim_peak_internal_gbps": self.pim_peak_internal_gbps,
            "pim_peak_external_gbps": self.pim_peak_external_gbps,
            "pim_peak_gflops": self.pim_peak_gflops,
            **({"spu": dataclasses.asdict(self.spu)} if self.spu is not None else {}),
        }


# Timings in ns. From IANUS (ASPLOS'24) Table 1: tCCD, tRAS, tWR, tRP, tRCDRD,
# tRCDWR. Not in the paper (typical GDDR6 datasheet figures, kept as
# parameters): tRRD, tFAW, tRTP, tRFC (all-bank, 8 Gb die), tREFI, read latency.
TIMING_NS_IANUS = {
    "tCCD": 1.0,
    "tRAS": 21.0,
    "tWR": 36.0,
    "tRP": 30.0,
    "tRCDRD": 36.0,
    "tRCDWR": 24.0,
    "tRRD": 2.0,
    "tFAW": 16.0,
    "tRTP": 2.0,
    "tRFC": 210.0,
    "tREFI": 1900.0,
    "tRL": 20.0,
}


def timing_from_ns(ns: dict, clock_mhz: float, **extra) -> DramTiming:
    """Convert timings in ns to a :class:`DramTiming` in cycles of ``clock_mhz`` (rounded up)."""
    period = 1000.0 / clock_mhz
    cycles = {name: max(1, math.ceil(value / period - 1e-9)) for name, value in ns.items()}
    # tMAC and tAF are pipeline depths of the processing unit, in cycles already.
    cycles.update(extra)
    return DramTiming(**cycles)
