"""The PIM processing unit's datapath (:class:`MacUnit`): ``lanes`` BF16 multipliers, an FP32 adder tree and an
FP32 accumulator, flat or pipelined (issue 15), built from the arithmetic pieces of :mod:`hw.arith`, whose
numerics contract it keeps. The golden order of its sums is :func:`hw.spec.fp.accumulate`."""

from amaranth.hdl import Cat, ClockSignal, DomainRenamer, Module, Mux, Signal
from amaranth.lib import data, wiring
from amaranth.lib.wiring import In, Out

from .arith import (
    MAX_ADD_STAGES,
    AdderTree,
    _check_stages,
    bf16_mul,
    bf16_mul_pipe,
    check_fp_impl,
    combine_schedule,
    fp32_add_align,
    fp32_add_pipe,
    fp32_add_round,
)
from .clockgate import gated_domain
from .spec.pipeline import combine_latency, mac_latency

__all__ = ["MacUnit"]


class MacUnit(wiring.Component):
    """One processing-unit datapath: ``lanes`` BF16 multipliers, adder tree, FP32 accumulator.

    A column of weights ``w`` and inputs ``x`` entering with ``valid`` is added
    to the accumulator ``latency`` cycles later: ``acc = acc + tree(w * x)``
    (the sum of the lanes first, then one addition into the accumulator). The
    accumulator adder is combinational with a registered result, so
    back-to-back columns accumulate at one per cycle.

    ``acc_load`` writes ``acc_value`` into the accumulator at once (bias
    preload or clear); the caller must not load while MACs are in flight.

    Parameters
    ----------
    lanes : int
        Multipliers (a power of two).
    clock_gate : bool
        See below.
    fp_impl : str
        ``"rtl"`` or ``"dpi"`` (:func:`check_fp_impl`).
    mul_stages : int
        Pipeline depth of the multipliers, 1 (default) or 2 (:func:`bf16_mul_pipe`).
    tree_stages : int
        Pipeline depth of each adder-tree level, 1 to 4 (default 2; :class:`AdderTree`).
    acc_stages : int
        1 (default): the accumulator above, one FP32 addition in a one-cycle loop.
        ``P`` in 2 to 4: **interleaved partial sums** (issue 15), so that no full FP32 addition sits in a
        one-cycle loop. ``P`` partials ``p0 .. p(P-1)``; after a load ``p0 = acc_value`` and the others
        are ``-0`` (the exact identity of the addition: ``x + (-0) = x`` for every ``x`` the adder
        returns unchanged). The ``k``-th column since the load or the last combine is added into
        ``p(k mod P)`` through a ``P``-stage adder (:func:`fp32_add_pipe`, its last register being the
        partial itself), so a partial is read again ``P`` cycles after it was issued at the earliest.
        For timing (issue 15) the adder's operands are registers loaded a cycle ahead (the partial the
        issue will read, taken from the adder's output when it is written on that edge, and the adder
        tree's sum, the tree's last register being this one): the loop is still ``P`` registers and the
        latencies are the same.
        ``combine`` (one cycle) adds the partials in the fixed pairwise order of
        :func:`combine_schedule` (``(p0+p1)+(p2+p3)`` for 4) into ``p0``, sets the others to ``-0``
        and restarts at ``p0``; ``acc`` shows ``p0``, so it holds the total ``combine_latency`` cycles
        after ``combine``. The golden model is :func:`hw.spec.fp.accumulate` with ``stages=P``
        (:class:`hw.spec.fp.InterleavedAccumulator` for load / add / combine sequences).

    Members
    -------
    valid : In(1)
    w, x : In(ArrayLayout(16, lanes))
    acc_load : In(1)
    acc_value : In(32)
    combine : In(1)
        Only when ``acc_stages > 1``. Assert for one cycle, ``latency`` cycles after the last column
        entered at the earliest (when its partial holds it); no column may enter and no load happen until
        ``acc`` holds the total, ``combine_latency`` cycles later.
    acc : Out(32)

    ``clock_gate=True`` clocks the multipliers and the adder tree through a
    clock gate that is open only while a column is in flight (the enable is
    sampled on the falling edge, as a latch-based gating cell does, so the
    gated clock has no glitch). An idle PIM processing unit then has no
    switching pipeline (the power argument of clock gating), and Verilator,
    which evaluates every flop's input logic on each edge of its clock, skips
    the idle datapath: the 32 processing units of the default PIM device were
    about half of the SoC's simulation time. Results are identical either way
    (tests/test_arith.py runs both). Off by default: see :mod:`hw.clockgate`.
    The accumulator (and its pipeline when ``acc_stages > 1``) stays on the ungated clock.

    With the default depths (1, 2, 1) the netlist is the one the unit has always had.
    """

    def __init__(self, lanes: int = 16, clock_gate: bool = False, fp_impl: str = "rtl", *,
                 mul_stages: int = 1, tree_stages: int = 2, acc_stages: int = 1):
        if not isinstance(lanes, int) or lanes < 2 or lanes & (lanes - 1):
            raise ValueError(f"MAC lanes must be a power of two of at least 2, not {lanes!r}")
        self.lanes = lanes
        self._clock_gate = bool(clock_gate)
        self._fp_impl = check_fp_impl(fp_impl)
        self.mul_stages = _check_stages("MAC multiplier stages", mul_stages, (1, 2))
        self.tree_stages = _check_stages("MAC adder tree stages", tree_stages, tuple(range(1, MAX_ADD_STAGES + 1)))
        self.acc_stages = _check_stages("MAC accumulator stages", acc_stages, tuple(range(1, MAX_ADD_STAGES + 1)))
        ports = {
            "valid": In(1),
            "w": In(data.ArrayLayout(16, lanes)),
            "x": In(data.ArrayLayout(16, lanes)),
            "acc_load": In(1),
            "acc_value": In(32),
            "acc": Out(32),
        }
        if acc_stages > 1:
            ports["combine"] = In(1)
        super().__init__(ports)

    @staticmethod
    def latency_for(lanes: int, mul_stages: int = 1, tree_stages: int = 2, acc_stages: int = 1) -> int:
        """Cycles from a column entering to the accumulator (its partial when ``acc_stages > 1``) holding its sum."""
        return mac_latency(lanes, mul_stages, tree_stages, acc_stages)

    @staticmethod
    def combine_latency_for(acc_stages: int = 1) -> int:
        """Cycles from ``combine`` to ``acc`` holding the total: 0 for one accumulator (no combine), else
        the :func:`combine_schedule` of ``acc_stages`` partials (2, 6, 9 for 2, 3, 4), whose first addition
        is issued in the cycle of ``combine``."""
        return combine_latency(acc_stages)

    @property
    def latency(self) -> int:
        return self.latency_for(self.lanes, self.mul_stages, self.tree_stages, self.acc_stages)

    @property
    def combine_latency(self) -> int:
        return self.combine_latency_for(self.acc_stages)

    @property
    def result_latency(self) -> int:
        """Cycles from the last column entering to ``acc`` holding the total, with ``combine`` at the
        earliest (``latency`` after that column): what a read of the accumulator must wait."""
        return self.latency + self.combine_latency

    def elaborate(self, platform):
        m = Module()
        dp = "mac" if self._clock_gate else "sync"
        if self.acc_stages > 1:
            # The tree's last register is the accumulator's operand register (see _interleaved_accumulator).
            tree = AdderTree(self.lanes, self.tree_stages, fp_impl=self._fp_impl, out_reg=False)
        else:
            tree = AdderTree(self.lanes, self.tree_stages, fp_impl=self._fp_impl)
        m.submodules.tree = DomainRenamer(dp)(tree) if dp != "sync" else tree
        for k in range(self.lanes):
            # Gated: the operands change with the bank's storage every cycle, the product register only
            # on the gated edges; a registered behavioural cell is called only then.
            if self.mul_stages == 1:
                p = bf16_mul(m, m.d[dp], self.w[k], self.x[k], prefix=f"mul{k}", fp_impl=self._fp_impl,
                             reg_clock=ClockSignal(dp) if self._clock_gate else None)
            else:
                p = bf16_mul_pipe(m, self.w[k], self.x[k], self.mul_stages, prefix=f"mul{k}",
                                  fp_impl=self._fp_impl, domain=dp)
            m.d.comb += tree.i[k].eq(p)
        # valid travels alongside the multiplier and the tree (ungated).
        valid = self.valid
        in_flight = []
        for stage in range(self.mul_stages + tree.latency):
            in_flight.append(valid)
            nxt = Signal(name=f"valid_s{stage + 1}")
            m.d.sync += nxt.eq(valid)
            valid = nxt
        if self._clock_gate:
            # The next rising edge must clock the datapath when any stage's input holds a valid column.
            gated_domain(m, "mac", Cat(*in_flight).any())

        if self.acc_stages > 1:
            # The column's valid one and two cycles before the accumulator (the operand selection).
            self._interleaved_accumulator(m, valid, in_flight[-1], in_flight[-2], tree.o)
            return m
        acc = Signal(32, name="acc_reg")
        st = fp32_add_align(m, m.d.comb, acc, tree.o, prefix="acc", fp_impl=self._fp_impl)
        total = fp32_add_round(m, m.d.comb, st, prefix="acc")
        with m.If(self.acc_load):
            m.d.sync += acc.eq(self.acc_value)
        with m.Elif(valid):
            m.d.sync += acc.eq(total)
        m.d.comb += self.acc.eq(acc)
        return m

    def _interleaved_accumulator(self, m: Module, valid, valid_1, valid_2, term):
        """``acc_stages`` partial sums behind one ``acc_stages``-deep adder (see the class docstring).

        ``valid`` is the column's valid at the accumulator, ``valid_1`` / ``valid_2`` one / two cycles earlier."""
        P = self.acc_stages
        neg_zero = 0x80000000
        parts = [Signal(32, name=f"acc_p{j}", init=0 if j == 0 else neg_zero) for j in range(P)]
        slot = Signal(range(P), name="acc_slot")            # the partial the next column goes into
        ops, cycles = combine_schedule(P, P)
        combining = Signal(name="acc_combining")
        step = Signal(range(cycles + 1), name="acc_combine_step")

        # One issue per cycle: a column into its partial, or a step of the combine schedule.
        # Step 0 of the schedule is issued in the cycle of ``combine`` itself, the later ones from ``step``.
        issue = Signal(name="acc_issue")
        dest = Signal(range(P), name="acc_dest")
        with m.If(self.combine | combining):
            with m.Switch(Mux(combining, step, 0)):
                for s, _ja, _jb, jd in ops:
                    with m.Case(s):
                        m.d.comb += [issue.eq(1), dest.eq(jd)]
        with m.Elif(valid):
            m.d.comb += [issue.eq(1), dest.eq(slot)]
        # The write enable and destination travel with the operands through the adder's P - 1 registers.
        w_ens, w_dests = [issue], [dest]
        for k in range(P - 1):
            en_r, dest_r = Signal(name=f"acc_wen_s{k + 1}"), Signal(range(P), name=f"acc_wdest_s{k + 1}")
            m.d.sync += [en_r.eq(w_ens[-1]), dest_r.eq(w_dests[-1])]
            w_ens.append(en_r)
            w_dests.append(dest_r)
        w_en, w_dest = w_ens[-1], w_dests[-1]

        # Control state and its values next cycle.
        combining_next = Signal(name="acc_combining_next")
        step_next = Signal(range(cycles + 1), name="acc_combine_step_next")
        slot_next = Signal(range(P), name="acc_slot_next")
        clear = Signal(name="acc_clear")                    # the total lands in p0 on this edge
        m.d.comb += [combining_next.eq(combining), step_next.eq(step), slot_next.eq(slot),
                     clear.eq(combining & (step == cycles - 1))]
        with m.If(self.combine):
            m.d.comb += [combining_next.eq(1), step_next.eq(1)]
        with m.Elif(combining):
            m.d.comb += step_next.eq(step + 1)
            with m.If(clear):
                m.d.comb += combining_next.eq(0)
        with m.If(self.acc_load | clear):
            m.d.comb += slot_next.eq(0)
        with m.Elif(valid & ~combining):
            m.d.comb += slot_next.eq(Mux(slot == P - 1, 0, slot + 1))
        m.d.sync += [combining.eq(combining_next), step.eq(step_next), slot.eq(slot_next)]

        # The operands are registered (issue 15: no issue decode, partial-sum mux or load in front of the
        # adder's first part), selected from the values the partials will hold in the cycle of the issue. A
        # partial written on the edge that loads the operand register is taken from the adder's output
        # (bypass), as its own register takes it, so the loop stays ``P`` registers long (the operand
        # register and the adder's first P - 1) and the latencies are those of reading the partials directly.
        # The selection is decided two cycles ahead and registered, from what is known then: a step of the
        # combine schedule, else a column (its valid two stages before the accumulator), else the operands
        # of step 0 for a ``combine`` that may arrive (it never coincides with a column, see ``combine``).
        # Only the inputs of the cycle before the issue override it: ``acc_load`` (p0 = acc_value, the
        # others -0) and ``combine`` (then step 1 of the schedule issues next; its partials were written
        # before, as the last column's partial was at the latest ``latency`` after it entered).
        assert ops[0][:3] == (0, 0, 1)
        step1 = [op for op in ops if op[0] == 1]
        combining_2 = combining_next & ~(step_next == cycles - 1)        # combining two cycles ahead
        clear_1 = combining_next & (step_next == cycles - 1)             # clears on the next edge
        slot_2 = Signal(range(P), name="acc_slot_2")
        m.d.comb += slot_2.eq(slot_next)
        with m.If(clear_1):
            m.d.comb += slot_2.eq(0)
        with m.Elif(valid_1 & ~combining_next):
            m.d.comb += slot_2.eq(Mux(slot_next == P - 1, 0, slot_next + 1))
        sel_a2 = Signal(range(P), name="acc_sel_a2")
        sel_b2 = Signal(range(P), name="acc_sel_b2")
        b_is_part2 = Signal(name="acc_b_is_part2")
        m.d.comb += [sel_a2.eq(0), sel_b2.eq(1), b_is_part2.eq(1)]       # step 0 of a combine
        with m.If(combining_2):
            with m.Switch(step_next + 1):
                for s, ja, jb, _jd in ops:
                    with m.Case(s):
                        m.d.comb += [sel_a2.eq(ja), sel_b2.eq(jb)]
        with m.Elif(valid_2):
            m.d.comb += [sel_a2.eq(slot_2), b_is_part2.eq(0)]
        # Writes on the next edge: the adder's last stage then holds what its second-to-last holds now.
        w_en_1, w_dest_1 = w_ens[-2], w_dests[-2]

        def select(sel2, name, init):
            """Registered selection of one operand: its partial, whether the partial is bypassed (written on
            the edge that loads the operand) or cleared to -0 on it."""
            sel = Signal(range(P), name=f"acc_sel_{name}", init=init)
            byp = Signal(name=f"acc_byp_{name}")
            zero = Signal(name=f"acc_zero_{name}")
            cleared = clear_1 & (sel2 != 0)
            m.d.sync += [sel.eq(sel2), byp.eq(~cleared & w_en_1 & (w_dest_1 == sel2)), zero.eq(cleared)]
            return sel, byp, zero

        total = Signal(32, name="acc_total")

        def operand(sel2, name, init, load_value, step1_part, term=None):
            sel, byp, zero = select(sel2, name, init)
            rest = Signal(32, name=f"acc_rest_{name}")
            with m.Switch(sel):
                for j in range(P):
                    with m.Case(j):
                        m.d.comb += rest.eq(parts[j])
            with m.If(self.acc_load):
                m.d.comb += rest.eq(load_value)
            if step1_part is not None:
                with m.Elif(self.combine):
                    m.d.comb += rest.eq(parts[step1_part])
            with m.Elif(zero):
                m.d.comb += rest.eq(neg_zero)
            op = Signal(32, name=f"acc_{name}", init=0 if init == 0 else neg_zero)
            value = Mux(byp & ~self.acc_load & ~self.combine, total, rest)
            if term is not None:
                is_term, term_value = term
                value = Mux(is_term, term_value, value)
            m.d.sync += op.eq(value)
            return op

        b_is_part1 = Signal(name="acc_b_is_part1", init=1)
        m.d.sync += b_is_part1.eq(b_is_part2)
        op_a = operand(sel_a2, "op_a", 0, self.acc_value, step1[0][1] if step1 else None)
        # The second operand: a partial (combine) or the column's sum, ``term`` being the adder tree's
        # output before its last register, which is this one.
        op_b = operand(sel_b2, "op_b", 1, neg_zero, step1[0][2] if step1 else None,
                       term=(Mux(self.combine, 0, ~b_is_part1), term))
        m.d.comb += total.eq(fp32_add_pipe(m, op_a, op_b, P, prefix="acc", fp_impl=self._fp_impl, out_reg=False))

        with m.If(self.acc_load):
            m.d.sync += parts[0].eq(self.acc_value)
            m.d.sync += [p.eq(neg_zero) for p in parts[1:]]
        with m.Else():
            with m.If(w_en):
                with m.Switch(w_dest):
                    for j in range(P):
                        with m.Case(j):
                            m.d.sync += parts[j].eq(total)
            with m.If(clear):
                # The other partials restart from -0.
                m.d.sync += [p.eq(neg_zero) for p in parts[1:]]
        m.d.comb += self.acc.eq(parts[0])
