"""Batched generation (NeuPIMs, issue 18, RTL side): one generation step of B requests as SoC programs.

B requests each generate one token per step; each has its own KV cache and its own current length. Per
layer a step is seven programs (:data:`BATCH_STAGES`):

``ln1``, ``proj``, ``ln2``, ``fc1``, ``fc2``
    The compiler's own prefill stages (:meth:`firmware.compiler.LayerCompiler.stage`) with ``rows = B``: the
    layernorms, residuals, GELU and the FCs as GEMMs of B rows on the matrix unit.
``qkv``
    The QKV GEMM of B rows (:meth:`~firmware.compiler.LayerCompiler.fc_mu`), then the bias and the scatter
    (:meth:`BatchCompiler.scatter`): each row's Q into the Q buffer, its K and V rows appended to its own
    request's caches at its own position, in the layouts of the policy (below).
``attn``
    Attention of every request over its own cache; the results, BF16, into row ``r`` of the O buffer.

A joining request's prompt can be prefilled on the device (:meth:`BatchCompiler.prefill`): per layer the
compiler's own prefill stages over the prompt's rows, writing its K and V (npu-only: into the request's
caches; naive: into staging caches, then a ``kv_layout`` program copies them into the PIM layouts).

Policies (:data:`POLICIES`):

``npu-only``
    Attention on the NPU: the compiler's generation attention (:meth:`LayerCompiler.attention`: ``QK^T`` and
    ``P V`` on the matrix unit, scale and causal softmax on the vector unit) over the request's K and V
    caches, each ``[capacity, head_dim]`` BF16 row-major (token-major).
``naive``
    Attention in PIM, one row buffer, no overlap of the NPU stage with PIM: per request and head

    * K in the packed PIM GEMV layout of a ``[head_dim, capacity]`` weight matrix (:class:`firmware.pim.GemvLayout`
      with ``pitch`` and ``slot0``, the GEMV macro's ``addr1``: :mod:`hw.spec.macro`): token ``t`` is output
      ``t``, in bank ``t % banks``, channel ``(t // banks) % channels``, tile ``t // (banks * channels)`` in
      slot ``q = k_slot + tile`` counted from row ``k_row`` (``columns / k_pitch`` slots a row, ``k_pitch`` =
      ``head_dim / 16`` rounded up to a power of two), its ``head_dim`` values in columns ``(q % per_row) *
      k_pitch ..``; the heads of a layer take consecutive slots (:meth:`BatchPlan.pim_packing`). So ``scores =
      K q`` is one GEMV macro with ``N = L`` outputs and ``K = head_dim`` inputs (WRITE_VEC of q, GEMV,
      READ_RES FP32) whose tiles of one row run back to back in the open row. Appending token ``t`` writes its
      ``head_dim`` values into one bank row: one VSTORE of the scatter (contiguous bytes).
    * V as ``V^T`` (the weight matrix ``[L, head_dim]`` of ``o = p @ V``: dimension ``n`` is output ``n``, in
      bank ``n % banks``, channel ``(n // banks) % channels``, tile ``n // (banks * channels)`` packed like K
      from ``vt_row`` / ``vt_slot`` with ``vt_pitch`` = ``capacity / 16`` rounded up to a power of two; token
      ``t`` is lane ``t % 16`` of the tile's column ``t // 16``), so ``o = P V`` is one GEMV macro with ``K = L``
      inputs and ``N = head_dim`` outputs (WRITE_VEC of the probabilities, GEMV, READ_RES BF16 into the O
      buffer). With the Row-Channel-Bank-Column map the output rows of one tile's column are ``row_bytes``
      apart, one uniform stride (one VSTORE per tile). Appending token ``t`` changes one lane in each of the ``head_dim`` output rows.
      **Scheme:** a normal-layout copy of V is the source, kept group-major under naive (per layer
      ``[token group][head][16][head_dim]``: the 16 tokens of one group of all heads are ``16 x heads``
      consecutive rows), appended by the scatter like K. Per request one matrix-unit GEMM,
      ``I[hd, hd] @ W`` with ``W[k, 16 h + j] = V_h[16 g + j, k]`` read by the transposing LOAD
      (:class:`firmware.program.RowsN`), produces ``V^T`` of the new token's group ``g`` for every head
      (exact: one product by 1.0 per output, the rest exact zeros) into a scratch buffer ``[hd, 16 heads]``;
      the vector DMA loads it and writes, per head, column ``g`` of the ``head_dim`` output rows (one VSTORE of
      ``head_dim`` rows of 32 bytes, stride ``row_bytes``). The whole column is rewritten: its lanes after the
      new token come from V rows not written yet, which are zero (the runtime clears an allocation when a
      request joins), so they stay zero. Why this one: the vector DMA writes whole 32-byte columns only
      (``hw/npu/vector_queue.py`` drives an all-ones byte mask) and the vector unit cannot transpose; the
      matrix unit's transposing LOAD reads a group straight from the normal-layout copy, and its STORE is
      byte-masked only at the right edge of a row (``hw/npu/dma.py``, ``DmaStore``), so no DMA can write one
      lane alone; the group-major copy makes all heads of a request one GEMM (the identity is loaded once per
      request, not once per head), and the scratch buffer turns the GEMM's rows into the per-head column
      writes.
    * Softmax (scale ``1/sqrt(head_dim)``, causal mask at the request's last key) on the vector unit between
      the two GEMVs. The requests are software-pipelined: PIM computes request ``j + 1``'s scores while the
      vector unit normalises request ``j`` (scores and probabilities double-buffered in device memory).

    The V^T layout keeps one input chunk (``K = L <= gb_values``: a request's capacity is at most the global
    buffer's values, 128 on ``tiny`` and 1024 on ``default``) so that ``GemvLayout``'s rows do not move as L
    grows. Packing (issue 18): before the GEMV macro had a column offset, each tile of ``banks x channels``
    tokens of a head's K took a whole row index and used ``head_dim / 16`` of its columns (4 of 64 on
    ``default``): a naive request of 528 tokens (one GPT-2-small layer) needed 241 row indices against 25
    under npu-only, and every scores tile opened a row. Packed, 16 K tiles share a row on ``default`` (the
    528-token request: 13 K rows + 24 V^T rows + 13 of normal-layout V = 50 row indices).

``neupims``
    NeuPIMs' sub-batch interleaving on two row buffers (``pim.row_buffers == 2``: ``tiny-dualrb``,
    ``default-dualrb``; any other configuration is refused). The same per-request layouts, appends and
    attention programs as ``naive``. The batch rows are split into sub-batches A (rows ``0 .. k - 1``) and B
    (the rest); per layer five programs:

    ``ln1`` (all rows) -> ``qkv_a`` -> ``attn_a|qkv_b`` -> ``post_a|attn_b`` -> ``post_b``

    where ``post`` is the projection with its residual, ln2, FC1 with GELU and FC2 with its residual (the
    compiler's stages with a FENCE on the matrix and vector units between them), and ``x|y`` is one program
    merging two independent instruction streams (:func:`merge_streams`): A's PIM attention with B's QKV
    GEMM, scatter and V^T update, then B's PIM attention with A's ``post``. The dependences hold by
    construction: a sub-batch's attention runs in a program after the one that wrote its Q, K and V (a
    program's END waits for every unit), its ``post`` in a program after its attention; the two streams of a
    merged program touch disjoint rows of every buffer (:meth:`BatchCompiler._lc` with ``row0``), and only
    one attention runs at a time (the score and probability buffers are shared). Why merged programs and not
    FENCEs or semaphores across programs: the command processor dispatches in program order into shallow
    queues (matrix unit 4, macros 8, vector queue 8 instructions) and a FENCE stops all dispatch, so two
    streams run concurrently only when their instructions alternate in the program at about the rate the
    units consume them; :func:`merge_streams` interleaves them in order of the cost model's time
    (:func:`instruction_costs`), keeping each stream's FENCEs (which may also wait for the other stream's
    work on a shared unit, never too early) and every run of vector-queue instructions whole (the runs
    reuse scratchpad regions). The matrix unit's weight DMA reads proceed in the normal row buffers while the
    PCU's GEMVs hold the PIM row buffers (issue 17).

    Partition (:meth:`BatchCompiler.partition`, the runtime orders the rows before the step, so a step
    record's ``rids`` are in sub-batch order): the cost model estimates each request's attention from its KV
    length (:meth:`BatchCompiler.attn_est`) and each sub-batch's NPU programs from their compiled estimates;
    the requests are sorted by attention, A takes the lightest ``k`` (its attention hides behind B's QKV, the
    heavier B's behind A's ``post``, the longer NPU phase) and ``k`` minimises ``qkv(A) + max(attn(A),
    qkv(B)) + max(attn(B), post(A)) + post(B)``. Split mode ``auto`` (default) also weighs no split, i.e.
    naive's programs (on two row buffers), and takes it when the split is not cheaper: every weight is
    streamed once per sub-batch, and when a sub-batch's NPU programs cost as much as the whole batch's (up to
    ``array_rows`` rows, DMA-bound GEMMs: the RTL's case at B = 8) the split step is never shorter than the
    unsplit one (whatever attention it hides, it adds a second pass over the weights); it pays only when a
    sub-batch costs clearly less than the batch (a compute-bound matrix unit, NeuPIMs' case). The cost model
    is not calibrated: at B = 24 on ``default-dualrb`` it chose a split the RTL ran 0.78x as fast as naive
    (``sim/benchmarks/neupims_rtl.py``). Split mode ``always`` splits every step of two or more requests. The
    numerics are naive's bit for bit (only the order of independent work changes; a GEMM's rows do not
    depend on each other).

The memory plan is the compiler's (:func:`firmware.memory_plan.plan_memory` with ``max_tokens = max(max_batch,
max_prompt)`` and the matrix unit's column-block weights, :class:`firmware.program.Blocked`: in batched
generation every FC is a GEMM) plus, after it, the score / probability buffers, the identity matrix, the V^T
scratch buffer, ``io_slots`` slots of per-step hidden states (``layers + 1`` arrays of ``[max_batch,
d_model]`` FP32), the prefill's hidden states (and, naive, its staging K/V caches) and the program area; the
KV pool (whole row indices, :class:`firmware.batch_runtime.KvPool`) fills the rest of the data rows.

This module holds :func:`plan_batch` and the step compiler (:class:`BatchCompiler`); the plan's and a
request's layout types with their address arithmetic (:class:`~firmware.batch_plan.BatchPlan`,
:class:`~firmware.batch_plan.KvLayout`, :class:`BatchError`) are in :mod:`firmware.batch_plan`, neupims' merge
of two instruction streams (:func:`~firmware.batch_merge.merge_streams`,
:func:`~firmware.batch_merge.instruction_costs`) in :mod:`firmware.batch_merge`; all of them are importable
from here as well.
"""

