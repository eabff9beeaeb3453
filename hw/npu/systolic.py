"""Weight-stationary BF16 x BF16 -> FP32 systolic array.

Hierarchy: :class:`ProcessingElement` (one MAC) -> :class:`SystolicArray`
(``rows x cols`` PEs with input skew, weight-bus skew and output deskew).

Dataflow: weight-stationary, and why
------------------------------------
Each PE ``(i, j)`` holds one weight ``W[k0 + i, n0 + j]`` of an ``R x C``
weight block. Activation rows ``A[m, k0:k0+R]`` enter from the left, one row
per cycle; partial sums run down the columns, so column ``j`` delivers
``sum_i A[m, k0+i] * W[k0+i, n0+j]`` for row ``m`` ``R + C`` cycles after the
row entered. A *pass* is one weight block times ``M`` activation rows.

Cycle arithmetic for a GEMM ``(M x K) @ (K x N)`` with ``KB = ceil(K / R)``,
``NB = ceil(N / C)`` passes:

* weight-stationary: a pass streams ``M`` rows; the next block's ``R`` weight
  rows are written into shadow registers *while* the current pass computes
  (one weight row per cycle, row ``i`` alongside activation row ``i``), so
  passes follow back to back when ``M >= R``. Cycles of one ``COMPUTE``
  instruction = ``R`` (first block's weights) ``+ KB * NB * max(M, R) +
  (R + C + 3)`` (drain: scratchpad read, array, accumulator read-modify-write;
  it overlaps the next instruction). For GPT-2 prefill with ``L = 128`` on
  16 x 16 (``M = 128``): QK^T (K = 64, N = 128, in two N-tiles of 64) is
  ``2 * (16 + 16 * 128) + 35 = 4163`` cycles for 4096 cycles of useful MACs,
  utilization 0.984 (measured: 4164 cycles); the 768 x 768 projection,
  which the driver tiles into 36 instructions of ``M = 64``, ``K = 256``,
  ``N = 128`` (``16 + 16 * 8 * 64 = 8208`` cycles each), reaches 0.998 when
  the weight DMA keeps up.
* output-stationary would keep ``C[m, n]`` in the PE and stream ``K``
  products through it: every ``R x C`` output block costs ``K`` cycles plus
  ``R`` cycles to shift the accumulators out, which must overlap the next
  block (double accumulators, ``2 x 32`` bits per PE instead of ``2 x 16``)
  and needs ``K >= R``; and its K-sum is a single chain per PE, so a
  pipelined FP32 adder (needed for Fmax) would have to interleave several
  outputs. Weight-stationary keeps one adder per PE in a feed-forward chain
  (any adder pipelining only lengthens the skew), needs half the storage per
  PE, and its only constraint, ``M >= R`` for full rate, holds for every
  prefill GEMM with ``L >= R``. The accumulation over K-blocks happens once
  per row in ``C`` FP32 adders at the accumulator scratchpad.

Clock rate: the partial-sum path of a PE is one whole FP32 addition
(align, add, normalise, round) between two registers; on ECP5 the 4 x 4
array closes at 21.5 MHz (nextpnr, 16,699 LUT4, 1,776 FF, 16 MULT18). The
planned fix keeps the order: a register between ``fp32_add_align`` and
``fp32_add_round`` makes the partial sum move one row every 2 cycles, so the
activation skew becomes 2 cycles per row and the latency ``2R + C``.

Accumulation order (the numerics contract, reproduced by
``sim/golden/gemm.py``): for output ``(m, n)`` and K-block ``kb``, the column
sum is ``s = +0; s = s + a[k] * w[k]`` for ``k = kb*R, ..., kb*R + R - 1``
(rows with ``k >= K`` are bypassed: ``s`` passes unchanged); the accumulator
then takes ``s`` (first block, overwrite) or ``acc + s``.

Timing contract of :class:`SystolicArray` (cycle ``t``: inputs sampled at
the clock edge that ends cycle ``t``):

* an activation row presented in cycle ``T`` with ``act_valid`` appears,
  summed down each column, on ``out`` in cycle ``T + latency``
  (``latency = R + C``) with ``out_valid``;
* ``act_first`` on the first row of a pass switches every PE to the weights
  in its shadow registers just as that row reaches it (the flag travels with
  the row);
* weight row ``i`` of the next pass may be presented (``w_valid``,
  ``w_index = i``) in any cycle from ``T_p + i`` (``T_p``: cycle of the first
  row of the current pass) to ``T_{p+1} + i - 1``; row ``i`` of PE column
  ``j`` captures it ``j`` cycles later, never before the PE has switched to
  the current pass's weights. Hence ``T_{p+1} - T_p >= R`` when rows are
  written one per cycle.
"""

from amaranth.hdl import Cat, ClockSignal, Const, DomainRenamer, Instance, Module, Mux, ResetSignal, Signal
from amaranth.lib import data, wiring
from amaranth.lib.wiring import In, Out

