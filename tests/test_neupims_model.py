"""The NeuPIMs batched-generation projection (sim/neupims_model.py, issue 18): invariants of its timing pieces
and policies, the batch-1 case against the existing single-request model, and the memory-capacity error."""

from __future__ import annotations

import numpy as np
import pytest

from firmware.gpt2 import GptShape
from firmware.pim import GemvLayout, gemv_lower_bound
from hw.config import preset
from sim.neupims_model import (
    MODELS,
    NeuPimsCapacityError,
    NeuPimsModel,
    Seg,
    choose_devices,
    interleaved_cycles,
    kv_rows_per_bank,
    phase_cycles,
    pv_segs,
    request_lengths,
    scores_segs,
    segmented_gemv,
    throughput_rows,
    weight_bytes,
)

SMALL = GptShape(1024, 8, 2)          # head_dim 128 as GPT-3, small enough for the performance model in seconds


@pytest.fixture(scope="module")
def small():
    return NeuPimsModel(SMALL, 1)


def one_channel(name="ianus"):
    return preset(name).replace(**{"pim.channels": 1})


@pytest.mark.parametrize("K,N", [(128, 300), (300, 128), (2000, 128), (768, 3072), (1024, 16), (4096, 64)])
def test_segmented_gemv_is_the_gemv_bound_when_every_segment_opens_a_row(K, N):
    cfg = one_channel()
    lay = GemvLayout(cfg, K, N)
    segs = [Seg(lay.chunk_cols(c), True, lay.chunk_cols(c) if t == 0 else 0)
            for c in range(lay.chunks) for t in range(lay.tiles)]
    assert segmented_gemv(cfg, segs)["cycles"] == gemv_lower_bound(cfg, K, N)["cycles"]


