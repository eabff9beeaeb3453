"""Projection benchmarks (``ianus project``, :mod:`sim.project`): wall time of the GPT-2 XL projection
(48 layers, 128 input tokens, 64 output tokens) and the projected latencies of every model under both
policies on the ``ianus`` preset (input 128, output 64)."""

from __future__ import annotations

import time

from sim.project import MODELS, POLICIES, project

N_IN, N_OUT = 128, 64


EXCLUSIVE = True
"""Its figures include wall-clock times: ``make bench`` runs it alone (:mod:`sim.bench`)."""


def run(quick: bool = False):
    models = ("xl",) if quick else MODELS
    for model in models:
        for policy in POLICIES:
            t0 = time.perf_counter()
            p = project(model, policy, N_IN, N_OUT)
            wall = time.perf_counter() - t0
            s = p.summary(N_OUT)
            if model == "xl":
                yield {"name": "proj_xl_wall_s", "value": round(wall, 2), "unit": "s", "model": model,
                       "policy": policy, "input": N_IN, "output": N_OUT, "layers": p.shape.layers,
                       "note": "one policy: compile one layer per (phase, position) + performance model"}
            yield {"name": "proj_gen_ms_per_token", "value": round(s["gen_ms_per_token"], 4), "unit": "ms",
                   "model": model, "policy": policy, "input": N_IN, "output": N_OUT}
            yield {"name": "proj_summarization_ms", "value": round(s["summarization_ms"], 3), "unit": "ms",
                   "model": model, "policy": policy, "input": N_IN}
            yield {"name": "proj_gen_mJ_per_token", "value": round(s["gen_mJ_per_token"], 3), "unit": "mJ",
                   "model": model, "policy": policy, "input": N_IN, "output": N_OUT}
