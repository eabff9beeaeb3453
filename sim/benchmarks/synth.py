"""FPGA figures from the stored synthesis results (``hw/synth_results/<target>.json``, written by ``make synth``).

No synthesis tool is run: for every registered target the Verilog is regenerated (seconds; the SRAM-PIM
unit about a minute) and its sha256 compared with the one the stored result came from. Every row carries
``stale`` (the Verilog or the flow's commands changed since the run: the figures are those of an older
design, still reported), ``verilog_sha256`` (current), ``stored`` (the file) and the command that refreshes
it; a target without a stored result gives one row with ``"missing": true``.

Rows per target: ``synth_ecp5_fmax_mhz`` (when placed and routed; ``synth_ecp5_fmax_mhz_placed`` when routing
did not finish), ``synth_xcup`` (UltraScale+ LUTs, FF/DSP/BRAM36; value None with ``skipped``, the reason, for a
target registered without the UltraScale+ run), ``synth_ecp5`` (ECP5 LUT4, FF/MULT18/DP16KD).
The rows of earlier runs (``fpga_ecp5_fmax_mhz`` / ``fpga_xcup_luts`` of ``mac16``, ``proto_*`` of
``proto_fpga``) are kept with the same fields; issue 15's Fmax rows ``fpga_ecp5_fmax_mhz`` and
``proto_fmax_mhz_ecp5`` (``_placed`` when routing did not finish) are also given for the pipelined forms
``mac16_p4`` and ``proto_fpga_p4`` (the ``target`` field tells them apart). ``vector_fmax_mhz_ecp5``: the 4-lane
vector unit (``vector4``, and its pipelined forms ``vector4_p4`` / ``vector4_p4a4``) against issue 15's goal of
80 MHz (``goal_met``; None without a routed Fmax), with its ECP5 LUT4 / FF / MULT18 / DP16KD.

``IANUS_SYNTH_RUN=1`` runs the flow (``hw.synth.synth``, default place-and-route choice) for missing and stale
targets first: that can take hours.
"""

from __future__ import annotations

import os
import sys

from hw import synth

EXPECTED_S = 130
"""Wall seconds measured here (make bench starts the longest modules first)."""

RUN_ENV = "IANUS_SYNTH_RUN"
DEVICE = "LFE5U-85F CABGA381"
VECTOR_GOAL_MHZ = 80
"""Issue 15's goal for the 4-lane vector unit (``vector4``) on the ECP5."""


def _common(s: dict) -> dict:
    rec = s["record"]
    row = {"target": s["target"], "stale": None if rec is None else s["status"] == "stale",
           "missing": rec is None, "verilog_sha256": s["verilog_sha256"],
           "stored": os.path.relpath(s["path"], synth.ROOT)}
    if rec is None:
        return row
    row.update(date=rec.get("date"), command=rec.get("command"), pnr=rec.get("pnr"))
    if s["status"] == "stale":
        row.update(stale_reason=s["reason"], stored_verilog_sha256=rec.get("verilog_sha256"),
                   note=f"stale: {s['reason']}; refresh with `{rec.get('command')}`")
    return row


def target_rows(s: dict):
    """The rows of one target from :func:`hw.synth.stored`'s answer."""
    rec, c = s["record"], _common(s)
    name = s["target"]
    if rec is None:
        yield {"name": "synth_result", "value": None, "unit": "", **c,
               "note": f"no stored result: run `{synth.reproduce_command(name, name not in synth.NO_PNR)}`"}
        return
    e, x = rec["ecp5"], rec["xcup"]
    if rec.get("pnr"):
        if e.get("fmax_mhz") is not None or not e.get("fmax_placed_mhz"):
            yield {"name": "synth_ecp5_fmax_mhz", "value": e.get("fmax_mhz"), "unit": "MHz", "device": DEVICE,
                   "pnr_status": e.get("pnr_status"), "critical_path": e.get("critical_path"), **c}
        else:
            yield {"name": "synth_ecp5_fmax_mhz_placed", "value": e["fmax_placed_mhz"], "unit": "MHz",
                   "device": DEVICE, "pnr_status": e.get("pnr_status"), **c,
                   "estimate": "nextpnr's estimate after placement; routing did not finish"}
    if "LUT" in x:
        yield {"name": "synth_xcup", "value": x["LUT"], "unit": "LUT", "ff": x["FF"], "dsp": x["DSP"],
               "bram36": x["BRAM36"], "lutram": x.get("LUTRAM"), "carry8": x.get("CARRY8"),
               "share_of_xcvu9p": {k: round(v, 5) for k, v in x["share_of_xcvu9p"].items()},
               "wrapper_ffs": rec.get("wrapper_ffs"), **c}
    else:
        yield {"name": "synth_xcup", "value": None, "unit": "LUT", "skipped": x.get("skipped"), **c}
    yield {"name": "synth_ecp5", "value": e["LUT4"], "unit": "LUT4", "ff": e["FF"], "mult18": e["MULT18X18D"],
           "dp16kd": e["DP16KD"], "dpr16x4": e.get("TRELLIS_DPR16X4"), "wrapper_ffs": rec.get("wrapper_ffs"), **c}
    yield from _legacy_rows(name, rec, c)


