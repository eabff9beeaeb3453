"""Compiler: GPT-2 decoder layers -> SoC programs (prefill of L tokens, generation steps).

This module holds the layer compiler (:class:`LayerCompiler`: layernorm, QKV scatter, attention, FCs and
residuals per stage; the scatter and attention in :mod:`firmware.attention`), the FC mapping
(:func:`choose_mapping`) and :func:`compile_model`. Its parts live in
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

from dataclasses import dataclass

from firmware.attention import (
    ATTN_GROUP,
    ATTN_PIPELINE,
    ATTN_SLOTS,
    GEN_SLOTS,
    HEAD_BATCH,
    AttentionStages,
    attn_pipeline_on,
    head_batch_on,
    kv_layout,
)
from firmware.gpt2 import GptShape
from firmware.memory_plan import MemoryPlan, pack_layer, plan_memory
from firmware.pim import GemvLayout
from firmware.program import (
    TIMING_ONLY,
    Blocked,
    CompileError,
    MuBlock,
    PimWeights,
    ProgramBuilder,
    bf16_words,
    blocked_tile,
    f32_imm,
    fp32_words,
    gemm,
)
from hw.spec import soc_isa as isa
from hw.spec.config import SystemConfig
from hw.spec.macro import MacroFlag, MacroOp
from hw.spec.soc_isa import SocOp, Unit

__all__ = ["POLICIES", "STAGES", "HEAD_BATCH", "ATTN_PIPELINE", "attn_pipeline_on", "CompileError", "MemoryPlan", "compile_model", "CompiledModel", "Stage",
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
"""How generation's QKV GEMV and attention are scheduled under ``ianus``: ``plain`` (one QKV GEMV, then the
attention of every head), ``split`` (a GEMV per head group, PIM computing group g + 1 while the NPU attends to
group g) or ``auto`` (the one the cost model estimates faster)."""
GELU_UNITS = ("auto", "pim", "vector")
"""Where generation's FC1 on a BF16 PIM device applies GELU (:meth:`LayerCompiler._fc1_pim`)."""


class LayerCompiler(AttentionStages):
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
