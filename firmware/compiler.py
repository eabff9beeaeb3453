"""Compiler: GPT-2 decoder layers -> SoC programs (prefill of L tokens, generation steps).

Memory plan (device byte addresses, Row-Channel-Bank-Column): every FC weight
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
from dataclasses import dataclass, field

import numpy as np

from firmware.gpt2 import GptShape, LayerWeights
from firmware.pim import GemvLayout
from hw.config import SystemConfig
from hw.memif import AddressMap
from hw.spec import fp as G
from hw.spec import matrix_isa as mu_isa
from hw.spec import soc_isa as isa
from hw.spec import vector_isa as vu
from hw.spec.macro import Macro, MacroFlag, MacroOp
from hw.spec.macro import encode as macro_encode
from hw.spec.soc_isa import SocOp, Unit

__all__ = ["POLICIES", "STAGES", "CompileError", "MemoryPlan", "compile_model", "CompiledModel", "Stage"]

POLICIES = ("ianus", "npu-mem", "naive", "hpim")
STAGES = ("ln1", "qkv_attn", "proj", "ln2", "fc1", "fc2")
ALIGN = 64


class CompileError(ValueError):
    pass


#: Configurations whose compiled programs read PIM-layout weights with a timing stand-in
#: (:meth:`PimWeights.loads`): fine for the performance model, not for functional execution.
TIMING_ONLY: set = set()


def _f32(x: float) -> int:
    return int(G.f32_bits(np.float32(x)))


def _up(x: int, a: int) -> int:
    return -(-x // a) * a


# ---------------------------------------------------------------------------------------------
# Matrix-unit blocks: instructions with dependencies -> semaphores
# ---------------------------------------------------------------------------------------------

_QUEUE = {mu_isa.Opcode.LOAD: 0, mu_isa.Opcode.COMPUTE: 1, mu_isa.Opcode.STORE: 2, mu_isa.Opcode.NOP: 1}
_PAIRS = [(x, y) for x in range(3) for y in range(3) if x != y]
_SEM = {p: i for i, p in enumerate(_PAIRS)}


class MuBlock:
    """Matrix-unit instructions with explicit producer dependencies; :meth:`words` assigns tokens.

    A consumer waits on one semaphore per source queue, for the latest producer it needs from that
    queue, and only when no earlier instruction of its own queue already waited for a later one;
    only producers that some consumer waits for signal, so every token is taken (no leftovers).
    """

    def __init__(self):
        self.ins: list[dict] = []
        # Scratchpad double-buffer state shared by every GEMM of the block: the next buffer of each kind
        # and the last instruction that used each buffer (so a later GEMM waits for an earlier one).
        self.bufs = {"act": 0, "wgt": 0, "acc": 0}
        self.last_c: dict = {}
        self.last_s: dict = {}

    def add(self, opcode, deps=(), **fields) -> int:
        self.ins.append({"opcode": opcode, "deps": [d for d in deps if d is not None], "fields": fields,
                         "wait": 0, "signal": 0})
        return len(self.ins) - 1

    def words(self) -> list[int]:
        pos, seen = [], [0, 0, 0]
        for ins in self.ins:
            q = _QUEUE[ins["opcode"]]
            pos.append(seen[q])
            seen[q] += 1
        satisfied = {}
        for ins in self.ins:
            y = _QUEUE[ins["opcode"]]
            for x in range(3):
                if x == y:
                    continue
                cands = [d for d in ins["deps"] if _QUEUE[self.ins[d]["opcode"]] == x]
                if not cands:
                    continue
                prod = max(cands, key=lambda d: pos[d])
                if pos[prod] > satisfied.get((x, y), -1):
                    ins["wait"] |= 1 << _SEM[(x, y)]
                    self.ins[prod]["signal"] |= 1 << _SEM[(x, y)]
                    satisfied[(x, y)] = pos[prod]
        return [mu_isa.encode(ins["opcode"], wait=ins["wait"], signal=ins["signal"], **ins["fields"])
                for ins in self.ins]


# ---------------------------------------------------------------------------------------------
# Weight sources for the matrix unit
# ---------------------------------------------------------------------------------------------

@dataclass
class PimWeights:
    """``W [K, N]`` in the PIM layout at ``layout`` (addresses from ``row_bytes``)."""
    layout: GemvLayout
    row_bytes: int          # bytes of one row index over all channels and banks

    def nt(self, cfg):
        return self.layout.per_tile

    def chunk(self):
        return self.layout.chunk

    def loads(self, n0, nt, k0, kt):
        """Transposed loads of outputs ``n0 .. n0+nt`` (one tile) x inputs ``k0 .. k0+kt`` (one chunk).

        Row-Channel-Bank-Column: the tile's bank rows are ``row_bytes`` apart in output order, one load.
        Channel-interleaved map: one load per channel (its banks' rows are ``1 << bank_lo`` apart) and per
        run of ``channel_interleave`` bytes of the row, each into its place in the weight scratchpad
        (``spm_off`` words; a transposed load fills whole words of ``array_cols`` outputs, so a channel's
        ``banks`` outputs must be a multiple of them). When they are not (the ``ianus`` preset: 16 banks,
        64 array columns), the loads are a timing stand-in for the projection (:data:`TIMING_ONLY`,
        refused by :mod:`firmware.runtime`): with a one-row interleave one load of rows ``row_bytes``
        apart (the same bytes and DRAM rows, bank-major instead of channel-major), with shorter runs the
        per-channel loads (the right bytes; channels share scratchpad words)."""
        cfg = self.layout.cfg
        p = cfg.pim
        lay = self.layout
        tile, nloc = divmod(n0, lay.per_tile)
        assert nloc + nt <= lay.per_tile
        ch, koff = divmod(k0, lay.chunk)
        row = lay.row_of(tile, ch)
        amap = AddressMap(p)
        il = p.channel_interleave if p.channels > 1 else 0
        if not il:
            addr = amap.encode(row, 0, 0, 0) + nloc * p.row_bytes + koff * 2
            return [dict(transpose=1, mem_addr=addr, mem_stride=p.row_bytes, rows=nt, cols=kt)]
        W = cfg.npu.array_cols
        B = p.banks
        exact = B % W == 0
        if not exact:
            TIMING_ONLY.add(cfg)
            if il == p.row_bytes:
                addr = amap.encode(row, 0, 0, 0) + nloc * p.row_bytes + koff * 2
                return [dict(transpose=1, mem_addr=addr, mem_stride=p.row_bytes, rows=nt, cols=kt)]
            # shorter runs: the per-channel loads below move the right bytes, but channels share a
            # scratchpad word (timing stand-in as well)
        run_vals = il // 2
        bank_step = 1 << amap.bank_lo
        out = []
        n = nloc
        while n < nloc + nt:
            c, b = divmod(n, B)
            cnt = min(B - b, nloc + nt - n)
            assert (n - nloc) % W == 0 or not exact, (n, nloc, W)
            k = koff
            while k < koff + kt:
                piece = min(koff + kt - k, run_vals - k % run_vals)
                addr = amap.encode(row, c, b, k // p.lanes) + (k % p.lanes) * 2
                out.append(dict(transpose=1, mem_addr=addr, mem_stride=bank_step, rows=cnt, cols=piece,
                                spm_off=(n - nloc) // W * kt + (k - koff)))
                k += piece
            n += cnt
        return out


@dataclass
class RowsN:
    """``W^T`` stored as rows ``n`` of ``K`` BF16 (the K cache: ``W[k, n] = K[n, k]``)."""
    addr: int
    stride: int

    def nt(self, cfg):
        return 4 * cfg.npu.array_cols

    def chunk(self):
        return None

    def loads(self, n0, nt, k0, kt):
        return [dict(transpose=1, mem_addr=self.addr + n0 * self.stride + k0 * 2, mem_stride=self.stride,
                     rows=nt, cols=kt)]


@dataclass
class RowsK:
    """``W`` stored as rows ``k`` of ``N`` BF16 (the V cache)."""
    addr: int
    stride: int

    def nt(self, cfg):
        return 4 * cfg.npu.array_cols

    def chunk(self):
        return None

    def loads(self, n0, nt, k0, kt):
        return [dict(transpose=0, mem_addr=self.addr + k0 * self.stride + n0 * 2, mem_stride=self.stride,
                     rows=kt, cols=nt)]


def blocked_tile(cfg) -> int:
    """Columns per block of the npu-mem weight layout (:class:`Blocked`)."""
    return 4 * cfg.npu.array_cols


@dataclass
class Blocked:
    """npu-mem weights: ``W [K, N]`` in column blocks of ``nb`` (block ``j`` = ``W[:, j nb:(j+1) nb]``
    stored row after row, ``K x nb``, contiguous), so the matrix unit's non-transposed loads stream whole
    DRAM rows in order (row-major ``[K, N]`` would open a new row every few columns)."""
    addr: int
    K: int
    nb: int

    def nt(self, cfg):
        return self.nb

    def chunk(self):
        return None

    def loads(self, n0, nt, k0, kt):
        j, off = divmod(n0, self.nb)
        assert off + nt <= self.nb
        return [dict(transpose=0, mem_addr=self.addr + (j * self.K + k0) * self.nb * 2 + off * 2,
                     mem_stride=self.nb * 2, rows=kt, cols=nt)]

    @staticmethod
    def pack(w_bits: np.ndarray, nb: int) -> np.ndarray:
        K, N = w_bits.shape
        nblk = -(-N // nb)
        out = np.zeros((nblk, K, nb), dtype=np.uint16)
        for j in range(nblk):
            part = w_bits[:, j * nb:(j + 1) * nb]
            out[j, :, :part.shape[1]] = part
        return out


def gemm(cfg: SystemConfig, blk: MuBlock, a_addr, a_stride, w, out_addr, out_stride, M, K, N, out_bf16,
         est: dict | None = None):
    """``out[M, N] = A[M, K] @ W[K, N]`` on the matrix unit (tiled, double-buffered)."""
    npu = cfg.npu
    R, C = npu.array_rows, npu.array_cols
    AW, WW, CW = npu.act_spm_words // 2, npu.wgt_spm_words // 2, npu.acc_spm_words // 2
    Nt = min(_up(N, C), w.nt(cfg))
    nbt = -(-Nt // C)
    kq = math.lcm(16, R)
    chunk = w.chunk() or K
    kt_max = min(_up(K, kq), _up(chunk, kq), (WW // nbt) // kq * kq)
    if kt_max < kq:
        raise CompileError(f"weight scratchpad ({npu.wgt_spm_words} words) too small for a {Nt}-column tile")
    Mt = min(M, CW // nbt, AW // -(-min(kt_max, K) // R))
    while Mt < 1 and kt_max > kq:
        kt_max -= kq
        Mt = min(M, CW // nbt, AW // -(-kt_max // R))
    if Mt < 1:
        raise CompileError("scratchpads too small for one row of this GEMM")
    ktiles = []
    for c0 in range(0, K, chunk):
        c1 = min(K, c0 + chunk)
        for k0 in range(c0, c1, kt_max):
            ktiles.append((k0, min(kt_max, c1 - k0)))
    ntiles = [(n0, min(Nt, N - n0)) for n0 in range(0, N, Nt)]
    Gn = max(1, min(len(ntiles), CW // (nbt * Mt)))
    esize = 2 if out_bf16 else 4
    last_c, last_s, bufs = blk.last_c, blk.last_s, blk.bufs
    L, Cc, S = mu_isa.Opcode.LOAD, mu_isa.Opcode.COMPUTE, mu_isa.Opcode.STORE
    for m0 in range(0, M, Mt):
        mt = min(Mt, M - m0)
        for gs in range(0, len(ntiles), Gn):
            grp = ntiles[gs:gs + Gn]
            ab = bufs["acc"]
            acc_base = ab * CW
            c = None
            for ki, (k0, kt) in enumerate(ktiles):
                b = bufs["act"]
                la = blk.add(L, [last_c.get(("act", b))], target=mu_isa.Target.ACT, transpose=0,
                             mem_addr=a_addr + m0 * a_stride + k0 * 2, mem_stride=a_stride, rows=mt, cols=kt,
                             spm_addr=b * AW, spm_stride=mt)
                for j, (n0, nt) in enumerate(grp):
                    wb = bufs["wgt"]
                    lw = None
                    for ld in w.loads(n0, nt, k0, kt):
                        off = ld.pop("spm_off", 0)
                        lw = blk.add(L, [last_c.get(("wgt", wb))], target=mu_isa.Target.WGT,
                                     spm_addr=wb * WW + off, spm_stride=kt, **ld)
                    deps = [la, lw] + ([last_s.get(ab)] if ki == 0 else [])
                    c = blk.add(Cc, deps, accumulate=int(ki > 0), act_addr=b * AW, act_stride=mt,
                                wgt_addr=wb * WW, wgt_stride=kt, acc_addr=acc_base + j * nbt * mt, acc_stride=mt,
                                m=mt, k=kt, n=nt)
                    last_c[("wgt", wb)] = c
                    bufs["wgt"] ^= 1
                last_c[("act", b)] = c
                bufs["act"] ^= 1
            n0g = grp[0][0]
            cols = sum(nt for _, nt in grp)
            s = blk.add(S, [c], bf16=int(out_bf16), mem_addr=out_addr + m0 * out_stride + n0g * esize,
                        mem_stride=out_stride, rows=mt, cols=cols, spm_addr=acc_base, spm_stride=mt)
            last_s[ab] = s
            bufs["acc"] ^= 1
    if est is not None:
        from firmware import costmodel
        mem, comp = costmodel.mu_gemm_parts(cfg, M, K, N, transposed=isinstance(w, (PimWeights, RowsN)))
        est["mu"] = est.get("mu", 0) + mem + comp
        est["npu_mem"] = est.get("npu_mem", 0) + mem


# ---------------------------------------------------------------------------------------------
# Programs
# ---------------------------------------------------------------------------------------------

class ProgramBuilder:
    def __init__(self, cfg: SystemConfig):
        self.cfg = cfg
        self.words: list[int] = []
        self.L = cfg.npu.vector_lanes
        self.spm_top = 0
        self.est = {}

    # vector scratchpad regions (words), 32-byte aligned
    def spm_reset(self):
        self.spm_top = 0

    def spm(self, words: int) -> int:
        a = _up(self.spm_top, max(1, 8 // self.L))
        self.spm_top = a + words
        if self.spm_top > self.cfg.npu.vector_spm_words:
            raise CompileError(f"vector scratchpad overflow: {self.spm_top} > {self.cfg.npu.vector_spm_words} words")
        return a

    def unit(self, word_addr: int) -> int:
        b = word_addr * 4 * self.L
        assert b % 32 == 0
        return b // 32

    def fence(self, units):
        from firmware import costmodel
        self.words.append(isa.encode(SocOp.FENCE, units=int(units)))
        self.est["fence"] = self.est.get("fence", 0) + costmodel.FENCE_CYCLES

    def end(self):
        self.words.append(isa.encode(SocOp.END))

    def mu(self, blk: MuBlock):
        for w in blk.words():
            self.words.append(isa.encode(SocOp.MATRIX, word=w))

    def vec(self, **fields):
        self.words.append(isa.encode(SocOp.VECTOR, word=vu.encode(**fields)))
        from firmware import costmodel
        self.est["vq"] = self.est.get("vq", 0) + costmodel.vector_cycles(self.cfg, fields)

    def vdma(self, load, mem_addr, mem_stride, rows, row_bytes, spm_word, spm_pitch_words):
        assert row_bytes % 32 == 0, row_bytes
        self.words.append(isa.encode(SocOp.VLOAD if load else SocOp.VSTORE, mem_addr=mem_addr,
                                     mem_stride=mem_stride, rows=rows, cols=row_bytes // 32,
                                     spm_addr=self.unit(spm_word), spm_pitch=self.unit(spm_pitch_words)))
        from firmware import costmodel
        c = costmodel.vdma_cycles(self.cfg, rows, row_bytes)
        self.est["vq"] = self.est.get("vq", 0) + c
        self.est["npu_mem"] = self.est.get("npu_mem", 0) + c

    def pim(self, **fields):
        w = macro_encode(Macro(**fields))
        self.words.append(isa.encode(SocOp.PIM, word=sum(v << (32 * i) for i, v in enumerate(w))))


def _fp32_words(L, n):
    return -(-n // L)


def _bf16_words(L, n):
    return -(-n // (2 * L))


# ---------------------------------------------------------------------------------------------
# Memory plan
# ---------------------------------------------------------------------------------------------

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
    lin: dict = field(default_factory=dict)     # npu-mem: FC name -> address of row-major W [K, N] BF16


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


def plan_memory(cfg: SystemConfig, shape: GptShape, max_tokens: int, groups: int = 4,
                pim_layout: bool = True) -> MemoryPlan:
    """Addresses of everything. ``pim_layout=False`` (policy npu-mem: memory is plain DRAM) stores the FC
    weights in column blocks (:class:`Blocked`), the layout the matrix unit's non-transposed DMA streams
    fastest."""
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
        lay = GemvLayout(cfg, K, N, base_row=row) if row < p.data_rows else None
        if lay is None:
            raise CompileError("out of DRAM rows")
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
        a = _up(top, ALIGN)
        top = a + _up(nbytes, ALIGN)
        if top > limit:
            raise CompileError(f"device memory exhausted: need {top:#x} bytes of {limit:#x} "
                               f"(configuration {cfg.name!r}, {shape.layers} layers, {max_tokens} tokens)")
        return a

    T = max_tokens
    xs = [alloc(T * d * 4) for _ in range(shape.layers + 1)]
    for i, (q, pr, f1, f2) in enumerate(lays):
        plan.layers.append(LayerPlan(
            qkv=q, proj=pr, fc1=f1, fc2=f2, ln1=alloc(d * 4), ln2=alloc(d * 4), qkv_b=alloc(3 * d * 4),
            proj_b=alloc(d * 4), fc1_b=alloc(f * 4), fc2_b=alloc(d * 4),
            kc=[alloc(T * hd * 2) for _ in range(H)], vc=[alloc(T * hd * 2) for _ in range(H)],
            x_in=xs[i], x_out=xs[i + 1]))
        if not pim_layout:
            nb = blocked_tile(cfg)
            plan.layers[-1].lin = {name: alloc(K * _up(N, nb) * 2) for name, K, N in
                                   (("qkv", d, 3 * d), ("proj", d, d), ("fc1", d, f), ("fc2", f, d))}
    Tp = _up(T, 16)
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
    plan.prog_base = _up(top, ALIGN)       # programs follow (placed by firmware.runtime.build_job)
    plan.top = top
    return plan


def pack_layer(plan: MemoryPlan, i: int, w: LayerWeights) -> list[tuple[int, bytes]]:
    """(address, bytes) pieces that put layer ``i``'s parameters in device memory."""
    lp = plan.layers[i]
    d = plan.shape.d_model
    out = []

    def put_w(name, lay: GemvLayout, mat):
        if lay is None:
            packed = Blocked.pack(G.bf16_bits(mat), blocked_tile(plan.cfg))
            out.append((lp.lin[name], packed.astype("<u2").tobytes()))
            return
        packed = lay.pack(G.bf16_bits(mat))                    # [ch, banks, rows, cols, lanes]
        arr = packed.transpose(2, 0, 1, 3, 4)                   # rows, ch, banks, cols, lanes
        amap = AddressMap(plan.cfg.pim)                         # whole rows in address order
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


class LayerCompiler:
    def __init__(self, plan: MemoryPlan, policy: str, mapping: dict, head_groups: str = "auto"):
        if head_groups not in HEAD_GROUPS:
            raise CompileError(f"head_groups must be one of {', '.join(HEAD_GROUPS)}, not {head_groups!r}")
        self.plan = plan
        self.cfg = plan.cfg
        self.shape = plan.shape
        self.policy = policy
        self.mapping = mapping       # (phase, fc) -> "mu" | "pim"
        self.head_groups = head_groups

    # -- vector helpers ----------------------------------------------------------------------
    def _groups(self, rows, per_row_words, fixed_words=0):
        avail = self.cfg.npu.vector_spm_words - fixed_words - 4 * max(1, 8 // self.cfg.npu.vector_lanes)
        rg = max(1, min(rows, avail // max(1, per_row_words)))
        return [(r0, min(rg, rows - r0)) for r0 in range(0, rows, rg)]

    def layernorm(self, pb, x_addr, rows, gb_addr, out_addr):
        d, L = self.shape.d_model, pb.L
        pb.spm_reset()
        gbw = pb.spm(_fp32_words(L, d))
        pb.vdma(True, gb_addr, d * 4, 1, d * 4, gbw, _fp32_words(L, d))
        per_row = _fp32_words(L, d) + _bf16_words(L, d) + 2
        for r0, rg in self._groups(rows, per_row, _fp32_words(L, d)):
            top = pb.spm_top
            X = pb.spm(rg * _fp32_words(L, d))
            ST = pb.spm(-(-2 * rg // L))
            Hh = pb.spm(rg * _bf16_words(L, d))
            pb.vdma(True, x_addr + r0 * d * 4, d * 4, rg, d * 4, X, _fp32_words(L, d))
            pb.vec(op="LN_STATS", a=X, d=ST, n=d, rows=rg, a_fmt="FP32", d_fmt="FP32",
                   imm0=_f32(1.0 / d), imm1=_f32(self.shape.eps))
            pb.vec(op="LN_APPLY", a=X, b=gbw, d=Hh, aux=ST, n=d, rows=rg, a_fmt="FP32", d_fmt="BF16")
            pb.vdma(False, out_addr + r0 * d * 2, d * 2, rg, d * 2, Hh, _bf16_words(L, d))
            pb.spm_top = top

    def scatter_qkv(self, pb, lp, rows, pos0, src_fp32, heads, bias):
        """QKV rows (FP32 raw + bias, or BF16 with bias) -> Q buffer and the K/V caches of ``heads``."""
        d, hd, L = self.shape.d_model, self.shape.head_dim, pb.L
        n3 = 3 * d
        b = self.plan.buffers
        pb.spm_reset()
        fixed = 0
        if bias:
            B = pb.spm(_fp32_words(L, n3))
            pb.vdma(True, lp.qkv_b, n3 * 4, 1, n3 * 4, B, _fp32_words(L, n3))
            fixed = _fp32_words(L, n3)
        per_row = (_fp32_words(L, n3) if src_fp32 else 0) + _bf16_words(L, n3)
        for r0, rg in self._groups(rows, per_row, fixed):
            top = pb.spm_top
            T = pb.spm(rg * _bf16_words(L, n3))
            if src_fp32:
                X = pb.spm(rg * _fp32_words(L, n3))
                pb.vdma(True, b["qkv"] + r0 * n3 * 4, n3 * 4, rg, n3 * 4, X, _fp32_words(L, n3))
                pb.vec(op="ADD", a=X, b=B, d=T, n=n3, rows=rg, a_fmt="FP32", b_fmt="FP32", d_fmt="BF16",
                       b_mode="VEC")
            else:
                pb.vdma(True, b["qkv"] + r0 * n3 * 2, n3 * 2, rg, n3 * 2, T, _bf16_words(L, n3))
            pitch = _bf16_words(L, n3)
            if rg == 1:
                # One token: the q, K and V rows of the heads of one head group are one VSTORE each (a row
                # per head: the group's columns are consecutive in T, the heads' caches equally far apart).
                for run in self._head_runs(lp, heads):
                    self._scatter_one_token(pb, lp, pos0 + r0, T, run)
                pb.spm_top = top
                continue
            for h in heads:
                for kind in range(3):
                    col = self.plan.qkv_col(kind, h)
                    unit = pb.unit(T) + col * 2 // 32       # scratchpad in 32-byte units
                    if kind == 0:
                        mem, stride = b["q"] + r0 * d * 2 + h * hd * 2, d * 2
                    else:
                        cache = lp.kc[h] if kind == 1 else lp.vc[h]
                        mem, stride = cache + (pos0 + r0) * hd * 2, hd * 2
                    self._vstore(pb, mem, stride, rg, hd * 2, unit, pb.unit(pitch))
            pb.spm_top = top

    def _vstore(self, pb, mem, stride, rows, row_bytes, spm_unit, pitch_units):
        from firmware import costmodel
        pb.words.append(isa.encode(SocOp.VSTORE, mem_addr=mem, mem_stride=stride, rows=rows, cols=row_bytes // 32,
                                   spm_addr=spm_unit, spm_pitch=pitch_units))
        c = costmodel.vdma_cycles(self.cfg, rows, row_bytes)
        pb.est["vq"] = pb.est.get("vq", 0) + c
        pb.est["npu_mem"] = pb.est.get("npu_mem", 0) + c

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
            if kind == 0:
                self._vstore(pb, b["q"] + h0 * hd * 2, 32, 1, n * hd * 2, unit, 1)
                continue
            cache = lp.kc if kind == 1 else lp.vc
            stride = cache[run[1]] - cache[h0] if n > 1 else 32
            self._vstore(pb, cache[h0] + pos * hd * 2, stride, n, hd * 2, unit, hd * 2 // 32)

    def attention(self, pb, lp, rows, pos0, heads):
        """S = Q K^T (MU), softmax (VQ), O = P V (MU) for ``heads``; O -> the o buffer."""
        if self.policy == "hpim" and rows == 1:      # generation on the SRAM-PIM unit (issue 20)
            from firmware import hpim
            return hpim.attention(self, pb, lp, pos0, heads, CompileError)
        cfg, d, hd = self.cfg, self.shape.d_model, self.shape.head_dim
        L = pb.L
        b = self.plan.buffers
        Lk = pos0 + rows
        Lp = _up(Lk, 16)
        # Summarization's scores leave the matrix unit in BF16 (rounded once from the FP32 accumulation, as a
        # BF16 framework's Q K^T does): the score round trip through memory, L^2 elements per head, is the
        # largest traffic of prefill attention. One token's scores stay FP32 (a row per head, no gain).
        sb = 2 if rows > 1 else 4
        # Summarization in row blocks of the array's height: block rows r0..r0+mb-1 see keys 0..pos0+r0+mb-1
        # (causal), so its scores, softmax and P.V stop there instead of at the last key: about half the
        # L^2 work and traffic of a long prompt.
        mb_max = 2 * max(16, cfg.npu.array_rows) if rows > 1 else 1
        blocks = [(r0, min(mb_max, rows - r0), min(Lk, pos0 + r0 + mb_max)) for r0 in range(0, rows, mb_max)]
        blk = MuBlock()
        for h in heads:
            for r0, mb, nk in blocks:
                gemm(cfg, blk, b["q"] + r0 * d * 2 + h * hd * 2, d * 2, RowsN(lp.kc[h], hd * 2),
                     b["s"] + (h * rows + r0) * Lp * sb, Lp * sb, mb, hd, nk, sb == 2, pb.est)
        pb.mu(blk)
        pb.fence(Unit.MU)
        pb.spm_reset()
        if rows == 1:
            self._softmax_one_token(pb, pos0, Lp, list(heads))
        for h in (heads if rows > 1 else ()):
            for r0, mb, nk in blocks:
                Lb = _up(nk, 16)
                for g0, rg in self._groups(mb, _fp32_words(L, Lb) + _bf16_words(L, Lb)):
                    rr = r0 + g0
                    top = pb.spm_top
                    X = pb.spm(rg * _fp32_words(L, Lb))
                    P = pb.spm(rg * _bf16_words(L, Lb))        # the BF16 scores first, then the probabilities
                    pb.vdma(True, b["s"] + (h * rows + rr) * Lp * 2, Lp * 2, rg, Lb * 2, P, _bf16_words(L, Lb))
                    pb.vec(op="SCALE", a=P, d=X, n=Lb, rows=rg, a_fmt="BF16", d_fmt="FP32",
                           imm0=_f32(1.0 / math.sqrt(hd)), imm1=0x80000000)
                    pb.vec(op="SOFTMAX", a=X, d=P, n=Lb, rows=rg, a_fmt="FP32", d_fmt="BF16", mask="CAUSAL",
                           pos=pos0 + rr)
                    pb.vdma(False, b["p"] + (h * rows + rr) * Lp * 2, Lp * 2, rg, Lb * 2, P, _bf16_words(L, Lb))
                    pb.spm_top = top
        pb.fence(Unit.VQ)
        blk = MuBlock()
        for h in heads:
            for r0, mb, nk in blocks:
                gemm(cfg, blk, b["p"] + (h * rows + r0) * Lp * 2, Lp * 2, RowsK(lp.vc[h], hd * 2),
                     b["o"] + r0 * d * 2 + h * hd * 2, d * 2, mb, nk, hd, True, pb.est)
        pb.mu(blk)
        pb.fence(Unit.MU)

    def _softmax_one_token(self, pb, pos0, Lp, heads):
        """Scale + softmax of one token's scores for ``heads`` (consecutive: their score rows are ``Lp``
        apart): the heads are the rows of one instruction each, with the PREFIX mask (every row sees keys
        ``0..pos0``), instead of a load, two instructions and a store per head. The same bits: a row's max and
        sum do not depend on the other rows."""
        L, b, hd = pb.L, self.plan.buffers, self.shape.head_dim
        for i0, hn in self._groups(len(heads), _fp32_words(L, Lp) + _bf16_words(L, Lp)):
            h = heads[i0]
            top = pb.spm_top
            X = pb.spm(hn * _fp32_words(L, Lp))
            P = pb.spm(hn * _bf16_words(L, Lp))
            pb.vdma(True, b["s"] + h * Lp * 4, Lp * 4, hn, Lp * 4, X, _fp32_words(L, Lp))
            pb.vec(op="SCALE", a=X, d=X, n=Lp, rows=hn, a_fmt="FP32", d_fmt="FP32",
                   imm0=_f32(1.0 / math.sqrt(hd)), imm1=0x80000000)
            pb.vec(op="SOFTMAX", a=X, d=P, n=Lp, rows=hn, a_fmt="FP32", d_fmt="BF16", mask="PREFIX", pos=pos0)
            pb.vdma(False, b["p"] + h * Lp * 2, Lp * 2, hn, Lp * 2, P, _bf16_words(L, Lp))
            pb.spm_top = top

    def bias_act(self, pb, src, rows, n, bias, gelu, out_addr):
        """out (BF16) = act(src (FP32) + bias) over ``rows`` rows of ``n``."""
        L = pb.L
        pb.spm_reset()
        B = pb.spm(_fp32_words(L, n))
        pb.vdma(True, bias, n * 4, 1, n * 4, B, _fp32_words(L, n))
        for r0, rg in self._groups(rows, _fp32_words(L, n) + _bf16_words(L, n), _fp32_words(L, n)):
            top = pb.spm_top
            X = pb.spm(rg * _fp32_words(L, n))
            O = pb.spm(rg * _bf16_words(L, n))
            pb.vdma(True, src + r0 * n * 4, n * 4, rg, n * 4, X, _fp32_words(L, n))
            if gelu:
                pb.vec(op="ADD", a=X, b=B, d=X, n=n, rows=rg, a_fmt="FP32", b_fmt="FP32", d_fmt="FP32", b_mode="VEC")
                pb.vec(op="GELU", a=X, d=O, n=n, rows=rg, a_fmt="FP32", d_fmt="BF16")
            else:
                pb.vec(op="ADD", a=X, b=B, d=O, n=n, rows=rg, a_fmt="FP32", b_fmt="FP32", d_fmt="BF16", b_mode="VEC")
            pb.vdma(False, out_addr + r0 * n * 2, n * 2, rg, n * 2, O, _bf16_words(L, n))
            pb.spm_top = top

    def residual(self, pb, x_addr, y_addr, rows, bias, out_addr):
        """out (FP32) = x + (y + bias) (bias None: already in y)."""
        d, L = self.shape.d_model, pb.L
        pb.spm_reset()
        fixed = 0
        if bias is not None:
            B = pb.spm(_fp32_words(L, d))
            pb.vdma(True, bias, d * 4, 1, d * 4, B, _fp32_words(L, d))
            fixed = _fp32_words(L, d)
        for r0, rg in self._groups(rows, 2 * _fp32_words(L, d), fixed):
            top = pb.spm_top
            X = pb.spm(rg * _fp32_words(L, d))
            Y = pb.spm(rg * _fp32_words(L, d))
            pb.vdma(True, x_addr + r0 * d * 4, d * 4, rg, d * 4, X, _fp32_words(L, d))
            pb.vdma(True, y_addr + r0 * d * 4, d * 4, rg, d * 4, Y, _fp32_words(L, d))
            if bias is not None:
                pb.vec(op="ADD", a=Y, b=B, d=Y, n=d, rows=rg, a_fmt="FP32", b_fmt="FP32", d_fmt="FP32", b_mode="VEC")
            pb.vec(op="ADD", a=X, b=Y, d=X, n=d, rows=rg, a_fmt="FP32", b_fmt="FP32", d_fmt="FP32", b_mode="ROW")
            pb.vdma(False, out_addr + r0 * d * 4, d * 4, rg, d * 4, X, _fp32_words(L, d))
            pb.spm_top = top

    # -- FCs --------------------------------------------------------------------------------------
    def fc_mu(self, pb, a_addr, K, lay, N, rows, out_addr, name):
        blk = MuBlock()
        lp = self.plan.layers[self._layer]
        src = (PimWeights(lay, self.plan.row_bytes) if lay is not None
               else Blocked(lp.lin[name], K, blocked_tile(self.cfg)))
        gemm(self.cfg, blk, a_addr, K * 2, src, out_addr, N * 4, rows, K, N, False, pb.est)
        pb.mu(blk)
        pb.fence(Unit.MU)

    def fc_pim(self, pb, a_addr, K, lay, N, bias, out_addr, gelu=False, bf16=False, write_vec=True):
        from firmware import costmodel
        if self.cfg.pim.lowprec:
            TIMING_ONLY.add(self.cfg)       # 4-bit weights: not in the PCU and the weight plan yet (fc1 above)
        if write_vec:
            pb.pim(op=MacroOp.WRITE_VEC, n=K, addr0=a_addr)
        flags = (MacroFlag.BIAS if bias is not None else 0) | (MacroFlag.GELU if gelu else 0)
        pb.pim(op=MacroOp.GEMV, n=K, m=N, row=lay.base_row, addr0=bias or 0, flags=int(flags))
        pb.pim(op=MacroOp.READ_RES, n=N, addr0=out_addr, flags=int(MacroFlag.BF16) if bf16 else 0)
        pb.est["pim"] = pb.est.get("pim", 0) + costmodel.pim_fc_cycles(self.cfg, K, N, gelu, write_vec)

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
                if H // plan.hpg > 1 and self.head_groups != "plain":
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
                # row), so FC1 leaves FP32 and its bias and GELU run on the vector unit. The PIM GEMV of a
                # 4-bit device exists in the device RTL and the performance model, not yet in the PCU and the
                # weight plan: such programs are for the performance model only (TIMING_ONLY).
                TIMING_ONLY.add(cfg)
                self.fc_pim(pb, b["h"], d, lp.fc1, f, None, b["y"])
                pb.fence(Unit.PCU)
                self.bias_act(pb, b["y"], rows, f, lp.fc1_b, True, b["g"])
            else:
                self.fc_pim(pb, b["h"], d, lp.fc1, f, lp.fc1_b, b["g"], gelu=True, bf16=True)
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
                  groups: int = 4, head_groups: str = "auto") -> CompiledModel:
    if policy not in POLICIES:
        raise CompileError(f"policy must be one of {', '.join(POLICIES)}, not {policy!r}")
    if not 1 <= prefill <= total:
        raise CompileError(f"prefill ({prefill}) must be in 1..tokens ({total})")
    plan = plan_memory(cfg, shape, total, groups=groups, pim_layout=(policy != "npu-mem"))
    mapping = choose_mapping(cfg, shape, policy, prefill)
    lc = LayerCompiler(plan, policy, mapping, head_groups)
    stages = []
    for i in range(shape.layers):
        for name in STAGES:
            stages.append(lc.stage(i, "prefill", name, prefill, 0))
    for pos in range(prefill, total):
        for i in range(shape.layers):
            for name in STAGES:
                stages.append(lc.stage(i, "gen", name, 1, pos))
    return CompiledModel(cfg, shape, policy, plan, mapping, prefill, total, stages)
