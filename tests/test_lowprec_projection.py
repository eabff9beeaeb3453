"""4-bit PIM weights in the performance model and the projection (issue 19, projection side).

The performance model's PCU issues the 4-bit GEMV command program of :mod:`firmware.pim_lowprec` (the same
program the device RTL runs in ``tests/test_pim_lowprec.py``) with the device's timing rules; these tests hold
it against that program's row-timing lower bound, against the BF16 GEMV of the same shape, and check the
compiler / runtime plumbing for a 4-bit device.
"""

import pytest

from firmware.compiler import ProgramBuilder
from firmware.pim import gemv_lower_bound
from firmware.pim_lowprec import w4_gemv_lower_bound
from hw.config import preset
from hw.spec.macro import MacroFlag, MacroOp
from hw.spec.soc_isa import Unit


def _w4(base="default", fmt="int4", acts="bf16", group=128, **extra):
    tmac = 18 if acts == "bf16" else 8
    if fmt == "fp4":
        extra["pim.grid_choice"] = True
    return preset(base).replace(name=f"{base}-test-w4", **{
        "pim.weight_format": fmt, "pim.act_format": acts, "pim.acc_slots": 2, "pim.quant_group": group,
        "timing.tMAC": tmac, **extra})


def _gemv_cycles(cfg, K, N, flags=0):
    """One GEMV macro alone (its WRITE_VEC before, READ_RES after, timed separately) on the performance model."""
    from sim.perfmodel import PerfModel, decode_program

    pb = ProgramBuilder(cfg)
    pb.pim(op=MacroOp.GEMV, n=K, m=N, row=0, addr0=0, flags=int(flags))
    pb.fence(Unit.PCU)
    pb.end()
    r = PerfModel(cfg).run_program(None, ins=decode_program(pb.words))
    return r


@pytest.mark.parametrize("K,N", [(768, 768), (768, 3072), (3072, 768), (768, 2304)])
def test_w4_gemv_model_near_its_bound_and_faster_than_bf16(K, N):
    cfg = _w4()
    r = _gemv_cycles(cfg, K, N)
    bound = w4_gemv_lower_bound(cfg, K, N)
    # The program's cycles, first command to last result, with the PCU's macro overheads around them: never
    # below the bound, and the PCU issues it nearly back to back (the BF16 GEMV macro: 1.02-1.06x).
    assert r.cycles >= bound["cycles"]
    assert r.cycles <= 1.3 * bound["amortized_cycles"] + 200, (r.cycles, bound)
    bf = _gemv_cycles(preset("default"), K, N)
    assert bf.cycles >= gemv_lower_bound(preset("default"), K, N)["cycles"]
    # 4x fewer weight columns; row opens shared by several tiles: at least 2.5x (issue 19 asks 3x on the RTL).
    assert bf.cycles / r.cycles >= 2.5, (bf.cycles, r.cycles)
    assert r.events["pim_mac_cols"] > 0


def test_w4_gemv_fp4_grid_choice_loads_selectors():
    K, N = 768, 3072
    i4 = _gemv_cycles(_w4(), K, N)
    f4 = _gemv_cycles(_w4(fmt="fp4"), K, N)
    # One LDSLAB beside every LDSCAB: K / 128 groups -> one scale and one selector column per unit.
    assert f4.events["pim_mac_cols"] > i4.events["pim_mac_cols"]
    assert f4.cycles >= i4.cycles


def test_w4_gemv_with_gelu_is_refused():
    with pytest.raises(ValueError, match="no activation function"):
        _gemv_cycles(_w4(), 768, 3072, MacroFlag.GELU)


def test_projection_w4_speeds_up_generation_only():
    from firmware.gpt2 import GptShape
    from sim.project import project

    shape = GptShape(512, 8, 4)
    base = preset("ianus")
    w4 = _w4("ianus", group=64)
    s = {c.name: project("test", "ianus", 32, 4, cfg=c, shape=shape, samples=2).summary(4) for c in (base, w4)}
    mem = project("test", "npu-mem", 32, 4, cfg=base, shape=shape, samples=2).summary(4)
    # The NPU's prefill reads BF16 weights on both: the 4-bit device's from its BF16 copy in column blocks (as
    # npu-mem's, firmware.memory_plan), the BF16 device's from the PIM layout (transposed loads, slower).
    assert s[w4.name]["summarization_ms"] < s["ianus"]["summarization_ms"]
    assert s[w4.name]["summarization_ms"] == pytest.approx(mem["summarization_ms"], rel=0.05)
    assert s[w4.name]["gen_ms_per_token"] < s["ianus"]["gen_ms_per_token"]
    ffn = {c.name: project("test", "ianus", 32, 4, cfg=c, shape=shape, samples=2).gen_total(4).breakdown["ffn"]
           for c in (base, w4)}
    assert ffn[w4.name] < 0.5 * ffn["ianus"]


def test_runtime_refuses_fp8_activations_and_runs_4bit_weights():
    """A device whose PIM units take FP8 activations: its programs are timing-only (the vector unit writes no
    E4M3 codes), and the runtime says so; 4-bit weights with BF16 activations build a job (the SoC runs them:
    tests/test_soc_e2e.py::test_tiny_w4_layer_bit_exact)."""
    import numpy as np

    from firmware.compiler import compile_model
    from firmware.gpt2 import GptShape, random_weights
    from firmware.runtime import RunError, build_job

    shape = GptShape(64, 4, 1)
    cfg = _w4("tiny", fmt="fp4", acts="fp8_e4m3", group=64, **{"pim.rows": 128})
    cm = compile_model(cfg, shape, "ianus", 4, 6)
    with pytest.raises(RunError, match="fp8_e4m3 activations, which the vector unit does not produce"):
        build_job(cm, random_weights(shape), np.zeros((cm.total, 64), np.float32))
    cfg = _w4("tiny", group=64, **{"pim.rows": 128})
    cm = compile_model(cfg, shape, "ianus", 4, 6)
    job = build_job(cm, random_weights(shape), np.zeros((cm.total, 64), np.float32))
    assert job.programs
