"""NPU matrix unit: systolic array, scratchpads, DMA and instruction interface.

Fast tier: the array and the BF16 rounding on the Amaranth simulator, the
golden GEMM against float64, the instruction table. Verilator tier (cocotb,
clock inside the simulation): tiled GEMMs bit-exact against
``sim/golden/gemm.py``, edge cases, rejected instructions, and compute-phase
utilization on the default 16 x 16 array.
"""


import numpy as np
import pytest

from hw.config import preset
from hw.npu.isa import INSTRUCTION_BITS, ErrorCode, Opcode, Target, decode, encode
from sim.build import BUILD_ROOT
from sim.golden import fp as G
from sim.golden.gemm import gemm, to_bf16
from sim.golden.operands import bf16_pairs
from sim.tb.matrix_kernels import (
    GemmSpec,
    MemImage,
    Segment,
    check_f64,
    extract,
    gemm_program,
    run_gpt2,
    run_segments,
    system_build,
)

RUNS = BUILD_ROOT / "runs"


# -- golden model and instruction table (no RTL) ------------------------------------------



def test_golden_gemm_small_by_hand():
    """2x2 @ 2x1 on a 1-row array is ((0 + a0 w0) + (a1 w1))... order; exact small integers."""
    a = G.bf16_bits(np.array([[1.0, 2.0], [3.0, -4.0]]))
    w = G.bf16_bits(np.array([[0.5], [0.25]]))
    got = G.bits_to_f32(gemm(a, w, rows=1))
    np.testing.assert_array_equal(got, np.array([[1.0], [0.5]], dtype=np.float32))


def test_golden_gemm_order_matters():
    """The array order is not a plain sequential sum: [2^24, 1, 1, -2^24] . [1, 1, 1, 1]."""
    big = 2.0**24
    a = G.bf16_bits(np.array([[big, 1.0, 1.0, -big]]))
    w = G.bf16_bits(np.ones((4, 1)))
    # R = 2: (0 + big + 1) -> big (tie to even); (0 + 1 - big) -> -(big - 1) exactly; big - (big - 1) = 1.
    assert float(G.bits_to_f32(gemm(a, w, rows=2))[0, 0]) == 1.0
    # R = 4: one chain: big, big (tie), big (tie), 0.
    assert float(G.bits_to_f32(gemm(a, w, rows=4))[0, 0]) == 0.0


@pytest.mark.parametrize("L", [16, 128])
def test_golden_gpt2_attention_vs_float64(L):
    """Golden GEMM on GPT-2 attention shapes stays within the stated float64 bound."""
    rng = np.random.default_rng(L)
    q = G.bf16_bits(rng.standard_normal((L, 64)))
    k = G.bf16_bits(rng.standard_normal((L, 64)))
    s = G.bf16_bits(rng.random((L, L)) / L)
    v = G.bf16_bits(rng.standard_normal((L, 64)))
    check_f64(q, k.T, gemm(q, k.T, 16), 16, "QK^T")
    check_f64(s, v, gemm(s, v, 16), 16, "SV")


def test_isa_roundtrip_and_layout():
    assert INSTRUCTION_BITS == 192
    word = encode(Opcode.COMPUTE, wait=0x8001, signal=0x0102, accumulate=1, act_addr=5, act_stride=7,
                  wgt_addr=9, wgt_stride=11, acc_addr=13, acc_stride=15, m=17, k=19, n=21)
    f = decode(word)
    assert f["opcode"] == Opcode.COMPUTE and f["wait"] == 0x8001 and f["signal"] == 0x0102
    assert (f["m"], f["k"], f["n"], f["acc_stride"]) == (17, 19, 21, 15)
    with pytest.raises(ValueError, match="fit in 16 bits"):
        encode(Opcode.LOAD, rows=1 << 16)
    with pytest.raises(KeyError, match="Unknown instruction field"):
        encode(Opcode.LOAD, bogus=1)


