"""NPU vector unit: golden model against float64 (stated bounds), RTL bit-exact against the golden model.

Three tiers:

* golden model only (numpy): approximation bounds of exp / recip / rsqrt /
  GELU, softmax rows summing to 1, layernorm output mean 0 and variance 1, on
  GPT-2 small dimensions (d = 768, 12 heads, sequence lengths 1..128) and on
  hostile inputs;
* Amaranth simulator: the FP32 multiplier, BF16 conversions and the function
  unit against the golden model;
* Verilator (cocotb): whole instructions run autonomously over scratchpad
  rows, every scratchpad word compared with the golden model afterwards;
  tiny configuration (4 lanes) for coverage, default (16 lanes) for GPT-2
  dimensions.
"""

import math

import numpy as np
import pytest

from hw.config import preset
from hw.npu import vector_tables as T
from hw.npu.vector import ISA_TABLE, MICRO, Opcode, Phase, VectorInstr, VectorUnit, encode
from hw.spec.vector_isa import ROW_GROUP, vector_cycles
from sim.benchmarks.vector import D_MODEL, HEADS, gpt2_program, run_program
from sim.golden import fp as G
from sim.golden import fp32ext as X
from sim.golden.operands import SPECIAL_F32, fp32_pairs
from sim.golden.vector import (
    BF16,
    COL,
    ERR,
    FP32,
    IMM,
    MASK_BITMAP,
    MASK_CAUSAL,
    MASK_NONE,
    MASK_PREFIX,
    ROW,
    VEC,
    Program,
    VectorModel,
    row_sum,
)

F = G.f32_bits
TINY = preset("tiny").npu.vector_lanes          # 4
DEFAULT = preset("default").npu.vector_lanes    # 16
TINY_DEPTH = 1024
DEFAULT_DEPTH = 4096


def f(x):
    return int(F(np.float32(x)))


def vals(bits):
    return G.bits_to_f32(bits).astype(np.float64)


# =====================================================================================================
# ISA table and parameters
# =====================================================================================================

def test_isa_table_is_the_one_source():
    assert [op.name for op in ISA_TABLE] == [o.name for o in Opcode]
    assert len({op.code for op in ISA_TABLE}) == len(ISA_TABLE)
    for op in Opcode:
        assert (op, Phase.MAIN) in MICRO, op
    word = encode(op="SOFTMAX", a=3, d=7, n=128, rows=5, mask="CAUSAL", imm0=f(0.5))
    view = VectorInstr.const({"op": Opcode.SOFTMAX, "a": 3, "d": 7, "n": 128, "rows": 5, "mask": 2,
                              "imm0": f(0.5)})
    assert word == view.as_value().value


def test_from_config():
    for name in ("tiny", "default", "ianus"):
        cfg = preset(name)
        unit = VectorUnit.from_config(cfg)
        assert unit.lanes == cfg.npu.vector_lanes and unit.depth == cfg.npu.act_spm_words


@pytest.mark.parametrize("kwargs,msg", [
    (dict(lanes=3), "Lanes must be a power of two of at least 2, not 3"),
    (dict(lanes=1), "Lanes must be a power of two"),
    (dict(depth=0), "Depth must be an integer"),
    (dict(max_n=0), "Maximum row length"),
])
def test_bad_parameters(kwargs, msg):
    with pytest.raises(ValueError, match=msg):
        VectorUnit(**kwargs)


# =====================================================================================================
# Golden model: arithmetic against float64
# =====================================================================================================

def test_golden_mul_f32_vs_float64():
    """FP32 x FP32 is correctly rounded in the normal range: |err| <= 2^-24 |exact|."""
    rng = np.random.default_rng(20)
    a, b = fp32_pairs(rng, 200_000)
    p = X.mul_f32(a, b)
    with np.errstate(all="ignore"):
        exact = vals(G.canon(G.bits_to_f32(a))) * vals(G.canon(G.bits_to_f32(b)))
    got = vals(p)
    ok = np.isfinite(exact) & (np.abs(exact) >= 2.0**-126) & (np.abs(exact) < 2.0**127)
    assert ok.sum() > 50_000
    assert np.all(np.abs(got[ok] - exact[ok]) <= 2.0**-24 * np.abs(exact[ok]))
    # Hand-checked specials.
    cases = [(f(2.0), f(3.0), f(6.0)), (0x7F800000, 0, 0x7FC00000), (0x00800000, 0x3F000000, 0),
             (0x80800000, 0x3F000000, 0x80000000), (0x7F000000, f(4.0), 0x7F800000), (0x00000001, f(1.0), 0),
             (0x3F800001, 0x3F800001, 0x3F800002), (0x7F800001, f(1.0), 0x7FC00000), (f(-1.5), f(2.0), f(-3.0))]
    for x, y, want in cases:
        assert int(X.mul_f32(np.uint32(x), np.uint32(y))) == want, (hex(x), hex(y))


def _finite_f32(rng, n, lo, hi, signed=True):
    mag = np.exp(rng.uniform(lo, hi, n))
    if signed:
        mag *= rng.choice([-1.0, 1.0], n)
    return F(mag.astype(np.float32))


# Stated bounds (also in the report). |err| against float64 of the same FP32 argument.
EXP2_REL = 2e-7
RECIP_REL = 1.5e-7
RSQRT_REL = 1.5e-7
EXP_REL_BASE, EXP_REL_PER_X = 3e-7, 8e-8       # exp(x): rel <= 3e-7 + 8e-8 |x|: 2^-24 |x| from rounding x*log2e, 1.9e-8 |x| from log2e in FP32
GELU_REL, GELU_ABS = 2.0**-21, 2.0**-22         # |err| <= 2^-21 |gelu| + 2^-22


