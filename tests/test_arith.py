"""Arithmetic units: golden model against float64 and hand-checked cases; RTL bit-exact against the golden model."""

import math

import numpy as np
import pytest
from amaranth.hdl import Module
from amaranth.lib import data, wiring
from amaranth.lib.wiring import In, Out

from hw.arith import FP_DPI_SOURCES, AdderTree, ArithArray, FP32Adder
from hw.mac_unit import MacUnit
from sim.build import build
from sim.golden import fp as G
from sim.golden.operands import SPECIAL_BF16, SPECIAL_F32, bf16_pairs, fp32_pairs

F = G.f32_bits


def f(x):
    return int(F(np.float32(x)))


# -- golden model: hand-checked cases (independent of numpy's rounding) -------------

@pytest.mark.parametrize("a,b,want", [
    (f(1.0), f(1.0), f(2.0)),
    (f(1.0), f(-1.0), 0x00000000),                 # exact cancellation: +0
    (0x80000000, 0x80000000, 0x80000000),          # -0 + -0 = -0
    (0x00000000, 0x80000000, 0x00000000),
    (0x00000001, 0x00000000, 0x00000000),          # subnormal input flushed
    (0x80000001, 0x80000000, 0x80000000),
    (0x00800000, 0x80800001 ^ 0x00000000, 0x80000000),  # result -2^-149 subnormal: flushed, sign kept
    (0x7F7FFFFF, 0x7F7FFFFF, 0x7F800000),          # overflow -> +inf
    (0x7F800000, 0xFF800000, 0x7FC00000),          # inf - inf = NaN
    (0x7F800001, f(1.0), 0x7FC00000),              # NaN canonicalised
    (f(1.0), 0x33800000, f(1.0)),                  # 1 + 2^-24: tie, round to even (down)
    (0x3F800001, 0x33800000, 0x3F800002),          # tie, round to even (up)
    (f(1.0), 0x33800001, 0x3F800001),              # just above the tie rounds up
])
def test_golden_add_cases(a, b, want):
    assert int(G.add_f32(np.uint32(a), np.uint32(b))) == want
    assert int(G.add_f32(np.uint32(b), np.uint32(a))) == want


@pytest.mark.parametrize("a,b,want", [
    (0x3F80, 0x3F80, f(1.0)),
    (0x3FC0, 0x3FC0, f(2.25)),
    (0x0001, 0x3F80, 0x00000000),                  # subnormal operand is zero
    (0x8080, 0x0080, 0x80000000),                  # 2^-126 * 2^-126 underflows: -0
    (0x7F80, 0x0000, 0x7FC00000),                  # inf * 0 = NaN
    (0x7F80, 0xBF80, 0xFF800000),
    (0x7F7F, 0x7F7F, 0x7F800000),                  # overflow -> inf
    (0x3F81, 0x3F81, 0x3F820200),                  # (1+2^-7)^2 = 1 + 2^-6 + 2^-14 exactly
])
def test_golden_mul_cases(a, b, want):
    assert int(G.mul_bf16(np.uint16(a), np.uint16(b))) == want


# -- golden model against float64: stated bounds ----------------------------------------

def _normal(bits):
    x = G.bits_to_f32(bits).astype(np.float64)
    return np.isfinite(x) & (np.abs(x) >= 2.0**-126)


def test_golden_mul_exact_vs_float64():
    """A BF16 x BF16 product in the normal range is exact: error 0 against float64."""
    rng = np.random.default_rng(10)
    a, b = bf16_pairs(rng, 200_000)
    p = G.mul_bf16(a, b)
    ref = G.bf16_to_f32(a).astype(np.float64) * G.bf16_to_f32(b).astype(np.float64)
    ok = _normal(p) & _normal(G.f32_bits(G.bf16_to_f32(a))) & _normal(G.f32_bits(G.bf16_to_f32(b)))
    assert ok.sum() > 100_000
    np.testing.assert_array_equal(G.bits_to_f32(p)[ok].astype(np.float64), ref[ok])


def test_golden_add_vs_float64():
    """Normal-range sums are within half an ulp: |err| <= 2^-24 |exact|."""
    rng = np.random.default_rng(11)
    a, b = fp32_pairs(rng, 200_000)
    s = G.add_f32(a, b)
    with np.errstate(invalid="ignore"):
        exact = G.bits_to_f32(a).astype(np.float64) + G.bits_to_f32(b).astype(np.float64)
    ok = _normal(s) & _normal(a) & _normal(b)
    assert ok.sum() > 100_000
    err = np.abs(G.bits_to_f32(s)[ok].astype(np.float64) - exact[ok])
    assert np.all(err <= 2.0**-24 * np.abs(exact[ok]))


