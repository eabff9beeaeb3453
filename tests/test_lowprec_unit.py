"""Low-precision PIM unit (hw/pim/lowprec_unit.py) against its golden model (sim/golden/lowprec_unit.py).

RTL on the Amaranth simulator: random column streams (hypothesis draws each group's kind: random operands,
max codes / activations / scales, zero / subnormal / infinite / NaN scales, NaN and subnormal activations,
exact cancellation, zero codes) with idle cycles between columns; every group's accumulator value is
checked bit for bit at exactly ``latency`` cycles after its last column (and the previous value one cycle
before). Golden against float64 within the stated bound on quantized GPT-2-like matrices, and the FP8
datapath's exactness (one rounding of the exact sum) on adversarial sums, RTL included.
"""

from __future__ import annotations

from fractions import Fraction

import ml_dtypes
import numpy as np
import pytest
from amaranth.sim import Simulator
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from firmware.quant import quantize_fp8, quantize_weights
from hw.mac_unit import MacUnit
from hw.pim.lowprec_unit import LowPrecMacUnit
from sim.golden import lowprec as LP
from sim.golden import lowprec_unit as L

KINDS = ("random", "random", "random", "max", "zero_scale", "sub_scale", "special_scale", "neg_scale", "nan_act",
         "sub_act", "cancel", "zero_codes", "inf_act", "huge_act")

SPECIAL_SCALES = {"fp16": (0x7C00, 0xFC00, 0x7E00, 0x7BFF), "bf16": (0x7F80, 0xFF80, 0x7FC0, 0x7F7F)}
SUB_SCALES = {"fp16": (0x0001, 0x03FF, 0x0200, 0x8001), "bf16": (0x0001, 0x007F, 0x0040, 0x8001)}


def _rand_bf16(rng, shape, lo=-20, hi=20):
    v = rng.standard_normal(shape) * np.exp2(rng.integers(lo, hi, shape))
    return v.astype(np.float32).astype(ml_dtypes.bfloat16).view(np.uint16)


def _rand_fp8(rng, shape):
    b = rng.integers(0, 0x7F, shape).astype(np.uint8)             # no NaN (0x7F)
    return b | (rng.integers(0, 2, shape).astype(np.uint8) << 7)


def _scale(rng, fmt):
    v = np.float32(rng.random() * 2.0 ** rng.integers(-12, 4))
    dt = np.float16 if fmt == "fp16" else ml_dtypes.bfloat16
    return int(np.asarray(v).astype(dt).view(np.uint16))


def make_group(rng, kind, unit: LowPrecMacUnit, scale_format):
    """(codes [cpg, 64], acts [cpg, 64], scale bits, selector) of one group of ``kind``."""
    cpg, lanes, fp8 = unit.columns_per_group, unit.lanes, unit.acts == "fp8_e4m3"
    shape = (cpg, lanes)
    codes = rng.integers(0, 16, shape).astype(np.uint8)
    acts = _rand_fp8(rng, shape) if fp8 else _rand_bf16(rng, shape)
    scale = _scale(rng, scale_format)
    sel = int(rng.integers(0, 4))
    if kind == "max":
        codes = rng.choice(np.array([0x7, 0x8, 0xF], np.uint8), shape)
        acts = rng.choice(np.array([0x7E, 0xFE], np.uint8), shape) if fp8 else \
            rng.choice(np.array([0x7F7F, 0xFF7F, 0x7F00], np.uint16), shape)
        scale = SPECIAL_SCALES[scale_format][3]
        sel = int(rng.integers(2, 4))
    elif kind == "zero_scale":
        scale = int(rng.choice([0x0000, 0x8000]))
    elif kind == "sub_scale":
        scale = int(rng.choice(SUB_SCALES[scale_format]))
    elif kind == "special_scale":
        scale = int(rng.choice(SPECIAL_SCALES[scale_format][:3]))
    elif kind == "neg_scale":
        scale |= 0x8000
    elif kind == "nan_act":
        acts[rng.integers(0, cpg), rng.integers(0, lanes)] = rng.choice([0x7F, 0xFF]) if fp8 else 0x7FC1
    elif kind == "sub_act":
        if fp8:
            acts = rng.integers(0, 8, shape).astype(np.uint8) | (rng.integers(0, 2, shape).astype(np.uint8) << 7)
        else:
            acts = _rand_bf16(rng, shape, -140, -118)             # subnormal inputs, products that underflow
    elif kind == "cancel":
        h = lanes // 2
        codes[:, h:] = codes[:, :h]
        acts[:, h:] = acts[:, :h] ^ (0x80 if fp8 else 0x8000)
    elif kind == "zero_codes":
        codes[:] = rng.choice(np.array([0x0, 0x8], np.uint8))
    elif kind == "inf_act":
        if not fp8:
            acts[rng.integers(0, cpg), rng.integers(0, lanes)] = rng.choice([0x7F80, 0xFF80])
    elif kind == "huge_act" and not fp8:
        acts = _rand_bf16(rng, shape, 110, 127)                   # sums that overflow to infinity
    return codes, acts, scale, sel