def test_bad_parameters():
    from hw.npu.dma import DmaLoad
    from hw.npu.matrix_unit import MatrixUnit
    from hw.npu.spm import Scratchpad
    from hw.npu.systolic import SystolicArray

    with pytest.raises(ValueError, match="Array rows must be a positive integer, not 0"):
        SystolicArray(0, 4)
    with pytest.raises(ValueError, match="Array columns must be a positive integer"):
        SystolicArray(4, "4")
    with pytest.raises(ValueError, match="PE adder stages must be one of 1, 2, 3, 4, 5, 6, 7, 8, not 9"):
        SystolicArray(4, 4, add_stages=9)
    with pytest.raises(ValueError, match="PE multiplier stages must be one of 1, 2, 3, not 4"):
        SystolicArray(4, 4, mul_stages=4)
    from hw.spec.config import ConfigError, NpuConfig
    with pytest.raises(ConfigError, match=r"NpuConfig.pe_add_stages must be an integer in 1..8, not 0"):
        preset("tiny").replace(**{"npu.pe_add_stages": 0})
    with pytest.raises(ConfigError, match=r"NpuConfig.pe_mul_stages must be an integer in 1..3, not True"):
        NpuConfig(pe_mul_stages=True)
    # left out of repr at their defaults (module names and build keys of the other presets unchanged)
    assert "pe_" not in repr(preset("tiny")) and "pe_mul_stages=3, pe_add_stages=4" in repr(preset("tiny-p4"))
    with pytest.raises(ValueError, match="square array"):
        MatrixUnit(preset("ianus"))
    with pytest.raises(ValueError, match="power of two of at least 2"):
        Scratchpad(100, 4, 16)
    with pytest.raises(ValueError, match="at most 16"):
        DmaLoad(preset("tiny"), 32)


# -- Amaranth simulator: array and rounding --------------------------------------------------

def _array_schedule(R, C, passes, gap=0, latency=None):
    """Per-cycle inputs of SystolicArray(R, C) for weight-stationary passes per the timing contract (followed by
    ``latency + 2`` idle cycles, ``R + C + 2`` by default)."""
    M = max(a.shape[0] for a, _, _ in passes)
    slot = max(M, R) + gap
    sched = []
    for s in range(-1, len(passes)):
        for c in range(slot):
            ins = {}
            if s + 1 < len(passes) and c < R:
                _, w, kv = passes[s + 1]
                ins["w"] = (w[c], c, int(c < kv))
            if s >= 0 and c < passes[s][0].shape[0]:
                ins["a"] = (passes[s][0][c], c == 0)
            sched.append(ins)
    sched += [{}] * ((R + C if latency is None else latency) + 2)
    n = len(sched)
    arr = {"w_row": np.zeros((n, C), np.uint16), "w_valid": np.zeros(n, np.uint8), "w_index": np.zeros(n, np.uint8),
           "w_en": np.zeros(n, np.uint8), "act": np.full((n, R), 0x7FC1, np.uint16),   # garbage when idle
           "act_valid": np.zeros(n, np.uint8), "act_first": np.zeros(n, np.uint8)}
    for t, ins in enumerate(sched):
        if "w" in ins:
            row, idx, en = ins["w"]
            arr["w_row"][t], arr["w_valid"][t], arr["w_index"][t], arr["w_en"][t] = row, 1, idx, en
        if "a" in ins:
            row, first = ins["a"]
            arr["act"][t], arr["act_valid"][t], arr["act_first"][t] = row, 1, int(first)
    return arr


def _array_sim(R, C, passes, gap=0, stages=(1, 1)):
    """Run the schedule on SystolicArray(R, C) (PE depths ``stages`` = (mul, add)) in Amaranth's simulator; return
    the outputs and the cycles (schedule index) of ``out_valid``."""
    from amaranth.sim import Simulator

    from hw.npu.systolic import SystolicArray
    from hw.spec.pipeline import array_latency

    dut = SystolicArray(R, C, mul_stages=stages[0], add_stages=stages[1])
    s = _array_schedule(R, C, passes, gap, array_latency(R, C, *stages))
    got, times = [], []

    async def bench(ctx):
        for t in range(len(s["w_valid"])):
            for j in range(C):
                ctx.set(dut.w_row[j], int(s["w_row"][t, j]))
            for name in ("w_valid", "w_index", "w_en", "act_valid", "act_first"):
                ctx.set(getattr(dut, name), int(s[name][t]))
            for i in range(R):
                ctx.set(dut.act[i], int(s["act"][t, i]))
            if ctx.get(dut.out_valid):
                got.append([ctx.get(dut.out[j]) for j in range(C)])
                times.append(t)
            await ctx.tick()

    sim = Simulator(dut)
    sim.add_clock(1e-8)
    sim.add_testbench(bench)
    sim.run()
    return np.array(got, dtype=np.uint32), np.array(times), s


