"""Physical lower bounds per operation (sim/bounds.py) against hand-computed values, the performance
model, the stored RTL cycles and the projection's outputs."""

import argparse
import csv
import math

import pytest

from firmware.gpt2 import GptShape
from hw.config import preset
from sim import bounds as bnd

TINY = GptShape(32, 2, 1)          # d 32, 2 heads of 16, ffn 128
MU = {(ph, fc): "mu" for ph in ("prefill", "gen") for fc in ("qkv", "proj", "fc1", "fc2")}
PIM_GEN = {**MU, **{("gen", fc): "pim" for fc in ("qkv", "proj", "fc1", "fc2")}}


def test_rates_by_hand():
    # tiny: 2 channels x 32 B per cycle; one 32-byte request per cycle per DMA engine; 4x4 array x 1 MAC;
    # 4 vector lanes; PIM 2 ch x 8 banks x 16 lanes x 2 FLOP.
    r = bnd.rates(preset("tiny"))
    assert (r.dram, r.mu_port, r.vdma_port, r.npu, r.vector, r.pim) == (64, 32, 32, 32, 4, 512)
    # ianus: 8 x 32 B per DRAM cycle (256 GB/s); 4 cores x 128x64 x 4 MACs x 2 FLOP at 700 MHz per 1 GHz cycle.
    r = bnd.rates(preset("ianus"))
    assert r.dram == 256
    assert r.npu == pytest.approx(2 * 128 * 64 * 4 * 4 * 0.7)
    assert r.vector == pytest.approx(64 * 4 * 0.7)
    assert r.mu_port > r.dram          # the projected DMA ports do not bind (sim.perfmodel.micro_for)


def test_tiny_bounds_by_hand():
    cfg = preset("tiny")
    w = bnd.stage_work(TINY, MU, "prefill", "qkv_attn", 8, 0)
    # QKV 32 x 96 on the matrix unit, 8 tokens: weights 2*32*96 + input 2*8*32 + output 2*8*96 = 8192 bytes,
    # bias 4*96; 2*8*32*96 = 49152 FLOP at 32 per cycle = 1536 cycles (matrix-bound).
    q = bnd.bound(cfg, w["qkv"])
    assert w["qkv"].mu_bytes == 8192 and w["qkv"].io_bytes == 384
    assert (q.cycles, q.limit) == (1536, "matrix")
    assert q.terms["mu_dma"] == 256 and q.terms["dram"] == pytest.approx(8576 / 64)
    # Attention, 8 tokens from position 0: 36 causal pairs per head; 4 * 32 * 36 = 4608 FLOP -> 144 cycles;
    # Q, K, V, O: 4 * 2 * 8 * 32 = 2048 bytes -> 64 cycles on the matrix DMA; 2 * 36 softmax elements / 4 lanes.
    a = bnd.bound(cfg, w["attention"])
    assert (a.cycles, a.limit) == (144, "matrix")
    assert a.terms["mu_dma"] == 64 and a.terms["vector"] == 18
    # Layernorm of 8 x 32: x FP32 + h BF16 + 4 bytes of parameters per element of d = 1664 bytes -> 52 cycles
    # on the vector DMA; 2 passes x 256 elements / 4 lanes = 128 cycles (vector-bound).
    ln = bnd.bound(cfg, bnd.stage_work(TINY, MU, "prefill", "ln1", 8, 0)["vector"])
    assert (ln.cycles, ln.limit) == (128, "vector")
    assert ln.terms["vector_dma"] == 52
    # Generation step at position 8, QKV in PIM: 6 tiles of 16 outputs (2 ch x 8 banks), one 128-value chunk,
    # 2 MAC columns per row, one accumulator group. firmware.pim.gemv_lower_bound's terms by hand:
    # first row max(tRCD 4 + 1, 1 + 2*2) = 5; 5 more rows of max(bank 2+4+4+1, accumulators 11+2+1, 0) = 14;
    # last results 11 + 1 + 2 = 14: 5 + 70 + 14 = 89 cycles (the bus needs 26 column + 12 row commands).
    g = bnd.bound(cfg, bnd.stage_work(TINY, PIM_GEN, "gen", "qkv_attn", 1, 8)["qkv"])
    assert (g.cycles, g.limit) == (89, "pim")
    assert bnd.gemv_cycles(cfg, 32, 96, False) == 89
    # Generation attention at position 8: 9 keys; K and V 2 * 9 * 32 * 2 + Q, O 2 * 32 * 2 = 1280 bytes
    # -> 40 cycles; 4 * 32 * 9 = 1152 FLOP -> 36 cycles.
    ga = bnd.bound(cfg, bnd.stage_work(TINY, PIM_GEN, "gen", "qkv_attn", 1, 8)["attention"])
    assert (ga.cycles, ga.limit) == (40, "mu_dma")