def _column_word(codes_row) -> int:
    return int.from_bytes(bytes((codes_row[0::2] | (codes_row[1::2] << 4)).astype(np.uint8)), "little")


def run_unit(unit: LowPrecMacUnit, columns, acc0: int, gaps):
    """Feed ``columns`` (word, acts, scale, sel) after loading ``acc0``; ``gaps[i]`` idle cycles before column
    ``i``. Returns (accumulator after every clock edge, the edge index at which each column entered)."""
    sim = Simulator(unit)
    sim.add_clock(1e-6)
    rec, entered = [], []

    async def tb(ctx):
        ctx.set(unit.acc_load, 1)
        ctx.set(unit.acc_value, acc0)
        await ctx.tick()
        ctx.set(unit.acc_load, 0)
        for i, (word, acts, scale, sel) in enumerate(columns):
            for _ in range(gaps[i]):
                ctx.set(unit.valid, 0)
                await ctx.tick()
                rec.append(ctx.get(unit.acc))
            ctx.set(unit.w, word)
            for k in range(unit.lanes):
                ctx.set(unit.x[k], int(acts[k]))
            ctx.set(unit.scale, scale)
            ctx.set(unit.sel, sel)
            ctx.set(unit.valid, 1)
            entered.append(len(rec))
            await ctx.tick()
            rec.append(ctx.get(unit.acc))
        ctx.set(unit.valid, 0)
        for _ in range(unit.latency + 2):
            await ctx.tick()
            rec.append(ctx.get(unit.acc))

    sim.add_testbench(tb)
    sim.run()
    return rec, entered


def check_stream(weights, acts, group, scale_format, grid_choice, seed, kinds):
    rng = np.random.default_rng(seed)
    unit = LowPrecMacUnit(weights, acts, group, scale_format, grid_choice)
    cpg = unit.columns_per_group
    groups = [make_group(rng, k, unit, scale_format) for k in kinds]
    acc0 = int(rng.choice([0, 0x80000000, int(np.float32(rng.standard_normal()).view(np.uint32))]))
    columns = [(_column_word(c[j]), a[j], s, sel) for c, a, s, sel in groups for j in range(cpg)]
    gaps = [int(rng.choice([0, 0, 0, 1, 3])) for _ in columns]
    rec, entered = run_unit(unit, columns, acc0, gaps)
    want, prev = [], acc0
    for c, a, s, sel in groups:
        prev = L.unit_acc(weights, acts, c, a, [s], [sel], prev, group, scale_format, grid_choice)
        want.append(prev)
    before = acc0
    for g, kind in enumerate(kinds):
        t = entered[(g + 1) * cpg - 1] + unit.latency - 1
        assert rec[t] == want[g], (f"group {g} ({kind}): RTL {rec[t]:#010x}, golden {want[g]:#010x} "
                                   f"({weights} x {acts}, group {group}, {scale_format} scale, seed {seed})")
        assert rec[t - 1] == before, f"group {g} ({kind}): term arrived before the stated latency"
        before = want[g]
    return len(kinds)


