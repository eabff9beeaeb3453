"""Program building blocks of the compiler (:mod:`firmware.compiler`): the SoC program builder, the matrix
unit's instruction blocks and its tiled GEMM.

* :class:`ProgramBuilder`: one SoC program as instruction words (FENCE, END, matrix-unit words, vector-unit
  instructions, vector DMA, PIM macros), with the vector scratchpad's regions and the cost model's cycle
  estimate per unit.
* :class:`MuBlock`: matrix-unit instructions with producer dependencies, turned into the queues' semaphore
  tokens.
* The weight sources a GEMM reads (:class:`PimWeights`: the PIM layout through transposed loads;
  :class:`RowsN` / :class:`RowsK`: the K and V caches; :class:`Blocked`: npu-mem's column blocks) and
  :func:`gemm`, ``out = A @ W`` tiled and double-buffered on the matrix unit.
* :class:`CompileError` and :data:`TIMING_ONLY`, shared by every compiler module.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from firmware.pim import GemvLayout
from hw.spec import fp as G
from hw.spec import matrix_isa as mu_isa
from hw.spec import soc_isa as isa
from hw.spec import vector_isa as vu
from hw.spec.addrmap import AddressMap
from hw.spec.config import SystemConfig
from hw.spec.macro import Macro
from hw.spec.macro import encode as macro_encode
from hw.spec.soc_isa import SocOp

__all__ = ["CompileError", "TIMING_ONLY", "ProgramBuilder", "MuBlock", "PimWeights", "RowsN", "RowsK", "HeadsN", "HeadsK", "Blocked",
           "blocked_tile", "gemm", "f32_imm", "round_up", "fp32_words", "bf16_words"]


class CompileError(ValueError):
    pass


#: Configurations whose compiled programs read PIM-layout weights with a timing stand-in
#: (:meth:`PimWeights.loads`): fine for the performance model, not for functional execution.
TIMING_ONLY: set = set()


def f32_imm(x: float) -> int:
    """The FP32 bit pattern of ``x`` (rounded to nearest), as an instruction immediate."""
    return int(G.f32_bits(np.float32(x)))


def round_up(x: int, a: int) -> int:
    """``x`` rounded up to a multiple of ``a``."""
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

    def __init__(self, slots: int = 2):
        self.ins: list[dict] = []
        # Scratchpad double-buffer state shared by every GEMM of the block: the next buffer of each kind
        # and the last instruction that used each buffer (so a later GEMM waits for an earlier one).
        # ``slots``: buffers per scratchpad (2: double-buffered halves; more for many small GEMMs, such as a
        # prompt's per-head attention on a multi-core NPU, so that a COMPUTE does not wait for the STORE of
        # the GEMM two before it: :meth:`firmware.compiler.LayerCompiler.attention`).
        self.slots = slots
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


class _CacheTiles:
    """Tiles of a KV-cache weight source: four array widths of outputs, no input chunks."""

    def nt(self, cfg):
        return 4 * cfg.npu.array_cols

    def chunk(self):
        return None


@dataclass
class _CacheRows(_CacheTiles):
    """A KV cache as a weight source: rows of BF16 at ``addr``, ``stride`` bytes apart."""
    addr: int
    stride: int


class RowsN(_CacheRows):
    """``W^T`` stored as rows ``n`` of ``K`` BF16 (the K cache: ``W[k, n] = K[n, k]``)."""

    def loads(self, n0, nt, k0, kt):
        return [dict(transpose=1, mem_addr=self.addr + n0 * self.stride + k0 * 2, mem_stride=self.stride,
                     rows=nt, cols=kt)]


class RowsK(_CacheRows):
    """``W`` stored as rows ``k`` of ``N`` BF16 (the V cache)."""

    def loads(self, n0, nt, k0, kt):
        return [dict(transpose=0, mem_addr=self.addr + k0 * self.stride + n0 * 2, mem_stride=self.stride,
                     rows=kt, cols=nt)]


@dataclass
class _HeadCaches(_CacheTiles):
    """The K (or V) caches of consecutive heads side by side as one weight matrix (``addrs``: each head's
    cache, token ``t`` at ``+ t * stride``); a tile's range of head dimensions spans several heads: a load per
    head into its place, one per group of heads side by side (the ``token`` layout,
    :data:`firmware.memory_plan.KV_LAYOUTS`)."""
    addrs: list
    hd: int
    stride: int

    def _loads(self, x0, xt, token0, **fields):
        """One load per head's run of the dimensions ``x0 .. x0 + xt - 1`` (``cols`` of them, ``spm_off`` its
        offset from ``x0`` for now), adjacent ones merged where the caches sit side by side."""
        out, x = [], x0
        while x < x0 + xt:
            h, i = divmod(x, self.hd)
            piece = min(self.hd - i, x0 + xt - x)
            ld = dict(fields, mem_addr=self.addrs[h] + token0 * self.stride + i * 2, mem_stride=self.stride,
                      cols=piece, spm_off=x - x0)
            p = out[-1] if out else None
            if p and ld["mem_addr"] == p["mem_addr"] + p["cols"] * 2:
                p["cols"] += piece
            else:
                out.append(ld)
            x += piece
        return out


class HeadsN(_HeadCaches):
    """The heads' K caches as one ``W [heads * hd, L]``: ``W[k, n] = K_{k // hd}[n, k % hd]``, the weights
    of one generation step's ``Q K^T`` for all heads at once against the block-diagonal query
    (:meth:`firmware.compiler.LayerCompiler.attention`); transposed loads, each into its inputs' place."""

    def loads(self, n0, nt, k0, kt):
        return self._loads(k0, kt, n0, transpose=1, rows=nt)


