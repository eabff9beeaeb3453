"""The compiler's attention (:mod:`firmware.compiler`): the QKV scatter into the K / V caches, a prompt's causal
attention and one generated token's attention on the matrix and vector units, and the options that schedule them
(:data:`HEAD_BATCH`, :data:`ATTN_PIPELINE`). :class:`AttentionStages` is a part of
:class:`firmware.compiler.LayerCompiler` (it uses the layer compiler's plan, shape and options)."""

from __future__ import annotations

import math

from firmware.gpt2 import GptShape
from firmware.memory_plan import k_group
from firmware.program import (
    CompileError,
    HeadsK,
    HeadsN,
    MuBlock,
    RowsK,
    RowsN,
    bf16_words,
    f32_imm,
    fp32_words,
    gemm,
    round_up,
)
from hw.spec import soc_isa as isa
from hw.spec.config import SystemConfig
from hw.spec.soc_isa import Unit

__all__ = ["HEAD_BATCH", "head_batch_on", "ATTN_PIPELINE", "attn_pipeline_on", "ATTN_GROUP", "ATTN_GROUP_ROWS",
           "ATTN_SLOTS", "GEN_SLOTS", "kv_layout", "AttentionStages"]


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


class AttentionStages:
    """Scatter and attention emitters of :class:`firmware.compiler.LayerCompiler`."""

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