CASES = {"fp8": 0, "bf16": 0}


@pytest.fixture(scope="module", autouse=True)
def _report_cases():
    yield
    print(f"\nlow-precision unit RTL vs golden: {CASES['fp8']} FP8-activation groups, {CASES['bf16']} "
          "BF16-activation groups bit-exact")

fp8_params = [("int4", 128, "fp16", True), ("fp4", 128, "fp16", True), ("fp4", 64, "bf16", True),
              ("fp4", 256, "fp16", False), ("int4", 64, "bf16", True)]


@pytest.mark.parametrize("weights,group,scale_format,grid", fp8_params)
@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.integers(0, 2 ** 32 - 1), kinds=st.lists(st.sampled_from(KINDS), min_size=4, max_size=12))
def test_rtl_fp8_bit_exact(weights, group, scale_format, grid, seed, kinds):
    CASES["fp8"] += check_stream(weights, "fp8_e4m3", group, scale_format, grid, seed, kinds)


bf16_params = [("fp4", 128, "fp16", True), ("int4", 64, "bf16", True)]


@pytest.mark.parametrize("weights,group,scale_format,grid", bf16_params)
@settings(max_examples=4, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.integers(0, 2 ** 32 - 1), kinds=st.lists(st.sampled_from(KINDS), min_size=6, max_size=10))
def test_rtl_bf16_acts_bit_exact(weights, group, scale_format, grid, seed, kinds):
    CASES["bf16"] += check_stream(weights, "bf16", group, scale_format, grid, seed, kinds)


def test_rtl_bf16_weights_is_todays_unit():
    """``weights="bf16"``: 16 lanes, one column per term, bit-exact with sim.golden.fp's MAC order."""
    rng = np.random.default_rng(7)
    unit = LowPrecMacUnit("bf16", "bf16")
    assert unit.lanes == 16 and unit.latency == MacUnit.latency_for(16)
    C = 24
    w = _rand_bf16(rng, (C, 16))
    x = _rand_bf16(rng, (C, 16))
    w[3, 5], x[9, 2], x[12, 0] = 0x7FC1, 0x0001, 0x7F80          # NaN weight, subnormal act, infinite act
    words = [int.from_bytes(w[c].astype("<u2").tobytes(), "little") for c in range(C)]
    rec, entered = run_unit(unit, [(words[c], x[c], 0, 0) for c in range(C)], 0, [0] * C)
    prev = 0
    for c in range(C):
        prev = L.unit_acc("bf16", "bf16", w[c:c + 1], x[c:c + 1], acc0=prev)
        assert rec[entered[c] + unit.latency - 1] == prev, f"column {c}"


def _exact_round(fr: Fraction) -> float:
    """Correctly rounded FP32 value of an exact rational (independent of the golden's rounding code)."""
    if fr == 0:
        return 0.0
    sign = -1 if fr < 0 else 1
    a = abs(fr)
    e = a.numerator.bit_length() - a.denominator.bit_length()
    while Fraction(2) ** e > a:
        e -= 1
    while Fraction(2) ** (e + 1) <= a:
        e += 1
    q = a / Fraction(2) ** (e - 23)                   # in [2^23, 2^24)
    n = int(q)
    rem = q - n
    if rem > Fraction(1, 2) or (rem == Fraction(1, 2) and n % 2):
        n += 1
    return sign * float(Fraction(n) * Fraction(2) ** (e - 23))


