"""The vector unit's exit side: row reductions (:class:`VectorReduce`) and the write port (:class:`VectorWriteBack`).

Both take a beat at its exit from the lanes (:class:`hw.npu.vector_lanes.VectorLanes`: the tag and the
``L`` lane results). A reduced beat enters the lane tree (sum) and the max tree in the same cycle; a
row's result is ready ``latency`` cycles after its last beat's exit and goes both back to the sequencer
(the statistics of SOFTMAX and LN_STATS) and, for MAX and SUM, to the write port, which has priority
there over the lane results of a later beat.
"""

from amaranth.hdl import Cat, Module, Mux, Signal
from amaranth.lib import data, wiring
from amaranth.lib.wiring import In, Out

from ..arith import AdderTree, _check_stages, fp32_add_align, fp32_add_pipe, fp32_add_round
from ..spec.vector_isa import Fmt, Opcode, VectorInstr, reduce_latency
from .fp32ext import bf16_store, delay, max_key
from .vector_parts import Phase, WritePortSignature, beat_layout, row_result_layout

__all__ = ["VectorReduce", "VectorWriteBack", "fin_write_layout"]


def fin_write_layout(lanes: int, addr_width: int) -> data.StructLayout:
    """A row's reduction to be written (MAX, SUM): ``valid`` for one cycle, the element's word ``addr``
    and its byte-pair enables ``en`` (computed by the sequencer at the row's issue)."""
    return data.StructLayout({"valid": 1, "addr": addr_width, "en": 2 * lanes})


