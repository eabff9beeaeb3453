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
    # Synthesis only: nextpnr-ecp5 did not place this target within 50 minutes (proto_fmax_mhz_ecp5 is
    # reported once `python -m hw.synth proto_fpga --pnr-all` has produced it).
    r = synth.synth("proto_fpga", pnr=False)
    e, x = r["ecp5"], r["xcup"]
    if e.get("fmax_mhz"):
        yield {"name": "proto_fmax_mhz_ecp5", "value": e["fmax_mhz"], "unit": "MHz", "target": "proto_fpga"}
    yield {"name": "proto_ecp5_lut4", "value": e["LUT4"], "unit": "LUT4", "target": "proto_fpga", "ff": e["FF"],
           "dp16kd": e["DP16KD"]}
    for key in ("LUT", "FF", "DSP", "BRAM36"):
        yield {"name": f"proto_xcup_{key.lower()}", "value": x[key], "unit": key, "target": "proto_fpga",
               "share_of_xcvu9p": round(x["share_of_xcvu9p"][key], 5)}
