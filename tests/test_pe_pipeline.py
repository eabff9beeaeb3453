"""The pipelined systolic PE (issue 15): the deep FP32 adder of :mod:`hw.npu.pe_adder` bit-exact at every depth,
and the pipeline formulas (:func:`hw.spec.pipeline.array_latency`, :func:`hw.spec.pipeline.compute_drain`).

The array and the matrix unit at the pipelined depths are in ``tests/test_matrix.py`` (``ARRAY_STAGES``,
``test_tiny_gemm_edge_cases[tiny-p4]``); the SoC on ``tiny-p4`` in ``tests/test_pim_pipelined.py``.
"""

import numpy as np
import pytest
from amaranth.hdl import Module
from amaranth.lib import data, wiring
from amaranth.lib.wiring import In, Out
from amaranth.sim import Simulator

from hw.npu.pe_adder import PE_ADD_CUTS, pe_bf16_mul, pe_fp32_add
from hw.spec.pipeline import array_latency, compute_drain
from sim.golden import fp as G
from sim.golden.operands import SPECIAL_BF16, SPECIAL_F32, bf16_pairs, fp32_pairs

DEPTHS = tuple(PE_ADD_CUTS)


class _Adders(wiring.Component):
    """One :func:`pe_fp32_add` of each depth 5..8, its last register here (the PE's ``ps_out``)."""

    def __init__(self):
        super().__init__({"a": In(32), "b": In(32), "s": Out(data.ArrayLayout(32, len(DEPTHS)))})

    def elaborate(self, platform):
        m = Module()
        for k, d in enumerate(DEPTHS):
            m.d.sync += self.s[k].eq(pe_fp32_add(m, self.a, self.b, d, prefix=f"add{d}"))
        return m


def test_pe_adder_every_depth_bit_exact():
    """Every special pair and random pairs (alignment, carries, near-cancellation, overflow and underflow at
    the rounding carry) through the adder at depths 5..8: the bits of hw.spec.fp.add_f32, ``latency == stages``."""
    dut = _Adders()
    rng = np.random.default_rng(15)
    aa, ab = fp32_pairs(rng, SPECIAL_F32.size**2 + 3000)
    # rounding carries into the exponent (all-ones significands) next to the largest and smallest exponents
    e = rng.choice(np.array([1, 2, 3, 126, 127, 252, 253, 254], dtype=np.uint32), 400)
    s = rng.integers(0, 2, 400).astype(np.uint32) << 31
    x = s | (e << 23) | np.uint32(0x7FFFFF)
    y = (s ^ rng.integers(0, 2, 400).astype(np.uint32) << 31) | (np.maximum(e, 25) - 24 << 23) \
        | rng.integers(0, 1 << 23, 400).astype(np.uint32)
    aa, ab = np.concatenate([aa, x]), np.concatenate([ab, y])
    n = aa.size
    trace = []

    async def bench(ctx):
        for i in range(n + max(DEPTHS)):
            if i < n:
                ctx.set(dut.a, int(aa[i]))
                ctx.set(dut.b, int(ab[i]))
            await ctx.tick()                             # trace[i]: the outputs at cycle i + 1
            trace.append([ctx.get(dut.s[k]) for k in range(len(DEPTHS))])

    sim = Simulator(dut)
    sim.add_clock(1e-8)
    sim.add_testbench(bench)
    sim.run()
    want = G.add_f32(aa, ab)
    for k, d in enumerate(DEPTHS):
        got = np.array([trace[i + d - 1][k] for i in range(n)], dtype=np.uint32)
        np.testing.assert_array_equal(got, want, err_msg=f"pe_fp32_add({d})")


def test_pe_adder_bad_depth():
    with pytest.raises(ValueError, match="PE adder pipeline depth must be one of 5, 6, 7, 8, not 4"):
        pe_fp32_add(Module(), 0, 0, 4)


def test_pipeline_formulas():
    """Written out: R + C (one-stage PE), 4R + C + 1 and 7R + C + 1 with 2-stage multipliers; the drain adds
    the scratchpad read and the accumulator read-modify-write (3)."""
    assert array_latency(16, 16) == 32 and compute_drain(16, 16) == 35
    assert array_latency(4, 4, 2, 4) == 21 and array_latency(16, 16, 2, 4) == 81
    assert array_latency(16, 16, 2, 7) == 129 and compute_drain(16, 16, 2, 7) == 132
    # the pipelined presets' PE (3-stage LUT multipliers, 4-stage adders): 4R + C + 2
    assert array_latency(4, 4, 3, 4) == 22 and array_latency(16, 16, 3, 4) == 82 and compute_drain(16, 16, 3, 4) == 85


class _Mul3(wiring.Component):
    def __init__(self):
        super().__init__({"a": In(16), "b": In(16), "p": Out(32)})

    def elaborate(self, platform):
        m = Module()
        m.d.comb += self.p.eq(pe_bf16_mul(m, self.a, self.b, prefix="mul3"))
        return m


def test_pe_mul3_bit_exact():
    """The 3-stage multiplier without a DSP block (LUT partial products): hw.spec.fp.mul_bf16's bits on every
    special pair and random pairs, ``latency == 3``."""
    dut = _Mul3()
    rng = np.random.default_rng(16)
    ma, mb = bf16_pairs(rng, SPECIAL_BF16.size**2 + 3000)
    n = ma.size
    trace = []

    async def bench(ctx):
        for i in range(n + 3):
            if i < n:
                ctx.set(dut.a, int(ma[i]))
                ctx.set(dut.b, int(mb[i]))
            await ctx.tick()
            trace.append(ctx.get(dut.p))

    sim = Simulator(dut)
    sim.add_clock(1e-8)
    sim.add_testbench(bench)
    sim.run()
    np.testing.assert_array_equal(np.array(trace[2:n + 2], dtype=np.uint32), G.mul_bf16(ma, mb))
