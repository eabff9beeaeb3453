"""The PCU's 4-bit GEMV (issue 19): the macro's check and layout (:class:`W4Decoder`) and its command rows
(:func:`w4_row_states`), elaborated only for a device with 4-bit weights (``PimGeometry.weight_format``
``int4`` / ``fp4``): the Verilog of BF16 devices does not change.

Macro semantics (:mod:`hw.spec.macro`): the weights of a ``[K, N]`` GEMV are laid out by
``firmware.pim_lowprec.W4GemvLayout(cfg, K, N, base_row=row, chunk_size=cg * quant_group)``: ``K`` a multiple
of ``quant_group``, cut into chunks of ``cg`` groups (``addr1[7:0]``, at most ``max_chunk / quant_group``; 0: that
many, what the global buffer holds; the last chunk the rest; firmware passes the chunk its layout chose);
``per_row`` units (tiles of one chunk) share a row. Every output's accumulator starts from its bias (FP32,
``BIAS``) or zero and takes the units' columns chunk by chunk (:func:`sim.golden.lowprec_unit.unit_acc`); the
result is the accumulator (FP8 activations: without the per-token scale, which the host applies).

Command order (per channel, all channels in lockstep): the order of
:func:`firmware.pim_lowprec.w4_gemv_program`, chunk by chunk: per row ``ACTAB``, (the chunk's first row) the
chunk's ``WRGB`` at every global-buffer slot ``k * period + i`` (``i`` < the unit's code columns; GB columns
``slot * act_ratio + r``), then per unit ``WRBIAS`` per accumulator group into the unit's accumulator slot (chunk
0: bias or zero; later chunks: the partial sums the unit of the same tile left in the previous chunk, once its
RDMAC data is back), per scale column ``LDSCAB`` (``LDSLAB``) and the ``MACAB`` of its groups' code columns
(``row`` field: the scale slot | the accumulator slot << 4), then ``RDMAC`` per group: with one accumulator slot
the unit's own, with two (``acc_slots = 2``: unit ``u`` of the GEMV in slot ``u mod 2``) the previous unit's of
the row (its tMAC runs during this unit's MACs; the memory controller times PU_BUSY per slot), and the row's last
unit's after the row's ``PREAB``. One difference from the program: a later chunk's WRGBs all go after its first
row's ACTAB (the program sends the first of them before the previous row's PREAB); the device accepts it (the
previous chunk's MACs are issued). With two slots the row's second unit is preloaded right after the first unit's
preload when a unit's reads cover tMAC less the read-out and preload, as the program's ``hoist``.

Layout registers: code column ``i`` of unit ``j`` of a row is ``j * period + i``; the scale (and selector)
columns are the row's free columns in order (:meth:`W4GemvLayout.unit_columns_at`), which a walker
(``fc``) steps through: the column after a free column ``c`` is ``c + 1``, or ``c + 1 + n`` when ``c + 1``
starts a block of code columns (``n`` code columns per unit of the chunk, blocks of ``period`` columns,
``per_row`` blocks hold code).

Not issued (``UNSUPPORTED``): a full chunk's unit wider than a row, grid selectors in more than one column
(``fp4`` with grid choice, more than 16 groups in a chunk); neither arises on the presets.
"""

from amaranth.hdl import Array, Cat, Const, Module, Mux, Signal
from amaranth.lib import wiring
from amaranth.lib.wiring import In, Out

from .config import SystemConfig
from .memif import AddressMap
from .pcu_parts import (
    E_BAD_ADDRESS,
    E_BAD_FLAGS,
    E_BAD_LENGTH,
    E_BAD_PACKING,
    E_BAD_REGION,
    E_NO_INPUT,
    E_NONE,
    E_RESERVED_NONZERO,
    E_UNSUPPORTED,
    F_BIAS,
    MacroLayout,
)
from .pim.commands import LOWPREC_OPCODES, PimOp
from .spec.macro import MACRO_LIMITS

__all__ = ["w4_units", "W4Decoder", "w4_row_states"]


def _pow2_ceil(n: int) -> int:
    return 1 << (n - 1).bit_length()