from __future__ import annotations

import copy
import dataclasses
import math

import numpy as np

from firmware.batch_merge import instruction_costs, merge_streams
from firmware.batch_plan import PIM_POLICIES, POLICIES, BatchError, BatchPlan, KvLayout, gemv_layouts
from firmware.compiler import LayerCompiler, Stage
from firmware.gpt2 import GptShape
from firmware.memory_plan import ALIGN, plan_memory
from firmware.program import (
    CompileError,
    MuBlock,
    ProgramBuilder,
    RowsN,
    bf16_words,
    f32_imm,
    fp32_words,
    gemm,
    round_up,
)
from hw.spec import soc_isa as isa
from hw.spec.config import SystemConfig
from hw.spec.macro import MacroFlag, MacroOp
from hw.spec.soc_isa import SocOp, Unit

__all__ = ["POLICIES", "PIM_POLICIES", "SPLIT_MODES", "BATCH_STAGES", "BatchError", "KvLayout", "BatchPlan",
           "BatchCompiler", "plan_batch", "merge_streams", "instruction_costs", "gemv_layouts", "identity_bytes"]

SPLIT_MODES = ("auto", "always")
"""neupims: ``auto``: the cost model chooses two sub-batches or none (:meth:`BatchCompiler.partition`);
``always``: two sub-batches whenever there are two requests (the cost model chooses which)."""
BATCH_STAGES = ("ln1", "qkv", "attn", "proj", "ln2", "fc1", "fc2")


