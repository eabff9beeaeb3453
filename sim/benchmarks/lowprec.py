"""Low-precision formats on the trained Shakespeare model: held-out perplexity per format.

``lowprec_perplexity`` rows (unit ``perplexity``, lower is better), one per
``format`` and ``numerics`` (:mod:`sim.lm.perplexity`):

* ``float64``: the float64 numpy reference;
* ``golden`` with format ``bf16``, ``w4-int``, ``w4-fp4``, ``w4a8``,
  ``w4a8kv4`` (:data:`firmware.quant.FORMATS`): the numpy forward with the
  SoC's roundings and the format in the four FCs of every layer (4-bit
  formats through the low-precision PIM GEMV's golden model) and, for
  ``kv4``, the INT4 KV cache; ``vs_bf16`` is the relative change against the
  ``bf16`` row (the issue's target: within 5 %);
* ``soc-model`` (format ``bf16``): the compiled decoder layers on the SoC's
  functional model (bit-exact with the RTL).

``lowprec_unit_synth`` rows: the low-precision PIM unit's synthesis figures (UltraScale+ and ECP5 cells, the
stored results of ``python -m hw.synth lowprec_fp4_fp8 lowprec_int4_fp8 lowprec_fp4_bf16 mac16 --no-pnr``; the
ECP5 Fmax where ``python -m hw.synth lowprec_fp4_fp8 --pnr-all`` was run) and
their ratio to the BF16 unit ``mac16``; a row saying so when a result is not stored for the current Verilog.

``lowprec_gemv_speedup`` rows (issue 19): the GPT-2-small FC GEMVs (768x2304, 768x768, 768x3072, 3072x768;
FC1 without GELU on both sides: the 4-bit program has no AF step) on the RTL PIM device, ``value`` = cycles of
the BF16 GEMV on ``default`` (:func:`sim.cli.run_pim_gemvs`) / cycles of the 4-bit GEMV on ``default-w4a8``
(:data:`W4_CONFIG`), both
with refresh charged at its steady-state rate (:func:`firmware.pim.amortized_cycles`: the longer BF16 GEMVs
issue REFs inside, the short 4-bit ones none; ``raw_ratio`` is the ratio of the cycles as measured) (the
same geometry with FP4 weights, FP8 activations, two accumulator slots; :mod:`firmware.pim_lowprec`,
``sim/tb/pim_lowprec_tb.py``: bit-exact against the golden unit model on a sample of outputs, protocol
checker on), one row per shape and one over the four (summed cycles); ``bound_ratio`` is the ratio of the
two lower bounds (:func:`firmware.pim.gemv_lower_bound`, :func:`firmware.pim_lowprec.w4_gemv_lower_bound`).
``--quick``: the first shape only.

All rows use the same windows of the held-out text (4 windows of 128 bytes,
508 predictions; ``--quick``: 1 window). Needs ``build/lm/shakespeare.safetensors``
(``make model``); a full run stores its rows with the hashes of the weights and of the code
(:mod:`sim.lm.stored`, ``sim/lm/results/perplexity.json``), and without the weights the module reports
those stored rows (``stored``, ``stale``); with neither, one error row saying so.
"""

from __future__ import annotations

from firmware.quant import FORMATS
from sim.lm import stored

N_WINDOWS = 4
N_WINDOWS_QUICK = 1


SYNTH_TARGETS = ("lowprec_fp4_fp8", "lowprec_int4_fp8", "lowprec_fp4_bf16")


def _synth_rows():
    from hw import synth

    synth._load_extra_targets()
    base = synth.cached("mac16", pnr=False) or synth.cached("mac16", pnr=True)
    for name in SYNTH_TARGETS:
        res = synth.cached(name, pnr=True) or synth.cached(name, pnr=False)      # with Fmax when placed
        if res is None:
            yield {"name": "lowprec_unit_synth", "value": None, "unit": "", "target": name,
                   "note": f"no stored result for the current Verilog: run `python -m hw.synth {name} --no-pnr`"}
            continue
        x, e = res["xcup"], res["ecp5"]
        row = {"name": "lowprec_unit_synth", "value": {k: x[k] for k in ("LUT", "FF", "DSP", "BRAM36")},
               "unit": "XCVU9P cells", "target": name, "description": res["description"],
               "ecp5": {k: e[k] for k in ("LUT4", "FF", "MULT18X18D", "DP16KD")}, "wrapper_ffs": res["wrapper_ffs"],
               "ff_net_of_wrapper": x["FF"] - res["wrapper_ffs"], "weights_per_column": 64, "weights_per_column_bf16": 16}
        if e.get("fmax_mhz"):
            row["ecp5_fmax_mhz"] = e["fmax_mhz"]
        if base is not None:
            bx = base["xcup"]
            row["vs_mac16"] = {k: round(x[k] / bx[k], 3) for k in ("LUT", "FF", "DSP") if bx[k]}
            # Per weight consumed per cycle (64 vs 16): the cost of a column's worth of weights.
            row["vs_mac16_per_weight"] = {k: round(x[k] / 64 / (bx[k] / 16), 3) for k in ("LUT", "FF", "DSP")
                                          if bx[k]}
        yield row


