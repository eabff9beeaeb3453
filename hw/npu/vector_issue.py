"""The vector unit's issue side: instruction check (:class:`VectorDecode`), sequencer (:class:`VectorSequencer`)
and the beat it issues (:class:`VectorBeat`).

The sequencer accepts one instruction at a time, checks it, and walks its rows, passes and beats,
issuing one beat (``L`` elements of a row, or one finalising scalar) per cycle with everything the rest
of the pipeline needs in the beat's tag (:func:`hw.npu.vector_parts.beat_layout`). It waits only where an
instruction's next pass needs the results of the previous one; those come back as row results
(:func:`hw.npu.vector_parts.row_result_layout`) and are kept per row of the group.
"""

from operator import attrgetter

from amaranth.hdl import Array, Cat, Const, Module, Mux, Signal
from amaranth.lib import data, stream, wiring
from amaranth.lib.wiring import In, Out

from ..elab import Shared
from ..spec.vector_isa import ADDR_BITS, BMode, Fmt, MaskMode, Opcode, VecError, VectorInstr
from .vector_parts import Phase, ReadPortSignature, beat_layout, group_index_width, row_result_layout

__all__ = ["VectorDecode", "VectorBeat", "VectorSequencer", "b_request_layout", "position_layout"]


def _ceil_shift(value, k):
    return (value + ((1 << k) - 1)) >> k


def b_request_layout(addr_width: int) -> data.StructLayout:
    """A beat's B read: word ``addr`` if ``en``; ``sel`` picks the half (BF16 ``ROW`` / ``VEC``), the slot
    (``COL``) or the 32-bit mask word (BITMAP softmax) in the word read."""
    return data.StructLayout({"addr": addr_width, "en": 1, "sel": 16})


class VectorDecode(wiring.Component):
    """Sizes and error check of an instruction (combinational).

    Every region an instruction reads or writes must end within ``depth`` words; the check is done on
    wide sums (50 bits), so no address field can wrap into range. The order of the checks sets which
    error an instruction with several faults reports (the golden model checks in the same order).

    Parameters
    ----------
    lanes, depth, max_n
        As for :class:`hw.npu.vector.VectorUnit`.

    Members
    -------
    ins : In(VectorInstr)
    nb : Out(16)
        Beats per row pass, ``ceil(n / L)``.
    pitch_a, pitch_b, pitch_d : Out(16)
        Words per row of A, B and D in their formats.
    mpitch : Out(16)
        Words per row of a softmax bitmap, ``ceil(n / 32 L)``.
    b_mem : Out(1)
        The instruction reads B from memory per element (ADD / MUL not in ``IMM`` mode).
    error : Out(VecError)
    """

    def __init__(self, lanes: int, depth: int, max_n: int):
        self._lanes, self._depth, self._max_n = lanes, depth, max_n
        super().__init__({
            "ins": In(VectorInstr),
            "nb": Out(16), "pitch_a": Out(16), "pitch_b": Out(16), "pitch_d": Out(16), "mpitch": Out(16),
            "b_mem": Out(1), "error": Out(VecError),
        })

    def elaborate(self, platform):
        m = Module()
        lg = self._lanes.bit_length() - 1
        ins = self.ins
        op, n, rows = ins.op, ins.n, ins.rows
        nb = self.nb
        m.d.comb += nb.eq(_ceil_shift(n, lg))

        def pitch(fmt):                 # words per row in a format
            return Mux(fmt == Fmt.BF16, _ceil_shift(n, lg + 1), nb)

        pitch_a, pitch_b, pitch_d = self.pitch_a, self.pitch_b, self.pitch_d
        m.d.comb += [pitch_a.eq(pitch(ins.a_fmt)), pitch_b.eq(pitch(ins.b_fmt)), pitch_d.eq(pitch(ins.d_fmt)),
                     self.mpitch.eq(_ceil_shift(n, lg + 5))]
        uses_b = op.as_value().matches(Opcode.ADD, Opcode.MUL)
        b_mem = self.b_mem
        m.d.comb += b_mem.eq(uses_b & (ins.b_mode != BMode.IMM))

        depth = self._depth
        err = self.error
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
            m.d.comb += end_x.eq(ins.aux + rows * self.mpitch)

        valid_op = Signal()
        m.d.comb += valid_op.eq(op.as_value().matches(*Opcode))
        with m.If(~valid_op):
            m.d.comb += err.eq(VecError.BAD_OPCODE)
        with m.Elif((n == 0) | (n > self._max_n) | (rows == 0)):
            m.d.comb += err.eq(VecError.BAD_LENGTH)
        with m.Elif(((ins.mask != MaskMode.NONE) & (op != Opcode.SOFTMAX))
                    | ((op == Opcode.LN_STATS) & (ins.d_fmt == Fmt.BF16))):
            m.d.comb += err.eq(VecError.BAD_MODE)
        with m.Elif((end_a > depth) | (end_b > depth) | (end_d > depth) | (end_x > depth)):
            m.d.comb += err.eq(VecError.BAD_ADDRESS)
        with m.Elif((op == Opcode.KV_APPEND) & ((ins.pos + rows) > ins.imm0)):
            m.d.comb += err.eq(VecError.KV_OVERFLOW)
        return m