def test_golden_dot_vs_float64():
    """Adder tree + accumulator on random BF16 dot products of length n:
    |err| <= (log2(16) + n/16) * 2^-24 * sum|w x| (one rounding per addition on the path)."""
    rng = np.random.default_rng(12)
    for n_cols in (1, 8, 48, 192):
        w = G.bf16_bits(rng.standard_normal((n_cols, 16)))
        x = G.bf16_bits(rng.standard_normal((n_cols, 16)))
        got = float(G.bits_to_f32(G.accumulate(np.uint32(0), G.mac_lanes(w, x))))
        wf, xf = G.bf16_to_f32(w).astype(np.float64), G.bf16_to_f32(x).astype(np.float64)
        exact = float((wf * xf).sum())
        bound = (4 + n_cols) * 2.0**-24 * float(np.abs(wf * xf).sum())
        assert abs(got - exact) <= bound, (n_cols, got, exact, bound)


# -- construction checks --------------------------------------------------------------

@pytest.mark.parametrize("ctor,msg", [
    (lambda: FP32Adder(5), "stages must be 0 to 4, not 5"),
    (lambda: AdderTree(12), "power of two"),
    (lambda: MacUnit(1), "power of two of at least 2"),
    (lambda: ArithArray(0), "at least 1"),
    (lambda: MacUnit(16, fp_impl="fast"), "FP implementation must be one of rtl, dpi, not 'fast'"),
])
def test_bad_parameters(ctor, msg):
    with pytest.raises(ValueError, match=msg):
        ctor()


# -- RTL on the Amaranth simulator (fast tier) -----------------------------------------

def test_arith_amaranth_sim():
    """Every special x special pair plus random ones through one multiplier and one adder."""
    from amaranth.sim import Simulator

    dut = ArithArray(1)
    rng = np.random.default_rng(3)
    ma, mb = bf16_pairs(rng, SPECIAL_BF16.size**2 + 200)
    aa, ab = fp32_pairs(rng, SPECIAL_F32.size**2 + 200)
    n = max(ma.size, aa.size)
    ma, mb = np.resize(ma, n), np.resize(mb, n)
    aa, ab = np.resize(aa, n), np.resize(ab, n)
    got_p, got_s = [], []

    async def bench(ctx):
        for i in range(n + 2):
            if i < n:
                ctx.set(dut.ma[0], int(ma[i]))
                ctx.set(dut.mb[0], int(mb[i]))
                ctx.set(dut.aa[0], int(aa[i]))
                ctx.set(dut.ab[0], int(ab[i]))
            await ctx.tick()
            got_p.append(ctx.get(dut.mp[0]))
            got_s.append(ctx.get(dut.sum[0]))

    sim = Simulator(dut)
    sim.add_clock(1e-8)
    sim.add_testbench(bench)
    sim.run()
    np.testing.assert_array_equal(np.array(got_p[:n], dtype=np.uint32), G.mul_bf16(ma, mb))
    np.testing.assert_array_equal(np.array(got_s[1:n + 1], dtype=np.uint32), G.add_f32(aa, ab))


# -- RTL on Verilator / Icarus (cocotb) ----------------------------------------------------

ARRAY_K = 32


def arith_build(sim, fp_impl="rtl"):
    extra = FP_DPI_SOURCES if fp_impl == "dpi" else ()
    return build(lambda: ArithArray(ARRAY_K, fp_impl=fp_impl), name="arith_array", key=f"k={ARRAY_K} {fp_impl}",
                 sim=sim, extra_sources=extra)


def mac_build(sim, lanes=16, fp_impl="rtl"):
    extra = FP_DPI_SOURCES if fp_impl == "dpi" else ()
    return build(lambda: MacUnit(lanes, fp_impl=fp_impl), name="mac_unit", key=f"lanes={lanes} {fp_impl}", sim=sim,
                 extra_sources=extra)


class GatedMac(wiring.Component):
    """``MacUnit(clock_gate=True)`` behind one register stage: its gate samples ``valid`` on the falling
    edge, so ``valid`` must come from a flop (as in the PIM bank), not from a testbench writing at that edge."""

    def __init__(self, lanes, fp_impl="rtl"):
        self._lanes = lanes
        self._fp_impl = fp_impl
        super().__init__({"valid": In(1), "w": In(data.ArrayLayout(16, lanes)), "x": In(data.ArrayLayout(16, lanes)),
                          "acc_load": In(1), "acc_value": In(32), "acc": Out(32)})

    def elaborate(self, platform):
        m = Module()
        m.submodules.mac = mac = MacUnit(self._lanes, clock_gate=True, fp_impl=self._fp_impl)
        for name in ("valid", "w", "x", "acc_load", "acc_value"):
            m.d.sync += getattr(mac, name).eq(getattr(self, name))
        m.d.comb += self.acc.eq(mac.acc)
        return m