@pytest.mark.parametrize("weights", ["int4", "fp4"])
def test_fp8_group_sum_exact_rtl(weights):
    """A group whose FP32 tree sum would lose bits (+-3584 products beside 2^-10-sized ones): the unit's result
    with scale 1 is the exact sum rounded once (checked on the RTL and the golden with Fraction arithmetic)."""
    rng = np.random.default_rng(3)
    unit = LowPrecMacUnit(weights, "fp8_e4m3", 128, "fp16")
    big = 0x7                                             # int4 7 / fp4 6
    groups, want = [], []
    for _ in range(6):
        codes = rng.integers(0, 16, (2, 64)).astype(np.uint8)
        acts = np.zeros((2, 64), np.uint8)
        codes[:, :8] = big
        acts[:, :8] = 0x7E                                # 448
        acts[:, 8:] = rng.integers(1, 8, (2, 56)).astype(np.uint8)   # E4M3 subnormals: m * 2^-9
        acts[0, 1:8:2] |= 0x80                            # some large products cancel, others remain
        v = L.weight_values(weights, codes).astype(np.float64)
        a = acts.view(ml_dtypes.float8_e4m3fn).astype(np.float64)
        exact = sum(Fraction(vi) * Fraction(ai) for vi, ai in zip(v.reshape(-1), a.reshape(-1), strict=True))
        groups.append((codes, acts))
        want.append(_exact_round(exact))
    # Constructed: 63 products +big and one tiny in column 0, 63 products -big in column 1: the exact sum is
    # the tiny product, which an FP32 tree loses in column 0's sum (ulp 2^-6 there).
    codes = np.full((2, 64), big, np.uint8)
    acts = np.full((2, 64), 0x7E, np.uint8)
    acts[1] = 0xFE
    codes[0, 32], acts[0, 32], codes[1, 32] = 1, 0x01, 0
    groups.append((codes, acts))
    want.append(float(L.weight_values(weights, np.uint8(1))) * 2.0 ** -9)
    cols, golden = [], []
    for codes, acts in groups:
        cols += [(_column_word(codes[j]), acts[j], 0x3C00, 0) for j in range(2)]
        golden.append(L.unit_acc(weights, "fp8_e4m3", codes, acts, [0x3C00], [0], 0, 128))
    # One group per stream (acc from +0): run them one after the other with a reload in between.
    for g in range(len(groups)):
        rec, entered = run_unit(unit, cols[2 * g:2 * g + 2], 0, [0, 0])
        got = rec[entered[1] + unit.latency - 1]
        assert got == golden[g]
        assert np.uint32(got).view(np.float32) == np.float32(want[g]), (g, hex(got), want[g])
    # The FP32 tree order of sim.golden.lowprec would not be exact on these sums: it differs on some.
    lp = [int(LP.gemv(_qw(weights, codes), _fp8(acts))[0][0]) for codes, acts in groups]
    assert any(lp[g] != golden[g] for g in range(len(groups))), "adversarial sums did not stress the FP32 order"


def _qw(weights, codes):
    from firmware.quant import QuantWeights

    return QuantWeights(weights, 128, codes.reshape(128, 1), np.ones((1, 1), np.float32), np.zeros((1, 1), np.uint8))


def _fp8(acts):
    from firmware.quant import Fp8Acts

    return Fp8Acts(acts.reshape(1, 128), np.ones(1, np.float32))


# -- golden against float64 ------------------------------------------------------------------------------------

BOUND_CASES = [(w, a, g, sf) for w in ("int4", "fp4") for a in ("fp8_e4m3", "bf16") for g in (64, 128, 256)
               for sf in ("fp16", "bf16")]


def _quantized(rng, K, N, weights, group, scale_format):
    W = rng.standard_normal((K, N)) * 0.05 * np.exp(rng.standard_normal((1, N)))
    q = quantize_weights(W, weights, group, scale_format)
    dt = np.float16 if scale_format == "fp16" else ml_dtypes.bfloat16
    return q, q.codes.T.copy(), q.scales.astype(dt).view(np.uint16).T.copy(), q.selectors.T.copy()


