"""NeuPIMs dual row buffers: a GEMV beside a saturating stream of normal reads, with 1 and 2 row buffers.

``dualrb_concurrency`` rows (one per row-buffer setting, default configuration, same RTL otherwise): the
normal reads' share of the bandwidth they get alone while the GEMV runs, and the GEMV's slowdown beside
them (``sim/tb/memctrl_tb.py::dualrb_concurrency``; the GEMV is bit-exact and the protocol checker runs).
The memory-controller system is built with the behavioural FP cells in the PIM units (bit-exact, faster
to build and simulate; ``hw.arith.check_fp_impl``).
"""

from __future__ import annotations

import json
import os
import tempfile
import time

SHAPE = "768x3072"


def system_build(config: str, arbitration: str = "pim_first", fp_impl: str = "dpi"):
    from hw.config import preset
    from hw.memctrl import MemCtrlSystem
    from hw.pim import device_factory, device_sources
    from sim.build import build

    cfg = preset(config)
    return build(lambda: MemCtrlSystem(cfg, device_factory(cfg), arbitration=arbitration),
                 name=f"memctrl_system_{config}_{arbitration}_{fp_impl}", key=f"{cfg!r} {arbitration}",
                 extra_sources=tuple(device_sources(cfg, fp_impl=fp_impl)), no_inline=("pim_bank_*",))


def measure(config: str, shape: str = SHAPE, arbitration: str = "pim_first", n_reads: int = 4000) -> dict:
    """Run the concurrency testcase; return its metrics plus build and run wall times."""
    t0 = time.perf_counter()
    b = system_build(config, arbitration)
    t1 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        metrics = os.path.join(tmp, "m.jsonl")
        b.run("sim.tb.memctrl_tb", "dualrb_concurrency", test_name=f"bench_dualrb_{config}_{arbitration}",
              env={"IANUS_CONFIG": config, "GEMV_SHAPE": shape, "N_READS": n_reads, "IANUS_METRICS": metrics})
        m = [json.loads(line) for line in open(metrics)][-1]
    m.update(build_s=round(t1 - t0, 1), run_s=round(time.perf_counter() - t1, 1))
    return m


def run(quick: bool = False):
    config_of = {1: "default", 2: "default-dualrb"}
    shape = "768x768" if quick else SHAPE
    for rb, config in config_of.items():
        m = measure(config, shape)
        yield {"name": "dualrb_concurrency", "value": round(m["normal_share"], 4),
               "unit": "normal read bandwidth during the GEMV / alone", "row_buffers": rb, "config": config,
               "shape": shape, "arbitration": "pim_first",
               "gemv_slowdown": round(m["gemv_slowdown"], 4), "gemv_alone_cycles": m["gemv_alone_cycles"],
               "gemv_with_normal_cycles": m["gemv_with_normal_cycles"],
               "normal_reads_per_cycle_alone": round(m["normal_rate_alone"], 4),
               "normal_reads_per_cycle_during_gemv": round(m["normal_rate_during_gemv"], 4),
               "pim_wait_cycles": m["pim_wait"], "build_s": m["build_s"], "run_s": m["run_s"],
               "goal": "2 row buffers: share >= 0.5 and GEMV slowdown <= 0.25 (issue 17)"}