def test_xl_ffn_bound_by_hand():
    """GPT-2 XL summarization of 128 tokens, FFN on the matrix units: weights 2 x 2 x 1536 x 6144 BF16, inputs
    and outputs 2 x 128 x (1536 + 6144) BF16 (the biases are added, and counted, by the vector steps):
    41,680,896 bytes at 256 B per cycle."""
    cfg = preset("ianus")
    w = bnd.phase_work(GptShape(1536, 24, 48), MU, "summarization", 128, 0)["ffn"]
    assert w.dram_bytes == 41_680_896
    b = bnd.bound(cfg, w)
    assert b.limit == "dram" and b.cycles == pytest.approx(41_680_896 / 256)
    assert b.terms["matrix"] == pytest.approx(4 * 128 * 1536 * 6144 / (2 * 128 * 64 * 4 * 4 * 0.7))


def test_bad_input_is_named():
    with pytest.raises(bnd.BoundError, match="phase must be one of .* not 'decode'"):
        bnd.stage_work(TINY, MU, "decode", "ln1", 1, 0)
    with pytest.raises(bnd.BoundError, match="stage must be one of .* not 'ffn'"):
        bnd.stage_work(TINY, MU, "gen", "ffn", 1, 0)
    with pytest.raises(bnd.BoundError, match="rows .* positive integer, not 0"):
        bnd.stage_work(TINY, MU, "gen", "ln1", 0, 0)
    with pytest.raises(bnd.BoundError, match="pos .* not -1"):
        bnd.stage_work(TINY, MU, "gen", "ln1", 1, -1)
    with pytest.raises(bnd.BoundError, match="program name must look like .* not 'L0 gen@x fc1'"):
        bnd.parse_program_name("L0 gen@x fc1")
    with pytest.raises(bnd.BoundError, match="cycles of 'L0 gen@8 fc1' must be a positive number, not -5"):
        bnd.rtl_stage_ratios(preset("tiny"), TINY, "ianus", 8, {"L0 gen@8 fc1": -5})


def test_projection_never_beats_its_bound():
    """Every operation of a small projection (both policies) takes at least its lower bound, and the
    programs move at least the compulsory bytes of every operation."""
    from sim.project import project

    shape = GptShape(512, 8, 2)
    for pol in ("ianus", "npu-mem"):
        p = project("test", pol, 32, 4, shape=shape, samples=3)
        rows = bnd.projection_rows(p, 4)
        assert {(r["phase"], r["op"]) for r in rows if r["ratio"] is not None} >= \
            {(ph, op) for ph in bnd.PHASES for op in (*bnd.OPS, "total")}
        for r in rows:
            if r["ratio"] is None:
                assert r["bound_ms"] == 0 and r["op"] in ("wait_pim", "overhead")
                continue
            assert r["ratio"] >= 1.0, r
            assert r["program_MB"] >= r["compulsory_MB"] * (1 - 1e-9), r
        total = {r["phase"]: r for r in rows if r["op"] == "total"}
        s = p.summary(4)
        assert total["summarization"]["achieved_ms"] == pytest.approx(s["summarization_ms"])
        assert total["generation"]["achieved_ms"] == pytest.approx(s["gen_ms_per_token"])