def position_layout(row_group: int) -> data.StructLayout:
    """The sequencer's position: ``row`` and ``beat`` in the instruction, the pass (``phase``), the first
    word of the row in A, B, D and the bitmap (``*_row``), the row's index in its group (``ri``, ``glast``:
    the group's last row) and the row's statistics ``s0`` / ``s1``."""
    return data.StructLayout({
        "row": 16, "beat": 16, "phase": Phase, "a_row": ADDR_BITS + 1, "b_row": ADDR_BITS + 1, "d_row": 48,
        "x_row": ADDR_BITS + 1, "ri": group_index_width(row_group), "glast": 1, "s0": 32, "s1": 32,
    })


class VectorBeat(wiring.Component):
    """The beat at the sequencer's position (combinational): its A read, B request and tag.

    While ``issue``: a pass beat (MAIN, PASS2, PASS3) reads word ``a_row + beat`` of A (``beat / 2`` in
    BF16, ``ahalf`` picks the half) and is reduced (MAX, SUM, the first pass of LN_STATS and SOFTMAX, their
    second pass) or written (every other pass) to word ``d_row + beat`` (``beat / 2`` in BF16) with one
    enable pair per lane holding an element; MAX and SUM write one element per row (its slot of the word
    at ``d + row / L``, ``d + row / 2L`` in BF16) after the row's last beat (``fin``). A scalar beat
    (FIN1, FIN2) reads nothing; LN_STATS writes its result as element ``2 row`` (mean) or ``2 row + 1``
    (rstd) of D. The B request: the bitmap word of a masked SOFTMAX beat, gamma / beta of LN_APPLY,
    ADD / MUL's operand by its broadcast mode. While ``stats_rd``: LN_APPLY's statistics of the row (word
    ``aux + row / (L / 2)``). The tag is driven every cycle; its ``valid`` is ``issue``.

    Parameters
    ----------
    lanes, depth, row_group
        As for :class:`hw.npu.vector.VectorUnit`.

    Members
    -------
    ins : In(VectorInstr)
    nb : In(16)
    b_mem : In(1)
    pos : In(position_layout(row_group))
    issue, stats_rd : In(1)
    a_addr : Out(addr_width)
    a_en : Out(1)
    breq : Out(b_request_layout(addr_width))
    beat : Out(beat_layout(lanes, addr_width, row_group))
    """

    def __init__(self, lanes: int, depth: int, row_group: int):
        self._lanes = lanes
        self._aw = max(1, (depth - 1).bit_length())
        super().__init__({
            "ins": In(VectorInstr), "nb": In(16), "b_mem": In(1), "pos": In(position_layout(row_group)),
            "issue": In(1), "stats_rd": In(1),
            "a_addr": Out(self._aw), "a_en": Out(1),
            "breq": Out(b_request_layout(self._aw)),
            "beat": Out(beat_layout(lanes, self._aw, row_group)),
        })

    def elaborate(self, platform):
        m = Module()
        L = self._lanes
        lg = L.bit_length() - 1
        aw = self._aw
        ins = self.ins
        op, n = ins.op, ins.n
        p = self.pos
        row, beat, phase, a_row, b_row, d_row, x_row = p.row, p.beat, p.phase, p.a_row, p.b_row, p.d_row, p.x_row
        issue, stats_rd = self.issue, self.stats_rd

        iscalar = Signal()
        iwr = Signal()          # write the lane results (or the scalar) at exit
        ired = Signal()         # reduce this beat
        ifin = Signal()         # reduction result is written (MAX/SUM) after the last beat
        iwr_addr = Signal(48)
        iwr_en = Signal(2 * L)
        ilast = beat == self.nb - 1
        rem = n[0:lg]
        lane_valid = Signal(L)
        for ln in range(L):
            m.d.comb += lane_valid[ln].eq(~ilast | (rem == 0) | (ln < rem))

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

        with m.If(issue):
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
                with m.Case(Phase.FIN1, Phase.FIN2):
                    m.d.comb += iscalar.eq(1)
                    with m.If(op == Opcode.LN_STATS):
                        addr, en = elem_write(Cat(phase == Phase.FIN2, row), 0)
                        m.d.comb += [iwr.eq(1), iwr_addr.eq(addr), iwr_en.eq(en)]

        # ---- read requests ---------------------------------------------------------------------
        a_bf = ins.a_fmt == Fmt.BF16
        with m.If(stats_rd):
            m.d.comb += [self.a_addr.eq((ins.aux + (row >> (lg - 1)))[0:aw]),
                         self.a_en.eq(1)]
        with m.Elif(issue & ~iscalar):
            m.d.comb += [self.a_addr.eq((a_row + Mux(a_bf, beat >> 1, beat))[0:aw]), self.a_en.eq(1)]

        # B request of the beat (undelayed): address, enable, half / slot / mask word.
        breq = self.breq
        b_bf = ins.b_fmt == Fmt.BF16
        causal_vis = Signal(L)
        for ln in range(L):
            # CAUSAL: element j of row r visible iff j <= r + pos; PREFIX: iff j <= pos in every row.
            m.d.comb += causal_vis[ln].eq(Cat(Const(ln, lg), beat)
                                          <= Mux(ins.mask == MaskMode.PREFIX, 0, row) + ins.pos)
        with m.If(issue & ~iscalar):
            with m.If(op == Opcode.SOFTMAX):
                with m.If(ins.mask == MaskMode.BITMAP):
                    m.d.comb += [breq.addr.eq((x_row + (beat >> 5))[0:aw]), breq.en.eq(1), breq.sel.eq(beat[0:5])]
            with m.Elif(op == Opcode.LN_APPLY):
                m.d.comb += [breq.addr.eq((ins.b + beat)[0:aw]), breq.en.eq(1)]
            with m.Elif(self.b_mem):
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

        # ---- the beat's tag ------------------------------------------------------------------------
        tag0 = self.beat
        m.d.comb += [
            tag0.valid.eq(issue), tag0.phase.eq(phase), tag0.scalar.eq(iscalar), tag0.wr.eq(iwr),
            tag0.red.eq(ired), tag0.fin.eq(ifin), tag0.first.eq(beat == 0), tag0.last.eq(ilast),
            tag0.ahalf.eq(beat[0]), tag0.lane_valid.eq(lane_valid), tag0.causal.eq(causal_vis),
            tag0.wr_addr.eq(iwr_addr[0:aw]), tag0.wr_en.eq(iwr_en),
            tag0.s0.eq(p.s0), tag0.s1.eq(p.s1),
            tag0.ri.eq(p.ri), tag0.glast.eq(p.glast),
        ]
        return m