@pytest.mark.parametrize("weights,acts,group,scale_format", BOUND_CASES)
def test_golden_vs_float64_bound(weights, acts, group, scale_format):
    rng = np.random.default_rng(hash((weights, acts, group, scale_format)) % 2 ** 32)
    K, N = 768, 16
    _, W, sc, sel = _quantized(rng, K, N, weights, group, scale_format)
    worst = 0.0
    for _ in range(3):
        xf = (rng.standard_normal(K) * np.exp2(rng.integers(-3, 4, K))).astype(np.float32)
        if acts == "fp8_e4m3":
            qa = quantize_fp8(xf)
            x, ts = qa.codes[0], float(qa.scales[0])
        else:
            x, ts = xf.astype(ml_dtypes.bfloat16).view(np.uint16), None
        y = L.gemv_unit(weights, acts, W, x, sc, sel, token_scale=ts, group=group, scale_format=scale_format)
        y64, mag = L.reference_f64(weights, acts, W, x, sc, sel, token_scale=ts, group=group,
                                   scale_format=scale_format)
        err = np.abs(y.view(np.float32).astype(np.float64) - y64)
        bound = L.error_bound(weights, acts, K, mag, group, token_scale=ts is not None)
        assert (err <= bound).all(), f"max err/bound {float((err / bound).max()):.3g}"
        worst = max(worst, float((err / bound).max()))
    print(f"{weights} x {acts} g{group} {scale_format}: max |err| / bound = {worst:.4f}")


def test_golden_bf16_acts_equals_functional_gemv():
    """For BF16 activations the unit's order is sim.golden.lowprec.gemv's (which the perplexity bench uses):
    bit-identical on quantized matrices."""
    rng = np.random.default_rng(11)
    for weights in ("int4", "fp4"):
        q, W, sc, sel = _quantized(rng, 512, 24, weights, 128, "fp16")
        x = (rng.standard_normal(512)).astype(np.float32).astype(ml_dtypes.bfloat16).view(np.uint16)
        assert (L.gemv_unit(weights, "bf16", W, x, sc, sel) == LP.gemv(q, x)).all()


def test_round_f32_rule():
    """The scaler's rounding: 24 bits nearest even with an unbounded exponent, then flush / overflow."""
    cases = [(1.0 + 2.0 ** -24, 0x3F800000), (1.0 + 3 * 2.0 ** -24, 0x3F800002),
             (2.0 ** -126 * (1 - 2.0 ** -25), 0x00800000),     # rounds up to the smallest normal: kept
             (2.0 ** -126 * (1 - 2.0 ** -24), 0x00000000),     # stays below 2^-126: flushed (IEEE would round up)
             (-(2.0 ** -130), 0x80000000), (2.0 ** 128 * (1 - 2.0 ** -25), 0x7F800000),
             (float("nan"), 0x7FC00000), (-0.0, 0x80000000)]
    for v, want in cases:
        assert int(L.round_f32(v)) == want, (v, hex(int(L.round_f32(v))))


def test_rtl_scaler_flushes_after_rounding():
    """Partial sum (2^24 - 1) 2^-100 times a BF16 scale 2^-50: the exact product 2^-126 - 2^-150 has 24 bits,
    stays below 2^-126 and is flushed (IEEE's subnormal rounding would give 2^-126)."""
    unit = LowPrecMacUnit("int4", "bf16", 64, "bf16")
    codes = np.zeros((1, 64), np.uint8)
    codes[0, :3] = 1
    acts = np.zeros((1, 64), np.uint16)
    acts[0, :3] = np.array([255 * 2.0 ** -84, 255 * 2.0 ** -92, 255 * 2.0 ** -100], np.float32) \
        .astype(ml_dtypes.bfloat16).view(np.uint16)
    scale = 0x2680                                                  # 2^-50
    golden = L.unit_acc("int4", "bf16", codes, acts, [scale], [0], 0, 64, "bf16")
    rec, entered = run_unit(unit, [(_column_word(codes[0]), acts[0], scale, 0)], 0, [0])
    assert golden == 0 and rec[entered[0] + unit.latency - 1] == 0
    ieee = LP.mul_f32(np.float32((2 ** 24 - 1) * 2.0 ** -100).view(np.uint32), np.float32(2.0 ** -50).view(np.uint32))
    assert int(ieee) == 0x00800000


