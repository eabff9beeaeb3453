"""``ianus sweep`` (sim/sweep.py, sim/sweep_spec.py, sim/sweep_analysis.py): spec checks, a sweep on a
local Dask cluster end to end, resume, failing points, a worker killed mid-sweep, Pareto fronts."""

from __future__ import annotations

import csv
import itertools
import json
import logging
import os
import signal
import threading
import time

import numpy as np
import pytest

from firmware.gpt2 import GptShape
from hw.config import preset
from sim.sweep import call_with_timeout, connect, run_sweep
from sim.sweep_analysis import area_proxy, pareto_mask
from sim.sweep_spec import SpecError, parse_spec, point_key

SMALL = {"d_model": 128, "heads": 2, "layers": 2}     # a point of this model takes ~0.1-0.3 s


def spec_of(**over):
    raw = {"name": "t", "base": "ianus", "positions": 1,
           "fixed": {"model": dict(SMALL), "input": 8, "output": 2},
           "axes": {"policy": ["ianus", "npu-mem"], "pim.channels": [2, 4]}}
    raw.update(over)
    raw["fixed"] = {k: v for k, v in raw["fixed"].items() if k not in raw["axes"]}     # an axis wins
    return raw


def rows_of(path):
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


# ---------------------------------------------------------------------------------------------
# Spec parsing and checks (no cluster)
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("raw, message", [
    (spec_of(axes={"pim.chanels": [2]}), "axis 'pim.chanels': PimGeometry has no field 'chanels'"),
    (spec_of(axes={"dram.tRP": [2]}), "axis 'dram.tRP': 'dram' is not a configuration part"),
    (spec_of(axes={"speed": [2]}), "axis 'speed': not one of model, policy, input, output"),
    (spec_of(axes={"pim.channels": [2, 3]}),
     "axis pim.channels value 3: PimGeometry.channels must be a power of two, not 3"),
    (spec_of(axes={"timing.tRCDRD": [0]}),
     "axis timing.tRCDRD value 0: DramTiming.tRCDRD must be an integer of at least 1 cycle, not 0"),
    (spec_of(axes={"clocks.npu_mhz": ["fast"]}),
     "axis clocks.npu_mhz value 'fast': Clocks.npu_mhz must be a positive finite number, not 'fast'"),
    (spec_of(axes={"timing.tRP": {"range": [10, 40]}}), "axis timing.tRP: a grid needs a list"),
    (spec_of(axes={"timing.tRP": {"range": [40, 10], "step": 2}}), "axis timing.tRP: range must be [lo, hi]"),
    (spec_of(axes={"timing.tRP": {"rnge": [1, 2]}}), "axis timing.tRP: unknown key 'rnge'"),
    (spec_of(axes={"policy": ["ianus", "fast"]}), "policy must be one of ianus, npu-mem, naive, hpim, not 'fast'"),
    (spec_of(axes={"model": ["small", "huge"]}), "model must be one of"),
    (spec_of(axes={"model": [{"d_model": 100, "heads": 3}]}), "model {'d_model': 100, 'heads': 3}: d_model (100)"),
    (spec_of(axes={"input": [8, 0]}), "input must be an integer in 1..65536 (tokens), not 0"),
    (spec_of(fixed={"model": "small", "pim.banks": 12}), "fixed: PimGeometry.banks must be a power of two, not 12"),
    (spec_of(fixed={"input": 8}), "a spec needs a model"),
    (spec_of(axes={}), "axes must name at least one field"),
    (spec_of(mode="random"), "samples must be an integer in 1..1000000 in random mode, not 0"),
    (spec_of(samples=5), "samples is for mode random"),
    (spec_of(base="huge"), "base must be one of tiny, default, ianus, tiny-dualrb, default-dualrb, neupims, "
                           "neupims-hw, tiny-il, default-il, default-4ch, tiny-hpim, default-hpim, tiny-w4, tiny-w4a8, "
                           "default-w4, default-w4a8, ianus-w4, ianus-w4a8, tiny-p4, default-p4, tiny-dualrb-p4, "
                           "not 'huge'"),
    (spec_of(positions=0), "positions must be an integer in 1..64, not 0"),
    (spec_of(timeout_s=-1), "timeout_s must be a positive number of seconds, not -1"),
    (spec_of(colour="red"), "unknown spec key 'colour'"),
    (spec_of(axes={"timing.tRP": {"range": [1, 10 ** 7], "step": 1}}),
     "the grid has 10,000,000 points, more than the limit of 1,000,000"),
])
def test_spec_errors_name_the_field(raw, message):
    with pytest.raises(SpecError) as exc:
        parse_spec(raw)
    text = str(exc.value)
    assert message in text
    assert "\n" not in text


