"""Simulation speed of the SoC RTL on Verilator (issue 13).

* ``soc_build_s``: wall time of building the default SoC's simulation (Verilog conversion, Verilator, C++):
  the ``dpi`` builds' rows come from :mod:`sim.benchmarks.socbuild`, which builds them in ``make bench``'s
  shared phase (this module runs alone afterwards and finds them cached); here only the opt-in gate-level one.
* ``soc_sim_cycles_per_s``: simulated cycles per second of wall time on the default GPT-2-small-shaped layer
  (prefill 32 + 1 generated token, ``ianus`` policy), with the FP cells of the long-run build
  (``fp_impl="dpi"``) and, with ``IANUS_BENCH_RTL_CELLS=1``, the same job on the gate-level FP cells
  (``fp_impl="rtl"``, the build every SoC run used before) for the ratio (both runs must give the same cycles
  and the same bits). That build (66 MB of C++, ~10 minutes of compiling here) is not in the default run, to
  keep ``make bench`` inside its 30 minutes; its figures are in the README.
* ``soc_sim_cycles_per_s_behav_pim``: the same job with the behavioural PIM channels (``pim_impl="behav"``,
  :mod:`hw.pim.behav`, dpi FP cells), and ``soc_sim_speedup_behav_pim`` its ratio to the RTL device's run;
  both runs must give the same cycles and the same bits. Every speed row also gives ``cpu_s`` (the
  simulator process's CPU time) and ``cycles_per_cpu_s``.
* ``gpt2_small_rtl_wall_s``: the 12 decoder layers of GPT-2 small (seeded random weights with its shapes),
  prompt of 32 tokens then 8 generated, on the default configuration's RTL, after the build, with whichever
  PIM device simulated the layer faster (``pim_impl`` in the row); outputs checked bit for bit against the
  functional model running the same programs.

Wall-clock figures depend on the machine's load: run ``make bench`` on a quiet machine.
"""

from __future__ import annotations

import multiprocessing
import os
import resource
import time
from concurrent.futures import ProcessPoolExecutor

import numpy as np

from firmware.runtime import read_outputs
from sim.run import prepare, run_backend
from sim.soc_model import run_job


def _build(fp_impl: str, pim_impl: str = "rtl"):
    from hw.config import preset
    from sim.tb.soc_run import soc_sim_build

    t0 = time.perf_counter()
    b = soc_sim_build(preset("default"), "verilator", fp_impl=fp_impl, pim_impl=pim_impl)
    return b, time.perf_counter() - t0


def _children_cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def _run(config, layers, prefill, gen, fp_impl, name, pim_impl="rtl"):
    """Run the job on the SoC simulation; returns (cm, job, outputs, results, wall s, simulator CPU s)."""
    cm, job, _, _ = prepare(config, "ianus", layers, prefill, gen)
    env = {"SOC_FP_IMPL": fp_impl, "SOC_PIM_IMPL": pim_impl}
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        cpu0 = _children_cpu()
        t0 = time.perf_counter()
        out, res, _ = run_backend(job, "verilator", test_name=name)
        wall = time.perf_counter() - t0
        cpu = _children_cpu() - cpu0
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    return cm, job, out, res, wall, cpu


def _model_outputs(layers, prefill, gen):
    """The functional model's outputs of the same job (the reference the RTL run must equal bit for bit)."""
    cm, mjob, _, _ = prepare("default", "ianus", layers, prefill, gen)
    m = run_job(mjob)
    return read_outputs(cm, m.read)


EXCLUSIVE = True
"""Its figures are wall-clock speeds: ``make bench`` runs it alone (:mod:`sim.bench`)."""