def test_parameter_errors():
    for kw, msg in [(dict(weights="int8"), "Weight format"), (dict(acts="fp16"), "Activation format"),
                    (dict(weights="bf16", acts="fp8_e4m3"), "BF16 weights"), (dict(group=96), "Group size"),
                    (dict(group=32), "Group size"), (dict(scale_format="fp32"), "Scale format")]:
        with pytest.raises(ValueError, match=msg):
            LowPrecMacUnit(**kw)


@pytest.mark.parametrize("weights,acts", [("int4", "fp8_e4m3"), ("fp4", "bf16")])
def test_rtl_two_accumulator_slots(weights, acts):
    """``slots=2`` (the PIM bank's acc_slots): tiles alternate between the slots, each slot loaded
    (``acc_slot``) right after the previous tile's last column, while that tile's groups are still in flight;
    a slot is reloaded only ``latency`` after its own tile's last column (PU_BUSY per slot). Each tile's slot
    ends bit-exact with unit_acc of its groups (acc0 = its load)."""
    rng = np.random.default_rng(5)
    unit = LowPrecMacUnit(weights, acts, 128, "fp16", True, slots=2)
    cpg = unit.columns_per_group
    tiles = [[make_group(rng, "random", unit, "fp16") for _ in range(n)] for n in (2, 1, 3, 2, 1)]
    loads = [int(np.float32(rng.standard_normal()).view(np.uint32)) for _ in tiles]
    sim = Simulator(unit)
    sim.add_clock(1e-6)
    rec = []                       # (acc, acc1) after every edge
    last_col = {}                  # tile -> index in rec of the edge its last column entered

    async def tick(ctx):
        await ctx.tick()
        rec.append((ctx.get(unit.acc), ctx.get(unit.acc1)))

    async def tb(ctx):
        for t, groups in enumerate(tiles):
            ctx.set(unit.valid, 0)
            if t >= 2:             # the slot's previous tile must have its last term in
                while len(rec) < last_col[t - 2] + unit.latency:
                    await tick(ctx)
            ctx.set(unit.acc_load, 1)
            ctx.set(unit.acc_slot, t % 2)
            ctx.set(unit.acc_value, loads[t])
            await tick(ctx)
            ctx.set(unit.acc_load, 0)
            for c, a, s, sel in groups:
                for j in range(cpg):
                    ctx.set(unit.w, _column_word(c[j]))
                    for k in range(unit.lanes):
                        ctx.set(unit.x[k], int(a[j][k]))
                    ctx.set(unit.scale, s)
                    ctx.set(unit.sel, sel)
                    ctx.set(unit.slot, t % 2)
                    ctx.set(unit.valid, 1)
                    await tick(ctx)
            last_col[t] = len(rec)
        ctx.set(unit.valid, 0)
        for _ in range(unit.latency + 2):
            await tick(ctx)

    sim.add_testbench(tb)
    sim.run()
    for t, groups in enumerate(tiles):
        want = loads[t]
        for c, a, s, sel in groups:
            want = L.unit_acc(weights, acts, c, a, [s], [sel], want, 128, "fp16", True)
        got = rec[last_col[t] + unit.latency - 1][t % 2]
        assert got == want, f"tile {t} (slot {t % 2}): RTL {got:#010x}, golden {want:#010x}"
