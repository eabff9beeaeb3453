"""The vector unit's pipelined row accumulator (issue 15: ``npu.vec_acc_stages``, ``P`` interleaved partial
sums behind a ``P``-stage FP32 adder, :class:`hw.npu.vector_reduce.VectorReduce`).

* golden model: the order of :func:`sim.golden.vector.row_sum` with ``acc_stages=P`` (partials round robin,
  combined pairwise; the stated bounds against float64, softmax and layernorm rows, are tested with it in
  tests/test_vector.py);
* Amaranth simulator: :class:`VectorReduce` alone, rows shorter than ``P`` beats, equal, longer, odd, back
  to back and with gaps, bit-exact against the golden, each result exactly
  :func:`hw.spec.vector_isa.reduce_latency` cycles after its row's last beat;
* Verilator: the whole unit (:class:`hw.npu.vector.VectorTop`) on SUM, MAX, SOFTMAX and LN_STATS rows of
  several lengths, every scratchpad word bit-exact against the golden model with the same ``P`` and every
  instruction's cycle count the closed form :func:`hw.spec.vector_isa.vector_cycles` with ``acc_stages=P``.
"""

import numpy as np
import pytest
from amaranth.sim import Simulator

from hw.config import preset
from hw.npu.vector import Opcode, VectorUnit
from hw.npu.vector_parts import Phase
from hw.npu.vector_reduce import VectorReduce
from hw.spec import fp as G
from hw.spec.config import ConfigError, NpuConfig
from hw.spec.vector_isa import encode, exit_latency, reduce_latency, vector_cycles
from sim.golden import fp32ext as X
from sim.golden.operands import SPECIAL_F32
from sim.golden.vector import BF16, FP32, MASK_BITMAP, MASK_CAUSAL, Program, row_max, row_sum

L = 4
R = 2 * (L.bit_length() - 1)         # the lane tree's latency
SIGN = np.uint32(0x80000000)


def _word(values, width=32):
    return sum(int(v) << (width * k) for k, v in enumerate(values))


def _canon(rng, count, special=0.2):
    x = G.f32_bits((rng.standard_normal(count) * 2.0 ** rng.integers(-8, 9, count)).astype(np.float32))
    sp = rng.random(count) < special
    x[sp] = rng.choice(SPECIAL_F32, int(sp.sum()))
    return X.load_f32(x)


# =====================================================================================================
# Configuration, latency
# =====================================================================================================

def test_config_parameter():
    """Default 1, left out of ``repr`` there; 2 to 4 accepted; anything else a clear error."""
    assert NpuConfig().vec_acc_stages == 1 and "vec_acc_stages" not in repr(NpuConfig())
    assert "vec_acc_stages=4" in repr(NpuConfig(vec_acc_stages=4))
    for bad in (0, 5, 2.0, True, "4"):
        with pytest.raises(ConfigError, match="vec_acc_stages"):
            NpuConfig(vec_acc_stages=bad)
    cfg = preset("tiny").replace(**{"npu.vec_acc_stages": 3})
    assert VectorUnit.from_config(cfg).acc_stages == 3
    assert VectorUnit.from_config(preset("tiny")).acc_stages == 1
    with pytest.raises(ValueError, match="accumulator stages"):
        VectorReduce(L, 10, 16, acc_stages=5)


def test_reduce_latency_closed_form():
    """``P = 1``: the tree and one cycle (what the unit always had); ``P > 1``: the tree, the ``P``-stage adder
    and the combine (ceil(log2 P) levels of ``P``-stage adders)."""
    assert [reduce_latency(L, p) for p in (1, 2, 3, 4)] == [R + 1, R + 4, R + 9, R + 12]
    assert reduce_latency(16, 1) == 9
    for p in (1, 2, 3, 4):
        assert VectorReduce(L, 10, 16, p).latency == reduce_latency(L, p)
        assert VectorUnit(L, 64, acc_stages=p).drain_cycles == VectorUnit.EXIT + reduce_latency(L, p) + 2
    # the closed form with P = 1 is the one the unit always had
    for op in ("SUM", "SOFTMAX", "LN_STATS", "COPY"):
        assert vector_cycles(op, 13, 5, L) == vector_cycles(op, 13, 5, L, acc_stages=1)
    extra = reduce_latency(L, 4) - reduce_latency(L, 1)
    assert vector_cycles("SUM", 13, 5, L, acc_stages=4) == vector_cycles("SUM", 13, 5, L) + extra
    assert vector_cycles("SOFTMAX", 13, 40, L, acc_stages=4) == vector_cycles("SOFTMAX", 13, 40, L) + 7 * extra


# =====================================================================================================
# Golden model: the order, the bounds
# =====================================================================================================

