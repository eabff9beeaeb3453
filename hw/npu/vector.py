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

Structure: :class:`VectorUnit` composes components that can be tested alone
(tests/test_vector_parts.py), a beat travelling through them with its tag
(:mod:`hw.npu.vector_parts`, which also holds :class:`VectorLane`, the
micro-program and the port signatures re-exported here): the sequencer
(:class:`hw.npu.vector_issue.VectorSequencer`, with the instruction check
:class:`hw.npu.vector_issue.VectorDecode` and :class:`hw.npu.vector_issue.VectorBeat`,
which derives a beat's reads and tag from the sequencer's position) issues the
beats; operand B
(:class:`hw.npu.vector_lanes.VectorOperandB`) and the lane pipeline
(:class:`hw.npu.vector_lanes.VectorLanes`) compute them; the row reductions
(:class:`hw.npu.vector_reduce.VectorReduce`) and the write port
(:class:`hw.npu.vector_reduce.VectorWriteBack`) take them at the exit.

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

from amaranth.hdl import Module
from amaranth.lib import memory, stream, wiring
from amaranth.lib.wiring import In, Out

from ..elab import check_pow2
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
    exit_latency,
    reduce_latency,
)
from . import vector_parts
from .vector_issue import VectorSequencer
from .vector_lanes import VectorLanes, VectorOperandB
from .vector_parts import (  # noqa: F401  (the parts' shared vocabulary: re-exported)
    LANE_MODULE,
    MICRO,
    P1,
    Q2,
    R5,
    Micro,
    Phase,
    ReadPortSignature,
    VectorLane,
    WritePortSignature,
)
from .vector_reduce import VectorReduce, VectorWriteBack

__all__ = [
    "ADDR_BITS", "OpSpec", "ISA_TABLE", "Opcode", "Fmt", "BMode", "MaskMode", "VecError", "Phase",
    "VectorInstr", "encode", "MICRO", "ReadPortSignature", "WritePortSignature", "VectorLane",
    "VectorUnit", "VectorTop", "LANE_MODULE", "lane_verilog",
]


def lane_verilog() -> str:
    """Verilog of one :class:`VectorLane` as module ``vector_lane`` (for ``lane_instance=True``)."""
    from amaranth.back import verilog

    return verilog.convert(VectorLane(), name=LANE_MODULE, emit_src=False)


