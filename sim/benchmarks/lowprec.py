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


def run(quick=False):
    yield from _synth_rows()
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
