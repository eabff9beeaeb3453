"""Builds of the default SoC simulation that the exclusive ``simspeed`` module times runs on (issue 13).

``soc_build_s`` rows: wall time of building the default SoC's Verilator model with the RTL PIM device and with
the behavioural PIM channels (both with the ``dpi`` FP cells: Verilog conversion, Verilator, C++, from whatever
compiler cache the machine has; ``reused`` when the build was already cached, e.g. by ``neupims_rtl``). They run
in ``make bench``'s shared phase, beside another module (the build is not a speed figure to be taken alone), so
that ``simspeed``, which runs alone, spends its time simulating (:mod:`sim.bench`: its 30-minute budget).
"""

from __future__ import annotations

EXPECTED_S = 200
"""Wall seconds of both builds from a cold cache here (the behavioural one 116-185 s)."""


def run(quick: bool = False):
    from sim.benchmarks.simspeed import _build

    for pim in ("rtl", "behav"):
        b, build_s = _build("dpi", pim)
        yield {"name": "soc_build_s", "value": round(build_s, 1), "unit": "s", "config": "default", "fp_impl": "dpi",
               "pim_impl": pim, "reused": b.reused,
               "note": "Verilog + Verilator + C++ (ccache as found); make bench: beside another module"}