def w4_units(cfg: SystemConfig) -> list:
    """Per chunk length in quantization groups (index ``kg`` = 0 .. ``max_chunk / quant_group``; 0 unused): the
    unit's ``dict(n, plog, sc, sl, per_row)`` (code, scale and selector columns, log2 of its column period, units
    per row before the tile count limits it: the first chunk's ``plog`` and ``per_row`` hold for every chunk), or
    ``None`` when the PCU does not issue it (module docstring)."""
    p = cfg.pim
    q = p.quant_group
    max_chunk = p.gb_slots * 64 // q * q
    out = [None]
    for kg in range(1, max_chunk // q + 1):
        n = kg * q // 64
        sc = -(-kg // 16)
        sl = sc if p.grid_choice else 0
        period = _pow2_ceil(n)
        unit = n + sc + sl
        if unit > p.columns or sl > 1:
            out.append(None)
            continue
        out.append({"n": n, "plog": period.bit_length() - 1, "sc": sc, "sl": sl,
                    "per_row": max(1, min(p.columns // period, p.columns // unit))})
    return out


class W4Decoder(wiring.Component):
    """A 4-bit GEMV macro's check (the functional model's order, :meth:`sim.pim_model.FunctionalDevice.execute`)
    and its layout (combinational).

    Members
    -------
    macro : In(MacroLayout)
    input_n : In(16)
    tiles : In(16)
        Tiles of ``banks * channels`` outputs.
    code : Out(8)
        The GEMV's error code (``NONE``: it is issued).
    chunks : Out(16)
        Input chunks (of ``cg`` groups, the last one the rest).
    cg : Out(8)
        Groups per chunk: ``addr1[7:0]``, or (0) ``max_chunk / quant_group``.
    ncols, sc : Out(8)
        Code columns of a unit of the first chunk; its scale columns (as many selector columns with grid choice).
    nlast, sclast : Out(8)
        The same for the last chunk.
    plog : Out(4)
        log2 of the code columns' period.
    per_row : Out(8)
        Units per row.
    first_free, ff_last : Out(8)
        The row's first column that is not a code column (first chunk; last chunk).
    """

    def __init__(self, cfg: SystemConfig):
        if not cfg.pim.lowprec:
            raise ValueError(f"the 4-bit GEMV decoder needs a 4-bit device, not weight_format={cfg.pim.weight_format!r}")
        self.cfg = cfg
        super().__init__({"macro": In(MacroLayout), "input_n": In(16), "tiles": In(16), "code": Out(8),
                          "chunks": Out(16), "cg": Out(8), "ncols": Out(8), "sc": Out(8), "nlast": Out(8), "sclast": Out(8),
                          "plog": Out(4), "per_row": Out(8), "first_free": Out(8), "ff_last": Out(8)})

    def elaborate(self, platform):
        m = Module()
        p = self.cfg.pim
        table = w4_units(self.cfg)
        KG = len(table) - 1                 # groups of a full chunk (a power of two)
        qlog = p.quant_group.bit_length() - 1
        mc, code = self.macro, self.code
        K, N = mc.n, mc.m
        groups = Signal(16)
        cg = self.cg
        bad_chunk = (mc.addr1[8:16] != 0) | (mc.addr1[:8] > KG)
        m.d.comb += [groups.eq(K >> qlog), cg.eq(Mux((mc.addr1[:8] == 0) | bad_chunk, KG, mc.addr1[:8]))]
        if KG > 1:      # (a divider only when the chunk size can vary)
            m.d.comb += self.chunks.eq((groups + cg - 1) // cg)
        else:
            m.d.comb += self.chunks.eq(groups)
        kg, kg_last = Signal(range(KG + 1)), Signal(range(KG + 1))
        m.d.comb += [kg.eq(Mux(groups > cg, cg, groups)),
                     kg_last.eq(Mux(groups == 0, 0, groups - (self.chunks - 1) * cg))]

        def col(key, index):
            return Array(Const(r[key] if r else 0, 8) for r in table)[index]

        ok = Array(Const(r is not None, 1) for r in table)[kg]
        p0 = Signal(8)
        m.d.comb += [self.ncols.eq(col("n", kg)), self.sc.eq(col("sc", kg)), self.plog.eq(col("plog", kg)),
                     self.nlast.eq(col("n", kg_last)), self.sclast.eq(col("sc", kg_last)), p0.eq(col("per_row", kg)),
                     self.per_row.eq(Mux(self.tiles < p0, self.tiles, p0))]
        period = Const(1, 1) << self.plog
        for ff, n in ((self.first_free, self.ncols), (self.ff_last, self.nlast)):
            m.d.comb += ff.eq(Mux(n < period, n, self.per_row << self.plog))
        # Rows: chunks * ceil(tiles / per_row) (per_row >= 1 when the code is NONE).
        rows_used = Signal(24)
        m.d.comb += rows_used.eq(self.chunks * ((self.tiles + self.per_row - 1) // Mux(self.per_row == 0, 1,
                                                                                          self.per_row)))

        amap = AddressMap(p)
        col_bytes = p.column_bytes
        end = mc.addr0 + ((N * 4 + col_bytes - 1) >> (col_bytes.bit_length() - 1)) * col_bytes
        bias_ok = (mc.addr0[:amap.col_lo] == 0) & (end <= p.total_bytes)
        avail = Signal(16)
        m.d.comb += avail.eq(p.data_rows - mc.row)
        with m.If(mc.addr1[16:] != 0):
            m.d.comb += code.eq(E_RESERVED_NONZERO)
        with m.Elif((mc.flags & ~F_BIAS) != 0):            # GELU after a 4-bit GEMV is not supported
            m.d.comb += code.eq(E_BAD_FLAGS)
        with m.Elif((K == 0) | (K > MACRO_LIMITS["input_values"]) | (N == 0) | (N > MACRO_LIMITS["result_values"]) |
                    (K[:qlog] != 0)):
            m.d.comb += code.eq(E_BAD_LENGTH)
        with m.Elif(K > self.input_n):
            m.d.comb += code.eq(E_NO_INPUT)
        with m.Elif(bad_chunk):
            m.d.comb += code.eq(E_BAD_PACKING)
        with m.Elif(~ok):
            m.d.comb += code.eq(E_UNSUPPORTED)
        with m.Elif((mc.row >= p.data_rows) | (rows_used > avail)):
            m.d.comb += code.eq(E_BAD_REGION)
        with m.Elif(mc.flags[0] & ~bias_ok):
            m.d.comb += code.eq(E_BAD_ADDRESS)
        with m.Else():
            m.d.comb += code.eq(E_NONE)
        return m


def w4_row_states(pcu, s):
    """The 4-bit GEMV's rows (the module docstring's order): states ``Row-Act`` .. ``W4-Pre`` of the PCU's
    state machine (entered from ``Check`` or the bias transfer like the BF16 rows)."""
    m, p = s.m, pcu.cfg.pim
    G = pcu.groups
    C = p.channels
    w4 = s.w4
    emit, can_load, g, tile, chunk = s.emit, s.can_load, s.g, s.tile, s.chunk
    colc, gcol = s.colc, s.written
    ar_log = p.act_ratio.bit_length() - 1
    cpg_log = (p.quant_group // 64).bit_length() - 1
    # Input words of a group: quant_group / 64 MAC-wide slots of act_ratio words (a power of two).
    group_words_log = (p.quant_group // 64 * p.act_ratio).bit_length() - 1
    chunk_word0 = Signal(16, name="w4_chunk_word0")     # the chunk's first input word
    j = Signal(8, name="w4_unit")              # the unit's position in its row
    ui = Signal(16, name="w4_unit_index")      # units read out so far (chunk-major)
    new_chunk = Signal(name="w4_new_chunk")    # the row is its chunk's first
    fc = Signal(8, name="w4_free_col")         # the next scale / selector column (walker)
    nfree = Signal(8, name="w4_next_free")
    last_chunk = chunk == w4.chunks - 1
    last_tile = tile == s.tiles - 1
    n_c = Signal(8, name="w4_ncols")           # code columns of a unit of this chunk
    m.d.comb += n_c.eq(Mux(last_chunk, w4.nlast, w4.ncols))
    period_mask = (Const(1, 1) << w4.plog) - 1

    def is_code(c):
        return ((c & period_mask) < n_c) & ((c >> w4.plog) < w4.per_row)

    m.d.comb += nfree.eq(Mux(is_code(fc + 1), fc + 1 + n_c, fc + 1))
    ldscab, ldslab = LOWPREC_OPCODES["LDSCAB"], LOWPREC_OPCODES["LDSLAB"]

    two = p.acc_slots == 2
    slot = ui[0] if two else Const(0, 1)      # the current unit's accumulator slot (unit index mod 2)
    # Two slots: the row's second unit is preloaded right after the first (while the row activates) when a
    # unit's reads cover tMAC less the read-out and preload (w4_gemv_program's ``hoist``).
    t = pcu.cfg.timing
    hoisted = Signal(name="w4_hoisted")        # the current unit's preload was hoisted
    hoist = Signal(name="w4_hoist")
    thr = t.tMAC - 2 * G * t.tCCD
    reads_c = n_c + Mux(last_chunk, w4.sclast, w4.sc) * (2 if p.grid_choice else 1)
    m.d.comb += hoist.eq((reads_c * t.tCCD >= thr) if two and thr > 0 else int(two))

    def next_unit():
        """After a unit's MACs (and the RDMAC that follows them): the row's next unit, or its PREAB."""
        with m.If(last_tile | (j + 1 == w4.per_row)):
            m.next = "W4-Pre"
        with m.Else():
            m.d.sync += [g.eq(0), j.eq(j + 1), tile.eq(tile + 1), ui.eq(ui + 1)]
            with m.If(hoisted):
                m.d.sync += [hoisted.eq(0), colc.eq(0)]
                m.next = "W4-Lds"
            with m.Else():
                m.next = "W4-Bias"

    def next_row():
        """After a row (its PREAB, with two slots also the RDMAC of its last unit): the next row or the end."""
        m.d.sync += [g.eq(0), ui.eq(ui + 1)]
        with m.If(last_tile & last_chunk):
            pcu._finish(s, n_resp=w4.chunks * s.tiles * (G * C), res=True)
        with m.Elif(last_tile):
            m.d.sync += [tile.eq(0), chunk.eq(chunk + 1), new_chunk.eq(1),
                         chunk_word0.eq(chunk_word0 + (w4.cg << group_words_log))]
            m.next = "Row-Act"
        with m.Else():
            m.d.sync += tile.eq(tile + 1)
            m.next = "Row-Act"

    with m.State("Row-Act"):
        with m.If(can_load):
            m.d.sync += emit(PimOp.ACTAB, row=s.mc.row + s.trow)
            m.d.sync += [j.eq(0), g.eq(0), fc.eq(Mux(last_chunk, w4.ff_last, w4.first_free)), hoisted.eq(0)]
            with m.If((s.trow == 0) | new_chunk):
                # The chunk's input, after its first row's ACTAB (the previous chunk's MACs are done).
                m.d.sync += [gcol.eq(0), new_chunk.eq(0)]
                with m.If(s.trow == 0):
                    m.d.sync += [ui.eq(0), chunk_word0.eq(0)]
                m.next = "W4-Gb"
            with m.Else():
                m.next = "W4-Bias"
    with m.State("W4-Gb"):
        # GB column gcol = slot * act_ratio + r holds the chunk's word (slot mod period) * act_ratio + r.
        nxt = Signal(16)
        slot_n = Signal(16)
        m.d.comb += slot_n.eq((gcol + 1) >> ar_log)
        m.d.comb += nxt.eq(Mux((slot_n & period_mask) < n_c, gcol + 1,
                               ((slot_n >> w4.plog) + 1) << (w4.plog + ar_log)))
        with m.If(can_load):
            m.d.comb += [s.x_r.addr.eq(chunk_word0 + (gcol & ((Const(1, 1) << (w4.plog + ar_log)) - 1))),
                         s.x_r.en.eq(1)]
            m.d.sync += emit(PimOp.WRGB, col=gcol, src=s.SRC_X)
            m.d.sync += [s.o_xmask.eq(-1), gcol.eq(nxt)]
            with m.If(nxt >= p.gb_columns):
                m.next = "W4-Bias"
    with m.State("W4-Bias"):
        # Chunk 0: the bias (once it is in) or zero; chunk > 0: the partial sums this tile's unit of the previous
        # chunk left (unit index ui - tiles): its responses must be in on every channel.
        need = Signal(16)
        m.d.comb += need.eq((ui - s.tiles + 1) * G)
        dep_ok = Mux(chunk == 0, s.bias_in, Cat(r >= need for r in s.rsp.recv) == (1 << C) - 1)
        with m.If(can_load & dep_ok):
            m.d.comb += pcu._rbuf_read(s, tile * G + g)
            m.d.sync += emit(PimOp.WRBIAS, col=g, row=slot << 4,
                             src=Mux(s.with_bias | (chunk != 0), s.SRC_R, s.SRC_ZERO))
            with m.If(g == G - 1):
                m.d.sync += [g.eq(0), colc.eq(0)]
                m.next = "W4-Lds"
                if two:
                    with m.If((j == 0) & hoist & (w4.per_row > 1) & ~last_tile):
                        m.next = "W4-Bias2"
            with m.Else():
                m.d.sync += g.eq(g + 1)
    if two:
        with m.State("W4-Bias2"):
            # The hoisted preload of the row's second unit (tile + 1, the other slot; unit index ui + 1).
            need2 = Signal(16)
            m.d.comb += need2.eq((ui - s.tiles + 2) * G)
            dep2 = Mux(chunk == 0, s.bias_in, Cat(r >= need2 for r in s.rsp.recv) == (1 << C) - 1)
            with m.If(can_load & dep2):
                m.d.comb += pcu._rbuf_read(s, (tile + 1) * G + g)
                m.d.sync += emit(PimOp.WRBIAS, col=g, row=(~slot) << 4,
                                 src=Mux(s.with_bias | (chunk != 0), s.SRC_R, s.SRC_ZERO))
                with m.If(g == G - 1):
                    m.d.sync += [g.eq(0), hoisted.eq(1)]
                    m.next = "W4-Lds"
                with m.Else():
                    m.d.sync += g.eq(g + 1)
    with m.State("W4-Lds"):
        with m.If(can_load):
            m.d.sync += emit(PimOp.MACAB, col=fc)
            m.d.sync += [s.o_op.eq(ldscab), fc.eq(nfree)]
            m.next = "W4-Lsl" if p.grid_choice else "W4-Mac"
    if p.grid_choice:
        with m.State("W4-Lsl"):
            with m.If(can_load):
                m.d.sync += emit(PimOp.MACAB, col=fc)
                m.d.sync += [s.o_op.eq(ldslab), fc.eq(nfree)]
                m.next = "W4-Mac"
    with m.State("W4-Mac"):
        with m.If(can_load):
            grp = colc >> cpg_log
            m.d.sync += emit(PimOp.MACAB, col=(j << w4.plog) + colc, row=grp[:4] | (slot << 4))
            m.d.sync += colc.eq(colc + 1)
            with m.If(colc + 1 == n_c):
                m.d.sync += g.eq(0)
                if two:
                    # The previous unit's RDMAC (its tMAC ran during these MACs); the row's first unit has none.
                    with m.If(j != 0):
                        m.next = "W4-Rd"
                    with m.Else():
                        next_unit()
                else:
                    m.next = "W4-Rd"
            with m.Elif(((colc + 1) & ((16 << cpg_log) - 1)) == 0):
                m.next = "W4-Lds"           # the next 16 groups' scale column (int4 / fp4 without grid choice)
    with m.State("W4-Rd"):
        # One slot: the unit's own RDMAC; two slots: the previous unit's (tile - 1, the other slot).
        with m.If(can_load):
            if two:
                m.d.sync += emit(PimOp.RDMAC, col=g, row=(~slot) << 4, tag=((tile - 1) * G + g)[:8])
            else:
                m.d.sync += emit(PimOp.RDMAC, col=g, tag=(tile * G + g)[:8])
            with m.If(g != G - 1):
                m.d.sync += g.eq(g + 1)
            with m.Else():
                next_unit()
    with m.State("W4-Pre"):
        with m.If(can_load):
            m.d.sync += emit(PimOp.PREAB)
            m.d.sync += [s.trow.eq(s.trow + 1), g.eq(0)]
            if two:
                m.next = "W4-Rd-Last"
            else:
                next_row()
    if two:
        with m.State("W4-Rd-Last"):
            # The row's last unit's RDMAC, after the PREAB.
            with m.If(can_load):
                m.d.sync += emit(PimOp.RDMAC, col=g, row=slot << 4, tag=(tile * G + g)[:8])
                with m.If(g != G - 1):
                    m.d.sync += g.eq(g + 1)
                with m.Else():
                    next_row()