def gated_mac_build(sim, lanes=16, fp_impl="rtl"):
    extra = FP_DPI_SOURCES if fp_impl == "dpi" else ()
    return build(lambda: GatedMac(lanes, fp_impl), name="mac_unit_gated", key=f"lanes={lanes} gated {fp_impl}",
                 sim=sim, extra_sources=extra)


def test_arith_rtl_verilator_1m():
    """10^6 multiply and 10^6 add operand sets, bit-exact (all special pairs included)."""
    arith_build("verilator").run("sim.tb.arith_tb", "arith_array_random",
                                 env={"N_SETS": 1_000_000, "SEED": 1})


def test_arith_dpi_cells_verilator_1m():
    """The behavioural FP cells (fp_impl="dpi", the SoC's long-run build) on the same 10^6 operand sets as
    the gates: bit-exact with the golden model, hence with the gates."""
    arith_build("verilator", "dpi").run("sim.tb.arith_tb", "arith_array_random",
                                        env={"N_SETS": 1_000_000, "SEED": 1})


def test_mac_unit_dpi_cells_verilator():
    mac_build("verilator", fp_impl="dpi").run("sim.tb.arith_tb", "mac_unit_random",
                                             env={"N_DOTS": 300, "MAX_COLS": 64,
                                                  "MAC_LATENCY": MacUnit.latency_for(16)})


def test_mac_unit_rtl_verilator():
    mac_build("verilator").run("sim.tb.arith_tb", "mac_unit_random",
                               env={"N_DOTS": 300, "MAX_COLS": 64, "MAC_LATENCY": MacUnit.latency_for(16)})


def test_mac_unit_clock_gated_rtl_verilator():
    """The clock-gated datapath (PIM banks) gives the same bits, with columns in bursts and idle gaps."""
    gated_mac_build("verilator").run("sim.tb.arith_tb", "mac_unit_random",
                                     env={"N_DOTS": 200, "MAX_COLS": 32,
                                          "MAC_LATENCY": MacUnit.latency_for(16) + 1})


def test_mac_unit_clock_gated_dpi_cells_verilator():
    """The PIM banks' long-run build: gated datapath with registered behavioural multipliers."""
    gated_mac_build("verilator", fp_impl="dpi").run("sim.tb.arith_tb", "mac_unit_random",
                                                    env={"N_DOTS": 200, "MAX_COLS": 32,
                                                         "MAC_LATENCY": MacUnit.latency_for(16) + 1})


@pytest.mark.icarus
def test_mac_unit_clock_gated_rtl_icarus():
    gated_mac_build("icarus").run("sim.tb.arith_tb", "mac_unit_random",
                                  env={"N_DOTS": 8, "MAX_COLS": 8, "MAC_LATENCY": MacUnit.latency_for(16) + 1})


@pytest.mark.icarus
def test_arith_rtl_icarus_subset():
    arith_build("icarus").run("sim.tb.arith_tb", "arith_array_random", env={"N_SETS": 2000, "SEED": 5})


@pytest.mark.icarus
def test_mac_unit_rtl_icarus_subset():
    mac_build("icarus").run("sim.tb.arith_tb", "mac_unit_random",
                            env={"N_DOTS": 8, "MAX_COLS": 8, "MAC_LATENCY": MacUnit.latency_for(16)})


def test_build_cache_reused():
    """A second build of the same design reuses the cached simulator build."""
    first = arith_build("verilator")
    second = arith_build("verilator")
    assert second.reused and second.build_dir == first.build_dir
    assert second.build_seconds < 2.0


def test_failing_cocotb_test_fails_pytest():
    """A cocotb failure reaches pytest with its message (here: wrong latency makes the check fail)."""
    from sim.build import CocotbFailure

    with pytest.raises(CocotbFailure, match="RTL 0x"):
        mac_build("verilator").run("sim.tb.arith_tb", "mac_unit_random",
                                   env={"N_DOTS": 2, "MAX_COLS": 4, "MAC_LATENCY": 2})


def test_mac_latency():
    assert MacUnit.latency_for(16) == 1 + 8 + 1
    assert math.log2(16) * 2 == AdderTree(16).latency


def test_waves_written(monkeypatch):
    """WAVES=1 builds with FST tracing and writes build/tests/<test>/dump.fst."""
    from sim.build import BUILD_ROOT

    monkeypatch.setenv("WAVES", "1")
    b = mac_build("verilator")
    assert b.waves
    b.run("sim.tb.arith_tb", "mac_unit_random", test_name="waves_check",
          env={"N_DOTS": 2, "MAX_COLS": 4, "MAC_LATENCY": MacUnit.latency_for(16)})
    fst = BUILD_ROOT / "tests" / "waves_check-verilator" / "dump.fst"
    assert fst.exists() and fst.stat().st_size > 1000
