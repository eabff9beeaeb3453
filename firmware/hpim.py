"""The ``hpim`` policy's generation attention (issue 20): QK and PV on the SRAM-PIM unit (SPU queue).

``hpim`` compiles like ``ianus`` (Algorithm 1 for the FCs, the QKV GEMV per head group in PIM while the
NPU attends to the previous group), except that in generation (one query row) the attention of a head
group runs on the SRAM-PIM unit behind the SPU queue (:mod:`hw.npu.spu`) instead of the matrix unit:

=====================  ===========================================================================
SLOAD K, SLOAD V       the group's K and V cache rows (``Lk = pos + 1`` keys) into the unit's lines:
                       one 3-D DMA each (regions = heads, positions = keys)
VLOAD q                the group's query row (BF16, scattered into the ``q`` buffer) into the
                       vector scratchpad; FENCE VQ
SPIM QK                scores of every head of the group (FP32) into the scratchpad; FENCE SPU
VECTOR SCALE, SOFTMAX  per head: ``* 1 / sqrt(head_dim)``, softmax over the ``Lk`` keys into BF16
                       probabilities; FENCE VQ
SPIM PV                the outputs (``head_dim`` FP32 per head) into the scratchpad; FENCE SPU
VECTOR COPY, VSTORE    per head FP32 -> BF16, then one VSTORE into the ``o`` buffer
=====================  ===========================================================================

The unit's rows: head ``j`` of the group keeps its keys from row ``j * rows_per_head`` and its values
from row ``(heads + j) * rows_per_head`` (``rows_per_head = ceil(Lk / macros)``). When a group's K and
V do not fit the unit's rows, its heads are attended in sub-groups that do; when a single head's do
not, :class:`firmware.compiler.CompileError` names the numbers. The head dimension must equal the
unit's ``word_lanes`` (the query is read as one whole row of the unit; no zero padding yet).

Vector work covers the group in one instruction each (SCALE, SOFTMAX, COPY) when SPIM's head pitches
(32-byte columns) are the vector unit's row pitches (``ceil(n / lanes)`` FP32 or ``ceil(n / 2 lanes)``
BF16 words of ``4 lanes`` bytes): always for the output COPY of head_dim 64 on 16 lanes, for the
softmax when the key count allows; otherwise one instruction per head (``rows = 1``).

The hook in :mod:`firmware.compiler`: ``LayerCompiler.attention`` calls :func:`attention` for one
query row under ``hpim``, and the generation stage ``qkv_attn`` takes ``ianus``'s head-group path.
"""

from __future__ import annotations

import math

from firmware.program import f32_imm
from hw.spec import soc_isa as isa
from hw.spec.soc_isa import SPIM_OVERHEAD, SocOp, Unit

__all__ = ["attention", "spim_cycles"]

COL = 32


