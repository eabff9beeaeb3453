"""Low-precision formats (firmware/quant.py) and the low-precision PIM GEMV golden model (sim/golden/lowprec.py)."""

from __future__ import annotations

import numpy as np
import pytest

from firmware import quant as Q
from sim.golden import fp as G
from sim.golden import lowprec as L


def _w(K=256, N=48, seed=0, scale=0.05):
    return np.random.default_rng(seed).standard_normal((K, N)) * scale


# -- weights ----------------------------------------------------------------------------------------

def test_int4_round_trip_bound_and_idempotence():
    w = _w()
    q = Q.quantize_weights(w, "int4", 128)
    assert q.codes.max() <= 15 and q.scales.shape == (2, 48)
    vals = q.values()
    assert vals.min() >= -8 and vals.max() <= 7 and (vals == np.round(vals)).all()
    # scales are FP16 values
    assert (q.scales.astype(np.float16).astype(np.float32) == q.scales).all()
    s = np.repeat(q.scales, 128, axis=0).astype(np.float64)
    err = np.abs(q.dequantize() - w)
    assert (err <= 0.5 * s + np.abs(w).max() * 2.0 ** -10).all()
    # quantizing the dequantized matrix again gives the same codes and scales
    q2 = Q.quantize_weights(q.dequantize(), "int4", 128)
    assert (q2.codes == q.codes).all() and (q2.scales == q.scales).all()


def test_fp4_values_and_nearest_grid_point():
    mags = [0, 0.5, 1, 1.5, 2, 3, 4, 6]
    plain = Q.code_values("fp4", np.arange(16), grid_choice=False)
    assert list(plain[:8]) == mags and list(plain[8:]) == [-m for m in mags]
    for sel, extra in enumerate(Q.BITMOD_EXTRA):
        v = Q.code_values("fp4", np.arange(16), np.full(16, sel), grid_choice=True)
        assert v[8] == extra and list(v[:8]) == mags
    w = _w(128, 20, seed=1)
    q = Q.quantize_weights(w, "fp4", 128)
    x = w / q.scales[0][None, :]
    # brute force: every code's value is a nearest point of its group's grid
    for n in range(w.shape[1]):
        grid = Q.code_values("fp4", np.arange(16), np.full(16, q.selectors[0, n]))
        d = np.abs(x[:, n, None] - grid[None, :])
        chosen = np.abs(x[:, n] - q.values()[:, n])
        assert np.allclose(chosen, d.min(axis=1), rtol=0, atol=1e-12)


def test_fp4_grid_choice_minimises_error(monkeypatch):
    w = _w(256, 32, seed=2)
    q = Q.quantize_weights(w, "fp4", 128)
    errs = []
    for sel in range(4):
        # one candidate grid at a time
        only = Q.BITMOD_EXTRA[sel]
        with monkeypatch.context() as mp:
            mp.setattr(Q, "BITMOD_EXTRA", (only,))
            qs = Q.quantize_weights(w, "fp4", 128)
        deq = Q.code_values("fp4", qs.codes, np.zeros_like(qs.codes), True)
        deq = np.where(qs.codes == 8, only, deq).astype(np.float64) * np.repeat(qs.scales, 128, axis=0)
        errs.append(((deq - w) ** 2).reshape(2, 128, 32).sum(axis=1))
    errs = np.stack(errs)                                    # [4, G, N]
    chosen = ((q.dequantize() - w) ** 2).reshape(2, 128, 32).sum(axis=1)
    assert np.allclose(chosen, errs.min(axis=0), rtol=1e-12, atol=0)
    assert (q.selectors == errs.argmin(axis=0)).all()
    assert len(np.unique(q.selectors)) > 1


@pytest.mark.parametrize("extra,sel", [(5.0, 0), (-5.0, 1), (8.0, 2), (-8.0, 3)])
def test_fp4_group_picks_the_grid_that_fits(extra, sel):
    g = np.array([extra, 6.0, -6.0, 4.0, -3.0, 1.5, 0.5, 0.0] * 16) * 0.01
    if abs(extra) == 8:
        g = np.array([extra, 6.0, -6.0, 4.0, -3.0, 1.0, 2.0, 0.0] * 16) * 0.01
    q = Q.quantize_weights(g[:, None], "fp4", 128)
    assert q.selectors[0, 0] == sel
    assert np.allclose(q.dequantize()[:, 0], g, rtol=2.0 ** -10, atol=0)


