"""Compiler: GPT-2 decoder layers -> SoC programs (prefill of L tokens, generation steps).

This module holds the layer compiler (:class:`LayerCompiler`: layernorm, QKV scatter, attention, FCs and
residuals per stage), the FC mapping (:func:`choose_mapping`) and :func:`compile_model`. Its parts live in
:mod:`firmware.program` (the program builder, matrix-unit blocks and the tiled GEMM, :class:`CompileError`)
and :mod:`firmware.memory_plan` (:func:`plan_memory`, :func:`pack_layer`); the names other modules use are
importable from here as well.

Memory plan (:mod:`firmware.memory_plan`; device byte addresses, Row-Channel-Bank-Column): every FC weight
matrix lives once, in the PIM layout of :class:`firmware.pim.GemvLayout`
(whole DRAM rows of every bank); the matrix unit reads the same copy with
transposed 2-D loads (within one PIM tile the outputs ``n`` are rows
``bank_row_bytes`` apart and the inputs ``k`` of one chunk are contiguous), so
PIM and NPU share one copy of the weights (unified memory). ``W_qkv``'s
columns are permuted into head groups ``[Q_g | K_g | V_g]`` so that a group is
a contiguous run of PIM tiles, i.e. a GEMV of its own. Activations, biases,
layernorm parameters, the KV cache (per layer and head, ``[max_tokens, hd]``
BF16) and the programs follow the weights.

Per layer and phase the compiler emits one program per *stage*
(:data:`STAGES`); the host runs them back to back, so the RTL reports cycles
per stage. Within a stage the matrix unit's load/compute/store queues are
pipelined with its semaphores (double-buffered scratchpads); between units the
program places FENCEs.

Policies (:data:`POLICIES`):

``ianus``
    Algorithm 1 of the paper: each FC goes to PIM or the matrix unit by the
    analytical cost model (:mod:`firmware.costmodel`), GELU in PIM when FC1
    runs in PIM; QK^T and S.V on the matrix unit. In generation the QKV GEMV
    can be split into head groups, the attention of group ``g`` running on
    the NPU while PIM computes group ``g + 1`` (:data:`HEAD_GROUPS`); the cost
    model keeps one GEMV when the split does not pay, which is every
    configuration here (see :meth:`LayerCompiler._qkv_attn_split`).
``naive``
    The same mapping, with every PIM operation fenced on both sides.
``npu-mem``
    No PIM: every FC on the matrix unit, memory used as plain DRAM.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from firmware.gpt2 import GptShape
from firmware.memory_plan import MemoryPlan, k_group, pack_layer, plan_memory
from firmware.pim import GemvLayout
from firmware.program import (
    TIMING_ONLY,
    Blocked,
    CompileError,
    HeadsK,
    HeadsN,
    MuBlock,
    PimWeights,
    ProgramBuilder,
    RowsK,
    RowsN,
    bf16_words,
    blocked_tile,
    f32_imm,
    fp32_words,
    gemm,
    round_up,
)
from hw.spec import soc_isa as isa
from hw.spec.config import SystemConfig
from hw.spec.macro import MacroFlag, MacroOp
from hw.spec.soc_isa import SocOp, Unit

__all__ = ["POLICIES", "STAGES", "HEAD_BATCH", "CompileError", "MemoryPlan", "compile_model", "CompiledModel", "Stage",
           "plan_memory", "pack_layer", "head_batch_on", "kv_layout"]

POLICIES = ("ianus", "npu-mem", "naive", "hpim")
STAGES = ("ln1", "qkv_attn", "proj", "ln2", "fc1", "fc2")


# ---------------------------------------------------------------------------------------------
# Stages
# ---------------------------------------------------------------------------------------------

@dataclass
class Stage:
    layer: int
    phase: str          # "prefill" or "gen"
    pos: int            # first token position
    name: str
    words: list
    est: dict           # cost-model cycles per unit (mu, vq, pim) and total
    mapping: str = ""   # "mu", "pim" or "" (for FC stages)


HEAD_GROUPS = ("auto", "plain", "split")
GELU_UNITS = ("auto", "pim", "vector")
"""Where generation's FC1 on a BF16 PIM device applies GELU (:meth:`LayerCompiler._fc1_pim`)."""
"""How generation's QKV GEMV and attention are scheduled under ``ianus``: ``plain`` (one QKV GEMV, then the
attention of every head), ``split`` (a GEMV per head group, PIM computing group g + 1 while the NPU attends to
group g) or ``auto`` (the one the cost model estimates faster)."""


HEAD_BATCH = ("auto", "on", "off")
"""Generation attention (one token) on the matrix unit: ``on``: the heads of a step as one GEMM each for
``Q K^T`` (the block-diagonal query ``[heads, heads * hd]`` against the heads' K caches) and ``P V`` (the
probabilities of every head against the heads' V caches, the diagonal blocks stored); ``off``: a GEMM per head
and product; ``auto``: ``on`` where one head's ``hd`` inputs underfill the array's K tile (rows x MACs per PE),
so that the weight loads of a head-sized GEMM would cost a whole tile each."""


def head_batch_on(cfg: SystemConfig, shape: GptShape, policy: str, head_batch: str = "auto") -> bool:
    """Whether generation attention runs batched across heads (:data:`HEAD_BATCH`); the plan's K / V caches
    are then token-major (:data:`firmware.memory_plan.KV_LAYOUTS`, :func:`kv_layout`)."""
    if head_batch not in HEAD_BATCH:
        raise CompileError(f"head_batch must be one of {', '.join(HEAD_BATCH)}, not {head_batch!r}")
    npu, hd = cfg.npu, shape.head_dim
    whole = (k_group(cfg, shape) * hd) % npu.array_cols == 0
    if head_batch == "on" and policy == "hpim":
        raise CompileError("head_batch 'on' does not apply to policy hpim (its generation attention runs on the "
                           "SRAM-PIM unit)")
    if head_batch == "on" and not whole:
        raise CompileError(f"head_batch 'on' needs a head group's width ({k_group(cfg, shape)} x head_dim {hd}) a "
                           f"multiple of the array's {npu.array_cols} columns")
    fits = whole and policy != "hpim"
    return fits and (head_batch == "on" or (head_batch == "auto" and npu.array_rows * npu.macs_per_pe > hd))