from ..arith import bf16_mul, check_fp_impl, fp32_add_align, fp32_add_round
from ..clockgate import gated_domain

__all__ = ["PE_MODULE", "ProcessingElement", "SystolicArray"]

PE_MODULE = "npu_pe"


def _check_dim(what, value):
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{what} must be a positive integer, not {value!r}")


class ProcessingElement(wiring.Component):
    """One weight-stationary MAC: ``ps_out = ps_in + a * w`` (FP32, RNE), double-buffered weight.

    Members
    -------
    a_in, f_in : In(16), In(1)
        Activation (BF16) and the first-row-of-pass flag from the left.
    a_out, f_out : Out(16), Out(1)
        The same, registered, to the right neighbour.
    w_in, w_en_in, w_we : In(16), In(1), In(1)
        Shadow-weight write: value, row enable (0 = bypass this row), strobe.
    ps_in : In(32)
        Partial sum from above (FP32).
    ps_out : Out(32)
        Partial sum to below, registered; for the row whose activation was on
        ``a_in`` in cycle ``t`` it is on ``ps_out`` in cycle ``t + 2``
        (``ps_in`` must carry that row's sum in cycle ``t + 1``).
    """

    latency = 2

    a_in: In(16)
    f_in: In(1)
    a_out: Out(16)
    f_out: Out(1)
    w_in: In(16)
    w_en_in: In(1)
    w_we: In(1)
    ps_in: In(32)
    ps_out: Out(32)

    def __init__(self, fp_impl: str = "rtl"):
        self._fp_impl = check_fp_impl(fp_impl)
        super().__init__()

    def elaborate(self, platform):
        m = Module()
        w_act = Signal(16)
        en_act = Signal()
        w_sh = Signal(16)
        en_sh = Signal()
        # The row that carries f_in uses the shadow weight already in this cycle.
        w_use = Mux(self.f_in, w_sh, w_act)
        en_use = Mux(self.f_in, en_sh, en_act)
        m.d.sync += [self.a_out.eq(self.a_in), self.f_out.eq(self.f_in)]
        with m.If(self.f_in):
            m.d.sync += [w_act.eq(w_sh), en_act.eq(en_sh)]
        with m.If(self.w_we):
            m.d.sync += [w_sh.eq(self.w_in), en_sh.eq(self.w_en_in)]

        prod = bf16_mul(m, m.d.sync, self.a_in, w_use, prefix="pe", fp_impl=self._fp_impl)
        en_p = Signal()
        m.d.sync += en_p.eq(en_use)
        st = fp32_add_align(m, m.d.comb, self.ps_in, prod, prefix="pe_add", fp_impl=self._fp_impl)
        total = fp32_add_round(m, m.d.comb, st, prefix="pe_add")
        m.d.sync += self.ps_out.eq(Mux(en_p, total, self.ps_in))
        return m


