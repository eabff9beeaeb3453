"""The ``hpim`` policy's performance model (sim/hpim_model.py): the pipeline schedule and its critical path,
the block-cyclic key split, capacity errors, the K/V stream against the external bandwidth, one layer's
generation step on the ``ianus`` preset, and ``ianus project --policies hpim`` argument checks."""

import argparse

import pytest

from firmware.gpt2 import SHAPES, GptShape
from hw.config import preset
from hw.npu.sram_pim import SramPimOp
from sim.hpim_model import (
    HPIM_OPS,
    HpimCapacityError,
    HpimLayer,
    SramPimSystem,
    Task,
    capacity_mode,
    check_fit,
    critical_path,
    kv_block,
    schedule,
    stream_cycles,
    unit_keys,
)
from sim.perfmodel import micro_for


def test_schedule_and_critical_path():
    """A hand-checked pipeline: two resources, a dependency chain across them."""
    T = [Task("a", "qkv", ("chan",), 10), Task("b", "qk", ("sram",), 4, ("a",)),
         Task("c", "proj", ("chan",), 3),                         # runs on chan while b computes
         Task("d", "pv", ("sram",), 5, ("b",)), Task("e", "fc1", ("chan",), 2, ("d", "c"))]
    assert schedule(T) == 21
    assert [(t.start, t.end) for t in T] == [(0, 10), (10, 14), (10, 13), (14, 19), (19, 21)]
    crit, path = critical_path(T)
    assert path == ["a", "b", "d", "e"]
    assert sum(crit.values()) == 21 and crit["proj"] == 0 and crit["qk"] == 4
    T2 = [Task("x", "qkv", ("chan",), 5), Task("y", "qk", ("sram",), 1, ("x",)), Task("z", "fc1", ("sram",), 1)]
    schedule(T2)
    crit, path = critical_path(T2)
    assert schedule(T2) == 7 and sum(crit.values()) == 7 and path == ["x", "y", "z"]   # z waits for y (in order)
    with pytest.raises(ValueError, match="task q depends on nope"):
        schedule([Task("q", "qk", ("sram",), 1, ("nope",))])