def test_cross_field_rule_is_left_to_the_point():
    # column_bits must be lanes x 16: each value passes with some value of the other axis, so the spec is
    # accepted and the two mismatched points fail on their own.
    spec = parse_spec(spec_of(axes={"pim.lanes": [16, 32], "pim.column_bits": [256, 512]}))
    assert len(spec.points()) == 4
    # Without a column_bits axis no point with lanes 32 can pass: the spec is refused.
    with pytest.raises(SpecError, match="^axis pim.lanes value 32: PimGeometry.column_bits must be lanes x 16 "
                                        "bits = 512, not 256$"):
        parse_spec(spec_of(axes={"pim.lanes": [16, 32]}))


def test_grid_random_and_keys():
    spec = parse_spec(spec_of(axes={"policy": ["ianus", "npu-mem"], "npu.array_rows": {"pow2": [20, 128]},
                                    "timing.tRP": {"range": [10, 20], "step": 5}}))
    pts = spec.points()
    assert [p["npu.array_rows"] for p in pts[:3]] == [32, 32, 32]
    assert len(pts) == 2 * 3 * 3
    assert {(p["policy"], p["npu.array_rows"], p["timing.tRP"]) for p in pts} == set(
        itertools.product(["ianus", "npu-mem"], [32, 64, 128], [10, 15, 20]))
    assert all(p["input"] == 8 and p["output"] == 2 and p["model"] == SMALL for p in pts)
    keys = [point_key(spec, p) for p in pts]
    assert len(set(keys)) == len(keys)
    # The key does not depend on dict order; it does depend on the base preset and positions.
    p = pts[0]
    assert point_key(spec, dict(reversed(list(p.items())))) == keys[0]
    assert point_key(parse_spec(spec_of(positions=2)), p) != keys[0]
    assert point_key(parse_spec(spec_of(base="default")), p) != keys[0]

    rnd = spec_of(mode="random", samples=25, seed=3,
                  axes={"timing.tRCDRD": {"range": [10, 50]}, "clocks.npu_mhz": {"range": [300.0, 1000.0], "log": True},
                        "pim.channels": [2, 4, 8]})
    a, b = parse_spec(rnd).points(), parse_spec(rnd).points()
    assert a == b and len(a) == 25
    assert len({point_key(parse_spec(rnd), p) for p in a}) == 25
    assert all(10 <= p["timing.tRCDRD"] <= 50 and isinstance(p["timing.tRCDRD"], int) for p in a)
    assert all(300.0 <= p["clocks.npu_mhz"] <= 1000.0 for p in a)
    assert parse_spec(dict(rnd, seed=4)).points() != a
    # A space smaller than the samples asked for gives every distinct point once.
    small = parse_spec(spec_of(mode="random", samples=50, axes={"pim.channels": [2, 4, 8]}))
    assert sorted(p["pim.channels"] for p in small.points()) == [2, 4, 8]


def test_yaml_errors_are_one_line(tmp_path):
    from sim.sweep_spec import load_spec

    bad = tmp_path / "bad.yaml"
    bad.write_text("name: x\naxes:\n  pim.channels: [2, 4\n")
    with pytest.raises(SpecError, match=r"bad.yaml: YAML error at line \d+"):
        load_spec(bad)
    good = tmp_path / "good.yaml"
    good.write_text("fixed: {model: small}\naxes:\n  pim.channels: [4, 8]\n")
    assert load_spec(good).name == "good"


