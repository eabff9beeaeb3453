"""SoC end to end on Verilator: a GPT-2-small-shaped layer (default config), ianus vs npu-mem.

``ianus``: prefill 32 + 4 generated tokens; ``npu-mem`` (no PIM, weights row-major): prefill 32 + 1
generated token, all on the RTL. Reports the measured per-token generation speedup, the prefill ratio
(npu-mem cycles / ianus cycles), the cycles and the simulation speed. ``--quick``: the tiny config.
"""

from __future__ import annotations

import time

from sim.run import prepare, run_backend

EXPECTED_S = 110
"""Wall seconds measured here (make bench starts the longest modules first). Its figures are cycle counts,
so it runs in the shared phase beside other modules; its ``wall_s`` / ``sim_cycles_per_s`` fields are taken
there (``phase``: shared) and are not the simulation-speed figures, which module ``simspeed`` measures
alone."""


def _cycles(results, phase):
    return sum(r["cycles"] for r in results if (" prefill@" in r["name"]) == (phase == "prefill"))


def run(quick: bool = False):
    config = "tiny" if quick else "default"
    prefill = 8 if quick else 32
    out = {}
    for policy, gen in (("ianus", 4), ("npu-mem", 1)):
        cm, job, _, _ = prepare(config, policy, 1, prefill, gen)
        t0 = time.perf_counter()
        _, res, _ = run_backend(job, "verilator", test_name=f"bench_soc_{policy}_{config}")
        wall = time.perf_counter() - t0
        pre, g = _cycles(res, "prefill"), _cycles(res, "gen")
        out[policy] = (pre, g / gen)
        yield {"name": "soc_layer_cycles", "value": pre + g, "unit": "cycles", "policy": policy, "config": config,
               "prefill_cycles": pre, "gen_cycles_per_token": round(g / gen), "generated": gen,
               "wall_s": round(wall, 1), "sim_cycles_per_s": round((pre + g) / wall), "phase": "shared"}
    yield {"name": "ianus_vs_npu_mem_generation_speedup", "value": round(out["npu-mem"][1] / out["ianus"][1], 3),
           "unit": "x", "config": config, "note": "npu-mem cycles per generated token / ianus cycles per token"}
    yield {"name": "ianus_vs_npu_mem_prefill_ratio", "value": round(out["npu-mem"][0] / out["ianus"][0], 3),
           "unit": "x", "config": config, "note": "npu-mem prefill cycles / ianus prefill cycles (both on the "
                                                   "matrix unit; ianus reads the PIM weight layout)"}
