"""Low-precision PIM GEMV (issue 19): the 4-bit weight layout in the banks, the command program, a lower bound.

For a device whose processing units take 4-bit weights (``PimGeometry.weight_format`` ``int4`` / ``fp4``,
:mod:`hw.pim.bank`), a ``[K, N]`` matrix quantized by :func:`firmware.quant.quantize_weights` (groups of
``quant_group`` inputs along ``K``, one scale per group and output) is placed like this:

* **Outputs** as in :class:`firmware.pim.GemvLayout`: output ``n`` in tile ``n // (banks * channels)``,
  channel ``(n // banks) % channels``, bank ``n % banks``.
* **Input chunks**: the global buffer holds ``gb_slots`` MAC-wide slots of 64 activations, so ``K`` is cut
  into chunks of at most ``floor(gb_slots * 64 / group) * group`` inputs (whole groups); ``chunk_size``
  (0: chosen) sets it. The chosen size is the one with the least estimated time (:meth:`W4GemvLayout.cost`:
  row activations, column commands and the two-slot read-out chain), since a smaller chunk can pack more
  units per row (FP8 activations: K = 3072 in 2048-chunks has one unit per row, in 1024-chunks three). A *unit* is one
  tile's share of one chunk: ``n_c = len_c / 64`` code columns, ``ceil(G_c / 16)`` scale columns (16 group
  scales each: local group ``16k + s`` in slot ``s`` of scale column ``k``) and, for ``fp4`` with grid
  choice, as many selector columns (16 2-bit selectors in the low 32 bits).
* **Rows hold several units** (4-bit codes need 4x fewer columns than BF16, so one unit per row would
  leave most of the row-open time unused): ``per_row`` units of the same chunk share a row. A MAC of
  column ``col`` reads global-buffer slot ``col mod gb_slots``, so a unit's code columns sit on a
  ``period``-aligned block: unit ``j`` of a row has code column ``i`` at column ``j * period + i``
  (``period`` = the next power of two of the chunk's code columns; when it is below ``gb_slots`` the
  program writes the chunk ``gb_slots / period`` times into the buffer). The scale and selector columns
  fill the columns left over, unit by unit. Row of unit (tile ``t``, chunk ``c``):
  ``base_row + c * rows_per_chunk + t // per_row``.

Program (per channel; the channels run the same program on their own outputs), chunk by chunk: the
chunk's WRGBs (in the precharge / activate gap of the previous row), then per row ``ACTAB`` and per unit
``u`` of the row: ``WRBIAS`` into accumulator slot ``u mod acc_slots`` (bias, zero, or the partial sums
of the previous chunk read back; with two slots and units at least ``tMAC - 2 * acc_groups`` reads long, the
row's first two units are preloaded while the row activates), per scale column ``LDSCAB`` [``LDSLAB``] and the ``MACAB`` of its
groups' code columns (row field: scale slot | accumulator slot << 4), then ``RDMAC`` of the previous unit
(its tMAC has passed by then: it overlaps the MACs of this one). The last unit's ``RDMAC`` goes after the
row's ``PREAB``. With one accumulator slot the ``RDMAC`` of a unit follows its own MACs.

FP32 results: the accumulator is the golden :func:`sim.golden.lowprec_unit.unit_acc` of the output's columns
with ``acc0`` = the bias (chunks add on the read-back partial sums, which is the same order). FP8
activations: the per-token scale (and a bias) are applied after the read-out (:func:`sim.golden.lowprec_unit.gemv_unit`).
"""

from __future__ import annotations

from dataclasses import dataclass

import ml_dtypes
import numpy as np

from firmware.pim import OutputTiles
from firmware.quant import QuantWeights, pack_nibbles

__all__ = ["W4GemvLayout", "w4_gemv_program", "w4_gemv_lower_bound", "act_words"]


def _pow2_ceil(n: int) -> int:
    return 1 << (n - 1).bit_length()