def test_golden_functions_vs_float64():
    rng = np.random.default_rng(21)
    t = F(rng.uniform(-126, 127.9, 300_000).astype(np.float32))
    got, ref = vals(X.exp2(t)), np.exp2(vals(t))
    ok = ref >= 2.0**-125
    assert np.max(np.abs(got[ok] - ref[ok]) / ref[ok]) <= EXP2_REL

    x = F(rng.uniform(-87, 88, 300_000).astype(np.float32))
    got, ref = vals(X.exp(x)), np.exp(vals(x))
    ok = ref >= 2.0**-125
    assert np.all(np.abs(got[ok] - ref[ok]) <= (EXP_REL_BASE + EXP_REL_PER_X * np.abs(vals(x)[ok])) * ref[ok])

    x = _finite_f32(rng, 300_000, -85, 85)
    got, ref = vals(X.recip(x)), 1.0 / vals(x)
    ok = np.abs(ref) >= 2.0**-125
    assert np.max(np.abs(got[ok] - ref[ok]) / np.abs(ref[ok])) <= RECIP_REL

    x = _finite_f32(rng, 300_000, -85, 85, signed=False)
    got, ref = vals(X.rsqrt(x)), 1.0 / np.sqrt(vals(x))
    assert np.max(np.abs(got - ref) / ref) <= RSQRT_REL

    x = np.concatenate([F(rng.uniform(-10, 10, 300_000).astype(np.float32)), _finite_f32(rng, 100_000, -40, 2.5)])
    got, ref = vals(X.gelu(x)), T.gelu_f64(vals(x))
    assert np.all(np.abs(got - ref) <= GELU_REL * np.abs(ref) + GELU_ABS)


@pytest.mark.parametrize("func,x,want", [
    ("exp", 0.0, 1.0), ("exp", -0.0, 1.0), ("exp", -np.inf, 0.0), ("exp", np.inf, np.inf), ("exp", 100.0, np.inf),
    ("exp", -104.0, 0.0), ("exp2", 3.0, 8.0), ("exp2", -126.0, 2.0**-126), ("exp2", -126.5, 0.0),
    ("recip", 1.0, 1.0), ("recip", -4.0, -0.25), ("recip", 0.0, np.inf), ("recip", -0.0, -np.inf),
    ("recip", np.inf, 0.0), ("recip", 2.0**127, 0.0),
    ("rsqrt", 1.0, 1.0), ("rsqrt", 4.0, 0.5), ("rsqrt", 0.0, np.inf), ("rsqrt", -0.0, -np.inf),
    ("rsqrt", -1.0, np.nan), ("rsqrt", np.inf, 0.0),
    ("gelu", 0.0, 0.0), ("gelu", 8.0, 8.0), ("gelu", 1e30, 1e30), ("gelu", -8.0, -0.0), ("gelu", -np.inf, -0.0),
    ("gelu", np.inf, np.inf), ("gelu", np.nan, np.nan), ("exp", np.nan, np.nan), ("recip", np.nan, np.nan),
])
def test_golden_function_specials(func, x, want):
    got = G.bits_to_f32(getattr(X, func)(F(np.float32(x))))
    if np.isnan(want):
        assert int(G.f32_bits(got)) == 0x7FC00000
    else:
        assert got == np.float32(want) and np.signbit(got) == np.signbit(np.float32(want)), (got, want)


# -- softmax and layernorm on GPT-2 small dimensions --------------------------------------------------

SOFTMAX_SUM_F32 = 4e-6          # |sum - 1| with FP32 outputs
SOFTMAX_ELEM_F32 = 4e-6         # |y - y64| <= bound * max(y64, 2^-20) ... per element, relative
SOFTMAX_SUM_BF16 = 2.0**-8      # |sum - 1| with BF16 outputs (each output rounded to 8 bits)
LN_MEAN = 2e-6                  # |mean(y)| for gamma = 1, beta = 0 (FP32 output)
LN_VAR = 2e-5                   # |var(y) - var/(var+eps)|
LN_ELEM = 2e-5                  # |y - y64| <= bound * (1 + |y64|)


def _softmax64(x, vis):
    x = np.where(vis, x, -np.inf)
    m = np.max(x, axis=1, keepdims=True)
    with np.errstate(invalid="ignore"):
        e = np.where(vis, np.exp(x - m), 0.0)
        return e / e.sum(axis=1, keepdims=True)


def _softmax_golden(lanes, x_bits, vis, d_fmt, mode=MASK_BITMAP, pos=0, acc_stages=1):
    rows, n = x_bits.shape
    model = VectorModel(lanes, 8192, acc_stages=acc_stages)
    model.put(0, x_bits, FP32)
    ins = dict(op=Opcode.SOFTMAX.value, a=0, d=4096, n=n, rows=rows, d_fmt=d_fmt, mask=mode, pos=pos)
    if mode == MASK_BITMAP:
        words = VectorModel.bitmap_words(vis, lanes)
        model.mem[2048:2048 + words.shape[0]] = words
        ins["aux"] = 2048
    assert model.run(ins) == 0
    y = model.get(4096, rows, n, d_fmt)
    return vals(y) if d_fmt == FP32 else G.bf16_to_f32(y).astype(np.float64)


@pytest.mark.parametrize("acc_stages", [1, 4])
@pytest.mark.parametrize("seq", [1, 2, 7, 31, 64, 100, 128])
def test_golden_softmax_gpt2_causal(seq, acc_stages):
    """12 heads of causal attention scores (seq x seq): rows sum to 1, elements close to float64; with the
    one-cycle row accumulator and with 4 interleaved partial sums (``npu.vec_acc_stages``)."""
    rng = np.random.default_rng(seq)
    for _head in range(HEADS):
        x = (rng.standard_normal((seq, seq)) * rng.uniform(0.5, 8)).astype(np.float32)
        vis = np.arange(seq)[None, :] <= np.arange(seq)[:, None]
        y = _softmax_golden(DEFAULT, F(x), vis, FP32, mode=MASK_CAUSAL, acc_stages=acc_stages)
        ref = _softmax64(x.astype(np.float64), vis)
        assert np.all(np.abs(y.sum(axis=1) - 1) <= SOFTMAX_SUM_F32)
        assert np.all(np.abs(y - ref) <= SOFTMAX_ELEM_F32 * np.maximum(ref, 2.0**-20))
        assert np.all(y[~vis] == 0)
        yb = _softmax_golden(DEFAULT, F(x), vis, BF16, mode=MASK_CAUSAL, acc_stages=acc_stages)
        assert np.all(np.abs(yb.sum(axis=1) - 1) <= SOFTMAX_SUM_BF16)


