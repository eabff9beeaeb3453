"""NeuPIMs batched generation on the SoC RTL (issue 18, RTL side): ``neupims_rtl_throughput_vs_npu_only``.

One generation step of B = 8 requests (``--quick``: 4) of one GPT-2-small-shaped layer (d_model 768, 12 heads,
seeded random weights) on the ``default`` configuration's RTL (Verilator), with the KV lengths of NeuPIMs'
ShareGPT fit scaled to at most 512 tokens (:func:`sim.batch_run.batch_lengths`, seed 0), under the policies
``npu-only`` (attention on the matrix and vector units) and ``naive`` (attention in PIM, one row buffer, no
overlap with the NPU stage); both runs side by side (:func:`sim.batch_run.measure_batch`). Rows:
``neupims_rtl_tokens_per_s`` per policy (B tokens over the step's measured cycles at the configured clock,
bit-exactness of the outputs with the functional model, error against float64, the calibrated performance
model's cycles for the same programs started at the RTL's measured starts) and
``neupims_rtl_throughput_vs_npu_only`` for ``naive`` (the ``neupims`` policy, sub-batch interleaving on two
row buffers, is not built yet).
"""

from __future__ import annotations

import time

EXPECTED_S = 100
"""Wall seconds measured here with the default SoC model built (100.6 s beside a pytest run; make bench starts
the longest modules first)."""

CONFIG = "default"


def run(quick: bool = False):
    from sim.batch_run import measure_batch

    batch = 4 if quick else 8
    t0 = time.perf_counter()
    res = measure_batch(CONFIG, batch, 1, "verilator")
    wall = round(time.perf_counter() - t0, 1)
    for p, r in res.items():
        yield {"name": "neupims_rtl_tokens_per_s", "policy": p, "value": round(r["tokens_per_s"], 1),
               "unit": "tokens/s", "config": r["config"], "batch": batch, "kv_lengths": r["kv_lengths"],
               "cycles_per_step": r["cycles_per_step"][0], "stage_cycles": r["stage_cycles"],
               "bit_exact": r["bit_exact"], "rel_err_vs_float64": round(r["rel_err_vs_float64"], 5),
               "perfmodel_cycles_per_step": round(r["perfmodel_cycles_per_step"][0]),
               "perfmodel_vs_rtl": round(r["perfmodel_cycles_per_step"][0] / r["cycles_per_step"][0] - 1, 4)}
    base, naive = res["npu-only"], res["naive"]
    yield {"name": "neupims_rtl_throughput_vs_npu_only", "policy": "naive",
           "value": round(naive["tokens_per_s"] / base["tokens_per_s"], 3), "unit": "x", "config": CONFIG,
           "batch": batch, "bit_exact": bool(naive["bit_exact"] and base["bit_exact"]), "wall_s": wall,
           "note": "naive (attention in PIM, one row buffer) over npu-only on the same RTL and requests; "
                   "NeuPIMs reports neupims 2.3-2.4x npu-only and 1.6x naive, i.e. naive ~1.4-1.5x npu-only"}