def run(quick: bool = False):
    impls = ("dpi", "rtl") if os.environ.get("IANUS_BENCH_RTL_CELLS") == "1" and not quick else ("dpi",)
    speed = {}
    for fp in impls:
        b, build_s = _build(fp)           # make bench: built by the socbuild module (or the gate-level cells)
        if fp != "dpi":
            yield {"name": "soc_build_s", "value": round(build_s, 1), "unit": "s", "config": "default",
                   "fp_impl": fp, "reused": b.reused, "note": "Verilog + Verilator + C++ (ccache as found)"}
        cm, job, out, res, wall, cpu = _run("default", 1, 32, 1, fp, f"bench_simspeed_{fp}")
        cycles = sum(r["cycles"] for r in res)
        speed[fp] = (cycles, out, wall, [r["cycles"] for r in res])
        yield {"name": "soc_sim_cycles_per_s", "value": round(cycles / wall), "unit": "cycles/s", "config": "default",
               "fp_impl": fp, "pim_impl": "rtl", "cycles": cycles, "wall_s": round(wall, 1), "cpu_s": round(cpu, 1),
               "cycles_per_cpu_s": round(cycles / max(cpu, 1e-9)),
               "note": "GPT-2-small-shaped layer, prefill 32 + 1 token, ianus; wall time incl. simulator start"}
    if "rtl" in speed:
        (c1, o1, w1, _), (c2, o2, w2, _) = speed["dpi"], speed["rtl"]
        yield {"name": "soc_sim_speedup_dpi_vs_rtl_cells", "value": round(w2 / w1, 2), "unit": "x",
               "same_cycles": c1 == c2, "same_bits": bool(np.array_equal(o1.view(np.uint32), o2.view(np.uint32)))}
    # The behavioural PIM channels (hw/pim/behav.py) on the same job.
    _build("dpi", "behav")                # make bench: built by the socbuild module (its soc_build_s rows)
    cm, job, out, res, wall, cpu = _run("default", 1, 32, 1, "dpi", "bench_simspeed_behav_pim", "behav")
    cycles = sum(r["cycles"] for r in res)
    yield {"name": "soc_sim_cycles_per_s_behav_pim", "value": round(cycles / wall), "unit": "cycles/s",
           "config": "default", "fp_impl": "dpi", "pim_impl": "behav", "cycles": cycles, "wall_s": round(wall, 1),
           "cpu_s": round(cpu, 1), "cycles_per_cpu_s": round(cycles / max(cpu, 1e-9)),
           "note": "as soc_sim_cycles_per_s, PIM channels behavioural (cycle- and bit-exact)"}
    c1, o1, w1, per1 = speed["dpi"]
    yield {"name": "soc_sim_speedup_behav_pim", "value": round(w1 / wall, 2), "unit": "x",
           "same_cycles": per1 == [r["cycles"] for r in res],
           "same_bits": bool(np.array_equal(o1.view(np.uint32), out.view(np.uint32))),
           "note": "wall time of the RTL device's run / the behavioural device's (dpi FP cells both)"}
    if quick:
        return
    fastest = "behav" if wall < w1 else "rtl"
    layers, prefill, gen = 12, 32, 8
    # The functional model's reference (about 4 minutes of Python for 12 layers) runs in another process on
    # the other core while the simulator (one thread) runs: the two do not share a core.
    with ProcessPoolExecutor(max_workers=1, mp_context=multiprocessing.get_context("spawn")) as pool:
        ref_future = pool.submit(_model_outputs, layers, prefill, gen)
        cm, job, out, res, wall, cpu = _run("default", layers, prefill, gen, "dpi", "bench_gpt2_small_12", fastest)
        ref = ref_future.result()
    cycles = sum(r["cycles"] for r in res)
    gen_cycles = sum(r["cycles"] for r in res if " prefill@" not in r["name"])
    mhz = cm.cfg.clocks.pim_mhz
    yield {"name": "gpt2_small_rtl_wall_s", "value": round(wall, 1), "unit": "s", "layers": layers, "prompt": prefill,
           "generated": gen, "cycles": cycles, "sim_cycles_per_s": round(cycles / wall), "pim_impl": fastest,
           "cpu_s": round(cpu, 1),
           "tokens_per_s_simulated": round(gen / (gen_cycles / (mhz * 1e6)), 1),
           "bit_exact_vs_model": bool(np.array_equal(out.view(np.uint32), ref.view(np.uint32))),
           "note": f"default config, ianus policy, Verilator, after the build; PIM device {fastest} (the faster "
                   "on the one-layer job); the functional model's reference ran meanwhile on the other core"}
