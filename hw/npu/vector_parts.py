"""What the vector unit's components share: passes, the micro-program, ports, one lane, the beat tag.

:class:`hw.npu.vector.VectorUnit` is composed of

* :class:`hw.npu.vector_issue.VectorSequencer` (with its :class:`hw.npu.vector_issue.VectorDecode`):
  accepts an instruction, checks it, walks its rows, passes and beats, and issues one beat per cycle:
  the A read, the B request and the beat's tag;
* :class:`hw.npu.vector_lanes.VectorOperandB`: the B read, delayed to the stage that consumes it, and its
  decoding into per-lane operands, gamma / beta and mask bits;
* :class:`hw.npu.vector_lanes.VectorLanes`: load / convert, the ``L`` :class:`VectorLane` s configured
  per stage from :data:`MICRO`, the mask and softmax zeroing at the exit;
* :class:`hw.npu.vector_reduce.VectorReduce`: the lane tree (sum) or max tree over a beat and the row
  accumulator;
* :class:`hw.npu.vector_reduce.VectorWriteBack`: the write port, lane results or a row's reduction
  packed in the destination format.

A beat travels through them with its tag (:func:`beat_layout`), issued with the beat and delayed with
it, so every stage knows what it works on without asking the sequencer; the sequencer gets per-row
results back as :func:`row_result_layout`. Timing is counted in cycles after a beat's issue (its read
address on ``rd_a``): data loaded and converted at :data:`LOAD`, lane results at :data:`EXIT`.
"""

from collections import namedtuple

from amaranth.hdl import Module, Mux, Shape, Signal
from amaranth.lib import data, enum, wiring
from amaranth.lib.wiring import In, Out

from ..spec.vector_isa import EXIT_LATENCY, Opcode
from . import vector_tables as T
from .fp32ext import Func, FuncUnit, delay, fp32_add, fp32_mul

__all__ = [
    "Phase", "P1", "Q2", "R5", "Micro", "MICRO", "ReadPortSignature", "WritePortSignature", "VectorLane",
    "LANE_MODULE", "LOAD", "EXIT", "beat_layout", "row_result_layout", "group_index_width",
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

    @staticmethod
    def offsets_for(add_stages: int = 2) -> dict:
        """Stage offsets with FP32 adders of ``add_stages`` stages (issue 15; :data:`OFFSETS` for 2)."""
        A, F = add_stages, FuncUnit.latency_for(add_stages)
        return dict(s1=0, s2=A, s3=A + 2, s4=2 * A + 2, s5=2 * A + 2 + F, s6=2 * A + 4 + F)

    @staticmethod
    def latency_for(add_stages: int = 2) -> int:
        """``latency`` with FP32 adders of ``add_stages`` stages: ``3 add_stages + 4 + F``."""
        return 3 * add_stages + 4 + FuncUnit.latency_for(add_stages)

    def __init__(self, add_stages: int = 2):
        self.add_stages = add_stages
        self.OFFSETS = self.offsets_for(add_stages)
        self.latency = self.latency_for(add_stages)
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

        A = self.add_stages
        t1 = stage(self.x, self.en1, fp32_add(m, self.x, self.p1, "s1", A), A, "s1")
        t2 = stage(t1, self.en2, fp32_mul(m, t1, Mux(self.sq2, t1, self.q2), "s2"), 2, "s2")
        t3 = stage(t2, self.en3, fp32_add(m, t2, self.c3, "s3", A), A, "s3")
        m.submodules.func = fu = FuncUnit(A)
        m.d.comb += [fu.x.eq(t3), fu.func.eq(self.func), self.rom_addr.eq(fu.rom_addr),
                     fu.rom_data.eq(self.rom_data)]
        t4 = stage(t3, self.en4, fu.y, fu.latency, "s4")
        t5 = stage(t4, self.en5, fp32_mul(m, t4, self.r5, "s5"), 2, "s5")
        t6 = stage(t5, self.en6, fp32_add(m, t5, self.c6, "s6", A), A, "s6")
        m.d.comb += self.y.eq(t6)
        return m


LANE_MODULE = "vector_lane"
"""Module name of a separately converted :class:`VectorLane` (``lane_instance=True``)."""


# -- pipeline timing and the beat tag ------------------------------------------------------------

LOAD = 2
"""Cycles from a beat's issue to its loaded and converted A operand (read 1, load / convert 1)."""
EXIT = LOAD + VectorLane.latency
"""Cycles from a beat's issue to its lane results (the write and reduction input)."""
assert EXIT == EXIT_LATENCY, "hw.spec.vector_isa.EXIT_LATENCY must follow the pipeline"


def group_index_width(row_group: int) -> int:
    """Bits of a row's index in its group (``ri``) for groups of ``row_group`` rows."""
    return Shape.cast(range(max(2, row_group))).width


def beat_layout(lanes: int, addr_width: int, row_group: int) -> data.StructLayout:
    """The tag of a beat: issued with it and delayed with it through the pipeline.

    ``valid``: a beat is issued; ``phase``: its pass; ``scalar``: a finalising scalar beat (lane 0
    takes the row's reduction, the others are idle); ``wr``: its lane results are written at the exit;
    ``red``: they are reduced; ``fin``: the row's reduction is written after its last beat (MAX, SUM);
    ``first`` / ``last``: the row's first and last beat; ``ahalf``: the BF16 half of the A word;
    ``lane_valid``: lanes holding an element (the last beat of a row may be partial); ``causal``: lanes
    visible under the causal mask; ``ri`` / ``glast``: the row's index in its group, and whether it
    is the group's last row; ``wr_addr`` / ``wr_en``: where the results (or the reduction) go;
    ``s0`` / ``s1``: the row's statistics (max or mean, 1 / sum or rstd).
    """
    return data.StructLayout({
        "valid": 1, "phase": Phase, "scalar": 1, "wr": 1, "red": 1, "fin": 1,
        "first": 1, "last": 1, "ahalf": 1, "lane_valid": lanes, "causal": lanes,
        "ri": group_index_width(row_group), "glast": 1,
        "wr_addr": addr_width, "wr_en": 2 * lanes, "s0": 32, "s1": 32,
    })


def row_result_layout(row_group: int) -> data.StructLayout:
    """A row's result coming back to the sequencer (a reduction, or the lane-0 result of a scalar beat).

    ``valid`` for one cycle; ``value``; the ``phase`` of the beat that produced it; the row's index
    ``ri`` in its group and ``glast`` for the group's last row (the sequencer's next pass waits for it).
    """
    return data.StructLayout({"valid": 1, "value": 32, "phase": Phase, "ri": group_index_width(row_group),
                              "glast": 1})
