"""NPU vector unit: ``L`` FP32 lanes over scratchpad rows, BF16/FP32 load and store.

The unit executes one instruction at a time (:class:`VectorInstr`, arriving on
a stream) over ``rows`` rows of ``n`` elements each, reading and writing a
scratchpad through generic memory ports, and runs autonomously until it
raises ``done``.

Memory model
------------
A scratchpad word is ``L`` lanes of 32 bits. An operand in **FP32** format
holds ``L`` elements per word (element ``j`` of a word in bits
``[32 j, 32 j + 32)``); in **BF16** format ``2 L`` elements per word (element
``j`` in bits ``[16 j, 16 j + 16)``). A row of ``n`` elements starts on a word
boundary and takes ``ceil(n / slots)`` words (the *pitch*); row ``r`` of an
operand at word address ``base`` starts at ``base + r * pitch``. Writes have
one enable per 16 bits, so a partial last word, a single element or one BF16
half-word is written without touching its neighbours.

Ports (seen from the unit): ``rd_a`` and ``rd_b`` are synchronous read ports
(``addr`` and ``en`` in one cycle, ``data`` in the next), ``wr`` a write port
(``addr``, ``data`` and a ``2 L``-bit ``en``). Any scratchpad with two read
ports and one write port of ``L x 32`` bits fits (or two banks).

Instruction set
---------------
One table, :data:`hw.spec.vector_isa.ISA_TABLE` (re-exported here), names
every opcode with its code, the fields it uses and its meaning; :class:`Opcode`
is generated from it, and the golden model, the testbenches, the assembler and
the compiler read the same table.

Numerics: every loaded value is canonicalised (subnormals flushed, NaN made
``0x7FC00000``); arithmetic as in :mod:`hw.arith` and :mod:`hw.npu.fp32ext`;
stores round to BF16 (nearest even) when the destination is BF16.

Pipeline (per lane, one beat of ``L`` elements per cycle)::

    read -> load/convert -> S1 add -> S2 mul -> S3 add -> S4 function -> S5 mul -> S6 add -> write / reduce

Each stage is enabled or bypassed per (opcode, phase) from :data:`MICRO`. A
reduction (sum: :class:`hw.arith.AdderTree` over the lanes, then sequential
accumulation over the beats of a row; max: the same shape with comparisons)
follows the pipeline. Multi-pass instructions (layernorm statistics, softmax)
work on groups of up to ``row_group`` rows (default 16): each pass (and each
finalising scalar beat) runs over the group's rows back to back, every row's
reduction or scalar result is kept in a per-row register as it comes back,
and the next pass starts when the group's last row's result is in; the next
group's first pass starts as soon as the group's last pass is issued. The
pipeline and reduction latency between passes (``E + R + 1`` cycles) is then
paid once per group, not once per row: a 128-element causal-softmax row on 16
lanes costs 25 cycles plus 5.4 for its share of the group's waits instead of 112.

Timing (cycles from acceptance to ``done``; ``nb = ceil(n / L)`` beats per
row pass, ``E = 23`` cycles from issue to the lane result, ``R = 2 log2 L``
for the reduction tree; ``C = E + R + 6`` once per instruction for checking,
fill and drain; ``g = ceil(rows / row_group)``): element-wise ops, MAX and SUM
``rows * nb + C`` (rows stream back to back, one beat per cycle); LN_APPLY
``rows * (nb + 2) + C`` (two cycles to read a row's statistics); LN_STATS
``rows * (2 nb + 2) + g * (2 (E + R + 1) + E) + C``; SOFTMAX ``rows * (3 nb +
1) + g * (2 (E + R + 1) + E) + C``. The one closed form is
:func:`hw.spec.vector_isa.vector_cycles`; tests/test_vector.py holds it equal
to the RTL's cycle counter on every instruction of its programs.

Aliasing: rows stream through the pipeline, so the destination may alias
operand A (or B in ``ROW`` mode) only row for row and with a destination pitch
no larger than the source's (for example in place with the same format, or
FP32 -> BF16); B in ``VEC`` / ``COL`` mode, the stats and the mask must not
be overwritten by the same instruction. The unit does not check this.

Errors (:class:`VecError`) are detected before anything is read or written:
an instruction with an error touches no memory and finishes at once with
``done`` and the error code.
"""

from collections import namedtuple

from amaranth.hdl import (
    Array,
    Cat,
    ClockSignal,
    Const,
    DomainRenamer,
    Instance,
    Module,
    Mux,
    ResetSignal,
    Signal,
)
from amaranth.lib import data, enum, memory, stream, wiring
from amaranth.lib.wiring import In, Out

from ..arith import AdderTree, fp32_add_align, fp32_add_round
from ..clockgate import gated_domain
from ..spec.vector_isa import (  # noqa: F401  (the instruction set: used here and re-exported)
    ADDR_BITS,
    EXIT_LATENCY,
    ISA_TABLE,
    OPSPEC,
    ROW_GROUP,
    BMode,
    Fmt,
    MaskMode,
    Opcode,
    OpSpec,
    VecError,
    VectorInstr,
    encode,
)
from . import vector_tables as T
from .fp32ext import (
    Func,
    FuncUnit,
    bf16_load,
    bf16_store,
    coefficient_rom,
    delay,
    f32_load,
    fp32_add,
    fp32_mul,
    max_key,
)

__all__ = [
    "ADDR_BITS", "OpSpec", "ISA_TABLE", "Opcode", "Fmt", "BMode", "MaskMode", "VecError", "Phase",
    "VectorInstr", "encode", "MICRO", "ReadPortSignature", "WritePortSignature", "VectorLane",
    "VectorUnit", "VectorTop", "LANE_MODULE", "lane_verilog",
]

class Phase(enum.Enum, shape=3):
    """Pass of a multi-pass instruction a beat belongs to."""
    MAIN = 0
    FIN1 = 1
    PASS2 = 2
    FIN2 = 3
    PASS3 = 4


# -- micro-program: stage settings per (opcode, phase) --------------------------------------

class P1(enum.Enum, shape=1):
    """S1 addend."""
    B = 0
    NEG_S0 = 1


class Q2(enum.Enum, shape=3):
    """S2 multiplier operand."""
    B = 0
    SQUARE = 1
    IMM0 = 2
    S1 = 3
    LOG2E = 4


class R5(enum.Enum, shape=1):
    """S5 multiplier operand."""
    S1 = 0
    GAMMA = 1


