"""Batched generation's memory layout types (:mod:`firmware.batch`): the batch plan and one request's KV
cache.

:class:`BatchPlan` is what :func:`firmware.batch.plan_batch` lays out (the compiler's memory plan plus the
score / probability buffers, the identity, the V^T scratch buffer, the step slots, the prefill's buffers, the
program area and the KV pool's rows) with each request's footprint; :class:`KvLayout` is where one request's
caches live, and :meth:`BatchPlan.k_addr` / :meth:`~BatchPlan.v_addr` / :meth:`~BatchPlan.vt_addr` give the
address of one of its values (the runtime's packing and the compiler's appends). :func:`gemv_layouts` are the
GEMV layouts the PIM policies' attention macros read. The layouts of every policy are described in
:mod:`firmware.batch`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from firmware.gpt2 import GptShape
from firmware.memory_plan import ALIGN
from firmware.pim import GemvLayout
from firmware.program import round_up
from hw.spec.addrmap import AddressMap
from hw.spec.config import SystemConfig

__all__ = ["POLICIES", "PIM_POLICIES", "BatchError", "KvLayout", "BatchPlan", "gemv_layouts"]

POLICIES = ("npu-only", "naive", "neupims")
PIM_POLICIES = ("naive", "neupims")
"""Policies with attention in PIM (K in the GEMV layout, V^T, the group-major V copy)."""


class BatchError(ValueError):
    """A batch, a request or a configuration the batched compiler cannot handle (the message says why)."""


# ---------------------------------------------------------------------------------------------
# KV layouts of one request
# ---------------------------------------------------------------------------------------------

@dataclass
class KvLayout:
    """Where one request's KV cache lives: per layer and head the addresses of the normal-layout caches (K and
    V ``[capacity, head_dim]`` BF16 under npu-only; under naive only V, group-major: :meth:`BatchPlan.v_addr`)
    and, under naive, the first rows of K and V^T in the PIM layout."""
    capacity: int
    row0: int                       # first row index of the allocation
    rows: int                       # row indices allocated
    k: list = field(default_factory=list)       # [layer][head] address of K rows (npu-only)
    v: list = field(default_factory=list)       # [layer][head] address of V token 0 (both)
    k_row: list = field(default_factory=list)   # [layer][head] first row of K in the PIM layout (naive)
    vt_row: list = field(default_factory=list)  # [layer][head] first row of V^T in the PIM layout (naive)
    k_slot: list = field(default_factory=list)  # [layer][head] K's first tile slot in row k_row (packed GEMV)
    vt_slot: list = field(default_factory=list)  # [layer][head] V^T's first tile slot in row vt_row
    k_pitch: int = 0                # K's tile pitch (columns): head_dim / 16 rounded up to a power of two
    vt_pitch: int = 0               # V^T's: capacity / 16 rounded up to a power of two


@dataclass
class BatchPlan:
    cfg: SystemConfig
    shape: GptShape
    policy: str
    max_batch: int
    max_tokens: int                 # the largest capacity of one request
    io_slots: int
    plan: object                    # firmware.memory_plan.MemoryPlan
    s: list                         # two score buffers [H, LP] FP32
    p: list                         # two probability buffers [H, LP] BF16
    ident: int                      # identity [hd, hd] BF16 (naive)
    vt_scratch: int                 # [max_batch][hd, 16 heads] BF16: V^T of the new tokens' groups (naive)
    slots: list                     # [slot][layer + 1] address of [max_batch, d] FP32
    prog_base: int
    prog_bytes: int
    pool_rows: tuple                # (first, end) row indices of the KV pool
    max_prompt: int = 0             # longest prompt prefilled on the device (0: none)
    pre_x: list = field(default_factory=list)   # [layer + 1] address of [max_prompt, d] FP32 (prefill)
    pre_kv: tuple = ()              # naive: ([H] K, [H] V) normal-layout [max_prompt, hd] the prefill writes

    @property
    def LP(self) -> int:
        return round_up(self.max_tokens, 16)

    @property
    def row_index_bytes(self) -> int:
        p = self.cfg.pim
        return p.channels * p.banks * p.row_bytes

    # -- per-request footprint ------------------------------------------------------------------
    def pim_packing(self, capacity: int) -> tuple[tuple[int, int], tuple[int, int]]:
        """Packed GEMV layouts (:mod:`hw.spec.macro` ``addr1``) of one head's K and V^T:
        ``((K pitch, K tiles), (V^T pitch, V^T tiles))``. A pitch is the tile's columns (``head_dim / 16``,
        ``capacity / 16``) rounded up to a power of two; a row holds ``columns / pitch`` tiles."""
        p = self.cfg.pim
        per_tile = p.banks * p.channels

        def pitch(values):
            return 1 << (-(-values // p.lanes) - 1).bit_length()

        hd = self.shape.head_dim
        return (pitch(hd), -(-capacity // per_tile)), (pitch(capacity), -(-hd // per_tile))

    def pim_rows_per_layer(self, capacity: int) -> tuple[int, int]:
        """Row indices of one layer's K and V^T (every head's tiles packed one after the other)."""
        cols, heads = self.cfg.pim.columns, self.shape.heads
        return tuple(-(-heads * tiles // (cols // pitch)) for pitch, tiles in self.pim_packing(capacity))

    def normal_bytes(self, capacity: int) -> int:
        """Bytes of one request's normal-layout caches (K and V under npu-only, V under naive)."""
        s = self.shape
        if self.policy in PIM_POLICIES:     # V only, group-major: whole groups of 16 tokens
            return s.layers * round_up(-(-capacity // 16) * 16 * s.heads * s.head_dim * 2, ALIGN)
        return 2 * s.layers * s.heads * round_up(capacity * s.head_dim * 2, ALIGN)

    def request_rows(self, capacity: int) -> int:
        """Row indices one request of ``capacity`` tokens takes from the KV pool."""
        s = self.shape
        pim = 0
        if self.policy in PIM_POLICIES:
            pim = s.layers * sum(self.pim_rows_per_layer(capacity))
        return pim + -(-self.normal_bytes(capacity) // self.row_index_bytes)

    def check_capacity(self, capacity: int):
        if not 1 <= capacity <= self.max_tokens:
            raise BatchError(f"a request's capacity must be 1..{self.max_tokens} tokens (the plan's max_tokens), "
                             f"not {capacity}")

    def layout(self, row0: int, capacity: int) -> KvLayout:
        """The addresses of a request allocated at row index ``row0``."""
        s = self.shape
        kv = KvLayout(capacity, row0, self.request_rows(capacity))
        row = row0
        if self.policy in PIM_POLICIES:
            packing = self.pim_packing(capacity)
            (kv.k_pitch, _), (kv.vt_pitch, _) = packing
            for _ in range(s.layers):
                for (pitch, tiles), rows, slots, used in zip(packing, (kv.k_row, kv.vt_row), (kv.k_slot, kv.vt_slot),
                                                             self.pim_rows_per_layer(capacity), strict=True):
                    per_row = self.cfg.pim.columns // pitch
                    rows.append([row + h * tiles // per_row for h in range(s.heads)])
                    slots.append([h * tiles % per_row for h in range(s.heads)])
                    row += used
        addr = row * self.row_index_bytes
        if self.policy in PIM_POLICIES:          # V group-major: head h of a group at 16 h rows
            step = round_up(-(-capacity // 16) * 16 * s.heads * s.head_dim * 2, ALIGN)
            for _ in range(s.layers):
                kv.v.append([addr + h * 16 * s.head_dim * 2 for h in range(s.heads)])
                addr += step
        else:
            step = round_up(capacity * s.head_dim * 2, ALIGN)
            for _ in range(s.layers):
                for lst in (kv.k, kv.v):
                    lst.append([addr + h * step for h in range(s.heads)])
                    addr += s.heads * step
        assert addr <= (row0 + kv.rows) * self.row_index_bytes
        return kv

    # -- addresses of single values (the runtime's packing and the compiler's appends) ------------
    def k_addr(self, kv: KvLayout, i: int, h: int, t: int) -> int:
        """Address of token ``t``'s K row (``head_dim`` BF16) of layer ``i``, head ``h``."""
        if self.policy == "npu-only":
            return kv.k[i][h] + t * self.shape.head_dim * 2
        p = self.cfg.pim
        tile, n = divmod(t, p.banks * p.channels)
        row, col = _slot(p, kv.k_row[i][h], kv.k_slot[i][h] + tile, kv.k_pitch)
        return AddressMap(p).encode(row, n // p.banks, n % p.banks, col)

    def v_addr(self, kv: KvLayout, i: int, h: int, t: int) -> int:
        """Address of token ``t``'s V row (``head_dim`` BF16) in the normal-layout copy."""
        hd = self.shape.head_dim
        if self.policy == "npu-only":
            return kv.v[i][h] + t * hd * 2
        g, j = divmod(t, 16)
        return kv.v[i][h] + (g * self.shape.heads * 16 + j) * hd * 2

    def vt_addr(self, kv: KvLayout, i: int, h: int, n: int, col: int) -> int:
        """Address of column ``col`` (tokens ``16 col ..``) of V^T output row ``n`` (naive)."""
        p = self.cfg.pim
        tile, m = divmod(n, p.banks * p.channels)
        row, c0 = _slot(p, kv.vt_row[i][h], kv.vt_slot[i][h] + tile, kv.vt_pitch)
        return AddressMap(p).encode(row, m // p.banks, m % p.banks, c0 + col)


def _slot(p, row: int, q: int, pitch: int) -> tuple[int, int]:
    """Row and first column of tile slot ``q`` counted from row ``row`` (``columns / pitch`` slots a row)."""
    r, k = divmod(q, p.columns // pitch)
    return row + r, k * pitch


def gemv_layouts(bp: BatchPlan, kv: KvLayout, i: int, h: int, L: int) -> tuple[GemvLayout, GemvLayout]:
    """The packed GEMV layouts the PIM policies' macros read: K (``[head_dim, L]``) and V^T (``[L, head_dim]``);
    their :attr:`~firmware.pim.GemvLayout.addr1` goes in the macros."""
    hd = bp.shape.head_dim
    return (GemvLayout(bp.cfg, hd, L, kv.k_row[i][h], kv.k_pitch, kv.k_slot[i][h]),
            GemvLayout(bp.cfg, L, hd, kv.vt_row[i][h], kv.vt_pitch, kv.vt_slot[i][h]))