def _cols(nbytes: int, word_cols: int) -> int:
    """Columns of ``nbytes``, rounded up to whole vector words (``word_cols`` columns each)."""
    c = -(-nbytes // COL)
    return -(-c // word_cols) * word_cols


def spim_cycles(cfg, pv: bool, count: int, heads: int) -> int:
    """The queue's cycles for one SPIM (:meth:`hw.npu.sram_pim.SramPimUnit.command_cycles` +
    :data:`hw.spec.soc_isa.SPIM_OVERHEAD`), from the configuration (tests/test_spu.py holds them equal)."""
    s = cfg.spu
    beats = s.word_lanes // s.mac_lanes
    groups = -(-count // s.macros)
    issue = heads * groups * beats
    lg = lambda n: n.bit_length() - 1          # noqa: E731
    if pv:
        lat = s.read_latency + 1 + 2 * lg(s.macros) + beats + 2
        return 1 + issue + lat + SPIM_OVERHEAD
    lat = s.read_latency + 1 + 2 * lg(s.mac_lanes) + 1 + 2
    return beats + issue + lat + SPIM_OVERHEAD


def attention(lc, pb, lp, pos0: int, heads, error=ValueError) -> None:
    """Emit the attention of ``heads`` for the query at position ``pos0`` (generation) into ``pb``
    (a :class:`firmware.compiler.ProgramBuilder`) of layer plan ``lp``; ``lc`` is the
    :class:`firmware.compiler.LayerCompiler`. Output: the heads' BF16 rows in the ``o`` buffer. ``error``:
    the exception class of a configuration or capacity error (the compiler passes its CompileError; this
    module does not import the compiler, which imports it)."""
    CompileError = error

    cfg, shape = lc.cfg, lc.shape
    s = cfg.spu
    if s is None:
        raise CompileError(f"policy hpim needs an SRAM-PIM unit; configuration {cfg.name!r} has none "
                           f"(SystemConfig.spu; presets tiny-hpim, default-hpim)")
    hd = shape.head_dim
    if hd != s.word_lanes:
        raise CompileError(f"policy hpim: head_dim ({hd}) must equal the SRAM-PIM unit's word_lanes "
                           f"({s.word_lanes}) of configuration {cfg.name!r}")
    heads = list(heads)
    Lk = pos0 + 1
    rph = -(-Lk // s.macros)
    fit = s.rows // (2 * rph)
    if fit < 1:
        raise CompileError(f"policy hpim: the K and V of one head over {Lk} keys need {2 * rph} rows per macro "
                           f"({s.macros} macros), the SRAM-PIM unit has {s.rows} (configuration {cfg.name!r})")
    for i in range(0, len(heads), fit):
        _group(lc, pb, lp, Lk, heads[i:i + fit], rph, error)


def _group(lc, pb, lp, Lk: int, heads: list, rph: int, error) -> None:
    cfg, shape = lc.cfg, lc.shape
    s = cfg.spu
    L = pb.L
    hd = shape.head_dim
    b = lc.plan.buffers
    M = s.macros
    n = len(heads)
    h0 = heads[0]
    word_cols = max(1, 4 * L // COL)            # columns per vector word

    def word(col):
        """Vector-word address of scratchpad column ``col`` (a word boundary)."""
        assert (col * COL) % (4 * L) == 0, (col, L)
        return col * COL // (4 * L)

    # Scratchpad regions (32-byte columns, vector-word aligned).
    pb.spm_reset()
    q_pitch = hd * 2 // COL
    s_pitch = _cols(4 * Lk, word_cols)
    p_pitch = _cols(2 * M * -(-Lk // M), word_cols)    # PV reads whole groups of macros keys
    o_pitch = _cols(4 * s.word_lanes, word_cols)
    ob_pitch = hd * 2 // COL
    if (hd * 2) % (4 * L):
        raise error(f"policy hpim: a head's BF16 output ({hd * 2} bytes) must be whole vector words "
                    f"({4 * L} bytes)")
    Q = pb.unit(pb.spm(word(_cols(n * hd * 2, word_cols))))
    S = pb.unit(pb.spm(word(n * s_pitch)))
    P = pb.unit(pb.spm(word(n * p_pitch)))
    O = pb.unit(pb.spm(word(n * o_pitch)))
    OB = pb.unit(pb.spm(word(_cols(n * hd * 2, word_cols))))

    # K and V of the group into the unit; q into the scratchpad.
    if lp.k_stride != hd * 2 or lp.v_stride != hd * 2:
        raise error("policy hpim: the K / V caches must be head-major (kv_layout 'head')")
    kv_stride = lp.kc[1] - lp.kc[0] if len(lp.kc) > 1 else 0
    k_base, v_base = 0, n * rph
    for cache, base in ((lp.kc, k_base), (lp.vc, v_base)):
        pb.words.append(isa.encode(SocOp.SLOAD, mem_addr=cache[h0], pos_stride=hd * 2, positions=Lk,
                                   region_stride=(cache[1] - cache[0]) if len(cache) > 1 else 0, regions=n,
                                   cols=hd * 2 // COL, line=base * M, line_stride=rph * M))
    assert all(lp.kc[h] == lp.kc[h0] + (h - h0) * kv_stride for h in heads)
    pb.vdma(True, b["q"] + h0 * hd * 2, n * hd * 2, 1, n * hd * 2, word(Q), word(_cols(n * hd * 2, word_cols)))
    pb.fence(Unit.VQ)
    # QK
    pb.words.append(isa.encode(SocOp.SPIM, mode=0, base=k_base, count=Lk, heads=n, stride=rph, spm_in=Q,
                               in_pitch=q_pitch, spm_out=S, out_pitch=s_pitch))
    spu = spim_cycles(cfg, False, Lk, n)
    pb.fence(Unit.SPU)
    # scale + softmax: one instruction for the group when SPIM's pitches are the vector unit's row pitches
    # (ceil(n / L) FP32 words, ceil(n / 2L) BF16 words), else one per head
    def rows_fit(pitch_cols, n_elems, fp32):
        per_word = L if fp32 else 2 * L
        return pitch_cols * COL == -(-n_elems // per_word) * 4 * L

    scale = dict(op="SCALE", a_fmt="FP32", d_fmt="FP32", imm0=f32_imm(1.0 / math.sqrt(hd)), imm1=0x80000000)
    softmax = dict(op="SOFTMAX", a_fmt="FP32", d_fmt="BF16", mask="NONE")
    if n > 1 and rows_fit(s_pitch, Lk, True) and rows_fit(p_pitch, Lk, False):
        pb.vec(a=word(S), d=word(S), n=Lk, rows=n, **scale)
        pb.vec(a=word(S), d=word(P), n=Lk, rows=n, **softmax)
    else:
        for j in range(n):
            a = word(S + j * s_pitch)
            pb.vec(a=a, d=a, n=Lk, rows=1, **scale)
            pb.vec(a=a, d=word(P + j * p_pitch), n=Lk, rows=1, **softmax)
    pb.fence(Unit.VQ)
    # PV
    pb.words.append(isa.encode(SocOp.SPIM, mode=1, base=v_base, count=Lk, heads=n, stride=rph, spm_in=P,
                               in_pitch=p_pitch, spm_out=O, out_pitch=o_pitch))
    spu += spim_cycles(cfg, True, Lk, n)
    pb.fence(Unit.SPU)
    # outputs: FP32 -> BF16, into the o buffer
    copy = dict(op="COPY", a_fmt="FP32", d_fmt="BF16")
    if n > 1 and rows_fit(o_pitch, hd, True) and rows_fit(ob_pitch, hd, False):
        pb.vec(a=word(O), d=word(OB), n=hd, rows=n, **copy)
    else:
        for j in range(n):
            pb.vec(a=word(O + j * o_pitch), d=word(OB + j * ob_pitch), n=hd, rows=1, **copy)
    pb.vdma(False, b["o"] + h0 * hd * 2, n * hd * 2, 1, n * hd * 2, word(OB), word(_cols(n * hd * 2, word_cols)))
    # The SPU's cycles stand in the matrix unit's place in the cost model's estimate (the NPU's compute).
    from firmware import costmodel
    sload = 2 * costmodel.vdma_cycles(cfg, n * Lk, hd * 2)
    pb.est["mu"] = pb.est.get("mu", 0) + spu + sload
    pb.est["npu_mem"] = pb.est.get("npu_mem", 0) + sload