GEMV_SHAPES = [(768, 2304), (768, 768), (768, 3072), (3072, 768)]
GEMV_TARGET = 3.0
W4_CONFIG = "default-w4a8"
"""The 4-bit device of the bench rows: P3-LLM's W4A8 (FP4 weights with the grid choice, FP8 activations). Its
Verilator model is 33 MB of C++ like the BF16 device's; ``default-w4`` (INT4 x BF16 activations: 64 BF16
multipliers and a 64-input FP32 tree per bank) is 189 MB and took 22 minutes to build here, too long for
``make bench`` (``run_w4_gemvs("default-w4", GEMV_SHAPES)`` measures it)."""
EXPECTED_S = 110
"""Wall seconds here from a cold build cache (the default-w4a8 device build, the GEMVs of both devices): 102 s in
a fresh-clone make bench at e2d5642."""


def run_w4_gemvs(config: str, shapes, check_all: bool = False, quiet: bool = True, pim_impl: str = "rtl") -> dict:
    """4-bit GEMVs ``[(K, N), ...]`` on the PIM device ``config`` (``pim_impl``: the RTL channel or the behavioural
    one, :mod:`hw.pim.behav`); the testbench's metrics (``shapes``)."""
    import contextlib
    import json
    import os
    import tempfile
    import time

    from hw.config import preset
    from hw.pim import device_factory, device_sources
    from sim.build import BUILD_ROOT, build
    from sim.console import Quiet

    cfg = preset(config)
    tag = "" if pim_impl == "rtl" else f"_{pim_impl}"
    log = str(BUILD_ROOT / "logs" / f"w4_gemv_{config}{tag}.log")
    with tempfile.TemporaryDirectory() as tmp, (Quiet(log) if quiet else contextlib.nullcontext()):
        t0 = time.perf_counter()
        b = build(device_factory(cfg), name=f"pim_device_{config}", key=repr(cfg), sim="verilator",
                  extra_sources=tuple(device_sources(cfg, pim_impl=pim_impl)), no_inline=("pim_bank_*",))
        build_s = time.perf_counter() - t0
        metrics = os.path.join(tmp, "metrics.jsonl")
        env = {"IANUS_CONFIG": config, "GEMV_SHAPES": ",".join(f"{k}x{n}" for k, n in shapes),
               "IANUS_METRICS": metrics, "CHECK_ALL": int(check_all)}
        t0 = time.perf_counter()
        b.run("sim.tb.pim_lowprec_tb", "w4_gemv", env=env, test_name=f"bench_w4_gemv_{config}{tag}")
        wall = time.perf_counter() - t0
        result = [json.loads(line) for line in open(metrics)][-1]
    result.update(wall_s=wall, build_s=build_s)
    return result