def test_cli_rejects_bad_spec_in_one_line(tmp_path, capsys):
    from sim.cli import main

    spec = tmp_path / "s.yaml"
    spec.write_text("fixed: {model: small}\naxes:\n  timing.tRCDRD: [36, -1]\n")
    assert main(["sweep", str(spec), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip()
    assert err == ("ianus sweep: error: axis timing.tRCDRD value -1: DramTiming.tRCDRD must be an integer "
                   "of at least 1 cycle, not -1")
    spec.write_text("fixed: {model: small}\naxes:\n  pim.channels: [4]\n")
    assert main(["sweep", str(spec), "--workers", "0"]) == 2
    assert "--workers must be an integer in 1..256, not 0" in capsys.readouterr().err
    assert main(["sweep", str(spec), "--out", str(tmp_path / "o"), "--dry-run"]) == 0
    assert "1 points (grid), 0 already in" in capsys.readouterr().out


# ---------------------------------------------------------------------------------------------
# Analysis and helpers
# ---------------------------------------------------------------------------------------------

def test_pareto_mask_matches_brute_force():
    rng = np.random.default_rng(7)
    for n, k in ((1, 3), (40, 2), (200, 3)):
        v = rng.integers(0, 12, size=(n, k)).astype(float)     # many ties
        want = [not any(all(v[j] <= v[i]) and any(v[j] < v[i]) for j in range(n)) for i in range(n)]
        assert list(pareto_mask(v)) == want


def test_area_proxy_follows_the_configuration():
    base = preset("ianus")
    a = area_proxy(base)
    b = area_proxy(base.replace(**{"pim.channels": 16}))
    assert b["area_pim_mm2"] == pytest.approx(2 * a["area_pim_mm2"])
    assert b["area_npu_mm2"] == a["area_npu_mm2"]
    c = area_proxy(base.replace(**{"npu.array_cols": 128}))
    assert c["area_npu_mm2"] > a["area_npu_mm2"] and c["area_sram_mm2"] > a["area_sram_mm2"]
    assert a["area_mm2"] == pytest.approx(a["area_pim_mm2"] + a["area_npu_mm2"] + a["area_sram_mm2"])


def test_call_with_timeout_interrupts_a_python_loop():
    from sim.sweep import PointTimeout

    def spin():
        while True:
            pass

    t0 = time.perf_counter()
    with pytest.raises(PointTimeout, match="timeout_s of 0.3 s"):
        call_with_timeout(spin, 0.3)
    assert time.perf_counter() - t0 < 10
    assert call_with_timeout(lambda: 5, 0.3) == 5
    time.sleep(0.5)                          # the cancelled timer fires nothing into this thread later
    assert threading.active_count() >= 1


# ---------------------------------------------------------------------------------------------
# Sweeps on a local Dask cluster
# ---------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def client():
    c, cluster = connect(workers=2)
    yield c
    c.close()
    cluster.close()


def test_sweep_end_to_end_resume_and_failures(client, tmp_path):
    from sim.project import project

    raw = spec_of(axes={"policy": ["ianus", "npu-mem"], "pim.channels": [2, 4], "pim.lanes": [16, 32],
                        "pim.column_bits": [256, 512]})
    spec = parse_spec(raw)
    seen = []
    stats = run_sweep(spec, tmp_path, client=client, progress=False, on_result=lambda r, s: seen.append(r["key"]))
    assert (stats.points, stats.ran, stats.ok, stats.errors, stats.skipped) == (16, 16, 8, 8, 0)
    rows = rows_of(tmp_path / "results.csv")
    assert sorted(r["key"] for r in rows) == sorted(point_key(spec, p) for p in spec.points()) == sorted(seen)
    for r in rows:
        point = json.loads(r["point"])
        assert point_key(spec, point) == r["key"]
        if point["pim.lanes"] * 16 != point["pim.column_bits"]:      # the configuration refuses the pair
            want = f"ConfigError: PimGeometry.column_bits must be lanes x 16 bits = {point['pim.lanes'] * 16}"
            assert r["status"] == "error" and r["error"].startswith(want), r["error"]
            assert r["ms_per_token"] == ""
        else:
            assert r["status"] == "ok" and r["error"] == ""
    # A row holds what the performance model gives for its point, run here directly.
    ok16 = [r for r in rows if r["status"] == "ok" and r["pim.lanes"] == "16"]
    r = next(r for r in ok16 if r["pim.channels"] == "4" and r["policy"] == "npu-mem")
    cfg = preset("ianus").replace(**{"pim.channels": 4})
    s = project("x", "npu-mem", 8, 2, cfg, samples=1, shape=GptShape(**SMALL)).summary(2)
    assert float(r["total_ms"]) == s["total_ms"] and float(r["ms_per_token"]) == s["total_ms"] / 2
    assert float(r["mJ_per_token"]) == s["total_J"] * 1e3 / 2
    assert float(r["area_mm2"]) == area_proxy(cfg)["area_mm2"]
    other = next(x for x in ok16 if x["pim.channels"] == "2" and x["policy"] == "npu-mem")
    assert float(other["total_ms"]) != float(r["total_ms"])

    # Resume: nothing runs again; rows removed (and a last line cut short by a crash) run again.
    stats = run_sweep(spec, tmp_path, client=client, progress=False)
    assert (stats.ran, stats.skipped) == (0, 16)
    lines = (tmp_path / "results.csv").read_text().splitlines(keepends=True)
    drop = [r["key"] for r in rows[:2]]
    kept = [ln for ln in lines if not any(ln.startswith(k) for k in drop)]
    (tmp_path / "results.csv").write_text("".join(kept) + lines[1][:30])
    stats = run_sweep(spec, tmp_path, client=client, progress=False)
    assert (stats.ran, stats.skipped) == (2, 14)
    rows2 = rows_of(tmp_path / "results.csv")
    assert sorted(r["key"] for r in rows2) == sorted(r["key"] for r in rows)
    # --retry-errors runs the failed points again (still failing: the error is the configuration's).
    stats = run_sweep(spec, tmp_path, client=client, progress=False, retry_errors=True)
    assert (stats.ran, stats.errors) == (8, 8)
    assert len(rows_of(tmp_path / "results.csv")) == 16

    # The analysis: a front per workload, a plot, best-point table.
    from sim.sweep import analyse_results

    info = analyse_results(spec, tmp_path, plots=True)
    assert info["groups"] == 1 and 1 <= info["front"] <= 8
    assert info["plots"][0].exists() and info["plots"][0].stat().st_size > 10_000
    front = rows_of(tmp_path / "pareto.csv")
    assert len(front) == info["front"]


def test_point_past_its_timeout_records_the_timeout(client, tmp_path):
    # GPT-2 XL takes ~2.6 s of CPU to compile and time here (less once the worker's caches are warm from the
    # other tests, so the limit is far below any run of it: 10 ms); the worker is usable after.
    raw = spec_of(timeout_s=0.01, axes={"model": ["xl"]})
    stats = run_sweep(parse_spec(raw), tmp_path / "a", client=client, progress=False)
    (row,) = rows_of(tmp_path / "a" / "results.csv")
    assert (stats.ok, stats.errors) == (0, 1)
    assert row["error"] == "PointTimeout: point ran past the spec's timeout_s of 0.01 s"
    assert float(row["wall_s"]) < 30
    stats = run_sweep(parse_spec(spec_of(axes={"policy": ["ianus"]})), tmp_path / "b", client=client, progress=False)
    assert stats.ok == 1


def test_results_file_of_another_spec_is_refused(client, tmp_path):
    run_sweep(parse_spec(spec_of(axes={"pim.channels": [2]})), tmp_path, client=client, progress=False)
    with pytest.raises(SpecError, match="holds results with other columns"):
        run_sweep(parse_spec(spec_of(axes={"npu.array_rows": [16]})), tmp_path, client=client, progress=False)


def test_unreachable_scheduler_is_one_line():
    with pytest.raises(SpecError, match=r"cannot reach the Dask scheduler 'tcp://127.0.0.1:9'"):
        connect(scheduler="tcp://127.0.0.1:9", timeout="2s")


def test_killed_worker_loses_no_point(tmp_path):
    """A worker process is killed (SIGKILL) while it runs a point; the scheduler re-runs its task on
    another worker and every point is in the results exactly once. The sweep reaches the cluster through
    its scheduler address, as ``--scheduler tcp://...`` does."""
    from dask.distributed import Client, LocalCluster

    cluster = LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=":0",
                           silence_logs=logging.CRITICAL)
    watcher = Client(cluster)
    try:
        spec = parse_spec(spec_of(axes={"policy": ["ianus", "npu-mem"], "pim.channels": [2, 4, 8],
                                        "npu.array_rows": [16, 32]}))
        killed = {}

        def kill_one(row, stats):
            if killed:
                return
            pids = watcher.run(os.getpid)
            for addr, keys in watcher.processing().items():
                if keys and addr in pids:
                    killed.update(pid=pids[addr], keys={k.removeprefix("ianus-sweep-") for k in keys})
                    os.kill(pids[addr], signal.SIGKILL)
                    return

        stats = run_sweep(spec, tmp_path, scheduler=cluster.scheduler_address, progress=False, on_result=kill_one)
        assert killed, "no worker was running a point when the first result came in"
        rows = rows_of(tmp_path / "results.csv")
        keys = [r["key"] for r in rows]
        assert sorted(keys) == sorted(point_key(spec, p) for p in spec.points())      # each exactly once
        assert all(r["status"] == "ok" for r in rows), [r["error"] for r in rows]
        assert stats.ran == len(rows) == 12
        rerun = [r for r in rows if r["key"] in killed["keys"]]
        assert rerun and all(not r["worker"].endswith(f":{killed['pid']}") for r in rerun)
    finally:
        watcher.close()
        cluster.close()
