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

Clock rate and the PE pipeline (issue 15): in the one-stage PE the partial-sum
path is one whole FP32 addition (align, add, normalise, round) between two
registers; on ECP5 the 4 x 4 array closes at 21.3 MHz (nextpnr, 16,699 LUT4,
1,776 FF, 16 MULT18; ``array4x4``). The PE's depth is two parameters,
``mul_stages`` (the BF16 multiplier: 1 or 2, :func:`hw.arith.bf16_mul_pipe`
with the significand product in a DSP block; 3, :func:`hw.npu.pe_adder.pe_bf16_mul`
in LUT adders) and ``add_stages`` (the FP32 adder on the partial-sum path: 1
to 4, :func:`hw.arith.fp32_add_pipe`; 5 to 8, :func:`hw.npu.pe_adder.pe_fp32_add`),
rather than one knob, because they cost differently: the multiplier sits
before the partial-sum chain, so its stages add to the latency once
(``+ mul_stages``), while every adder stage is a register on the chain
between two rows, so the partial sum moves one row every ``add_stages``
cycles and the activation skew (lane ``i`` delayed by ``add_stages * i``) and
the latency grow with ``R``: ``latency = add_stages * R + mul_stages + C - 1``
(:func:`hw.spec.pipeline.array_latency`; ``R + C`` at 1 / 1). The chain stays
feed-forward (row ``m + 1`` follows row ``m`` one cycle behind through the
adder's stages), so a row still enters every cycle and the summation order is
untouched: only the latency changes.

Measured on the 4 x 4 array (ECP5-85, the flow of ``hw/synth.py``): 2 / 4
(``fp32_add_pipe``'s four parts, ``array4x4_p4``) 82.1 MHz, critical path in
align-a (magnitude compare, exponent differences, swap); 2 / 7 (the compare and
the swap, the shift and the add, the count and the normalising shift apart)
88.2 MHz and 2 / 8 (the operands registered before the compare) 92.6 MHz,
both limited by routing (9 of 11 ns): each PE sits by its DSP block, the DSP
blocks are in a few rows of the die, so two PEs of a column are up to 26 rows
apart. With the multiplier in LUTs (3 / 8, ``array4x4_p8l``, no DSP block) the
array is placed as one block: 99.9 MHz with the multiplier's exponent tests in
its last stage, 107.7 MHz with them a stage earlier (``array4x4_p8l``). After
``fp32_add_pipe``'s re-timing (align-a one carry chain deep) the four-stage
adder reaches 99.8 MHz with DSP multipliers (``array4x4_p4``) and 106.4 MHz
with the LUT multiplier (3 / 4, ``array4x4_p4l``: 18,570 LUT4, 7,830 FF, no
MULT18; critical path 9.4 ns, a PE's ``ps_out`` into the next PE's align-a)
at half the skew of 3 / 8. The pipelined presets (``tiny-p4``,
``default-p4``) take 3 / 4: latency ``4R + C + 2`` (82 cycles on 16 x 16
instead of 32). What the deeper drain costs (``ianus run --config default-p4
--layers 1`` on the RTL, against the same tree with one-stage PEs): prefill
1,222,666 cycles (1,222,876), generation 61,720 per token (61,714); GPT-2
prefill GEMMs (L = 128) keep a compute-phase utilization of 0.972 to 0.998
(QK^T 0.972 against 0.984: 50 more drain cycles on 4,214).

A row's first-row flag reaches row ``i`` ``add_stages * i`` cycles after row
0, so the weight bus of row ``i`` is delayed by ``(add_stages - 1) * i``
cycles inside the array: the weight timing contract below holds at every
depth, and the matrix unit's sequencing does not depend on it (its drain is
:func:`hw.spec.pipeline.compute_drain`). A bypassed row (``k >= K``) passes
its partial sum through ``add_stages`` registers beside the adder.

Accumulation order (the numerics contract, reproduced by
``sim/golden/gemm.py``): for output ``(m, n)`` and K-block ``kb``, the column
sum is ``s = +0; s = s + a[k] * w[k]`` for ``k = kb*R, ..., kb*R + R - 1``
(rows with ``k >= K`` are bypassed: ``s`` passes unchanged); the accumulator
then takes ``s`` (first block, overwrite) or ``acc + s``.

Timing contract of :class:`SystolicArray` (cycle ``t``: inputs sampled at
the clock edge that ends cycle ``t``):

* an activation row presented in cycle ``T`` with ``act_valid`` appears,
  summed down each column, on ``out`` in cycle ``T + latency``
  (``latency = R + C`` for one-stage PEs, :func:`hw.spec.pipeline.array_latency`
  in general) with ``out_valid``;
* ``act_first`` on the first row of a pass switches every PE to the weights
  in its shadow registers just as that row reaches it (the flag travels with
  the row);
* weight row ``i`` of the next pass may be presented (``w_valid``,
  ``w_index = i``) in any cycle from ``T_p + i`` (``T_p``: cycle of the first
  row of the current pass) to ``T_{p+1} + i - 1``; row ``i`` of PE column
  ``j`` captures it ``j + (add_stages - 1) * i`` cycles later, never before the PE has switched to
  the current pass's weights. Hence ``T_{p+1} - T_p >= R`` when rows are
  written one per cycle.
"""

from amaranth.hdl import Cat, ClockSignal, Const, DomainRenamer, Instance, Module, Mux, ResetSignal, Signal
from amaranth.lib import data, wiring
from amaranth.lib.wiring import In, Out

from ..arith import (
    MAX_ADD_STAGES,
    bf16_mul,
    bf16_mul_pipe,
    check_fp_impl,
    fp32_add_align,
    fp32_add_pipe,
    fp32_add_round,
)
from ..clockgate import gated_domain
from ..spec.pipeline import array_latency
from .pe_adder import PE_ADD_CUTS, pe_bf16_mul, pe_fp32_add

__all__ = ["PE_MODULE", "PE_MUL_STAGES", "PE_ADD_STAGES", "ProcessingElement", "SystolicArray", "check_pe_stages",
           "pe_for", "pe_module_name"]

PE_MODULE = "npu_pe"


PE_MUL_STAGES = (1, 2, 3)
"""Allowed multiplier depths of a PE: :func:`hw.arith.bf16_mul_pipe` (1, 2: the significand product in a DSP
block), :func:`hw.npu.pe_adder.pe_bf16_mul` (3: in LUT adders)."""
PE_ADD_STAGES = (*range(1, MAX_ADD_STAGES + 1), *PE_ADD_CUTS)
"""Allowed adder depths of a PE: :func:`hw.arith.fp32_add_pipe` up to 4, :func:`hw.npu.pe_adder.pe_fp32_add` from
5 to 8."""


def check_pe_stages(mul_stages, add_stages) -> tuple[int, int]:
    """``(mul_stages, add_stages)`` if they are allowed PE depths, else ``ValueError``."""
    for what, value, allowed in (("PE multiplier stages", mul_stages, PE_MUL_STAGES),
                                 ("PE adder stages", add_stages, PE_ADD_STAGES)):
        if not isinstance(value, int) or isinstance(value, bool) or value not in allowed:
            raise ValueError(f"{what} must be one of {', '.join(map(str, allowed))}, not {value!r}")
    return mul_stages, add_stages


def pe_module_name(mul_stages: int = 1, add_stages: int = 1) -> str:
    """Verilog module name of a PE of the given depths: :data:`PE_MODULE` for the one-stage PE (so that its
    builds keep their names), ``npu_pe_m<mul>a<add>`` otherwise."""
    return PE_MODULE if (mul_stages, add_stages) == (1, 1) else f"{PE_MODULE}_m{mul_stages}a{add_stages}"


def pe_for(npu, fp_impl: str = "rtl"):
    """The PE of an NPU configuration (``hw.spec.config.NpuConfig``) for Verilog builds with ``pe_instance``:
    ``(module name, factory, key suffix)``; the suffix (for build-cache keys) is empty for the one-stage PE."""
    stages = (npu.pe_mul_stages, npu.pe_add_stages)
    suffix = "" if stages == (1, 1) else f" stages=m{stages[0]}a{stages[1]}"
    return (pe_module_name(*stages),
            lambda: ProcessingElement(fp_impl=fp_impl, mul_stages=stages[0], add_stages=stages[1]), suffix)


def _check_dim(what, value):
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{what} must be a positive integer, not {value!r}")


class ProcessingElement(wiring.Component):
    """One weight-stationary MAC: ``ps_out = ps_in + a * w`` (FP32, RNE), double-buffered weight.

    Parameters
    ----------
    fp_impl : str
        FP cells (:func:`hw.arith.check_fp_impl`).
    mul_stages : int
        Pipeline depth of the BF16 multiplier: 1 or 2 (:func:`hw.arith.bf16_mul_pipe`), 3 (in LUTs,
        :func:`hw.npu.pe_adder.pe_bf16_mul`).
    add_stages : int
        Pipeline depth of the FP32 adder on the partial-sum path: 1 to 4 (:func:`hw.arith.fp32_add_pipe`), 5 to 8
        (:func:`hw.npu.pe_adder.pe_fp32_add`).

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
        ``a_in`` in cycle ``t`` it is on ``ps_out`` in cycle ``t + latency``
        (``latency = mul_stages + add_stages``; ``ps_in`` must carry that row's
        sum in cycle ``t + mul_stages``). A bypassed row (enable 0) passes
        ``ps_in`` unchanged, ``add_stages`` cycles later.
    """

    a_in: In(16)
    f_in: In(1)
    a_out: Out(16)
    f_out: Out(1)
    w_in: In(16)
    w_en_in: In(1)
    w_we: In(1)
    ps_in: In(32)
    ps_out: Out(32)

    def __init__(self, fp_impl: str = "rtl", mul_stages: int = 1, add_stages: int = 1):
        self._fp_impl = check_fp_impl(fp_impl)
        self._mul_stages, self._add_stages = check_pe_stages(mul_stages, add_stages)
        super().__init__()

    @property
    def latency(self) -> int:
        """Cycles from ``a_in`` to ``ps_out`` for one row."""
        return self._mul_stages + self._add_stages

    @property
    def module_name(self) -> str:
        """Verilog module name of this PE for ``SystolicArray(pe_instance=True)`` (:func:`pe_module_name`)."""
        return pe_module_name(self._mul_stages, self._add_stages)

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

        if (self._mul_stages, self._add_stages) == (1, 1):
            prod = bf16_mul(m, m.d.sync, self.a_in, w_use, prefix="pe", fp_impl=self._fp_impl)
            en_p = Signal()
            m.d.sync += en_p.eq(en_use)
            st = fp32_add_align(m, m.d.comb, self.ps_in, prod, prefix="pe_add", fp_impl=self._fp_impl)
            total = fp32_add_round(m, m.d.comb, st, prefix="pe_add")
            m.d.sync += self.ps_out.eq(Mux(en_p, total, self.ps_in))
            return m

        # Pipelined: the product and its row enable arrive together after mul_stages; the adder's last
        # register is ps_out, so the sum and the bypassed ps_in (delayed alongside, with the enable) meet in
        # the mux in front of it.
        if self._mul_stages <= 2:
            prod = bf16_mul_pipe(m, self.a_in, w_use, self._mul_stages, prefix="pe", fp_impl=self._fp_impl)
        else:
            prod = pe_bf16_mul(m, self.a_in, w_use, prefix="pe", fp_impl=self._fp_impl)
        en = en_use
        for d in range(self._mul_stages):
            nen = Signal(name=f"pe_en_m{d}")
            m.d.sync += nen.eq(en)
            en = nen
        if self._add_stages <= MAX_ADD_STAGES:
            total = fp32_add_pipe(m, self.ps_in, prod, self._add_stages, prefix="pe_add", fp_impl=self._fp_impl,
                                  out_reg=False)
        else:
            total = pe_fp32_add(m, self.ps_in, prod, self._add_stages, prefix="pe_add", fp_impl=self._fp_impl)
        ps = self.ps_in
        for d in range(self._add_stages - 1):
            nen, nps = Signal(name=f"pe_en_a{d}"), Signal(32, name=f"pe_ps_a{d}")
            m.d.sync += [nen.eq(en), nps.eq(ps)]
            en, ps = nen, nps
        m.d.sync += self.ps_out.eq(Mux(en, total, ps))
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
    mul_stages, add_stages : int
        Pipeline depths of every PE's multiplier (1, 2) and FP32 adder (1 to 8; :class:`ProcessingElement`).
        The partial sums move one row every ``add_stages`` cycles, so activation lane ``i`` is delayed by
        ``add_stages * i`` cycles and the weight bus of row ``i`` by ``(add_stages - 1) * i`` (the weight
        timing contract stays the one of the one-stage array); ``latency`` is
        :func:`hw.spec.pipeline.array_latency`.

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

    def __init__(self, rows: int, cols: int, pe_instance: bool = False, clock_gate: bool = False,
                 mul_stages: int = 1, add_stages: int = 1):
        _check_dim("Array rows", rows)
        _check_dim("Array columns", cols)
        self.rows = rows
        self.cols = cols
        self._mul_stages, self._add_stages = check_pe_stages(mul_stages, add_stages)
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
    def latency(self) -> int:
        """Cycles from an activation row on ``act`` to its column sums on ``out``."""
        return array_latency(self.rows, self.cols, self._mul_stages, self._add_stages)

    @property
    def pe_module_name(self) -> str:
        """Verilog module of the PEs with ``pe_instance`` (:func:`pe_module_name`)."""
        return pe_module_name(self._mul_stages, self._add_stages)

    def elaborate(self, platform):
        m = Module()
        R, C = self.rows, self.cols
        Sm, Sa = self._mul_stages, self._add_stages
        # Domain of the whole array: "sync", or the gated "arr" (see the end of this method).
        dp = "arr" if self._clock_gate else "sync"
        pe = [[None] * C for _ in range(R)]
        for i in range(R):
            for j in range(C):
                if self._pe_instance:
                    pe[i][j] = _PEInstance(m, f"pe_{i}_{j}", dp, self.pe_module_name)
                else:
                    unit = ProcessingElement(mul_stages=Sm, add_stages=Sa)
                    m.submodules[f"pe_{i}_{j}"] = DomainRenamer(dp)(unit) if self._clock_gate else unit
                    pe[i][j] = unit

        # Input skew: lane i delayed by Sa * i cycles (with its first flag).
        for i in range(R):
            a, f = self.act[i], self.act_first & self.act_valid
            for d in range(Sa * i):
                na, nf = Signal(16, name=f"skew_a{i}_{d}"), Signal(name=f"skew_f{i}_{d}")
                m.d[dp] += [na.eq(a), nf.eq(f)]
                a, f = na, nf
            m.d.comb += [pe[i][0].a_in.eq(a), pe[i][0].f_in.eq(f)]
            for j in range(1, C):
                m.d.comb += [pe[i][j].a_in.eq(pe[i][j - 1].a_out), pe[i][j].f_in.eq(pe[i][j - 1].f_out)]

        # Weight bus: column j delayed by j cycles; row i captures when the index matches. With Sa > 1 a row's
        # first-row flag comes Sa cycles after the row above's, so the bus of row i is delayed by a further
        # (Sa - 1) * i cycles: each row captures its weight the same number of cycles after it switched.
        w_in_flight = [self.w_valid]

        def delay(bus, j, kind, at):
            """One register stage of column ``j``'s weight bus (``w``, ``v``, ``en``, ``idx``), its signals named
            ``{kind}_w{at}`` etc. (``wskew_w3_0``, ``wrow_en3_1_0``)."""
            w, v, en, idx = bus
            nw, nv = Signal(16, name=f"{kind}_w{at}"), Signal(name=f"{kind}_v{at}")
            nen, nidx = Signal(name=f"{kind}_en{at}"), Signal.like(self.w_index, name=f"{kind}_i{at}")
            m.d[dp] += [nw.eq(w), nv.eq(v), nen.eq(en), nidx.eq(idx)]
            if j == C - 1:
                w_in_flight.append(nv)
            return nw, nv, nen, nidx

        for j in range(C):
            bus = (self.w_row[j], self.w_valid, self.w_en, self.w_index)
            for d in range(j):
                bus = delay(bus, j, "wskew", f"{j}_{d}")
            for i in range(R):
                for d in range(Sa - 1 if i else 0):
                    bus = delay(bus, j, "wrow", f"{j}_{i}_{d}")
                w, v, en, idx = bus
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

    def __init__(self, m: Module, name: str, domain: str = "sync", module: str = PE_MODULE):
        ports = {}
        for port, member in ProcessingElement.__annotations__.items():
            sig = Signal(member.shape, name=f"{name}_{port}")
            setattr(self, port, sig)
            ports[("i_" if member.flow == In else "o_") + port] = sig
        m.submodules[name] = Instance(module, i_clk=ClockSignal(domain), i_rst=ResetSignal(), **ports)