class VectorReduce(wiring.Component):
    """Row reductions: the sum or max of each row of reduced beats.

    Per beat (``beat.valid & beat.red``), the ``L`` lane results ``y`` are reduced by a tree: sums by
    :class:`hw.arith.AdderTree` (its fixed pairwise order; a lane without an element, or masked in
    SOFTMAX, adds ``-0``, the exact identity), maxima by a tree of comparisons, one level per cycle,
    padded to the adder tree's latency (``tree_latency = 2 log2 L``), NaN winning and ``+0 > -0``
    (:func:`hw.npu.fp32ext.max_key`; a missing lane is ``-inf``). The beat sums (maxima) of a row are
    then accumulated in order into ``acc``: the first beat loads it, the others add (compare) at one beat
    per cycle. MAX and the first pass of SOFTMAX take the max; every other reduced pass the sum.

    ``result`` (valid for one cycle, ``latency = tree_latency + 1`` cycles after the row's last beat is
    at the exit) carries ``acc`` with the beat's phase, row index and group-last flag; ``fin`` asks for
    the write of ``acc`` (MAX / SUM) at the same time, to the address the beat's tag carried.

    With ``acc_stages = P > 1`` (issue 15: no full FP32 addition in a one-cycle loop) the sums go into ``P``
    **interleaved partial sums** instead: beat ``k`` of a row is added into partial ``k mod P`` through a
    ``P``-stage adder (:func:`hw.arith.fp32_add_pipe`), the partial being read again ``P`` cycles later at
    the earliest (its operand register takes the adder's output when the partial is written on that edge);
    the first ``P`` beats of a row add ``-0``, the exact identity, instead of the partial. When the row's
    last beat has been added (``P`` cycles after it), the partials are combined pairwise in a fixed order by
    an :class:`hw.arith.AdderTree` of ``P``-stage adders (``(p0+p1)+(p2+p3)``, ``(p0+p1)+p2``; a partial
    the row did not reach, fewer than ``P`` beats, is ``-0``). The maxima keep the one-cycle accumulator
    (a comparison), its result delayed to the sum's. The golden order is
    :func:`sim.golden.vector.row_sum` with ``acc_stages=P``; ``latency`` is
    :func:`hw.spec.vector_isa.reduce_latency` (``tree_latency + P + P ceil(log2 P)``). Beats may come with
    gaps; rows back to back.

    Parameters
    ----------
    lanes, addr_width, row_group
        As for :class:`hw.npu.vector.VectorUnit`.
    acc_stages : int
        1 (default: the netlist it has always had) to 4.
    tree_stages : int
        Pipeline depth of each lane-tree level (:class:`hw.arith.AdderTree`): 2 (default), 3 or 4
        (``VectorUnit(add_stages=...)``); ``tree_latency = tree_stages log2 L``.

    Members
    -------
    ins : In(VectorInstr)
    beat : In(beat_layout(lanes, addr_width, row_group))
        The tag of the beat at the exit.
    y : In(ArrayLayout(32, lanes))
    vis : In(lanes)
        Lanes visible under the mask (SOFTMAX).
    result : Out(row_result_layout(row_group))
    fin : Out(fin_write_layout(lanes, addr_width))
    """

    def __init__(self, lanes: int, addr_width: int, row_group: int, acc_stages: int = 1, tree_stages: int = 2):
        self._lanes, self._aw, self._row_group = lanes, addr_width, row_group
        self._acc_stages = _check_stages("Vector accumulator stages", acc_stages, (1, 2, 3, 4))
        self._tree_stages = _check_stages("Vector lane tree stages", tree_stages, (2, 3, 4))
        super().__init__({
            "ins": In(VectorInstr),
            "beat": In(beat_layout(lanes, addr_width, row_group)),
            "y": In(data.ArrayLayout(32, lanes)),
            "vis": In(lanes),
            "result": Out(row_result_layout(row_group)),
            "fin": Out(fin_write_layout(lanes, addr_width)),
        })

    @property
    def tree_latency(self) -> int:
        return self._tree_stages * (self._lanes.bit_length() - 1)

    @property
    def latency(self) -> int:
        return reduce_latency(self._lanes, self._acc_stages, self._tree_stages)

    def elaborate(self, platform):
        m = Module()
        L = self._lanes
        op = self.ins.op
        te, ys, vis = self.beat, self.y, self.vis

        redmax = (op == Opcode.MAX) | ((op == Opcode.SOFTMAX) & (te.phase == Phase.MAIN))
        m.submodules.tree = tree = AdderTree(L, self._tree_stages)
        assert tree.latency == self.tree_latency
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

        # The row accumulator: the first beat loads it, the others add or compare.
        acc = Signal(32)
        P = self._acc_stages
        part = Mux(r_max, max_out, tree.o)
        acc_max = Mux(max_key(max_out) > max_key(acc), max_out, acc)
        if P == 1:
            st = fp32_add_align(m, m.d.comb, acc, tree.o, prefix="acc")
            acc_sum = fp32_add_round(m, m.d.comb, st, prefix="acc")
        else:
            # acc keeps the maxima only; the sums go into the interleaved partials.
            part, acc_sum = max_out, acc
            csum = self._interleaved_sum(m, te, r_valid, tree.o)
        with m.If(r_valid):
            with m.If(r_first):
                m.d.sync += acc.eq(part)
            with m.Else():
                m.d.sync += acc.eq(Mux(r_max, acc_max, acc_sum))
        done_q = Signal()
        fin_q = Signal()
        fin_addr = Signal(self._aw)
        fin_en = Signal(2 * L)
        done_glast = Signal()
        done_phase = Signal(Phase)
        done_ri = Signal(len(r_ri))
        m.d.sync += [done_q.eq(r_valid & r_last), fin_q.eq(r_valid & r_last & r_fin),
                     fin_addr.eq(r_addr), fin_en.eq(r_en),
                     done_glast.eq(r_glast), done_phase.eq(r_phase), done_ri.eq(r_ri)]
        value = acc
        if P > 1:
            # The row's tag and maximum wait for the combined sum (P + combine latency - 1 more cycles).
            done_max = Signal()
            m.d.sync += done_max.eq(r_max)
            extra = self.latency - self.tree_latency - 1
            fields = (done_q, fin_q, fin_addr, fin_en, done_glast, done_phase.as_value(), done_ri, done_max, acc)
            late = delay(m, Cat(*fields), extra, "row_done")
            done_q, fin_q, fin_addr, fin_en, done_glast, done_phase, done_ri, done_max, late_max = [
                late[lo:hi] for lo, hi in _fields([len(f) for f in fields])]
            value = Mux(done_max, late_max, csum)
        res, fin = self.result, self.fin
        m.d.comb += [res.valid.eq(done_q), res.value.eq(value), res.phase.eq(done_phase), res.ri.eq(done_ri),
                     res.glast.eq(done_glast), fin.valid.eq(fin_q), fin.addr.eq(fin_addr), fin.en.eq(fin_en)]
        return m

    def _interleaved_sum(self, m: Module, te, r_valid, term):
        """The ``acc_stages`` interleaved partial sums of the beat sums ``term`` and their combine (see the
        class docstring); returns the combined sum, valid ``latency`` cycles after a row's last beat at the
        exit. ``r_valid``: a reduced beat's sum is on ``term``."""
        P = self._acc_stages
        neg_zero = 0x80000000
        # The beat's tag one cycle ahead (its partial is selected into the operand register then).
        pre = delay(m, Cat(te.valid & te.red, te.first), self.tree_latency - 1, "acc_pre")
        pre_valid, pre_first = pre[0], pre[1]
        parts = [Signal(32, name=f"acc_p{j}", init=neg_zero) for j in range(P)]
        slot = Signal(range(P), name="acc_slot")            # the partial of the row's next beat
        wrapped = Signal(name="acc_wrapped")                # every partial of the row has been written
        cur = Signal(range(P), name="acc_cur")              # the partial of the beat ahead
        fresh = Signal(name="acc_fresh")                    # ... not yet written in its row: it adds -0
        m.d.comb += [cur.eq(Mux(pre_first, 0, slot)), fresh.eq(pre_first | ~wrapped)]
        with m.If(pre_valid):
            m.d.sync += [slot.eq(Mux(cur == P - 1, 0, cur + 1)), wrapped.eq((wrapped & ~pre_first) | (cur == P - 1))]

        # Write enable and destination alongside the adder's P - 1 internal registers.
        dest0 = Signal(range(P), name="acc_dest")
        m.d.sync += dest0.eq(cur)
        w = delay(m, Cat(r_valid, dest0), P - 1, "acc_w")
        w_en, w_dest = w[0], w[1:]

        op_a = Signal(32, name="acc_op_a", init=neg_zero)
        total = fp32_add_pipe(m, op_a, term, P, prefix="acc", out_reg=False)
        held = Signal(32, name="acc_held")
        with m.Switch(cur):
            for j in range(P):
                with m.Case(j):
                    m.d.comb += held.eq(parts[j])
        bypass = w_en & (w_dest == cur)                     # the partial is written on this edge
        m.d.sync += op_a.eq(Mux(fresh, neg_zero, Mux(bypass, total, held)))
        with m.If(w_en):
            with m.Switch(w_dest):
                for j in range(P):
                    with m.Case(j):
                        m.d.sync += parts[j].eq(total)

        # The partials the row reached, known at its last beat, used P cycles later when the last write is in.
        used = delay(m, Cat(*[wrapped | (slot > j) for j in range(P)]), P, "acc_used")
        width = 1 << (P - 1).bit_length()
        m.submodules.combine = comb = AdderTree(width, P)
        for j in range(width):
            m.d.comb += comb.i[j].eq(Mux(used[j], parts[j], neg_zero) if j < P else neg_zero)
        assert P + comb.latency == self.latency - self.tree_latency
        return comb.o


