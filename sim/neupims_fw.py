"""The firmware's PIM attention and V^T appends timed on the calibrated performance model, for the NeuPIMs
projection (:mod:`sim.neupims_model`, issue 18).

What the RTL does per request of ``L`` keys under ``naive`` / ``neupims`` (:mod:`firmware.batch`), and what an
analytic GEMV bound leaves out:

* **Attention** (:meth:`firmware.batch.BatchCompiler.pim_attention`): per head six PIM macros, each a PCU command
  of its own (queue latency, hand-over to the next macro): WRITE_VEC of q from DRAM into the global buffer,
  the scores GEMV over the packed K tiles, READ_RES of the ``L`` FP32 scores to DRAM, WRITE_VEC of the
  probabilities from DRAM, the ``P V`` GEMV over the packed V^T tiles, READ_RES of the BF16 outputs; between
  them the softmax on the vector unit with its own DRAM round trip (VLOAD of the scores, SCALE, one SOFTMAX per
  head, VSTORE of the probabilities) and the FENCEs of the software pipeline (PIM computes request ``j + 1``'s
  scores while the vector unit normalises request ``j``; ``P V`` of ``j`` then waits for the softmax).
* **V^T append** (:meth:`firmware.batch.BatchCompiler.vt_update`, in the ``qkv`` stage): per request one
  matrix-unit GEMM ``I[hd, hd] @ V[group]^T`` into a scratch buffer, then per head and tile one VSTORE of
  ``head_dim`` 32-byte rows (a column of V^T, one write per DRAM row).

Rather than adding each of these as an analytic term, the firmware's own programs are compiled for one layer of
``heads`` heads of ``head_dim`` (a reduced ``d_model = heads x head_dim``: only the heads matter to these
programs) and timed on the calibrated performance model (:mod:`sim.perfmodel`, within 1 % of the RTL's batched
steps, README), for ``1`` and ``1 + REPS`` requests of ``L`` keys (each its own KV allocation): the difference over ``REPS`` is
the marginal cost of one more request in the pipeline, the rest the one-off start of a stream (the first
request's scores, which nothing overlaps, the program's start and END). Sampled at :data:`FW_SAMPLES` lengths
and interpolated linearly (the work is linear in L except for the V^T pitch, a power of two of ``L / 16``: the
samples are at the powers of two, where the pitch is exact). Beyond the global buffer's values (1,024 keys:
the firmware keeps V^T in one input chunk and refuses longer requests) the last two samples are extrapolated
linearly.

The programs need the Row-Channel-Bank-Column address map (the firmware's PIM layouts): they are planned and
timed on the configuration with ``channel_interleave = 0``. This module only times the firmware; it is not
imported by it.
"""

from __future__ import annotations

import numpy as np

from firmware.gpt2 import GptShape
from firmware.program import ProgramBuilder, round_up
from hw.config import SystemConfig
from hw.spec.soc_isa import Unit

__all__ = ["FW_SAMPLES", "REPS", "samples", "pim_config", "attention_sample", "npu_attention_sample", "append_sample", "interp"]

FW_SAMPLES = (16, 32, 48, 64, 80, 128, 144, 256, 272, 512, 528, 1024)
"""Lengths timed: the ends of every V^T pitch's range (a power of two of ``ceil(L / 16)``: ``2^k + 16 .. 2^(k+1)``),
so that the interpolation stays within one pitch."""
REPS = 3


def samples(cfg: SystemConfig) -> tuple[int, ...]:
    """The lengths of :data:`FW_SAMPLES` the firmware can compile on ``cfg`` (at most its global buffer's values)."""
    return tuple(x for x in FW_SAMPLES if x <= cfg.pim.gb_values)


def pim_config(cfg: SystemConfig, one_channel: bool) -> SystemConfig:
    """``cfg`` with the firmware's Row-Channel-Bank-Column map; ``one_channel``: a single channel (NeuPIMs'
    layout: a request's K and V in one channel, its macros driving that channel alone)."""
    over = {"pim.channel_interleave": 0}
    if one_channel:
        over["pim.channels"] = 1
    return cfg.replace(**over)


def _compiler(cfg: SystemConfig, heads: int, hd: int, n: int, cap: int, policy: str = "naive"):
    from firmware.batch import BatchCompiler, plan_batch
    shape = GptShape(heads * hd, heads, 1)
    bp = plan_batch(cfg, shape, policy, n, cap, io_slots=1, prog_bytes=1 << 16)
    kvs, row = [], bp.pool_rows[0]
    for _ in range(n):              # each request its own allocation, as the runtime's KV pool gives them
        kvs.append(bp.layout(row, cap))
        row += kvs[-1].rows
    return BatchCompiler(bp), kvs


def _time(cfg: SystemConfig, words, interleave: int = 0, cache: bool = True) -> tuple[float, dict, object]:
    """Cycles, busy cycles per unit and the result of ``words`` on the performance model; ``cache``: the
    macro-timing cache of paper-scale configurations allowed (``Micro.cache``: reused timings do not count
    their commands, and misjudge short macros; off for the PIM attention)."""
    import dataclasses

    from sim.perfmodel import PerfModel, decode_program, micro_for
    micro = micro_for(cfg)
    micro = dataclasses.replace(micro, interleave=interleave, cache=micro.cache and cache)
    r = PerfModel(cfg, micro).run_program(None, ins=decode_program(words))
    return float(r.cycles), dict(r.busy), r