@pytest.mark.parametrize("L", [1, 17, 128, 300, 1024, 1025, 2048])
def test_kv_layout_packing(L):
    cfg = one_channel()
    sc, pv = scores_segs(cfg, 128, L), pv_segs(cfg, 128, L)
    assert sum(s.n for s in sc) == -(-L // 16) * 8              # every key's 128 dims, once
    assert sum(s.n for s in pv) == 8 * -(-L // 16)               # every position, once per output tile
    # packing segments into open rows is never slower than a row per segment
    for segs in (sc, pv):
        unpacked = [Seg(s.n, True, s.gb) for s in segs]
        assert segmented_gemv(cfg, segs)["cycles"] <= segmented_gemv(cfg, unpacked)["cycles"]
    # the rows hold at least the K and V bytes
    p = cfg.pim
    assert kv_rows_per_bank(cfg, 128, L) * p.banks * p.row_bytes >= 2 * L * 128 * 2


def test_request_lengths_documented_distribution():
    a, b = request_lengths(4096, 0), request_lengths(4096, 0)
    assert (a == b).all() and a.min() >= 1 and a.max() <= 2048
    assert 190 <= np.median(a) <= 245                           # median 217
    assert not (request_lengths(64, 1) == request_lengths(64, 0)).all()


def test_phase_bounded_by_its_stages():
    rng = np.random.default_rng(3)
    for _ in range(500):
        N, A = rng.uniform(1, 1e6, 2)
        npu = {"cycles": N, "mem_share": rng.uniform(0, 1), "vector": rng.uniform(0, 0.3) * N}
        att = {"cycles": A, "bus_util": rng.uniform(0, 1), "softmax": rng.uniform(0, 0.3) * A}
        t = phase_cycles(npu, att)
        assert max(N, A) - 1e-6 <= t <= N + A + 1e-6
        assert phase_cycles(npu, att, dual=False) == pytest.approx(N + A)
    # a free bus and no vector contention: perfect overlap
    assert phase_cycles({"cycles": 5.0, "mem_share": 1.0, "vector": 0.0},
                        {"cycles": 3.0, "bus_util": 0.0, "softmax": 0.0}) == pytest.approx(5.0)
    # a saturated bus and a DRAM-bound NPU stage: serialized
    assert phase_cycles({"cycles": 5.0, "mem_share": 1.0, "vector": 0.0},
                        {"cycles": 3.0, "bus_util": 1.0, "softmax": 0.0}) == pytest.approx(8.0)


def test_interleaving_bounded_by_the_two_stages():
    rng = np.random.default_rng(4)
    for _ in range(200):
        Ly = int(rng.integers(1, 50))

        def npu():
            return {"cycles": rng.uniform(1, 1e5), "mem_share": rng.uniform(0, 1), "vector": 0.0}
        pre, post = [npu(), npu()], [npu(), npu()]
        att = [{"cycles": rng.uniform(1, 1e5), "bus_util": rng.uniform(0, 1), "softmax": 0.0} for _ in range(2)]
        n = sum(p["cycles"] for p in pre + post)
        a = sum(x["cycles"] for x in att)
        t = interleaved_cycles(Ly, pre, post, att)
        assert Ly * max(n, a) - 1e-6 <= t <= Ly * (n + a) + 1e-6
        assert interleaved_cycles(Ly, pre, post, att, dual=False) == pytest.approx(Ly * (n + a))


@pytest.mark.parametrize("B", [8, 64])
def test_policies_order_and_bounds(small, B):
    lengths = request_lengths(B, 0)
    only, naive, neu = (small.step(p, lengths) for p in ("npu-only", "naive", "neupims"))
    assert neu["cycles"] <= naive["cycles"] + 1e-6                       # the cost model may keep one batch
    assert naive["cycles"] == pytest.approx(naive["npu"] + naive["attention"])
    # interleaving gains at most (N + A) / max(N, A) of the unsplit batch
    assert naive["cycles"] / neu["cycles"] <= naive["cycles"] / max(naive["npu"], naive["attention"]) + 1e-9
    # every resource's work is a lower bound on the step
    assert neu["cycles"] >= max(neu["npu"], neu["attention"]) - 1e-6
    # PIM attention beats streaming the caches through the NPU on this hardware
    assert naive["attention"] < only["attention"]


def test_npu_only_scales_with_bytes_over_bandwidth(small):
    cfg = small.cfg_single
    peak = cfg.pim_peak_external_gbps * 1e9 / (cfg.clocks.pim_mhz * 1e6)        # bytes per DRAM cycle
    att = {L: small.npu_attention(cfg, L)["marginal"] for L in (512, 1024, 2048)}
    for L, c in att.items():
        kv = 2 * L * SMALL.d_model * 2
        assert kv / peak <= c <= 6 * kv / peak, (L, c, kv / peak)
    # about linear in the keys (the batched firmware's marginal request: the second 1024 keys cost 0.82x what the
    # 512 before them cost twice, longer GEMMs using the array better)
    assert 0.7 <= (att[2048] - att[1024]) / (2 * (att[1024] - att[512])) <= 1.15
    lengths = request_lengths(64, 0)
    st = small.step("npu-only", lengths)
    kv = sum(2 * int(L) * SMALL.d_model * 2 for L in lengths) * SMALL.layers
    assert st["cycles"] >= (weight_bytes(SMALL) + kv) / peak


def test_batch_one_matches_single_request_generation(small):
    from sim.project import project
    L = 200
    p = project("small-gpt", "npu-mem", L - 1, 2, preset("ianus"), samples=2, shape=SMALL)
    single = p.gen[1].cycles * SMALL.layers
    batched = small.step("npu-only", [L])["cycles"]
    # measured 6.4 % apart (the separate QKV program, prefill-stage programs at rows = 1, other addresses)
    assert batched == pytest.approx(single, rel=0.10), (batched, single)


def test_capacity_error_and_device_choice():
    shape = MODELS["7b"]
    lengths = request_lengths(64, 0)
    with pytest.raises(NeuPimsCapacityError, match="does not fit 1 device"):
        NeuPimsModel(shape, 1).check_capacity(lengths)
    D = choose_devices(shape, lengths)
    assert D > 1 and shape.heads % D == 0
    NeuPimsModel(shape, D).check_capacity(lengths)
    smaller = [d for d in range(1, D) if shape.heads % d == 0]
    with pytest.raises(NeuPimsCapacityError):
        NeuPimsModel(shape, smaller[-1]).check_capacity(lengths)
    rows = throughput_rows(("7b",), (64,), devices=1)
    assert rows[0]["fits"] is False and "does not fit" in rows[0]["error"]


def test_configs_checked():
    with pytest.raises(ValueError, match="row_buffers"):
        NeuPimsModel(SMALL, 1, cfg_dual=preset("ianus"))
    with pytest.raises(ValueError, match="divide"):
        NeuPimsModel(SMALL, 3)


def test_neupims_hw_system_configs():
    """``neupims-hw`` (NeuPIMs' evaluated NPU and channel count) pairs with a one-row-buffer twin of the same
    system; ``neupims`` with ``ianus``; a single-buffer preset is refused."""
    from hw.spec.presets import preset
    from sim.neupims_model import system_configs

    single, dual = system_configs("neupims-hw")
    assert (single.pim.row_buffers, dual.pim.row_buffers) == (1, 2)
    assert dual.npu.array_rows == dual.npu.array_cols == 128 and dual.npu.cores == 8
    assert (dual.pim.channels, dual.pim.banks, dual.clocks.npu_mhz) == (32, 32, 1000.0)
    assert single.replace(name="x", **{"pim.row_buffers": 2}) == dual.replace(name="x")
    assert system_configs("neupims") == (preset("ianus"), preset("neupims"))
    with pytest.raises(ValueError, match="1 row buffer"):
        system_configs("ianus")


RTL_B8 = {"npu-only": 1_260_846, "naive": 994_574, "neupims": 988_874}
"""Cycles per step on the RTL, ``python -m sim.bench --only neupims_rtl`` (README, session 16): one
GPT-2-small-shaped layer, B = 8 at :func:`sim.batch_run.batch_lengths` (8, 1), ``default`` (npu-only, naive) and
``default-dualrb`` (neupims, split mode auto: no split chosen)."""


@pytest.fixture(scope="module")
def rtl_case():
    """The projection on the RTL's small case (the RTL's address map and layout: ``npu_interleave`` 0,
    ``pim_layout`` spread; ``MAX_SEQ`` 600, the plans of ``default`` hold no 2,049 tokens) and the calibrated
    performance model's stages of the batch compiler's naive step on the same requests."""
    import sim.neupims_model as nm
    from sim.batch_run import batch_lengths, prepare_batch
    from sim.perfmodel import PerfModel
    from sim.run import DEFAULT_SHAPE

    pos = batch_lengths(8, 1)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(nm, "MAX_SEQ", 600)
        m = NeuPimsModel(GptShape(DEFAULT_SHAPE.d_model, DEFAULT_SHAPE.heads, 1), 1, preset("default"),
                         preset("default-dualrb"), npu_interleave=0, pim_layout="spread")
        steps = {p: m.step(p, [x + 1 for x in pos]) for p in RTL_B8}
        pre, _ = m.npu_stage(m.cfg_single, 8, pim=True)
    rt, recs, _, _ = prepare_batch("default", "naive", 8, 1, lengths=pos)
    st = rt.compiler.step([(rt.requests[j].kv, q) for j, q in zip(recs[0].rids, recs[0].positions, strict=True)], 0)
    perf = {}
    for s_, r in zip(st, PerfModel(rt.cfg).run_stages(st), strict=True):
        perf[s_.name] = perf.get(s_.name, 0) + r.cycles
    return steps, pre, perf


def test_projection_calibrated_against_the_rtl(rtl_case):
    """Issue 18: on the RTL's small case every policy's step within 5 % of the RTL (measured -0.3 .. +0.3 %),
    and the naive step's stages within 10 % of the performance model's for the batch compiler's programs (qkv
    +4.6 % with the V^T appends and the per-request scatter, attention -3.8 % timed from the firmware's macro
    stream: without them the projection's qkv was 34 % and its attention 65 % short)."""
    steps, pre, perf = rtl_case
    for p, want in RTL_B8.items():
        assert steps[p]["cycles"] == pytest.approx(want, rel=0.05), (p, steps[p]["cycles"], want)
    assert steps["neupims"]["partition"] == "none"                  # as the RTL's cost model chose
    assert pre["cycles"] == pytest.approx(perf["ln1"] + perf["qkv"], rel=0.10)
    assert steps["naive"]["attention"] == pytest.approx(perf["attn"], rel=0.10)