def test_golden_row_sum_order():
    """Beat sums round robin into ``P`` partials, combined pairwise: an order that differs from the sequential
    one, and equal to it for a row of one beat (a partial alone plus ``-0`` partials)."""
    big, one = G.f32_bits(np.float32(2.0 ** 24)), G.f32_bits(np.float32(1.0))
    # beats: [2^24], [1], [-2^24], [1] (one element each, 3 missing lanes = -0)
    x = np.array([big, 0x80000000, 0x80000000, 0x80000000, one, 0x80000000, 0x80000000, 0x80000000,
                  big | 0x80000000, 0x80000000, 0x80000000, 0x80000000, one], dtype=np.uint32)[None, :]
    val = lambda b: float(G.bits_to_f32(b)[0])           # noqa: E731
    assert val(row_sum(x, L)) == 1.0            # ((2^24 + 1) - 2^24) + 1, 2^24 + 1 rounding to 2^24
    assert val(row_sum(x, L, 2)) == 2.0         # p0 = 2^24 - 2^24 = 0, p1 = 1 + 1: 0 + 2
    assert val(row_sum(x, L, 3)) == 0.0         # p0 = 2^24 + 1 -> 2^24, p1 = 1, p2 = -2^24: (p0 + p1) + p2
    assert val(row_sum(x, L, 4)) == 1.0         # (2^24 + 1) + (-2^24 + 1) = 2^24 - (2^24 - 1)


