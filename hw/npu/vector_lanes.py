"""The vector unit's lane pipeline: B operand fetch (:class:`VectorOperandB`) and the lanes (:class:`VectorLanes`).

A beat issued at cycle 0 (:class:`hw.npu.vector_issue.VectorSequencer`) has its A word read at 1, loaded
and converted into ``L`` canonical FP32 values at :data:`~hw.npu.vector_parts.LOAD` = 2, and its lane
results (after the mask) at :data:`~hw.npu.vector_parts.EXIT` = 23. Its B word is read later, so that
the decoded operand is registered exactly when the stage that consumes it samples it: S1 for ADD, S2 for
MUL, S5 (gamma) and S6 (beta) for LN_APPLY; the softmax bitmap meets the beat at the load stage.
"""

from amaranth.hdl import Cat, ClockSignal, Const, DomainRenamer, Instance, Module, Mux, ResetSignal, Signal
from amaranth.lib import data, wiring
from amaranth.lib.wiring import In, Out

from ..clockgate import gated_domain
from ..spec.vector_isa import BMode, Fmt, MaskMode, Opcode, VectorInstr
from . import vector_tables as T
from .fp32ext import bf16_load, coefficient_rom, delay, f32_load
from .vector_issue import b_request_layout
from .vector_parts import (
    EXIT,
    LANE_MODULE,
    LOAD,
    MICRO,
    P1,
    Q2,
    R5,
    Phase,
    ReadPortSignature,
    VectorLane,
    beat_layout,
    row_result_layout,
)

__all__ = ["VectorOperandB", "VectorLanes"]


class VectorOperandB(wiring.Component):
    """Operand B: the read delayed to its consuming stage, and the word decoded per lane.

    A request ``req`` arrives at a beat's issue (cycle 0). It is delayed by ``LOAD + offset - 2``
    cycles, where ``offset`` is the consuming lane stage's (:data:`VectorLane.OFFSETS`): S1 for ADD (and
    the softmax bitmap, at the load stage), S2 for MUL, S5 for LN_APPLY's gamma; the word is read the
    next cycle and decoded into registers, valid at ``LOAD + offset``. Beta (LN_APPLY, consumed at S6)
    is the same word's high half, delayed two cycles more.

    Decoding: ``b`` is per lane the element of a ``ROW`` / ``VEC`` operand (``sel[0]``: the BF16 half
    of the word), the one ``COL`` element of the row (``sel``: its slot, broadcast to every lane) or
    ``imm0`` (``IMM``), each canonicalised; ``gamma`` / ``beta`` the low / high BF16 half of each lane's
    32-bit slot; ``mask`` the ``L`` bits of the 32-bit bitmap word ``sel[0:5]`` selects.

    Parameters
    ----------
    lanes : int
    addr_width : int
    add_stages : int
        The lanes' FP32 adder depth (:class:`hw.npu.vector.VectorUnit`): the stage offsets follow.

    Members
    -------
    ins : In(VectorInstr)
    req : In(b_request_layout(addr_width))
    rd_b : Out(ReadPortSignature)
    b, gamma, beta : Out(ArrayLayout(32, lanes))
    mask : Out(lanes)
    """

    def __init__(self, lanes: int, addr_width: int, add_stages: int = 2):
        self._lanes, self._aw = lanes, addr_width
        self._offsets = VectorLane.offsets_for(add_stages)
        super().__init__({
            "ins": In(VectorInstr),
            "req": In(b_request_layout(addr_width)),
            "rd_b": Out(ReadPortSignature(addr_width, 32 * lanes)),
            "b": Out(data.ArrayLayout(32, lanes)),
            "gamma": Out(data.ArrayLayout(32, lanes)),
            "beta": Out(data.ArrayLayout(32, lanes)),
            "mask": Out(lanes),
        })

    def elaborate(self, platform):
        m = Module()
        L = self._lanes
        lg = L.bit_length() - 1
        ins = self.ins
        b_bf = ins.b_fmt == Fmt.BF16

        # Consumer stage of B, in cycles after issue: data is registered at issue + delay + 2.
        off = self._offsets
        b_delay_add = LOAD + off["s1"] - 2
        b_delay_mul = LOAD + off["s2"] - 2
        b_delay_ln = LOAD + off["s5"] - 2
        breq_layout = b_request_layout(self._aw)
        taps = [self.req]
        for k in range(b_delay_ln):
            nxt = Signal(breq_layout, name=f"breq_d{k + 1}")
            m.d.sync += nxt.eq(taps[-1])
            taps.append(nxt)
        b_tap = Signal(breq_layout)
        with m.Switch(ins.op):
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
        b_lane, gamma, beta = self.b, self.gamma, Signal(data.ArrayLayout(32, L))
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
        m.d.sync += self.mask.eq(bword.word_select(b_sel[0:5], L))
        m.d.comb += self.beta.eq(delay(m, beta, 2, "beta"))
        return m


