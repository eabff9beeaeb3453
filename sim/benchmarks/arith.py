"""Simulator speed on the arithmetic testbenches: Verilator and Icarus cycles per second."""

from __future__ import annotations

import json
import os
import tempfile

from hw.mac_unit import MacUnit
from sim.build import build

EXCLUSIVE = True
"""Its figures include wall-clock times: ``make bench`` runs it alone (:mod:`sim.bench`)."""


def _cycles_per_s(sim: str, n_dots: int, max_cols: int):
    b = build(lambda: MacUnit(16), name="mac_unit", key="lanes=16", sim=sim)
    with tempfile.TemporaryDirectory() as tmp:
        metrics = os.path.join(tmp, "m.jsonl")
        b.run("sim.tb.arith_tb", "mac_unit_random", test_name=f"bench_mac_{sim}",
              env={"N_DOTS": n_dots, "MAX_COLS": max_cols, "MAC_LATENCY": MacUnit.latency_for(16),
                   "IANUS_METRICS": metrics})
        m = [json.loads(line) for line in open(metrics)][-1]
    return m["cycles"] / m["seconds"], m


def run(quick: bool = False):
    for sim, dots in (("verilator", 200 if quick else 2000), ("icarus", 10 if quick else 60)):
        rate, m = _cycles_per_s(sim, dots, 64)
        yield {"name": f"{sim}_cycles_per_s", "value": round(rate, 1), "unit": "cycles/s",
               "design": "mac_unit (16 BF16 multipliers + 16-input FP32 adder tree + accumulator)",
               "cycles": m["cycles"], "note": "cocotb drives every cycle; includes Python testbench overhead"}