def _array_rtl(R, C, passes, gap, test_name, stages=(1, 1)):
    """Run the schedule on the clock-gated SystolicArray(R, C) on Verilator; return the outputs.

    (Amaranth's simulator orders a derived clock's edge after the flops of its source clock, so a gated
    clock cannot be simulated there; Verilator follows Verilog's scheduling.)"""
    from hw.npu.systolic import SystolicArray
    from hw.spec.pipeline import array_latency
    from sim.build import BUILD_ROOT, build

    run = BUILD_ROOT / "runs" / test_name
    run.mkdir(parents=True, exist_ok=True)
    np.savez(run / "schedule.npz", **_array_schedule(R, C, passes, gap, array_latency(R, C, *stages)))
    depth = "" if stages == (1, 1) else f"_m{stages[0]}a{stages[1]}"
    b = build(lambda: SystolicArray(R, C, clock_gate=True, mul_stages=stages[0], add_stages=stages[1]),
              name=f"array_gated_{R}x{C}{depth}", key=f"{R}x{C} gated" + (f" stages={stages}" if depth else ""),
              sim="verilator")
    xml = b.run("sim.tb.array_tb", "run_schedule", test_name=test_name, env={"RUN_DIR": str(run)})
    return np.load(xml.parent / "out.npy")


ARRAY_STAGES = [(1, 1), (2, 4), (2, 5), (2, 6), (2, 7), (2, 8), (3, 4), (3, 8)]
"""PE depths (multiplier, adder) under test: the one-stage PE, the pipelined presets' (``tiny-p4``: 3, 4) and the
other adder depths."""


_ARRAY_CASES = [(3, 5, 4, 0, False), (4, 4, 2, 1, False), (2, 3, 7, 0, False),
                (3, 5, 4, 0, True), (4, 4, 2, 12, True), (2, 3, 7, 9, True)]


# every depth on the Amaranth simulator; the clock-gated Verilator builds for the one-stage PE and the presets'
@pytest.mark.parametrize("R,C,M,gap,gate,stages", [
    pytest.param(*case, stages, id=f"{'-'.join(map(str, case))}-m{stages[0]}a{stages[1]}")
    for stages in ARRAY_STAGES for case in _ARRAY_CASES if not case[4] or stages in ((1, 1), (3, 4), (3, 8))])
def test_array_amaranth_sim(R, C, M, gap, gate, stages):
    """Back-to-back passes with next-pass weights loading during compute, K-row bypass, special values.

    ``gate``: the clock-gated array (SoC simulation build) on Verilator; gaps longer than the array's
    latency let the gate close between passes, and the first pass's weights are written while nothing
    else is in flight. ``stages``: the PEs' pipeline depths; on the Amaranth simulator every output row
    must leave exactly ``latency`` cycles after its activation row entered."""
    rng = np.random.default_rng(R * 100 + C)
    passes = []
    for p in range(5):
        if p == 3:      # special operands: NaN, Inf, subnormals, zeros of both signs
            x, y = bf16_pairs(rng, M * R + R * C)
            a, w = x[:M * R].reshape(M, R), y[M * R:].reshape(R, C)
        else:
            a = G.bf16_bits(rng.standard_normal((M, R)) * 2.0 ** rng.integers(-4, 5))
            w = G.bf16_bits(rng.standard_normal((R, C)))
        kvalid = R if p % 2 == 0 else max(1, R - 1 - p % R)
        if p == 4:
            a[:, kvalid:] = 0x7FC0  # NaN in bypassed rows must not leak
        passes.append((a, w, kvalid))
    if gate:
        from hw.spec.pipeline import array_latency

        if gap:      # as long beyond the deeper array's latency as beyond the one-stage array's
            gap += array_latency(R, C, *stages) - (R + C)
        depth = "" if stages == (1, 1) else f"_m{stages[0]}a{stages[1]}"
        got = _array_rtl(R, C, passes, gap, f"array_gated_{R}_{C}_{M}_{gap}{depth}", stages)
    else:
        got, times, sched = _array_sim(R, C, passes, gap, stages)
        # the latency to the cycle, written out: R + C for the one-stage PE, 4R + C + 1 for (2, 4)
        latency = {(1, 1): R + C, (2, 4): 4 * R + C + 1, (2, 5): 5 * R + C + 1, (2, 6): 6 * R + C + 1,
                   (2, 7): 7 * R + C + 1, (2, 8): 8 * R + C + 1, (3, 4): 4 * R + C + 2,
                   (3, 8): 8 * R + C + 2}[stages]
        np.testing.assert_array_equal(times, np.flatnonzero(sched["act_valid"]) + latency)
    want = np.concatenate([gemm(a[:, :kv], w[:kv], R) for a, w, kv in passes])
    np.testing.assert_array_equal(got, want)


