"""HPIM (issue 20): the SRAM-PIM attention unit and the ``hpim`` projection policy.

Rows: ``hpim_gen_speedup_vs_ianus`` (GPT-2 XL, input 512, output 64: ``ianus`` generation ms per token /
``hpim``'s, both from :func:`sim.project.project`), the two policies' ms and mJ per token, hpim's
per-operation breakdown of a generation step (ms per token on the critical path and busy,
:func:`sim.hpim_model.hpim_rows`), the share of the attention compute (SRAM-PIM QK / PV and the
softmax) that is hidden behind the DRAM-PIM work, the SRAM-PIM unit's UltraScale+ / ECP5 synthesis
figures (the stored result of ``python -m hw.synth sram_pim --no-pnr``; a row saying so when it has
not been run) and the energy per MAC of the energy model; then (not with ``--quick``) the policy on the SoC RTL
(``default-hpim``): ``hpim_rtl_gen_speedup_vs_ianus`` from :mod:`sim.hpim_rtl` (bit-exact runs) and the
performance model's error against those runs (``hpim_rtl_model_max_err``).
"""

from __future__ import annotations

import time

from sim.energy import EVENTS
from sim.hpim_model import HPIM_OPS, SramPimSystem, hpim_rows, project_hpim
from sim.project import project

MODEL, N_IN, N_OUT = "xl", 512, 64
EXPECTED_S = 380
"""Wall seconds (make bench starts the longest modules first): 229 s measured with the ``default-hpim`` Verilator
build cached (``python -m sim.bench --only hpim``), plus that build on a fresh clone."""

ATTENTION_COMPUTE = ("qk", "softmax", "pv")


def run(quick: bool = False):
    samples = 4 if quick else 16
    ctx = {"model": MODEL, "input": N_IN, "output": N_OUT, "samples": samples}
    t0 = time.perf_counter()
    ianus = project(MODEL, "ianus", N_IN, N_OUT, samples=samples)
    t1 = time.perf_counter()
    hp = project_hpim(MODEL, N_IN, N_OUT, samples=samples, base=ianus)      # its summarization is ianus's
    t2 = time.perf_counter()
    r = hpim_rows(hp, N_OUT, ianus)
    s = SramPimSystem.for_head_dim(64)
    yield {"name": "hpim_gen_speedup_vs_ianus", "value": round(r["hpim_gen_speedup_vs_ianus"], 3), "unit": "x",
           **ctx, "hpim_ms_per_token": round(r["gen_ms_per_token"], 4),
           "ianus_ms_per_token": round(r["ianus_gen_ms_per_token"], 4), "kv": r["mode"],
           "proj_split_share": r["split_proj"],
           "sram_pim": f"{s.units} units x {s.macros} macros x {s.rows} rows x {s.word_lanes} BF16, "
                       f"{s.mac_lanes} MAC lanes, read latency {s.read_latency}",
           "wall_s": {"ianus": round(t1 - t0, 1), "hpim": round(t2 - t1, 1)}}
    yield {"name": "hpim_gen_ms_per_token", "value": round(r["gen_ms_per_token"], 4), "unit": "ms", **ctx}
    yield {"name": "hpim_gen_mJ_per_token", "value": round(r["gen_mJ_per_token"], 3), "unit": "mJ", **ctx,
           "ianus_mJ_per_token": round(ianus.summary(N_OUT)["gen_mJ_per_token"], 3)}
    for op in HPIM_OPS:
        if r["critical_ms"][op] or r["busy_ms"][op]:
            yield {"name": "hpim_gen_op_ms", "op": op, "value": round(r["critical_ms"][op], 4), "unit": "ms/token",
                   "busy_ms": round(r["busy_ms"][op], 4), **ctx,
                   "note": "value: on the critical path of the intra-token pipeline; busy_ms: the operation's own time"}
    busy = sum(r["busy_ms"][op] for op in ATTENTION_COMPUTE)
    crit = sum(r["critical_ms"][op] for op in ATTENTION_COMPUTE)
    yield {"name": "hpim_attention_hidden_share", "value": round(1 - crit / busy, 4) if busy else None, "unit": "",
           **ctx, "busy_ms": round(busy, 4), "critical_ms": round(crit, 4),
           "note": "share of the SRAM-PIM QK/PV and softmax time hidden behind DRAM-PIM work"}
    yield {"name": "sram_pim_energy_per_mac", "value": EVENTS["sram_pim_mac"].joules * 1e15, "unit": "fJ",
           "source": EVENTS["sram_pim_mac"].source}
    yield from _synth_rows()
    if not quick:
        yield from _rtl_rows()