@dataclass
class HeadsK(_HeadCaches):
    """The heads' V caches as one ``W [L, heads * hd]``: ``W[k, n] = V_{n // hd}[k, n % hd]``; a load must
    start on a whole weight word of the array's ``cols`` outputs."""
    cols: int

    def loads(self, n0, nt, k0, kt):
        out = self._loads(n0, nt, k0, transpose=0, rows=kt)
        for ld in out:
            if ld["spm_off"] % self.cols:
                raise CompileError(f"a V cache load starts at output {ld['spm_off']} of a tile, inside a weight word "
                                   f"of {self.cols}: heads side by side must start on whole words")
            ld["spm_off"] = ld["spm_off"] // self.cols * kt
        return out


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
         est: dict | None = None, diag: int = 0):
    """``out[M, N] = A[M, K] @ W[K, N]`` on the matrix unit (tiled, double-buffered). ``diag``: only the
    diagonal blocks are wanted, row ``m``'s outputs ``m diag .. (m + 1) diag - 1``, stored side by side as one
    row at ``out_addr`` (the heads' ``P V`` of one generation step, :class:`HeadsK`)."""
    npu = cfg.npu
    R, C = npu.array_rows, npu.array_cols
    ns = blk.slots
    AW, WW, CW = npu.act_spm_words // ns, npu.wgt_spm_words // ns, npu.acc_spm_words // ns
    per = w.nt(cfg)
    # PIM-layout weights come in tiles of banks x channels outputs; where one is narrower than the cores'
    # columns together (the ianus preset: 128 outputs for 4 cores x 64), a COMPUTE takes several side by
    # side (a transposed load per tile, each into its place), so that every core has columns to work on.
    sub = per if isinstance(w, PimWeights) and per % C == 0 else 0
    if sub:
        per *= max(1, npu.cores * C // sub)
    Nt = min(round_up(N, C), per)
    nbt = -(-Nt // C)
    kq = math.lcm(16, R)
    chunk = w.chunk() or K
    kt_max = min(round_up(K, kq), round_up(chunk, kq), (WW // nbt) // kq * kq)
    if kt_max < kq:
        raise CompileError(f"weight scratchpad ({npu.wgt_spm_words} words) too small for a {Nt}-column tile")
    Mt = min(M, CW // nbt, AW // -(-min(kt_max, K) // R))
    while Mt < 1 and kt_max > kq:
        kt_max -= kq
        Mt = min(M, CW // nbt, AW // -(-kt_max // R))
    if Mt < 1:
        raise CompileError("scratchpads too small for one row of this GEMM")
    if diag and Mt < M:
        raise CompileError(f"a diagonal-block GEMM of {M} rows must be one row tile ({Mt} rows fit)")
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
    # On a multi-core NPU (the paper-scale presets: DMA ports wider than the channels) the next output group's
    # first LOAD waits for the previous group's STORE: beside the loads, the store's writes close the rows they
    # keep open in every bank (a transposed PIM-layout load holds one in all of them), and both crawl (GPT-2 XL
    # FC1, 128 tokens, exact timing: a 1 MB STORE beside the loads 36k cycles, alone 8.7k; the FC 158.9k -> 141.3k
    # cycles under ianus, 144.3k -> 133.7k under npu-mem). On the single-core RTL configurations one DMA port
    # binds and the overlap pays (default layer prefill, model: 1.239M cycles with it, 1.257M without).
    gate = None
    for m0 in range(0, M, Mt):
        mt = min(Mt, M - m0)
        for gs in range(0, len(ntiles), Gn):
            grp = ntiles[gs:gs + Gn]
            ab = bufs["acc"]
            acc_base = ab * CW
            c = None
            for ki, (k0, kt) in enumerate(ktiles):
                b = bufs["act"]
                la = blk.add(L, [last_c.get(("act", b)), gate if ki == 0 else None], target=mu_isa.Target.ACT,
                             transpose=0, mem_addr=a_addr + m0 * a_stride + k0 * 2, mem_stride=a_stride, rows=mt, cols=kt,
                             spm_addr=b * AW, spm_stride=mt)
                for j, (n0, nt) in enumerate(grp):
                    wb = bufs["wgt"]
                    lw = None
                    for s0 in range(n0, n0 + nt, sub or nt):
                        for ld in w.loads(s0, min(sub or nt, n0 + nt - s0), k0, kt):
                            off = ld.pop("spm_off", 0) + (s0 - n0) // C * kt
                            lw = blk.add(L, [last_c.get(("wgt", wb))], target=mu_isa.Target.WGT,
                                         spm_addr=wb * WW + off, spm_stride=kt, **ld)
                    deps = [la, lw] + ([last_s.get(ab)] if ki == 0 else [])
                    c = blk.add(Cc, deps, accumulate=int(ki > 0), act_addr=b * AW, act_stride=mt,
                                wgt_addr=wb * WW, wgt_stride=kt, acc_addr=acc_base + j * nbt * mt, acc_stride=mt,
                                m=mt, k=kt, n=nt)
                    last_c[("wgt", wb)] = c
                    bufs["wgt"] = (wb + 1) % ns
                last_c[("act", b)] = c
                bufs["act"] = (b + 1) % ns
            n0g = grp[0][0]
            cols = sum(nt for _, nt in grp)
            s = None
            if not diag:
                s = blk.add(S, [c], bf16=int(out_bf16), mem_addr=out_addr + m0 * out_stride + n0g * esize,
                            mem_stride=out_stride, rows=mt, cols=cols, spm_addr=acc_base, spm_stride=mt)
            # diag: row r's block, from the accumulator word holding its first column (that word's columns
            # before it belong to row r - 1, whose store follows and writes them again: rows go down)
            for r in range(m0 + mt - 1, m0 - 1, -1) if diag else ():
                lo, hi = max(r * diag, n0g), min((r + 1) * diag, n0g + cols)
                if lo < hi:
                    a = n0g + (lo - n0g) // C * C
                    s = blk.add(S, [c], bf16=int(out_bf16), mem_addr=out_addr + a * esize, mem_stride=out_stride,
                                rows=1, cols=hi - a, spm_addr=acc_base + (a - n0g) // C * mt + r - m0, spm_stride=mt)
            last_s[ab] = s
            if npu.cores > 1:
                gate = s
            bufs["acc"] = (ab + 1) % ns
    if est is not None:
        from firmware import costmodel
        mem, comp = costmodel.mu_gemm_parts(cfg, M, K, N, transposed=isinstance(w, (PimWeights, RowsN, HeadsN)))
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
        a = round_up(self.spm_top, max(1, 8 // self.L))
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
        self.vdma_units(load, mem_addr, mem_stride, rows, row_bytes, self.unit(spm_word), self.unit(spm_pitch_words))

    def vdma_units(self, load, mem_addr, mem_stride, rows, row_bytes, spm_unit, spm_pitch_units):
        """:meth:`vdma` with the scratchpad address and pitch in 32-byte units (:meth:`unit`), for rows that
        start inside a scratchpad word (one head's columns of a QKV row)."""
        self.words.append(isa.encode(SocOp.VLOAD if load else SocOp.VSTORE, mem_addr=mem_addr,
                                     mem_stride=mem_stride, rows=rows, cols=row_bytes // 32,
                                     spm_addr=spm_unit, spm_pitch=spm_pitch_units))
        from firmware import costmodel
        c = costmodel.vdma_cycles(self.cfg, rows, row_bytes)
        self.est["vq"] = self.est.get("vq", 0) + c
        self.est["npu_mem"] = self.est.get("npu_mem", 0) + c

    def pim(self, **fields):
        w = macro_encode(Macro(**fields))
        self.words.append(isa.encode(SocOp.PIM, word=sum(v << (32 * i) for i, v in enumerate(w))))


def fp32_words(L, n):
    """Scratchpad words of ``L`` lanes that hold ``n`` FP32 values."""
    return -(-n // L)


def bf16_words(L, n):
    """Scratchpad words of ``L`` lanes that hold ``n`` BF16 values (two per lane)."""
    return -(-n // (2 * L))