ATTN_PIPELINE = ("auto", "on", "off")
"""A prompt's attention on the NPU: ``on``: a software pipeline over the heads (the vector unit's softmax of
one head beside the matrix unit's ``P V`` of the one before and ``Q K^T`` of the one after, a FENCE per
stage; :meth:`LayerCompiler._attention_pipelined`); ``off``: every head's ``Q K^T``, then every softmax, then
every ``P V``, a FENCE after each phase; ``auto``: ``on`` on a multi-core NPU (the paper-scale presets, where
the softmaxes are as long as the matrix work), ``off`` on the single-core RTL configurations. On a multi-core
NPU a stage takes :data:`ATTN_GROUP` heads (one head per stage on one core: those programs are unchanged)."""


def attn_pipeline_on(cfg: SystemConfig, attn_pipeline: str = "auto") -> bool:
    """Whether a prompt's attention runs as a pipeline over the heads (:data:`ATTN_PIPELINE`)."""
    if attn_pipeline not in ATTN_PIPELINE:
        raise CompileError(f"attn_pipeline must be one of {', '.join(ATTN_PIPELINE)}, not {attn_pipeline!r}")
    return attn_pipeline == "on" or (attn_pipeline == "auto" and cfg.npu.cores > 1)


ATTN_GROUP = 5
"""Heads per stage of a prompt's attention pipeline on a multi-core NPU (:meth:`LayerCompiler.attention`): one
VLOAD, SCALE and VSTORE of their score rows, a SOFTMAX per head, fewer FENCEs (the vector queue binds). XL 128/64,
ianus, exact: summarization attention 7.43x its bound with 1 head per stage, 6.02x / 6.05x / 6.27x / 5.72x with
2 / 3 / 4 / 5 (cached: 5.84x / 5.67x / 5.80x / 5.83x: from 2 to 5 the DRAM traffic's order decides)."""
ATTN_GROUP_ROWS = 640
"""Score rows per stage of that pipeline: a longer prompt takes fewer heads per stage (its per-head GEMMs grow
faster than its softmaxes, and the first and last stages, one unit's alone, grow with the group). XL, ianus,
the prefill qkv_attn stage alone (cached timing), attention cycles for 1 / 2 / 3 / 5 heads per stage: 256 tokens
107.8k / 100.0k / 100.1k / 110.4k; 512 tokens 266.0k / 284.9k / - / 332.1k (5 heads per stage at 512 put the
summarization attention at 13.6x its bound instead of 10.8x). 640 rows: 5 heads at 128 tokens, 2 at 256, 1 at
512."""
ATTN_SLOTS = 8
"""Scratchpad buffers of that pipeline's matrix-unit blocks (:class:`firmware.program.MuBlock`): with two, a
COMPUTE waited for the STORE of the GEMM two before it (2 heads per stage, XL 128: 37.7k -> 35.3k cycles)."""

GEN_SLOTS = 3
"""Scratchpad buffers of one generated token's attention GEMMs on a multi-core NPU: ``Q K^T``'s inputs (the heads'
K caches side by side) in k-tiles, a COMPUTE beside the next tile's loads. XL, ianus, the qkv_attn stage alone,
exact, attention at positions 128 / 160 / 191: 8.71k / 8.88k / 9.16k cycles with 2 buffers, 8.32k / 8.35k / 8.67k
with 3. A pipeline over head groups was slower (9.2k-12.1k at 160: a GEMM per group, FENCEs idling the MU)."""


def kv_layout(cfg: SystemConfig, shape: GptShape, policy: str, head_batch: str = "auto") -> str:
    """The K / V cache layout that goes with :func:`head_batch_on`."""
    return "token" if head_batch_on(cfg, shape, policy, head_batch) else "head"


