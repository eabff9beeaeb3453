"""PIM device benchmarks: GEMV timing efficiency per GPT-2-small shape (``default`` and the pipelined
``default-p4``), back-door load time."""

from __future__ import annotations

import json
import os
import tempfile
import time

from sim.cli import GPT2_SMALL_FC, run_pim_gemvs

EXCLUSIVE = True
"""Its figures include wall-clock times: ``make bench`` runs it alone (:mod:`sim.bench`)."""


def run(quick: bool = False):
    shapes = [(k, n, act) for _, k, n, act in GPT2_SMALL_FC]
    res = run_pim_gemvs("default", shapes[:1] if quick else shapes)
    for r in res["shapes"]:
        yield {"name": "pim_gemv_efficiency", "value": round(r["efficiency"], 4), "unit": "bound/measured",
               "shape": r["shape"], "config": "default", "cycles": r["cycles"], "bound_cycles": r["bound"],
               "internal_gbps": round(r["internal_gbps"], 1)}
    # The pipelined processing unit (issue 15: 2-stage multipliers, 4-stage adders, 4 interleaved partial sums,
    # tMAC 32 instead of 11): the same shapes against the same bound, which reads tMAC from the configuration.
    res = run_pim_gemvs("default-p4", shapes[:1] if quick else shapes)
    for r in res["shapes"]:
        yield {"name": "pim_gemv_efficiency_p4", "value": round(r["efficiency"], 4), "unit": "bound/measured",
               "shape": r["shape"], "config": "default-p4", "cycles": r["cycles"], "bound_cycles": r["bound"],
               "internal_gbps": round(r["internal_gbps"], 1)}
    from tests.test_pim_device import pim_build

    b = pim_build("default")
    with tempfile.TemporaryDirectory() as tmp:
        metrics = os.path.join(tmp, "m.jsonl")
        t0 = time.perf_counter()
        b.run("sim.tb.pim_tb", "backdoor_layer", test_name="bench_backdoor",
              env={"IANUS_CONFIG": "default", "D_MODEL": 768, "N_SAMPLES": 16, "IANUS_METRICS": metrics})
        wall = time.perf_counter() - t0
        m = [json.loads(line) for line in open(metrics)][-1]
    yield {"name": "pim_backdoor_load_s", "value": round(m["seconds"], 3), "unit": "s",
           "values": m["values"], "file_write_s": round(m["file_seconds"], 3),
           "readmemh_s": round(m["load_seconds"], 3), "whole_test_wall_s": round(wall, 1),
           "note": "GPT-2-small layer FC weights (c_attn, c_proj, c_fc, mlp.c_proj) into the default device"}
