# amaranth: UnusedElaboratable=no
"""Pipelined arithmetic (issue 15): the FP32 adder at every depth, the two-stage BF16 multiplier and the MAC
unit's interleaved accumulator, bit-exact against the golden model on the Amaranth simulator; the golden
model of the interleaved order against float64 within its stated bound."""

import math

import numpy as np
import pytest
from amaranth.hdl import Module
from amaranth.lib import data, wiring
from amaranth.lib.wiring import In, Out
from amaranth.sim import Simulator

from hw.arith import AdderTree, FP32Adder, bf16_mul_pipe, combine_schedule, fp32_add_pipe
from hw.mac_unit import MacUnit
from sim.golden import fp as G
from sim.golden.operands import SPECIAL_BF16, SPECIAL_F32, bf16_pairs, bf16_values, fp32_pairs

U = 2.0**-24


def gamma(k: int) -> float:
    """Higham's gamma_k = k u / (1 - k u): the bound on k roundings on a summation path."""
    return k * U / (1 - k * U)


# -- golden model of the interleaved order ------------------------------------------------

def test_golden_interleaved_order_by_hand():
    """``stages=4``: partial k mod 4, then (p0+p1)+(p2+p3); written out with add_f32 for 6 terms."""
    rng = np.random.default_rng(1)
    t = G.f32_bits(rng.standard_normal(6).astype(np.float32))
    b = G.f32_bits(np.float32(0.5))
    a = G.add_f32
    p = [a(a(b, t[0]), t[4]), a(a(G.NEG_ZERO, t[1]), t[5]), a(G.NEG_ZERO, t[2]), a(G.NEG_ZERO, t[3])]
    assert int(G.accumulate(b, t, stages=4)) == int(a(a(p[0], p[1]), a(p[2], p[3])))
    p3 = [a(a(b, t[0]), t[3]), a(a(G.NEG_ZERO, t[1]), t[4]), a(a(G.NEG_ZERO, t[2]), t[5])]
    assert int(G.accumulate(b, t, stages=3)) == int(a(a(p3[0], p3[1]), p3[2]))
    assert int(G.accumulate(b, t, stages=1)) == int(G.accumulate(b, t))


def test_golden_negative_zero_is_the_identity():
    """-0 as the initial partial changes nothing: x + (-0) is x (canonicalised, flushed) for every class."""
    x = SPECIAL_F32
    np.testing.assert_array_equal(G.add_f32(x, np.full_like(x, G.NEG_ZERO)), G.add_f32(x, x * 0 + G.NEG_ZERO))
    normal = (((x >> 23) & 0xFF) != 0) & (((x >> 23) & 0xFF) != 0xFF)
    np.testing.assert_array_equal(G.add_f32(x, G.NEG_ZERO)[normal], x[normal])
    assert int(G.add_f32(np.uint32(0), G.NEG_ZERO)) == 0 and int(G.add_f32(G.NEG_ZERO, G.NEG_ZERO)) == 0x80000000


@pytest.mark.parametrize("stages", [1, 2, 3, 4])
def test_golden_interleaved_dot_vs_float64(stages):
    """BF16 dot products with a bias through the tree (log2(16) additions per product) and ``stages``
    partials: every product is on a path of at most k = 4 + ceil(n / P) + ceil(log2 P) roundings, so
    |err| <= gamma_k (|bias| + sum |w x|)."""
    rng = np.random.default_rng(20 + stages)
    for n_cols in (1, 3, 8, 48, 192):
        w = G.bf16_bits(rng.standard_normal((n_cols, 16)))
        x = G.bf16_bits(rng.standard_normal((n_cols, 16)))
        bias = G.f32_bits(np.float32(rng.standard_normal()))
        got = float(G.bits_to_f32(G.accumulate(bias, G.mac_lanes(w, x), stages=stages)))
        wf, xf = G.bf16_to_f32(w).astype(np.float64), G.bf16_to_f32(x).astype(np.float64)
        b = float(G.bits_to_f32(bias))
        exact = float((wf * xf).sum()) + b
        k = 4 + math.ceil(n_cols / stages) + math.ceil(math.log2(stages))
        bound = gamma(k) * (abs(b) + float(np.abs(wf * xf).sum()))
        assert abs(got - exact) <= bound, (stages, n_cols, got, exact, bound)