def test_golden_row_sum_stages_reference():
    """``row_sum`` with ``P`` stages against an independent loop over the beat sums."""
    rng = np.random.default_rng(150)
    for p in (2, 3, 4):
        for n in (1, 3, 4, 5, 8, 13, 17, 33):
            x = _canon(rng, 3 * n).reshape(3, n)
            nb = -(-n // L)
            pad = np.concatenate([x, np.full((3, nb * L - n), SIGN, np.uint32)], axis=1).reshape(3, nb, L)
            beats = G.adder_tree(pad)
            parts = [np.full(3, SIGN, np.uint32) for _ in range(p)]
            for k in range(nb):
                parts[k % p] = G.add_f32(parts[k % p], beats[:, k])
            want = G.combine_partials(parts)
            np.testing.assert_array_equal(row_sum(x, L, p), want, err_msg=f"P={p} n={n}")
            if nb == 1:
                np.testing.assert_array_equal(row_sum(x, L, p), row_sum(x, L))


# =====================================================================================================
# VectorReduce on the Amaranth simulator
# =====================================================================================================

def _reduce_run(p, op, rows, vis=None, phase=Phase.MAIN, gaps=()):
    """Rows of canonical FP32 values as reduced beats through ``VectorReduce(acc_stages=p)``; ``gaps``: idle
    cycles after each beat, cycled. Returns every cycle's (result, fin), the cycles of the last beats, the
    latency."""
    dut = VectorReduce(L, 10, 16, acc_stages=p)
    beats, g = [], 0
    idle = dict(tag={"valid": 0}, y=[0] * L, vis=0)
    for r, x in enumerate(rows):
        nb = -(-len(x) // L)
        pad = np.concatenate([x, np.full(nb * L - len(x), 0x7FC00000, np.uint32)])
        v = np.ones(nb * L, bool) if vis is None else np.concatenate([vis[r], np.zeros(nb * L - len(x), bool)])
        for k in range(nb):
            lanes_ok = [k * L + j < len(x) for j in range(L)]
            fin = op in (Opcode.MAX, Opcode.SUM) and k == nb - 1
            beats.append(dict(tag={"valid": 1, "red": 1, "fin": int(fin), "first": int(k == 0),
                                   "last": int(k == nb - 1), "phase": phase, "ri": r % 16,
                                   "glast": int(r == len(rows) - 1), "lane_valid": _word(lanes_ok, 1),
                                   "wr_addr": 100 + r, "wr_en": 1 << (r % 8)},
                              y=[int(t) for t in pad[k * L:(k + 1) * L]], vis=_word(v[k * L:(k + 1) * L], 1)))
            if gaps:
                beats += [idle] * gaps[g % len(gaps)]
                g += 1
    out = []

    async def bench(ctx):
        ctx.set(dut.ins.as_value(), encode(op=op.value))
        for cycle in range(len(beats) + dut.latency + 3):
            b = beats[cycle] if cycle < len(beats) else idle
            ctx.set(dut.beat, b["tag"])
            ctx.set(dut.vis, b["vis"])
            for j in range(L):
                ctx.set(dut.y[j], b["y"][j])
            res, fin = ctx.get(dut.result), ctx.get(dut.fin)
            out.append((cycle, res, fin))
            await ctx.tick()

    sim = Simulator(dut)
    sim.add_clock(1e-8)
    sim.add_testbench(bench)
    sim.run()
    last = [i for i, b in enumerate(beats) if b["tag"].get("last")]
    return out, last, dut.latency


# Row lengths in elements: 1 beat, P - 1, P, P + 1 beats, odd lengths, long rows (4 lanes).
LENGTHS = (1, 4, 9, 12, 16, 17, 3, 29, 45, 2, 64, 7)


@pytest.mark.parametrize("p", [2, 3, 4])
@pytest.mark.parametrize("gaps", [(), (0, 1, 0, 0, 3), (2,)])
def test_reduce_rows_bit_exact(p, gaps):
    """SUM and MAX rows of 1 to 16 beats, back to back or with gaps between beats: one result per row, exactly
    ``latency`` cycles after the row's last beat, the golden row sum with ``P`` stages (row max), with the
    row's tag and the write request."""
    rng = np.random.default_rng(160 + p + 7 * len(gaps))
    for op, model in ((Opcode.SUM, lambda x: row_sum(x, L, p)), (Opcode.MAX, row_max)):
        rows = [_canon(rng, n) for n in LENGTHS]
        out, last, lat = _reduce_run(p, op, rows, gaps=gaps)
        assert lat == reduce_latency(L, p)
        results = [(c, res, fin) for c, res, fin in out if res.valid]
        assert [c for c, *_ in results] == [c + lat for c in last]
        for r, (_, res, fin) in enumerate(results):
            assert res.value == model(rows[r][None, :])[0], (op, p, gaps, r)
            assert (res.ri, res.glast, Phase(res.phase)) == (r % 16, r == len(rows) - 1, Phase.MAIN)
            assert fin.valid and (fin.addr, fin.en) == (100 + r, 1 << (r % 8))
        assert sum(1 for _, _, fin in out if fin.valid) == len(rows)


@pytest.mark.parametrize("p", [2, 4])
def test_reduce_softmax_masked(p):
    """SOFTMAX: the max over visible elements (a fully masked row -inf), then the sum over visible ones in the
    pipelined order; no write request."""
    rng = np.random.default_rng(170 + p)
    rows = [_canon(rng, n) for n in (10, 5, 3, 21, 16)]
    vis = [rng.random(len(x)) < 0.6 for x in rows]
    vis[1][:] = False
    out, _, _ = _reduce_run(p, Opcode.SOFTMAX, rows, vis=vis, phase=Phase.MAIN)
    got = [res.value for _, res, _ in out if res.valid]
    want = [row_max(np.where(v, x, X.NEG_INF)[None, :])[0] for x, v in zip(rows, vis, strict=True)]
    assert got == [int(w) for w in want] and not any(fin.valid for *_, fin in out)
    out, _, _ = _reduce_run(p, Opcode.SOFTMAX, rows, vis=vis, phase=Phase.PASS2)
    got = [res.value for _, res, _ in out if res.valid]
    want = [row_sum(np.where(v, x, SIGN)[None, :], L, p)[0] for x, v in zip(rows, vis, strict=True)]
    assert got == [int(w) for w in want] and not any(fin.valid for *_, fin in out)


# =====================================================================================================
# Verilator: the whole unit
# =====================================================================================================

def _rows_program(p, depth, seed, model_stages=None):
    """SUM, MAX (FP32 and BF16 results), SOFTMAX (bitmap and causal masks, more rows than a row group) and
    LN_STATS over rows of 1 beat, ``P - 1``, ``P``, ``P + 1`` beats, odd and long lengths (the golden model's
    order: ``model_stages``, default ``P``)."""
    rng = np.random.default_rng(seed)
    prog = Program(L, depth, acc_stages=p if model_stages is None else model_stages)
    regions = []
    q = max(p, 2)
    for rows, n in ((3, 1), (5, 4), (4, 4 * (q - 1) - 1), (3, 4 * q), (6, 4 * q + 1), (2, 29), (18, 13), (2, 123)):
        x = (rng.standard_normal((rows, n)) * 2.0 ** rng.integers(-6, 7, (rows, 1))).astype(np.float32)
        if rows > 2:
            x[1, ::2] = 3e38                         # huge, cancelling
            x[1, 1::2] = -3e38
        vis = rng.random((rows, n)) < 0.7
        vis[0] = False                               # fully masked
        a = prog.put_rows(G.f32_bits(x), FP32)
        m = prog.put_bitmap(vis)
        regions.append((rows, n, a, m, prog.alloc(rows * prog.model.pitch(n, BF16)),
                        prog.alloc(rows * prog.model.pitch(n, FP32)), prog.alloc(-(-2 * rows // L)),
                        prog.alloc(-(-rows // L)), prog.alloc(-(-rows // (2 * L)))))
    for rows, n, a, m, d16, d32, st, r32, r16 in regions:
        prog.add(f"SUM rows={rows} n={n}", op=Opcode.SUM.value, a=a, d=r32, n=n, rows=rows)
        prog.add(f"SUM bf16 rows={rows} n={n}", op=Opcode.SUM.value, a=a, d=r16, n=n, rows=rows, d_fmt=BF16)
        prog.add(f"MAX rows={rows} n={n}", op=Opcode.MAX.value, a=a, d=r32, n=n, rows=rows)
        prog.add(f"SOFTMAX bitmap rows={rows} n={n}", op=Opcode.SOFTMAX.value, a=a, d=d16, d_fmt=BF16, aux=m,
                 n=n, rows=rows, mask=MASK_BITMAP)
        prog.add(f"SOFTMAX causal rows={rows} n={n}", op=Opcode.SOFTMAX.value, a=a, d=d32, n=n, rows=rows,
                 mask=MASK_CAUSAL, pos=1)
        prog.add(f"LN_STATS rows={rows} n={n}", op=Opcode.LN_STATS.value, a=a, d=st, n=n, rows=rows,
                 imm0=int(G.f32_bits(np.float32(1 / n))), imm1=int(G.f32_bits(np.float32(1e-5))))
    assert not any(prog.errors)
    return prog


@pytest.mark.parametrize("p", [4, 3])
def test_vector_rtl_pipelined_accumulator(p):
    """The 4-lane unit with ``acc_stages = P``: every scratchpad word bit-exact against the golden model with
    the same ``P`` after SUM / MAX / SOFTMAX / LN_STATS rows of every length class, and every instruction's
    cycle count the closed form with ``acc_stages=P`` (each row group's pass waits ``reduce_latency``)."""
    from sim.benchmarks.vector import run_program

    depth = 1024
    prog = _rows_program(p, depth, seed=40 + p)
    metrics = run_program(prog, L, depth, f"test_vector_rtl_pipelined_p{p}")
    for met, fields in zip(metrics, prog.fields, strict=True):
        want = vector_cycles(Opcode(fields["op"]).name, fields["n"], fields["rows"], L, acc_stages=p)
        assert met["cycles"] == want, (met["name"], met["cycles"], want)
    # The order differs from the one-cycle accumulator's somewhere (so the golden's P is what is checked).
    one = _rows_program(p, depth, seed=40 + p, model_stages=1)
    assert not np.array_equal(one.model.mem, prog.model.mem)


@pytest.mark.parametrize("a,p", [(4, 4), (3, 1)])
def test_vector_rtl_deeper_lane_adders(a, p):
    """``VectorUnit(add_stages=A)``: the lanes' and the lane tree's FP32 adders ``A`` stages deep. The same bits
    (golden model unchanged) on the reduction rows and on element-wise and function instructions; every cycle
    count the closed form with ``E`` = :func:`hw.spec.vector_isa.exit_latency` (``13 + 5 A``)."""
    from sim.benchmarks.vector import run_program
    from tests.test_vector import _ops_program
    from tests.test_vector import _rows_program as _ln_program

    assert exit_latency(2) == VectorUnit.EXIT == 23 and exit_latency(a) == 13 + 5 * a
    unit = VectorUnit(L, 64, acc_stages=p, add_stages=a)
    assert unit.EXIT == exit_latency(a) and unit.reduce_latency == reduce_latency(L, p, a)
    unit._MustUse__silence = True
    depth = 1024
    programs = (("rows", _rows_program(p, depth, seed=50 + a)), ("ops", _ops_program(L, depth, seed=51)),
                ("ln", _ln_program(L, depth, seed=52)))
    for name, prog in programs:
        prog.model.acc_stages = p            # the golden order of the unit's accumulator
        if name != "rows":
            prog = _replay(prog, p)
        metrics = run_program(prog, L, depth, f"test_vector_rtl_a{a}_p{p}_{name}", add_stages=a)
        for met, fields, err in zip(metrics, prog.fields, prog.errors, strict=True):
            if err:
                continue
            want = vector_cycles(Opcode(fields["op"]).name, fields["n"], fields["rows"], L, acc_stages=p,
                                 add_stages=a)
            assert met["cycles"] == want, (met["name"], met["cycles"], want)


def _replay(prog, p):
    """``prog``'s data and instructions on a golden model with ``acc_stages=p``."""
    out = Program(prog.L, prog.depth, acc_stages=p)
    out.model.mem[:] = prog.init
    out.top = prog.top
    for name, fields in zip(prog.names, prog.fields, strict=True):
        out.add(name, **fields)
    assert out.errors == prog.errors
    return out