def test_default_layer_model_and_stored_rtl_above_bound():
    """The RTL's default layer: the performance model's operations and stages, and the stored RTL cycles of
    every stage (sim/calibration/default.json), never beat their bounds."""
    from sim import calibrate
    from sim.run import DEFAULT_SHAPE, soc_config

    ops, stages = bnd.default_layer_rows("ianus", 32, 1)
    assert {r["op"] for r in ops if r["ratio"] is not None} == {*bnd.OPS, "total"}
    for r in ops:
        assert r["ratio"] is None or r["ratio"] >= 1.0, r
    for r in stages:
        assert r["model_ratio"] >= 1.0, r
    data = calibrate.stored("default")
    if data is None:
        pytest.skip("no sim/calibration/default.json")
    for j in data["jobs"]:
        rows = bnd.rtl_stage_ratios(soc_config("default"), DEFAULT_SHAPE, j["policy"], j["prefill"], j["programs"])
        assert len(rows) == len(j["programs"])
        for r in rows:
            assert r["ratio"] >= 1.0, r
            assert r["bound"] >= max(v for v in r["op_bounds"].values())


def test_project_bounds_writes_csv(tmp_path, monkeypatch):
    from sim import project as proj

    default_bounds = bnd.default_bounds
    monkeypatch.setattr(bnd, "default_bounds", lambda: default_bounds(jobs=[("npu-mem", 1, 32, 1)]))
    ap = argparse.ArgumentParser()
    proj.add_parser(ap.add_subparsers())
    args = ap.parse_args(["project", "--models", "small", "--inputs", "32", "--outputs", "4", "--samples", "2",
                          "--devices", "", "--out", str(tmp_path), "--bounds"])
    assert proj.main_project(args) == 0
    rows = list(csv.DictReader(open(tmp_path / "bounds.csv")))
    assert {(r["policy"], r["phase"]) for r in rows} == {(p, ph) for p in ("ianus", "npu-mem") for ph in bnd.PHASES}
    for r in rows:
        if r["op"] in ("wait_pim", "overhead"):
            assert r["ratio"] == ""
        else:
            ratio = float(r["ratio"])
            assert ratio >= 1.0 and math.isclose(ratio, float(r["achieved_ms"]) / float(r["bound_ms"]), rel_tol=1e-4)
    d = list(csv.DictReader(open(tmp_path / "bounds_default.csv")))
    assert {r["policy"] for r in d} == {"npu-mem"} and any(r["op"] == "ffn" for r in d)
    st = list(csv.DictReader(open(tmp_path / "bounds_default_stages.csv")))
    assert all(r["rtl_cycles"] for r in st)         # the stored npu-mem 32 + 1 job covers every program
    roof = list(csv.DictReader(open(tmp_path / "roofline.csv")))
    assert all(float(r["bound_gflops"]) >= float(r["gflops"]) for r in roof)


def test_projection_exact_times_every_request(monkeypatch):
    """``project(..., exact=True)`` runs the paper-scale model with ``Micro.cache`` off (every DMA request timed,
    as on the calibrated RTL configurations); the default reuses a transfer's timing by shape."""
    import sim.projection_core as pc
    from sim.perfmodel import PerfModel

    seen = []
    orig = PerfModel.__init__

    def spy(self, cfg, micro=None, calib=None):
        seen.append(micro.cache)
        orig(self, cfg, micro, calib)

    monkeypatch.setattr(PerfModel, "__init__", spy)
    shape = GptShape(256, 4, 1)
    cached = pc.project_programs("tiny-shape", "ianus", 16, 2, samples=2, shape=shape)
    exact = pc.project_programs("tiny-shape", "ianus", 16, 2, samples=2, shape=shape, exact=True)
    assert seen == [True, False]
    assert cached.prefill.cycles > 0 and exact.prefill.cycles > 0