def test_combine_schedule():
    assert combine_schedule(1, 1) == ([], 0)
    assert combine_schedule(2, 2) == ([(0, 0, 1, 0)], 2)
    assert combine_schedule(3, 3) == ([(0, 0, 1, 0), (3, 0, 2, 0)], 6)
    assert combine_schedule(4, 4) == ([(0, 0, 1, 0), (1, 2, 3, 2), (5, 0, 2, 0)], 9)
    assert [MacUnit.combine_latency_for(p) for p in (1, 2, 3, 4)] == [0, 2, 6, 9]


# -- construction ---------------------------------------------------------------------------

@pytest.mark.parametrize("ctor,msg", [
    (lambda: FP32Adder(5), "stages must be 0 to 4, not 5"),
    (lambda: AdderTree(4, 5), "stages per level must be 0 to 4, not 5"),
    (lambda: MacUnit(16, acc_stages=0), "accumulator stages must be one of 1, 2, 3, 4, not 0"),
    (lambda: MacUnit(16, tree_stages=0), "adder tree stages must be one of 1, 2, 3, 4, not 0"),
    (lambda: MacUnit(16, mul_stages=3), "multiplier stages must be one of 1, 2, not 3"),
])
def test_bad_parameters(ctor, msg):
    with pytest.raises(ValueError, match=msg):
        ctor()


def test_latencies_and_default_ports():
    assert MacUnit(16).latency == MacUnit.latency_for(16) == 10 and MacUnit(16).combine_latency == 0
    assert "combine" not in MacUnit(16).signature.members
    u = MacUnit(16, mul_stages=2, tree_stages=4, acc_stages=4)
    assert (u.latency, u.combine_latency, u.result_latency) == (2 + 16 + 4, 9, 31)
    assert "combine" in u.signature.members
    assert [AdderTree(16, s).latency for s in range(5)] == [0, 4, 8, 12, 16]


# -- RTL on the Amaranth simulator -----------------------------------------------------------

class _Units(wiring.Component):
    """One FP32Adder of each depth 1..4, one fp32_add_pipe and one FP32Adder of each depth 1..4 without its
    last register (then registered here: the MAC unit's use), and the two-stage multiplier, side by side."""

    def __init__(self):
        super().__init__({"a": In(32), "b": In(32), "ma": In(16), "mb": In(16),
                          "s": Out(data.ArrayLayout(32, 4)), "s_open": Out(data.ArrayLayout(32, 4)),
                          "s_open_c": Out(data.ArrayLayout(32, 4)), "p2": Out(32)})

    def elaborate(self, platform):
        m = Module()
        for d in range(1, 5):
            add = m.submodules[f"add{d}"] = FP32Adder(d)
            m.d.comb += [add.a.eq(self.a), add.b.eq(self.b), self.s[d - 1].eq(add.s)]
        for d in range(1, 5):
            open_s = fp32_add_pipe(m, self.a, self.b, d, prefix=f"open{d}", out_reg=False)
            m.d.sync += self.s_open[d - 1].eq(open_s)
            add = m.submodules[f"open_add{d}"] = FP32Adder(d, out_reg=False)
            m.d.comb += [add.a.eq(self.a), add.b.eq(self.b)]
            m.d.sync += self.s_open_c[d - 1].eq(add.s)
        m.d.comb += self.p2.eq(bf16_mul_pipe(m, self.ma, self.mb, 2, prefix="mul2"))
        return m


def test_adders_every_depth_and_mul2_bit_exact():
    """Every special pair and random pairs (alignment, carries, near-cancellation) through the adder at
    depths 1..4 (the same bits, ``latency == stages``) and the two-stage multiplier."""
    dut = _Units()
    rng = np.random.default_rng(7)
    aa, ab = fp32_pairs(rng, SPECIAL_F32.size**2 + 1200)
    ma, mb = bf16_pairs(rng, SPECIAL_BF16.size**2 + 600)
    n = max(aa.size, ma.size)
    aa, ab, ma, mb = np.resize(aa, n), np.resize(ab, n), np.resize(ma, n), np.resize(mb, n)
    trace_s, trace_o, trace_c, trace_p = [], [], [], []

    async def bench(ctx):
        for i in range(n + 5):
            if i < n:
                ctx.set(dut.a, int(aa[i]))
                ctx.set(dut.b, int(ab[i]))
                ctx.set(dut.ma, int(ma[i]))
                ctx.set(dut.mb, int(mb[i]))
            await ctx.tick()                             # trace[i]: the outputs at cycle i + 1
            trace_s.append([ctx.get(dut.s[d]) for d in range(4)])
            trace_o.append([ctx.get(dut.s_open[d]) for d in range(4)])
            trace_c.append([ctx.get(dut.s_open_c[d]) for d in range(4)])
            trace_p.append(ctx.get(dut.p2))

    sim = Simulator(dut)
    sim.add_clock(1e-8)
    sim.add_testbench(bench)
    sim.run()
    want_s, want_p = G.add_f32(aa, ab), G.mul_bf16(ma, mb)
    for d in range(1, 5):
        got = np.array([trace_s[i + d - 1][d - 1] for i in range(n)], dtype=np.uint32)
        np.testing.assert_array_equal(got, want_s, err_msg=f"FP32Adder({d})")
        # without its last register the sum comes d - 1 cycles after the operands (then one here)
        got = np.array([trace_o[i + d - 1][d - 1] for i in range(n)], dtype=np.uint32)
        np.testing.assert_array_equal(got, want_s, err_msg=f"fp32_add_pipe({d}, out_reg=False)")
        got = np.array([trace_c[i + d - 1][d - 1] for i in range(n)], dtype=np.uint32)
        np.testing.assert_array_equal(got, want_s, err_msg=f"FP32Adder({d}, out_reg=False)")
        if d > 1:                                      # one cycle early
            early = np.array([trace_c[i + d - 2][d - 1] for i in range(n)], dtype=np.uint32)
            assert not np.array_equal(early, want_s), f"FP32Adder({d}, out_reg=False) one cycle early"
    np.testing.assert_array_equal(np.array(trace_p[1:n + 1], dtype=np.uint32), want_p)     # latency 2


