"""PIM firmware side: weight layout for GEMV, activation-function tables, GEMV command programs.

Layout of a weight matrix ``W`` of shape ``[K, N]`` (used as ``y = x @ W``,
the Hugging Face GPT-2 convention) on a PIM device:

* Outputs are spread over banks, then channels: output ``n`` belongs to tile
  ``n // (banks * channels)``, channel ``(n // banks) % channels``, bank
  ``n % banks``. One tile is ``banks * channels`` outputs computed at once by
  all-bank MACs in every channel.
* Inputs are cut into chunks of ``gb_values`` (the global buffer holds one
  chunk: 1024 BF16 values for 2 KB). In the bank that owns output ``n``, DRAM
  row ``base_row + tile * chunks + chunk`` holds ``W[chunk*gbv : (chunk+1)*gbv, n]``,
  ``lanes`` values per column. Unused lanes, columns and outputs are zero.

GEMV program per channel (all channels run the same program in lockstep, on
their own slice of outputs): for every chunk, for every tile: preload the
accumulators (WRBIAS: the bias for the first chunk, the partial sums read back
for later chunks), ACTAB the tile's row, write the chunk into the global
buffer (first tile of a chunk only), MACAB over the chunk's columns, PREAB,
RDMAC the results. An FP32 partial sum read out and preloaded again is
unchanged, so the accumulation order is that of one long accumulation.

With a pipelined processing unit (``PimGeometry.acc_stages = P > 1``, issue 15) the accumulator is ``P``
interleaved partial sums: the last MACAB of every tile row carries the combine flag (``row`` bit
:data:`hw.spec.config.COMBINE_ROW_BIT`), so each row's columns are summed in the order of
:func:`hw.spec.fp.accumulate` with ``stages=P`` onto the preloaded value (:func:`gemv_golden`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from hw.spec import fp as G
from hw.spec.config import SystemConfig

__all__ = ["gelu", "af_lut_row", "OutputTiles", "GemvLayout", "PackingError", "gemv_golden", "gemv_program", "gemv_lower_bound",
           "amortized_cycles",
           "hex_lines"]


def gelu(x):
    """GELU, tanh form (GPT-2), in float64."""
    x = np.asarray(x, dtype=np.float64)
    return 0.5 * x * (1.0 + np.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x**3)))


def af_lut_row(cfg: SystemConfig, fn=gelu) -> np.ndarray:
    """The reserved DRAM row holding ``fn`` as a piecewise-linear table: ``[columns, lanes]`` BF16 lanes.

    Segment ``i`` covers ``[x0, x0 + step)`` with ``x0 = -8 + i * step``; its line
    goes through ``(x0, fn(x0))`` and ``(x0 + step, fn(x0 + step))``. The slope is
    rounded to BF16 (the AF unit multiplies BF16 x BF16) and the intercept is
    then chosen in FP32 so that the line passes through the segment's midpoint
    value as closely as FP32 allows.
    """
    p = cfg.pim
    segs = p.af_segments
    step = 16.0 / segs
    x0 = -8.0 + step * np.arange(segs)
    x1 = x0 + step
    slope = (fn(x1) - fn(x0)) / step
    slope_bf16 = G.bf16_to_f32(G.bf16_bits(slope)).astype(np.float64)
    mid = (x0 + x1) / 2
    icpt = (fn(x0) + fn(x1)) / 2 - slope_bf16 * mid
    words = np.empty(2 * segs, dtype=np.uint32)
    words[0::2] = G.f32_bits(slope_bf16.astype(np.float32))
    words[1::2] = G.f32_bits(icpt.astype(np.float32))
    return np.frombuffer(words.astype("<u4").tobytes(), dtype="<u2").reshape(p.columns, p.lanes).copy()


@dataclass(frozen=True)
class OutputTiles:
    """The output tiling every PIM weight layout shares (:class:`GemvLayout`; the 4-bit
    :class:`firmware.pim_lowprec.W4GemvLayout` and :class:`firmware.quant.PimLowPrecLayout`): output ``n`` in
    tile ``n // (banks * channels)``, channel ``(n // banks) % channels``, bank ``n % banks``. The fields
    ``cfg`` (a :class:`hw.spec.config.SystemConfig`), ``K`` and ``N`` (the GEMV's ``[K, N]``) come first in
    every layout; a layout adds ``base_row`` and ``rows_used``."""

    cfg: SystemConfig
    K: int
    N: int

    @property
    def per_tile(self) -> int:
        return self.cfg.pim.banks * self.cfg.pim.channels

    @property
    def tiles(self) -> int:
        return -(-self.N // self.per_tile)

    def output_index(self, tile: int, channel: int, bank: int) -> int:
        p = self.cfg.pim
        return (tile * p.channels + channel) * p.banks + bank

    def _check_base_row(self):
        if not isinstance(self.base_row, int) or self.base_row < 0:
            raise ValueError(f"GEMV base_row must be a non-negative integer, not {self.base_row!r}")

    def _check_rows(self, what: str = "GEMV", error=ValueError):
        """``error`` unless rows ``base_row .. base_row + rows_used - 1`` are data rows; ``what`` names the
        GEMV in the message."""
        p = self.cfg.pim
        if self.base_row + self.rows_used > p.data_rows:
            raise error(f"{what} {self.K}x{self.N} needs rows {self.base_row}..{self.base_row + self.rows_used - 1} "
                        f"but only {p.data_rows} data rows exist per bank")


class PackingError(ValueError):
    """A packed GEMV layout that cannot exist (the device's ``BAD_PACKING``, :mod:`hw.spec.macro`)."""


@dataclass(frozen=True)
class GemvLayout(OutputTiles):
    """Where the weights of one ``[K, N]`` GEMV live. See the module docstring.

    Packed (``pitch`` > 0, the GEMV macro's ``addr1``: :func:`hw.spec.macro.pack_addr1`): one input chunk;
    a bank row holds ``per_row = columns / pitch`` tile slots; tile ``t`` is in slot ``q = slot0 + t``, row
    ``base_row + q // per_row``, columns ``(q % per_row) * pitch`` .. ``+ chunk_cols(0) - 1``; the other
    columns of the row are not part of the layout (other GEMVs' tiles may live there)."""

    base_row: int = 0
    pitch: int = 0
    slot0: int = 0

    def __post_init__(self):
        for name in ("K", "N"):
            v = getattr(self, name)
            if not isinstance(v, int) or v < 1:
                raise ValueError(f"GEMV {name} must be a positive integer, not {v!r}")
        self._check_base_row()
        self._check_packing()
        self._check_rows()

    def _check_packing(self):
        p = self.cfg.pim
        pitch, slot0 = self.pitch, self.slot0
        if not isinstance(pitch, int) or not isinstance(slot0, int) or pitch < 0 or slot0 < 0:
            raise PackingError(f"GEMV pitch and slot0 must be non-negative integers, not {pitch!r}, {slot0!r}")
        if not pitch:
            if slot0:
                raise PackingError(f"GEMV first slot {slot0} without packing (pitch 0)")
            return
        if pitch & (pitch - 1) or pitch > p.gb_columns:
            raise PackingError(f"GEMV tile pitch {pitch} must be a power of two of at most the {p.gb_columns} "
                               f"global-buffer columns")
        ncols = -(-self.K // p.lanes)
        if ncols > pitch:
            raise PackingError(f"GEMV K = {self.K} takes {ncols} columns per tile, more than the pitch {pitch}")
        if slot0 >= self.per_row:
            raise PackingError(f"GEMV first slot {slot0} past the {self.per_row} slots of a row (pitch {pitch})")

    @property
    def packed(self) -> bool:
        return self.pitch > 0

    @property
    def per_row(self) -> int:
        """Tile slots per bank row (packed)."""
        return self.cfg.pim.columns // self.pitch if self.pitch else 1

    @property
    def addr1(self) -> int:
        """The GEMV macro's ``addr1`` for this layout."""
        from hw.spec.macro import pack_addr1
        return pack_addr1(self.pitch, self.slot0)

    @property
    def chunk(self) -> int:
        return self.cfg.pim.gb_values

    @property
    def chunks(self) -> int:
        return -(-self.K // self.chunk)

    @property
    def rows_used(self) -> int:
        if self.pitch:
            return (self.slot0 + self.tiles - 1) // self.per_row + 1
        return self.tiles * self.chunks

    def chunk_cols(self, c: int) -> int:
        """Columns (of ``lanes`` values) used by chunk ``c``."""
        length = min(self.chunk, self.K - c * self.chunk)
        return -(-length // self.cfg.pim.lanes)

    def row_of(self, tile: int, chunk: int) -> int:
        if self.pitch:
            return self.base_row + (self.slot0 + tile) // self.per_row
        return self.base_row + tile * self.chunks + chunk

    def col_of(self, tile: int) -> int:
        """First column of ``tile`` in its row (0 unless packed)."""
        if self.pitch:
            return (self.slot0 + tile) % self.per_row * self.pitch
        return 0

    def _place(self):
        """(row index within the layout's rows, first column, columns) of every tile's first chunk (packed)."""
        n = self.chunk_cols(0)
        return [(self.row_of(t, 0) - self.base_row, self.col_of(t), n) for t in range(self.tiles)]

    def pack(self, w_bits: np.ndarray) -> np.ndarray:
        """BF16 weights ``[K, N]`` -> DRAM contents ``[channels, banks, rows_used, columns, lanes]`` (packed: the
        columns outside the layout's tiles are zero)."""
        p = self.cfg.pim
        if w_bits.shape != (self.K, self.N):
            raise ValueError(f"weights must have shape ({self.K}, {self.N}), not {w_bits.shape}")
        kp = self.chunks * self.chunk
        npad = self.tiles * self.per_tile
        wp = np.zeros((kp, npad), dtype=np.uint16)
        wp[:self.K, :self.N] = w_bits
        # [chunks, cols_per_row(=gb cols), lanes, tiles, channels, banks]
        gbc = self.chunk // p.lanes
        v = wp.reshape(self.chunks, gbc, p.lanes, self.tiles, p.channels, p.banks)
        v = v.transpose(4, 5, 3, 0, 1, 2)          # channels, banks, tiles, chunks, gbc, lanes
        if self.pitch:
            out = np.zeros((p.channels, p.banks, self.rows_used, p.columns, p.lanes), dtype=np.uint16)
            for t, (r, c0, n) in enumerate(self._place()):
                out[:, :, r, c0:c0 + n] = v[:, :, t, 0, :n]
            return out
        out = np.zeros((p.channels, p.banks, self.tiles, self.chunks, p.columns, p.lanes), dtype=np.uint16)
        out[..., :gbc, :] = v
        return out.reshape(p.channels, p.banks, self.rows_used, p.columns, p.lanes)

    def unpack(self, rows: np.ndarray) -> np.ndarray:
        """DRAM rows ``[rows_used, channels, banks, columns, lanes]`` (:meth:`firmware.memimage.MemoryImage.rows`)
        -> the ``[K, N]`` BF16 weights (inverse of :meth:`pack`)."""
        p = self.cfg.pim
        gbc = self.chunk // p.lanes
        if self.pitch:
            v = np.zeros((self.tiles, 1, p.channels, p.banks, gbc, p.lanes), dtype=np.uint16)
            for t, (r, c0, n) in enumerate(self._place()):
                v[t, 0, ..., :n, :] = rows[r, :, :, c0:c0 + n]
        else:
            v = rows.reshape(self.tiles, self.chunks, p.channels, p.banks, p.columns, p.lanes)[..., :gbc, :]
        # -> [chunks, gbc, lanes, tiles, channels, banks] = [K_pad, N_pad]
        w = v.transpose(1, 4, 5, 0, 2, 3).reshape(self.chunks * self.chunk, self.tiles * self.per_tile)
        return np.ascontiguousarray(w[:self.K, :self.N])


def gemv_golden(cfg: SystemConfig, w_bits: np.ndarray, x_bits: np.ndarray, bias_bits=None) -> np.ndarray:
    """FP32 result bits of the PIM GEMV, in the hardware's order (bit-exact with the RTL).

    ``acc = bias``; for every chunk, for every column of ``lanes`` inputs:
    ``acc = acc + tree(w_col * x_col)``. With ``acc_stages = P > 1`` each chunk (one tile row: preload,
    its columns, the combining MAC) is :func:`hw.spec.fp.accumulate` with ``stages=P`` onto ``acc``.
    """
    p = cfg.pim
    K, N = w_bits.shape
    lanes = p.lanes
    kp = -(-K // lanes) * lanes
    wp = np.zeros((kp, N), dtype=np.uint16)
    wp[:K] = w_bits
    xp = np.zeros(kp, dtype=np.uint16)
    xp[:K] = x_bits
    acc = np.zeros(N, dtype=np.uint32) if bias_bits is None else np.asarray(bias_bits, dtype=np.uint32).copy()
    P = p.acc_stages
    if P > 1:
        gbc = p.gb_values // lanes                     # columns of one input chunk (one tile row)
        for c0 in range(0, kp // lanes, gbc):
            unit = G.InterleavedAccumulator(P, acc)
            for c in range(c0, min(c0 + gbc, kp // lanes)):
                unit.add(G.mac_lanes(wp[c * lanes:(c + 1) * lanes].T, xp[c * lanes:(c + 1) * lanes][None, :]))
            acc = unit.combine()
        return acc
    for c in range(kp // lanes):
        wc = wp[c * lanes:(c + 1) * lanes].T            # [N, lanes]
        acc = G.add_f32(acc, G.mac_lanes(wc, xp[c * lanes:(c + 1) * lanes][None, :]))
    return acc


def gemv_program(layout: GemvLayout, with_bias: bool = True, activation: bool = False):
    """The per-channel GEMV command program, in issue order.

    Yields ``(op, fields)``; ``fields`` may hold ``bank``, ``row``, ``col``,
    ``data`` and ``tag``. ``data`` is a symbolic reference resolved by the
    issuer: ``("x", chunk, col)`` a global-buffer column of the input,
    ``("bias", tile, group)`` the first chunk's preload, ``("partial", tile,
    group)`` a later chunk's preload (the words read back by the RDMAC tagged
    ``("result", tile, group)``), ``("zero",)``.

    Order around a tile row boundary: ... MACAB PREAB | [WRGB of a new chunk,
    first part] REFRESH_POINT ACTAB RDMAC(previous row) WRBIAS [WRGB, rest]
    MACAB ... The next row's activation starts tRP after the precharge while
    the accumulators drain (tMAC) and are read and preloaded; a new chunk's
    global-buffer writes fill the precharge and activation gaps.
    ``REFRESH_POINT`` marks where a refresh may go (all banks closed).

    With ``activation`` the rows of the last chunk end with the activation
    function: PREAB, ACTAB of the reserved LUT row, AF, PREAB; the results
    leave through RDAF instead of RDMAC (tagged the same way).

    With two row buffers per bank (``row_buffers = 2``) ACTAB / PREAB are
    PACTAB / PPREAB: the weight rows live in the PIM row buffer.

    With a pipelined processing unit (``acc_stages > 1``) the last MACAB of every row has ``row`` =
    ``PimGeometry.combine_flag``: the combining MAC (the partial sums are added up before RDMAC / AF read them).
    """
    if layout.pitch:
        yield from _packed_program(layout, with_bias, activation)
        return
    cfg = layout.cfg
    p, t = cfg.pim, cfg.timing
    groups = p.acc_groups
    before_pre = max(0, t.tRTP // t.tCCD - 1)       # free slots between the last MAC and PREAB
    before_act = max(0, t.tRP // t.tCCD - 1)        # free slots between PREAB and the next ACTAB
    # With two row buffers (NeuPIMs) the rows MACAB and AF read are opened and closed in the PIM buffer.
    act, pre = ("PACTAB", "PPREAB") if p.row_buffers == 2 else ("ACTAB", "PREAB")
    rows = [(tile, chunk) for chunk in range(layout.chunks) for tile in range(layout.tiles)]
    combine = p.combine_flag
    written = 0          # global-buffer columns of the current row's chunk already written
    for i, (tile, chunk) in enumerate(rows):
        n = layout.chunk_cols(chunk)
        yield "REFRESH_POINT", {}
        yield act, {"row": layout.row_of(tile, chunk)}
        if i > 0:
            read = "RDAF" if activation and rows[i - 1][1] == layout.chunks - 1 else "RDMAC"
            for g in range(groups):
                yield read, {"col": g, "tag": ("result", rows[i - 1][0], g)}
        for g in range(groups):
            if chunk > 0:
                data = ("partial", tile, g)
            else:
                data = ("bias", tile, g) if with_bias else ("zero",)
            yield "WRBIAS", {"col": g, "data": data}
        if tile == 0:
            for c in range(written, n):
                yield "WRGB", {"col": c, "data": ("x", chunk, c)}
        for c in range(n):
            yield "MACAB", ({"col": c, "row": combine} if combine and c == n - 1 else {"col": c})
        # A new chunk next: start writing it into the slots around the precharge.
        nxt = rows[i + 1] if i + 1 < len(rows) else None
        written = 0
        if nxt is not None and nxt[0] == 0:
            n_next = layout.chunk_cols(nxt[1])
            for c in range(min(before_pre, n_next)):
                yield "WRGB", {"col": c, "data": ("x", nxt[1], c)}
            written = min(before_pre, n_next)
        yield pre, {}
        if activation and chunk == layout.chunks - 1:
            yield act, {"row": p.data_rows}
            yield "AF", {}
            yield pre, {}
        if nxt is not None and nxt[0] == 0:
            extra = min(before_act, n_next - written)
            for c in range(written, written + extra):
                yield "WRGB", {"col": c, "data": ("x", nxt[1], c)}
            written += extra
    for g in range(groups):
        yield ("RDAF" if activation else "RDMAC"), {"col": g, "tag": ("result", rows[-1][0], g)}


def _packed_program(layout: GemvLayout, with_bias: bool, activation: bool):
    """:func:`gemv_program` of a packed layout (one input chunk; :class:`GemvLayout` ``pitch``): per tile
    (``REFRESH_POINT`` and ACTAB only when the tile starts a row) the previous tile's RDMAC, WRBIAS, the input's
    columns at the tile's global-buffer slots (tiles ``t < gb_columns / pitch`` only: later tiles read slots
    written before), its MACs at its columns, PREAB when the next tile is in another row (always with
    ``activation``: the LUT row follows)."""
    p = layout.cfg.pim
    groups = p.acc_groups
    act, pre = ("PACTAB", "PPREAB") if p.row_buffers == 2 else ("ACTAB", "PREAB")
    n = layout.chunk_cols(0)
    per_gb = p.gb_columns // layout.pitch
    read = "RDAF" if activation else "RDMAC"
    for tile in range(layout.tiles):
        c0 = layout.col_of(tile)
        if tile == 0 or activation or c0 == 0:
            yield "REFRESH_POINT", {}
            yield act, {"row": layout.row_of(tile, 0)}
        if tile > 0:
            for g in range(groups):
                yield read, {"col": g, "tag": ("result", tile - 1, g)}
        for g in range(groups):
            yield "WRBIAS", {"col": g, "data": ("bias", tile, g) if with_bias else ("zero",)}
        if tile < per_gb:
            for c in range(n):
                yield "WRGB", {"col": (c0 + c) % p.gb_columns, "data": ("x", 0, c)}
        for c in range(n):
            yield "MACAB", ({"col": c0 + c, "row": p.combine_flag} if p.combine_flag and c == n - 1
                            else {"col": c0 + c})
        if tile == layout.tiles - 1 or activation or layout.col_of(tile + 1) == 0:
            yield pre, {}
        if activation:
            yield act, {"row": p.data_rows}
            yield "AF", {}
            yield pre, {}
    for g in range(groups):
        yield read, {"col": g, "tag": ("result", layout.tiles - 1, g)}


def gemv_lower_bound(cfg: SystemConfig, K: int, N: int, activation: bool = False, pitch: int = 0,
                     slot0: int = 0) -> dict:
    """Lower bound on the cycles of a GEMV on one channel, from the timing parameters alone.

    Measured from the first command to the last result word. With ``n`` MACs in
    the next tile row, the last MACs of consecutive rows are at least

    * ``tRTP + tRP + tRCD + (n-1)*tCCD`` apart (bank path: precharge, activate
      the next row, its MACs),
    * ``tMAC + 2*groups*tCCD + (n-1)*tCCD`` apart (accumulator path: the
      results leave through RDMAC and the next preload enters through WRBIAS
      only after the MAC pipeline drained), and
    * for the first row of a new input chunk, ``(2 + 2*groups + 2n)*tCCD``
      apart (bus: the single global buffer is rewritten after the previous
      row's back-to-back MACs);

    the first row needs ``max(tRCD + (n-1)*tCCD, (groups + 2n)*tCCD)`` to its last MAC,
    the last row ``tMAC + groups*tCCD + tRL`` after it until its results are out. The
    command bus gives another bound: one command per cycle, column commands
    ``tCCD`` apart. ``cycles`` = max(rows, bus); ``amortized_cycles`` adds
    refresh at its steady-state rate (``tRFC`` out of every ``tREFI``), to be
    compared with :func:`amortized_cycles` of a measurement.
    (``tRAS`` is left out: it cannot bind unless ``tRAS > tRCD + (n-1)*tCCD + tRTP``,
    and leaving a term out keeps the bound a lower bound.)

    With ``activation``, each row of the last chunk also opens the LUT row:
    its bank path gains ``tRP + max(tRAS, tRCD + tRTP)`` (the AF row's ACT to
    PRE, after the data row's precharge) and the AF waits ``tMAC`` after the
    last MAC; the last row ends ``tAF + groups*tCCD + tRL`` after its AF.

    Packed (``pitch``, ``slot0``: :class:`GemvLayout`'s): a tile in the row of the previous one (no
    activation) has no bank path (the row stays open), and each of the first ``gb_columns / pitch`` tiles
    writes its ``n`` global-buffer slots (bus: ``2*groups + 2n`` column commands); ACTAB / PREAB only per row.
    """
    t, p = cfg.timing, cfg.pim
    layout = GemvLayout(cfg, K, N, 0, pitch, slot0) if pitch else GemvLayout(cfg, K, N)
    g = p.acc_groups
    per_gb = p.gb_columns // pitch if pitch else 1
    rows = [(tile, chunk) for chunk in range(layout.chunks) for tile in range(layout.tiles)]
    n0 = layout.chunk_cols(0)
    # Up to the first row's last MAC: tRCD and its MACs; on the bus ACT, the preloads and the
    # chunk's WRGBs come first.
    total = max(t.tRCDRD + (n0 - 1) * t.tCCD, (g + 2 * n0) * t.tCCD)
    col_cmds = 0
    for i, (tile, chunk) in enumerate(rows):
        n = layout.chunk_cols(chunk)
        writes = tile == 0 or (pitch and tile < per_gb)
        col_cmds += n + 2 * g + (n if writes else 0) + (1 if activation and chunk == layout.chunks - 1 else 0)
        if i == 0:
            continue
        # From the previous row's last MAC to this row's last MAC.
        bank = t.tRTP + t.tRP + t.tRCDRD + (n - 1) * t.tCCD
        if pitch and not activation and layout.row_of(tile, 0) == layout.row_of(tile - 1, 0):
            bank = 0                                     # packed: the same row, still open
        if activation and rows[i - 1][1] == layout.chunks - 1:
            bank += t.tRP + max(t.tRAS, t.tRCDRD + t.tRTP)
        acc = t.tMAC + 2 * g * t.tCCD + (n - 1) * t.tCCD
        # A new chunk: with a single global buffer its writes cannot overlap the previous
        # row's back-to-back MACs, so PRE, ACT, the RDMAC/WRBIAS pairs, n WRGB and n MACs follow it.
        bus = (2 + 2 * g + 2 * n) * t.tCCD if tile == 0 else (2 * g + 2 * n) * t.tCCD if writes else 0
        total += max(bank, acc, bus)
    if activation:
        af_at = max(t.tMAC, t.tRTP + t.tRP + t.tRCDRD)
        total += af_at + t.tAF + g * t.tCCD + t.tRL
    else:
        total += t.tMAC + g * t.tCCD + t.tRL
    acts = len(rows) if not pitch or activation else layout.rows_used
    bus = col_cmds * t.tCCD + 2 * acts + (2 * layout.tiles if activation else 0)
    compute = max(total, bus)
    refresh_factor = t.tREFI / (t.tREFI - t.tRFC)
    return {"cycles": compute, "amortized_cycles": compute * refresh_factor, "refresh_factor": refresh_factor,
            "rows_path": total, "bus": bus, "rows": len(rows),
            "macs": sum(layout.chunk_cols(c) for _, c in rows)}


def amortized_cycles(cfg: SystemConfig, cycles: int, refreshes: int) -> float:
    """Measured cycles with refresh charged at its steady-state rate instead of as issued.

    A sequencer may postpone or pull in refreshes, so the REFs that fall inside
    one operation depend on history. Both the bound and the measurement charge
    refresh at the rate the device needs: ``tRFC`` out of every ``tREFI`` cycles.
    The ``refreshes`` REFs issued inside the operation are taken out (each
    costs ``tRFC``: the banks are already closed and precharged for it).
    """
    t = cfg.timing
    return (cycles - refreshes * t.tRFC) * t.tREFI / (t.tREFI - t.tRFC)


def hex_lines(words: np.ndarray) -> list[str]:
    """``[n, lanes]`` BF16 column words -> ``$readmemh`` lines (lane 0 in the low bits)."""
    be = np.ascontiguousarray(words[:, ::-1]).astype(">u2").tobytes().hex()
    width = words.shape[1] * 4
    return [be[i:i + width] for i in range(0, len(be), width)]