def test_fp4_beats_int4_on_gaussian_weights():
    w = _w(1024, 64, seed=3)
    e = {f: np.sqrt(((Q.quantize_weights(w, f).dequantize() - w) ** 2).mean()) for f in ("int4", "fp4")}
    plain = Q.quantize_weights(w, "fp4", grid_choice=False)
    assert e["fp4"] < e["int4"]
    assert e["fp4"] < np.sqrt(((plain.dequantize() - w) ** 2).mean())


def test_group_divisibility_and_bad_values_are_clear_errors():
    with pytest.raises(Q.QuantError, match=r"K = 100 is not a multiple of the group size 128"):
        Q.quantize_weights(np.zeros((100, 4)), "int4", 128)
    with pytest.raises(Q.QuantError, match=r"KV channels = 96 is not a multiple of the group size 64"):
        Q.quantize_kv(np.zeros((2, 96)), 64)
    with pytest.raises(Q.QuantError, match=r"Format.weights must be one of bf16, int4, fp4, not 'int3'"):
        Q.Format(weights="int3")
    with pytest.raises(Q.QuantError, match=r"Format.group must be a power of two of at least 2, not 96"):
        Q.Format(group=96)
    with pytest.raises(Q.QuantError, match=r"exceeds the fp16 range"):
        Q.quantize_weights(np.full((128, 1), 1e6), "int4")
    with pytest.raises(Q.QuantError, match=r"NaN"):
        Q.quantize_weights(np.full((128, 1), np.nan), "int4")
    with pytest.raises(Q.QuantError, match=r"K = 96 is not a multiple of 64"):
        Q.PimLowPrecLayout(_cfg(), 96, 32, group=32)


# -- activations and KV ------------------------------------------------------------------------------

def test_fp8_per_token():
    x = np.random.default_rng(4).standard_normal((6, 256)).astype(np.float32) * np.array([1e-3, 1, 10, 100, 1, 1])[:, None]
    x[5] = 0
    a = Q.quantize_fp8(x)
    assert a.codes.dtype == np.uint8 and a.scales.shape == (6,)
    assert (np.abs(a.values()).max(axis=1)[:5] == 448).all()
    err = np.abs(a.dequantize() - x)
    s = a.scales[:, None].astype(np.float64)
    assert (err <= np.maximum(np.abs(x) * 2.0 ** -4, s * 2.0 ** -10) * 1.0001).all()
    assert (a.dequantize()[5] == 0).all()


def test_kv_int4_asymmetric_round_trip():
    rng = np.random.default_rng(5)
    x = (rng.standard_normal((8, 256)) * 2 + 0.5).astype(np.float32)
    kq = Q.quantize_kv(x, 128)
    assert kq.codes.max() <= 15 and kq.scales.shape == (8, 2) and kq.zeros.shape == (8, 2)
    assert (kq.scales.astype(np.float16).astype(np.float32) == kq.scales).all()
    assert (kq.zeros == np.round(kq.zeros)).all() and kq.zeros.min() >= 0 and kq.zeros.max() <= 15
    s = np.repeat(kq.scales, 128, axis=1)
    assert (np.abs(kq.dequantize() - x) <= s * 1.0001).all()
    assert np.abs(kq.dequantize() - x).mean() < 0.3 * s.mean()


# -- packed layout ---------------------------------------------------------------------------------

def _cfg():
    from hw.config import preset
    return preset("default")


@pytest.mark.parametrize("fmt,grid", [("int4", True), ("fp4", True), ("fp4", False)])
def test_pack_unpack_round_trip(fmt, grid):
    w = _w(384, 40, seed=6)
    q = Q.quantize_weights(w, fmt, 128, grid_choice=grid)
    p = Q.pack(q)
    assert p.codes.shape == (40, 6, 32) and p.scales.shape == (40, 1, 32)
    assert p.selectors.shape == ((40, 1, 32) if fmt == "fp4" and grid else (40, 0, 32))
    # code k of output n: column k // 64, byte (k % 64) // 2, low nibble for even k
    assert p.codes[3, 1, 5] & 0xF == q.codes[64 + 10, 3] and p.codes[3, 1, 5] >> 4 == q.codes[64 + 11, 3]
    assert p.scales[7, 0, 2:4].view("<u2")[0] == q.scales[1, 7].astype(np.float16).view(np.uint16)
    u = Q.unpack(p)
    assert (u.codes == q.codes).all() and (u.scales == q.scales).all() and (u.selectors == q.selectors).all()
    lay = Q.PimLowPrecLayout(_cfg(), 384, 40, fmt, 128, grid)
    assert lay.columns_per_output == p.columns_per_output
    img = lay.place(p)
    assert img.shape == (2, 16, lay.rows_used, 64, 32)
    # output n = 37 sits in tile 1, channel 0, bank 5
    assert lay.output_index(1, 0, 5) == 37
    assert (img[0, 5, lay.rows_per_tile, :p.columns_per_output] == p.columns()[37]).all()
    back = Q.unpack(lay.gather(img))
    assert (back.codes == q.codes).all() and (back.scales == q.scales).all()