@pytest.mark.parametrize("stages", [1, 2, 3, 4])
def test_adder_tree_without_last_register(stages):
    """AdderTree(out_reg=False) (the MAC unit's tree when its accumulator has interleaved partials): the sum
    of the golden tree order, combinational ``latency - 1`` cycles after the inputs (registered here)."""

    class Tree(wiring.Component):
        def __init__(self):
            super().__init__({"i": In(data.ArrayLayout(32, 4)), "o": Out(32)})

        def elaborate(self, platform):
            m = Module()
            tree = m.submodules.tree = AdderTree(4, stages, out_reg=False)
            m.d.comb += tree.i.eq(self.i)
            m.d.sync += self.o.eq(tree.o)
            return m

    dut = Tree()
    rng = np.random.default_rng(20 + stages)
    n = 300
    xs = np.stack([fp32_pairs(rng, n)[k % 2] for k in range(4)], axis=1).astype(np.uint32)
    trace = []

    async def bench(ctx):
        for c in range(n + 2 * stages):
            if c < n:
                for k in range(4):
                    ctx.set(dut.i[k], int(xs[c, k]))
            await ctx.tick()
            trace.append(ctx.get(dut.o))                 # trace[c]: the output at cycle c + 1

    sim = Simulator(dut)
    sim.add_clock(1e-8)
    sim.add_testbench(bench)
    sim.run()
    L = AdderTree(4, stages).latency                     # the caller's register is the last stage
    want = G.adder_tree(xs)
    np.testing.assert_array_equal(np.array(trace[L - 1:L - 1 + n], dtype=np.uint32), want)
    assert not np.array_equal(np.array(trace[L - 2:L - 2 + n], dtype=np.uint32), want)     # one cycle early


def test_adder_depth0_bit_exact():
    """The combinational adder (depth 0) on the same operand mix."""
    dut = FP32Adder(0)
    rng = np.random.default_rng(8)
    aa, ab = fp32_pairs(rng, SPECIAL_F32.size**2 + 300)
    got = []

    async def bench(ctx):
        for a, b in zip(aa, ab, strict=True):
            ctx.set(dut.a, int(a))
            ctx.set(dut.b, int(b))
            await ctx.delay(1e-9)
            got.append(ctx.get(dut.s))

    sim = Simulator(dut)
    sim.add_testbench(bench)
    sim.run()
    np.testing.assert_array_equal(np.array(got, dtype=np.uint32), G.add_f32(aa, ab))


def _columns(rng, n, lanes):
    """BF16 operand columns: mostly normal values of mixed scale, sometimes specials (zeros, subnormals,
    infinities, NaNs) in a lane."""
    scale = np.float32(2.0) ** rng.integers(-8, 9, (n, 1)).astype(np.float32)
    w = G.bf16_bits(G.bf16_to_f32(bf16_values(rng, (n, lanes))) * scale)
    x = bf16_values(rng, (n, lanes))
    special = rng.random((n, lanes)) < 0.01
    w = np.where(special, rng.choice(SPECIAL_BF16, (n, lanes)), w).astype(np.uint16)
    return w, x