Micro = namedtuple("Micro", "s1 s2 s3 s4 s5 s6", defaults=(None,) * 6)

MICRO = {
    (Opcode.ADD, Phase.MAIN): Micro(s1=P1.B),
    (Opcode.MUL, Phase.MAIN): Micro(s2=Q2.B),
    (Opcode.SCALE, Phase.MAIN): Micro(s2=Q2.IMM0, s3=True),
    (Opcode.COPY, Phase.MAIN): Micro(),
    (Opcode.EXP, Phase.MAIN): Micro(s2=Q2.LOG2E, s4=Func.EXP2),
    (Opcode.RECIP, Phase.MAIN): Micro(s4=Func.RECIP),
    (Opcode.RSQRT, Phase.MAIN): Micro(s4=Func.RSQRT),
    (Opcode.GELU, Phase.MAIN): Micro(s4=Func.GELU),
    (Opcode.MAX, Phase.MAIN): Micro(),
    (Opcode.SUM, Phase.MAIN): Micro(),
    (Opcode.LN_STATS, Phase.MAIN): Micro(),
    (Opcode.LN_STATS, Phase.FIN1): Micro(s2=Q2.IMM0),
    (Opcode.LN_STATS, Phase.PASS2): Micro(s1=P1.NEG_S0, s2=Q2.SQUARE),
    (Opcode.LN_STATS, Phase.FIN2): Micro(s2=Q2.IMM0, s3=True, s4=Func.RSQRT),
    (Opcode.LN_APPLY, Phase.MAIN): Micro(s1=P1.NEG_S0, s2=Q2.S1, s5=R5.GAMMA, s6=True),
    (Opcode.SOFTMAX, Phase.MAIN): Micro(),
    (Opcode.SOFTMAX, Phase.PASS2): Micro(s1=P1.NEG_S0, s2=Q2.LOG2E, s4=Func.EXP2),
    (Opcode.SOFTMAX, Phase.FIN2): Micro(s4=Func.RECIP),
    (Opcode.SOFTMAX, Phase.PASS3): Micro(s1=P1.NEG_S0, s2=Q2.LOG2E, s4=Func.EXP2, s5=R5.S1),
    (Opcode.KV_APPEND, Phase.MAIN): Micro(),
}
"""Stage settings per (opcode, phase); a stage that is ``None`` is bypassed."""


# -- memory ports ----------------------------------------------------------------------------------

class ReadPortSignature(wiring.Signature):
    """Synchronous scratchpad read port, requester side: ``data`` is valid the cycle after ``en``."""

    def __init__(self, addr_width: int, data_width: int):
        super().__init__({"addr": Out(addr_width), "en": Out(1), "data": In(data_width)})


