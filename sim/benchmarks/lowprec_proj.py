"""4-bit PIM weights in the projection (issue 19): ``lowprec_gen_speedup`` over BF16 IANUS.

GPT-2 XL, 128 input tokens, 64 generated, policy ``ianus``, on the ``ianus`` preset and on its low-precision
variants (``ianus-w4``: INT4 weights with BF16 activations; ``ianus-w4a8``: FP4 weights with the per-group
grid choice and FP8 activations; groups of 64 inputs since XL's d_model 1600 is not a multiple of 128, two
accumulator slots, ``tMAC`` of the low-precision unit). The performance model's PCU issues the 4-bit GEMV
program of :mod:`firmware.pim_lowprec` (the program the device RTL runs); FC1's GELU moves to the vector
unit (the 4-bit program has no activation function). The NPU's summarization reads BF16 weights on every
variant (the matrix unit has no 4-bit path: a 4-bit device keeps a BF16 copy of the dequantized weights in
column blocks, :mod:`firmware.memory_plan`, which streams faster than the BF16 device's PIM layout on 4 cores);
the KV cache stays BF16 (the INT4 KV cache is not modelled), so attention and the vector work do not speed up.

Rows: ``lowprec_gen_speedup`` per format (BF16 ms per token / 4-bit ms per token, with the per-operation
breakdown of both in ms per token) and ``lowprec_gemv_model_speedup`` per GPT-2-small FC shape on the
``default`` geometry (one GEMV macro on the performance model: BF16 cycles / 4-bit cycles, and the 4-bit
program's row-timing bound), the model's counterpart of the RTL rows of :mod:`sim.benchmarks.lowprec`;
``lowprec_soc_gen_speedup``: the compiled GPT-2-small layer of the SoC (``default`` geometry, one core, prompt
of 32, 4 generated tokens; the programs ``ianus run`` runs on the RTL) on the performance model, BF16 cycles per
generation step / 4-bit cycles, with the per-stage cycles (the model is within 5 % of the RTL on ``tiny-w4``'s
4-bit programs, tests/test_soc_e2e.py::test_tiny_w4_layer_bit_exact).
"""

from __future__ import annotations

N_IN, N_OUT = 128, 64
MODEL = "xl"
FORMATS = ("ianus-w4", "ianus-w4a8")
SHAPES = ((768, 2304), (768, 768), (768, 3072), (3072, 768))
EXPECTED_S = 120


def _gemv_cycles(cfg, K, N):
    from firmware.compiler import ProgramBuilder
    from hw.spec.macro import MacroOp
    from hw.spec.soc_isa import Unit
    from sim.perfmodel import PerfModel, decode_program

    pb = ProgramBuilder(cfg)
    pb.pim(op=MacroOp.GEMV, n=K, m=N, row=0, addr0=0, flags=0)
    pb.fence(Unit.PCU)
    pb.end()
    return PerfModel(cfg).run_program(None, ins=decode_program(pb.words)).cycles


def run(quick: bool = False):
    from firmware.pim_lowprec import w4_gemv_lower_bound
    from hw.config import preset
    from sim.project import project

    base = preset("ianus")
    ref = project(MODEL, "ianus", N_IN, N_OUT, cfg=base)
    rs, mhz = ref.summary(N_OUT), base.clocks.pim_mhz
    layers = ref.shape.layers

    def per_token(p):
        g = p.gen_total(N_OUT)
        return {k: round(v * layers / (N_OUT - 1) / (mhz * 1e3), 4) for k, v in g.breakdown.items()}

    ref_ops = per_token(ref)
    for name in FORMATS[:1] if quick else FORMATS:
        cfg = preset(name)
        p = project(MODEL, "ianus", N_IN, N_OUT, cfg=cfg)
        s = p.summary(N_OUT)
        yield {"name": "lowprec_gen_speedup", "value": round(rs["gen_ms_per_token"] / s["gen_ms_per_token"], 3),
               "unit": "x", "model": MODEL, "input": N_IN, "output": N_OUT, "config": name,
               "weights": cfg.pim.weight_format, "acts": cfg.pim.act_format,
               "bf16_ms_per_token": round(rs["gen_ms_per_token"], 4), "ms_per_token": round(s["gen_ms_per_token"], 4),
               "summarization_ms": round(s["summarization_ms"], 3), "bf16_ops_ms": ref_ops, "ops_ms": per_token(p),
               "target": 2.5, "note": "projection (performance model); KV cache BF16, prefill on BF16 weights"}
    yield from _soc_rows(quick)
    bf = preset("default")
    for name in ("default-w4a8",) if quick else ("default-w4", "default-w4a8"):
        cfg = preset(name)
        for K, N in SHAPES[:1] if quick else SHAPES:
            a, b = _gemv_cycles(bf, K, N), _gemv_cycles(cfg, K, N)
            bound = w4_gemv_lower_bound(cfg, K, N)
            yield {"name": "lowprec_gemv_model_speedup", "value": round(a / b, 3), "unit": "x", "shape": f"{K}x{N}",
                   "config": name, "bf16_cycles": int(a), "w4_cycles": int(b),
                   "w4_bound_cycles": int(bound["cycles"]), "w4_vs_bound": round(b / bound["amortized_cycles"], 3),
                   "note": "one GEMV macro on the performance model (PCU + controllers + device timing)"}


def _gen_stage_cycles(config: str) -> dict:
    """Mean performance-model cycles per generation stage of the SoC's compiled one-layer job."""
    from firmware.compiler import compile_model
    from sim.perfmodel import PerfModel, decode_program
    from sim.run import base_shape, soc_config

    cfg = soc_config(config)
    cm = compile_model(cfg, base_shape(config), "ianus", 32, 36)
    m = PerfModel(cfg)
    per: dict = {}
    for st in cm.stages:
        cycles = m.run_program(None, ins=decode_program(st.words)).cycles
        if st.phase == "gen":
            per.setdefault(st.name, []).append(cycles)
    return {k: round(sum(v) / len(v)) for k, v in per.items()}


def _soc_rows(quick: bool):
    ref = _gen_stage_cycles("default")
    for name in ("default-w4",) if quick else ("default-w4", "default-w4a8"):
        st = _gen_stage_cycles(name)
        yield {"name": "lowprec_soc_gen_speedup", "value": round(sum(ref.values()) / sum(st.values()), 3), "unit": "x",
               "config": name, "bf16_cycles": sum(ref.values()), "w4_cycles": sum(st.values()),
               "bf16_stages": ref, "w4_stages": st,
               "note": "GPT-2-small layer, one generation step, SoC programs on the performance model"}