class SystolicArray(wiring.Component):
    """``rows x cols`` weight-stationary array of :class:`ProcessingElement` with skew and deskew.

    See the module docstring for the dataflow and the timing contract.

    Parameters
    ----------
    rows, cols : int
        Array shape ``R x C``: ``R`` is the K extent of a weight block, ``C``
        its N extent.
    pe_instance : bool
        Instantiate the PEs as ``Instance(PE_MODULE)`` (one Verilog module,
        generated from :class:`ProcessingElement` and passed to the simulator
        separately) instead of as ``R x C`` Amaranth submodules, which Amaranth
        writes out as ``R x C`` copies of the same module. With one module,
        Verilator compiles the PE once: the 16 x 16 test system shrinks from
        205,000 to 38,000 lines of Verilog. For Verilog flows only (the
        Amaranth simulator cannot run ``Instance``).
    clock_gate : bool
        Clock the PEs and the skew/deskew registers through a clock gate that
        is open while a row or a weight write is in flight
        (:mod:`hw.clockgate`); ``act_valid`` and ``w_valid`` must then come
        from flops.

    Members
    -------
    act : In(ArrayLayout(16, rows))
        One activation row (``A[m, k0:k0+R]``), BF16.
    act_valid, act_first : In(1)
        Row valid; first row of a pass (switch weights).
    w_row : In(ArrayLayout(16, cols))
        One weight row (``W[k0+i, n0:n0+C]``) for the shadow registers.
    w_valid, w_en : In(1)
        Write strobe; row enable (0: row ``i`` is bypassed, for ``k >= K``).
    w_index : In(range(rows))
        Row ``i`` written.
    out : Out(ArrayLayout(32, cols))
        Column sums (FP32) of the row presented ``latency`` cycles earlier.
    out_valid : Out(1)
    """

    def __init__(self, rows: int, cols: int, pe_instance: bool = False, clock_gate: bool = False):
        _check_dim("Array rows", rows)
        _check_dim("Array columns", cols)
        self._rows = rows
        self._cols = cols
        self._pe_instance = bool(pe_instance)
        self._clock_gate = bool(clock_gate)
        super().__init__({
            "act": In(data.ArrayLayout(16, rows)),
            "act_valid": In(1),
            "act_first": In(1),
            "w_row": In(data.ArrayLayout(16, cols)),
            "w_valid": In(1),
            "w_en": In(1),
            "w_index": In(range(max(rows, 2))),
            "out": Out(data.ArrayLayout(32, cols)),
            "out_valid": Out(1),
        })

    @property
    def rows(self) -> int:
        return self._rows

    @property
    def cols(self) -> int:
        return self._cols

    @property
    def latency(self) -> int:
        """Cycles from an activation row on ``act`` to its column sums on ``out``."""
        return self._rows + self._cols

    def elaborate(self, platform):
        m = Module()
        R, C = self._rows, self._cols
        # Domain of the whole array: "sync", or the gated "arr" (see the end of this method).
        dp = "arr" if self._clock_gate else "sync"
        pe = [[None] * C for _ in range(R)]
        for i in range(R):
            for j in range(C):
                if self._pe_instance:
                    pe[i][j] = _PEInstance(m, f"pe_{i}_{j}", dp)
                else:
                    unit = ProcessingElement()
                    m.submodules[f"pe_{i}_{j}"] = DomainRenamer(dp)(unit) if self._clock_gate else unit
                    pe[i][j] = unit

        # Input skew: lane i delayed by i cycles (with its first flag).
        for i in range(R):
            a, f = self.act[i], self.act_first & self.act_valid
            for d in range(i):
                na, nf = Signal(16, name=f"skew_a{i}_{d}"), Signal(name=f"skew_f{i}_{d}")
                m.d[dp] += [na.eq(a), nf.eq(f)]
                a, f = na, nf
            m.d.comb += [pe[i][0].a_in.eq(a), pe[i][0].f_in.eq(f)]
            for j in range(1, C):
                m.d.comb += [pe[i][j].a_in.eq(pe[i][j - 1].a_out), pe[i][j].f_in.eq(pe[i][j - 1].f_out)]

        # Weight bus: column j delayed by j cycles; row i captures when the index matches.
        w_in_flight = [self.w_valid]
        for j in range(C):
            w, v, en, idx = self.w_row[j], self.w_valid, self.w_en, self.w_index
            for d in range(j):
                nw = Signal(16, name=f"wskew_w{j}_{d}")
                nv = Signal(name=f"wskew_v{j}_{d}")
                nen = Signal(name=f"wskew_en{j}_{d}")
                nidx = Signal.like(self.w_index, name=f"wskew_i{j}_{d}")
                m.d[dp] += [nw.eq(w), nv.eq(v), nen.eq(en), nidx.eq(idx)]
                if j == C - 1:
                    w_in_flight.append(nv)
                w, v, en, idx = nw, nv, nen, nidx
            for i in range(R):
                m.d.comb += [
                    pe[i][j].w_in.eq(w),
                    pe[i][j].w_en_in.eq(en),
                    pe[i][j].w_we.eq(v & (idx == i)),
                ]

        # Partial sums down the columns; +0 enters at the top.
        for j in range(C):
            m.d.comb += pe[0][j].ps_in.eq(Const(0, 32))
            for i in range(1, R):
                m.d.comb += pe[i][j].ps_in.eq(pe[i - 1][j].ps_out)

        # Output deskew: column j delayed by C - 1 - j cycles.
        for j in range(C):
            s = pe[R - 1][j].ps_out
            for d in range(C - 1 - j):
                ns = Signal(32, name=f"deskew{j}_{d}")
                m.d[dp] += ns.eq(s)
                s = ns
            m.d.comb += self.out[j].eq(s)

        v = self.act_valid
        act_in_flight = [v]
        for d in range(self.latency):
            nv = Signal(name=f"valid_d{d}")
            m.d[dp] += nv.eq(v)
            act_in_flight.append(nv)
            v = nv
        m.d.comb += self.out_valid.eq(v)
        if self._clock_gate:
            # Everything, valid bits included, runs on the gated clock, open while a row or a weight write
            # is anywhere in the array (its valid bit set, up to out_valid, which one more edge clears):
            # idle rows behind the last one flush the first-row flags. A closed gate freezes the whole
            # array at once, so nothing inside can get out of step.
            gated_domain(m, "arr", Cat(*act_in_flight, *w_in_flight).any())
        return m


class _PEInstance:
    """Signals named like :class:`ProcessingElement`'s ports, wired to an ``Instance(PE_MODULE)``."""

    def __init__(self, m: Module, name: str, domain: str = "sync"):
        ports = {}
        for port, member in ProcessingElement.__annotations__.items():
            sig = Signal(member.shape, name=f"{name}_{port}")
            setattr(self, port, sig)
            ports[("i_" if member.flow == In else "o_") + port] = sig
        m.submodules[name] = Instance(PE_MODULE, i_clk=ClockSignal(domain), i_rst=ResetSignal(), **ports)
