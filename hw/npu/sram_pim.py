"""SRAM-PIM attention unit (HPIM, issue 20): digital compute-in-memory macros for q.K^T and p.V.

HPIM (Duan et al., 2025, arXiv 2509.12993) maps the latency-critical attention of generation to an
SRAM-PIM subsystem beside the DRAM-PIM that runs the weight GEMVs. This block is that SRAM-PIM: a
set of SRAM macros, each with a MAC column beside its array (digital compute-in-memory: the row a
macro reads goes straight into BF16 multipliers and an FP32 adder tree in the same pipeline, the
family of the BF16 digital CIM macros of Guo et al., ISSCC 2023, paper 7.2).

Storage
    ``macros`` macros of ``rows`` rows; a row holds one vector of ``word_lanes`` BF16 values (a key
    or a value row of one head; a head dimension below ``word_lanes`` is padded with zeros). The
    unit's *lines* number the rows of all macros: line ``l`` is row ``l // macros`` of macro
    ``l % macros``, so the keys of a head stored from row ``base`` are the consecutive lines
    ``base * macros + j`` and key ``j`` sits in macro ``j % macros``: consecutive keys are read in
    parallel. The ``wr`` stream writes one whole line per beat (a word-line write; 1R1W macros, so
    writes go on while the unit computes, e.g. the DMA filling the next head group's K/V while this
    one is attended to; writing a row that a running command reads is the programmer's hazard, as
    for any DMA into a buffer in use).

Commands (``cmd`` stream; ``op``, ``base`` row, ``count`` keys per head, ``heads``, ``stride`` rows
from one head's keys to the next; ``stride = 0`` lets all heads share the same keys)
    ``QK``: for each head, its query vector arrives on ``i`` (``word_lanes / mac_lanes`` beats of
    ``mac_lanes`` values) and the unit returns one FP32 score per key. A *group* is the ``macros``
    keys at one row index; every cycle the unit reads the group's row in all macros and multiplies
    one ``mac_lanes`` slice of each with the same slice of q (``beats = word_lanes / mac_lanes``
    cycles per group). Per macro, an adder tree sums the ``mac_lanes`` products and the accumulator
    adds the tree's result: ``score_j = ((((+0) + T_0) + T_1) + ... + T_{beats-1})`` with
    ``T_b = tree(K_j[b*L : (b+1)*L] * q[b*L : (b+1)*L])``. Each group leaves as one output beat
    (``n`` = valid scores, ``last`` on the head's final group).

    ``PV``: for each head, probabilities arrive on ``i``, one beat per group (lane ``m`` is the
    probability of key ``g * macros + m``; needs ``macros <= mac_lanes``). The unit reads the
    group's value rows and multiplies every lane of macro ``m``'s row by ``p_m``; per output lane an
    adder tree over the macros sums the products and the lane's accumulator adds it:
    ``out_c = ((((+0) + S_0) + S_1) + ... )`` with ``S_g = tree_m(p_{gM+m} * V_{gM+m}[c])``; the
    macros of a last, partial group contribute ``+0``. The head's ``word_lanes`` results leave in
    ``beats`` output beats of ``mac_lanes`` values.

    The trees add neighbours pairwise as :class:`hw.arith.AdderTree` (the numerics contract of
    :mod:`hw.arith`: BF16 products exact in FP32, RNE additions, subnormals flushed, canonical NaN).
    ``sim/golden/sram_pim.py`` is the independent model of this order.

Softmax placement: on the NPU's vector unit, not in the macros. Softmax needs the maximum over
*all* scores of a head before the first exponential (a full pass before the second), an exponential
and a reciprocal; the vector unit already has them (exp2 / recip within 1.6e-7, the causal mask,
measured in ``tests/test_vector.py``). In the unit it would need either a per-macro exp/recip
datapath (idle during the N * d dot-product MACs, which outnumber the N exponentials d = 64 times)
or a second pass over the stored scores; and the scores would still have to leave the unit for the
next layer's traffic pattern. The price of the split is a round trip of 4 B of score and 2 B of
probability per key and head (6 N bytes per head, against the 4 N d bytes of its K and V), on chip,
which the intra-token pipeline hides (:mod:`sim.hpim_model`). The scale ``1 / sqrt(d)`` goes into q
(or the vector unit's SCALE).

Timing (:meth:`SramPimUnit.command_cycles`, tested against this RTL): operands always valid and the
output always ready, a command issues one beat per cycle, ``heads * groups * beats`` beats, with no
bubble between groups or heads (the operand register is double-buffered; the output FIFO is sized so
that its credits never stall the issue). The last result leaves ``qk_latency`` / ``pv_latency``
cycles after the last beat. A new command starts when the previous one has left the pipeline.

Bad commands (``count`` or ``heads`` of 0, keys beyond the last row) and writes beyond the last line
are not executed and set the sticky ``error``; :func:`sim.golden.sram_pim.check_command` gives the
same verdict as a one-line error naming the value and the limit.
"""

