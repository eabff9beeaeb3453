"""``ianus sweep`` on a local Dask cluster (:mod:`sim.sweep`): points per second with 1 and 2 worker
processes on the same 200-point random sweep, their ratio, and a 1,000-point sweep that runs to the end
and writes its Pareto plot.

The points: a GPT-2-shaped model of d_model 128 (2 heads, 2 layers), 8 or 16 input tokens, 2 or 4 output
tokens, 2 generation positions simulated, on the ``ianus`` preset with the policy, PIM channels, tRCDRD,
tRP and the systolic array's shape drawn at random: each point is one compile + performance-model run of
about 0.1-0.4 s of CPU. The rate is measured from the submission of the points to the last row written
(the cluster is started and its workers have imported the project before); the start of the cluster is
reported apart. The machine has 2 cores, shared with whatever else runs: the 2-worker rate is bounded by
the cores the two workers actually get.
"""

from __future__ import annotations

import csv
import os
import tempfile
import time
from pathlib import Path

from sim.sweep import analyse_results, connect, run_sweep
from sim.sweep_spec import parse_spec

EXCLUSIVE = True
"""Its figures include wall-clock times: ``make bench`` runs it alone (:mod:`sim.bench`)."""


ROOT = Path(__file__).resolve().parents[2]
OUT_1000 = ROOT / "build" / "sweep" / "bench-1000"


def bench_spec(samples: int, seed: int):
    return parse_spec({
        "name": f"bench-{samples}", "base": "ianus", "mode": "random", "samples": samples, "seed": seed,
        "positions": 2, "timeout_s": 120,
        "fixed": {"model": {"d_model": 128, "heads": 2, "layers": 2}},
        "axes": {"policy": ["ianus", "npu-mem"], "input": [8, 16], "output": [2, 4],
                 "pim.channels": [2, 4, 8], "timing.tRCDRD": {"range": [12, 48]},
                 "timing.tRP": {"range": [12, 40]}, "npu.array_rows": {"pow2": [16, 128]},
                 "npu.array_cols": {"pow2": [16, 128]}},
    })


def _timed_sweep(spec, workers: int, out: Path):
    """(stats, cluster start seconds, facts): ``facts`` from the rows: the workers' busy share (time inside
    points / (sweep time x workers)), the mean wall and CPU seconds of a point and the CPU share a point got
    (CPU / wall: below 1 when the point's thread waited for a core)."""
    t0 = time.perf_counter()
    client, cluster = connect(workers=workers)
    try:
        client.wait_for_workers(workers, timeout=120)
        start_s = time.perf_counter() - t0
        load = os.getloadavg()[0]
        stats = run_sweep(spec, out, client=client, progress=False)
    finally:
        client.close()
        cluster.close()
    with open(out / "results.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    wall = sum(float(r["wall_s"]) for r in rows)
    cpu = sum(float(r["cpu_s"]) for r in rows)
    facts = {"busy_share": round(wall / (stats.seconds * workers), 3) if stats.seconds else None,
             "point_wall_s": round(wall / len(rows), 4), "point_cpu_s": round(cpu / len(rows), 4),
             "cpu_share": round(cpu / wall, 3) if wall else None, "load_avg_1min_before": round(load, 2)}
    return stats, start_s, facts


def run(quick: bool = False):
    n = 40 if quick else 200
    spec = bench_spec(n, seed=1)
    rates = {}
    for workers in (1, 2):
        with tempfile.TemporaryDirectory() as tmp:
            stats, start_s, facts = _timed_sweep(spec, workers, Path(tmp))
        rates[workers] = stats.points_per_s
        yield {"name": "sweep_points_per_s", "value": round(stats.points_per_s, 3), "unit": "points/s",
               "workers": workers, "points": stats.ran, "ok": stats.ok, "errors": stats.errors,
               "sweep_s": round(stats.seconds, 2), "cluster_start_s": round(start_s, 2), **facts,
               "note": "compile + performance model per point, d_model 128 GPT-2 shape, random design points"}
    yield {"name": "sweep_speedup_2_vs_1_workers", "value": round(rates[2] / rates[1], 3), "unit": "x",
           "points": n, "goal": 1.8}
    if quick:
        return
    spec = bench_spec(1000, seed=2)
    OUT_1000.mkdir(parents=True, exist_ok=True)
    for name in ("results.csv", "pareto.csv"):
        (OUT_1000 / name).unlink(missing_ok=True)
    stats, start_s, facts = _timed_sweep(spec, 2, OUT_1000)
    t0 = time.perf_counter()
    info = analyse_results(spec, OUT_1000, plots=True)
    plot = info["plots"][0] if info["plots"] else None
    yield {"name": "sweep_1000_points_s", "value": round(stats.seconds, 2), "unit": "s", "workers": 2,
           "points": stats.ran, "ok": stats.ok, "errors": stats.errors,
           "points_per_s": round(stats.points_per_s, 3), "cluster_start_s": round(start_s, 2), **facts,
           "analysis_s": round(time.perf_counter() - t0, 2), "pareto_points": info["front"],
           "workloads": info["groups"], "plot": str(plot.relative_to(ROOT)) if plot else None,
           "plot_written": bool(plot and plot.exists() and plot.stat().st_size > 0)}