RTL_CONFIG, RTL_PREFILL, RTL_GENERATE = "default-hpim", 16, 2


def _rtl_rows():
    """The policy on the SoC RTL (``default-hpim``, GPT-2-small-shaped layer): both policies bit-exact with the
    functional model (:func:`sim.hpim_rtl.measure` raises otherwise), generation cycles per token, and the
    calibrated performance model against each run."""
    from sim.hpim_rtl import measure, model_rows

    ctx = {"config": RTL_CONFIG, "prefill": RTL_PREFILL, "generate": RTL_GENERATE}
    runs = {p: measure(RTL_CONFIG, RTL_PREFILL, RTL_GENERATE, p) for p in ("hpim", "ianus")}
    h, i = runs["hpim"], runs["ianus"]
    yield {"name": "hpim_rtl_gen_speedup_vs_ianus", "value": round(i["gen_cycles_per_token"] / h["gen_cycles_per_token"], 4),
           "unit": "x", **ctx, "bit_exact": True,
           "hpim_gen_cycles_per_token": h["gen_cycles_per_token"], "ianus_gen_cycles_per_token": i["gen_cycles_per_token"],
           "hpim_qkv_attn_cycles_per_token": h["qkv_attn_cycles_per_token"],
           "ianus_qkv_attn_cycles_per_token": i["qkv_attn_cycles_per_token"],
           "spu_busy_per_token": h["spu_busy_per_token"],
           "wall_s": {p: round(r["wall_s"], 1) for p, r in runs.items()},
           "note": "ianus / hpim generation cycles per token on the SoC RTL, both bit-exact with the functional model"}
    for p, r in runs.items():
        rows = model_rows(r)
        worst = max(rows, key=lambda x: abs(x["err"]))
        gen = [x for x in rows if " gen@" in x["program"]]
        g_rtl, g_model = sum(x["rtl"] for x in gen), sum(x["model"] for x in gen)
        yield {"name": "hpim_rtl_model_max_err", "policy": p, "value": round(abs(worst["err"]), 4), "unit": "",
               **ctx, "worst_program": worst["program"], "programs": len(rows),
               "gen_rtl_cycles": g_rtl, "gen_model_cycles": round(g_model, 1),
               "note": "performance model vs this RTL run, per program (the calibration bound is 5 %)"}


def _synth_rows():
    from hw import synth

    synth._load_extra_targets()
    res = synth.cached("sram_pim", pnr=False)
    if res is None:
        yield {"name": "sram_pim_synth", "value": None, "unit": "",
               "note": "no stored result for the current Verilog: run `python -m hw.synth sram_pim --no-pnr`"}
        return
    x, e = res["xcup"], res["ecp5"]
    yield {"name": "sram_pim_xcup", "value": {k: x[k] for k in ("LUT", "FF", "DSP", "BRAM36", "LUTRAM", "CARRY8")},
           "unit": "cells", "target": res["target"], "description": res["description"],
           "wrapper_ffs": res["wrapper_ffs"], "share_of_xcvu9p": x["share_of_xcvu9p"]}
    yield {"name": "sram_pim_ecp5", "value": {k: e[k] for k in ("LUT4", "FF", "MULT18X18D", "DP16KD")},
           "unit": "cells", "target": res["target"], "wrapper_ffs": res["wrapper_ffs"]}
