"""Differential fuzzing, RTL (tiny SoC on Verilator) against the functional model, bit for bit (issue 21).

Random valid programs from hypothesis strategies (:mod:`sim.diff_fuzz`: PIM GEMVs of random shape, flags
and weights, matrix-unit GEMMs with their semaphores, vector-queue VLOAD / vector op / VSTORE sequences,
chained through memory, with the fences a correct program needs plus random extra fences), many cases per
simulation, host AXI reads while programs run, the Python protocol checker on every DRAM bus cycle. Every
mismatch names ``seed S case I`` and the command that reproduces it.

``DIFF_FUZZ_SEED`` / ``DIFF_FUZZ_CASES`` override the default batch; the long run (``-m long``, ``make
test-long``) runs ``DIFF_FUZZ_LONG_CASES`` (default 10,000) cases in batches of 500.
"""

import os

import numpy as np
import pytest

from sim import diff_fuzz as D


def _check(seed, cases, pause_pct=0, name=None):
    cs, mism, stats = D.run_batch(seed, cases, test_name=name or f"diff_fuzz_{seed}", pause_pct=pause_pct)
    print(f"seed {seed}: {stats}")
    assert len(cs) == cases
    assert stats["instructions"] > 3 * cases
    msg = "\n".join(f"{m}\n  reproduce: python -m sim.diff_fuzz --seed {seed} --cases {cases}"
                    f"{' --pause-pct %d' % pause_pct if pause_pct else ''} --only {m.case.split()[-1]}"
                    if m.case.startswith("seed") else str(m) for m in mism[:20])
    assert not mism, f"{len(mism)} mismatches between the RTL and the functional model:\n{msg}"
    return stats


def test_generator_is_reproducible_and_valid():
    """The same seed gives the same cases; every generated case runs without error on the model; the
    cases cover every unit, fences, chained inputs and host reads."""
    a = D.batch(7, 40)
    b = D.batch(7, 40)
    assert [(c.program, c.writes) for c in a] == [(c.program, c.writes) for c in b]
    model = D.model_batch(a)
    assert all(r["error"] == 0 for r in model[:-1]), [(c.name, r["error"]) for c, r in zip(a, model[:-1], strict=True)]
    units = {}
    for c in a:
        for k, v in c.units.items():
            units[k] = units.get(k, 0) + v
    assert {"PIM", "MATRIX", "VECTOR", "VLOAD", "VSTORE", "FENCE", "END"} <= set(units), units
    assert sum(len(c.reads) for c in a) > 0
    one = D.batch(7, 40, only=5)
    assert one[0].program == a[5].program


def test_comparison_catches_a_flipped_bit():
    """The comparison is not vacuous: one flipped bit in an RTL output is a mismatch naming the case."""
    cases = D.batch(3, 4)
    model = D.model_batch(cases)
    rtl = [dict(r) for r in model]
    rtl[-1] = {**model[-1], "first_write_landed": True}
    k = next(i for i, c in enumerate(cases) if c.outputs)
    outs = list(rtl[k]["outputs"])
    outs[0] = bytes([outs[0][0] ^ 1]) + outs[0][1:]
    rtl[k] = {**rtl[k], "outputs": outs}
    mism = D.compare(cases, rtl, model)
    assert mism and mism[0].case == cases[k].name, mism
    # A byte past an output's defined bytes (in its last column) is compared too: device memory after
    # the last case covers every byte.
    rtl[-1] = {**model[-1], "final": bytes([model[-1]["final"][0] ^ 1]) + model[-1]["final"][1:]}
    rtl[k] = model[k]
    assert D.compare(cases, rtl, model), "a flipped byte of device memory went unnoticed"
    rtl[-1] = {**model[-1], "first_write_landed": False}
    assert D.compare(cases, rtl, model)[0].what == "first AXI write"


def test_diff_fuzz_tiny_batch():
    """One simulation, DIFF_FUZZ_CASES (default 150) random programs back to back, bit-exact."""
    seed = int(os.environ.get("DIFF_FUZZ_SEED", "20260"))
    _check(seed, int(os.environ.get("DIFF_FUZZ_CASES", "150")))


@pytest.mark.long
def test_diff_fuzz_long():
    """>= 10,000 random programs (batches of 500, one simulation each)."""
    total = int(os.environ.get("DIFF_FUZZ_LONG_CASES", "10000"))
    per = 500
    done = 0
    b = 0
    failures = []
    while done < total:
        n = min(per, total - done)
        seed = 100_000 + b
        try:
            _check(seed, n, name=f"diff_fuzz_long_{b % 2}")
        except AssertionError as exc:
            failures.append(str(exc)[:3000])
        done += n
        b += 1
    assert not failures, "\n".join(failures)


def test_gemv_input_lanes_past_k_are_masked():
    """The fuzzer's finding (seed 20260 case 6), as a regression test: a GEMV of K = 1 whose input vector's
    column holds +Inf after the vector. The model computes x[:1] @ W (finite); the RTL once multiplied the
    padded zero weights by the Inf lanes and returned NaN. The PCU now sends the lanes past K as zero."""
    spec = {"tasks": [{"unit": "pim", "K": 1, "N": 16, "bias": True, "gelu": False, "bf16": False, "nop": False,
                       "extra_in": 0, "read_n": None, "chain": False, "data": 11}],
            "fence_pct": 0, "fence_seed": 0, "reads": 0}
    case = D.build_case(spec, name="gemv lanes past K")
    x_addr = next(w for w in case.program if (w & 0xF) == 7 and ((w >> 32) & 0xFF) == 1) >> 96 & 0xFFFFFFFF
    case.writes = [(a, d[:2] + b"\x80\x7f" * 15 + d[32:]) if a == x_addr else (a, d) for a, d in case.writes]
    model = D.model_batch([case])
    assert np.isfinite(np.frombuffer(model[0]["outputs"][0][:64], "<f4")).all()
    rtl = D.run_rtl_cases([case], "gemv_lanes_past_k")
    mism = D.compare([case], rtl, model)
    assert not mism, "\n".join(map(str, mism))