def test_fp32_to_bf16_amaranth_sim():
    from amaranth.hdl import Module, Signal
    from amaranth.sim import Simulator

    from hw.arith import fp32_to_bf16  # the rounding the store DMA uses
    from sim.golden.operands import SPECIAL_F32

    rng = np.random.default_rng(5)
    vals = np.concatenate([SPECIAL_F32, rng.integers(0, 2**32, 3000, dtype=np.uint64).astype(np.uint32),
                           np.array([0x3F808000, 0x3F818000, 0x3F808001, 0x7F7FFFFF, 0x00800000,
                                     0x807FFFFF], dtype=np.uint32)])
    m = Module()
    x, y = Signal(32), Signal(16)
    m.d.comb += y.eq(fp32_to_bf16(x))
    got = []

    async def bench(ctx):
        for v in vals:
            ctx.set(x, int(v))
            got.append(ctx.get(y))

    sim = Simulator(m)
    sim.add_testbench(bench)
    sim.run()
    np.testing.assert_array_equal(np.array(got, dtype=np.uint16), to_bf16(vals))


# -- Verilator: tiny array ---------------------------------------------------------------------

def _gemm_case(img, rng, M, K, N, *, transposed=False, bf16=False, scale=1.0, special=False):
    a = G.bf16_bits(rng.standard_normal((M, K)) * scale)
    w = G.bf16_bits(rng.standard_normal((K, N)))
    if special:
        x, y = bf16_pairs(rng, M * K + K * N)
        a, w = x[:M * K].reshape(M, K), y[M * K:].reshape(K, N)
    A = img.put(a)
    W = img.put(np.ascontiguousarray(w.T) if transposed else w)
    Cm = img.alloc(M, N, 2 if bf16 else 4)
    return a, w, GemmSpec(A, W, Cm, w_transposed=transposed, out_bf16=bf16)


def _expected(a, w, spec, rows):
    acc = gemm(a, w, rows)
    return to_bf16(acc) if spec.out_bf16 else acc


def _npu_args(cfg):
    n = cfg.npu
    return n.array_rows, n.act_spm_words, n.wgt_spm_words, n.acc_spm_words


COMPUTE_COUNTER_START = 0
"""Cycles the compute counter counts for one COMPUTE beyond its cycle formula (measured on tiny)."""

TINY_CASES = [
    # (M, K, N, options)
    (13, 10, 7, {}),
    (5, 1, 6, {}),                                   # K = 1
    (1, 9, 11, {}),                                  # a single row
    (6, 8, 1, {}),                                   # a single column
    (1, 1, 1, {}),
    (3, 17, 5, {}),                                  # M < R: slots padded to R
    (7, 20, 9, {"transposed": True}),                # W stored transposed (K^T)
    (9, 12, 10, {"bf16": True}),                     # BF16 output
    (20, 40, 24, {"tiles": (8, 16, 16)}),            # 3 M-tiles x 3 K-tiles x 2 N-tiles, accumulate
    (12, 33, 20, {"tiles": (5, 16, 16), "transposed": True, "bf16": True}),
    (8, 12, 6, {"special": True}),                   # NaN / Inf / subnormal operands
    (64, 16, 16, {"tiles": (64, 16, 16), "buffers": 1}),   # act and acc scratchpads exactly full
    (16, 64, 16, {"tiles": (16, 64, 16), "buffers": 1}),   # act and wgt scratchpads exactly full
]