@dataclass(frozen=True)
class W4GemvLayout(OutputTiles):
    """Where the 4-bit weights of one ``[K, N]`` GEMV live on a low-precision device (module docstring)."""

    base_row: int = 0
    chunk_size: int = 0

    def __post_init__(self):
        p = self.cfg.pim
        if not p.lowprec:
            raise ValueError(f"the 4-bit GEMV layout needs a device with 4-bit weights, not weight_format="
                             f"{p.weight_format!r} ({self.cfg.name})")
        for name in ("K", "N"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ValueError(f"GEMV {name} must be a positive integer, not {v!r}")
        if self.K % p.quant_group:
            raise ValueError(f"GEMV K = {self.K} is not a multiple of the quantization group {p.quant_group}")
        self._check_base_row()
        cs = self.chunk_size
        if not isinstance(cs, int) or isinstance(cs, bool) or cs < 0 or cs % p.quant_group or cs > self.max_chunk:
            raise ValueError(f"GEMV chunk_size must be 0 (chosen) or a multiple of the group {p.quant_group} up to "
                             f"{self.max_chunk} (the global buffer), not {cs!r}")
        if cs == 0:
            best = None
            for m in range(1, self.max_chunk // p.quant_group + 1):
                try:
                    cand = W4GemvLayout(self.cfg, self.K, self.N, self.base_row, m * p.quant_group)
                except ValueError:
                    continue
                if best is None or cand.cost() < best.cost():
                    best = cand
            object.__setattr__(self, "_chunk", best.chunk if best else self.max_chunk)
        else:
            object.__setattr__(self, "_chunk", cs)
        if self.unit_columns > p.columns:
            raise ValueError(f"a unit of {self.unit_columns} columns does not fit a row of {p.columns}")
        self._check_rows(f"{p.weight_format} GEMV")

    # -- geometry (per_tile, tiles, output_index: OutputTiles) -----------------------------------------

    @property
    def max_chunk(self) -> int:
        """The most inputs the global buffer holds, in whole groups."""
        p = self.cfg.pim
        return p.gb_slots * 64 // p.quant_group * p.quant_group

    @property
    def chunk(self) -> int:
        """Inputs per chunk (``chunk_size``, or the chosen one)."""
        return self._chunk

    def cost(self) -> float:
        """Estimated cycles of the program on this layout (to choose the chunk size): per row the bank
        path ``tRTP + tRP + tRCDRD``, per unit the larger of its commands (reads + preload + read-out) and half
        the two-slot chain (``tMAC`` + read-out + preload + reads of the unit two ahead), the GB writes."""
        p, t = self.cfg.pim, self.cfg.timing
        g = p.acc_groups
        total = self.rows_used * (t.tRTP + t.tRP + t.tRCDRD)
        for c in range(self.chunks):
            reads = self.chunk_cols(c) + self.scale_cols(c) + self.sel_cols(c)
            per_unit = reads + 2 * g
            if p.acc_slots == 2:
                per_unit = max(per_unit, (t.tMAC + 2 * g + reads) / 2)
            total += self.tiles * per_unit * t.tCCD + len(_wrgbs(self, c))
        return total

    @property
    def chunks(self) -> int:
        return -(-self.K // self.chunk)

    def chunk_len(self, c: int) -> int:
        return min(self.chunk, self.K - c * self.chunk)

    def chunk_cols(self, c: int) -> int:
        """Code columns (MACs) of chunk ``c``."""
        return self.chunk_len(c) // 64

    def chunk_groups(self, c: int) -> int:
        return self.chunk_len(c) // self.cfg.pim.quant_group

    def scale_cols(self, c: int) -> int:
        return -(-self.chunk_groups(c) // 16)

    def sel_cols(self, c: int) -> int:
        return self.scale_cols(c) if self.cfg.pim.grid_choice else 0

    @property
    def period(self) -> int:
        """Column alignment of a unit's code columns (a power of two dividing ``gb_slots``)."""
        return _pow2_ceil(self.chunk_cols(0))

    @property
    def unit_columns(self) -> int:
        return self.chunk_cols(0) + self.scale_cols(0) + self.sel_cols(0)

    @property
    def per_row(self) -> int:
        """Units (tiles of one chunk) per row."""
        p = self.cfg.pim
        blocks = p.columns // self.period
        fit = p.columns // self.unit_columns
        return max(1, min(blocks, fit, self.tiles))

    @property
    def rows_per_chunk(self) -> int:
        return -(-self.tiles // self.per_row)

    @property
    def rows_used(self) -> int:
        return self.chunks * self.rows_per_chunk

    def row_of(self, tile: int, chunk: int) -> int:
        return self.base_row + chunk * self.rows_per_chunk + tile // self.per_row

    def unit_columns_at(self, j: int, c: int) -> tuple[list, list, list]:
        """(code, scale, selector) column addresses of unit ``j`` (position in its row) of chunk ``c``."""
        p = self.cfg.pim
        n = self.chunk_cols(c)
        code_pos = {jj * self.period + i for jj in range(self.per_row) for i in range(n)}
        free = [col for col in range(p.columns) if col not in code_pos]
        sc, sl = self.scale_cols(c), self.sel_cols(c)
        mine = free[j * (sc + sl):(j + 1) * (sc + sl)]
        return [j * self.period + i for i in range(n)], mine[:sc], mine[sc:]

    # -- DRAM image ---------------------------------------------------------------------------------
    def image(self, q: QuantWeights) -> np.ndarray:
        """Quantized weights -> DRAM bytes ``[channels, banks, rows_used, columns, 32]`` (unused bytes zero)."""
        p = self.cfg.pim
        if q.shape != (self.K, self.N):
            raise ValueError(f"weights {q.shape} do not match the layout's ({self.K}, {self.N})")
        if q.fmt != p.weight_format or q.group != p.quant_group or q.scale_format != p.scale_format:
            raise ValueError(f"{q.fmt} weights (group {q.group}, {q.scale_format} scales) do not match the device's "
                             f"{p.weight_format} (group {p.quant_group}, {p.scale_format} scales)")
        if p.weight_format == "fp4" and q.grid_choice != p.grid_choice:
            raise ValueError(f"weights with grid_choice={q.grid_choice} on a device with grid_choice={p.grid_choice}")
        npad = self.tiles * self.per_tile
        codes = np.zeros((self.K, npad), np.uint8)
        codes[:, :self.N] = q.codes
        G = self.K // p.quant_group
        sbits = np.zeros((G, npad), np.uint16)
        if p.scale_format == "fp16":
            sbits[:, :self.N] = q.scales.astype(np.float16).view(np.uint16)
        else:
            sbits[:, :self.N] = q.scales.astype(ml_dtypes.bfloat16).view(np.uint16)
        sel = np.zeros((G, npad), np.uint8)
        sel[:, :self.N] = q.selectors
        out = np.zeros((p.channels, p.banks, self.rows_used, p.columns, 32), np.uint8)
        gpc = self.chunk // p.quant_group
        for t in range(self.tiles):
            outs = np.arange(t * self.per_tile, (t + 1) * self.per_tile)
            ch, bk = (outs // p.banks) % p.channels, outs % p.banks
            for c in range(self.chunks):
                r = self.row_of(t, c) - self.base_row
                code_cols, sc_cols, sl_cols = self.unit_columns_at(t % self.per_row, c)
                k0 = c * self.chunk
                for i, col in enumerate(code_cols):
                    blk = codes[k0 + 64 * i:k0 + 64 * (i + 1), outs].T            # [per_tile, 64]
                    out[ch, bk, r, col] = pack_nibbles(blk)
                g0, gc = c * gpc, self.chunk_groups(c)
                for k, col in enumerate(sc_cols):
                    s = np.zeros((self.per_tile, 16), np.uint16)
                    n_g = min(16, gc - 16 * k)
                    s[:, :n_g] = sbits[g0 + 16 * k:g0 + 16 * k + n_g, outs].T
                    out[ch, bk, r, col] = s.astype("<u2").view(np.uint8).reshape(self.per_tile, 32)
                for k, col in enumerate(sl_cols):
                    s = np.zeros((self.per_tile, 16), np.uint32)
                    n_g = min(16, gc - 16 * k)
                    s[:, :n_g] = sel[g0 + 16 * k:g0 + 16 * k + n_g, outs].T
                    word = (s << (2 * np.arange(16, dtype=np.uint32))).sum(axis=1).astype("<u4")
                    out[ch, bk, r, col, :4] = word.view(np.uint8).reshape(self.per_tile, 4)
        return out


def act_words(layout: W4GemvLayout, x) -> dict:
    """Global-buffer words ``{(chunk, gb_column): int}`` of the input ``x``: ``[K]`` BF16 bit patterns (uint16)
    or FP8-E4M3 codes (uint8), as the device's activation format says; replicated ``gb_slots / period`` times."""
    p = layout.cfg.pim
    x = np.asarray(x)
    if x.shape != (layout.K,):
        raise ValueError(f"input must have shape ({layout.K},), not {x.shape}")
    raw = (x.astype("<u2") if p.act_format == "bf16" else x.astype(np.uint8)).tobytes()
    bpc = p.column_bytes                      # bytes per GB column
    per_act = 2 if p.act_format == "bf16" else 1
    words = {}
    copies = p.gb_slots // layout.period
    for c in range(layout.chunks):
        base = c * layout.chunk * per_act
        for i in range(layout.chunk_cols(c)):
            for r in range(p.act_ratio):
                off = base + (i * p.act_ratio + r) * bpc
                w = int.from_bytes(raw[off:off + bpc], "little")
                for k in range(copies):
                    words[(c, (k * layout.period + i) * p.act_ratio + r)] = w
    return words


def _wrgbs(layout, c):
    p = layout.cfg.pim
    copies = p.gb_slots // layout.period
    return [(k * layout.period + i) * p.act_ratio + r
            for k in range(copies) for i in range(layout.chunk_cols(c)) for r in range(p.act_ratio)]


def w4_gemv_program(layout: W4GemvLayout, with_bias: bool = True):
    """The per-channel 4-bit GEMV command program, in issue order (see the module docstring).

    Yields ``(op, fields)`` like :func:`firmware.pim.gemv_program`: ``data`` references ``("x", chunk,
    gb_column)``, ``("bias", tile, group)``, ``("zero",)``, ``("partial", tile, group)`` (the words read by
    the RDMAC tagged ``("result", tile, group)`` of the previous chunk, with ``after`` naming that tag: the
    issuer must not send the WRBIAS before that read's data is back), ``REFRESH_POINT`` where a refresh may
    go. ``RDMAC`` tags of all but the last chunk are ``("partial_out", tile, group)``; the last chunk's are
    ``("result", tile, group)``.
    """
    cfg = layout.cfg
    p, t = cfg.pim, cfg.timing
    groups = p.acc_groups
    slots = p.acc_slots
    act, pre = ("PACTAB", "PPREAB") if p.row_buffers == 2 else ("ACTAB", "PREAB")
    before_pre = max(0, t.tRTP // t.tCCD - 1)
    units = [(tile, c) for c in range(layout.chunks) for tile in range(layout.tiles)]

    def rdmac(u):
        tile, c = units[u]
        kind = "result" if c == layout.chunks - 1 else "partial_out"
        return [("RDMAC", {"col": g, "row": (u % slots) << 4, "tag": (kind, tile, g)}) for g in range(groups)]

    def preload(tile, c, s):
        for g in range(groups):
            if c > 0:
                yield "WRBIAS", {"col": g, "row": s << 4, "data": ("partial", tile, g),
                                 "after": ("partial_out", tile, g)}
            else:
                yield "WRBIAS", {"col": g, "row": s << 4, "data": ("bias", tile, g) if with_bias else ("zero",)}

    pending = []                     # WRGBs of the next chunk not yet issued
    for g in _wrgbs(layout, 0):
        pending.append(("WRGB", {"col": g, "data": ("x", 0, g)}))
    u = 0
    for c in range(layout.chunks):
        gpc = layout.chunk_groups(c)
        # Hoist the second unit's preload into the activation gap only when a unit's reads alone cover the
        # previous unit's tMAC less its read-out and preload (else the read-out stalls and nothing is won).
        reads = layout.chunk_cols(c) + layout.scale_cols(c) + layout.sel_cols(c)
        hoist = slots == 2 and reads * t.tCCD >= t.tMAC - 2 * groups * t.tCCD
        for r in range(layout.rows_per_chunk):
            tiles = list(range(r * layout.per_row, min(layout.tiles, (r + 1) * layout.per_row)))
            yield "REFRESH_POINT", {}
            yield act, {"row": layout.row_of(tiles[0], c)}
            yield from pending              # the chunk's input, in the activation gap
            pending = []
            for j, tile in enumerate(tiles):
                s = u % slots
                # Preloads: the row's first two units' (both slots are free before the row's ACT: their
                # previous units were read out) while the row activates; a later unit's after the RDMAC of
                # the unit two before it.
                if j == 0:
                    yield from preload(tile, c, s)
                    if hoist and len(tiles) > 1:
                        yield from preload(tiles[1], c, 1 - s)
                elif j > 1 or not hoist or len(tiles) == 1:
                    yield from preload(tile, c, s)
                code, sc, sl = layout.unit_columns_at(j, c)
                cpg = p.quant_group // 64
                for k in range(len(sc)):
                    yield "LDSCAB", {"col": sc[k]}
                    if sl:
                        yield "LDSLAB", {"col": sl[k]}
                    for grp in range(16 * k, min(gpc, 16 * (k + 1))):
                        for i in range(grp * cpg, (grp + 1) * cpg):
                            yield "MACAB", {"col": code[i], "row": (grp % 16) | (s << 4)}
                if slots == 1:
                    yield from rdmac(u)
                elif j > 0:
                    yield from rdmac(u - 1)
                u += 1
            # The next chunk's input: the first writes before the precharge (after the last MAC).
            if r == layout.rows_per_chunk - 1 and c + 1 < layout.chunks:
                pending = [("WRGB", {"col": g, "data": ("x", c + 1, g)}) for g in _wrgbs(layout, c + 1)]
                yield from pending[:before_pre]
                pending = pending[before_pre:]
            yield pre, {}
            if slots == 2:
                yield from rdmac(u - 1)


def w4_gemv_lower_bound(cfg, K: int, N: int) -> dict:
    """Lower bound on the cycles of a 4-bit GEMV on one channel (first command to the last result word).

    Like :func:`firmware.pim.gemv_lower_bound`, from the timing parameters alone. ``reads_r`` = the row's
    column reads (MACAB + LDSCAB + LDSLAB). The last reads of consecutive rows are at least

    * ``tRTP + tRP + tRCDRD + (reads_r - 1) * tCCD`` apart (bank path: precharge, activate, the reads);
    * ``(2 + wrgb + units_r * groups + (units_r - 1) * groups + reads_r) * tCCD`` apart (command bus:
      PRE, ACT, the new chunk's ``wrgb`` global-buffer writes that cannot overlap the previous row's MACs,
      each unit's WRBIAS, the RDMAC of every unit of the row but the last, the reads);

    the first row needs ``max(tRCDRD + (reads - 1) * tCCD, (wrgb + groups + reads) * tCCD)``; the last
    row ends ``tMAC + groups * tCCD + tRL`` after its last MAC. The whole command count is another bound.
    ``amortized_cycles`` charges refresh at its steady-state rate (``tRFC`` of every ``tREFI``).
    (Left out, so the bound stays a lower bound: tRAS, and the accumulator path inside a row.)
    """
    t, p = cfg.timing, cfg.pim
    L = W4GemvLayout(cfg, K, N)
    g = p.acc_groups
    rows = []
    for c in range(L.chunks):
        for r in range(L.rows_per_chunk):
            units = min(L.tiles, (r + 1) * L.per_row) - r * L.per_row
            reads = units * (L.chunk_cols(c) + L.scale_cols(c) + L.sel_cols(c))
            wrgb = len(_wrgbs(L, c)) if r == 0 else 0
            rows.append((units, reads, wrgb))
    u0, r0, w0 = rows[0]
    total = max(t.tRCDRD + (r0 - 1) * t.tCCD, (w0 + g + r0) * t.tCCD)
    cmds = 0
    for i, (units, reads, wrgb) in enumerate(rows):
        cmds += 2 + wrgb + reads + 2 * units * g
        if i == 0:
            continue
        bank = t.tRTP + t.tRP + t.tRCDRD + (reads - 1) * t.tCCD
        bus = (2 + wrgb + units * g + (units - 1) * g + reads) * t.tCCD
        total += max(bank, bus)
    total += t.tMAC + g * t.tCCD + t.tRL
    compute = max(total, cmds)
    refresh_factor = t.tREFI / (t.tREFI - t.tRFC)
    return {"cycles": compute, "amortized_cycles": compute * refresh_factor, "refresh_factor": refresh_factor,
            "rows_path": total, "bus": cmds, "rows": len(rows), "per_row": L.per_row,
            "macs": sum(L.chunk_cols(c) for c in range(L.chunks)) * L.tiles}


def gemv_bytes(cfg, K: int, N: int) -> int:
    """Weight bytes the 4-bit GEMV reads (codes, scales, selectors) over every bank and channel."""
    L = W4GemvLayout(cfg, K, N)
    cols = sum(L.chunk_cols(c) + L.scale_cols(c) + L.sel_cols(c) for c in range(L.chunks)) * L.tiles
    return cols * cfg.pim.banks * cfg.pim.channels * cfg.pim.column_bytes