from __future__ import annotations

from amaranth.hdl import Array, Cat, Const, Module, Mux, Signal
from amaranth.lib import data, enum, stream, wiring
from amaranth.lib.fifo import SyncFIFOBuffered
from amaranth.lib.memory import Memory
from amaranth.lib.wiring import In, Out

from ..arith import AdderTree, BF16Multiplier, bf16_mul, fp32_add_align, fp32_add_round
from ..elab import Shared, check_pow2, log2

__all__ = ["SramPimOp", "SramPimUnit", "MAX_HEADS", "MAX_READ_LATENCY"]

MAX_HEADS = 255
MAX_READ_LATENCY = 8
MAX_ROWS = 1 << 16


class SramPimOp(enum.Enum, shape=1):
    QK = 0
    PV = 1


class SramPimUnit(wiring.Component):
    """SRAM-PIM attention unit: ``macros`` SRAM macros with a MAC column each (see the module docstring).

    Parameters
    ----------
    macros : int
        SRAM macros (power of two, 1 .. ``mac_lanes``): keys computed in parallel.
    rows : int
        Rows per macro (2 .. 65536).
    word_lanes : int
        BF16 values per row (power of two >= 2): the longest vector (head dimension).
    mac_lanes : int
        BF16 multipliers per macro (power of two, 2 .. ``word_lanes``); a row is consumed in
        ``word_lanes / mac_lanes`` beats. Also the width of the operand and result streams.
    read_latency : int
        Cycles from a row address to its data at the multipliers (1 .. 8): the macro's synchronous
        read plus ``read_latency - 1`` pipeline registers (column multiplexer, wire delay).

    Members
    -------
    cmd : In(stream.Signature(command_layout))
    i : In(stream.Signature(ArrayLayout(16, mac_lanes)))
        Operands: per QK head ``beats`` beats of q; per PV group one beat of probabilities.
    wr : In(stream.Signature(write_layout))
        ``line`` and ``data`` (a whole row); always ready.
    o : Out(stream.Signature(result_layout))
        ``data`` (FP32 lanes), ``n`` (valid lanes), ``last`` (end of a head).
    busy : Out(1)
        A command is running or its results are still in the pipeline.
    error : Out(1)
        Sticky: a command or a write was refused.

    Raises
    ------
    ValueError
        A parameter out of range (the message names it, the value and the rule).
    """

    def __init__(self, macros: int = 4, rows: int = 64, word_lanes: int = 64, mac_lanes: int = 16,
                 read_latency: int = 1):
        check_pow2("SramPimUnit word_lanes", word_lanes, 2)
        check_pow2("SramPimUnit mac_lanes", mac_lanes, 2)
        if mac_lanes > word_lanes:
            raise ValueError(f"SramPimUnit mac_lanes ({mac_lanes}) must not exceed word_lanes ({word_lanes})")
        check_pow2("SramPimUnit macros", macros, 1)
        if macros > mac_lanes:
            raise ValueError(f"SramPimUnit macros ({macros}) must not exceed mac_lanes ({mac_lanes}): a PV "
                             f"group's probabilities arrive in one operand beat, a QK group's scores leave in one")
        if not isinstance(rows, int) or isinstance(rows, bool) or not 2 <= rows <= MAX_ROWS:
            raise ValueError(f"SramPimUnit rows must be an integer in 2..{MAX_ROWS}, not {rows!r}")
        if (not isinstance(read_latency, int) or isinstance(read_latency, bool)
                or not 1 <= read_latency <= MAX_READ_LATENCY):
            raise ValueError(f"SramPimUnit read_latency must be an integer in 1..{MAX_READ_LATENCY}, "
                             f"not {read_latency!r}")
        self.macros, self.rows, self.read_latency = macros, rows, read_latency
        self.word_lanes, self.mac_lanes = word_lanes, mac_lanes
        super().__init__({
            "cmd": In(stream.Signature(self.command_layout)),
            "i": In(stream.Signature(data.ArrayLayout(16, mac_lanes))),
            "wr": In(stream.Signature(self.write_layout)),
            "o": Out(stream.Signature(self.result_layout)),
            "busy": Out(1),
            "error": Out(1),
        })

    # ------------------------------------------------------------------ parameters
    @property
    def beats(self) -> int:
        """Cycles a group (one row index in every macro) takes: ``word_lanes / mac_lanes``."""
        return self.word_lanes // self.mac_lanes

    @property
    def lines(self) -> int:
        """Rows of all macros (vectors the unit holds)."""
        return self.macros * self.rows

    @property
    def capacity_bytes(self) -> int:
        return self.lines * self.word_lanes * 2

    @property
    def multipliers(self) -> int:
        return self.macros * self.mac_lanes

    @property
    def command_layout(self) -> data.StructLayout:
        return data.StructLayout({"op": SramPimOp, "base": range(self.rows), "count": range(self.lines + 1),
                                  "heads": range(MAX_HEADS + 1), "stride": range(self.rows)})

    @property
    def write_layout(self) -> data.StructLayout:
        return data.StructLayout({"line": range(self.lines), "data": data.ArrayLayout(16, self.word_lanes)})

    @property
    def result_layout(self) -> data.StructLayout:
        L = self.mac_lanes
        return data.StructLayout({"data": data.ArrayLayout(32, L), "n": range(L + 1), "last": 1})

    # ------------------------------------------------------------------ timing
    @property
    def qk_tree_latency(self) -> int:
        return 2 * log2(self.mac_lanes)

    @property
    def pv_tree_latency(self) -> int:
        return 2 * log2(self.macros)

    @property
    def _stage_qk(self) -> int:
        """Pipeline stage (cycles after a beat issues) of the QK accumulator's addition."""
        return self.read_latency + BF16Multiplier.latency + self.qk_tree_latency

    @property
    def _stage_pv(self) -> int:
        return self.read_latency + BF16Multiplier.latency + self.pv_tree_latency

    FIFO_LATENCY = 2
    """Cycles from a write into the (empty) output FIFO to the entry on ``o`` (SyncFIFOBuffered)."""

    @property
    def qk_latency(self) -> int:
        """Cycles from the issue of a QK group's last beat to its scores on ``o``."""
        return self._stage_qk + 1 + self.FIFO_LATENCY

    @property
    def pv_latency(self) -> int:
        """Cycles from the issue of a PV head's last beat to its last result beat on ``o``."""
        return self._stage_pv + self.beats + self.FIFO_LATENCY

    @property
    def latency(self) -> int:
        """The longer of :attr:`qk_latency` and :attr:`pv_latency`."""
        return max(self.qk_latency, self.pv_latency)

    @property
    def fifo_depth(self) -> int:
        """Result FIFO entries: enough credits that neither a QK group nor a PV head waits for the output."""
        B = self.beats
        qk = -(-(B + self._stage_qk + 4) // B) + 1
        pv = B * (1 + -(-(self._stage_pv + B + 4) // B))
        return max(qk, pv)

    def groups(self, count: int) -> int:
        return -(-count // self.macros)

    def command_cycles(self, op, count: int, heads: int = 1) -> int:
        """Cycles from the command's handshake to the handshake of its last result beat, operands always
        valid and the output always ready (the formula the RTL meets exactly: tests/test_sram_pim.py)."""
        op = SramPimOp(op)
        issue = heads * self.groups(count) * self.beats
        if op == SramPimOp.QK:
            return self.beats + issue + self.qk_latency
        return 1 + issue + self.pv_latency

    def macs(self, count: int, heads: int = 1) -> int:
        """BF16 MACs of one QK or PV command (stored values used; the padding of a last group not counted)."""
        return heads * count * self.word_lanes

    # ------------------------------------------------------------------ RTL
    def elaborate(self, platform):
        m = Module()
        M, R, W, L, RL, B = self.macros, self.rows, self.word_lanes, self.mac_lanes, self.read_latency, self.beats
        lgM = log2(M)
        SQ, SP = self._stage_qk, self._stage_pv
        S = max(SQ, SP)
        D = self.fifo_depth
        error = Signal()
        m.d.comb += self.error.eq(error)

        c = Shared(lgM=lgM, S=S, D=D, error=error, M=M, R=R, W=W, L=L, RL=RL, B=B, SQ=SQ, SP=SP)
        self._storage(m, c)
        self._command(m, c)
        self._issue(m, c)
        self._datapath(m, c)
        self._qk(m, c)
        self._pv(m, c)
        self._results(m, c)
        return m

    def _storage(self, m, c):
        """Storage (the macros' rows) and the write stream that fills them."""
        M, R, W, error, lgM = c.M, c.R, c.W, c.error, c.lgM
        rports, wports = [], []
        for k in range(M):
            mem = m.submodules[f"macro{k}"] = Memory(shape=16 * W, depth=R, init=[])
            rports.append(mem.read_port())
            wports.append(mem.write_port())
        line = self.wr.payload.line
        wmacro = line[:lgM] if lgM else Const(0, 1)
        in_range = line < self.lines
        m.d.comb += self.wr.ready.eq(1)
        for k, wp in enumerate(wports):
            m.d.comb += [wp.addr.eq(line[lgM:]), wp.data.eq(self.wr.payload.data.as_value()),
                         wp.en.eq(self.wr.valid & in_range & (wmacro == k))]
        with m.If(self.wr.valid & ~in_range):
            m.d.sync += error.eq(1)

        c.update(rports=rports)

    def _command(self, m, c):
        """Command state, and the control record that travels with every issued beat."""
        B, D, L, M, R, RL, S, W = c.B, c.D, c.L, c.M, c.R, c.RL, c.S, c.W
        running = Signal()
        op_pv = Signal()
        base_h = Signal(range(R * (MAX_HEADS + 2)))
        stride = Signal(range(R))
        n_groups = Signal(range(R + 1))
        last_n = Signal(range(M + 1))
        heads_left = Signal(range(MAX_HEADS + 1))
        g = Signal(range(R + 1))
        b = Signal(max(1, log2(B)))
        opnd_left = Signal(range(MAX_HEADS * max(B, R) + 1))
        fill = Signal(16 * W)            # operand being received: B slots of L lanes (PV: slot 0)
        fill_cnt = Signal(range(B + 1))
        act = Signal(16 * W)             # operand of the unit (QK head / PV group) being issued
        occ = Signal(range(D + 1))       # result FIFO entries reserved (in flight or queued)

        # ---- the pipeline's control record, one per issued beat
        ctl_layout = data.StructLayout({"valid": 1, "pv": 1, "b": len(b), "first": 1, "last_beat": 1,
                                        "nvalid": range(M + 1), "head_last": 1, "head_end": 1})
        ctl = [Signal(ctl_layout, name=f"ctl{s}") for s in range(S + 1)]
        opnd = [Signal(16 * L, name=f"opnd{s}") for s in range(RL + 1)]
        emit_v = Signal()
        emit_n = Signal(range(M + 1))
        emit_last = Signal()
        draining = Signal()
        drain_k = Signal(max(1, log2(B)))
        pipe_empty = Signal()
        m.d.comb += pipe_empty.eq(~Cat(*[c.valid for c in ctl[1:]], emit_v, draining).any())
        m.d.comb += self.busy.eq(running | ~pipe_empty)

        c.update(running=running, op_pv=op_pv, base_h=base_h, stride=stride, n_groups=n_groups, last_n=last_n,
                 heads_left=heads_left, g=g, b=b, opnd_left=opnd_left, fill=fill, fill_cnt=fill_cnt, act=act, occ=occ,
                 ctl=ctl, opnd=opnd, emit_v=emit_v, emit_n=emit_n, emit_last=emit_last, draining=draining,
                 drain_k=drain_k, pipe_empty=pipe_empty)

    def _issue(self, m, c):
        """Issue: command acceptance and checks, operands into the double-buffered fill register, a beat a cycle."""
        B, D, L, M, R, act, b, base_h = c.B, c.D, c.L, c.M, c.R, c.act, c.b, c.base_h
        ctl, error, fill, fill_cnt, g = c.ctl, c.error, c.fill, c.fill_cnt, c.g
        heads_left, last_n, lgM = c.heads_left, c.last_n, c.lgM
        n_groups, occ, op_pv, opnd, opnd_left = c.n_groups, c.occ, c.op_pv, c.opnd, c.opnd_left
        pipe_empty, rports, running = c.pipe_empty, c.rports, c.running
        stride = c.stride
        need = Mux(op_pv, 1, B)
        fill_full = fill_cnt == need
        last_beat = b == B - 1
        last_group = g == n_groups - 1
        start_unit = (b == 0) & (op_pv | (g == 0))           # a new operand (QK head / PV group) begins
        need_credit = (b == 0) & (~op_pv | (g == 0))         # QK: each group; PV: each head
        credits = Mux(op_pv, B, 1)
        issue = Signal()
        m.d.comb += issue.eq(running & (~start_unit | fill_full) & (~need_credit | (occ + credits <= D)))
        src = Mux(start_unit, fill, act)
        m.d.comb += [
            ctl[0].valid.eq(issue),
            ctl[0].pv.eq(op_pv),
            ctl[0].b.eq(b),
            ctl[0].first.eq(Mux(op_pv, g == 0, b == 0)),
            ctl[0].last_beat.eq(last_beat),
            ctl[0].nvalid.eq(Mux(last_group, last_n, M)),
            ctl[0].head_last.eq(last_group),
            ctl[0].head_end.eq(last_group & last_beat),
            opnd[0].eq(Mux(op_pv, src[:16 * L], src.word_select(b, 16 * L))),
        ]
        for rp in rports:
            m.d.comb += rp.addr.eq(base_h + g)
        with m.If(issue):
            with m.If(start_unit):
                m.d.sync += act.eq(fill)
            with m.If(last_beat):
                m.d.sync += b.eq(0)
                with m.If(last_group):
                    m.d.sync += [g.eq(0), base_h.eq(base_h + stride), heads_left.eq(heads_left - 1)]
                    with m.If(heads_left == 1):
                        m.d.sync += running.eq(0)
                with m.Else():
                    m.d.sync += g.eq(g + 1)
            with m.Else():
                m.d.sync += b.eq(b + 1)

        # ---- operand stream into the (double-buffered) fill register
        emptying = issue & start_unit
        m.d.comb += self.i.ready.eq(running & (opnd_left != 0) & (~fill_full | emptying))
        slot = Mux(emptying, 0, fill_cnt)
        with m.If(self.i.valid & self.i.ready):
            m.d.sync += [fill.word_select(slot, 16 * L).eq(self.i.payload.as_value()),
                         fill_cnt.eq(slot + 1), opnd_left.eq(opnd_left - 1)]
        with m.Elif(emptying):
            m.d.sync += fill_cnt.eq(0)

        # ---- command acceptance and checks
        cmd = self.cmd.payload
        groups_in = Signal(range(self.lines + M))
        m.d.comb += groups_in.eq((cmd.count + (M - 1)) >> lgM)
        last_row = Signal(range(R * (MAX_HEADS + 2) + self.lines + 1))
        m.d.comb += last_row.eq(cmd.base + (cmd.heads - 1) * cmd.stride + groups_in - 1)
        bad = (cmd.count == 0) | (cmd.heads == 0) | (last_row >= R)
        m.d.comb += self.cmd.ready.eq(~running & pipe_empty)
        with m.If(self.cmd.valid & self.cmd.ready):
            with m.If(bad):
                m.d.sync += error.eq(1)
            with m.Else():
                qk = cmd.op == SramPimOp.QK
                m.d.sync += [
                    running.eq(1), op_pv.eq(~qk), base_h.eq(cmd.base), stride.eq(cmd.stride),
                    n_groups.eq(groups_in), last_n.eq(((cmd.count - 1) & (M - 1)) + 1),
                    heads_left.eq(cmd.heads), g.eq(0), b.eq(0), fill_cnt.eq(0),
                    opnd_left.eq(Mux(qk, cmd.heads * B, cmd.heads * groups_in)),
                ]

        c.update(need_credit=need_credit, credits=credits, issue=issue, rp=rp)

    def _datapath(self, m, c):
        """Pipeline registers (control, operands, row data) and the multipliers (macro k, lane l)."""
        B, L, M, RL, S, W, ctl, opnd, rp, rports = c.B, c.L, c.M, c.RL, c.S, c.W, c.ctl, c.opnd, c.rp, c.rports
        for s in range(1, S + 1):
            m.d.sync += ctl[s].eq(ctl[s - 1])
        for s in range(1, RL + 1):
            m.d.sync += opnd[s].eq(opnd[s - 1])
        rows_at_mul = []
        for k, rp in enumerate(rports):
            d = rp.data
            for s in range(RL - 1):
                nxt = Signal(16 * W, name=f"row{k}_s{s + 2}")
                m.d.sync += nxt.eq(d)
                d = nxt
            rows_at_mul.append(d)

        # ---- multipliers: macro k, lane l
        c_mul, c_prod = ctl[RL], ctl[RL + 1]
        prods = [[None] * L for _ in range(M)]
        for k in range(M):
            row_slice = rows_at_mul[k].word_select(c_mul.b, 16 * L) if B > 1 else rows_at_mul[k]
            for lane in range(L):
                a = row_slice[16 * lane:16 * (lane + 1)]
                x = Mux(c_mul.pv, opnd[RL][16 * k:16 * (k + 1)], opnd[RL][16 * lane:16 * (lane + 1)])
                prods[k][lane] = bf16_mul(m, m.d.sync, a, x, prefix=f"mul{k}_{lane}")

        c.update(prods=prods, c_prod=c_prod)

    def _qk(self, m, c):
        """QK: an adder tree over the lanes of each macro, one accumulator per macro."""
        L, M, SQ, ctl, emit_last = c.L, c.M, c.SQ, c.ctl, c.emit_last
        emit_n, emit_v, prods = c.emit_n, c.emit_v, c.prods
        qk_sum = []
        for k in range(M):
            tree = m.submodules[f"qk_tree{k}"] = AdderTree(L)
            for lane in range(L):
                m.d.comb += tree.i[lane].eq(prods[k][lane])
            qk_sum.append(tree.o)
        c_q = ctl[SQ]
        acc_qk = [Signal(32, name=f"acc_qk{k}") for k in range(M)]
        for k in range(M):
            st = fp32_add_align(m, m.d.comb, Mux(c_q.first, 0, acc_qk[k]), qk_sum[k], prefix=f"qacc{k}")
            total = fp32_add_round(m, m.d.comb, st, prefix=f"qacc{k}")
            with m.If(c_q.valid & ~c_q.pv):
                m.d.sync += acc_qk[k].eq(total)
        m.d.sync += [emit_v.eq(c_q.valid & ~c_q.pv & c_q.last_beat), emit_n.eq(c_q.nvalid),
                     emit_last.eq(c_q.head_last)]

        c.update(acc_qk=acc_qk, tree=tree, st=st, total=total)

    def _pv(self, m, c):
        """PV: an adder tree over the macros for each lane (a last group's missing keys add +0)."""
        B, L, M, SP, c_prod, ctl, drain_k, draining = c.B, c.L, c.M, c.SP, c.c_prod, c.ctl, c.drain_k, c.draining
        prods, st, total, tree = c.prods, c.st, c.total, c.tree
        pv_sum = []
        for lane in range(L):
            terms = [Mux(~c_prod.pv | (k < c_prod.nvalid), prods[k][lane], 0) for k in range(M)]
            if M == 1:
                t = Signal(32, name=f"pv_term{lane}")
                m.d.comb += t.eq(terms[0])
                pv_sum.append(t)
                continue
            tree = m.submodules[f"pv_tree{lane}"] = AdderTree(M)
            for k in range(M):
                m.d.comb += tree.i[k].eq(terms[k])
            pv_sum.append(tree.o)
        c_p = ctl[SP]
        acc_pv = [[Signal(32, name=f"acc_pv{k}_{lane}") for lane in range(L)] for k in range(B)]
        for lane in range(L):
            cur = Array(acc_pv[k][lane] for k in range(B))[c_p.b] if B > 1 else acc_pv[0][lane]
            st = fp32_add_align(m, m.d.comb, Mux(c_p.first, 0, cur), pv_sum[lane], prefix=f"pacc{lane}")
            total = fp32_add_round(m, m.d.comb, st, prefix=f"pacc{lane}")
            for k in range(B):
                with m.If(c_p.valid & c_p.pv & (c_p.b == k)):
                    m.d.sync += acc_pv[k][lane].eq(total)
        # A head's last accumulation is followed by its B result beats; the next head's first additions
        # into slice k happen no earlier than slice k is read here (see the module docstring).
        with m.If(c_p.valid & c_p.pv & c_p.head_end):
            m.d.sync += [draining.eq(1), drain_k.eq(0)]
        with m.Elif(draining):
            m.d.sync += drain_k.eq(drain_k + 1)
            with m.If(drain_k == B - 1):
                m.d.sync += draining.eq(0)

        c.update(acc_pv=acc_pv)

    def _results(self, m, c):
        """The result FIFO (space reserved at issue, so its writes never wait)."""
        B, D, L, M, acc_pv, acc_qk, drain_k, draining = c.B, c.D, c.L, c.M, c.acc_pv, c.acc_qk, c.drain_k, c.draining
        emit_last, emit_n, emit_v, issue, need_credit = c.emit_last, c.emit_n, c.emit_v, c.issue, c.need_credit
        occ, credits = c.occ, c.credits
        fifo = m.submodules.fifo = SyncFIFOBuffered(width=len(self.o.payload.as_value()), depth=D)
        res = Signal(self.result_layout)
        qk_lanes = [Mux(k < emit_n, acc_qk[k], 0) for k in range(M)] + [Const(0, 32)] * (L - M)
        pv_row = Array(Cat(*acc_pv[k]) for k in range(B))[drain_k] if B > 1 else Cat(*acc_pv[0])
        with m.If(draining):
            m.d.comb += [res.data.as_value().eq(pv_row), res.n.eq(L), res.last.eq(drain_k == B - 1)]
        with m.Else():
            m.d.comb += [res.data.as_value().eq(Cat(*qk_lanes)), res.n.eq(emit_n), res.last.eq(emit_last)]
        m.d.comb += [fifo.w_data.eq(res.as_value()), fifo.w_en.eq(emit_v | draining),
                     self.o.valid.eq(fifo.r_rdy), self.o.payload.eq(fifo.r_data), fifo.r_en.eq(self.o.ready)]
        pop = self.o.valid & self.o.ready
        m.d.sync += occ.eq(occ + Mux(issue & need_credit, credits, 0) - pop)