def test_packed_weights_take_fewer_columns():
    # GPT-2-small FC shapes: BF16 needs K / 16 columns per output; 4-bit K / 64 + scales
    for K in (768, 3072):
        lay = Q.PimLowPrecLayout(_cfg(), K, 64, "fp4", 128, True)
        ratio = (K // 16) / lay.columns_per_output
        assert ratio >= 3.0, (K, ratio)
    assert Q.PimLowPrecLayout(_cfg(), 3072, 64, "int4").columns_per_output == 48 + 2


# -- golden GEMV ----------------------------------------------------------------------------------

@pytest.mark.parametrize("fmt", ["int4", "fp4"])
@pytest.mark.parametrize("acts", ["bf16", "fp8"])
def test_golden_gemv_equals_step_by_step_bit_operations(fmt, acts):
    rng = np.random.default_rng(7)
    q = Q.quantize_weights(_w(256, 24, seed=8), fmt)
    x = rng.standard_normal((3, 256)).astype(np.float32)
    x[0, :64] = 0                                            # zero column sums
    x[1, :8] = 1e-38                                         # subnormal products: flushed
    a = G.bf16_bits(x) if acts == "bf16" else Q.quantize_fp8(x)
    b = G.f32_bits(rng.standard_normal(24).astype(np.float32))
    assert (L.gemv(q, a, b) == L.gemv_steps(q, a, b)).all()
    assert (L.gemv(q, a, None, lanes=32) == L.gemv_steps(q, a, None, lanes=32)).all()


def test_golden_gemv_special_values():
    q = Q.quantize_weights(np.ones((128, 2)) * 0.5, "int4")
    big = G.bf16_bits(np.full(128, 3e38, np.float32))
    y = G.bits_to_f32(L.gemv(q, big))
    assert np.isinf(y).all() and (y > 0).all()
    nan_bias = np.array([0x7FC00001, 0xFFC00000], dtype=np.uint32)
    y = L.gemv(q, G.bf16_bits(np.ones(128)), nan_bias)
    assert (y == G.QNAN).all()
    tiny = G.bf16_bits(np.full(128, 2.0 ** -125, np.float32))
    assert (L.gemv(Q.quantize_weights(np.full((128, 1), 2.0 ** -13), "int4"), tiny) == 0).all()


@pytest.mark.parametrize("fmt,acts,group,lanes", [("int4", "bf16", 128, 64), ("fp4", "bf16", 128, 64),
                                                  ("fp4", "fp8", 128, 64), ("int4", "fp8", 64, 16),
                                                  ("fp4", "bf16", 32, 32)])
def test_golden_gemv_within_bound_of_float64(fmt, acts, group, lanes):
    rng = np.random.default_rng(9)
    K = 1024
    q = Q.quantize_weights(_w(K, 64, seed=10), fmt, group)
    x = (rng.standard_normal((4, K)) * rng.lognormal(0, 2, K)).astype(np.float32)
    a = G.bf16_bits(x) if acts == "bf16" else Q.quantize_fp8(x)
    y = L.gemv_f32(q, a, lanes=lanes).astype(np.float64)
    y64, mag = L.reference_f64(q, a)
    bound = L.error_bound(q, mag, lanes, fp8=acts == "fp8")
    err = np.abs(y - y64)
    assert (err <= bound).all(), (err / bound).max()
    assert err.max() > 0                                     # FP32 rounding is visible: the check has teeth


def test_golden_gemv_rejects_bad_lanes():
    q = Q.quantize_weights(_w(128, 4), "int4", 32)
    with pytest.raises(ValueError, match="group size 32 must be a multiple of the lanes per column"):
        L.gemv(q, G.bf16_bits(np.ones(128)), lanes=64)