def plan_batch(cfg: SystemConfig, shape: GptShape, policy: str, max_batch: int, max_tokens: int,
               io_slots: int = 4, prog_bytes: int | None = None, max_prompt: int = 0) -> BatchPlan:
    """The memory plan of batched generation (module docstring). ``prog_bytes`` defaults to the programs of
    the largest step (``max_batch`` requests at ``max_tokens``) or prefill (``max_prompt`` tokens, when
    prompts are prefilled on the device: :meth:`BatchCompiler.prefill`) rounded up."""
    if policy not in POLICIES:
        raise BatchError(f"batched policy must be one of {', '.join(POLICIES)}, not {policy!r}")
    p = cfg.pim
    if p.channel_interleave and p.channels > 1:
        raise BatchError(f"configuration {cfg.name!r}: batched generation needs the Row-Channel-Bank-Column map "
                         f"(channel_interleave 0), not {p.channel_interleave}")
    if not 0 <= max_prompt < max_tokens:
        raise BatchError(f"max_prompt ({max_prompt}) must be in 0..max_tokens - 1 ({max_tokens - 1})")
    if max_batch < 1 or max_tokens < 1 or io_slots < 1:
        raise BatchError(f"max_batch ({max_batch}), max_tokens ({max_tokens}) and io_slots ({io_slots}) must be "
                         f"at least 1")
    hd = shape.head_dim
    if policy == "neupims" and p.row_buffers != 2:
        raise BatchError(f"policy neupims overlaps the NPU's DMA with PIM attention and needs two row buffers per bank "
                         f"(pim.row_buffers = 2: tiny-dualrb, default-dualrb); configuration {cfg.name!r} has "
                         f"{p.row_buffers}")
    if policy in PIM_POLICIES:
        if max_tokens > p.gb_values:
            raise BatchError(f"policy {policy} keeps V^T in one input chunk: max_tokens ({max_tokens}) must be at most "
                             f"the {p.gb_values} values of the global buffer of configuration {cfg.name!r}")
        if hd > p.gb_values or hd // p.lanes > p.columns:
            raise BatchError(f"head_dim {hd} exceeds a bank row / the global buffer of configuration {cfg.name!r}")
    try:
        plan = plan_memory(cfg, shape, max(max_batch, max_prompt), pim_layout=False)
    except CompileError as e:
        raise BatchError(str(e)) from None
    top = plan.top
    limit = p.data_rows * p.channels * p.banks * p.row_bytes

    def alloc(nbytes):
        nonlocal top
        a = round_up(top, ALIGN)
        top = a + round_up(nbytes, ALIGN)
        if top > limit:
            raise BatchError(f"device memory exhausted by the batch plan: need {top:#x} bytes of {limit:#x}")
        return a

    H, d, LP = shape.heads, shape.d_model, round_up(max_tokens, 16)
    s = [alloc(H * LP * 4) for _ in range(2)]
    pr = [alloc(H * LP * 2) for _ in range(2)]
    ident = alloc(hd * hd * 2)
    vt_scratch = alloc(max_batch * hd * 16 * H * 2)
    slots = [[alloc(max_batch * d * 4) for _ in range(shape.layers + 1)] for _ in range(io_slots)]
    bp = BatchPlan(cfg, shape, policy, max_batch, max_tokens, io_slots, plan, s, pr, ident, vt_scratch, slots, 0, 0,
                   (0, 0), max_prompt)
    if max_prompt:
        bp.pre_x = [alloc(max_prompt * d * 4) for _ in range(shape.layers + 1)]
        if policy in PIM_POLICIES:
            bp.pre_kv = tuple([alloc(max_prompt * hd * 2) for _ in range(H)] for _ in range(2))
    if prog_bytes is None:
        bp.prog_base = round_up(top, ALIGN)
        bp.prog_bytes = 1 << 40
        probe = BatchCompiler(bp)
        kv = bp.layout(0, max_tokens)
        splits = [0] + ([max_batch // 2] if policy == "neupims" and max_batch > 1 else [])
        prog_bytes = max(sum(round_up(32 * len(st.words), ALIGN) for st in
                             probe.step([(kv, max_tokens - 1)] * max_batch, 0, k)) for k in splits)
        if max_prompt:
            pre = probe.prefill(kv, max_prompt)
            prog_bytes = max(prog_bytes, sum(round_up(32 * len(st.words), ALIGN) for st in pre))
        prog_bytes = round_up(prog_bytes + prog_bytes // 8, 4096)
    bp.prog_base = alloc(prog_bytes)
    bp.prog_bytes = prog_bytes
    first = -(-top // bp.row_index_bytes)
    bp.pool_rows = (first, p.data_rows)
    if first >= p.data_rows:
        raise BatchError(f"no room left for a KV pool: the plan ends at row {first} of {p.data_rows}")
    return bp


# ---------------------------------------------------------------------------------------------
# Programs of one step
# ---------------------------------------------------------------------------------------------

class BatchCompiler:
    """Programs of one batched generation step (:meth:`step`)."""

    def __init__(self, bp: BatchPlan, split: str = "auto", timer=None):
        if split not in SPLIT_MODES:
            raise BatchError(f"neupims split mode must be one of {', '.join(SPLIT_MODES)}, not {split!r}")
        if timer is not None and not callable(timer):
            raise BatchError(f"the split timer must be callable (a step's stages -> cycles), not {timer!r}")
        self.bp = bp
        self.split = split
        self.timer = timer
        """neupims: ``timer(stages) -> cycles`` times a candidate step's programs (the caller's calibrated
        model: :func:`sim.batch_run.perf_timer`); given, :meth:`split_point` compiles the cost model's split,
        halves and (mode ``auto``) no split, and keeps the fastest by this timer instead of the cost model's
        estimate. The firmware itself has no timing model beyond :mod:`firmware.costmodel`."""
        self.cfg, self.shape = bp.cfg, bp.shape
        self.mapping = {(ph, fc): "mu" for ph in ("prefill", "gen") for fc in ("qkv", "proj", "fc1", "fc2")}

    def _lc(self, i: int, slot: int, row0: int = 0, **buffers) -> LayerCompiler:
        """The compiler's layer compiler over a copy of the plan: layer ``i``'s hidden states in step slot
        ``slot``, buffers overridden (``q``/``o`` of one request's row, ``s``/``p``); ``row0``: the stages
        work on batch rows from ``row0`` (a neupims sub-batch): the hidden states and every row buffer start
        ``row0`` rows in."""
        plan = copy.copy(self.bp.plan)
        xs = self.bp.slots[slot]
        d, f = self.shape.d_model, self.shape.ffn
        plan.layers = list(plan.layers)
        plan.layers[i] = dataclasses.replace(plan.layers[i], x_in=xs[i] + row0 * d * 4, x_out=xs[i + 1] + row0 * d * 4)
        row_bytes = {"h": d * 2, "qkv": 3 * d * 4, "q": d * 2, "o": d * 2, "y": max(d, f) * 4, "x2": d * 4,
                     "g": f * 2}
        plan.buffers = {k: v + row0 * row_bytes.get(k, 0) for k, v in plan.buffers.items()}
        plan.buffers.update(buffers)
        lc = LayerCompiler(plan, "npu-mem", self.mapping)
        lc._layer = i
        return lc

    def step(self, reqs: list, slot: int, split: int | None = None) -> list[Stage]:
        """Programs of one step: ``reqs`` = ``[(KvLayout, position of the new token), ...]`` in batch-row
        order; the step's input rows are in slot ``slot`` (layer 0), its outputs in its last array. neupims
        (two or more rows): sub-batch A is rows ``0 .. split - 1``, B the rest; ``split`` 0: no split (the
        naive programs); None: the cost model's choice for the rows as they are (:meth:`split_point`; the
        runtime orders the rows first, :meth:`partition`)."""
        bp, shape = self.bp, self.shape
        B = len(reqs)
        if not 1 <= B <= bp.max_batch:
            raise BatchError(f"a step has 1..{bp.max_batch} requests (max_batch), not {B}")
        for kv, pos in reqs:
            if not 0 <= pos < kv.capacity:
                raise BatchError(f"token position {pos} outside the request's capacity of {kv.capacity} tokens")
        if bp.policy == "neupims" and B > 1 and split != 0:
            if split is None:
                split = self.split_point(reqs)
            if split is not None:
                if not 1 <= split < B:
                    raise BatchError(f"a neupims split of {B} rows must be in 0..{B - 1}, not {split}")
                return self._neupims_step(reqs, slot, split)
        out = []
        for i in range(shape.layers):
            lc = self._lc(i, slot)
            for name in BATCH_STAGES:
                if name == "qkv":
                    st = self._qkv(lc, i, reqs)
                elif name == "attn":
                    st = self._attn(i, slot, reqs)
                else:
                    st = lc.stage(i, "prefill", name, B, 0)
                    st.phase = "batch"
                st.pos = max(pos for _, pos in reqs)
                out.append(st)
        return out

    def prefill(self, kv: KvLayout, P: int) -> list[Stage]:
        """Programs of a joining request's prefill of ``P`` prompt tokens (their hidden states in
        ``pre_x[0]``): per layer the compiler's own prefill stages (:data:`firmware.compiler.STAGES`, rows = P,
        causal attention over the prompt) writing the prompt's K and V, under npu-only straight into the
        request's caches, under naive into the normal-layout staging caches ``pre_kv``, which a ``kv_layout``
        program then copies into the request's layouts: K token by token into the PIM GEMV layout, V into the
        group-major copy, and V^T group by group (:meth:`vt_update`)."""
        bp, shape = self.bp, self.shape
        if not 1 <= P <= bp.max_prompt:
            raise BatchError(f"a prefill of {P} tokens: the plan prefills 1..{bp.max_prompt} (max_prompt)")
        if P >= kv.capacity:
            raise BatchError(f"a prompt of {P} tokens leaves no room in a capacity of {kv.capacity}")
        from firmware.compiler import STAGES
        out = []
        for i in range(shape.layers):
            plan = copy.copy(bp.plan)
            plan.layers = list(plan.layers)
            kc, vc = (kv.k[i], kv.v[i]) if bp.policy == "npu-only" else bp.pre_kv
            plan.layers[i] = dataclasses.replace(plan.layers[i], x_in=bp.pre_x[i], x_out=bp.pre_x[i + 1], kc=kc, vc=vc)
            lc = LayerCompiler(plan, "npu-mem", self.mapping)
            for name in STAGES:
                st = lc.stage(i, "prefill", name, P, 0)
                st.phase = "join"
                out.append(st)
                if name == "qkv_attn" and bp.policy in PIM_POLICIES:
                    out.append(self._kv_layout(i, kv, P))
        return out

    def _kv_layout(self, i: int, kv: KvLayout, P: int) -> Stage:
        """naive: the prefill's K and V (normal layout, ``pre_kv``) into the request's layouts."""
        bp, H, hd = self.bp, self.shape.heads, self.shape.head_dim
        pb = ProgramBuilder(self.cfg)
        W = pb.L
        pitch = bf16_words(W, hd)
        pu = pb.unit(pitch)
        rows = max(1, min(P, (self.cfg.npu.vector_spm_words - 8) // pitch))
        for h in range(H):
            for kind, src in ((0, bp.pre_kv[0][h]), (1, bp.pre_kv[1][h])):
                for t0 in range(0, P, rows):
                    n = min(rows, P - t0)
                    pb.spm_reset()
                    X = pb.spm(n * pitch)
                    pb.vdma(True, src + t0 * hd * 2, hd * 2, n, hd * 2, X, pitch)
                    xu = pb.unit(X)
                    if kind == 0:           # K: one bank row per token
                        for t in range(t0, t0 + n):
                            pb.vdma_units(False, bp.k_addr(kv, i, h, t), hd * 2, 1, hd * 2, xu + (t - t0) * pu, pu)
                    else:                   # V: runs of one 16-token group are contiguous in the group-major copy
                        t = t0
                        while t < t0 + n:
                            m = min(16 - t % 16, t0 + n - t)
                            pb.vdma_units(False, bp.v_addr(kv, i, h, t), hd * 2, m, hd * 2, xu + (t - t0) * pu, pu)
                            t += m
        pb.fence(Unit.VQ)
        groups = [(kv, min(16 * g + 15, P - 1)) for g in range(-(-P // 16))]
        for g0 in range(0, len(groups), bp.max_batch):
            self.vt_update(pb, i, groups[g0:g0 + bp.max_batch])
        pb.end()
        return Stage(i, "join", 0, "kv_layout", pb.words, _with_total(pb.est), "mu")

    # -- qkv ---------------------------------------------------------------------------------------
    def _qkv(self, lc: LayerCompiler, i: int, reqs, row0: int = 0, end: bool = True, name: str = "qkv") -> Stage:
        d, B = self.shape.d_model, len(reqs)
        pb = ProgramBuilder(self.cfg)
        b = lc.plan.buffers
        lc.fc_mu(pb, b["h"], d, None, 3 * d, B, b["qkv"], "qkv")
        self.scatter(pb, lc, i, reqs)
        pb.fence(Unit.VQ)
        if self.bp.policy in PIM_POLICIES:
            self.vt_update(pb, i, reqs, row0)
        if end:
            pb.end()
        return Stage(i, "batch", 0, name, pb.words, _with_total(pb.est), "mu")

    def scatter(self, pb, lc: LayerCompiler, i: int, reqs):
        """QKV rows (FP32 raw) + bias -> BF16; Q of every row into the Q buffer, each row's K and V into its
        request's caches at its position (K in the PIM layout under naive, one bank row)."""
        bp, shape = self.bp, self.shape
        d, H, hd, L = shape.d_model, shape.heads, shape.head_dim, pb.L
        n3, B = 3 * d, len(reqs)
        b, lp = lc.plan.buffers, lc.plan.layers[i]
        pb.spm_reset()
        bias = pb.spm(fp32_words(L, n3))
        pb.vdma(True, lp.qkv_b, n3 * 4, 1, n3 * 4, bias, fp32_words(L, n3))
        per_row = fp32_words(L, n3) + bf16_words(L, n3)
        pitch = bf16_words(L, n3)
        pu = pb.unit(pitch)
        for r0, rg in lc._groups(B, per_row, fp32_words(L, n3)):
            top = pb.spm_top
            T = pb.spm(rg * pitch)
            X = pb.spm(rg * fp32_words(L, n3))
            pb.vdma(True, b["qkv"] + r0 * n3 * 4, n3 * 4, rg, n3 * 4, X, fp32_words(L, n3))
            pb.vec(op="ADD", a=X, b=bias, d=T, n=n3, rows=rg, a_fmt="FP32", b_fmt="FP32", d_fmt="BF16",
                   b_mode="VEC")
            tu = pb.unit(T)
            for h in range(H):
                col = lc.plan.qkv_col(0, h) * 2 // 32
                pb.vdma_units(False, b["q"] + r0 * d * 2 + h * hd * 2, d * 2, rg, hd * 2, tu + col, pu)
            for r in range(r0, r0 + rg):
                kv, pos = reqs[r]
                for h in range(H):
                    kcol = lc.plan.qkv_col(1, h) * 2 // 32
                    vcol = lc.plan.qkv_col(2, h) * 2 // 32
                    row = tu + (r - r0) * pu
                    pb.vdma_units(False, bp.k_addr(kv, i, h, pos), hd * 2, 1, hd * 2, row + kcol, pu)
                    pb.vdma_units(False, bp.v_addr(kv, i, h, pos), hd * 2, 1, hd * 2, row + vcol, pu)
            pb.spm_top = top

    def vt_update(self, pb, i: int, reqs, row0: int = 0):
        """naive: V^T of the new token's 16-token group into column ``g`` of every head's output rows (module
        docstring): per request ``I[hd, hd] @ V[group g, all heads]^T`` on the matrix unit into the scratch
        buffer, then per head one VSTORE of ``head_dim`` 32-byte rows, stride ``row_bytes``."""
        bp, H, hd = self.bp, self.shape.heads, self.shape.head_dim
        p = self.cfg.pim
        n = 16 * H
        blk = MuBlock()
        for r, (kv, pos) in enumerate(reqs, row0):
            src = RowsN(bp.v_addr(kv, i, 0, pos // 16 * 16), hd * 2)
            gemm(self.cfg, blk, bp.ident, hd * 2, src, bp.vt_scratch + r * hd * n * 2, n * 2, hd, hd, n, True, pb.est)
        pb.mu(blk)
        pb.fence(Unit.MU)
        W = pb.L
        pitch = bf16_words(W, n)
        pb.spm_reset()
        X = pb.spm(hd * pitch)
        xu, pu = pb.unit(X), pb.unit(pitch)
        per_tile = p.banks * p.channels
        for r, (kv, pos) in enumerate(reqs, row0):
            pb.vdma(True, bp.vt_scratch + r * hd * n * 2, n * 2, hd, n * 2, X, pitch)
            for h in range(H):
                for n0 in range(0, hd, per_tile):       # one VSTORE per tile (tiles of a row: other columns)
                    rows = min(per_tile, hd - n0)
                    addr = bp.vt_addr(kv, i, h, n0, pos // 16)
                    assert bp.vt_addr(kv, i, h, n0 + rows - 1, pos // 16) == addr + (rows - 1) * p.row_bytes
                    pb.vdma_units(False, addr, p.row_bytes, rows, 32, xu + h + n0 * pu, pu)
        pb.fence(Unit.VQ)

    # -- attention ------------------------------------------------------------------------------------
    def _attn(self, i: int, slot: int, reqs) -> Stage:
        pb = ProgramBuilder(self.cfg)
        if self.bp.policy == "npu-only":
            d = self.shape.d_model
            base = self.bp.plan.buffers
            for r, (kv, pos) in enumerate(reqs):
                lc = self._lc(i, slot, q=base["q"] + r * d * 2, o=base["o"] + r * d * 2, s=self.bp.s[0],
                              p=self.bp.p[0])
                lp = dataclasses.replace(lc.plan.layers[i], kc=kv.k[i], vc=kv.v[i])
                lc.attention(pb, lp, 1, pos, range(self.shape.heads))
        else:
            self.pim_attention(pb, i, reqs)
        pb.end()
        return Stage(i, "batch", 0, "attn", pb.words, _with_total(pb.est),
                     "pim" if self.bp.policy in PIM_POLICIES else "mu")

    def pim_attention(self, pb, i: int, reqs, row0: int = 0):
        """naive and neupims (``reqs``: the rows from ``row0``): per request, scores in PIM, softmax on the vector unit, ``P V`` in PIM; PIM computes the next
        request's scores while the vector unit normalises this one's."""
        bp, shape = self.bp, self.shape
        d, H, hd, LP = shape.d_model, shape.heads, shape.head_dim, bp.LP
        q, o = bp.plan.buffers["q"], bp.plan.buffers["o"]
        from firmware import costmodel
        from firmware.batch_plan import gemv_layouts

        def pim(**f):
            pb.pim(**f)

        def scores(j):
            kv, pos = reqs[j]
            L = pos + 1
            for h in range(H):
                lay = gemv_layouts(bp, kv, i, h, L)[0]
                pim(op=MacroOp.WRITE_VEC, n=hd, addr0=q + (row0 + j) * d * 2 + h * hd * 2)
                pim(op=MacroOp.GEMV, n=hd, m=L, row=lay.base_row, addr1=lay.addr1)
                pim(op=MacroOp.READ_RES, n=L, addr0=bp.s[j % 2] + h * LP * 4)
                pb.est["pim"] = pb.est.get("pim", 0) + costmodel.pim_fc_cycles(self.cfg, hd, L, False, True,
                                                                               lay.pitch)

        def softmax(j):
            kv, pos = reqs[j]
            Lp = round_up(pos + 1, 16)
            W = pb.L
            fw, bw = fp32_words(W, Lp), bf16_words(W, Lp)
            pb.spm_reset()
            for h0, hg in self._head_groups():
                top = pb.spm_top
                X = pb.spm(hg * fw)
                P = pb.spm(hg * bw)
                pb.vdma(True, bp.s[j % 2] + h0 * LP * 4, LP * 4, hg, Lp * 4, X, fw)
                pb.vec(op="SCALE", a=X, d=X, n=Lp, rows=hg, a_fmt="FP32", d_fmt="FP32",
                       imm0=f32_imm(1.0 / math.sqrt(hd)), imm1=0x80000000)
                for h in range(hg):        # one row each: the causal mask's position is per row
                    pb.vec(op="SOFTMAX", a=X + h * fw, d=P + h * bw, n=Lp, rows=1, a_fmt="FP32", d_fmt="BF16",
                           mask="CAUSAL", pos=pos)
                pb.vdma(False, bp.p[j % 2] + h0 * LP * 2, LP * 2, hg, Lp * 2, P, bw)
                pb.spm_top = top

        def pv(j):
            kv, pos = reqs[j]
            L = pos + 1
            for h in range(H):
                lay = gemv_layouts(bp, kv, i, h, L)[1]
                pim(op=MacroOp.WRITE_VEC, n=L, addr0=bp.p[j % 2] + h * LP * 2)
                pim(op=MacroOp.GEMV, n=L, m=hd, row=lay.base_row, addr1=lay.addr1)
                pim(op=MacroOp.READ_RES, n=hd, addr0=o + (row0 + j) * d * 2 + h * hd * 2, flags=int(MacroFlag.BF16))
                pb.est["pim"] = pb.est.get("pim", 0) + costmodel.pim_fc_cycles(self.cfg, L, hd, False, True,
                                                                               lay.pitch)

        scores(0)
        pb.fence(Unit.PCU)
        for j in range(len(reqs)):
            softmax(j)
            if j + 1 < len(reqs):
                scores(j + 1)
            pb.fence(Unit.VQ)
            pv(j)
            pb.fence(Unit.PCU)

    # -- neupims: two sub-batches, one's NPU stage beside the other's PIM attention --------------------
    def _neupims_step(self, reqs, slot: int, k: int) -> list[Stage]:
        """Per layer five programs (module docstring, ``neupims``): ``ln1`` (all rows), ``qkv_a``,
        ``attn_a|qkv_b`` (A's attention in PIM merged with B's QKV GEMM, scatter and V^T update,
        :func:`merge_streams`), ``post_a|attn_b`` (A's projection, ln2, FC1, FC2 merged with B's attention)
        and ``post_b``."""
        shape, B = self.shape, len(reqs)
        ra, rb = reqs[:k], reqs[k:]
        out = []
        for i in range(shape.layers):
            lca, lcb = self._lc(i, slot, 0), self._lc(i, slot, k)
            st = self._lc(i, slot).stage(i, "prefill", "ln1", B, 0)
            st.phase = "batch"
            progs = [st, self._qkv(lca, i, ra, 0, name="qkv_a")]
            pa = ProgramBuilder(self.cfg)
            self.pim_attention(pa, i, ra, 0)
            progs.append(self._merged(i, "attn_a|qkv_b", pa, self._qkv(lcb, i, rb, k, end=False)))
            pb = ProgramBuilder(self.cfg)
            self.pim_attention(pb, i, rb, k)
            progs.append(self._merged(i, "post_a|attn_b", pb, self._post(lca, i, k)))
            progs.append(self._post(lcb, i, B - k, end=True))
            for st in progs:
                st.pos = max(pos for _, pos in reqs)
            out += progs
        return out

    def _post(self, lc: LayerCompiler, i: int, rows: int, end: bool = False) -> Stage:
        """proj, ln2, fc1, fc2 of ``rows`` rows (the compiler's stages, one program; a FENCE on the matrix and
        vector units where a stage's END was: the next stage reads what the last one's vector unit wrote)."""
        words, est = [], {}
        for n, name in enumerate(("proj", "ln2", "fc1", "fc2")):
            st = lc.stage(i, "prefill", name, rows, 0)
            assert st.words[-1] == isa.encode(SocOp.END)
            if n:
                words.append(isa.encode(SocOp.FENCE, units=int(Unit.MU | Unit.VQ)))
            words += st.words[:-1]
            for key, v in st.est.items():
                if key != "total" and isinstance(v, (int, float)):
                    est[key] = est.get(key, 0) + v
        if end:
            words.append(isa.encode(SocOp.END))
        return Stage(i, "batch", 0, "post_b" if end else "post", words, _with_total(est), "mu")

    def _merged(self, i: int, name: str, pim_pb, npu: Stage) -> Stage:
        words, (tp, tn) = merge_streams(self.cfg, pim_pb.words, npu.words)
        words.append(isa.encode(SocOp.END))
        est = {k: pim_pb.est.get(k, 0) + npu.est.get(k, 0) for k in set(pim_pb.est) | set(npu.est) if k != "total"}
        est["total"] = int(max(tp, tn))
        est["streams"] = (int(tp), int(tn))
        return Stage(i, "batch", 0, name, words, est, "pim")

    def _npu_est(self, m: int) -> tuple[int, int]:
        """Cost-model cycles of one sub-batch of ``m`` rows: its ``qkv`` program (GEMM, scatter, V^T update)
        and its proj, ln2, fc1, fc2 (the compiled programs' estimates: :func:`_with_total`), per layer."""
        cache = self.__dict__.setdefault("_npu_cache", {})
        if m not in cache:
            bp = self.bp
            kv = bp.layout(bp.pool_rows[0], 1)
            lc = self._lc(0, 0, 0)
            cache[m] = (self._qkv(lc, 0, [(kv, 0)] * m).est["total"], self._post(lc, 0, m).est["total"])
        return cache[m]

    def attn_est(self, pos: int) -> int:
        """Cost-model cycles of one request's attention in PIM at token position ``pos`` (the two GEMVs and
        the softmax of every head)."""
        from firmware import costmodel
        from hw.spec.vector_isa import vector_cycles
        H, hd, L = self.shape.heads, self.shape.head_dim, pos + 1
        (kp, _), (vp, _) = self.bp.pim_packing(L)         # packed GEMVs (V^T's pitch: the capacity's, at least L's)
        gemv = (costmodel.pim_fc_cycles(self.cfg, hd, L, False, True, kp)
                + costmodel.pim_fc_cycles(self.cfg, L, hd, pitch=vp))
        return H * (gemv + vector_cycles("SOFTMAX", round_up(L, 16), 1, self.cfg.npu.vector_lanes,
                                              acc_stages=self.cfg.npu.vec_acc_stages))

    def step_est(self, att_a: int, att_b: int, na: int, nb: int) -> int:
        """The cost model's neupims step of one layer: ``qkv(A) + max(attn(A), qkv(B)) + max(attn(B),
        post(A)) + post(B)`` (the layernorms and residuals left out: the same for every split)."""
        qa, pa = self._npu_est(na)
        qb, pb_ = self._npu_est(nb)
        return qa + max(att_a, qb) + max(att_b, pa) + pb_

    def none_est(self, att: int, m: int) -> int:
        """The cost model's step of one layer without a split (the naive programs): ``qkv + attn + post``."""
        q, p = self._npu_est(m)
        return q + att + p

    def split_point(self, reqs) -> int | None:
        """The contiguous split (A = rows ``0 .. k - 1``) of ``reqs`` in their order with the smallest
        :meth:`step_est` (ties: the one nearest halves); None (no split) under split mode ``auto`` when
        :meth:`none_est` is not larger. With a :attr:`timer`: that split, halves and (``auto``) no split, each
        compiled and timed, the fastest kept (ties: the cost model's split, then halves)."""
        att = [self.attn_est(pos) for _, pos in reqs]
        B = len(reqs)
        k = min(range(1, B), key=lambda k: (self.step_est(sum(att[:k]), sum(att[k:]), k, B - k), abs(2 * k - B)))
        if self.timer is not None:
            cands = [k] + ([B // 2] if B // 2 != k else []) + ([0] if self.split == "auto" else [])
            times = {c: float(self.timer(self.step(reqs, 0, split=c))) for c in cands}
            best = min(cands, key=lambda c: (times[c], cands.index(c)))
            return best or None
        if self.split == "auto" and self.none_est(sum(att), B) <= self.step_est(sum(att[:k]), sum(att[k:]), k, B - k):
            return None
        return k

    def partition(self, reqs) -> tuple[list[int], int | None]:
        """neupims: the order of the batch rows (indices into ``reqs``) and the split ``k`` (A = the first
        ``k``) the cost model chooses from the requests' KV lengths: requests sorted by their attention
        estimate (:meth:`attn_est`), A the lightest ``k``, B the rest (B's attention hides behind A's
        projection and FFN, the longer NPU phase; A's behind B's QKV), ``k`` minimising :meth:`step_est`;
        within a sub-batch the rows keep their order. Split mode ``auto``: ``(join order, 0)`` when the cost
        model's step without a split is not longer (:meth:`none_est`: the GEMMs of a sub-batch stream every
        weight again, which costs more than the attention it hides unless the attention is long). Other
        policies or one request: ``(join order, None)``."""
        B = len(reqs)
        if self.bp.policy != "neupims" or B < 2:
            return list(range(B)), None
        att = [self.attn_est(pos) for _, pos in reqs]
        idx = sorted(range(B), key=lambda j: (att[j], j))
        k = self.split_point([reqs[j] for j in idx])
        if k is None:
            return list(range(B)), 0
        return sorted(idx[:k]) + sorted(idx[k:]), k

    def _head_groups(self):
        W = self.cfg.npu.vector_lanes
        LP = self.bp.LP
        per = fp32_words(W, LP) + bf16_words(W, LP)
        avail = self.cfg.npu.vector_spm_words - 4 * max(1, 8 // W)
        hg = max(1, min(self.shape.heads, avail // per))
        if avail < per:
            raise BatchError(f"the vector scratchpad ({self.cfg.npu.vector_spm_words} words) cannot hold one head's "
                             f"scores and probabilities of {LP} keys")
        H = self.shape.heads
        return [(h0, min(hg, H - h0)) for h0 in range(0, H, hg)]


def _with_total(est: dict) -> dict:
    """The cost model's estimate of a stage (no overlap between units), as the compiler's stages carry it."""
    from firmware import costmodel
    est = dict(est)
    est["total"] = costmodel.stage_total(est, overlap=False)
    return est


def identity_bytes(hd: int) -> bytes:
    """The identity ``[hd, hd]`` in BF16 (the V^T update's left operand)."""
    from hw.spec import fp as G
    return G.bf16_bits(np.eye(hd, dtype=np.float32)).astype("<u2").tobytes()
