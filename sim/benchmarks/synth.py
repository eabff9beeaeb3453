"""FPGA figures from the synthesis flow (hw/synth.py; cached by the Verilog, so re-runs are instant)."""

from __future__ import annotations

import os

from hw import synth


def run(quick: bool = False):
    os.environ["PATH"] = os.path.dirname(os.path.abspath(__import__("sys").executable)) + os.pathsep + \
        os.environ.get("PATH", "")
    synth._load_extra_targets()
    r = synth.synth("mac16", pnr=True)
    e, x = r["ecp5"], r["xcup"]
    yield {"name": "fpga_ecp5_fmax_mhz", "value": e["fmax_mhz"], "unit": "MHz", "target": "mac16",
           "device": "LFE5U-85F CABGA381", "lut4": e["LUT4"], "ff": e["FF"], "mult18": e["MULT18X18D"],
           "note": "critical path: the single-cycle FP32 accumulator loop"}
    yield {"name": "fpga_xcup_luts", "value": x["LUT"], "unit": "LUT", "target": "mac16", "ff": x["FF"],
           "dsp": x["DSP"], "bram36": x["BRAM36"], "share_of_xcvu9p_lut": round(x["share_of_xcvu9p"]["LUT"], 5)}
    # Place and route of the prototype part takes longer than a bench run: its stored result (from
    # `python -m hw.synth proto_fpga --pnr-all`) is used when it matches the current Verilog.
    r = synth.cached("proto_fpga", pnr=True) or synth.synth("proto_fpga", pnr=False)
    e, x = r["ecp5"], r["xcup"]
    if e.get("fmax_mhz"):
        yield {"name": "proto_fmax_mhz_ecp5", "value": e["fmax_mhz"], "unit": "MHz", "target": "proto_fpga",
               "device": "LFE5U-85F CABGA381"}
    elif e.get("fmax_placed_mhz"):
        yield {"name": "proto_fmax_mhz_ecp5_placed", "value": e["fmax_placed_mhz"], "unit": "MHz",
               "target": "proto_fpga", "device": "LFE5U-85F CABGA381",
               "note": "nextpnr's estimate after placement; routing did not finish: " + e.get("pnr_status", "")}
    yield {"name": "proto_ecp5_lut4", "value": e["LUT4"], "unit": "LUT4", "target": "proto_fpga", "ff": e["FF"],
           "dp16kd": e["DP16KD"]}
    for key in ("LUT", "FF", "DSP", "BRAM36"):
        yield {"name": f"proto_xcup_{key.lower()}", "value": x[key], "unit": key, "target": "proto_fpga",
               "share_of_xcvu9p": round(x["share_of_xcvu9p"][key], 5)}