class VectorLanes(wiring.Component):
    """The lane pipeline: load / convert, ``L`` lanes configured per stage, mask and zeroing at the exit.

    A beat enters with its tag ``beat`` at issue (cycle 0) and its A word on ``a_data`` at cycle 1
    (the synchronous read's data); the tag is delayed with the beat, and each lane stage takes its
    settings from :data:`MICRO` by the (opcode, phase) of the beat it holds. Load / convert (cycle 1,
    registered at :data:`LOAD`): each lane's FP32 element, or its BF16 element (the tag's ``ahalf``)
    widened, canonicalised; lane 0 of a scalar beat takes ``sval`` instead. The lanes'
    operands: ``b`` (S1 addend of ADD, S2 multiplier of MUL), ``-s0`` (S1 of the passes that subtract
    the row's max or mean), ``imm0`` / ``s1`` / ``log2(e)`` or the square (S2), ``imm1`` (S3),
    ``gamma`` / ``s1`` (S5), ``beta`` (S6); each is sampled when the beat reaches its stage.

    At :data:`EXIT` the tag comes out on ``exit`` with the lane results ``y``; ``vis`` are the lanes
    visible under the instruction's mask (the bitmap word ``bmask`` sampled at cycle 2, or the tag's
    causal bits). In SOFTMAX's exponent passes a lane that is masked, beyond the row's end, or in a
    row whose max is ``-inf`` gives 0. A scalar beat's lane-0 result also comes out as ``scalar``, the
    row result the sequencer keeps.

    Parameters
    ----------
    lanes, addr_width, row_group
    lane_instance, clock_gate, add_stages
        As for :class:`hw.npu.vector.VectorUnit` (``lane_instance`` only with the default ``add_stages``).

    Members
    -------
    ins : In(VectorInstr)
    beat : In(beat_layout(lanes, addr_width, row_group))
    a_data : In(32 * lanes)
    sval : In(32)
    b, gamma, beta : In(ArrayLayout(32, lanes))
    bmask : In(lanes)
    exit : Out(beat_layout(lanes, addr_width, row_group))
    y : Out(ArrayLayout(32, lanes))
    vis : Out(lanes)
    scalar : Out(row_result_layout(row_group))
    """

    latency = EXIT

    def __init__(self, lanes: int, addr_width: int, row_group: int, lane_instance: bool = False,
                 clock_gate: bool = False, add_stages: int = 2):
        if lane_instance and add_stages != 2:
            raise ValueError("Instance lanes (lane_instance) have the default adder depth 2, "
                             f"not add_stages={add_stages!r}")
        self._add_stages = add_stages
        self.latency = LOAD + VectorLane.latency_for(add_stages)
        self._lanes, self._aw, self._row_group = lanes, addr_width, row_group
        self._lane_instance, self._clock_gate = bool(lane_instance), bool(clock_gate)
        tag = beat_layout(lanes, addr_width, row_group)
        super().__init__({
            "ins": In(VectorInstr),
            "beat": In(tag),
            "a_data": In(32 * lanes),
            "sval": In(32),
            "b": In(data.ArrayLayout(32, lanes)),
            "gamma": In(data.ArrayLayout(32, lanes)),
            "beta": In(data.ArrayLayout(32, lanes)),
            "bmask": In(lanes),
            "exit": Out(tag),
            "y": Out(data.ArrayLayout(32, lanes)),
            "vis": Out(lanes),
            "scalar": Out(row_result_layout(row_group)),
        })

    def elaborate(self, platform):
        m = Module()
        L = self._lanes
        ins = self.ins
        op = ins.op

        # ---- tags ------------------------------------------------------------------------------
        EXIT = self.latency
        tags = [self.beat]
        for k in range(EXIT):
            nxt = Signal(beat_layout(L, self._aw, self._row_group), name=f"tag_d{k + 1}")
            m.d.sync += nxt.eq(tags[-1])
            tags.append(nxt)

        # ---- load / convert (issue + 1 -> registered at issue + 2) ----------------------------------
        t1 = tags[1]
        a_bf = ins.a_fmt == Fmt.BF16
        aword = self.a_data
        x0 = Signal(data.ArrayLayout(32, L))
        for ln in range(L):
            raw_f = aword[32 * ln:32 * ln + 32]
            raw_h = Mux(t1.ahalf, aword[16 * (L + ln):16 * (L + ln) + 16], aword[16 * ln:16 * ln + 16])
            val = Mux(a_bf, bf16_load(raw_h), f32_load(raw_f))
            if ln == 0:
                val = Mux(t1.scalar, self.sval, val)
            m.d.sync += x0[ln].eq(val)

        # ---- lanes --------------------------------------------------------------------------------
        m.submodules.rom = rom = coefficient_rom()
        off = VectorLane.offsets_for(self._add_stages)

        def stage_cfg(stage_name):
            """Micro settings of ``stage_name`` for the beat at that stage."""
            k = LOAD + off[stage_name]
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
            gated_domain(m, "lanes", Cat(*(tags[k].valid for k in range(LOAD, EXIT))).any())
        for ln in range(L):
            lane = VectorLane(self._add_stages)
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
                lane.en1.eq(en1), lane.p1.eq(Mux(sel1 == P1.NEG_S0.value, neg_s0, self.b[ln])),
                lane.en2.eq(en2), lane.sq2.eq(sel2 == Q2.SQUARE.value),
                lane.en3.eq(en3), lane.c3.eq(ins.imm1),
                lane.en4.eq(en4), lane.func.as_value().eq(sel4[0:2]),
                lane.en5.eq(en5), lane.r5.eq(Mux(sel5 == R5.GAMMA.value, self.gamma[ln], tag5.s1)),
                lane.en6.eq(en6), lane.c6.eq(self.beta[ln]),
            ]
            with m.Switch(sel2):
                with m.Case(Q2.B.value):
                    m.d.comb += lane.q2.eq(self.b[ln])
                with m.Case(Q2.IMM0.value):
                    m.d.comb += lane.q2.eq(ins.imm0)
                with m.Case(Q2.S1.value):
                    m.d.comb += lane.q2.eq(tag2.s1)
                with m.Case(Q2.LOG2E.value):
                    m.d.comb += lane.q2.eq(int(T.LOG2E.view("uint32")))
            lanes_y.append(lane.y)

        # Mask bits travel from the B data register (issue + 2) to the exit.
        vis2 = Signal(L)
        with m.Switch(ins.mask):
            with m.Case(MaskMode.BITMAP):
                m.d.comb += vis2.eq(self.bmask)
            with m.Case(MaskMode.CAUSAL, MaskMode.PREFIX):
                m.d.comb += vis2.eq(tags[2].causal)
            with m.Default():
                m.d.comb += vis2.eq(Const((1 << L) - 1, L))
        vis = delay(m, vis2, EXIT - 2, "vis")

        # ---- exit: zeroing (softmax exponent passes) ---------------------------------------------
        te = tags[EXIT]
        sm = (op == Opcode.SOFTMAX) & te.phase.as_value().matches(Phase.PASS2, Phase.PASS3)
        dead = te.s0 == 0xFF800000
        for ln in range(L):
            m.d.comb += self.y[ln].eq(Mux(sm & (~vis[ln] | ~te.lane_valid[ln] | dead), 0, lanes_y[ln]))
        sc = self.scalar
        m.d.comb += [self.exit.eq(te), self.vis.eq(vis),
                     sc.valid.eq(te.valid & te.scalar), sc.value.eq(self.y[0]), sc.phase.eq(te.phase),
                     sc.ri.eq(te.ri), sc.glast.eq(te.glast)]
        return m