def _proto_fmax_rows(e: dict, c: dict):
    if e.get("fmax_mhz"):
        yield {"name": "proto_fmax_mhz_ecp5", "value": e["fmax_mhz"], "unit": "MHz", "device": DEVICE,
               "critical_path": e.get("critical_path"), **c}
    elif e.get("fmax_placed_mhz"):
        yield {"name": "proto_fmax_mhz_ecp5_placed", "value": e["fmax_placed_mhz"], "unit": "MHz",
               "device": DEVICE, **c,
               "estimate": "nextpnr's estimate after placement; routing did not finish: " + e.get("pnr_status", "")}


def _vector_row(rec: dict, c: dict) -> dict:
    """Issue 15's goal for the 4-lane vector unit (``vector4``): placed and routed at ``VECTOR_GOAL_MHZ`` or more.

    ``value`` is the routed Fmax (None for a synthesis-only result or unfinished routing, whose estimate after
    placement is ``fmax_placed_mhz``); ``goal_met`` is None without a routed Fmax."""
    e = rec["ecp5"]
    fmax = e.get("fmax_mhz") if rec.get("pnr") else None
    row = {"name": "vector_fmax_mhz_ecp5", "value": fmax, "unit": "MHz", "device": DEVICE, "lanes": 4,
           "goal_mhz": VECTOR_GOAL_MHZ, "goal_met": None if fmax is None else fmax >= VECTOR_GOAL_MHZ,
           "lut4": e["LUT4"], "ff": e["FF"], "mult18": e["MULT18X18D"], "dp16kd": e["DP16KD"],
           "pnr_status": e.get("pnr_status") if rec.get("pnr") else "synthesis only",
           "critical_path": e.get("critical_path"), **c}
    if fmax is None and e.get("fmax_placed_mhz"):
        row["fmax_placed_mhz"] = e["fmax_placed_mhz"]
    return row


def _legacy_rows(name: str, rec: dict, c: dict):
    """Issue 15's row names: ``fpga_ecp5_fmax_mhz`` for the PIM unit (``mac16``, and its pipelined form
    ``mac16_p4``), ``proto_fmax_mhz_ecp5`` for the prototype's FPGA part (``proto_fpga``, and ``proto_fpga_p4``
    with the registered pick); every row names its ``target``."""
    e, x = rec["ecp5"], rec["xcup"]
    if name == "mac16_p4" and rec.get("pnr"):
        yield {"name": "fpga_ecp5_fmax_mhz", "value": e.get("fmax_mhz"), "unit": "MHz", "device": DEVICE,
               "lut4": e["LUT4"], "ff": e["FF"], "mult18": e["MULT18X18D"], "critical_path": e.get("critical_path"),
               **c}
    elif name == "proto_fpga_p4":
        yield from _proto_fmax_rows(e, c)
    elif name in ("vector4", "vector4_p4", "vector4_p4a4"):       # and its pipelined forms (issue 15)
        yield _vector_row(rec, c)
    if name == "mac16":
        if rec.get("pnr"):
            yield {"name": "fpga_ecp5_fmax_mhz", "value": e.get("fmax_mhz"), "unit": "MHz", "device": DEVICE,
                   "lut4": e["LUT4"], "ff": e["FF"], "mult18": e["MULT18X18D"],
                   "critical_path": e.get("critical_path"), **c}
        yield {"name": "fpga_xcup_luts", "value": x["LUT"], "unit": "LUT", "ff": x["FF"], "dsp": x["DSP"],
               "bram36": x["BRAM36"], "share_of_xcvu9p_lut": round(x["share_of_xcvu9p"]["LUT"], 5), **c}
    elif name == "proto_fpga":
        yield from _proto_fmax_rows(e, c)
        yield {"name": "proto_ecp5_lut4", "value": e["LUT4"], "unit": "LUT4", "ff": e["FF"], "dp16kd": e["DP16KD"],
               **c}
        for key in ("LUT", "FF", "DSP", "BRAM36"):
            yield {"name": f"proto_xcup_{key.lower()}", "value": x[key], "unit": key,
                   "share_of_xcvu9p": round(x["share_of_xcvu9p"][key], 5), **c}


def run(quick: bool = False):
    synth._load_extra_targets()
    allow_run = os.environ.get(RUN_ENV) == "1"
    for name in synth.TARGETS:
        s = synth.stored(name)
        if allow_run and s["status"] != "stored":
            os.environ["PATH"] = os.path.dirname(os.path.abspath(sys.executable)) + os.pathsep + \
                os.environ.get("PATH", "")
            synth.synth(name, pnr=name not in synth.NO_PNR)
            s = synth.stored(name)
        yield from target_rows(s)
