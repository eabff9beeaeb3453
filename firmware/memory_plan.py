"""The compiler's memory plan (:mod:`firmware.compiler`): where every weight, activation, KV cache and
buffer of the compiled layers lives in device memory, and the packing of a layer's parameters.

:func:`plan_memory` lays out the FC weights (the PIM layout of :class:`firmware.pim.GemvLayout`, or under
npu-mem the matrix unit's column blocks, :class:`firmware.program.Blocked`), the per-layer parameters, the
hidden states, the KV caches and the shared buffers (:class:`MemoryPlan`, :class:`LayerPlan`);
:func:`pack_layer` turns a layer's weights into ``(address, bytes)`` pieces of that plan.

On a device with 4-bit PIM weights (``PimGeometry.lowprec``, issue 19) the FC weights are quantized
(:func:`firmware.quant.quantize_weights` in the device's format, round to nearest with group scales) and laid out
by :class:`firmware.pim_lowprec.W4GemvLayout` for the PIM GEMVs; the matrix unit has no 4-bit path, so its
FCs (the prefill's) read a BF16 copy of the *dequantized* weights in column blocks (:class:`Blocked`, as
under npu-mem): both units compute with the same quantized model, up to the copy's rounding to BF16 (the
dequantized values are exact in FP32: a 4-bit value times an FP16 scale). The copy costs 4x the 4-bit
weights' memory (a BF16 device would hold the one BF16 layout).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import numpy as np

from firmware.gpt2 import GptShape, LayerWeights
from firmware.pim import GemvLayout
from firmware.pim_lowprec import W4GemvLayout
from firmware.program import Blocked, CompileError, blocked_tile, round_up
from firmware.quant import quantize_weights
from hw.spec import fp as G
from hw.spec.addrmap import AddressMap
from hw.spec.config import SystemConfig

__all__ = ["ALIGN", "KV_LAYOUTS", "k_group", "LayerPlan", "MemoryPlan", "plan_memory", "quant_format", "quantized_weights", "pack_layer"]

ALIGN = 64


@dataclass
class LayerPlan:
    qkv: GemvLayout
    proj: GemvLayout
    fc1: GemvLayout
    fc2: GemvLayout
    ln1: int
    ln2: int
    qkv_b: int
    proj_b: int
    fc1_b: int
    fc2_b: int
    kc: list
    vc: list
    x_in: int        # [T, d] FP32 (hidden states entering the layer)
    x_out: int       # [T, d] FP32
    k_stride: int = 0    # bytes from one token to the next in a head's K cache (hd * 2, or k_group * hd * 2)
    v_stride: int = 0    # the same in a head's V cache
    lin: dict = field(default_factory=dict)     # npu-mem, 4-bit PIM: FC name -> address of W [K, N] BF16 (Blocked)


@dataclass
class MemoryPlan:
    cfg: SystemConfig
    shape: GptShape
    max_tokens: int
    hpg: int
    layers: list = field(default_factory=list)
    buffers: dict = field(default_factory=dict)
    prog_base: int = 0
    prog_bytes: int = 0
    top: int = 0

    @property
    def row_bytes(self) -> int:
        p = self.cfg.pim
        return p.channels * p.banks * p.row_bytes

    def qkv_perm(self) -> np.ndarray:
        """Column order of the stored W_qkv: head groups ``[Q_g | K_g | V_g]``."""
        d, hd, H, hpg = self.shape.d_model, self.shape.head_dim, self.shape.heads, self.hpg
        cols = []
        for g in range(H // hpg):
            for kind in range(3):
                for h in range(g * hpg, (g + 1) * hpg):
                    cols.extend(range(kind * d + h * hd, kind * d + (h + 1) * hd))
        return np.array(cols)

    def qkv_col(self, kind: int, h: int) -> int:
        hd, hpg = self.shape.head_dim, self.hpg
        g, j = divmod(h, hpg)
        return g * 3 * hd * hpg + kind * hd * hpg + j * hd


KV_LAYOUTS = ("head", "token")
"""How a layer's K and V caches are laid out: ``head``: a contiguous ``[T, hd]`` per head (a head's
transposed load stays in few DRAM rows); ``token``: the layout of generation attention batched across heads
(:data:`firmware.compiler.HEAD_BATCH`): groups of :func:`k_group` heads, ``[T, group * hd]`` each, token after
token. A tile of the step's ``Q K^T`` or ``P V`` weights is then one load per group instead of one per head,
and a transposed load's walk down the keys of one 32-byte column, then the next, stays in the rows it opened
(a group's token is a quarter of a DRAM row). XL on the ``ianus`` preset (24 heads), performance model, one
generation step's attention at position 160: 20.5k cycles with a GEMM per head and head-major caches, 12.8k
batched with V one ``[T, d]`` and K head-major, 9.5k with K in groups of 12 (1.5 KB a token), 9.6k with V in
the same groups, 10.4k with groups of 4 (512 bytes a token, :func:`k_group`). V in groups rather than one
``[T, d]`` (projection, XL, 64 generated): npu-mem's generation
attention 0.535 -> 0.448 ms per token at 128 input tokens, its summarization attention 4.53 -> 4.68 ms at 128
and 30.2 -> 27.8 ms at 512 (per-head P V loads read 128 bytes a token, 1.5 instead of 3 KB apart). The group
size: :func:`k_group`."""


def k_group(cfg: SystemConfig, shape: GptShape) -> int:
    """Heads per K / V cache group of the ``token`` layout: the largest divisor of the head count whose token
    (``group * head_dim`` BF16) fits a quarter of a DRAM row (512 bytes on the ``ianus`` preset).

    Measured on the performance model (``ianus`` preset): groups up to a whole row (2 KB) were better for
    GPT-2 XL / 2.5B (generation attention 2.41 / 2.26x its bound at 128 input tokens, against 2.54 / 2.55x
    with a quarter) but much worse for GPT-3 7B's 128-wide heads (npu-only attention of a 2,048-key request
    133k cycles per device against 49k with a GEMM per head and 47k with a quarter row): a transposed load
    walks one 32-byte column down 128 keys, then the next, and with a whole row per token those keys' rows
    crowd the channels' 128 banks. A quarter row was not slower than a GEMM per head on any shape tried."""
    hd, H = shape.head_dim, shape.heads
    return max([g for g in range(1, H + 1) if H % g == 0 and g * hd * 2 <= cfg.pim.row_bytes // 4] or [1])


def plan_memory(cfg: SystemConfig, shape: GptShape, max_tokens: int, groups: int = 4,
                pim_layout: bool = True, kv_layout: str = "head") -> MemoryPlan:
    """Addresses of everything. ``pim_layout=False`` (policy npu-mem: memory is plain DRAM) stores the FC
    weights in column blocks (:class:`Blocked`), the layout the matrix unit's non-transposed DMA streams
    fastest. ``kv_layout``: :data:`KV_LAYOUTS`."""
    if kv_layout not in KV_LAYOUTS:
        raise CompileError(f"kv_layout must be one of {', '.join(KV_LAYOUTS)}, not {kv_layout!r}")
    p = cfg.pim
    d, f, H, hd = shape.d_model, shape.ffn, shape.heads, shape.head_dim
    if d % 16 or hd % 16:
        raise CompileError(f"d_model ({d}) and head_dim ({hd}) must be multiples of 16 (32-byte rows)")
    hpg = max(1, H // groups)
    while H % hpg or (3 * hd * hpg) % (p.banks * p.channels):
        hpg += 1
        if hpg > H:
            raise CompileError(f"no head group of {shape.heads} heads of {hd} fills whole PIM tiles: 3 x head_dim "
                               f"x heads per group must be a multiple of the {p.banks * p.channels} banks "
                               f"(banks x channels) of configuration {cfg.name!r}")
    plan = MemoryPlan(cfg, shape, max_tokens, hpg)
    row_bytes = plan.row_bytes
    row = 0

    def layout(K, N):
        nonlocal row
        if row >= p.data_rows:
            raise CompileError("out of DRAM rows")
        lay = W4GemvLayout(cfg, K, N, base_row=row) if p.lowprec else GemvLayout(cfg, K, N, base_row=row)
        row += lay.rows_used
        return lay

    lays = []
    for _ in range(shape.layers):
        if not pim_layout:
            lays.append((None, None, None, None))
            continue
        try:
            lays.append((layout(d, 3 * d), layout(d, d), layout(d, f), layout(f, d)))
        except ValueError as e:
            raise CompileError(f"{shape.layers} layer(s) of d_model {d} do not fit the {p.data_rows} data rows "
                               f"of configuration {cfg.name!r}: {e}") from None
    top = row * row_bytes
    limit = p.data_rows * row_bytes

    def alloc(nbytes):
        nonlocal top
        a = round_up(top, ALIGN)
        top = a + round_up(nbytes, ALIGN)
        if top > limit:
            raise CompileError(f"device memory exhausted: need {top:#x} bytes of {limit:#x} "
                               f"(configuration {cfg.name!r}, {shape.layers} layers, {max_tokens} tokens)")
        return a

    T = max_tokens
    xs = [alloc(T * d * 4) for _ in range(shape.layers + 1)]
    gk = k_group(cfg, shape) if kv_layout == "token" else 1

    def caches(group):
        """Caches in groups of ``group`` heads, token-major within a group (``group`` 1: head-major)."""
        out = []
        for _ in range(H // group):
            base = alloc(T * group * hd * 2)
            out += [base + j * hd * 2 for j in range(group)]
        return out

    for i, (q, pr, f1, f2) in enumerate(lays):
        plan.layers.append(LayerPlan(
            qkv=q, proj=pr, fc1=f1, fc2=f2, ln1=alloc(d * 4), ln2=alloc(d * 4), qkv_b=alloc(3 * d * 4),
            proj_b=alloc(d * 4), fc1_b=alloc(f * 4), fc2_b=alloc(d * 4), kc=caches(gk),
            vc=caches(gk),
            x_in=xs[i], x_out=xs[i + 1], k_stride=gk * hd * 2, v_stride=gk * hd * 2))
        if not pim_layout or p.lowprec:     # 4-bit PIM: the matrix unit reads a BF16 copy (module docstring)
            nb = blocked_tile(cfg)
            plan.layers[-1].lin = {name: alloc(K * round_up(N, nb) * 2) for name, K, N in
                                   (("qkv", d, 3 * d), ("proj", d, d), ("fc1", d, f), ("fc2", f, d))}
    Tp = round_up(T, 16)
    b = plan.buffers
    b["h"] = alloc(T * d * 2)
    b["qkv"] = alloc(T * 3 * d * 4)
    b["q"] = alloc(T * d * 2)
    b["s"] = alloc(H * T * Tp * 4)
    b["p"] = alloc(H * T * Tp * 2)
    b["o"] = alloc(T * d * 2)
    b["y"] = alloc(T * max(d, f) * 4)
    b["x2"] = alloc(T * d * 4)
    b["g"] = alloc(T * f * 2)
    if kv_layout == "token":          # generation's block-diagonal query, zero off the diagonal (compiler.attention)
        b["qd"] = alloc(H * d * 2)
    plan.prog_base = round_up(top, ALIGN)       # programs follow (placed by firmware.runtime.build_job)
    plan.top = top
    return plan


def quant_format(cfg: SystemConfig) -> dict:
    """:func:`firmware.quant.quantize_weights`' format arguments for a device with 4-bit weights."""
    p = cfg.pim
    return dict(fmt=p.weight_format, group=p.quant_group, scale_format=p.scale_format, grid_choice=p.grid_choice)


def quantized_weights(plan: MemoryPlan, weights: list[LayerWeights]) -> list[LayerWeights]:
    """The model ``plan`` computes: ``weights`` with every FC matrix replaced by its dequantized 4-bit form
    (float32, exact) when the plan keeps them in the 4-bit PIM layout (:func:`pack_layer`), else ``weights``
    (a BF16 device, or npu-mem on any device: BF16 weights in column blocks)."""
    if not plan.layers or not isinstance(plan.layers[0].qkv, W4GemvLayout):
        return list(weights)
    fmt = quant_format(plan.cfg)
    return [replace(w, **{k: quantize_weights(getattr(w, k), **fmt).dequantize().astype(np.float32)
                          for k in ("qkv_w", "proj_w", "fc1_w", "fc2_w")}) for w in weights]


def pack_layer(plan: MemoryPlan, i: int, w: LayerWeights) -> list[tuple[int, bytes]]:
    """(address, bytes) pieces that put layer ``i``'s parameters in device memory."""
    lp = plan.layers[i]
    d = plan.shape.d_model
    out = []

    amap = AddressMap(plan.cfg.pim)                             # whole rows in address order

    def put_w(name, lay: GemvLayout | W4GemvLayout | None, mat):
        if isinstance(lay, W4GemvLayout):
            q = quantize_weights(mat, **quant_format(plan.cfg))
            arr = lay.image(q).transpose(2, 0, 1, 3, 4).copy().view("<u2")     # rows, ch, banks, cols, lanes
            out.append((amap.encode(lay.base_row, 0, 0, 0), amap.pack_rows(arr).astype("<u2").tobytes()))
            mat = q.dequantize().astype(np.float32)            # exact; the matrix unit's copy: RNE to BF16
        if name in lp.lin:
            packed = Blocked.pack(G.bf16_bits(mat), blocked_tile(plan.cfg))
            out.append((lp.lin[name], packed.astype("<u2").tobytes()))
        if isinstance(lay, GemvLayout):
            packed = lay.pack(G.bf16_bits(mat))                # [ch, banks, rows, cols, lanes]
            arr = packed.transpose(2, 0, 1, 3, 4)               # rows, ch, banks, cols, lanes
            out.append((amap.encode(lay.base_row, 0, 0, 0), amap.pack_rows(arr).astype("<u2").tobytes()))

    perm = plan.qkv_perm()
    put_w("qkv", lp.qkv, w.qkv_w[:, perm])
    put_w("proj", lp.proj, w.proj_w)
    put_w("fc1", lp.fc1, w.fc1_w)
    put_w("fc2", lp.fc2, w.fc2_w)

    def f32(a):
        return np.asarray(a, dtype=np.float32).astype("<f4").tobytes()

    def gb(g, b):
        bits = G.bf16_bits(g).astype(np.uint32) | (G.bf16_bits(b).astype(np.uint32) << 16)
        return bits.astype("<u4").tobytes()

    out += [(lp.ln1, gb(w.ln1_g, w.ln1_b)), (lp.ln2, gb(w.ln2_g, w.ln2_b)), (lp.qkv_b, f32(w.qkv_b[perm])),
            (lp.proj_b, f32(w.proj_b)), (lp.fc1_b, f32(w.fc1_b)), (lp.fc2_b, f32(w.fc2_b))]
    assert d
    return out