def _tiny_run(name, backpressure=False, config="tiny"):
    cfg = preset(config)
    sb = system_build(cfg)
    rng = np.random.default_rng(7)
    img = MemImage(1 << sb.extra["words_log2"])
    cases, segments = [], []
    for M, K, N, opt in TINY_CASES:
        opt = dict(opt)
        tiles, buffers = opt.pop("tiles", None), opt.pop("buffers", 2)
        a, w, spec = _gemm_case(img, rng, M, K, N, **opt)
        prog, info = gemm_program(spec, *_npu_args(cfg), tiles=tiles, buffers=buffers)
        cases.append((a, w, spec))
        segments.append(Segment(prog, f"{M}x{K}x{N} {opt}"))
    res, words = run_segments(sb, RUNS / name, img, segments, (0, img.top // 32 - 1), backpressure=backpressure,
                              test_name=name, timeout_cycles=200_000)
    order_sensitive = 0
    for (a, w, spec), seg, r in zip(cases, segments, res, strict=True):
        assert r["error_code"] == 0, f"{seg.name}: error {ErrorCode(r['error_code']).name}"
        got = extract(words, spec.c)
        want = _expected(a, w, spec, cfg.npu.array_rows)
        bad = np.argwhere(got != want)
        assert bad.size == 0, (f"{seg.name}: {len(bad)} mismatches, first at {tuple(bad[0])}: "
                               f"RTL {int(got[tuple(bad[0])]):#x} golden {int(want[tuple(bad[0])]):#x}")
        # The comparison can fail: a golden model with another accumulation order disagrees.
        other = _expected(a, w, spec, 2 * cfg.npu.array_rows)
        order_sensitive += int(np.any(got != other))
    assert order_sensitive >= 3, "the cases do not distinguish accumulation orders"
    return res


@pytest.mark.parametrize("config", ["tiny", "tiny-p4"])
def test_tiny_gemm_edge_cases(config):
    """Shapes not multiples of the array, K = 1, one row/column, transposed weights, BF16 output,
    multi-tile accumulation, special values, full scratchpads: all bit-exact. ``tiny-p4``: pipelined PEs
    (3-stage multipliers without DSP blocks, 4-stage adders; issue 15), the same bits.

    The first case is one COMPUTE (a single tile): the compute counter (engine running or draining) holds it
    to the cycle formula of :class:`hw.npu.matrix_unit.ComputeEngine`, ``max(R, 4) + max(M, R, 4) * KB * NB``
    + :func:`hw.spec.pipeline.compute_drain`, plus the one cycle the counter starts before the first slot."""
    from hw.spec.pipeline import compute_drain

    res = _tiny_run("tiny_edge" if config == "tiny" else f"{config}_edge", config=config)
    n = preset(config).npu
    R, C = n.array_rows, n.array_cols
    M, K, N, _ = TINY_CASES[0]
    want = max(R, 4) + max(M, R, 4) * -(-K // R) * -(-N // C) + compute_drain(R, C, n.pe_mul_stages,
                                                                                 n.pe_add_stages)
    assert res[0]["counters"]["compute"] == want + COMPUTE_COUNTER_START, res[0]["counters"]


def test_tiny_gemm_backpressure():
    """The same program with pseudo-random memory back-pressure: same results, more cycles."""
    plain = _tiny_run("tiny_edge_plain_for_bp")
    bp = _tiny_run("tiny_edge_bp", backpressure=True)
    assert sum(r["counters"]["cycles"] for r in bp) > sum(r["counters"]["cycles"] for r in plain)


def _bad_opcode_word():
    return 7  # opcode field (bits 0..3) = 7: reserved


TINY_ERRORS = [
    ("act load overrun", encode(Opcode.LOAD, target=Target.ACT, mem_addr=0, mem_stride=32, rows=65, cols=16,
                                spm_addr=0, spm_stride=64), ErrorCode.ACT_OVERRUN),
    ("act load at the limit", encode(Opcode.LOAD, target=Target.ACT, mem_addr=0, mem_stride=32, rows=64,
                                     cols=16, spm_addr=0, spm_stride=64), ErrorCode.NONE),
    ("wgt transposed overrun", encode(Opcode.LOAD, target=Target.WGT, transpose=1, mem_addr=0, mem_stride=512,
                                      rows=8, cols=200, spm_addr=60, spm_stride=8), ErrorCode.WGT_OVERRUN),
    ("compute acc overrun", encode(Opcode.COMPUTE, m=64, k=4, n=20, acc_stride=64, act_stride=64,
                                   wgt_stride=4), ErrorCode.ACC_OVERRUN),
    ("compute act overrun", encode(Opcode.COMPUTE, m=10, k=8, n=4, act_addr=250, act_stride=0),
     ErrorCode.ACT_OVERRUN),
    ("compute wgt overrun", encode(Opcode.COMPUTE, m=4, k=8, n=8, wgt_addr=200, wgt_stride=50),
     ErrorCode.WGT_OVERRUN),
    ("store acc overrun", None, ErrorCode.ACC_OVERRUN),       # filled in with the sentinel address
    ("store misaligned", encode(Opcode.STORE, mem_addr=8, mem_stride=32, rows=1, cols=4), ErrorCode.MISALIGNED),
    ("load zero rows", encode(Opcode.LOAD, target=Target.WGT, mem_stride=32, rows=0, cols=4), ErrorCode.BAD_SIZE),
    ("reserved opcode", _bad_opcode_word(), ErrorCode.BAD_OPCODE),
]


def test_tiny_rejected_instructions():
    """Overruns and malformed instructions are rejected with their error code and have no effect;
    a NOP signalling one semaphore 16 times overflows it; after ``clear`` a GEMM runs normally."""
    cfg = preset("tiny")
    sb = system_build(cfg)
    rng = np.random.default_rng(3)
    img = MemImage(1 << sb.extra["words_log2"])
    sentinel = np.full((4, 8), 0xDEADBEEF, dtype=np.uint32)
    S = img.put(sentinel, esize=4)
    segments, expect = [], []
    for name, word, code in TINY_ERRORS:
        if word is None:
            word = encode(Opcode.STORE, mem_addr=S.addr, mem_stride=S.stride, rows=2, cols=8, spm_addr=250,
                          spm_stride=6)
        segments.append(Segment([word], name))
        expect.append(code)
    segments.append(Segment([encode(Opcode.NOP, signal=1 << 15)] * 16, "token overflow"))
    expect.append(ErrorCode.TOKEN_OVERFLOW)
    a, w, spec = _gemm_case(img, rng, 6, 7, 5)
    prog, _ = gemm_program(spec, *_npu_args(cfg))
    segments.append(Segment(prog, "gemm after errors"))
    expect.append(ErrorCode.NONE)
    res, words = run_segments(sb, RUNS / "tiny_errors", img, segments, (0, img.top // 32 - 1),
                              test_name="tiny_errors", timeout_cycles=50_000)
    got_codes = [ErrorCode(r["error_code"]) for r in res]
    assert got_codes == expect, list(zip([s.name for s in segments], got_codes, strict=True))
    np.testing.assert_array_equal(extract(words, S), sentinel)      # rejected STORE wrote nothing
    np.testing.assert_array_equal(extract(words, spec.c), gemm(a, w, cfg.npu.array_rows))


# -- Verilator: default 16 x 16 array, GPT-2 small prefill ---------------------------------------

def test_default_attention_l128_utilization():
    """QK^T (K^T by transposed DMA) and S V for L = 128 on 16 x 16: bit-exact, compute-phase utilization >= 0.90."""
    for r in run_gpt2(128, ["qk", "sv"], "default_attn_l128"):
        print(r)
        assert r["util_compute"] >= 0.90, r


def test_default_gpt2_l16():
    """All six GPT-2 small prefill GEMMs with L = 16: bit-exact against the golden model."""
    for r in run_gpt2(16, ["qkv", "proj", "fc1", "fc2", "qk", "sv"], "default_gpt2_l16"):
        print(r)


def test_default_proj_l128_utilization():
    """(128 x 768)(768 x 768) on 16 x 16: bit-exact, compute-phase utilization >= 0.90."""
    for r in run_gpt2(128, ["proj"], "default_proj_l128"):
        print(r)
        assert r["util_compute"] >= 0.90, r


@pytest.mark.long
def test_default_gpt2_l128_all():
    """The remaining L = 128 GEMMs (QKV, FC1, FC2): bit-exact, compute-phase utilization >= 0.90."""
    for r in run_gpt2(128, ["qkv", "fc1", "fc2"], "default_gpt2_l128"):
        print(r)
        assert r["util_compute"] >= 0.90, r


def test_default_memory_error_response():
    """A LOAD beyond the memory model's range gets error responses: MEM_ERROR, and the unit still
    finishes the instruction (its token is given, so a waiting COMPUTE runs); after ``clear`` a GEMM works."""
    cfg = preset("default")
    sb = system_build(cfg)
    rng = np.random.default_rng(11)
    img = MemImage(1 << sb.extra["words_log2"])
    beyond = (1 << sb.extra["words_log2"]) * 32          # first byte the model does not hold
    bad = [encode(Opcode.LOAD, target=Target.WGT, signal=1, mem_addr=beyond, mem_stride=32, rows=4, cols=16,
                  spm_addr=0, spm_stride=4),
           encode(Opcode.COMPUTE, wait=1, m=1, k=4, n=16, wgt_stride=4)]
    a, w, spec = _gemm_case(img, rng, 20, 40, 24)
    prog, _ = gemm_program(spec, *_npu_args(cfg))
    res, words = run_segments(sb, RUNS / "default_mem_error", img,
                              [Segment(bad, "load beyond memory"), Segment(prog, "gemm after error")],
                              (0, img.top // 32 - 1), test_name="default_mem_error", timeout_cycles=100_000)
    assert [ErrorCode(r["error_code"]) for r in res] == [ErrorCode.MEM_ERROR, ErrorCode.NONE]
    np.testing.assert_array_equal(extract(words, spec.c), gemm(a, w, cfg.npu.array_rows))


def test_tiny_transposed_load_rate():
    """A transposed LOAD streams at about one memory column per cycle: its W x 16 blocks (W = 4 on the
    tiny array) take max(W, 16) = 16 cycles each (gathering the next block overlaps writing the
    previous one's transpose), not W + 16; and a GEMM whose weight tiles are such loads is bit-exact."""
    cfg = preset("tiny")
    sb = system_build(cfg)
    W = cfg.npu.array_cols
    rng = np.random.default_rng(13)
    img = MemImage(1 << sb.extra["words_log2"])
    rows, cols = 16, 64                                   # 4 x 4 blocks of W x 16; the whole wgt scratchpad
    T = img.put(G.bf16_bits(rng.standard_normal((rows, cols))))
    load = encode(Opcode.LOAD, target=Target.WGT, transpose=1, mem_addr=T.addr, mem_stride=T.stride, rows=rows,
                  cols=cols, spm_addr=0, spm_stride=cols)
    a, w, spec = _gemm_case(img, rng, 8, 64, 24, transposed=True)
    prog, _ = gemm_program(spec, *_npu_args(cfg), tiles=(8, 64, 16), buffers=1)
    res, words = run_segments(sb, RUNS / "tiny_transposed_rate", img,
                              [Segment([load], "transposed load"), Segment(prog, "gemm, transposed weights")],
                              (0, img.top // 32 - 1), test_name="tiny_transposed_rate", timeout_cycles=50_000)
    assert [r["error_code"] for r in res] == [0, 0]
    blocks = (rows // W) * (cols // 16)
    cycles = res[0]["counters"]["load"]
    print(f"transposed LOAD {rows} x {cols} at W = {W}: {cycles} cycles for {blocks} blocks")
    # memory latency (8) and the last block's 16 words are not overlapped
    assert cycles <= blocks * max(W, 16) + 16 + 16, cycles
    np.testing.assert_array_equal(extract(words, spec.c), gemm(a, w, cfg.npu.array_rows))