# -- the unit ----------------------------------------------------------------------------------------

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
    acc_stages : int
        The row accumulator's depth (the configuration's ``npu.vec_acc_stages``, issue 15): 1 (default) one
        FP32 addition per beat in a one-cycle loop, 2 to 4 interleaved partial sums
        (:class:`hw.npu.vector_reduce.VectorReduce`); the timing below then has ``R + 1`` =
        :func:`hw.spec.vector_isa.reduce_latency`.
    add_stages : int
        Pipeline depth of the lanes' FP32 adders (S1, S3, S6 and the function unit's two), and of each level
        of the reduction's lane tree (issue 15): 2 (default), 3 or 4 (:func:`hw.arith.fp32_add_pipe`, the
        same bits). ``E`` below is then :func:`hw.spec.vector_isa.exit_latency` (``13 + 5 add_stages``) and
        the tree ``add_stages log2 L``. Not with ``lane_instance``.

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
                 clock_gate: bool = False, row_group: int = ROW_GROUP, acc_stages: int = 1, add_stages: int = 2):
        check_pow2("Lanes", lanes, 2)
        if add_stages not in (2, 3, 4) or isinstance(add_stages, bool):
            raise ValueError(f"Lane adder stages must be 2, 3 or 4, not {add_stages!r}")
        if lane_instance and add_stages != 2:
            raise ValueError("Instance lanes (lane_instance) have the default adder depth 2")
        self.acc_stages = acc_stages
        self.add_stages = add_stages
        self.EXIT = exit_latency(add_stages)
        if not isinstance(row_group, int) or isinstance(row_group, bool) or not 1 <= row_group <= 256:
            raise ValueError(f"Row group must be an integer in 1..256, not {row_group!r}")
        self.row_group = row_group
        self._lane_instance = bool(lane_instance)
        self._clock_gate = bool(clock_gate)
        if not isinstance(depth, int) or isinstance(depth, bool) or not 1 <= depth <= 1 << ADDR_BITS:
            raise ValueError(f"Depth must be an integer in 1..2**{ADDR_BITS}, not {depth!r}")
        if not isinstance(max_n, int) or isinstance(max_n, bool) or not 1 <= max_n < 1 << 16:
            raise ValueError(f"Maximum row length must be an integer in 1..65535, not {max_n!r}")
        self.lanes = lanes
        self.depth = depth
        self.max_n = max_n
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
        ``depth`` words (default: the activation scratchpad's ``act_spm_words``) and its accumulator depth
        ``cfg.npu.vec_acc_stages``."""
        kwargs.setdefault("acc_stages", cfg.npu.vec_acc_stages)
        return cls(cfg.npu.vector_lanes, cfg.npu.act_spm_words if depth is None else depth, **kwargs)

    @property
    def addr_width(self) -> int:
        return self._aw

    # Timing, in cycles after a beat is issued (its read address on ``rd_a``).
    LOAD = vector_parts.LOAD                          # data registered after load/convert
    EXIT = vector_parts.EXIT                          # lane result valid (write / reduce input)

    @property
    def tree_latency(self) -> int:
        return self.add_stages * (self.lanes.bit_length() - 1)

    @property
    def reduce_latency(self) -> int:
        """Cycles from a row's last beat at the exit to its reduction (:func:`hw.spec.vector_isa.reduce_latency`)."""
        return reduce_latency(self.lanes, self.acc_stages, self.add_stages)

    @property
    def drain_cycles(self) -> int:
        """Cycles after the last issue until every write of an instruction has happened."""
        return self.EXIT + self.reduce_latency + 2

    def elaborate(self, platform):
        m = Module()
        L, aw, G = self.lanes, self._aw, self.row_group
        m.submodules.seq = seq = VectorSequencer(L, self.depth, self.max_n, G, self.drain_cycles)
        A = self.add_stages
        m.submodules.operand_b = opb = VectorOperandB(L, aw, A)
        m.submodules.lanes = lanes = VectorLanes(L, aw, G, self._lane_instance, self._clock_gate, A)
        m.submodules.reduce = red = VectorReduce(L, aw, G, self.acc_stages, A)
        m.submodules.write_back = wb = VectorWriteBack(L, aw, G)

        # Issue: instructions in, status out; A reads (and LN_APPLY's statistics) on rd_a.
        wiring.connect(m, wiring.flipped(self.instr), seq.instr)
        wiring.connect(m, seq.rd_a, wiring.flipped(self.rd_a))
        m.d.comb += [self.busy.eq(seq.busy), self.done.eq(seq.done), self.error.eq(seq.error),
                     self.cycles.eq(seq.cycles)]
        # B: the beat's request, delayed to its stage, read on rd_b and decoded.
        wiring.connect(m, opb.rd_b, wiring.flipped(self.rd_b))
        m.d.comb += [opb.ins.eq(seq.ins), opb.req.eq(seq.breq)]
        # Lanes: the beat's tag at issue, its A word one cycle later.
        m.d.comb += [lanes.ins.eq(seq.ins), lanes.beat.eq(seq.beat), lanes.sval.eq(seq.sval),
                     lanes.a_data.eq(self.rd_a.data), lanes.b.eq(opb.b), lanes.gamma.eq(opb.gamma),
                     lanes.beta.eq(opb.beta), lanes.bmask.eq(opb.mask)]
        # Exit: reductions, results back to the sequencer, the write port.
        m.d.comb += [red.ins.eq(seq.ins), red.beat.eq(lanes.exit), red.y.eq(lanes.y), red.vis.eq(lanes.vis),
                     seq.reduced.eq(red.result), seq.scalar.eq(lanes.scalar)]
        m.d.comb += [wb.d_fmt.eq(seq.ins.d_fmt), wb.fin.eq(red.fin), wb.acc.eq(red.result.value),
                     wb.beat.eq(lanes.exit), wb.y.eq(lanes.y)]
        wiring.connect(m, wb.wr, wiring.flipped(self.wr))
        return m


class VectorTop(wiring.Component):
    """Test and benchmark harness: :class:`VectorUnit` with its own scratchpad and a host port.

    The host port (``host_wr_*``, ``host_rd_*``) loads and reads the
    scratchpad while the unit is idle; the host write has priority only when
    the unit is not writing.

    Parameters
    ----------
    lanes, depth, max_n, lane_instance, acc_stages, add_stages
        As for :class:`VectorUnit`; ``depth`` words of ``lanes x 32`` bits.
    """

    def __init__(self, lanes: int = 4, depth: int = 1024, max_n: int = 4096, lane_instance: bool = False,
                 acc_stages: int = 1, add_stages: int = 2):
        self.unit = VectorUnit(lanes, depth, max_n, lane_instance, acc_stages=acc_stages, add_stages=add_stages)
        aw, W = self.unit.addr_width, 32 * lanes
        super().__init__({
            "instr": In(stream.Signature(VectorInstr)),
            "busy": Out(1), "done": Out(1), "error": Out(VecError), "cycles": Out(32),
            "host_wr_addr": In(aw), "host_wr_data": In(W), "host_wr_en": In(W // 16),
            "host_rd_addr": In(aw), "host_rd_en": In(1), "host_rd_data": Out(W),
        })

    def elaborate(self, platform):
        m = Module()
        u = self.unit
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