def _gemv_rows(quick):
    from firmware.pim import gemv_lower_bound
    from firmware.pim_lowprec import w4_gemv_lower_bound
    from hw.config import preset
    from sim.cli import run_pim_gemvs

    shapes = GEMV_SHAPES[:1] if quick else GEMV_SHAPES
    bf = run_pim_gemvs("default", [(k, n, False) for k, n in shapes])
    w4 = run_w4_gemvs(W4_CONFIG, shapes)
    cb, cw = preset("default"), preset(W4_CONFIG)
    tot = {"bf16": 0, "w4": 0, "bf16_bound": 0, "w4_bound": 0, "bf16_am": 0.0, "w4_am": 0.0}
    for (k, n), rb, rw in zip(shapes, bf["shapes"], w4["shapes"], strict=True):
        bb, bw = gemv_lower_bound(cb, k, n)["cycles"], w4_gemv_lower_bound(cw, k, n)["cycles"]
        for key, v in (("bf16", rb["cycles"]), ("w4", rw["cycles"]), ("bf16_bound", bb), ("w4_bound", bw),
                       ("bf16_am", rb["amortized_cycles"]), ("w4_am", rw["amortized_cycles"])):
            tot[key] += v
        yield {"name": "lowprec_gemv_speedup", "value": round(rb["amortized_cycles"] / rw["amortized_cycles"], 3),
               "unit": "x (bf16 cycles / w4 cycles)", "shape": f"{k}x{n}", "bf16_cycles": rb["cycles"],
               "w4_cycles": rw["cycles"], "bf16_refreshes": rb["refreshes"], "w4_refreshes": rw["refreshes"],
               "raw_ratio": round(rb["cycles"] / rw["cycles"], 3), "bf16_config": "default", "w4_config": W4_CONFIG,
               "bound_ratio": round(bb / bw, 3), "bf16_bound_cycles": bb, "w4_bound_cycles": bw,
               "w4_units_per_row": rw["per_row"], "w4_rows": rw["rows"], "target": GEMV_TARGET,
               "note": "RTL device, protocol checker on; FC1 without GELU on both sides"}
    yield {"name": "lowprec_gemv_speedup", "value": round(tot["bf16_am"] / tot["w4_am"], 3),
           "unit": "x (bf16 cycles / w4 cycles)", "shape": "+".join(f"{k}x{n}" for k, n in shapes),
           "bf16_cycles": tot["bf16"], "w4_cycles": tot["w4"], "raw_ratio": round(tot["bf16"] / tot["w4"], 3),
           "bf16_config": "default", "w4_config": W4_CONFIG,
           "bound_ratio": round(tot["bf16_bound"] / tot["w4_bound"], 3), "target": GEMV_TARGET,
           "w4_sim_wall_s": round(w4["wall_s"], 1), "w4_build_s": round(w4["build_s"], 1),
           "note": "summed over the shapes"}


def run(quick=False):
    yield from _synth_rows()
    yield from _gemv_rows(quick)
    from sim.lm import data
    from sim.lm.model import DEFAULT_WEIGHTS, load
    from sim.lm.perplexity import evaluate, windows

    if not DEFAULT_WEIGHTS.exists():
        yield from _stored_rows()
        return
    lm = load(DEFAULT_WEIGHTS)
    wins = windows(data.heldout(DEFAULT_WEIGHTS.parent), N_WINDOWS_QUICK if quick else N_WINDOWS, lm.cfg.n_ctx)
    common = {"windows": len(wins), "model": f"{lm.cfg.layers}x{lm.cfg.d_model} byte-level GPT-2, Shakespeare"}

    def row(fmt, numerics, r, **extra):
        return {"name": "lowprec_perplexity", "value": round(r["perplexity"], 5), "unit": "perplexity",
                "format": fmt, "numerics": numerics, "tokens": r["tokens"], "nll_nats": round(r["nll"], 6),
                "bits_per_byte": round(r["bits_per_byte"], 5), "wall_s": round(r["wall_s"], 1), **common, **extra}

    rows = [row("float64", "float64", evaluate(lm, wins, numerics="float64"))]
    yield rows[-1]
    base = None
    for fmt in FORMATS:
        r = evaluate(lm, wins, fmt, "golden")
        if fmt == "bf16":
            base = r["perplexity"]
        rows.append(row(fmt, "golden", r, vs_bf16=round(r["perplexity"] / base - 1, 6)))
        yield rows[-1]
    r = evaluate(lm, wins, "bf16", "soc-model")
    rows.append(row("bf16", "soc-model", r, vs_bf16=round(r["perplexity"] / base - 1, 6)))
    yield rows[-1]
    if not quick:           # for clones without the weights (sim/lm/stored.py)
        stored.save(rows, DEFAULT_WEIGHTS)


def _stored_rows():
    """The rows stored by the last full run on the trained weights, marked stored / stale."""
    from sim.lm.model import DEFAULT_WEIGHTS

    rec = stored.load()
    st, reason = stored.status(rec)
    if rec is None:
        yield {"name": "lowprec_perplexity_error", "value": 1, "unit": "error",
               "error": f"{DEFAULT_WEIGHTS} is missing (run `make model` to train it) and no results are stored "
                        f"in {stored.rel(stored.STORE)}"}
        return
    for r in rec["rows"]:
        yield {**r, "stored": stored.rel(stored.STORE), "stale": st == "stale",
               "weights_sha256": rec["weights_sha256"], "stored_date": rec.get("date"),
               "note": f"stored result ({DEFAULT_WEIGHTS} not here: `{stored.COMMAND}` recomputes it)"
                       + (f"; stale: {reason}" if reason else "")}