@pytest.mark.parametrize("tokens", [1, 15, 16, 17, 63, 64, 65, 100, 543, 576, 1000])
@pytest.mark.parametrize("units,block", [(4, 16), (3, 16), (1, 8), (4, 1)])
def test_unit_keys(tokens, units, block):
    want = max(sum(1 for p in range(tokens) if (p // block) % units == u) for u in range(units))
    assert unit_keys(tokens, units, block) == want


def test_capacity():
    cfg = preset("ianus")
    assert check_fit(cfg, SHAPES["xl"], 576) == "streamed"
    assert check_fit(cfg, SHAPES["2.5b"], 576) == "streamed"           # head_dim 96 in 128-value rows
    assert capacity_mode(SramPimSystem(), GptShape(128, 2, 2), 2, 64) == "resident"
    with pytest.raises(HpimCapacityError, match=r"K and V of 6 heads x 4000 positions .* need 1512 rows per macro "
                                                r".* have 1024 rows") as e:
        check_fit(cfg, SHAPES["xl"], 4000)
    assert "\n" not in str(e.value)
    with pytest.raises(HpimCapacityError, match="head_dim 128 exceeds the SRAM-PIM row of 64"):
        capacity_mode(SramPimSystem(), GptShape(512, 4, 1), 2, 16)


def test_kv_stream_bandwidth():
    """Reading N bytes takes at least N / (channels x 32 B per cycle) and, for a long stream spread over the
    channels, not more than twice that (refresh, row activations); twice the bytes, about twice the time."""
    cfg = preset("ianus")
    layer = HpimLayer(cfg, SHAPES["xl"], 576, n_in=512)
    peak = cfg.pim.channels * 32
    t1, ev1 = layer._kv_stream(0, 256)
    t2, ev2 = layer._kv_stream(0, 512)
    for t, ev, pos in ((t1, ev1, 256), (t2, ev2, 512)):
        nbytes = 2 * layer.hpg * pos * 128
        assert ev["dram_reads"] * 32 == nbytes
        assert nbytes / peak <= t <= 2 * nbytes / peak
    assert 1.7 < t2 / t1 < 2.3
    micro = micro_for(cfg)
    one, _ = stream_cycles(cfg, [[(0, 32 * 64)]], 1, micro.dma_outstanding)      # one engine, one DRAM row
    assert one >= 64 * cfg.clocks.pim_mhz / cfg.clocks.npu_mhz


def test_layer_step_xl():
    """One XL generation step: the makespan is at least the channel tasks' sum (the channels are exclusive) and
    equals the critical path's sum; the SRAM-PIM tasks take the unit's cycle formula; only the last group's
    attention compute can be on the critical path."""
    cfg = preset("ianus")
    layer = HpimLayer(cfg, SHAPES["xl"], 576, n_in=512)
    assert layer.mode == "streamed" and kv_block(cfg, SHAPES["xl"]) == 16
    st = layer.step(543)
    T = st["tasks"]
    chan = sum(t.dur for t in T if "chan" in t.res)
    assert st["cycles"] >= chan - 1e-6
    assert sum(st["critical"].values()) == pytest.approx(st["cycles"])
    k = cfg.clocks.pim_mhz / cfg.clocks.npu_mhz
    qk = [t for t in T if t.op == "qk"]
    assert qk[0].dur == pytest.approx(layer.unit.command_cycles(SramPimOp.QK, layer.keys_per_unit(544), 6) * k)
    G = layer.groups
    on_path = set(st["path"])
    for g in range(G - 1):
        assert not {f"qk{g}", f"softmax{g}", f"pv{g}"} & on_path, f"group {g}'s attention on the critical path"
    assert st["alternative"] >= st["cycles"]
    assert set(st["critical"]) == set(HPIM_OPS)
    assert st["events"]["sram_pim_mac"] == 2 * 24 * 544 * 64


def test_project_args():
    from sim.project import add_parser, validate_args
    from sim.usage import UsageError

    ap = argparse.ArgumentParser()
    sub = ap.add_subparsers()
    add_parser(sub)
    args = ap.parse_args(["project", "--models", "xl", "--inputs", "512", "--outputs", "64", "--policies",
                          "ianus,hpim", "--devices", ""])
    validate_args(args)
    args = ap.parse_args(["project", "--models", "xl", "--inputs", "3936", "--outputs", "64", "--policies", "hpim",
                          "--devices", ""])
    with pytest.raises(UsageError, match="model xl under policy hpim: hpim: K and V of 6 heads"):
        validate_args(args)


def test_project_hpim_small_resident():
    """``project(..., "hpim")`` end to end on GPT-2 small (its whole KV cache fits the units: resident, no
    stream): the critical path sums to the generation time, the summarization is ianus's, the report tables
    build."""
    from sim.hpim_model import hpim_rows, hpim_tables
    from sim.project import project

    ianus = project("small", "ianus", 16, 3, samples=2)
    p = project("small", "hpim", 16, 3, samples=2)
    assert p.policy == "hpim" and p.gen[1].hpim["mode"] == "resident"
    assert all(t.dur == 0 for t in p.gen[1].hpim["tasks"] if t.op == "kv_stream")
    assert p.summary(3)["summarization_ms"] == pytest.approx(ianus.summary(3)["summarization_ms"], rel=0.02)
    r = hpim_rows(p, 3, ianus)
    assert sum(r["critical_ms"].values()) == pytest.approx(r["gen_ms_per_token"])
    assert r["hpim_gen_speedup_vs_ianus"] == pytest.approx(r["ianus_gen_ms_per_token"] / r["gen_ms_per_token"])
    assert len(hpim_tables({("small", "ianus", 16): ianus, ("small", "hpim", 16): p}, 3)) == 2