class LayerCompiler:
    def __init__(self, plan: MemoryPlan, policy: str, mapping: dict, head_groups: str = "auto",
                 head_batch: str = "auto", attn_pipeline: str = "auto", gelu_unit: str = "auto"):
        if head_groups not in HEAD_GROUPS:
            raise CompileError(f"head_groups must be one of {', '.join(HEAD_GROUPS)}, not {head_groups!r}")
        if gelu_unit not in GELU_UNITS:
            raise CompileError(f"gelu_unit must be one of {', '.join(GELU_UNITS)}, not {gelu_unit!r}")
        self.gelu_unit = gelu_unit
        self.plan = plan
        self.cfg = plan.cfg
        self.shape = plan.shape
        self.policy = policy
        self.mapping = mapping       # (phase, fc) -> "mu" | "pim"
        self.head_groups = head_groups
        self.head_batch = head_batch_on(self.cfg, self.shape, policy, head_batch) and "qd" in plan.buffers
        self.attn_pipeline = attn_pipeline_on(self.cfg, attn_pipeline)
        self.attn_group = ATTN_GROUP        # heads per stage of a prompt's attention pipeline (multi-core)
        self.attn_slots = ATTN_SLOTS        # scratchpad buffers of its matrix-unit blocks
        self.gen_slots = GEN_SLOTS          # ... and of one token's attention GEMMs (multi-core)

    # -- vector helpers ----------------------------------------------------------------------
    def _groups(self, rows, per_row_words, fixed_words=0):
        avail = self.cfg.npu.vector_spm_words - fixed_words - 4 * max(1, 8 // self.cfg.npu.vector_lanes)
        rg = max(1, min(rows, avail // max(1, per_row_words)))
        return [(r0, min(rg, rows - r0)) for r0 in range(0, rows, rg)]

    def layernorm(self, pb, x_addr, rows, gb_addr, out_addr):
        d, L = self.shape.d_model, pb.L
        pb.spm_reset()
        gbw = pb.spm(fp32_words(L, d))
        pb.vdma(True, gb_addr, d * 4, 1, d * 4, gbw, fp32_words(L, d))
        per_row = fp32_words(L, d) + bf16_words(L, d) + 2
        for r0, rg in self._groups(rows, per_row, fp32_words(L, d)):
            top = pb.spm_top
            X = pb.spm(rg * fp32_words(L, d))
            ST = pb.spm(-(-2 * rg // L))
            Hh = pb.spm(rg * bf16_words(L, d))
            pb.vdma(True, x_addr + r0 * d * 4, d * 4, rg, d * 4, X, fp32_words(L, d))
            pb.vec(op="LN_STATS", a=X, d=ST, n=d, rows=rg, a_fmt="FP32", d_fmt="FP32",
                   imm0=f32_imm(1.0 / d), imm1=f32_imm(self.shape.eps))
            pb.vec(op="LN_APPLY", a=X, b=gbw, d=Hh, aux=ST, n=d, rows=rg, a_fmt="FP32", d_fmt="BF16")
            pb.vdma(False, out_addr + r0 * d * 2, d * 2, rg, d * 2, Hh, bf16_words(L, d))
            pb.spm_top = top

    def scatter_qkv(self, pb, lp, rows, pos0, src_fp32, heads, bias):
        """QKV rows (FP32 raw + bias, or BF16 with bias) -> Q buffer and the K/V caches of ``heads``."""
        d, hd, L = self.shape.d_model, self.shape.head_dim, pb.L
        n3 = 3 * d
        b = self.plan.buffers
        pb.spm_reset()
        fixed = 0
        if bias:
            B = pb.spm(fp32_words(L, n3))
            pb.vdma(True, lp.qkv_b, n3 * 4, 1, n3 * 4, B, fp32_words(L, n3))
            fixed = fp32_words(L, n3)
        per_row = (fp32_words(L, n3) if src_fp32 else 0) + bf16_words(L, n3)
        for r0, rg in self._groups(rows, per_row, fixed):
            top = pb.spm_top
            T = pb.spm(rg * bf16_words(L, n3))
            if src_fp32:
                X = pb.spm(rg * fp32_words(L, n3))
                pb.vdma(True, b["qkv"] + r0 * n3 * 4, n3 * 4, rg, n3 * 4, X, fp32_words(L, n3))
                pb.vec(op="ADD", a=X, b=B, d=T, n=n3, rows=rg, a_fmt="FP32", b_fmt="FP32", d_fmt="BF16",
                       b_mode="VEC")
            else:
                pb.vdma(True, b["qkv"] + r0 * n3 * 2, n3 * 2, rg, n3 * 2, T, bf16_words(L, n3))
            pitch = bf16_words(L, n3)
            if rg == 1:
                # One token: the q, K and V rows of the heads of one head group are one VSTORE each (a row
                # per head: the group's columns are consecutive in T, the heads' caches equally far apart).
                for run in self._head_runs(lp, heads):
                    self._scatter_one_token(pb, lp, pos0 + r0, T, run)
                pb.spm_top = top
                continue
            # Multi-core: one VSTORE per run of heads whose rows lie side by side both in T and in memory (q, or
            # caches that interleave a group's heads per token), else one per head. GPT-2 XL 128 summarization,
            # exact: ianus 23.24 -> 22.97 ms, npu-mem 22.74 -> 22.10. Not on the single-core RTL configurations:
            # there it gained 0.56 % on the default layer's prefill qkv_attn, moved the refresh phase of the
            # programs after it, and one generation program's model error then read 5.94 % (bound 5 %).
            merge = self.cfg.npu.cores > 1
            order = ([(kind, h) for kind in range(3) for h in heads] if merge
                     else [(kind, h) for h in heads for kind in range(3)])
            run = None
            for kind, h in order:
                col = self.plan.qkv_col(kind, h)
                unit = pb.unit(T) + col * 2 // 32       # scratchpad in 32-byte units
                if kind == 0:
                    mem, stride = b["q"] + r0 * d * 2 + h * hd * 2, d * 2
                else:
                    cache = lp.kc[h] if kind == 1 else lp.vc[h]
                    ks = lp.k_stride if kind == 1 else lp.v_stride
                    mem, stride = cache + (pos0 + r0) * ks, ks
                if (merge and run is not None and run[1] == stride and mem == run[0] + run[3]
                        and unit == run[2] + run[3] // 32 and run[3] + hd * 2 <= stride):
                    run[3] += hd * 2
                    continue
                if run is not None:
                    pb.vdma_units(False, run[0], run[1], rg, run[3], run[2], pb.unit(pitch))
                run = [mem, stride, unit, hd * 2]        # memory, stride, scratchpad unit, bytes per row
            if run is not None:
                pb.vdma_units(False, run[0], run[1], rg, run[3], run[2], pb.unit(pitch))
            pb.spm_top = top

    def _head_runs(self, lp, heads):
        """``heads`` cut into runs of consecutive heads of one head group whose K caches (and V caches) are
        equally far apart, each within the VSTORE's stride field."""
        runs, hpg = [], self.plan.hpg
        limit = 1 << dict((n, w) for n, _, w in isa.VDMA_FIELDS)["mem_stride"]
        for h in heads:
            if runs:
                run = runs[-1]
                prev = run[-1]
                ok = (h == prev + 1 and h // hpg == prev // hpg
                      and all(0 <= c[h] - c[prev] < limit for c in (lp.kc, lp.vc))
                      and (len(run) < 2 or all(c[h] - c[prev] == c[prev] - c[run[-2]] for c in (lp.kc, lp.vc))))
                if ok:
                    run.append(h)
                    continue
            runs.append([h])
        return runs

    def _scatter_one_token(self, pb, lp, pos, T, run):
        """q, K and V of token ``pos`` for the heads ``run`` (see :meth:`_head_runs`) from the QKV row at
        scratchpad word ``T``."""
        hd, b = self.shape.head_dim, self.plan.buffers
        h0, n = run[0], len(run)
        for kind in range(3):
            unit = pb.unit(T) + self.plan.qkv_col(kind, h0) * 2 // 32
            if kind == 0 and self.head_batch:        # q of head h -> row h, columns h hd .. of qd
                d = self.shape.d_model
                pb.vdma_units(False, b["qd"] + h0 * (d + hd) * 2, (d + hd) * 2, n, hd * 2, unit, hd * 2 // 32)
                continue
            if kind == 0:
                pb.vdma_units(False, b["q"] + h0 * hd * 2, 32, 1, n * hd * 2, unit, 1)
                continue
            cache = lp.kc if kind == 1 else lp.vc
            stride = cache[run[1]] - cache[h0] if n > 1 else 32
            ks = lp.k_stride if kind == 1 else lp.v_stride
            pb.vdma_units(False, cache[h0] + pos * ks, stride, n, hd * 2, unit, hd * 2 // 32)

    def attention(self, pb, lp, rows, pos0, heads):
        """S = Q K^T (MU), softmax (VQ), O = P V (MU) for ``heads``; O -> the o buffer."""
        if self.policy == "hpim" and rows == 1:      # generation on the SRAM-PIM unit (issue 20)
            from firmware import hpim
            return hpim.attention(self, pb, lp, pos0, heads, CompileError)
        cfg, d, hd = self.cfg, self.shape.d_model, self.shape.head_dim
        b = self.plan.buffers
        Lk = pos0 + rows
        Lp = round_up(Lk, 16)
        # Summarization's scores leave the matrix unit in BF16 (rounded once from the FP32 accumulation, as a
        # BF16 framework's Q K^T does): the score round trip through memory, L^2 elements per head, is the
        # largest traffic of prefill attention. One token's scores stay FP32 (a row per head, no gain).
        sb = 2 if rows > 1 else 4
        # Summarization in row blocks of the array's height: block rows r0..r0+mb-1 see keys 0..pos0+r0+mb-1
        # (causal), so its scores, softmax and P.V stop there instead of at the last key: about half the
        # L^2 work and traffic of a long prompt.
        mb_max = 2 * max(16, cfg.npu.array_rows) if rows > 1 else 1
        blocks = [(r0, min(mb_max, rows - r0), min(Lk, pos0 + r0 + mb_max)) for r0 in range(0, rows, mb_max)]
        blk = self._attn_block(rows)
        heads = list(heads)
        h0, nh = heads[0], len(heads)
        # (the first head's outputs must start on an accumulator word: the diagonal stores of P V write from
        # the word holding a head's first output on)
        batch = rows == 1 and self.head_batch and h0 * hd % cfg.npu.array_cols == 0
        if batch:       # one GEMM: qd's rows h0.. (q_h at columns h hd ..) x the heads' K caches
            assert heads == list(range(h0, h0 + nh))
            gemm(cfg, blk, b["qd"] + h0 * (d + hd) * 2, d * 2, HeadsN([lp.kc[h] for h in heads], hd, lp.k_stride),
                 b["s"] + h0 * Lp * 4, Lp * 4, nh, nh * hd, Lk, False, pb.est)
        in_qd = rows == 1 and self.head_batch       # a step's q is in qd then: head h at row h, columns h hd ..

        def qk(blk, h):
            for r0, mb, nk in blocks:
                q = b["qd"] + h * (d + hd) * 2 if in_qd else b["q"] + r0 * d * 2 + h * hd * 2
                gemm(cfg, blk, q, d * 2, RowsN(lp.kc[h], lp.k_stride),
                     b["s"] + (h * rows + r0) * Lp * sb, Lp * sb, mb, hd, nk, sb == 2, pb.est)

        def pv(blk, h):
            for r0, mb, nk in blocks:
                gemm(cfg, blk, b["p"] + (h * rows + r0) * Lp * 2, Lp * 2, RowsK(lp.vc[h], lp.v_stride),
                     b["o"] + r0 * d * 2 + h * hd * 2, d * 2, mb, nk, hd, True, pb.est)

        if rows > 1 and self.attn_pipeline and nh > 1:
            if cfg.npu.cores > 1:       # several heads per pipeline stage (the single-core programs unchanged)
                groups = self._attn_groups(heads, rows)
                self._attention_pipelined(
                    pb, groups, lambda blk, hs: [qk(blk, h) for h in hs], lambda blk, hs: [pv(blk, h) for h in hs],
                    lambda hs: self._softmax_heads(pb, hs, rows, pos0, blocks, Lp),
                    lambda: MuBlock(slots=self.attn_slots))
                return
            self._attention_pipelined(pb, heads, qk, pv, lambda h: self._softmax_rows(pb, h, rows, pos0, blocks, Lp))
            return
        for h in heads if not batch else ():
            qk(blk, h)
        pb.mu(blk)
        pb.fence(Unit.MU)
        pb.spm_reset()
        if rows == 1:
            self._softmax_one_token(pb, pos0, Lp, list(heads))
        for h in (heads if rows > 1 else ()):
            self._softmax_rows(pb, h, rows, pos0, blocks, Lp)
        pb.fence(Unit.VQ)
        blk = self._attn_block(rows)
        if batch:       # one GEMM: every head's probabilities x the heads' V caches, the diagonal blocks stored
            gemm(cfg, blk, b["p"] + h0 * Lp * 2, Lp * 2, HeadsK([lp.vc[h] for h in heads], hd, lp.v_stride,
                                                                 cfg.npu.array_cols),
                 b["o"] + h0 * hd * 2, d * 2, nh, Lk, nh * hd, True, pb.est, diag=hd)
        for h in heads if not batch else ():
            pv(blk, h)
        pb.mu(blk)
        pb.fence(Unit.MU)

    @staticmethod
    def _attention_pipelined(pb, heads, qk, pv, softmax, block=MuBlock):
        """A prompt's attention as a software pipeline over the heads (:data:`ATTN_PIPELINE`): in stage ``k``
        the vector queue runs head ``k - 1``'s softmax while the matrix unit runs head ``k - 2``'s ``P V`` and
        head ``k``'s ``Q K^T``; a FENCE on both ends the stage. The vector instructions go first (a head's few
        fit in the vector queue, so the command processor reaches the matrix instructions at once). The same
        work as the phased schedule in another order (the matrix unit's blocks, and so its semaphores, are
        per stage): the same bits."""
        n = len(heads)
        for k in range(n + 2):
            units = Unit(0)
            if 1 <= k <= n:
                if k == 1:
                    pb.spm_reset()
                softmax(heads[k - 1])
                units |= Unit.VQ
            blk = block()
            if k >= 2:
                pv(blk, heads[k - 2])
            if k < n:
                qk(blk, heads[k])
            pb.mu(blk)
            pb.fence(units | Unit.MU)

    def _softmax_rows(self, pb, h, rows, pos0, blocks, Lp):
        """Scale + causal softmax of head ``h``'s score rows of a prompt (BF16 scores in, BF16 probabilities
        out), in row groups that fit the vector scratchpad."""
        L, b, hd = pb.L, self.plan.buffers, self.shape.head_dim
        for r0, mb, nk in blocks:
            Lb = round_up(nk, 16)
            for g0, rg in self._groups(mb, fp32_words(L, Lb) + bf16_words(L, Lb)):
                rr = r0 + g0
                top = pb.spm_top
                X = pb.spm(rg * fp32_words(L, Lb))
                P = pb.spm(rg * bf16_words(L, Lb))        # the BF16 scores first, then the probabilities
                pb.vdma(True, b["s"] + (h * rows + rr) * Lp * 2, Lp * 2, rg, Lb * 2, P, bf16_words(L, Lb))
                pb.vec(op="SCALE", a=P, d=X, n=Lb, rows=rg, a_fmt="BF16", d_fmt="FP32",
                       imm0=f32_imm(1.0 / math.sqrt(hd)), imm1=0x80000000)
                pb.vec(op="SOFTMAX", a=X, d=P, n=Lb, rows=rg, a_fmt="FP32", d_fmt="BF16", mask="CAUSAL",
                       pos=pos0 + rr)
                pb.vdma(False, b["p"] + (h * rows + rr) * Lp * 2, Lp * 2, rg, Lb * 2, P, bf16_words(L, Lb))
                pb.spm_top = top

    def _attn_block(self, rows):
        """The matrix-unit block of the phased attention schedule: on a multi-core NPU one token's GEMMs use
        :data:`GEN_SLOTS` scratchpad buffers (:class:`firmware.program.MuBlock`), else the two halves."""
        return MuBlock(slots=self.gen_slots) if rows == 1 and self.cfg.npu.cores > 1 else MuBlock()

    def _attn_groups(self, heads, rows):
        """The heads of each stage of a prompt's attention pipeline on a multi-core NPU (:meth:`attention`):
        :data:`ATTN_GROUP_ROWS` score rows per stage (at most :data:`ATTN_GROUP` heads, at least one)."""
        g = max(1, min(len(heads), self.attn_group, ATTN_GROUP_ROWS // rows))
        return [heads[i:i + g] for i in range(0, len(heads), g)]

    def _softmax_heads(self, pb, hs, rows, pos0, blocks, Lp):
        """:meth:`_softmax_rows` of the consecutive heads ``hs`` at once (multi-core NPUs): per row block one
        VLOAD of every head's score rows (one transfer where the heads' rows follow each other in memory), one
        SCALE over all of them, a SOFTMAX per head (its own causal mask) and one VSTORE of the probabilities.
        The same operations on every row as one head at a time: the same bits."""
        L, b, hd = pb.L, self.plan.buffers, self.shape.head_dim
        n = len(hs)
        assert hs == list(range(hs[0], hs[0] + n))
        for r0, mb, nk in blocks:
            Lb = round_up(nk, 16)
            fw, bw = fp32_words(L, Lb), bf16_words(L, Lb)
            if len(self._groups(n * mb, fw + bw)) > 1:      # does not fit the scratchpad: a head at a time
                for h in hs:
                    self._softmax_rows(pb, h, rows, pos0, [(r0, mb, nk)], Lp)
                continue
            top = pb.spm_top
            X = pb.spm(n * mb * fw)
            P = pb.spm(n * mb * bw)
            whole = mb == rows          # head h + 1's rows follow head h's: one transfer for all
            for i, h in enumerate(hs if not whole else hs[:1]):
                pb.vdma(True, b["s"] + (h * rows + r0) * Lp * 2, Lp * 2, n * mb if whole else mb, Lb * 2,
                        P + i * mb * bw, bw)
            pb.vec(op="SCALE", a=P, d=X, n=Lb, rows=n * mb, a_fmt="BF16", d_fmt="FP32",
                   imm0=f32_imm(1.0 / math.sqrt(hd)), imm1=0x80000000)
            for i in range(n):
                pb.vec(op="SOFTMAX", a=X + i * mb * fw, d=P + i * mb * bw, n=Lb, rows=mb, a_fmt="FP32", d_fmt="BF16",
                       mask="CAUSAL", pos=pos0 + r0)
            for i, h in enumerate(hs if not whole else hs[:1]):
                pb.vdma(False, b["p"] + (h * rows + r0) * Lp * 2, Lp * 2, n * mb if whole else mb, Lb * 2,
                        P + i * mb * bw, bw)
            pb.spm_top = top

    def _softmax_one_token(self, pb, pos0, Lp, heads):
        """Scale + softmax of one token's scores for ``heads`` (consecutive: their score rows are ``Lp``
        apart): the heads are the rows of one instruction each, with the PREFIX mask (every row sees keys
        ``0..pos0``), instead of a load, two instructions and a store per head. The same bits: a row's max and
        sum do not depend on the other rows."""
        L, b, hd = pb.L, self.plan.buffers, self.shape.head_dim
        for i0, hn in self._groups(len(heads), fp32_words(L, Lp) + bf16_words(L, Lp)):
            h = heads[i0]
            top = pb.spm_top
            X = pb.spm(hn * fp32_words(L, Lp))
            P = pb.spm(hn * bf16_words(L, Lp))
            pb.vdma(True, b["s"] + h * Lp * 4, Lp * 4, hn, Lp * 4, X, fp32_words(L, Lp))
            pb.vec(op="SCALE", a=X, d=X, n=Lp, rows=hn, a_fmt="FP32", d_fmt="FP32",
                   imm0=f32_imm(1.0 / math.sqrt(hd)), imm1=0x80000000)
            pb.vec(op="SOFTMAX", a=X, d=P, n=Lp, rows=hn, a_fmt="FP32", d_fmt="BF16", mask="PREFIX", pos=pos0)
            pb.vdma(False, b["p"] + h * Lp * 2, Lp * 2, hn, Lp * 2, P, bf16_words(L, Lp))
            pb.spm_top = top

    def bias_act(self, pb, src, rows, n, bias, gelu, out_addr):
        """out (BF16) = act(src (FP32) + bias) over ``rows`` rows of ``n`` (``bias`` None: act(src))."""
        L = pb.L
        pb.spm_reset()
        fixed = 0
        if bias is not None:
            B = pb.spm(fp32_words(L, n))
            pb.vdma(True, bias, n * 4, 1, n * 4, B, fp32_words(L, n))
            fixed = fp32_words(L, n)
        for r0, rg in self._groups(rows, fp32_words(L, n) + bf16_words(L, n), fixed):
            top = pb.spm_top
            X = pb.spm(rg * fp32_words(L, n))
            O = pb.spm(rg * bf16_words(L, n))
            pb.vdma(True, src + r0 * n * 4, n * 4, rg, n * 4, X, fp32_words(L, n))
            if bias is None:        # bias already in src (a PIM GEMV's preload)
                pb.vec(op="GELU" if gelu else "COPY", a=X, d=O, n=n, rows=rg, a_fmt="FP32", d_fmt="BF16")
            elif gelu:
                pb.vec(op="ADD", a=X, b=B, d=X, n=n, rows=rg, a_fmt="FP32", b_fmt="FP32", d_fmt="FP32", b_mode="VEC")
                pb.vec(op="GELU", a=X, d=O, n=n, rows=rg, a_fmt="FP32", d_fmt="BF16")
            else:
                pb.vec(op="ADD", a=X, b=B, d=O, n=n, rows=rg, a_fmt="FP32", b_fmt="FP32", d_fmt="BF16", b_mode="VEC")
            pb.vdma(False, out_addr + r0 * n * 2, n * 2, rg, n * 2, O, bf16_words(L, n))
            pb.spm_top = top

    def residual(self, pb, x_addr, y_addr, rows, bias, out_addr):
        """out (FP32) = x + (y + bias) (bias None: already in y)."""
        d, L = self.shape.d_model, pb.L
        pb.spm_reset()
        fixed = 0
        if bias is not None:
            B = pb.spm(fp32_words(L, d))
            pb.vdma(True, bias, d * 4, 1, d * 4, B, fp32_words(L, d))
            fixed = fp32_words(L, d)
        for r0, rg in self._groups(rows, 2 * fp32_words(L, d), fixed):
            top = pb.spm_top
            X = pb.spm(rg * fp32_words(L, d))
            Y = pb.spm(rg * fp32_words(L, d))
            pb.vdma(True, x_addr + r0 * d * 4, d * 4, rg, d * 4, X, fp32_words(L, d))
            pb.vdma(True, y_addr + r0 * d * 4, d * 4, rg, d * 4, Y, fp32_words(L, d))
            if bias is not None:
                pb.vec(op="ADD", a=Y, b=B, d=Y, n=d, rows=rg, a_fmt="FP32", b_fmt="FP32", d_fmt="FP32", b_mode="VEC")
            pb.vec(op="ADD", a=X, b=Y, d=X, n=d, rows=rg, a_fmt="FP32", b_fmt="FP32", d_fmt="FP32", b_mode="ROW")
            pb.vdma(False, out_addr + r0 * d * 4, d * 4, rg, d * 4, X, fp32_words(L, d))
            pb.spm_top = top

    # -- FCs --------------------------------------------------------------------------------------
    def fc_mu(self, pb, a_addr, K, lay, N, rows, out_addr, name):
        blk = MuBlock()
        lp = self.plan.layers[self._layer]
        src = (Blocked(lp.lin[name], K, blocked_tile(self.cfg)) if name in lp.lin     # npu-mem, 4-bit PIM
               else PimWeights(lay, self.plan.row_bytes))
        gemm(self.cfg, blk, a_addr, K * 2, src, out_addr, N * 4, rows, K, N, False, pb.est)
        pb.mu(blk)
        pb.fence(Unit.MU)

    def fc_pim(self, pb, a_addr, K, lay, N, bias, out_addr, gelu=False, bf16=False, write_vec=True):
        from firmware import costmodel
        p, addr1 = self.cfg.pim, 0
        if p.lowprec:
            # 4-bit weights (W4GemvLayout): addr1[7:0] = the layout's input chunk in groups (hw/spec/macro.py).
            addr1 = lay.chunk // p.quant_group
            if p.act_format != "bf16":
                # WRITE_VEC takes E4M3 codes, which the vector unit does not write yet: timing only
                TIMING_ONLY.add(self.cfg)
        if write_vec:
            pb.pim(op=MacroOp.WRITE_VEC, n=K, addr0=a_addr)
        flags = (MacroFlag.BIAS if bias is not None else 0) | (MacroFlag.GELU if gelu else 0)
        pb.pim(op=MacroOp.GEMV, n=K, m=N, row=lay.base_row, addr0=bias or 0, flags=int(flags), addr1=addr1)
        pb.pim(op=MacroOp.READ_RES, n=N, addr0=out_addr, flags=int(MacroFlag.BF16) if bf16 else 0)
        pb.est["pim"] = pb.est.get("pim", 0) + costmodel.pim_fc_cycles(self.cfg, K, N, gelu, write_vec)

    def _fc1_pim(self, pb, lp):
        """Generation's FC1 on a BF16 PIM device, its GELU in the PIM AF units (one GEMV macro with ``GELU``,
        BF16 results) or on the vector unit (the GEMV with its bias preloaded, FP32 results, then ``GELU`` in the
        vector unit): ``gelu_unit``, ``auto`` the cheaper by the cost model. The AF step switches every bank to
        its LUT row and back once per tile; on the performance model the vector unit's GELU was cheaper on
        both presets (XL FC1 on ``ianus``: 17,745 -> 15,054 cycles; GPT-2 small on ``default``: 20,597 ->
        14,837). The two GELUs are different approximations (the AF's LUT, the vector unit's tanh form:
        the prefill's)."""
        from firmware import costmodel
        b, d, f = self.plan.buffers, self.shape.d_model, self.shape.ffn
        unit = costmodel.gelu_unit(self.cfg, d, f) if self.gelu_unit == "auto" else self.gelu_unit
        if unit == "pim":
            self.fc_pim(pb, b["h"], d, lp.fc1, f, lp.fc1_b, b["g"], gelu=True, bf16=True)
        else:
            self.fc_pim(pb, b["h"], d, lp.fc1, f, lp.fc1_b, b["y"])
            pb.fence(Unit.PCU)
            self.bias_act(pb, b["y"], 1, f, None, True, b["g"])
        pb.est["gelu_unit"] = unit

    def _qkv_attn_plain(self, pb, lp, pos0):
        b, d, H = self.plan.buffers, self.shape.d_model, self.shape.heads
        self.fc_pim(pb, b["h"], d, lp.qkv, 3 * d, lp.qkv_b, b["qkv"], bf16=True)
        pb.fence(Unit.PCU)
        self.scatter_qkv(pb, lp, 1, pos0, False, range(H), False)
        pb.fence(Unit.VQ)
        self.attention(pb, lp, 1, pos0, range(H))

    def _qkv_attn_split(self, pb, lp, pos0) -> int:
        """QKV GEMV per head group, the NPU attending to group g while PIM computes group g + 1; returns
        the cost model's estimate ``sum_g pim_g + sum_g npu_g``: nothing overlaps. The NPU's DRAM traffic
        waits while a PIM command holds the channels, and every step of a group's attention starts with
        DRAM traffic (the scatter's stores, the matrix unit's K / V loads, the scores' round trip), so its
        compute cannot run ahead either. The calibrated performance model agrees: on ``default`` (GPT-2
        small, 4 groups) the split took 1.09-1.12x the plain schedule's cycles, on ``ianus`` (XL) 1.10-1.19x;
        the estimate used to credit the NPU's compute against the next GEMV and chose the split."""
        cfg, plan, b, d, H = self.cfg, self.plan, self.plan.buffers, self.shape.d_model, self.shape.heads
        hpg = plan.hpg
        ng = 3 * self.shape.head_dim * hpg
        groups = H // hpg
        tiles = ng // lp.qkv.per_tile

        def npu():
            return pb.est.get("mu", 0) + pb.est.get("vq", 0), pb.est.get("npu_mem", 0)

        def issue(g):
            before = pb.est.get("pim", 0)
            lay = GemvLayout(cfg, d, ng, base_row=lp.qkv.base_row + g * tiles * lp.qkv.chunks)
            self.fc_pim(pb, b["h"], d, lay, ng, lp.qkv_b + g * ng * 4, b["qkv"] + g * ng * 2, bf16=True,
                        write_vec=(g == 0))
            return pb.est["pim"] - before

        total = issue(0)
        pb.fence(Unit.PCU)
        for g in range(groups):
            pim_next = issue(g + 1) if g + 1 < groups else 0     # PIM computes the next head group ...
            before = npu()
            heads = range(g * hpg, (g + 1) * hpg)
            self.scatter_qkv(pb, lp, 1, pos0, False, heads, False)   # ... while the NPU attends to this one
            pb.fence(Unit.VQ)
            self.attention(pb, lp, 1, pos0, heads)
            pb.fence(Unit.PCU)
            after = npu()
            total += after[0] - before[0] + pim_next
        return int(total)

    # -- stages ----------------------------------------------------------------------------------
    def stage(self, i, phase, name, rows, pos0) -> Stage:
        cfg, plan, lp = self.cfg, self.plan, self.plan.layers[i]
        self._layer = i
        d, f, H = self.shape.d_model, self.shape.ffn, self.shape.heads
        b = plan.buffers
        pb = ProgramBuilder(cfg)
        fenced = self.policy == "naive"
        xin = lp.x_in + pos0 * d * 4
        xout = lp.x_out + pos0 * d * 4
        where = ""
        if name == "ln1":
            self.layernorm(pb, xin, rows, lp.ln1, b["h"])
        elif name == "qkv_attn":
            where = self.mapping[(phase, "qkv")]
            if where == "mu":
                self.fc_mu(pb, b["h"], d, lp.qkv, 3 * d, rows, b["qkv"], "qkv")
                self.scatter_qkv(pb, lp, rows, pos0, True, range(H), True)
                pb.fence(Unit.VQ)
                self.attention(pb, lp, rows, pos0, range(H))
            elif self.policy in ("ianus", "hpim") and rows == 1:
                # Head-group pipelining (PIM computes group g + 1 while the NPU attends to group g) when
                # the cost model says the overlap beats its extra per-group overheads.
                split, split_est = ProgramBuilder(cfg), None
                if self.head_groups == "split" and cfg.pim.lowprec:
                    raise CompileError("the head-group split of the QKV GEMV needs the BF16 PIM layout (a 4-bit "
                                       "layout shares rows between head groups' tiles)")
                if H // plan.hpg > 1 and self.head_groups != "plain" and not cfg.pim.lowprec:
                    split_est = self._qkv_attn_split(split, lp, pos0)
                plain = ProgramBuilder(cfg)
                self._qkv_attn_plain(plain, lp, pos0)
                plain_est = sum(plain.est.get(k, 0) for k in ("pim", "mu", "vq", "fence"))
                if split_est is not None:
                    split_est += split.est.get("fence", 0)
                best = split if split_est is not None and (split_est < plain_est or self.head_groups == "split") \
                    else plain
                pb.words, pb.est = best.words, dict(best.est)
                pb.est["overlap"] = best is split
                pb.est["alternative"] = plain_est if best is split else split_est
                if best is split:
                    pb.est["split_total"] = split_est
            else:
                if rows != 1:
                    raise CompileError("PIM FCs run one token at a time (generation)")
                self._qkv_attn_plain(pb, lp, pos0)
        elif name == "proj":
            where = self.mapping[(phase, "proj")]
            if where == "mu":
                self.fc_mu(pb, b["o"], d, lp.proj, d, rows, b["y"], "proj")
                self.residual(pb, xin, b["y"], rows, lp.proj_b, b["x2"])
            else:
                self.fc_pim(pb, b["o"], d, lp.proj, d, lp.proj_b, b["y"])
                pb.fence(Unit.PCU)
                self.residual(pb, xin, b["y"], rows, None, b["x2"])
        elif name == "ln2":
            self.layernorm(pb, b["x2"], rows, lp.ln2, b["h"])
        elif name == "fc1":
            where = self.mapping[(phase, "fc1")]
            if where == "mu":
                self.fc_mu(pb, b["h"], d, lp.fc1, f, rows, b["y"], "fc1")
                self.bias_act(pb, b["y"], rows, f, lp.fc1_b, True, b["g"])
            elif cfg.pim.lowprec:
                # 4-bit PIM (issue 19): the GEMV program has no activation function (several tiles share a
                # row; the PCU refuses GELU with BAD_FLAGS), so FC1 leaves FP32 and its bias and GELU run on
                # the vector unit.
                self.fc_pim(pb, b["h"], d, lp.fc1, f, None, b["y"])
                pb.fence(Unit.PCU)
                self.bias_act(pb, b["y"], rows, f, lp.fc1_b, True, b["g"])
            else:
                self._fc1_pim(pb, lp)
        elif name == "fc2":
            where = self.mapping[(phase, "fc2")]
            if where == "mu":
                self.fc_mu(pb, b["g"], f, lp.fc2, d, rows, b["y"], "fc2")
                self.residual(pb, b["x2"], b["y"], rows, lp.fc2_b, xout)
            else:
                self.fc_pim(pb, b["g"], f, lp.fc2, d, lp.fc2_b, b["y"])
                pb.fence(Unit.PCU)
                self.residual(pb, b["x2"], b["y"], rows, None, xout)
        pb.end()
        if fenced:
            pb.words = _fence_pim(pb.words)
        est = dict(pb.est)
        from firmware import costmodel
        est["total"] = est.get("split_total") or costmodel.stage_total(est, overlap=False)
        return Stage(i, phase, pos0, name, pb.words, est, where)


def _fence_pim(words):
    """naive policy: every PIM instruction waits for all units before and is waited for after."""
    out = []
    all_units = int(Unit.MU | Unit.VQ | Unit.PCU)
    for w in words:
        if (w & 0xF) == SocOp.PIM:
            out.append(isa.encode(SocOp.FENCE, units=all_units))
            out.append(w)
            out.append(isa.encode(SocOp.FENCE, units=all_units))
        else:
            out.append(w)
    return out


# ---------------------------------------------------------------------------------------------
# Whole model
# ---------------------------------------------------------------------------------------------

@dataclass
class CompiledModel:
    cfg: SystemConfig
    shape: GptShape
    policy: str
    plan: MemoryPlan
    mapping: dict
    prefill: int
    total: int
    stages: list         # in execution order

    def program_bytes(self, stage: Stage) -> bytes:
        data = isa.to_bytes(stage.words)
        if len(data) > self.plan.prog_bytes:
            raise CompileError(f"stage {stage.name} of layer {stage.layer} is {len(data)} bytes of program; "
                               f"the program area holds {self.plan.prog_bytes}")
        return data


def choose_mapping(cfg, shape, policy, prefill) -> dict:
    """Algorithm 1: per phase and FC, PIM or matrix unit by the cost model (``npu-mem``: never PIM)."""
    from firmware import costmodel
    d, f = shape.d_model, shape.ffn
    fcs = {"qkv": (d, 3 * d), "proj": (d, d), "fc1": (d, f), "fc2": (f, d)}
    mapping = {}
    for phase, M in (("prefill", prefill), ("gen", 1)):
        for name, (K, N) in fcs.items():
            if policy == "npu-mem" or M != 1:
                mapping[(phase, name)] = "mu"
                continue
            mu = costmodel.mu_gemm_cycles(cfg, M, K, N, transposed=True)
            pim = M * costmodel.pim_fc_cycles(cfg, K, N, name == "fc1", True)
            mapping[(phase, name)] = "pim" if pim < mu else "mu"
    return mapping


def compile_model(cfg: SystemConfig, shape: GptShape, policy: str, prefill: int, total: int,
                  groups: int = 4, head_groups: str = "auto", head_batch: str = "auto",
                  attn_pipeline: str = "auto", gelu_unit: str = "auto") -> CompiledModel:
    if policy not in POLICIES:
        raise CompileError(f"policy must be one of {', '.join(POLICIES)}, not {policy!r}")
    if not 1 <= prefill <= total:
        raise CompileError(f"prefill ({prefill}) must be in 1..tokens ({total})")
    plan = plan_memory(cfg, shape, total, groups=groups, pim_layout=(policy != "npu-mem"),
                       kv_layout=kv_layout(cfg, shape, policy, head_batch))
    mapping = choose_mapping(cfg, shape, policy, prefill)
    lc = LayerCompiler(plan, policy, mapping, head_groups, head_batch, attn_pipeline, gelu_unit)
    stages = []
    for i in range(shape.layers):
        for name in STAGES:
            stages.append(lc.stage(i, "prefill", name, prefill, 0))
    for pos in range(prefill, total):
        for i in range(shape.layers):
            for name in STAGES:
                stages.append(lc.stage(i, "gen", name, 1, pos))
    return CompiledModel(cfg, shape, policy, plan, mapping, prefill, total, stages)