def _mac_schedule(rng, unit: MacUnit, n_dots: int):
    """Per-cycle inputs and checks ``(cycle, expected acc, what)`` from the golden model."""
    lanes, P = unit.lanes, unit.acc_stages
    L, CL = unit.latency, unit.combine_latency
    state = G.InterleavedAccumulator(P, 0)
    cycles: dict[int, dict] = {}
    checks = []
    t = 0
    for dot in range(n_dots):
        if rng.random() < 0.7 or dot == 0:
            bias = int(G.f32_bits(np.float32(rng.standard_normal() * 4)))
            if rng.random() < 0.05:
                bias = int(rng.choice(SPECIAL_F32))
            cycles[t] = {"acc_load": 1, "acc_value": bias}
            state.load(bias)
            checks.append((t + 1, int(bias), "load"))
            t += 1
        n = int(rng.integers(1 if P == 1 else 0, 3 * P + 4))
        w, x = _columns(rng, n, lanes)
        terms = G.mac_lanes(w, x)
        burst = rng.random() < 0.5                   # back to back (the P-cycle loop) or with idle gaps
        last, before = None, state.value
        for k in range(n):
            if not burst:
                t += int(rng.integers(0, 3))
            cycles[t] = {"valid": 1, "w": w[k], "x": x[k]}
            before = state.value
            state.add(terms[k])
            last = t
            t += 1
        if P == 1:
            checks.append((last + L - 1, int(before), "before the last column"))
            checks.append((last + L, int(state.value), "accumulated"))
            t = last + L
            continue
        t = (t if last is None else last + L) + int(rng.integers(0, 2))
        cycles[t] = {"combine": 1}
        half = 1 << (math.ceil(math.log2(P)) - 1)
        left = G.combine_partials(state.partials[:half])
        state.combine()
        checks.append((t + CL - 1, int(left), "combine, before its last addition"))
        checks.append((t + CL, int(state.value), "combined"))
        t += CL
    return cycles, checks, t + 1


def _run_mac(unit: MacUnit, n_dots: int, seed: int):
    rng = np.random.default_rng(seed)
    cycles, checks, end = _mac_schedule(rng, unit, n_dots)
    trace = [None]

    async def bench(ctx):
        for c in range(end):
            inp = cycles.get(c, {})
            ctx.set(unit.valid, inp.get("valid", 0))
            ctx.set(unit.acc_load, inp.get("acc_load", 0))
            ctx.set(unit.acc_value, inp.get("acc_value", 0))
            if unit.acc_stages > 1:
                ctx.set(unit.combine, inp.get("combine", 0))
            if "w" in inp:
                for k in range(unit.lanes):
                    ctx.set(unit.w[k], int(inp["w"][k]))
                    ctx.set(unit.x[k], int(inp["x"][k]))
            await ctx.tick()
            trace.append(ctx.get(unit.acc))          # the value at cycle c + 1

    sim = Simulator(unit)
    sim.add_clock(1e-8)
    sim.add_testbench(bench)
    sim.run()
    for c, want, what in checks:
        assert trace[c] == want, f"cycle {c} ({what}): RTL 0x{trace[c]:08x}, golden 0x{want:08x}"
    return len(checks)


@pytest.mark.parametrize("mul,tree,acc", [
    (1, 2, 1), (2, 4, 1), (1, 1, 2), (2, 3, 2), (1, 2, 3), (1, 4, 4), (2, 1, 4), (1, 3, 4),
])
def test_mac_unit_interleaved_bit_exact(mul, tree, acc):
    """4-lane MacUnit, every depth combination listed: loads, columns back to back and with gaps,
    combines (at the earliest cycle or one later) and continuing after a combine; ``acc`` equals the
    golden model at exactly ``latency`` / ``combine_latency`` (and the value before it one cycle earlier)."""
    unit = MacUnit(4, mul_stages=mul, tree_stages=tree, acc_stages=acc)
    assert _run_mac(unit, n_dots=24, seed=100 * acc + 10 * tree + mul) > 40


def test_mac_unit_16_lanes_synthesis_config():
    """The synthesised configuration (``mac16_p4``): 16 lanes, 2-stage multipliers, 4-stage adders, 4 partials."""
    unit = MacUnit(16, mul_stages=2, tree_stages=4, acc_stages=4)
    assert _run_mac(unit, n_dots=8, seed=5) > 10


def test_mac_unit_interleaved_clock_gated():
    """Clock-gated datapath with interleaved partials: the same bits (the accumulator is ungated)."""
    unit = MacUnit(4, clock_gate=True, mul_stages=2, tree_stages=2, acc_stages=2)
    assert _run_mac(unit, n_dots=12, seed=9) > 20