def _fields(widths):
    """``(lo, hi)`` bit ranges of consecutive fields of ``widths``."""
    out, lo = [], 0
    for w in widths:
        out.append((lo, lo + w))
        lo += w
    return out


class VectorWriteBack(wiring.Component):
    """The write port: a row's reduction (``fin``), or else the lane results of the beat at the exit.

    Combinational. Values are stored in the destination format ``d_fmt``: FP32 as they are, BF16
    rounded to nearest even (:func:`hw.npu.fp32ext.bf16_store`), the ``L`` halves written twice so that
    the enables (computed at issue: the element's slot, or the row's half word) pick the right ones.
    A reduction is replicated into every lane, a scalar beat's lane-0 result too; the enables select
    the element.

    Parameters
    ----------
    lanes, addr_width, row_group
        As for :class:`hw.npu.vector.VectorUnit`.

    Members
    -------
    d_fmt : In(Fmt)
    fin : In(fin_write_layout(lanes, addr_width))
    acc : In(32)
        The reduction written while ``fin.valid``.
    beat : In(beat_layout(lanes, addr_width, row_group))
        The tag of the beat at the exit: written if ``valid & wr``.
    y : In(ArrayLayout(32, lanes))
    wr : Out(WritePortSignature(addr_width, 32 * lanes))
    """

    def __init__(self, lanes: int, addr_width: int, row_group: int):
        self._lanes = lanes
        super().__init__({
            "d_fmt": In(Fmt),
            "fin": In(fin_write_layout(lanes, addr_width)),
            "acc": In(32),
            "beat": In(beat_layout(lanes, addr_width, row_group)),
            "y": In(data.ArrayLayout(32, lanes)),
            "wr": Out(WritePortSignature(addr_width, 32 * lanes)),
        })

    def elaborate(self, platform):
        m = Module()
        L = self._lanes
        d_bf = self.d_fmt == Fmt.BF16
        te, ys = self.beat, self.y

        def pack_store(values):
            """Write data for ``values`` (one per lane) in the destination format."""
            halves = Cat(*[bf16_store(v) for v in values])
            return Mux(d_bf, Cat(halves, halves), Cat(*values))

        with m.If(self.fin.valid):
            m.d.comb += [self.wr.addr.eq(self.fin.addr), self.wr.en.eq(self.fin.en),
                         self.wr.data.eq(pack_store([self.acc] * L))]
        with m.Elif(te.valid & te.wr):
            m.d.comb += [self.wr.addr.eq(te.wr_addr), self.wr.en.eq(te.wr_en),
                         self.wr.data.eq(pack_store([Mux(te.scalar, ys[0], ys[ln]) for ln in range(L)]))]
        return m
