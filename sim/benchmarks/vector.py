"""Vector unit cycles per element on GPT-2 small dimensions (RTL on Verilator, default config: 16 lanes).

Each instruction's cycle count comes from the unit's own ``cycles`` counter
(from acceptance to ``done``, pipeline fill and drain included);
``vector_cycles_per_element`` is that count divided by ``n * rows``.

The program (:func:`gpt2_program`) is one decoder layer's vector work at
sequence length ``S``: layernorm (statistics + apply) on ``S x 768``,
residual add, bias add, attention score scaling by ``1/sqrt(64)``, causal
softmax on ``seq x seq`` score rows, GELU on ``3072``-wide rows and a K/V
append of a 768-wide row into a KV cache.
"""

from __future__ import annotations

import json
import os
import tempfile

import numpy as np

from hw.spec import fp as G
from sim.golden.vector import BF16, FP32, ROW, VEC, Program

D_MODEL = 768
HEADS = 12
HEAD_DIM = 64
D_FF = 3072


def _f(x):
    return int(G.f32_bits(np.float32(x)))


def gpt2_program(lanes=16, depth=4096, seed=0, ln_rows=16, seqs=(1, 7, 64, 128), gelu_rows=2, hostile=False):
    """A Program with GPT-2-small-sized vector instructions; returns (program, regions)."""
    from hw.spec.vector_isa import Opcode as O

    rng = np.random.default_rng(seed)
    p = Program(lanes, depth)
    reg = {}
    S, d = ln_rows, D_MODEL
    x = rng.standard_normal((S, d)).astype(np.float32) * 2 + rng.standard_normal((S, 1)).astype(np.float32)
    if hostile:
        x[0] = 3.0                                   # all-equal row
        x[1] *= 1e4                                  # large magnitudes
        x[2] = 0.0                                   # zeros
    res = rng.standard_normal((S, d)).astype(np.float32)
    gamma = G.bf16_bits(1 + 0.1 * rng.standard_normal(d))
    beta = G.bf16_bits(0.1 * rng.standard_normal(d))
    bias = G.bf16_bits(0.05 * rng.standard_normal(d))
    reg["x"] = G.bf16_bits(x)
    reg["gamma"], reg["beta"] = gamma, beta
    a_x = p.put_rows(reg["x"], BF16)
    a_res = p.put_rows(G.bf16_bits(res), BF16)
    a_bias = p.put_rows(bias[None, :], BF16)
    a_gb = p.put_gamma_beta(gamma, beta)
    a_stats = p.alloc(-(-2 * S // lanes))
    a_ln = p.alloc(S * p.model.pitch(d, BF16))
    a_sum = a_ln                                     # residual and bias adds in place
    reg.update(a_stats=a_stats, a_ln=a_ln, S=S)
    scores = {}
    for seq in seqs:
        s = (rng.standard_normal((seq, seq)) * 3).astype(np.float32)
        if hostile and seq > 2:
            s[0] = -np.inf
            s[1] = 5e30
            s[2] = 7.0
        a_s = p.put_rows(G.f32_bits(s), FP32)
        # Scores are scaled in place (as after the QK^T matmul), probabilities stored as BF16.
        scores[seq] = (a_s, a_s, p.alloc(seq * p.model.pitch(seq, BF16)), G.f32_bits(s))
    h = (rng.standard_normal((gelu_rows, D_FF)) * 2).astype(np.float32)
    a_h = p.put_rows(G.bf16_bits(h), BF16)
    a_g = p.alloc(gelu_rows * p.model.pitch(D_FF, BF16))
    cap = 8
    a_k = p.put_rows(G.f32_bits(rng.standard_normal((1, d)).astype(np.float32)), FP32)
    a_cache = p.alloc(cap * p.model.pitch(d, BF16))
    reg.update(a_h=a_h, a_g=a_g, gelu_in=G.bf16_bits(h), scores=scores)

    p.add("LN_STATS", op=O.LN_STATS.value, a=a_x, d=a_stats, n=d, rows=S, a_fmt=BF16,
          imm0=_f(1.0 / d), imm1=_f(1e-5))
    p.add("LN_APPLY", op=O.LN_APPLY.value, a=a_x, b=a_gb, aux=a_stats, d=a_ln, n=d, rows=S, a_fmt=BF16, d_fmt=BF16)
    reg["ln_out"] = p.model.get(a_ln, S, d, BF16)
    p.add("ADD_residual", op=O.ADD.value, a=a_ln, b=a_res, d=a_sum, n=d, rows=S, a_fmt=BF16, b_fmt=BF16,
          d_fmt=BF16, b_mode=ROW)
    p.add("ADD_bias", op=O.ADD.value, a=a_sum, b=a_bias, d=a_sum, n=d, rows=S, a_fmt=BF16, b_fmt=BF16,
          d_fmt=BF16, b_mode=VEC)
    for seq, (a_s, a_sc, a_p, _) in scores.items():
        p.add(f"SCALE_scores_s{seq}", op=O.SCALE.value, a=a_s, d=a_sc, n=seq, rows=seq, imm0=_f(1 / 8.0),
              imm1=0x80000000)
        p.add(f"SOFTMAX_causal_s{seq}", op=O.SOFTMAX.value, a=a_sc, d=a_p, n=seq, rows=seq, d_fmt=BF16, mask=2)
    p.add("GELU", op=O.GELU.value, a=a_h, d=a_g, n=D_FF, rows=gelu_rows, a_fmt=BF16, d_fmt=BF16)
    p.add("KV_APPEND", op=O.KV_APPEND.value, a=a_k, d=a_cache, n=d, rows=1, pos=5, imm0=cap, d_fmt=BF16)
    return p, reg


def vector_build(lanes, depth, sim="verilator", acc_stages=1, add_stages=2):
    """Cached simulator build of the harness; the lanes are one shared ``vector_lane`` module (faster build).
    ``acc_stages``: the row accumulator's depth (``npu.vec_acc_stages``); ``add_stages``: the lanes' FP32
    adder depth (``VectorUnit(add_stages=...)``; the lanes are then elaborated in the harness)."""
    from hw.npu.vector import LANE_MODULE, VectorLane, VectorTop
    from sim.build import build, verilog_for

    lane_v = verilog_for(lambda: VectorLane(), name=LANE_MODULE, key="lane")
    args = ()
    if sim == "verilator":
        # Keep the lane one C++ class shared by its L instances (Verilator would inline all of them).
        vlt = lane_v.with_suffix(".vlt")
        if not vlt.exists():
            vlt.write_text(f'`verilator_config\nno_inline -module "{LANE_MODULE}"\n')
        args = (str(vlt),)
    pipe = "" if acc_stages == 1 else f"_p{acc_stages}"
    if add_stages != 2:
        pipe += f"_a{add_stages}"
        return build(lambda: VectorTop(lanes, depth, acc_stages=acc_stages, add_stages=add_stages),
                     name=f"vector_top_l{lanes}{pipe}", key=f"L={lanes},depth={depth}{pipe}", sim=sim)
    return build(lambda: VectorTop(lanes, depth, lane_instance=True, acc_stages=acc_stages),
                 name=f"vector_top_l{lanes}{pipe}", key=f"L={lanes},depth={depth},lane_instance{pipe}", sim=sim,
                 extra_sources=(lane_v,), build_args=args)


def run_program(program, lanes, depth, test_name, add_stages=2):
    """Run ``program`` on the RTL; returns the per-instruction metrics (raises on a mismatch)."""
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "scenario.npz")
        metrics = os.path.join(tmp, "m.jsonl")
        program.save(path)
        vector_build(lanes, depth, acc_stages=program.model.acc_stages, add_stages=add_stages).run(
            "sim.tb.vector_tb", "run_scenarios", test_name=test_name,
            env={"SCENARIOS": path, "IANUS_METRICS": metrics})
        return [json.loads(line) for line in open(metrics)]


def run(quick: bool = False):
    lanes, depth = 16, 4096
    p, _ = gpt2_program(lanes, depth, ln_rows=4 if quick else 16, seqs=(7, 64) if quick else (1, 7, 64, 128))
    for m in run_program(p, lanes, depth, "bench_vector"):
        yield {"name": "vector_cycles_per_element", "op": m["name"], "value": round(m["cycles"] / m["elements"], 3),
               "unit": "cycles/element", "cycles": m["cycles"], "elements": m["elements"], "lanes": lanes,
               "note": "RTL cycle counter, acceptance to done, verified bit-exact against the golden model"}