@pytest.mark.parametrize("fmt", [FP32, BF16])
def test_golden_softmax_prefix_rows_equal_one_row_causal(fmt):
    """PREFIX (every row sees keys 0..pos: the heads of one generation step) on H rows gives, row for row,
    the bits of H one-row CAUSAL instructions at the same pos: the compiler batches a step's heads this way.
    The rows are padded to a multiple of 16 keys beyond pos + 1 with garbage that must stay invisible."""
    rng = np.random.default_rng(11)
    for L, n_keys in ((DEFAULT, 129), (DEFAULT, 16), (4, 33)):
        n = -(-n_keys // 16) * 16
        x = (rng.standard_normal((6, n)) * 5).astype(np.float32)
        x[:, n_keys:] = 1e30                               # pad beyond the keys: must not count
        model = VectorModel(L, 8192)
        model.put(0, F(x), FP32)
        assert model.run(dict(op=Opcode.SOFTMAX.value, a=0, d=4096, n=n, rows=6, d_fmt=fmt, mask=MASK_PREFIX,
                              pos=n_keys - 1)) == 0
        together = model.get(4096, 6, n, fmt)
        for r in range(6):
            one = VectorModel(L, 8192)
            one.put(0, F(x[r:r + 1]), FP32)
            assert one.run(dict(op=Opcode.SOFTMAX.value, a=0, d=4096, n=n, rows=1, d_fmt=fmt, mask=MASK_CAUSAL,
                                pos=n_keys - 1)) == 0
            np.testing.assert_array_equal(together[r], one.get(4096, 1, n, fmt)[0])
        assert np.all(together[:, n_keys:] == 0)


@pytest.mark.parametrize("acc_stages", [1, 2, 3, 4])
def test_golden_softmax_hostile(acc_stages):
    """Large magnitudes, all-equal rows, rows masked but one, -inf from masking, zeros, fully masked rows; every
    row accumulator depth (``npu.vec_acc_stages``)."""
    rng = np.random.default_rng(5)
    n = 40
    x = (rng.standard_normal((9, n)) * 4).astype(np.float32)
    vis = rng.random((9, n)) < 0.6
    x[0] = 3e38 * np.sign(rng.standard_normal(n))      # huge, both signs
    x[1] = 7.25                                         # all equal
    vis[2] = False
    vis[2, 17] = True                                   # masked but one
    x[3, ::2] = -np.inf                                 # additive -inf mask, plus the bitmap
    x[4] = 0.0
    vis[5] = False                                      # fully masked
    x[6] = -np.inf                                      # everything visible is -inf
    x[7] = -3e38
    x[7, 3] = 3e38
    x[8] = 1e-40                                        # subnormals (flushed)
    vis[[0, 1, 3, 4, 7, 8], 0] = True
    y = _softmax_golden(TINY, F(x), vis, FP32, acc_stages=acc_stages)
    ref = _softmax64(x.astype(np.float64), vis)
    for r in (0, 1, 2, 3, 4, 7, 8):
        assert abs(y[r].sum() - 1) <= SOFTMAX_SUM_F32, r
        assert np.all(np.abs(y[r] - ref[r]) <= SOFTMAX_ELEM_F32 * np.maximum(ref[r], 2.0**-20)), r
    assert np.all(y[5] == 0) and np.all(y[6] == 0)       # defined: nothing visible -> all zero
    assert y[2, 17] == 1.0 and y[1, vis[1]].max() == y[1, vis[1]].min()
    assert np.all(y[~vis] == 0)


def _layernorm_golden(lanes, x_bits, x_fmt, gamma, beta, eps=1e-5, d_fmt=FP32, acc_stages=1):
    rows, n = x_bits.shape
    model = VectorModel(lanes, 16384, acc_stages=acc_stages)
    model.put(0, x_bits, x_fmt)
    gb = gamma.astype(np.uint32) | (beta.astype(np.uint32) << 16)
    model.put_elems(8000, gb, FP32)
    assert model.run(dict(op=Opcode.LN_STATS.value, a=0, d=9000, n=n, rows=rows, a_fmt=x_fmt,
                          imm0=f(1.0 / n), imm1=f(eps))) == 0
    assert model.run(dict(op=Opcode.LN_APPLY.value, a=0, b=8000, aux=9000, d=10000, n=n, rows=rows,
                          a_fmt=x_fmt, d_fmt=d_fmt)) == 0
    y = model.get(10000, rows, n, d_fmt)
    stats = vals(model.get_elems(9000, 2 * rows, FP32)).reshape(rows, 2)
    return (vals(y) if d_fmt == FP32 else G.bf16_to_f32(y).astype(np.float64)), stats


def _layernorm64(x, eps=1e-5):
    mean = x.mean(axis=1, keepdims=True)
    var = ((x - mean) ** 2).mean(axis=1, keepdims=True)
    return (x - mean) / np.sqrt(var + eps), var


@pytest.mark.parametrize("acc_stages", [1, 4])
@pytest.mark.parametrize("seq", [1, 16, 128])
def test_golden_layernorm_gpt2(seq, acc_stages):
    """d = 768 rows: output mean ~0 and variance ~var/(var+eps) (gamma 1, beta 0); elements close to float64;
    with the one-cycle row accumulator and with 4 interleaved partial sums (``npu.vec_acc_stages``)."""
    rng = np.random.default_rng(100 + seq)
    x = (rng.standard_normal((seq, D_MODEL)) * rng.uniform(0.1, 30, (seq, 1))
         + rng.uniform(-50, 50, (seq, 1))).astype(np.float32)
    xb = G.bf16_bits(x)
    ones, zeros = G.bf16_bits(np.ones(D_MODEL)), G.bf16_bits(np.zeros(D_MODEL))
    y, stats = _layernorm_golden(DEFAULT, xb, BF16, ones, zeros, acc_stages=acc_stages)
    ref, var = _layernorm64(G.bf16_to_f32(xb).astype(np.float64))
    assert np.all(np.abs(y.mean(axis=1)) <= LN_MEAN)
    assert np.all(np.abs(y.var(axis=1) - (var / (var + 1e-5))[:, 0]) <= LN_VAR)
    assert np.all(np.abs(y - ref) <= LN_ELEM * (1 + np.abs(ref)))
    # With gamma / beta: y = ln(x) * gamma + beta.
    gamma, beta = G.bf16_bits(1 + rng.standard_normal(D_MODEL) * 0.2), G.bf16_bits(rng.standard_normal(D_MODEL))
    y2, _ = _layernorm_golden(DEFAULT, xb, BF16, gamma, beta, acc_stages=acc_stages)
    ref2 = ref * G.bf16_to_f32(gamma) + G.bf16_to_f32(beta)
    assert np.all(np.abs(y2 - ref2) <= LN_ELEM * (1 + np.abs(ref2)) * 2)


def test_golden_layernorm_hostile():
    """All-equal rows (variance 0 -> output 0), huge magnitudes, zeros, huge common offset."""
    n = 96
    rng = np.random.default_rng(7)
    x = rng.standard_normal((5, n)).astype(np.float32)
    x[0] = 12.5                                   # all equal
    x[1] = 0.0
    x[2] = x[2] * 1e15                            # large magnitudes (sum of squares ~1e32: still finite)
    x[3] = x[3] + 1e4                             # large offset, small spread: two-pass variance is needed
    x[4] = x[4] * 1e-20
    y, stats = _layernorm_golden(TINY, F(x), FP32, G.bf16_bits(np.ones(n)), G.bf16_bits(np.zeros(n)))
    x64 = x.astype(np.float64)
    ref, _ = _layernorm64(x64)
    assert np.all(y[0] == 0) and np.all(y[1] == 0)
    for r in (2, 3):
        # The FP32 mean carries (beats + log2 L) roundings of 2^-24 relative to the row's magnitude; after
        # centring that is an offset of up to (n/L + log2 L) 2^-24 max|x| / std (row 3: offset 1e4, std 1).
        offset = (n / TINY + 2) * 2.0**-24 * np.abs(x64[r]).max() / x64[r].std()
        assert np.all(np.abs(y[r] - ref[r]) <= 1e-5 * (1 + np.abs(ref[r])) + offset), r
        assert abs(y[r].mean()) <= 1e-5 + offset and abs(y[r].var() - 1) <= 1e-4 + 2 * offset
    assert np.all(np.abs(y[4]) <= 1e-9)           # var << eps: output ~ (x - mean) / sqrt(eps)


def test_golden_row_sum_order():
    """The row sum adds lanes pairwise per beat, then the beats in order (differs from np.sum order)."""
    x = F(np.array([[1.0, 2.0**24, -(2.0**24), 1.0, 1.0]], dtype=np.float32))
    # L=4: beat 0 = (1 + 2^24) + (-2^24 + 1) = 2^24 + (-2^24 + 1) -> 1 (1+2^24 rounds to 2^24); beat 1 = 1.
    assert vals(row_sum(x, 4))[0] == 2.0


# =====================================================================================================
# Amaranth simulator: FP32 multiplier, conversions, function unit
# =====================================================================================================

def test_fp32ext_amaranth_sim():
    from amaranth.sim import Simulator

    from hw.npu.fp32ext import Func, FuncTestTop

    rng = np.random.default_rng(30)
    a, b = fp32_pairs(rng, SPECIAL_F32.size**2 + 200)
    ext = np.concatenate([F(rng.uniform(-140, 140, 150).astype(np.float32)),
                          F(rng.uniform(-9, 9, 150).astype(np.float32)), _finite_f32(rng, 150, -30, 3)])
    a = np.concatenate([a, ext])
    b = np.resize(b, a.size)
    n = a.size
    dut = FuncTestTop(1)
    out = {}

    async def bench(ctx):
        for fn in Func:
            ctx.set(dut.func, fn)
            ys, ps, bf, wide = [], [], [], []
            for i in range(n + FuncTestTop.func_latency):
                if i < n:
                    ctx.set(dut.a[0], int(a[i]))
                    ctx.set(dut.b[0], int(b[i]))
                    if fn == Func.EXP2:
                        bf.append(ctx.get(dut.bf[0]))
                        wide.append(ctx.get(dut.wide[0]))
                await ctx.tick()
                ys.append(ctx.get(dut.y[0]))
                ps.append(ctx.get(dut.p[0]))
            out[fn] = (np.array(ys, dtype=np.uint32), np.array(ps, dtype=np.uint32), bf, wide)

    sim = Simulator(dut)
    sim.add_clock(1e-8)
    sim.add_testbench(bench)
    sim.run()
    ml, fl = FuncTestTop.mul_latency, FuncTestTop.func_latency
    ys, ps, bf, wide = out[Func.EXP2]
    np.testing.assert_array_equal(ps[ml - 1:ml - 1 + n], X.mul_f32(a, b))
    np.testing.assert_array_equal(np.array(bf, dtype=np.uint16), X.store_bf16(X.load_f32(a)))
    np.testing.assert_array_equal(np.array(wide, dtype=np.uint32), X.load_bf16((a & 0xFFFF).astype(np.uint16)))
    for fn, model in ((Func.EXP2, X.exp2), (Func.RECIP, X.recip), (Func.RSQRT, X.rsqrt), (Func.GELU, X.gelu)):
        np.testing.assert_array_equal(out[fn][0][fl - 1:fl - 1 + n], model(a), err_msg=str(fn))


def test_vector_unit_amaranth_sim():
    """The unit elaborated in Amaranth (no Instance lanes), 2 lanes, on Amaranth's simulator: a few
    instructions back to back with the next one waiting (valid high) while the unit is busy."""
    from amaranth.sim import Simulator

    from hw.npu.vector import VectorTop

    lanes, depth = 2, 64
    rng = np.random.default_rng(40)
    p = Program(lanes, depth)
    x = F((rng.standard_normal((2, 5)) * 3).astype(np.float32))
    a = p.put_rows(x, FP32)
    gb = p.put_gamma_beta(G.bf16_bits(rng.standard_normal(5)), G.bf16_bits(rng.standard_normal(5)))
    st, y1, y2, y3 = p.alloc(2), p.alloc(6), p.alloc(6), p.alloc(6)
    p.add(op=Opcode.SOFTMAX.value, a=a, d=y1, n=5, rows=2, mask=MASK_CAUSAL, pos=1)
    p.add(op=Opcode.LN_STATS.value, a=a, d=st, n=5, rows=2, imm0=f(0.2), imm1=f(1e-5))
    p.add(op=Opcode.LN_APPLY.value, a=a, b=gb, aux=st, d=y2, n=5, rows=2, d_fmt=BF16)
    p.add(op=Opcode.GELU.value, a=a, d=y3, n=5, rows=2)
    p.add(op=Opcode.COPY.value, a=depth - 1, d=y3, n=5, rows=2)           # BAD_ADDRESS
    dut = VectorTop(lanes, depth)
    errors, accepted_while_busy = [], []

    async def bench(ctx):
        for word in range(depth):
            ctx.set(dut.host_wr_addr, word)
            ctx.set(dut.host_wr_data, int.from_bytes(p.init[word].astype("<u4").tobytes(), "little"))
            ctx.set(dut.host_wr_en, (1 << (2 * lanes)) - 1)
            await ctx.tick()
        ctx.set(dut.host_wr_en, 0)
        # The next instruction is offered (valid high) as soon as the previous one is accepted.
        ctx.set(dut.instr.payload.as_value(), p.instrs[0])
        ctx.set(dut.instr.valid, 1)
        issued = 0
        while len(errors) < len(p.instrs):
            *_, ready, busy, done, err = await ctx.tick().sample(dut.instr.ready, dut.busy, dut.done,
                                                                 dut.error.as_value())
            if ready and issued < len(p.instrs):
                accepted_while_busy.append(busy)
                issued += 1
                if issued < len(p.instrs):
                    ctx.set(dut.instr.payload.as_value(), p.instrs[issued])
                else:
                    ctx.set(dut.instr.valid, 0)
            if done:
                errors.append(err)
        await ctx.tick()
        got = []
        for word in range(depth):
            ctx.set(dut.host_rd_addr, word)
            ctx.set(dut.host_rd_en, 1)
            await ctx.tick()
            got.append(np.frombuffer(ctx.get(dut.host_rd_data).to_bytes(4 * lanes, "little"), dtype="<u4"))
        np.testing.assert_array_equal(np.stack(got), p.model.mem)

    sim = Simulator(dut)
    sim.add_clock(1e-8)
    sim.add_testbench(bench)
    sim.run()
    assert errors == p.errors and p.errors[-1] == ERR["BAD_ADDRESS"]
    assert not any(accepted_while_busy)


# =====================================================================================================
# Verilator: whole instructions, bit-exact against the golden model
# =====================================================================================================

def _scenario_run(program, lanes, depth, tmp_path, name):
    path = tmp_path / f"{name}.npz"
    program.save(path)
    from sim.benchmarks.vector import vector_build

    vector_build(lanes, depth).run("sim.tb.vector_tb", "run_scenarios", env={"SCENARIOS": str(path)})


def _hostile_rows(rng, rows, n):
    """float32 rows: random scales with special rows mixed in."""
    x = (rng.standard_normal((rows, n)) * 2.0 ** rng.integers(-6, 7, (rows, 1))).astype(np.float32)
    kinds = rng.integers(0, 8, rows)
    for r, k in enumerate(kinds):
        if k == 0:
            x[r] = rng.choice(SPECIAL_F32.view(np.float32), n)
        elif k == 1:
            x[r] = x[r, 0]                                          # all equal
        elif k == 2:
            x[r] *= np.float32(1e30)                                # large magnitudes
        elif k == 3:
            x[r] = 0.0
    return F(x)


UNARY = ("COPY", "EXP", "RECIP", "RSQRT", "GELU")


def _ops_program(lanes, depth, seed):
    """Every opcode, every format and broadcast mode, partial beats, special values, in-place use."""
    rng = np.random.default_rng(seed)
    p = Program(lanes, depth)
    regions = []
    for n, rows in ((1, 2), (lanes + 3, 3), (4 * lanes, 2)):
        xf = _hostile_rows(rng, rows, n)
        xb = G.round_bf16(_hostile_rows(rng, rows, n))
        yb = G.round_bf16(_hostile_rows(rng, rows, n))
        col = G.round_bf16(_hostile_rows(rng, 1, rows))[0]
        regions.append(dict(n=n, rows=rows, xf=p.put_rows(xf, FP32), xb=p.put_rows(xb, BF16),
                            yb=p.put_rows(yb, BF16), vec=p.put_rows(yb[:1], BF16), col=p.put_elems(col, BF16),
                            colf=p.put_elems(X.load_bf16(col), FP32),
                            out=p.alloc(rows * p.model.pitch(n, FP32)), out2=p.alloc(rows * p.model.pitch(n, FP32))))
    for g in regions:
        n, rows = g["n"], g["rows"]
        common = dict(n=n, rows=rows)
        for name in UNARY:
            for a_fmt, src in ((FP32, g["xf"]), (BF16, g["xb"])):
                for d_fmt in (FP32, BF16):
                    p.add(f"{name} n={n} a={a_fmt} d={d_fmt}", op=Opcode[name].value, a=src, d=g["out"],
                          a_fmt=a_fmt, d_fmt=d_fmt, **common)
        for name in ("ADD", "MUL"):
            for mode, b, b_fmt in ((ROW, g["yb"], BF16), (VEC, g["vec"], BF16), (COL, g["col"], BF16),
                                   (COL, g["colf"], FP32), (IMM, 0, FP32)):
                p.add(f"{name} mode={mode} n={n}", op=Opcode[name].value, a=g["xf"], b=b, b_mode=mode, b_fmt=b_fmt,
                      d=g["out"], imm0=f(-1.75), d_fmt=BF16 if mode == VEC else FP32, **common)
        p.add(f"SCALE n={n}", op=Opcode.SCALE.value, a=g["xb"], a_fmt=BF16, d=g["out"], imm0=f(0.125),
              imm1=f(3.5), **common)
        for name in ("MAX", "SUM"):
            for d_fmt in (FP32, BF16):
                p.add(f"{name} n={n} d={d_fmt}", op=Opcode[name].value, a=g["xf"], d=g["out2"], d_fmt=d_fmt,
                      **common)
        p.add(f"GELU in place n={n}", op=Opcode.GELU.value, a=g["out"], d=g["out"], **common)
    return p


def test_vector_rtl_ops_tiny():
    """Every element-wise and reduction op on the 4-lane unit, bit-exact (special values included)."""
    p = _ops_program(TINY, TINY_DEPTH, seed=1)
    assert len(p.instrs) > 100
    run_program(p, TINY, TINY_DEPTH, "test_vector_rtl_ops_tiny")


def _rows_program(lanes, depth, seed):
    """Layernorm, masked softmax (bitmap / causal / none), KV append, errors."""
    rng = np.random.default_rng(seed)
    p = Program(lanes, depth)
    # layernorm, hostile rows included
    n, rows = 3 * lanes + 1, 6
    x = (rng.standard_normal((rows, n)) * 5 + 20).astype(np.float32)
    x[0] = 2.5
    x[1] = 0.0
    x[2] *= 1e12
    x[3] = -x[3] * 1e-3
    a_x = p.put_rows(F(x), FP32)
    a_xb = p.put_rows(G.round_bf16(F(x)), BF16)
    a_gb = p.put_gamma_beta(G.bf16_bits(1 + rng.standard_normal(n) * 0.3), G.bf16_bits(rng.standard_normal(n)))
    a_stats = p.alloc(-(-2 * rows // lanes))
    a_stats2 = p.alloc(-(-2 * rows // lanes))
    a_y = p.alloc(rows * p.model.pitch(n, FP32))
    a_yb = p.alloc(rows * p.model.pitch(n, BF16))
    # softmax: bitmap with fully-masked, masked-but-one, -inf entries; n spans two bitmap words
    sm = []
    for n_s, rows_s in ((13, 5), (32 * lanes + 5, 3), (1, 2)):
        s = (rng.standard_normal((rows_s, n_s)) * 6).astype(np.float32)
        vis = rng.random((rows_s, n_s)) < 0.5
        if rows_s >= 5:
            s[0] = 9.0                                   # all equal
            vis[1] = False                               # fully masked
            vis[2] = False
            vis[2, n_s - 1] = True                       # masked but one
            s[3, ::3] = -np.inf                          # -inf from an additive mask
            s[4] = 1e38 * np.sign(s[4])                  # large magnitudes
        sm.append(dict(n=n_s, rows=rows_s, a=p.put_rows(F(s), FP32), m=p.put_bitmap(vis),
                       d=p.alloc(rows_s * p.model.pitch(n_s, BF16)), d2=p.alloc(rows_s * p.model.pitch(n_s, FP32))))
    # KV cache
    kv_n, cap = 2 * lanes + 2, 5
    a_k = p.put_rows(F(rng.standard_normal((2, kv_n)).astype(np.float32)), FP32)
    a_cache = p.alloc(cap * p.model.pitch(kv_n, BF16))
    # many rows: per-row scalars (COL operands, MAX/SUM results) spanning several words
    many = 2 * 2 * lanes + 3
    a_m = p.put_rows(_hostile_rows(rng, many, 3), FP32)
    col_b = p.put_elems(G.bf16_bits(rng.standard_normal(many)), BF16)
    col_f = p.put_elems(F(rng.standard_normal(many).astype(np.float32)), FP32)
    a_mo = p.alloc(many * p.model.pitch(3, FP32))
    a_red = p.alloc(2 * (-(-many // lanes)))
    guard = p.alloc(2)                                   # stays zero: no instruction may write it

    p.add("LN_STATS fp32", op=Opcode.LN_STATS.value, a=a_x, d=a_stats, n=n, rows=rows, imm0=f(1 / n), imm1=f(1e-5))
    p.add("LN_APPLY fp32", op=Opcode.LN_APPLY.value, a=a_x, b=a_gb, aux=a_stats, d=a_y, n=n, rows=rows)
    p.add("LN_STATS bf16", op=Opcode.LN_STATS.value, a=a_xb, a_fmt=BF16, d=a_stats2, n=n, rows=rows,
          imm0=f(1 / n), imm1=f(1e-5))
    p.add("LN_APPLY bf16", op=Opcode.LN_APPLY.value, a=a_xb, a_fmt=BF16, b=a_gb, aux=a_stats2, d=a_yb, d_fmt=BF16,
          n=n, rows=rows)
    for g in sm:
        for mode in (MASK_BITMAP, MASK_CAUSAL, MASK_PREFIX, MASK_NONE):
            p.add(f"SOFTMAX n={g['n']} mask={mode}", op=Opcode.SOFTMAX.value, a=g["a"], d=g["d"], d_fmt=BF16,
                  aux=g["m"], n=g["n"], rows=g["rows"], mask=mode, pos=1)
        p.add(f"SOFTMAX n={g['n']} fp32", op=Opcode.SOFTMAX.value, a=g["a"], d=g["d2"], aux=g["m"], n=g["n"],
              rows=g["rows"], mask=MASK_BITMAP)
    p.add("KV_APPEND", op=Opcode.KV_APPEND.value, a=a_k, d=a_cache, n=kv_n, rows=2, pos=2, imm0=cap, d_fmt=BF16)
    p.add("KV_APPEND last", op=Opcode.KV_APPEND.value, a=a_k, d=a_cache, n=kv_n, rows=1, pos=4, imm0=cap, d_fmt=BF16)
    p.add("ADD COL bf16 many rows", op=Opcode.ADD.value, a=a_m, b=col_b, b_mode=COL, b_fmt=BF16, d=a_mo, n=3, rows=many)
    p.add("MUL COL fp32 many rows", op=Opcode.MUL.value, a=a_m, b=col_f, b_mode=COL, d=a_mo, n=3, rows=many)
    p.add("MAX many rows bf16", op=Opcode.MAX.value, a=a_m, d=a_red, n=3, rows=many, d_fmt=BF16)
    p.add("SUM many rows fp32", op=Opcode.SUM.value, a=a_m, d=a_red + 2, n=3, rows=many)
    # Errors: each must leave memory untouched.
    bad = [
        ("bad opcode", dict(op=31, a=0, d=guard, n=4, rows=1), ERR["BAD_OPCODE"]),
        ("n = 0", dict(op=Opcode.COPY.value, a=0, d=guard, n=0, rows=1), ERR["BAD_LENGTH"]),
        ("n > max_n", dict(op=Opcode.COPY.value, a=0, d=guard, n=4097, rows=1), ERR["BAD_LENGTH"]),
        ("rows = 0", dict(op=Opcode.COPY.value, a=0, d=guard, n=4, rows=0), ERR["BAD_LENGTH"]),
        ("A past the end", dict(op=Opcode.COPY.value, a=depth - 1, d=guard, n=lanes + 1, rows=1), ERR["BAD_ADDRESS"]),
        ("D past the end", dict(op=Opcode.COPY.value, a=0, d=depth - 1, n=4, rows=2), ERR["BAD_ADDRESS"]),
        ("D beyond 2^24", dict(op=Opcode.COPY.value, a=0, d=(1 << 24) - 1, n=4, rows=3), ERR["BAD_ADDRESS"]),
        ("B past the end", dict(op=Opcode.ADD.value, a=0, b=depth - 1, b_mode=ROW, d=guard, n=4 * lanes, rows=1),
         ERR["BAD_ADDRESS"]),
        ("COL B past the end", dict(op=Opcode.MUL.value, a=0, b=depth - 1, b_mode=COL, d=guard, n=1, rows=lanes + 1),
         ERR["BAD_ADDRESS"]),
        ("bitmap past the end", dict(op=Opcode.SOFTMAX.value, a=0, aux=depth - 1, mask=MASK_BITMAP, d=guard, n=4,
                                     rows=2), ERR["BAD_ADDRESS"]),
        ("stats past the end", dict(op=Opcode.LN_APPLY.value, a=0, b=0, aux=depth - 1, d=guard, n=4,
                                    rows=lanes + 1), ERR["BAD_ADDRESS"]),
        ("KV region past the end", dict(op=Opcode.KV_APPEND.value, a=0, d=depth - 4, n=lanes, rows=1, imm0=5),
         ERR["BAD_ADDRESS"]),
        ("mask on ADD", dict(op=Opcode.ADD.value, a=0, d=guard, n=4, rows=1, mask=MASK_CAUSAL), ERR["BAD_MODE"]),
        ("PREFIX mask on MAX", dict(op=Opcode.MAX.value, a=0, d=guard, n=4, rows=1, mask=MASK_PREFIX),
         ERR["BAD_MODE"]),
        ("LN_STATS to BF16", dict(op=Opcode.LN_STATS.value, a=0, d=guard, n=4, rows=1, d_fmt=BF16), ERR["BAD_MODE"]),
        ("KV overflow", dict(op=Opcode.KV_APPEND.value, a=a_k, d=a_cache, n=kv_n, rows=2, pos=4, imm0=cap),
         ERR["KV_OVERFLOW"]),
    ]
    for name, ins, want in bad:
        got = p.add(name, **ins)
        assert got == want, (name, got, want)
    p.add("COPY after errors", op=Opcode.COPY.value, a=a_x, d=a_y, n=n, rows=1)
    return p


def test_vector_rtl_rows_tiny():
    """Layernorm, masked softmax (hostile rows), KV append and every error code on the 4-lane unit."""
    run_program(_rows_program(TINY, TINY_DEPTH, seed=2), TINY, TINY_DEPTH, "test_vector_rtl_rows_tiny")


def test_vector_rtl_row_groups_tiny():
    """Multi-pass instructions over several row groups (a full group, a partial last one, hostile rows in
    each: all-equal, fully masked, masked but one, -inf, huge; one group exactly; one row more): bit-exact
    with the golden model, and every instruction's cycle count is the closed form
    (:func:`hw.spec.vector_isa.vector_cycles`) of the RTL's cycle counter, so a wait per row (instead of
    per group) fails it."""
    lanes, G = TINY, ROW_GROUP
    rng = np.random.default_rng(11)
    p = Program(lanes, TINY_DEPTH)
    regions = []
    for rows, n in ((2 * G + 3, 13), (G, 2 * lanes), (G + 1, 1)):
        s = (rng.standard_normal((rows, n)) * 6).astype(np.float32)
        vis = rng.random((rows, n)) < 0.6
        for r0 in range(0, rows, G):                  # hostile rows in every group
            kinds = rng.permutation(5)
            for k, r in zip(kinds, range(r0, min(rows, r0 + 5)), strict=False):
                if k == 0:
                    s[r] = 9.0
                elif k == 1:
                    vis[r] = False
                elif k == 2:
                    vis[r] = False
                    vis[r, n - 1] = True
                elif k == 3:
                    s[r, ::3] = -np.inf
                else:
                    s[r] = 1e38 * np.sign(s[r])
        a = p.put_rows(F(s), FP32)
        m = p.put_bitmap(vis)
        d = p.alloc(rows * p.model.pitch(n, BF16))
        d2 = p.alloc(rows * p.model.pitch(n, FP32))
        st = p.alloc(-(-2 * rows // lanes))
        x = (rng.standard_normal((rows, n)) * 3 + 7).astype(np.float32)
        x[rows // 2] = 1.5                            # variance 0
        regions.append((rows, n, a, m, d, d2, st, p.put_rows(F(x), FP32)))
    for rows, n, a, m, d, d2, st, ax in regions:         # data first, then the instructions
        for mode in (MASK_BITMAP, MASK_CAUSAL, MASK_PREFIX, MASK_NONE):
            p.add(f"SOFTMAX rows={rows} n={n} mask={mode}", op=Opcode.SOFTMAX.value, a=a, d=d, d_fmt=BF16,
                  aux=m, n=n, rows=rows, mask=mode, pos=2)
        p.add(f"SOFTMAX rows={rows} n={n} fp32", op=Opcode.SOFTMAX.value, a=a, d=d2, aux=m, n=n, rows=rows,
              mask=MASK_BITMAP)
        p.add(f"LN_STATS rows={rows} n={n}", op=Opcode.LN_STATS.value, a=ax, d=st, n=n, rows=rows,
              imm0=f(1 / n), imm1=f(1e-5))
    metrics = run_program(p, lanes, TINY_DEPTH, "test_vector_rtl_row_groups_tiny")
    for met, fields in zip(metrics, p.fields, strict=True):
        want = vector_cycles(Opcode(fields["op"]).name, fields["n"], fields["rows"], lanes)
        assert met["cycles"] == want, (met["name"], met["cycles"], want)


def _random_program(lanes, depth, seed, count):
    """Random instruction sequence (opcodes, formats, modes, lengths) over shared regions."""
    rng = np.random.default_rng(seed)
    p = Program(lanes, depth)
    n_max, rows_max = 5 * lanes, 4
    words = rows_max * p.model.pitch(n_max, FP32)
    bufs = [p.put_rows(_hostile_rows(rng, rows_max, n_max), FP32) for _ in range(3)]
    bufs += [p.alloc(words) for _ in range(3)]
    mask = p.put_bitmap(rng.random((rows_max, n_max)) < 0.7)
    gb = p.put_gamma_beta(G.bf16_bits(rng.standard_normal(n_max)), G.bf16_bits(rng.standard_normal(n_max)))
    stats = p.alloc(4)
    ops = [o for o in Opcode if o != Opcode.LN_APPLY]
    for k in range(count):
        op = ops[rng.integers(len(ops))]
        n, rows = int(rng.integers(1, n_max + 1)), int(rng.integers(1, rows_max + 1))
        a, b, d = (int(bufs[i]) for i in rng.choice(len(bufs), 3))
        if rng.random() < 0.3:
            d = a                                       # in place
        d_fmt = int(rng.integers(2))
        if d == a:
            d_fmt = BF16                                # aliasing is defined for a destination pitch <= source pitch
        fields = dict(op=op.value, a=a, d=d, n=n, rows=rows, a_fmt=int(rng.integers(2)), d_fmt=d_fmt,
                      b=b, b_fmt=int(rng.integers(2)), b_mode=int(rng.integers(4)),
                      imm0=int(F(np.float32(rng.standard_normal()))), imm1=int(F(np.float32(rng.standard_normal()))))
        if op == Opcode.SOFTMAX:
            fields.update(mask=int(rng.integers(4)), aux=mask, pos=int(rng.integers(3)))
        if op == Opcode.LN_STATS:
            fields.update(d=stats, d_fmt=FP32, imm0=f(1 / n), imm1=f(1e-5))
            p.add(f"r{k} LN_STATS", **fields)
            fields = dict(op=Opcode.LN_APPLY.value, a=a, b=gb, aux=stats, d=d, n=n, rows=rows,
                          a_fmt=fields["a_fmt"], d_fmt=d_fmt)
            op = Opcode.LN_APPLY
        if op == Opcode.KV_APPEND:
            fields.update(rows=1, pos=int(rng.integers(0, 3)), imm0=3, n=min(n, 2 * lanes))
        p.add(f"r{k} {op.name} n={n} rows={rows}", **fields)
    return p


def test_vector_rtl_random_tiny():
    """200 random instructions back to back (in-place and overlapping regions included)."""
    p = _random_program(TINY, TINY_DEPTH, seed=3, count=200)
    run_program(p, TINY, TINY_DEPTH, "test_vector_rtl_random_tiny")


def test_vector_rtl_mismatch_fails(tmp_path):
    """The testbench can fail: a golden image with one flipped bit, or a wrong expected error code."""
    from sim.benchmarks.vector import vector_build
    from sim.build import CocotbFailure

    p = Program(TINY, TINY_DEPTH)
    a = p.put_rows(F(np.arange(6, dtype=np.float32)[None, :]), FP32)
    p.add(op=Opcode.EXP.value, a=a, d=a + 4, n=6, rows=1)
    p.model.mem[a + 4, 1] ^= 1
    p.save(tmp_path / "bad.npz")
    with pytest.raises(CocotbFailure, match="1 words differ; first at word 4 lane 1"):
        vector_build(TINY, TINY_DEPTH).run("sim.tb.vector_tb", "run_scenarios",
                                           env={"SCENARIOS": str(tmp_path / "bad.npz")})
    p.model.mem[a + 4, 1] ^= 1
    p.errors[0] = ERR["BAD_LENGTH"]
    p.save(tmp_path / "bad_err.npz")
    with pytest.raises(CocotbFailure, match="error code RTL 0 golden 2"):
        vector_build(TINY, TINY_DEPTH).run("sim.tb.vector_tb", "run_scenarios",
                                           env={"SCENARIOS": str(tmp_path / "bad_err.npz")})


def test_vector_rtl_gpt2_default():
    """GPT-2 small dimensions on the 16-lane unit: layernorm 16 x 768, residual and bias adds, score scaling,
    causal softmax at sequence lengths 1, 7, 64 and 128, GELU on 3072-wide rows, K/V append; hostile rows mixed
    in. Bit-exact against the golden model; the golden outputs then checked against float64."""
    p, reg = gpt2_program(DEFAULT, DEFAULT_DEPTH, seed=4, hostile=True)
    metrics = run_program(p, DEFAULT, DEFAULT_DEPTH, "test_vector_rtl_gpt2_default")
    assert all(m["error"] == 0 for m in metrics)
    # Golden (= RTL) against float64 on the same data.
    model = p.model
    x = G.bf16_to_f32(reg["x"]).astype(np.float64)
    y = G.bf16_to_f32(reg["ln_out"]).astype(np.float64)
    ref, _ = _layernorm64(x)
    ref = ref * G.bf16_to_f32(reg["gamma"]) + G.bf16_to_f32(reg["beta"])
    assert np.all(np.abs(y - ref) <= 2.0**-8 * np.abs(ref) + 1e-3)     # BF16 output: 2^-9 rounding + FP32 error
    for seq, (_, _, a_p, s_bits) in reg["scores"].items():
        prob = G.bf16_to_f32(model.get(a_p, seq, seq, BF16)).astype(np.float64)
        vis = np.arange(seq)[None, :] <= np.arange(seq)[:, None]
        scaled = vals(s_bits) / 8.0
        live = (np.where(vis, scaled, -np.inf) > -np.inf).any(axis=1)
        assert np.all(np.abs(prob[live].sum(axis=1) - 1) <= SOFTMAX_SUM_BF16), seq
        assert np.all(prob[~live] == 0)
        ref = _softmax64(np.where(np.isfinite(scaled), scaled, -np.inf), vis)[live]
        assert np.all(np.abs(prob[live] - ref) <= 2.0**-8 * ref + 1e-6), seq
    g = G.bf16_to_f32(model.get(reg["a_g"], 2, 3072, BF16)).astype(np.float64)
    gref = T.gelu_f64(G.bf16_to_f32(reg["gelu_in"]).astype(np.float64))
    assert np.all(np.abs(g - gref) <= 2.0**-8 * np.abs(gref) + 2.0**-20)
    cpe = {m["name"]: m["cycles"] / m["elements"] for m in metrics}
    assert cpe["ADD_residual"] < 1.2 / DEFAULT        # rows stream back to back: about 1/L cycles per element
    # The cycle model of the VectorUnit docstring, exactly.
    E, R = VectorUnit.EXIT, 2 * int(math.log2(DEFAULT))
    C = E + R + 6
    group = ROW_GROUP
    for m, fields in zip(metrics, p.fields, strict=True):
        n, rows = fields["n"], fields["rows"]
        nb = -(-n // DEFAULT)
        g = -(-rows // group)
        op = Opcode(fields["op"])
        want = {Opcode.LN_STATS: rows * (2 * nb + 2) + g * (2 * (E + R + 1) + E) + C,
                Opcode.LN_APPLY: rows * (nb + 2) + C,
                Opcode.SOFTMAX: rows * (3 * nb + 1) + g * (2 * (E + R + 1) + E) + C}.get(op, rows * nb + C)
        assert m["cycles"] == want, (m["name"], m["cycles"], want)
        assert m["cycles"] == vector_cycles(op.name, n, rows, DEFAULT), m["name"]