class WritePortSignature(wiring.Signature):
    """Scratchpad write port, requester side, one enable bit per 16 data bits."""

    def __init__(self, addr_width: int, data_width: int):
        super().__init__({"addr": Out(addr_width), "data": Out(data_width), "en": Out(data_width // 16)})


# -- one lane --------------------------------------------------------------------------------------

class VectorLane(wiring.Component):
    """One FP32 lane of the vector unit: six stages, each enabled or bypassed.

    ``t1 = en1 ? x + p1 : x``; ``t2 = en2 ? t1 * (sq2 ? t1 : q2) : t1``;
    ``t3 = en3 ? t2 + c3 : t2``; ``t4 = en4 ? func(t3) : t3``;
    ``t5 = en5 ? t4 * r5 : t4``; ``y = en6 ? t5 + c6 : t5``.

    Each stage's controls and operand are sampled when that stage's input is:
    at offsets ``S1 = 0``, ``S2 = 2``, ``S3 = 4``, ``S4 = 6``, ``S5 = 6 + F``,
    ``S6 = 8 + F`` cycles after ``x`` (``F = FuncUnit.latency``); ``y`` comes
    ``latency = 10 + F`` cycles after ``x``.
    """

    OFFSETS = dict(s1=0, s2=2, s3=4, s4=6, s5=6 + FuncUnit.latency, s6=8 + FuncUnit.latency)
    latency = 10 + FuncUnit.latency

    def __init__(self):
        super().__init__({
            "x": In(32),
            "en1": In(1), "p1": In(32),
            "en2": In(1), "sq2": In(1), "q2": In(32),
            "en3": In(1), "c3": In(32),
            "en4": In(1), "func": In(Func),
            "en5": In(1), "r5": In(32),
            "en6": In(1), "c6": In(32),
            "y": Out(32),
            "rom_addr": Out(range(T.ROM_DEPTH)), "rom_data": In(96),
        })

    def elaborate(self, platform):
        m = Module()

        def stage(value, en, result, lat, name):
            out = Signal(32, name=f"{name}_out")
            m.d.comb += out.eq(Mux(delay(m, en, lat, f"{name}_en"), result, delay(m, value, lat, f"{name}_by")))
            return out

        t1 = stage(self.x, self.en1, fp32_add(m, self.x, self.p1, "s1"), 2, "s1")
        t2 = stage(t1, self.en2, fp32_mul(m, t1, Mux(self.sq2, t1, self.q2), "s2"), 2, "s2")
        t3 = stage(t2, self.en3, fp32_add(m, t2, self.c3, "s3"), 2, "s3")
        m.submodules.func = fu = FuncUnit()
        m.d.comb += [fu.x.eq(t3), fu.func.eq(self.func), self.rom_addr.eq(fu.rom_addr),
                     fu.rom_data.eq(self.rom_data)]
        t4 = stage(t3, self.en4, fu.y, FuncUnit.latency, "s4")
        t5 = stage(t4, self.en5, fp32_mul(m, t4, self.r5, "s5"), 2, "s5")
        t6 = stage(t5, self.en6, fp32_add(m, t5, self.c6, "s6"), 2, "s6")
        m.d.comb += self.y.eq(t6)
        return m


LANE_MODULE = "vector_lane"


def lane_verilog() -> str:
    """Verilog of one :class:`VectorLane` as module ``vector_lane`` (for ``lane_instance=True``)."""
    from amaranth.back import verilog

    return verilog.convert(VectorLane(), name=LANE_MODULE, emit_src=False)


# -- the unit ----------------------------------------------------------------------------------------

def _check_pow2(what, value, minimum=1):
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum or value & (value - 1):
        raise ValueError(f"{what} must be a power of two of at least {minimum}, not {value!r}")


def _ceil_shift(value, k):
    return (value + ((1 << k) - 1)) >> k


class VectorUnit(wiring.Component):
    """The vector unit.

    Parameters
    ----------
    lanes : int
        FP32 lanes ``L`` (power of two, at least 2): a scratchpad word is ``L x 32`` bits.
    depth : int
        Scratchpad words reachable through the ports; any region ending beyond
        it is a ``BAD_ADDRESS`` error.
    max_n : int
        Longest row (elements); a longer ``n`` is a ``BAD_LENGTH`` error.
    lane_instance : bool
        Instantiate the lanes as ``Instance("vector_lane")`` of a separately
        converted :class:`VectorLane` (:func:`lane_verilog`) instead of
        elaborating ``L`` copies: the simulator then compiles one lane module
        for all ``L`` instances (a 16-lane Verilator build is several times
        smaller). Not for Amaranth's own simulator.
    clock_gate : bool
        Clock the lanes through a clock gate that is open while a beat is in
        them (simulation builds; :mod:`hw.clockgate`).
    row_group : int
        Rows a multi-pass instruction (SOFTMAX, LN_STATS) works on at once
        (default :data:`hw.spec.vector_isa.ROW_GROUP`): each pass runs over
        the group's rows back to back, so the pipeline and reduction latency
        between passes is paid once per group instead of once per row. Costs
        three 32-bit registers per row of the group.

    Members
    -------
    instr : In(stream.Signature(VectorInstr))
        Accepted (``ready``) only while idle.
    rd_a, rd_b : Out(ReadPortSignature)
    wr : Out(WritePortSignature)
    busy : Out(1)
        From the cycle after an instruction is accepted until ``done``.
    done : Out(1)
        One-cycle pulse when an instruction finishes (with or without error).
    error : Out(VecError)
        Error code of the last finished instruction.
    cycles : Out(32)
        Cycles since the current (or last) instruction was accepted, up to its ``done``.
    """

    def __init__(self, lanes: int = 16, depth: int = 4096, max_n: int = 4096, lane_instance: bool = False,
                 clock_gate: bool = False, row_group: int = ROW_GROUP):
        _check_pow2("Lanes", lanes, 2)
        if not isinstance(row_group, int) or isinstance(row_group, bool) or not 1 <= row_group <= 256:
            raise ValueError(f"Row group must be an integer in 1..256, not {row_group!r}")
        self._row_group = row_group
        self._lane_instance = bool(lane_instance)
        self._clock_gate = bool(clock_gate)
        if not isinstance(depth, int) or isinstance(depth, bool) or not 1 <= depth <= 1 << ADDR_BITS:
            raise ValueError(f"Depth must be an integer in 1..2**{ADDR_BITS}, not {depth!r}")
        if not isinstance(max_n, int) or isinstance(max_n, bool) or not 1 <= max_n < 1 << 16:
            raise ValueError(f"Maximum row length must be an integer in 1..65535, not {max_n!r}")
        self._lanes = lanes
        self._depth = depth
        self._max_n = max_n
        self._aw = max(1, (depth - 1).bit_length())
        width = 32 * lanes
        super().__init__({
            "instr": In(stream.Signature(VectorInstr)),
            "rd_a": Out(ReadPortSignature(self._aw, width)),
            "rd_b": Out(ReadPortSignature(self._aw, width)),
            "wr": Out(WritePortSignature(self._aw, width)),
            "busy": Out(1),
            "done": Out(1),
            "error": Out(VecError),
            "cycles": Out(32),
        })

    @classmethod
    def from_config(cls, cfg, depth=None, **kwargs):
        """The vector unit of a :class:`hw.config.SystemConfig`: ``cfg.npu.vector_lanes`` lanes over
        ``depth`` words (default: the activation scratchpad's ``act_spm_words``)."""
        return cls(cfg.npu.vector_lanes, cfg.npu.act_spm_words if depth is None else depth, **kwargs)

    @property
    def lanes(self) -> int:
        return self._lanes

    @property
    def depth(self) -> int:
        return self._depth

    @property
    def max_n(self) -> int:
        return self._max_n

    @property
    def row_group(self) -> int:
        return self._row_group

    @property
    def addr_width(self) -> int:
        return self._aw

    # Timing, in cycles after a beat is issued (its read address on ``rd_a``).
    LOAD = 2                                          # data registered after load/convert
    EXIT = LOAD + VectorLane.latency                  # lane result valid (write / reduce input)
    assert EXIT == EXIT_LATENCY, "hw.spec.vector_isa.EXIT_LATENCY must follow the pipeline"

    @property
    def tree_latency(self) -> int:
        return 2 * (self._lanes.bit_length() - 1)

    @property
    def drain_cycles(self) -> int:
        """Cycles after the last issue until every write of an instruction has happened."""
        return self.EXIT + self.tree_latency + 3

    def elaborate(self, platform):
        m = Module()
        L = self._lanes
        lg = L.bit_length() - 1
        aw = self._aw

        ins = Signal(VectorInstr)
        op = ins.op

        # ---- derived sizes ---------------------------------------------------------------
        n = ins.n
        nb = Signal(16)                 # beats per row pass
        m.d.comb += nb.eq(_ceil_shift(n, lg))

        def pitch(fmt):                 # words per row in a format
            return Mux(fmt == Fmt.BF16, _ceil_shift(n, lg + 1), nb)

        def slots_log(fmt):
            return Mux(fmt == Fmt.BF16, lg + 1, lg)

        pitch_a, pitch_b, pitch_d = Signal(16), Signal(16), Signal(16)
        mpitch = Signal(16)
        m.d.comb += [pitch_a.eq(pitch(ins.a_fmt)), pitch_b.eq(pitch(ins.b_fmt)), pitch_d.eq(pitch(ins.d_fmt)),
                     mpitch.eq(_ceil_shift(n, lg + 5))]
        uses_b = op.as_value().matches(Opcode.ADD, Opcode.MUL)
        b_mem = uses_b & (ins.b_mode != BMode.IMM)

        # ---- error check (combinational on the latched instruction) -----------------------
        rows = ins.rows
        depth = self._depth
        err = Signal(VecError)
        end_a = Signal(50)
        end_b = Signal(50)
        end_d = Signal(50)
        end_x = Signal(50)
        m.d.comb += end_a.eq(ins.a + rows * pitch_a)
        with m.If(op == Opcode.LN_APPLY):
            m.d.comb += end_b.eq(ins.b + nb)
        with m.Elif(b_mem & (ins.b_mode == BMode.ROW)):
            m.d.comb += end_b.eq(ins.b + rows * pitch_b)
        with m.Elif(b_mem & (ins.b_mode == BMode.VEC)):
            m.d.comb += end_b.eq(ins.b + pitch_b)
        with m.Elif(b_mem & (ins.b_mode == BMode.COL)):
            m.d.comb += end_b.eq(ins.b + Mux(ins.b_fmt == Fmt.BF16, _ceil_shift(rows, lg + 1),
                                             _ceil_shift(rows, lg)))
        with m.If(op.as_value().matches(Opcode.MAX, Opcode.SUM)):
            m.d.comb += end_d.eq(ins.d + Mux(ins.d_fmt == Fmt.BF16, _ceil_shift(rows, lg + 1),
                                             _ceil_shift(rows, lg)))
        with m.Elif(op == Opcode.LN_STATS):
            m.d.comb += end_d.eq(ins.d + _ceil_shift(rows << 1, lg))
        with m.Elif(op == Opcode.KV_APPEND):
            m.d.comb += end_d.eq(ins.d + ins.imm0 * pitch_d)
        with m.Else():
            m.d.comb += end_d.eq(ins.d + rows * pitch_d)
        with m.If(op == Opcode.LN_APPLY):
            m.d.comb += end_x.eq(ins.aux + _ceil_shift(rows << 1, lg))
        with m.Elif((op == Opcode.SOFTMAX) & (ins.mask == MaskMode.BITMAP)):
            m.d.comb += end_x.eq(ins.aux + rows * mpitch)

        valid_op = Signal()
        m.d.comb += valid_op.eq(op.as_value().matches(*Opcode))
        with m.If(~valid_op):
            m.d.comb += err.eq(VecError.BAD_OPCODE)
        with m.Elif((n == 0) | (n > self._max_n) | (rows == 0)):
            m.d.comb += err.eq(VecError.BAD_LENGTH)
        with m.Elif((ins.mask.as_value() == 3) | ((ins.mask != MaskMode.NONE) & (op != Opcode.SOFTMAX))
                    | ((op == Opcode.LN_STATS) & (ins.d_fmt == Fmt.BF16))):
            m.d.comb += err.eq(VecError.BAD_MODE)
        with m.Elif((end_a > depth) | (end_b > depth) | (end_d > depth) | (end_x > depth)):
            m.d.comb += err.eq(VecError.BAD_ADDRESS)
        with m.Elif((op == Opcode.KV_APPEND) & ((ins.pos + rows) > ins.imm0)):
            m.d.comb += err.eq(VecError.KV_OVERFLOW)

        # ---- sequencer state -----------------------------------------------------------------
        row = Signal(16)
        beat = Signal(16)
        phase = Signal(Phase)
        a_row = Signal(ADDR_BITS + 1)
        b_row = Signal(ADDR_BITS + 1)
        d_row = Signal(48)
        x_row = Signal(ADDR_BITS + 1)
        s0 = Signal(32)             # LN_APPLY: the row's statistics
        s1 = Signal(32)
        # Multi-pass instructions (SOFTMAX, LN_STATS) run each pass over a group of up to G rows: ``ri`` is
        # the row's index in the group, ``gsz`` the group's size, ``g_*`` the group's first-row pointers.
        # Per row of the group: s0 (max or mean), s1 (1 / sum), sv (the reduction a scalar beat finalises).
        G = self._row_group
        multi = op.as_value().matches(Opcode.SOFTMAX, Opcode.LN_STATS)
        ri = Signal(range(max(2, G)))
        gsz = Signal(range(G + 1))
        g_a = Signal(ADDR_BITS + 1)
        g_d = Signal(48)
        g_x = Signal(ADDR_BITS + 1)
        glast = Signal()
        m.d.comb += glast.eq(ri == gsz - 1)
        s0a = Array(Signal(32, name=f"s0_g{k}") for k in range(G))
        s1a = Array(Signal(32, name=f"s1_g{k}") for k in range(G))
        sva = Array(Signal(32, name=f"sv_g{k}") for k in range(G))
        sval = Signal(32)           # lane-0 input of a scalar (finalising) beat, registered from issue
        m.d.sync += sval.eq(sva[ri])
        drain = Signal(range(self.drain_cycles + 1))
        cycles = Signal(32)
        busy = Signal()
        m.d.comb += [self.busy.eq(busy), self.cycles.eq(cycles)]
        with m.If(busy):
            m.d.sync += cycles.eq(cycles + 1)

        # Issue interface for this cycle (combinational, defaults: nothing issued).
        issue = Signal()
        iscalar = Signal()
        iwr = Signal()          # write the lane results (or the scalar) at exit
        ired = Signal()         # reduce this beat
        ifin = Signal()         # reduction result is written (MAX/SUM) after the last beat
        iwr_addr = Signal(48)
        iwr_en = Signal(2 * L)
        ilast = beat == nb - 1
        rem = n[0:lg]
        lane_valid = Signal(L)
        for ln in range(L):
            m.d.comb += lane_valid[ln].eq(~ilast | (rem == 0) | (ln < rem))

        # Stats read of LN_APPLY (at the start of a row), on rd_a.
        stats_rd = Signal()

        # Acc/scalar results coming back (``*_ok``: the result of the group's last row in this pass).
        acc_done = Signal()
        acc_val = Signal(32)
        acc_ok = Signal()
        sc_done = Signal()
        sc_val = Signal(32)
        sc_ok = Signal()

        # Element-write helpers.
        def elem_write(elem, fmt_bf16):
            addr = Mux(fmt_bf16, ins.d + (elem >> (lg + 1)), ins.d + (elem >> lg))
            slot_f = elem[0:lg]
            slot_h = elem[0:lg + 1]
            en = Signal(2 * L, name="elem_en")
            m.d.comb += en.eq(Mux(fmt_bf16, Const(1, 2 * L) << slot_h, Const(3, 2 * L) << (slot_f << 1)))
            return addr, en

        def vec_write():
            half = beat[0]
            bf = ins.d_fmt == Fmt.BF16
            addr = d_row + Mux(bf, beat >> 1, beat)
            en_f = Cat(*[Cat(lane_valid[ln], lane_valid[ln]) for ln in range(L)])
            en_h = Mux(half, Cat(Const(0, L), lane_valid), Cat(lane_valid, Const(0, L)))
            return addr, Mux(bf, en_h, en_f)

        def next_row():
            last_row = row == rows - 1
            m.d.sync += [
                row.eq(row + 1), beat.eq(0), phase.eq(Phase.MAIN),
                a_row.eq(a_row + pitch_a),
                b_row.eq(b_row + pitch_b),
                d_row.eq(d_row + pitch_d),
                x_row.eq(x_row + mpitch),
            ]
            with m.If(last_row):
                m.next = "Drain"
                m.d.sync += drain.eq(self.drain_cycles)
            with m.Elif(op == Opcode.LN_APPLY):
                m.next = "Stats-Read"
            with m.Else():
                m.next = "Issue"

        def advance():
            """Multi-pass instructions: the current row's pass (or scalar beat) is issued."""
            step = [beat.eq(0), a_row.eq(a_row + pitch_a), d_row.eq(d_row + pitch_d), x_row.eq(x_row + mpitch)]
            with m.If(~glast):                       # the next row of the group, same pass
                m.d.sync += [ri.eq(ri + 1), row.eq(row + 1), *step]
            with m.Elif((phase == Phase.PASS3) | ((op == Opcode.LN_STATS) & (phase == Phase.FIN2))):
                rest = Signal(17)                    # the group's last pass is issued: the next group
                m.d.comb += rest.eq(rows - row - 1)
                m.d.sync += [ri.eq(0), row.eq(row + 1), phase.eq(Phase.MAIN), *step,
                             g_a.eq(a_row + pitch_a), g_d.eq(d_row + pitch_d), g_x.eq(x_row + mpitch),
                             gsz.eq(Mux(rest > G, G, rest))]
                with m.If(row == rows - 1):
                    m.next = "Drain"
                    m.d.sync += drain.eq(self.drain_cycles)
                with m.Else():
                    m.next = "Issue"
            with m.Else():                           # back to the group's first row for the next pass
                m.d.sync += [ri.eq(0), row.eq(row - ri), beat.eq(0), a_row.eq(g_a), d_row.eq(g_d), x_row.eq(g_x)]
                with m.If(phase.as_value().matches(Phase.MAIN, Phase.PASS2)):
                    m.next = "Wait-Reduction"
                with m.Else():
                    m.next = "Wait-Scalar"

        m.d.comb += self.instr.ready.eq(0)
        with m.FSM(name="seq"):
            with m.State("Idle"):
                m.d.comb += self.instr.ready.eq(1)
                with m.If(self.instr.valid):
                    m.d.sync += [ins.eq(self.instr.payload), busy.eq(1), cycles.eq(0)]
                    m.next = "Check"
            with m.State("Check"):
                m.d.sync += [
                    row.eq(0), beat.eq(0), phase.eq(Phase.MAIN),
                    a_row.eq(ins.a), b_row.eq(ins.b), x_row.eq(ins.aux),
                    d_row.eq(ins.d + Mux(op == Opcode.KV_APPEND, ins.pos * pitch_d, 0)),
                    ri.eq(0), gsz.eq(Mux(rows > G, G, rows)), g_a.eq(ins.a), g_d.eq(ins.d), g_x.eq(ins.aux),
                ]
                with m.If(err != VecError.NONE):
                    m.d.sync += [self.error.eq(err)]
                    m.next = "Done"
                with m.Else():
                    m.d.sync += self.error.eq(VecError.NONE)
                    m.next = "Route"
            with m.State("Route"):
                with m.If(op == Opcode.LN_APPLY):
                    m.next = "Stats-Read"
                with m.Else():
                    m.next = "Issue"
            with m.State("Stats-Read"):
                m.d.comb += stats_rd.eq(1)
                m.next = "Stats-Capture"
            with m.State("Stats-Capture"):
                slot = row[0:lg - 1] if lg > 1 else Const(0, 1)
                word = self.rd_a.data
                pair = Signal(64)
                m.d.comb += pair.eq(word.word_select(slot, 64))
                m.d.sync += [s0.eq(pair[0:32]), s1.eq(pair[32:64])]
                m.next = "Issue"
            with m.State("Issue"):
                # One beat (or one scalar beat) per cycle.
                m.d.comb += issue.eq(1)
                with m.Switch(phase):
                    with m.Case(Phase.MAIN, Phase.PASS2, Phase.PASS3):
                        reducing = ((op.as_value().matches(Opcode.MAX, Opcode.SUM, Opcode.LN_STATS, Opcode.SOFTMAX)
                                     & (phase == Phase.MAIN))
                                    | (op.as_value().matches(Opcode.LN_STATS, Opcode.SOFTMAX) & (phase == Phase.PASS2)))
                        m.d.comb += [ired.eq(reducing), iwr.eq(~reducing)]
                        with m.If(op.as_value().matches(Opcode.MAX, Opcode.SUM)):
                            addr, en = elem_write(row, ins.d_fmt == Fmt.BF16)
                            m.d.comb += [ifin.eq(ilast), iwr_addr.eq(addr), iwr_en.eq(en)]
                        with m.Else():
                            addr, en = vec_write()
                            m.d.comb += [iwr_addr.eq(addr), iwr_en.eq(en)]
                        m.d.sync += beat.eq(beat + 1)
                        with m.If(ilast):
                            m.d.sync += beat.eq(0)
                            with m.If(multi):
                                advance()
                            with m.Else():
                                next_row()
                    with m.Case(Phase.FIN1, Phase.FIN2):
                        m.d.comb += iscalar.eq(1)
                        with m.If(op == Opcode.LN_STATS):
                            addr, en = elem_write(Cat(phase == Phase.FIN2, row), 0)
                            m.d.comb += [iwr.eq(1), iwr_addr.eq(addr), iwr_en.eq(en)]
                        advance()
            with m.State("Wait-Reduction"):
                # The results are kept per row (s0a / sva, below) as they come back.
                with m.If(acc_ok):
                    with m.If((op == Opcode.SOFTMAX) & (phase == Phase.MAIN)):
                        m.d.sync += phase.eq(Phase.PASS2)
                    with m.Elif(phase == Phase.MAIN):
                        m.d.sync += phase.eq(Phase.FIN1)
                    with m.Else():
                        m.d.sync += phase.eq(Phase.FIN2)
                    m.next = "Issue"
            with m.State("Wait-Scalar"):
                with m.If(sc_ok):
                    with m.If(phase == Phase.FIN1):
                        m.d.sync += phase.eq(Phase.PASS2)
                    with m.Else():
                        m.d.sync += phase.eq(Phase.PASS3)
                    m.next = "Issue"
            with m.State("Drain"):
                m.d.sync += drain.eq(drain - 1)
                with m.If(drain == 0):
                    m.next = "Done"
            with m.State("Done"):
                m.d.comb += self.done.eq(1)
                m.d.sync += busy.eq(0)
                m.next = "Idle"

        # ---- read requests ---------------------------------------------------------------------
        a_bf = ins.a_fmt == Fmt.BF16
        with m.If(stats_rd):
            m.d.comb += [self.rd_a.addr.eq((ins.aux + (row >> (lg - 1)))[0:aw]),
                         self.rd_a.en.eq(1)]
        with m.Elif(issue & ~iscalar):
            m.d.comb += [self.rd_a.addr.eq((a_row + Mux(a_bf, beat >> 1, beat))[0:aw]), self.rd_a.en.eq(1)]

        # B requests: address, enable, half / slot; delayed to meet the consuming stage.
        breq_layout = data.StructLayout({"addr": aw, "en": 1, "sel": 16})
        breq = Signal(breq_layout)
        b_bf = ins.b_fmt == Fmt.BF16
        causal_vis = Signal(L)
        for ln in range(L):
            m.d.comb += causal_vis[ln].eq(Cat(Const(ln, lg), beat) <= row + ins.pos)
        with m.If(issue & ~iscalar):
            with m.If(op == Opcode.SOFTMAX):
                with m.If(ins.mask == MaskMode.BITMAP):
                    m.d.comb += [breq.addr.eq((x_row + (beat >> 5))[0:aw]), breq.en.eq(1), breq.sel.eq(beat[0:5])]
            with m.Elif(op == Opcode.LN_APPLY):
                m.d.comb += [breq.addr.eq((ins.b + beat)[0:aw]), breq.en.eq(1)]
            with m.Elif(b_mem):
                with m.Switch(ins.b_mode):
                    with m.Case(BMode.ROW):
                        m.d.comb += [breq.addr.eq((b_row + Mux(b_bf, beat >> 1, beat))[0:aw]),
                                     breq.sel.eq(beat[0])]
                    with m.Case(BMode.VEC):
                        m.d.comb += [breq.addr.eq((ins.b + Mux(b_bf, beat >> 1, beat))[0:aw]),
                                     breq.sel.eq(beat[0])]
                    with m.Case(BMode.COL):
                        m.d.comb += [breq.addr.eq((ins.b + Mux(b_bf, row >> (lg + 1), row >> lg))[0:aw]),
                                     breq.sel.eq(Mux(b_bf, row[0:lg + 1], row[0:lg]))]
                m.d.comb += breq.en.eq(1)

        # Consumer stage of B, in cycles after issue: data is registered at issue + delay + 2.
        off = VectorLane.OFFSETS
        b_delay_add = self.LOAD + off["s1"] - 2
        b_delay_mul = self.LOAD + off["s2"] - 2
        b_delay_ln = self.LOAD + off["s5"] - 2
        taps = [breq]
        for k in range(b_delay_ln):
            nxt = Signal(breq_layout, name=f"breq_d{k + 1}")
            m.d.sync += nxt.eq(taps[-1])
            taps.append(nxt)
        b_tap = Signal(breq_layout)
        with m.Switch(op):
            with m.Case(Opcode.MUL):
                m.d.comb += b_tap.eq(taps[b_delay_mul])
            with m.Case(Opcode.LN_APPLY):
                m.d.comb += b_tap.eq(taps[b_delay_ln])
            with m.Default():
                m.d.comb += b_tap.eq(taps[b_delay_add])
        m.d.comb += [self.rd_b.addr.eq(b_tap.addr), self.rd_b.en.eq(b_tap.en)]
        b_sel = Signal(16)
        m.d.sync += b_sel.eq(b_tap.sel)

        # B data (registered): per-lane operand; gamma / beta; mask bits.
        bword = self.rd_b.data
        b_lane = Signal(data.ArrayLayout(32, L))
        gamma = Signal(data.ArrayLayout(32, L))
        beta = Signal(data.ArrayLayout(32, L))
        bmask = Signal(L)
        imm_b = ins.b_mode == BMode.IMM
        col_f = Signal(32)
        col_h = Signal(16)
        m.d.comb += [col_f.eq(bword.word_select(b_sel[0:lg], 32)), col_h.eq(bword.word_select(b_sel[0:lg + 1], 16))]
        for ln in range(L):
            row_f = bword[32 * ln:32 * ln + 32]
            row_h = Mux(b_sel[0], bword[16 * (L + ln):16 * (L + ln) + 16], bword[16 * ln:16 * ln + 16])
            val = Signal(32, name=f"b_val{ln}")
            with m.If(imm_b):
                m.d.comb += val.eq(ins.imm0)
            with m.Elif(ins.b_mode == BMode.COL):
                m.d.comb += val.eq(Mux(b_bf, bf16_load(col_h), f32_load(col_f)))
            with m.Else():
                m.d.comb += val.eq(Mux(b_bf, bf16_load(row_h), f32_load(row_f)))
            m.d.sync += [
                b_lane[ln].eq(f32_load(val)),
                gamma[ln].eq(bf16_load(bword[32 * ln:32 * ln + 16])),
                beta[ln].eq(bf16_load(bword[32 * ln + 16:32 * ln + 32])),
            ]
        m.d.sync += bmask.eq(bword.word_select(b_sel[0:5], L))
        beta2 = delay(m, beta, 2, "beta")

        # ---- tags ------------------------------------------------------------------------------
        tag_layout = data.StructLayout({
            "valid": 1, "phase": Phase, "scalar": 1, "wr": 1, "red": 1, "fin": 1,
            "first": 1, "last": 1, "ahalf": 1, "lane_valid": L, "causal": L, "ri": len(ri), "glast": 1,
            "wr_addr": aw, "wr_en": 2 * L, "s0": 32, "s1": 32,
        })
        tag0 = Signal(tag_layout)
        m.d.comb += [
            tag0.valid.eq(issue), tag0.phase.eq(phase), tag0.scalar.eq(iscalar), tag0.wr.eq(iwr),
            tag0.red.eq(ired), tag0.fin.eq(ifin), tag0.first.eq(beat == 0), tag0.last.eq(ilast),
            tag0.ahalf.eq(beat[0]), tag0.lane_valid.eq(lane_valid), tag0.causal.eq(causal_vis),
            tag0.wr_addr.eq(iwr_addr[0:aw]), tag0.wr_en.eq(iwr_en),
            tag0.s0.eq(Mux(multi, s0a[ri], s0)), tag0.s1.eq(Mux(multi, s1a[ri], s1)),
            tag0.ri.eq(ri), tag0.glast.eq(glast),
        ]
        tags = [tag0]
        for k in range(self.EXIT):
            nxt = Signal(tag_layout, name=f"tag_d{k + 1}")
            m.d.sync += nxt.eq(tags[-1])
            tags.append(nxt)

        # ---- load / convert (issue + 1 -> registered at issue + 2) ----------------------------------
        t1 = tags[1]
        aword = self.rd_a.data
        x0 = Signal(data.ArrayLayout(32, L))
        for ln in range(L):
            raw_f = aword[32 * ln:32 * ln + 32]
            raw_h = Mux(t1.ahalf, aword[16 * (L + ln):16 * (L + ln) + 16], aword[16 * ln:16 * ln + 16])
            val = Mux(a_bf, bf16_load(raw_h), f32_load(raw_f))
            if ln == 0:
                val = Mux(t1.scalar, sval, val)
            m.d.sync += x0[ln].eq(val)

        # ---- lanes --------------------------------------------------------------------------------
        m.submodules.rom = rom = coefficient_rom()

        def stage_cfg(stage_name):
            """Micro settings of ``stage_name`` for the beat at that stage."""
            k = self.LOAD + off[stage_name]
            tag = tags[k]
            sig = Signal(8, name=f"cfg_{stage_name}")
            en = sig[7]
            with m.Switch(Cat(tag.phase, op)):
                for (o, ph), micro in MICRO.items():
                    setting = getattr(micro, stage_name)
                    if setting is None:
                        continue
                    with m.Case(ph.value | (o.value << 3)):
                        val = 0 if setting is True else setting.value
                        m.d.comb += sig.eq(val | 0x80)
            return tag, en, sig[0:7]

        tag1, en1, sel1 = stage_cfg("s1")
        tag2, en2, sel2 = stage_cfg("s2")
        _, en3, _ = stage_cfg("s3")
        _, en4, sel4 = stage_cfg("s4")
        tag5, en5, sel5 = stage_cfg("s5")
        _, en6, _ = stage_cfg("s6")

        lanes_y = []
        lane_dom = "sync"
        if self._clock_gate:
            # The lanes' clock runs while a beat is between the lane input (x0, tag LOAD) and the exit.
            lane_dom = "lanes"
            gated_domain(m, "lanes", Cat(*(tags[k].valid for k in range(self.LOAD, self.EXIT))).any())
        for ln in range(L):
            lane = VectorLane()
            if self._lane_instance:
                lane._MustUse__silence = True       # only its ports are used, for the Instance
                m.submodules[f"lane{ln}"] = Instance(
                    LANE_MODULE, i_clk=ClockSignal(lane_dom), i_rst=ResetSignal(),
                    **{("o_" if member.flow == wiring.Flow.Out else "i_") + name: getattr(lane, name)
                       for name, member in lane.signature.members.items()})
            else:
                m.submodules[f"lane{ln}"] = DomainRenamer(lane_dom)(lane) if self._clock_gate else lane
            port = rom.read_port()
            neg_s0 = Cat(tag1.s0[0:31], ~tag1.s0[31])
            m.d.comb += [
                port.addr.eq(lane.rom_addr), lane.rom_data.eq(port.data),
                lane.x.eq(x0[ln]),
                lane.en1.eq(en1), lane.p1.eq(Mux(sel1 == P1.NEG_S0.value, neg_s0, b_lane[ln])),
                lane.en2.eq(en2), lane.sq2.eq(sel2 == Q2.SQUARE.value),
                lane.en3.eq(en3), lane.c3.eq(ins.imm1),
                lane.en4.eq(en4), lane.func.as_value().eq(sel4[0:2]),
                lane.en5.eq(en5), lane.r5.eq(Mux(sel5 == R5.GAMMA.value, gamma[ln], tag5.s1)),
                lane.en6.eq(en6), lane.c6.eq(beta2[ln]),
            ]
            with m.Switch(sel2):
                with m.Case(Q2.B.value):
                    m.d.comb += lane.q2.eq(b_lane[ln])
                with m.Case(Q2.IMM0.value):
                    m.d.comb += lane.q2.eq(ins.imm0)
                with m.Case(Q2.S1.value):
                    m.d.comb += lane.q2.eq(tag2.s1)
                with m.Case(Q2.LOG2E.value):
                    m.d.comb += lane.q2.eq(int(T.LOG2E.view("uint32")))
            lanes_y.append(lane.y)

        # Mask bits travel from the B data register (issue + 2) to the exit.
        mask_mode = ins.mask
        vis2 = Signal(L)
        with m.Switch(mask_mode):
            with m.Case(MaskMode.BITMAP):
                m.d.comb += vis2.eq(bmask)
            with m.Case(MaskMode.CAUSAL):
                m.d.comb += vis2.eq(tags[2].causal)
            with m.Default():
                m.d.comb += vis2.eq(Const((1 << L) - 1, L))
        vis = delay(m, vis2, self.EXIT - 2, "vis")

        # ---- exit: zeroing, writes, reductions -------------------------------------------------------
        te = tags[self.EXIT]
        sm = (op == Opcode.SOFTMAX) & te.phase.as_value().matches(Phase.PASS2, Phase.PASS3)
        dead = te.s0 == 0xFF800000
        ys = []
        for ln in range(L):
            y = Signal(32, name=f"exit_y{ln}")
            m.d.comb += y.eq(Mux(sm & (~vis[ln] | ~te.lane_valid[ln] | dead), 0, lanes_y[ln]))
            ys.append(y)
        m.d.comb += [sc_done.eq(te.valid & te.scalar), sc_val.eq(ys[0]),
                     sc_ok.eq(sc_done & te.glast & (te.phase == phase))]
        with m.If(sc_done & (te.phase == Phase.FIN1)):
            m.d.sync += s0a[te.ri].eq(sc_val)
        with m.Elif(sc_done & (te.phase == Phase.FIN2)):
            m.d.sync += s1a[te.ri].eq(sc_val)

        d_bf = ins.d_fmt == Fmt.BF16

        def pack_store(values):
            """Write data for ``values`` (one per lane) in the destination format."""
            halves = Cat(*[bf16_store(v) for v in values])
            return Mux(d_bf, Cat(halves, halves), Cat(*values))

        # Reductions.
        redmax = (op == Opcode.MAX) | ((op == Opcode.SOFTMAX) & (te.phase == Phase.MAIN))
        m.submodules.tree = tree = AdderTree(L)
        mx = []
        for ln in range(L):
            keep = te.lane_valid[ln] & (~(op == Opcode.SOFTMAX) | vis[ln])
            m.d.comb += tree.i[ln].eq(Mux(keep, ys[ln], 0x80000000))
            mx.append(Mux(keep, ys[ln], 0xFF800000))
        # Max tree: one level per cycle, padded to the adder tree's latency.
        level = mx
        depth_ = 0
        while len(level) > 1:
            nxt = []
            for k in range(0, len(level), 2):
                w = Signal(32, name=f"max_l{depth_}_{k // 2}")
                a_, b_ = level[k], level[k + 1]
                m.d.sync += w.eq(Mux(max_key(b_) > max_key(a_), b_, a_))
                nxt.append(w)
            level = nxt
            depth_ += 1
        max_out = delay(m, level[0], self.tree_latency - depth_, "max_pad")
        rt = delay(m, Cat(te.valid & te.red, te.first, te.last, te.fin, redmax, te.glast, te.phase, te.ri),
                   self.tree_latency, "rtag")
        r_valid, r_first, r_last, r_fin, r_max, r_glast = rt[0], rt[1], rt[2], rt[3], rt[4], rt[5]
        r_phase, r_ri = rt[6:9], rt[9:]
        r_addr = delay(m, te.wr_addr, self.tree_latency, "raddr")
        r_en = delay(m, te.wr_en, self.tree_latency, "ren")
        acc = Signal(32)
        part = Mux(r_max, max_out, tree.o)
        st = fp32_add_align(m, m.d.comb, acc, tree.o, prefix="acc")
        acc_sum = fp32_add_round(m, m.d.comb, st, prefix="acc")
        acc_max = Mux(max_key(max_out) > max_key(acc), max_out, acc)
        with m.If(r_valid):
            with m.If(r_first):
                m.d.sync += acc.eq(part)
            with m.Else():
                m.d.sync += acc.eq(Mux(r_max, acc_max, acc_sum))
        done_q = Signal()
        fin_q = Signal()
        fin_addr = Signal(aw)
        fin_en = Signal(2 * L)
        done_glast = Signal()
        done_phase = Signal(Phase)
        done_ri = Signal(len(ri))
        m.d.sync += [done_q.eq(r_valid & r_last), fin_q.eq(r_valid & r_last & r_fin),
                     fin_addr.eq(r_addr), fin_en.eq(r_en),
                     done_glast.eq(r_glast), done_phase.eq(r_phase), done_ri.eq(r_ri)]
        m.d.comb += [acc_done.eq(done_q), acc_val.eq(acc),
                     acc_ok.eq(done_q & done_glast & (done_phase == phase))]
        # A row's reduction result: its max (SOFTMAX, first pass) or the sum a scalar beat finalises.
        with m.If(done_q & (op == Opcode.SOFTMAX) & (done_phase == Phase.MAIN)):
            m.d.sync += s0a[done_ri].eq(acc)
        with m.Elif(done_q):
            m.d.sync += sva[done_ri].eq(acc)

        # Write port: reduction results (MAX/SUM) or lane results.
        with m.If(fin_q):
            m.d.comb += [self.wr.addr.eq(fin_addr), self.wr.en.eq(fin_en),
                         self.wr.data.eq(pack_store([acc] * L))]
        with m.Elif(te.valid & te.wr):
            m.d.comb += [self.wr.addr.eq(te.wr_addr), self.wr.en.eq(te.wr_en),
                         self.wr.data.eq(pack_store([Mux(te.scalar, ys[0], ys[ln]) for ln in range(L)]))]
        return m


class VectorTop(wiring.Component):
    """Test and benchmark harness: :class:`VectorUnit` with its own scratchpad and a host port.

    The host port (``host_wr_*``, ``host_rd_*``) loads and reads the
    scratchpad while the unit is idle; the host write has priority only when
    the unit is not writing.

    Parameters
    ----------
    lanes, depth, max_n, lane_instance
        As for :class:`VectorUnit`; ``depth`` words of ``lanes x 32`` bits.
    """

    def __init__(self, lanes: int = 4, depth: int = 1024, max_n: int = 4096, lane_instance: bool = False):
        self._unit = VectorUnit(lanes, depth, max_n, lane_instance)
        aw, W = self._unit.addr_width, 32 * lanes
        super().__init__({
            "instr": In(stream.Signature(VectorInstr)),
            "busy": Out(1), "done": Out(1), "error": Out(VecError), "cycles": Out(32),
            "host_wr_addr": In(aw), "host_wr_data": In(W), "host_wr_en": In(W // 16),
            "host_rd_addr": In(aw), "host_rd_en": In(1), "host_rd_data": Out(W),
        })

    @property
    def unit(self) -> VectorUnit:
        return self._unit

    def elaborate(self, platform):
        m = Module()
        u = self._unit
        m.submodules.unit = u
        m.submodules.spm = spm = memory.Memory(shape=32 * u.lanes, depth=u.depth, init=[])
        ra = spm.read_port()
        rb = spm.read_port()
        rh = spm.read_port()
        wp = spm.write_port(granularity=16)
        wiring.connect(m, wiring.flipped(self.instr), u.instr)
        m.d.comb += [
            self.busy.eq(u.busy), self.done.eq(u.done), self.error.eq(u.error), self.cycles.eq(u.cycles),
            ra.addr.eq(u.rd_a.addr), ra.en.eq(u.rd_a.en), u.rd_a.data.eq(ra.data),
            rb.addr.eq(u.rd_b.addr), rb.en.eq(u.rd_b.en), u.rd_b.data.eq(rb.data),
            rh.addr.eq(self.host_rd_addr), rh.en.eq(self.host_rd_en), self.host_rd_data.eq(rh.data),
        ]
        with m.If(u.wr.en != 0):
            m.d.comb += [wp.addr.eq(u.wr.addr), wp.data.eq(u.wr.data), wp.en.eq(u.wr.en)]
        with m.Else():
            m.d.comb += [wp.addr.eq(self.host_wr_addr), wp.data.eq(self.host_wr_data), wp.en.eq(self.host_wr_en)]
        return m