class VectorSequencer(wiring.Component):
    """Accepts, checks and walks an instruction; issues one beat per cycle.

    States: ``Idle`` (``instr.ready``) -> ``Check`` (one cycle: :class:`VectorDecode` on the latched
    instruction; an error goes to ``Done`` at once) -> ``Route`` -> [``Stats-Read`` -> ``Stats-Capture``
    (LN_APPLY: the row's mean and rstd, read on ``rd_a`` before its beats)] -> ``Issue`` (one beat per
    cycle) -> ... -> ``Drain`` (``drain`` cycles: the last beat's writes) -> ``Done`` (``done`` for one
    cycle) -> ``Idle``. Element-wise ops, MAX and SUM issue their rows back to back. Multi-pass
    instructions (SOFTMAX, LN_STATS) run each pass, and each finalising scalar beat, over a group of up
    to ``row_group`` rows; after a group's pass the sequencer waits (``Wait-Reduction`` /
    ``Wait-Scalar``) for the group's last row's result, kept with every other row's in per-row
    registers as they come back (``reduced``, ``scalar``), then starts the next pass at the group's
    first row. The next group starts as soon as the group's last pass is issued.

    The sequencer keeps the position (row, beat, pass, row pointers, group index) and the per-row
    registers; :class:`VectorBeat` derives from the position, in the same cycle, the beat's A read on
    ``rd_a`` (the data arrives the next cycle, at the lanes' load stage), its undelayed B request
    ``breq`` (:class:`hw.npu.vector_lanes.VectorOperandB` delays it to the consuming stage) and its tag
    ``beat`` (valid while ``beat.valid``); ``sval``, the row's reduction that a scalar beat finalises,
    follows one cycle later (registered, at the load stage).

    Parameters
    ----------
    lanes, depth, max_n, row_group
        As for :class:`hw.npu.vector.VectorUnit`.
    drain : int
        Cycles after the last issue until every write of the instruction has happened.

    Members
    -------
    instr : In(stream.Signature(VectorInstr))
        Accepted only while idle.
    ins : Out(VectorInstr)
        The instruction being executed (registered on acceptance, held until the next one).
    busy, done, error, cycles
        As for :class:`hw.npu.vector.VectorUnit`.
    rd_a : Out(ReadPortSignature)
        A reads (and LN_APPLY's statistics reads).
    breq : Out(b_request_layout(addr_width))
    beat : Out(beat_layout(lanes, addr_width, row_group))
    sval : Out(32)
    reduced : In(row_result_layout(row_group))
        Row reductions coming back: a SOFTMAX row's max (``phase`` MAIN) or the sum a scalar beat
        finalises.
    scalar : In(row_result_layout(row_group))
        Results of scalar beats: ``FIN1`` the row's ``s0`` (mean), ``FIN2`` its ``s1`` (rstd, 1 / sum).
    """

    def __init__(self, lanes: int, depth: int, max_n: int, row_group: int, drain: int):
        self._lanes, self._depth, self._max_n, self._row_group = lanes, depth, max_n, row_group
        self._drain = drain
        self._aw = max(1, (depth - 1).bit_length())
        super().__init__({
            "instr": In(stream.Signature(VectorInstr)),
            "ins": Out(VectorInstr),
            "busy": Out(1), "done": Out(1), "error": Out(VecError), "cycles": Out(32),
            "rd_a": Out(ReadPortSignature(self._aw, 32 * lanes)),
            "breq": Out(b_request_layout(self._aw)),
            "beat": Out(beat_layout(lanes, self._aw, row_group)),
            "sval": Out(32),
            "reduced": In(row_result_layout(row_group)),
            "scalar": In(row_result_layout(row_group)),
        })

    def elaborate(self, platform):
        m = Module()
        L = self._lanes
        lg = L.bit_length() - 1
        ins = self.ins
        op = ins.op
        rows = ins.rows

        m.submodules.decode = dec = VectorDecode(L, self._depth, self._max_n)
        m.d.comb += dec.ins.eq(ins)
        nb, pitch_a, pitch_b, pitch_d, mpitch = dec.nb, dec.pitch_a, dec.pitch_b, dec.pitch_d, dec.mpitch
        b_mem, err = dec.b_mem, dec.error

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
        assert len(ri) == group_index_width(G)
        gsz = Signal(range(G + 1))
        g_a = Signal(ADDR_BITS + 1)
        g_d = Signal(48)
        g_x = Signal(ADDR_BITS + 1)
        glast = Signal()
        m.d.comb += glast.eq(ri == gsz - 1)
        s0a = Array(Signal(32, name=f"s0_g{k}") for k in range(G))
        s1a = Array(Signal(32, name=f"s1_g{k}") for k in range(G))
        sva = Array(Signal(32, name=f"sv_g{k}") for k in range(G))
        sval = self.sval            # lane-0 input of a scalar (finalising) beat, registered from issue
        m.d.sync += sval.eq(sva[ri])
        drain = Signal(range(self._drain + 1))
        cycles = self.cycles
        busy = self.busy
        with m.If(busy):
            m.d.sync += cycles.eq(cycles + 1)

        # This cycle: a beat is issued (the beat generator derives its reads and tag from the position).
        issue = Signal()
        ilast = beat == nb - 1
        # Stats read of LN_APPLY (at the start of a row), on rd_a.
        stats_rd = Signal()

        # Row results coming back (``*_ok``: the result of the group's last row in this pass). A scalar
        # beat's result is the row's s0 (FIN1) or s1 (FIN2); a reduction is a SOFTMAX row's max (s0) or
        # the sum a scalar beat finalises (sv).
        red, sc = self.reduced, self.scalar
        acc_ok = red.valid & red.glast & (red.phase == phase)
        sc_ok = sc.valid & sc.glast & (sc.phase == phase)
        with m.If(sc.valid & (sc.phase == Phase.FIN1)):
            m.d.sync += s0a[sc.ri].eq(sc.value)
        with m.Elif(sc.valid & (sc.phase == Phase.FIN2)):
            m.d.sync += s1a[sc.ri].eq(sc.value)
        with m.If(red.valid & (op == Opcode.SOFTMAX) & (red.phase == Phase.MAIN)):
            m.d.sync += s0a[red.ri].eq(red.value)
        with m.Elif(red.valid):
            m.d.sync += sva[red.ri].eq(red.value)

        self._walk(m, Shared(
            lg=lg, ins=ins, op=op, rows=rows, pitch_a=pitch_a, pitch_b=pitch_b, pitch_d=pitch_d,
            mpitch=mpitch, err=err, row=row, beat=beat, phase=phase, a_row=a_row, b_row=b_row, d_row=d_row,
            x_row=x_row, s0=s0, s1=s1, G=G, multi=multi, ri=ri, gsz=gsz, g_a=g_a, g_d=g_d, g_x=g_x,
            glast=glast, drain=drain, cycles=cycles, busy=busy, issue=issue, ilast=ilast, stats_rd=stats_rd,
            acc_ok=acc_ok, sc_ok=sc_ok))


        # ---- the beat at this position ------------------------------------------------------------
        m.submodules.beat = gen = VectorBeat(L, self._depth, G)
        pos = gen.pos
        m.d.comb += [
            gen.ins.eq(ins), gen.nb.eq(nb), gen.b_mem.eq(b_mem), gen.issue.eq(issue), gen.stats_rd.eq(stats_rd),
            pos.row.eq(row), pos.beat.eq(beat), pos.phase.eq(phase), pos.a_row.eq(a_row), pos.b_row.eq(b_row),
            pos.d_row.eq(d_row), pos.x_row.eq(x_row), pos.ri.eq(ri), pos.glast.eq(glast),
            pos.s0.eq(Mux(multi, s0a[ri], s0)), pos.s1.eq(Mux(multi, s1a[ri], s1)),
            self.rd_a.addr.eq(gen.a_addr), self.rd_a.en.eq(gen.a_en), self.breq.eq(gen.breq), self.beat.eq(gen.beat),
        ]
        return m

    def _walk(self, m, s):
        """The sequencer's state machine: the position from instruction to instruction, row to row, pass to
        pass (the class docstring's states). ``s``: the signals :meth:`elaborate` made, by name."""
        (lg, ins, op, rows, pitch_a, pitch_b, pitch_d, mpitch, err, row, beat, phase, a_row, b_row, d_row,
         x_row, s0, s1, G, multi, ri, gsz, g_a, g_d, g_x, glast, drain, cycles, busy, issue, ilast, stats_rd,
         acc_ok, sc_ok) = attrgetter(
            "lg", "ins", "op", "rows", "pitch_a", "pitch_b", "pitch_d", "mpitch", "err", "row", "beat",
            "phase", "a_row", "b_row", "d_row", "x_row", "s0", "s1", "G", "multi", "ri", "gsz", "g_a",
            "g_d", "g_x", "glast", "drain", "cycles", "busy", "issue", "ilast", "stats_rd", "acc_ok",
            "sc_ok")(s)

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
                m.d.sync += drain.eq(self._drain)
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
                    m.d.sync += drain.eq(self._drain)
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
                        m.d.sync += beat.eq(beat + 1)
                        with m.If(ilast):
                            m.d.sync += beat.eq(0)
                            with m.If(multi):
                                advance()
                            with m.Else():
                                next_row()
                    with m.Case(Phase.FIN1, Phase.FIN2):
                        advance()
            with m.State("Wait-Reduction"):
                # The results are kept per row (s0a / sva, above) as they come back.
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
