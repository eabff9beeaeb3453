"""Achieved time / physical lower bound per operation (:mod:`sim.bounds`, issue 14).

``proj_op_bound_ratio``: per (model, policy, phase, op) of the projection (``ianus`` preset; GPT-2 XL and
2.5B, inputs 128 / 256 / 512, output 64): the projection's time of the operation over its lower bound
(op ``total``: the whole phase over the phase's pooled bound). ``proj_summarization_vs_npu_mem``: ianus
summarization time / npu-mem summarization time; ``proj_gen_speedup_vs_npu_mem``: npu-mem ms per token /
ianus ms per token. ``rtl_stage_bound_ratio``: per stage of the RTL's default layer, the stored RTL cycles
(``sim/calibration/default.json``) over the stage's bound (generation: mean over the steps);
``model_default_op_bound_ratio``: the same layer per operation on the calibrated performance model.
Rows of the projection carry ``timing``: ``cached`` (the default: a paper-scale DMA transfer's timing is reused
by shape, ``Micro.cache``) or ``exact`` (every request timed, :data:`EXACT` only); ``proj_cache_error`` is
cached / exact - 1 for the summarization time and the generation time per token of both policies.
"""

from __future__ import annotations

from sim import bounds as bnd
from sim.project import project

EXPECTED_S = 330
"""Wall seconds measured here (make bench starts the longest modules first)."""

MODELS = ("xl", "2.5b")
INPUTS = (128, 256, 512)
N_OUT = 64
_CACHE: dict = {}


EXACT = (("xl", 128),)
"""(model, input) also projected with every DMA request timed (``project(..., exact=True)``): their rows
carry ``timing: exact``, and ``proj_cache_error`` says how far the default (cached) timing is from it."""


def _projection(model, policy, n_in, n_out, exact=False):
    key = (model, policy, n_in, n_out, exact)
    if key not in _CACHE:
        _CACHE[key] = project(model, policy, n_in, n_out, exact=exact)
    return _CACHE[key]


def _rows(model, n_in, exact):
    timing = "exact" if exact else "cached"
    summ = {}
    for policy in ("ianus", "npu-mem"):
        p = _projection(model, policy, n_in, N_OUT, exact)
        s = p.summary(N_OUT)
        summ[policy] = s
        for r in bnd.projection_rows(p, N_OUT):
            if r["ratio"] is None:
                continue
            yield {"name": "proj_op_bound_ratio", "value": round(r["ratio"], 3), "unit": "x",
                   "model": model, "policy": policy, "phase": r["phase"], "op": r["op"], "input": n_in,
                   "output": N_OUT, "achieved_ms": round(r["achieved_ms"], 4),
                   "bound_ms": round(r["bound_ms"], 4), "limit": r["limit"], "timing": timing,
                   "note": "generation in ms per generated token"}
    a, b = summ["ianus"], summ["npu-mem"]
    yield {"name": "proj_summarization_vs_npu_mem",
           "value": round(a["summarization_ms"] / b["summarization_ms"], 3), "unit": "x", "model": model,
           "input": n_in, "ianus_ms": round(a["summarization_ms"], 3), "timing": timing,
           "npu_mem_ms": round(b["summarization_ms"], 3), "note": "ianus time / npu-mem time (lower is better)"}
    yield {"name": "proj_gen_speedup_vs_npu_mem",
           "value": round(b["gen_ms_per_token"] / a["gen_ms_per_token"], 3), "unit": "x", "model": model,
           "input": n_in, "output": N_OUT, "ianus_ms_per_token": round(a["gen_ms_per_token"], 4),
           "npu_mem_ms_per_token": round(b["gen_ms_per_token"], 4), "timing": timing}


def run(quick: bool = False):
    models = ("xl",) if quick else MODELS
    inputs = (128,) if quick else INPUTS
    for model in models:
        for n_in in inputs:
            yield from _rows(model, n_in, False)
    for model, n_in in EXACT:
        yield from _rows(model, n_in, True)
        for policy in ("ianus", "npu-mem"):
            c = _projection(model, policy, n_in, N_OUT).summary(N_OUT)
            e = _projection(model, policy, n_in, N_OUT, True).summary(N_OUT)
            for k in ("summarization_ms", "gen_ms_per_token"):
                yield {"name": "proj_cache_error", "value": round(c[k] / e[k] - 1, 4), "unit": "fraction",
                       "model": model, "policy": policy, "input": n_in, "output": N_OUT, "figure": k,
                       "cached": round(c[k], 4), "exact": round(e[k], 4),
                       "note": "default projection (a transfer's timing reused by shape) / every request timed - 1"}
    # The RTL's default layer: stored RTL cycles per stage, and the performance model per operation.
    from sim import calibrate
    from sim.run import DEFAULT_SHAPE, soc_config

    data = calibrate.stored("default")
    for j in (data or {}).get("jobs", []):
        if j["layers"] != 1:
            continue
        rows = bnd.rtl_stage_ratios(soc_config("default"), DEFAULT_SHAPE, j["policy"], j["prefill"], j["programs"])
        agg = {}
        for r in rows:
            a = agg.setdefault((r["phase"], r["stage"]), [0.0, 0.0, r["limit"]])
            a[0] += r["cycles"]
            a[1] += r["bound"]
        for (phase, stage), (cyc, b, lim) in agg.items():
            yield {"name": "rtl_stage_bound_ratio", "value": round(cyc / b, 3), "unit": "x", "config": "default",
                   "policy": j["policy"], "phase": phase, "stage": stage, "limit": lim,
                   "job": j["key"], "source": f"sim/calibration/default.json (commit {data.get('commit')})"}
    if not quick:
        ops, _ = bnd.default_bounds()
        for r in ops:
            if r["ratio"] is None:
                continue
            yield {"name": "model_default_op_bound_ratio", "value": round(r["ratio"], 3), "unit": "x",
                   "config": "default", "policy": r["policy"], "phase": r["phase"], "op": r["op"],
                   "cycles": round(r["achieved_cycles"]), "bound_cycles": round(r["bound_cycles"]), "limit": r["limit"],
                   "note": "performance model, prefill 32; generation per step"}