def _commands(res) -> float:
    """Commands on the busiest channel's command bus (normal and PIM commands, the performance model's
    per-channel counters)."""
    c = res.counters
    n = len({k.split(".")[0] for k in c})
    return float(max(c.get(f"ch{i}.commands", 0) + c.get(f"ch{i}.pim_commands", 0) for i in range(n)))


def attention_sample(cfg: SystemConfig, heads: int, hd: int, L: int) -> dict:
    """The firmware's PIM attention of requests of ``L`` keys (``heads`` heads of ``head_dim`` ``hd``) on
    ``cfg`` (already :func:`pim_config`): ``marginal`` (cycles of one more request in the pipeline),
    ``start`` (the one-off cycles of a stream), ``vector`` and ``pcu`` (busy cycles of the vector unit and the
    PCU per request) and ``commands`` (commands per request on the busiest channel's bus)."""
    out = []
    for n in (1, 1 + REPS):
        bc, kvs = _compiler(cfg, heads, hd, n, L)
        pb = ProgramBuilder(cfg)
        bc.pim_attention(pb, 0, [(kv, L - 1) for kv in kvs])
        pb.end()
        out.append(_time(cfg, pb.words, cache=False))
    (c1, b1, r1), (cn, _, rn) = out
    m = (cn - c1) / REPS
    return {"marginal": m, "start": c1 - m, "vector": b1.get("vq", 0.0), "pcu": b1.get("pcu", 0.0),
            "commands": (_commands(rn) - _commands(r1)) / REPS}


def npu_attention_sample(cfg: SystemConfig, heads: int, hd: int, L: int, interleave: int = 0) -> dict:
    """npu-only: the firmware's attention of requests of ``L`` keys on the matrix and vector units (the compiler's
    generation attention over each request's own caches, one program for the batch:
    :meth:`firmware.batch.BatchCompiler._attn`) on ``cfg`` (already :func:`pim_config`; traffic interleaved every
    ``interleave`` bytes, 0: the configuration's map): ``marginal`` (one more request; consecutive requests'
    loads and softmax overlap in the program) and ``start``."""
    cyc = []
    for n in (1, 1 + REPS):
        bc, kvs = _compiler(cfg, heads, hd, n, L, "npu-only")
        cyc.append(_time(cfg, bc._attn(0, 0, [(kv, L - 1) for kv in kvs]).words, interleave)[0])
    m = (cyc[1] - cyc[0]) / REPS
    return {"marginal": m, "start": cyc[0] - m}


def append_sample(cfg: SystemConfig, policy: str, heads: int, hd: int, interleave: int = 0, L: int = 256) -> dict:
    """One request's share of the ``qkv`` stage after the GEMM (:meth:`firmware.batch.BatchCompiler.scatter`:
    the bias, its Q row, its K and V rows into its own caches, a VSTORE per head each; under ``naive`` also the
    V^T append, :meth:`~firmware.batch.BatchCompiler.vt_update`) on ``cfg`` (already :func:`pim_config`; NPU
    traffic interleaved every ``interleave`` bytes, 0: the configuration's map), for ``policy`` ``npu-only`` or
    ``naive``: ``cycles`` (marginal in a batch), ``start`` (once per program: the bias load), ``vector``
    (busy cycles of the vector unit per request) and ``mem_bus`` (its DRAM accesses' command-bus cycles per
    channel). It does not depend on the request's length beyond addresses; ``L`` a typical one (at most the
    global buffer's values)."""
    res = []
    L = min(L, cfg.pim.gb_values)
    for n in (1, 1 + REPS):
        bc, kvs = _compiler(cfg, heads, hd, n, round_up(L, 16), policy)
        pb = ProgramBuilder(cfg)
        reqs = [(kv, L - 1) for kv in kvs]
        bc.scatter(pb, bc._lc(0, 0), 0, reqs)
        pb.fence(Unit.VQ)
        if policy != "npu-only":
            bc.vt_update(pb, 0, reqs)
        pb.end()
        res.append(_time(cfg, pb.words, interleave))
    (c1, b1, r1), (cn, bn, rn) = res
    m = (cn - c1) / REPS
    acc = sum(rn.events.get(k, 0) - r1.events.get(k, 0) for k in ("dram_reads", "dram_writes")) / REPS
    return {"cycles": m, "start": c1 - m, "vector": (bn.get("vq", 0.0) - b1.get("vq", 0.0)) / REPS,
            "mem_bus": acc / cfg.pim.channels * cfg.timing.tCCD}


def interp(xs, ys, x: float) -> float:
    """Linear in ``x`` through the samples, extrapolated from the last two beyond them."""
    if x > xs[-1]:
        return float(ys[-1] + (ys[-1] - ys[-2]) / (xs[-1] - xs[-2]) * (x - xs[-1]))
    return float(np.interp(x, xs, ys))
