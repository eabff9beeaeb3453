"""cocotb testbenches for the arithmetic units (ArithArray and MacUnit).

Each compares the RTL bit for bit with ``hw/spec/fp.py`` on operands from
``sim/golden/operands.py``: every special-class pair first, then random ones.
"""

from __future__ import annotations

import numpy as np
from cocotb.triggers import FallingEdge

from hw.spec import fp as G
from sim.golden.operands import bf16_pairs, fp32_pairs
from sim.tb.common import Stopwatch, env_int, pack, start, tb_test, unpack, write_metrics


def _first_mismatch(what, got, want, *operands):
    bad = np.flatnonzero(got != want)
    if bad.size == 0:
        return None
    i = bad[0]
    ops = ", ".join(f"{int(o[i]):#x}" for o in operands)
    return f"{what}: {bad.size} mismatches; first at set {i}: operands ({ops}) RTL {int(got[i]):#010x} golden {int(want[i]):#010x}"


@tb_test()
async def arith_array_random(dut):
    """N_SETS random + special operand sets through k multipliers and k adders per cycle."""
    k = len(dut.ma) // 16
    n_sets = env_int("N_SETS", 1_000_000)
    seed = env_int("SEED", 1)
    rng = np.random.default_rng(seed)
    cycles = -(-n_sets // k)
    ma, mb = bf16_pairs(rng, cycles * k)
    aa, ab = fp32_pairs(rng, cycles * k)
    ma, mb, aa, ab = (x.reshape(cycles, k) for x in (ma, mb, aa, ab))
    pma = [pack(r, 16) for r in ma]
    pmb = [pack(r, 16) for r in mb]
    paa = [pack(r, 32) for r in aa]
    pab = [pack(r, 32) for r in ab]

    await start(dut, zero_inputs=("ma", "mb", "aa", "ab"))
    mp_out, sum_out = [], []
    sig_ma, sig_mb, sig_aa, sig_ab, sig_mp, sig_sum = dut.ma, dut.mb, dut.aa, dut.ab, dut.mp, dut.sum
    lat = 2  # enough cycles to drain both pipelines
    with Stopwatch() as sw:
        for c in range(cycles + lat):
            await FallingEdge(dut.clk)
            mp_out.append(sig_mp.value.integer)
            sum_out.append(sig_sum.value.integer)
            if c < cycles:
                sig_ma.value = pma[c]
                sig_mb.value = pmb[c]
                sig_aa.value = paa[c]
                sig_ab.value = pab[c]
    # Inputs written at falling edge c are in the multiplier register at falling edge c+1
    # (latency 1) and out of the 2-stage adder at falling edge c+2.
    mp = np.stack([unpack(v, 32, k) for v in mp_out[1:cycles + 1]]).ravel()
    sm = np.stack([unpack(v, 32, k) for v in sum_out[2:cycles + 2]]).ravel()
    want_mp = G.mul_bf16(ma.ravel(), mb.ravel())
    want_sm = G.add_f32(aa.ravel(), ab.ravel())
    write_metrics(name="arith_array", cycles=cycles + lat, seconds=sw.seconds, sets=cycles * k)
    errors = [e for e in (
        _first_mismatch("BF16 multiply", mp, want_mp, ma.ravel(), mb.ravel()),
        _first_mismatch("FP32 add", sm, want_sm, aa.ravel(), ab.ravel()),
    ) if e]
    assert not errors, "\n".join(errors)
    dut._log.info("%d multiply and %d add operand sets bit-exact", mp.size, sm.size)


@tb_test()
async def mac_unit_random(dut):
    """Dot products through MacUnit: bias preload, N columns accumulated, compared with the golden order."""
    lanes = len(dut.w) // 16
    n_dots = env_int("N_DOTS", 200)
    max_cols = env_int("MAX_COLS", 64)
    seed = env_int("SEED", 2)
    latency = env_int("MAC_LATENCY", 0)
    assert latency > 0, "MAC_LATENCY must be given by the pytest driver"
    rng = np.random.default_rng(seed)
    await start(dut, zero_inputs=("valid", "w", "x", "acc_load", "acc_value"))
    total_cycles = 0
    with Stopwatch() as sw:
        for d in range(n_dots):
            cols = int(rng.integers(1, max_cols + 1))
            if d % 4 == 3:   # special-class columns: pairs of specials and randoms
                w, x = bf16_pairs(rng, cols * lanes)
                order = rng.permutation(w.size)
                w, x = w[order].reshape(cols, lanes), x[order].reshape(cols, lanes)
            else:
                scale = float(2.0 ** rng.integers(-8, 9))
                w = G.bf16_bits(rng.standard_normal((cols, lanes)) * scale)
                x = G.bf16_bits(rng.standard_normal((cols, lanes)))
            bias = G.f32_bits(np.float32(rng.standard_normal()))
            await FallingEdge(dut.clk)
            dut.acc_load.value = 1
            dut.acc_value.value = int(bias)
            await FallingEdge(dut.clk)
            dut.acc_load.value = 0
            for c in range(cols):
                dut.valid.value = 1
                dut.w.value = pack(w[c], 16)
                dut.x.value = pack(x[c], 16)
                await FallingEdge(dut.clk)
            dut.valid.value = 0
            for _ in range(latency - 1):
                await FallingEdge(dut.clk)
            got = int(dut.acc.value.integer)
            want = int(G.accumulate(bias, G.mac_lanes(w, x)))
            assert got == want, (f"dot {d} ({cols} columns): RTL {got:#010x} golden {want:#010x} "
                                 f"bias {int(bias):#x}")
            total_cycles += cols + latency + 1
    write_metrics(name="mac_unit", cycles=total_cycles, seconds=sw.seconds)
    dut._log.info("%d dot products bit-exact, %d cycles in %.2f s", n_dots, total_cycles, sw.seconds)
