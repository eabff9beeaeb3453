"""PIM control unit (PCU): macro PIM commands in, timed micro-command streams out.

The PCU decodes the macro commands of :mod:`firmware.macro` (``WRITE_VEC``,
``GEMV`` with optional bias and GELU, ``READ_RES``) into PIM micro commands
for every channel's :class:`hw.memctrl.MemoryController` (which times them),
with the same semantics as the functional model (:mod:`sim.pim_model`): the
same validation order and error codes, the same GEMV command program as
:func:`firmware.pim.gemv_program` (without the global-buffer write
interleaving: the controller issues every micro command as early as the
timing rules allow), bit-exact results.

Buffers
-------
``xbuf``: the input vector, one 16-lane BF16 column word per entry
(``input_values / lanes`` entries). ``rbuf<c>``: per channel, one word of
``banks_per_word`` FP32 accumulators per (tile, group) — index
``tile * groups + group`` — holding the bias, then the partial sums between
input chunks, then the results (``result_values`` outputs in all).

Results in device memory are contiguous FP32 (or BF16) in output order: result
word ``j`` (8 FP32) is output block ``8j .. 8j+7`` = rbuf entry
``(channel (j // groups) % channels, index (j // (groups*channels)) * groups + j % groups)``;
this needs ``banks`` to be a multiple of ``banks_per_word`` (checked).

Memory access (WRITE_VEC, the bias, READ_RES) uses ACT/RD/WR/PRE micro
commands on the channel that owns each 32-byte column, keeping one open row
per channel; read responses return in order per channel, so a per-channel
counter of the next expected word gives each response its destination.

While a macro command runs, ``mode<c>`` holds every channel in PIM mode (the
controllers hold normal traffic back); it falls when the controllers are idle.
"""

from amaranth.hdl import Array, Cat, Const, Module, Mux, Signal
from amaranth.lib import data, stream, wiring
from amaranth.lib.memory import Memory
from amaranth.lib.wiring import In, Out

from .arith import fp32_to_bf16
from .config import SystemConfig
from .memctrl import pim_command_layout, pim_response_layout
from .memif import AddressMap
from .pim.commands import PimOp

__all__ = ["Pcu", "PcuSystem", "MacroLayout", "MACRO_LIMITS"]

# Kept equal to firmware.macro.pcu_limits (checked by the tests).
MACRO_LIMITS = {"input_values": 4096, "result_values": 4096}

# MacroOp / MacroFlag / MacroError values (firmware/macro.py is the table; the tests check they agree).
OP_NOP, OP_WRITE_VEC, OP_GEMV, OP_READ_RES = 0, 1, 2, 3
F_BIAS, F_GELU, F_BF16 = 1, 2, 4
E_NONE, E_BAD_OPCODE, E_BAD_FLAGS, E_BAD_LENGTH, E_BAD_ADDRESS, E_BAD_REGION, E_NO_INPUT, E_NO_RESULT = range(8)
E_DEVICE_VIOLATION, E_RESERVED_NONZERO = 9, 10

MacroLayout = data.StructLayout({
    "op": 8, "flags": 8, "n": 16, "m": 16, "row": 16, "addr0": 32, "addr1": 32,
})


class Pcu(wiring.Component):
    """PIM control unit for all channels.

    Members
    -------
    macro : In(stream.Signature(MacroLayout))
        Macro commands (from the prototype's command queue).
    busy : Out(1)
    error : Out(8)
        First error (MacroError code) since ``clear``; while set, macro
        commands are consumed without effect.
    clear : In(1)
    completed : Out(32)
        Macro commands consumed.
    p<c>, pr<c>, mode<c>, pidle<c>, perr<c>
        Per channel: micro commands out, micro responses in, PIM mode out,
        controller idle in, controller error in.
    """

    def __init__(self, cfg: SystemConfig):
        if not isinstance(cfg, SystemConfig):
            raise TypeError(f"Configuration must be a SystemConfig, not {cfg!r}")
        p = cfg.pim
        if p.banks % p.banks_per_word:
            raise ValueError(f"The PCU needs banks to be a multiple of column_bits/32 = {p.banks_per_word}, "
                             f"not {p.banks}")
        self.cfg = cfg
        self.x_words = MACRO_LIMITS["input_values"] // p.lanes
        self.groups = p.acc_groups
        self.max_tiles = -(-MACRO_LIMITS["result_values"] // (p.banks * p.channels))
        self.r_words = self.max_tiles * self.groups
        if self.r_words > 256 or self.x_words > 256:
            raise ValueError("PCU buffers are indexed by 8-bit tags: at most 256 words each")
        members = {"macro": In(stream.Signature(MacroLayout)), "busy": Out(1), "error": Out(8),
                   "clear": In(1), "completed": Out(32)}
        for c in range(p.channels):
            members.update({f"p{c}": Out(stream.Signature(pim_command_layout(cfg))),
                            f"pr{c}": In(stream.Signature(pim_response_layout(cfg))),
                            f"mode{c}": Out(1), f"pidle{c}": In(1), f"perr{c}": In(1)})
        super().__init__(members)

    def elaborate(self, platform):
        m = Module()
        cfg = self.cfg
        p = cfg.pim
        C, B, G, L = p.channels, p.banks, self.groups, p.lanes
        bpw = p.banks_per_word
        amap = AddressMap(p)
        col_bytes = p.column_bytes
        gbc = p.gb_columns                      # columns per input chunk
        per_tile = B * C
        pins = [getattr(self, f"p{c}") for c in range(C)]
        prs = [getattr(self, f"pr{c}") for c in range(C)]

        # ---------------- buffers ----------------
        m.submodules.xbuf = xbuf = Memory(shape=p.column_bits, depth=self.x_words, init=[])
        x_w, x_r = xbuf.write_port(), xbuf.read_port()
        rbufs, r_ws, r_rs = [], [], []
        for c in range(C):
            rb = m.submodules[f"rbuf{c}"] = Memory(shape=p.column_bits, depth=self.r_words, init=[])
            rbufs.append(rb)
            r_ws.append(rb.write_port())
            r_rs.append(rb.read_port())

        # ---------------- macro registers ----------------
        mc = Signal(MacroLayout)
        err = self.error
        with m.If(self.clear):
            m.d.sync += err.eq(E_NONE)
        for c in range(C):
            with m.If(getattr(self, f"perr{c}") & (err == E_NONE) & ~self.clear):
                m.d.sync += err.eq(E_DEVICE_VIOLATION)
        input_n = Signal(16)
        result_n = Signal(16)

        # Derived GEMV sizes.
        K, N = mc.n, mc.m
        tiles = Signal(16)
        chunks = Signal(16)
        m.d.comb += [
            tiles.eq((N + per_tile - 1) >> (per_tile.bit_length() - 1)),
            chunks.eq((K + p.gb_values - 1) >> (p.gb_values.bit_length() - 1)),
        ]

        def words(nvals, bytes_per_value):
            return (nvals * bytes_per_value + col_bytes - 1) >> (col_bytes.bit_length() - 1)

        def addr_ok(nvals, bytes_per_value):
            end = mc.addr0 + words(nvals, bytes_per_value) * col_bytes
            return (mc.addr0[:amap.col_lo] == 0) & (end <= p.total_bytes)

        # ---------------- the micro-command emitter ----------------
        # One command at a time, to a set of channels; data per channel.
        e_valid = Signal(C)                 # channels still to accept the current command
        e_op = Signal(PimOp)
        e_bank = Signal(max(p.bank_addr_bits, 1))
        e_row = Signal(p.row_addr_bits)
        e_col = Signal(p.column_addr_bits)
        e_tag = Signal(8)
        e_data = [Signal(p.column_bits, name=f"e_data{c}") for c in range(C)]
        for c in range(C):
            pl = pins[c].payload
            m.d.comb += [
                pins[c].valid.eq(e_valid[c]),
                pl.op.eq(e_op), pl.row.eq(e_row), pl.col.eq(e_col), pl.tag.eq(e_tag),
                pl.data.eq(e_data[c]), pl.mask.eq((1 << p.column_bytes) - 1),
            ]
            if p.bank_addr_bits:
                m.d.comb += pl.bank.eq(e_bank)
            with m.If(pins[c].valid & pins[c].ready):
                m.d.sync += e_valid[c].eq(0)
        free = e_valid == 0

        def emit(op, channels=None, bank=0, row=0, col=0, tag=0, same_data=None):
            """Load the emitter (call only when ``free``)."""
            stmts = [e_op.eq(op), e_bank.eq(bank), e_row.eq(row), e_col.eq(col), e_tag.eq(tag),
                     e_valid.eq((1 << C) - 1 if channels is None else channels)]
            if same_data is not None:
                stmts += [d.eq(same_data) for d in e_data]
            return stmts

        # ---------------- responses ----------------
        # One response per cycle (lowest channel first); destination by phase.
        PH_X, PH_B, PH_R = 0, 1, 2
        phase = Signal(2)
        recv = [Signal(16, name=f"recv{c}") for c in range(C)]      # responses taken, per source channel
        next_w = [Signal(16, name=f"next_w{c}") for c in range(C)]  # next word index expected, per channel
        recv_total = Signal(16)
        row_words = p.columns * B                                     # words before the channel field changes
        o_off = Signal(range(row_words))                              # column offset of the transfer's start
        pick = Signal(range(C + 1))
        m.d.comb += pick.eq(C)
        for c in reversed(range(C)):
            with m.If(prs[c].valid):
                m.d.comb += pick.eq(c)
        resp_data = Array(pr.payload.data for pr in prs)[pick]
        resp_tag = Array(pr.payload.tag for pr in prs)[pick]
        w_cur = Array(next_w)[pick]
        for c in range(C):
            m.d.comb += prs[c].ready.eq(pick == c)
        any_resp = pick != C
        # bias word w -> rbuf (channel (w // G) % C, index (w // (G*C)) * G + w % G)
        b_chan = (w_cur >> (G.bit_length() - 1)) & (C - 1) if C > 1 else Const(0, 1)
        b_idx = Cat(w_cur[:(G - 1).bit_length()] if G > 1 else Const(0, 0),
                    w_cur >> ((G * C).bit_length() - 1))
        for c in range(C):
            m.d.comb += [r_ws[c].data.eq(resp_data), x_w.data.eq(resp_data)]
            with m.If(any_resp):
                with m.If(phase == PH_R):
                    m.d.comb += [r_ws[c].addr.eq(resp_tag), r_ws[c].en.eq(pick == c)]
                with m.If(phase == PH_B):
                    m.d.comb += [r_ws[c].addr.eq(b_idx), r_ws[c].en.eq(b_chan == c)]
        with m.If(any_resp & (phase == PH_X)):
            m.d.comb += [x_w.addr.eq(w_cur), x_w.en.eq(1)]
        with m.If(any_resp):
            m.d.sync += recv_total.eq(recv_total + 1)
            for c in range(C):
                with m.If(pick == c):
                    m.d.sync += recv[c].eq(recv[c] + 1)
                    nxt = next_w[c] + 1
                    # Words of one channel come in runs of row_words; then the other channels' runs.
                    m.d.sync += next_w[c].eq(Mux(((nxt + o_off) % row_words) == 0,
                                                 nxt + row_words * (C - 1), nxt))

        # ---------------- open-row tracking for memory access ----------------
        o_valid = Signal(C)
        o_bank = [Signal(max(p.bank_addr_bits, 1), name=f"o_bank{c}") for c in range(C)]
        o_row = [Signal(p.row_addr_bits, name=f"o_row{c}") for c in range(C)]

        # ---------------- counters of the loops ----------------
        j = Signal(16)            # word index (memory phases)
        nwords = Signal(16)
        tile = Signal(16)
        chunk = Signal(16)
        colc = Signal(16)
        g = Signal(8)
        row_i = Signal(16)        # rows emitted so far (tile-major within a chunk)
        ncols = Signal(16)
        last_chunk = chunk == chunks - 1
        gelu = mc.flags[1]
        prev_tile = Signal(16)
        have_prev = Signal()
        prev_af = Signal()
        rdata_reg = Signal(p.column_bits)
        half = Signal()

        # Address of word j.
        waddr = Signal(32)
        m.d.comb += waddr.eq(mc.addr0 + (j << amap.col_lo))
        f = amap.rtl_fields(waddr)
        w_ch = Signal(range(C))
        m.d.comb += w_ch.eq(f["channel"] if p.channel_addr_bits else 0)
        ch_mask = Signal(C)
        m.d.comb += ch_mask.eq((Const(1, C) << w_ch)[:C])
        cur_open = Signal()
        cur_same = Signal()
        m.d.comb += [
            cur_open.eq(o_valid.bit_select(w_ch, 1)),
            cur_same.eq((Array(o_bank)[w_ch] == f["bank"]) & (Array(o_row)[w_ch] == f["row"])),
        ]
        open_stmts = [o_valid.eq(o_valid | ch_mask)]
        for c in range(C):
            open_stmts += [o_bank[c].eq(Mux(w_ch == c, f["bank"], o_bank[c])),
                           o_row[c].eq(Mux(w_ch == c, f["row"], o_row[c]))]
        close_stmts = [o_valid.eq(o_valid & ~ch_mask)]

        # Per source channel, the first word index it serves, for a transfer starting at addr0:
        # word j's channel is ((o + j) // row_words) % C with o the column offset of addr0 in its row group.
        o_all = (mc.addr0 >> amap.col_lo) % (row_words * C)
        o_in = Signal(range(row_words))
        ch0 = Signal(range(C))
        m.d.comb += [o_in.eq(o_all % row_words), ch0.eq((o_all // row_words) if C > 1 else 0)]
        start_words = [o_off.eq(o_in)]
        for c in range(C):
            dist = (c - ch0) % C if C > 1 else 0
            start_words.append(next_w[c].eq(Mux(ch0 == c, 0, dist * row_words - o_in)))

        busy = Signal()
        m.d.comb += self.busy.eq(busy)
        for c in range(C):
            m.d.comb += getattr(self, f"mode{c}").eq(busy)

        all_idle = Cat(getattr(self, f"pidle{c}") for c in range(C)) == (1 << C) - 1

        def compute_ncols(ch):
            rem = K - (ch << (p.gb_values.bit_length() - 1))
            return Mux(rem >= p.gb_values, gbc, (rem + L - 1) >> (L.bit_length() - 1))

        with m.FSM(name="pcu"):
            with m.State("Idle"):
                m.d.comb += self.macro.ready.eq(1)
                with m.If(self.macro.valid):
                    m.d.sync += [mc.eq(self.macro.payload), busy.eq(1)]
                    m.next = "Check"
            with m.State("Check"):
                code = Signal(8)
                op = mc.op
                with m.If(mc.addr1 != 0):
                    m.d.comb += code.eq(E_RESERVED_NONZERO)
                with m.Elif(op == OP_NOP):
                    m.d.comb += code.eq(E_NONE)
                with m.Elif(op == OP_WRITE_VEC):
                    with m.If(mc.flags != 0):
                        m.d.comb += code.eq(E_BAD_FLAGS)
                    with m.Elif((mc.n == 0) | (mc.n > MACRO_LIMITS["input_values"])):
                        m.d.comb += code.eq(E_BAD_LENGTH)
                    with m.Elif(~addr_ok(mc.n, 2)):
                        m.d.comb += code.eq(E_BAD_ADDRESS)
                with m.Elif(op == OP_GEMV):
                    with m.If((mc.flags & ~(F_BIAS | F_GELU)) != 0):
                        m.d.comb += code.eq(E_BAD_FLAGS)
                    with m.Elif((K == 0) | (K > MACRO_LIMITS["input_values"]) | (N == 0) |
                                (N > MACRO_LIMITS["result_values"])):
                        m.d.comb += code.eq(E_BAD_LENGTH)
                    with m.Elif(K > input_n):
                        m.d.comb += code.eq(E_NO_INPUT)
                    with m.Elif(mc.row + tiles * chunks > p.data_rows):
                        m.d.comb += code.eq(E_BAD_REGION)
                    with m.Elif(mc.flags[0] & ~addr_ok(N, 4)):
                        m.d.comb += code.eq(E_BAD_ADDRESS)
                with m.Elif(op == OP_READ_RES):
                    with m.If((mc.flags & ~F_BF16) != 0):
                        m.d.comb += code.eq(E_BAD_FLAGS)
                    with m.Elif((mc.n == 0) | (mc.n > MACRO_LIMITS["result_values"])):
                        m.d.comb += code.eq(E_BAD_LENGTH)
                    with m.Elif(mc.n > result_n):
                        m.d.comb += code.eq(E_NO_RESULT)
                    with m.Elif(~addr_ok(mc.n, Mux(mc.flags[2], 2, 4))):
                        m.d.comb += code.eq(E_BAD_ADDRESS)
                with m.Else():
                    m.d.comb += code.eq(E_BAD_OPCODE)
                reset_resp = [recv_total.eq(0), j.eq(0), o_valid.eq(0)] + [r.eq(0) for r in recv]
                with m.If(err != E_NONE):
                    m.next = "Finish"
                with m.Elif(code != E_NONE):
                    m.d.sync += err.eq(code)
                    m.next = "Finish"
                with m.Elif(op == OP_WRITE_VEC):
                    m.d.sync += reset_resp + [phase.eq(PH_X), nwords.eq(words(mc.n, 2))]
                    m.d.sync += start_words
                    m.next = "Mem-Read"
                with m.Elif(op == OP_GEMV):
                    m.d.sync += reset_resp + [phase.eq(PH_B), nwords.eq(words(N, 4))]
                    m.d.sync += start_words
                    with m.If(mc.flags[0]):
                        m.next = "Mem-Read"
                    with m.Else():
                        m.next = "Gemv-Start"
                with m.Elif(op == OP_READ_RES):
                    m.d.sync += reset_resp + [nwords.eq(words(mc.n, Mux(mc.flags[2], 2, 4)))]
                    m.next = "Res-Fetch"
                with m.Else():
                    m.next = "Finish"

            # ---- memory reads: WRITE_VEC (into xbuf) and the bias (into rbuf) ----
            with m.State("Mem-Read"):
                with m.If(free):
                    with m.If(j == nwords):
                        m.d.sync += emit(PimOp.PREAB)
                        m.next = "Mem-Drain"
                    with m.Elif(~cur_open):
                        m.d.sync += emit(PimOp.ACT, channels=ch_mask, bank=f["bank"], row=f["row"])
                        m.d.sync += open_stmts
                    with m.Elif(~cur_same):
                        m.d.sync += emit(PimOp.PREAB, channels=ch_mask)
                        m.d.sync += close_stmts
                    with m.Else():
                        m.d.sync += emit(PimOp.RD, channels=ch_mask, bank=f["bank"], col=f["column"], tag=j[:8])
                        m.d.sync += j.eq(j + 1)
            with m.State("Mem-Drain"):
                with m.If(free & (recv_total == nwords)):
                    with m.If(phase == PH_X):
                        m.d.sync += input_n.eq(mc.n)
                        m.next = "Finish"
                    with m.Else():
                        m.next = "Gemv-Start"

            # ---- GEMV ----
            with m.State("Gemv-Start"):
                m.d.sync += [phase.eq(PH_R), tile.eq(0), chunk.eq(0), row_i.eq(0), have_prev.eq(0),
                             recv_total.eq(0)] + [r.eq(0) for r in recv]
                m.next = "Row-Act"
            with m.State("Row-Act"):
                with m.If(free):
                    m.d.sync += emit(PimOp.ACTAB, row=mc.row + tile * chunks + chunk)
                    m.d.sync += [g.eq(0), ncols.eq(compute_ncols(chunk))]
                    with m.If(have_prev):
                        m.next = "Row-Read"
                    with m.Else():
                        m.next = "Row-Bias-Wait"
            with m.State("Row-Read"):
                with m.If(free):
                    m.d.sync += emit(Mux(prev_af, PimOp.RDAF, PimOp.RDMAC), col=g, tag=(prev_tile * G + g)[:8])
                    with m.If(g == G - 1):
                        m.d.sync += g.eq(0)
                        m.next = "Row-Bias-Wait"
                    with m.Else():
                        m.d.sync += g.eq(g + 1)
            with m.State("Row-Bias-Wait"):
                # Chunk > 0 reads the partial sums of this tile from the previous chunk: all of
                # that row's responses must be in (row index row_i - tiles).
                need = Signal(16)
                m.d.comb += need.eq(Mux(chunk == 0, 0, (row_i - tiles + 1) * G))
                ok = Cat(r >= need for r in recv) == (1 << C) - 1
                for c in range(C):
                    m.d.comb += r_rs[c].addr.eq(tile * G + g)
                with m.If(ok):
                    m.next = "Row-Bias-Read"
            with m.State("Row-Bias-Read"):
                for c in range(C):
                    m.d.comb += r_rs[c].addr.eq(tile * G + g)
                m.next = "Row-Bias"
            with m.State("Row-Bias"):
                for c in range(C):
                    m.d.comb += r_rs[c].addr.eq(tile * G + g)
                with m.If(free):
                    m.d.sync += emit(PimOp.WRBIAS, col=g)
                    use = (chunk != 0) | mc.flags[0]
                    for c in range(C):
                        m.d.sync += e_data[c].eq(Mux(use, r_rs[c].data, 0))
                    with m.If(g == G - 1):
                        m.d.sync += [g.eq(0), colc.eq(0)]
                        with m.If(tile == 0):
                            m.next = "Row-Gb-Read"
                        with m.Else():
                            m.next = "Row-Mac"
                    with m.Else():
                        m.d.sync += g.eq(g + 1)
                        m.next = "Row-Bias-Wait"
            with m.State("Row-Gb-Read"):
                m.d.comb += x_r.addr.eq((chunk << (gbc.bit_length() - 1)) + colc)
                m.next = "Row-Gb"
            with m.State("Row-Gb"):
                m.d.comb += x_r.addr.eq((chunk << (gbc.bit_length() - 1)) + colc)
                with m.If(free):
                    m.d.sync += emit(PimOp.WRGB, col=colc, same_data=x_r.data)
                    with m.If(colc == ncols - 1):
                        m.d.sync += colc.eq(0)
                        m.next = "Row-Mac"
                    with m.Else():
                        m.d.sync += colc.eq(colc + 1)
                        m.next = "Row-Gb-Read"
            with m.State("Row-Mac"):
                with m.If(free):
                    m.d.sync += emit(PimOp.MACAB, col=colc)
                    with m.If(colc == ncols - 1):
                        m.next = "Row-Pre"
                    with m.Else():
                        m.d.sync += colc.eq(colc + 1)
            with m.State("Row-Pre"):
                with m.If(free):
                    m.d.sync += emit(PimOp.PREAB)
                    m.d.sync += [prev_tile.eq(tile), have_prev.eq(1), prev_af.eq(gelu & last_chunk),
                                 row_i.eq(row_i + 1)]
                    with m.If(gelu & last_chunk):
                        m.next = "Af-Act"
                    with m.Else():
                        m.next = "Row-Next"
            with m.State("Af-Act"):
                with m.If(free):
                    m.d.sync += emit(PimOp.ACTAB, row=p.data_rows)
                    m.next = "Af"
            with m.State("Af"):
                with m.If(free):
                    m.d.sync += emit(PimOp.AF)
                    m.next = "Af-Pre"
            with m.State("Af-Pre"):
                with m.If(free):
                    m.d.sync += emit(PimOp.PREAB)
                    m.next = "Row-Next"
            with m.State("Row-Next"):
                with m.If(tile == tiles - 1):
                    with m.If(last_chunk):
                        m.d.sync += g.eq(0)
                        m.next = "Final-Read"
                    with m.Else():
                        m.d.sync += [tile.eq(0), chunk.eq(chunk + 1)]
                        m.next = "Row-Act"
                with m.Else():
                    m.d.sync += tile.eq(tile + 1)
                    m.next = "Row-Act"
            with m.State("Final-Read"):
                with m.If(free):
                    m.d.sync += emit(Mux(prev_af, PimOp.RDAF, PimOp.RDMAC), col=g, tag=(prev_tile * G + g)[:8])
                    with m.If(g == G - 1):
                        m.next = "Gemv-Drain"
                    with m.Else():
                        m.d.sync += g.eq(g + 1)
            with m.State("Gemv-Drain"):
                with m.If(free & (recv_total == tiles * chunks * G * C)):
                    m.d.sync += result_n.eq(N)
                    m.next = "Finish"

            # ---- READ_RES: rbuf -> device memory ----
            with m.State("Res-Fetch"):
                # FP32: word j = entry j. BF16: word j = entries 2j (lanes 0-7) and 2j+1 (lanes 8-15).
                e = Mux(mc.flags[2], Cat(half, j), j)
                r_chan = (e >> (G.bit_length() - 1)) & (C - 1) if C > 1 else Const(0, 1)
                r_idx = Cat(e[:(G - 1).bit_length()] if G > 1 else Const(0, 0), e >> ((G * C).bit_length() - 1))
                for c in range(C):
                    m.d.comb += r_rs[c].addr.eq(r_idx)
                sel = Signal(range(C))
                m.d.sync += sel.eq(r_chan)
                m.next = "Res-Latch"
            with m.State("Res-Latch"):
                word = Array(r.data for r in r_rs)[sel]
                with m.If(mc.flags[2]):
                    packed = Cat(*[fp32_to_bf16(word[32 * k:32 * k + 32]) for k in range(bpw)])
                    with m.If(half == 0):
                        m.d.sync += [rdata_reg[:16 * bpw].eq(packed), half.eq(1)]
                        m.next = "Res-Fetch"
                    with m.Else():
                        m.d.sync += [rdata_reg[16 * bpw:].eq(packed), half.eq(0)]
                        m.next = "Res-Write"
                with m.Else():
                    m.d.sync += rdata_reg.eq(word)
                    m.next = "Res-Write"
            with m.State("Res-Write"):
                with m.If(free):
                    with m.If(~cur_open):
                        m.d.sync += emit(PimOp.ACT, channels=ch_mask, bank=f["bank"], row=f["row"])
                        m.d.sync += open_stmts
                    with m.Elif(~cur_same):
                        m.d.sync += emit(PimOp.PREAB, channels=ch_mask)
                        m.d.sync += close_stmts
                    with m.Else():
                        m.d.sync += emit(PimOp.WR, channels=ch_mask, bank=f["bank"], col=f["column"],
                                         same_data=rdata_reg)
                        m.d.sync += j.eq(j + 1)
                        with m.If(j + 1 == nwords):
                            m.next = "Res-Close"
                        with m.Else():
                            m.next = "Res-Fetch"
            with m.State("Res-Close"):
                with m.If(free):
                    m.d.sync += emit(PimOp.PREAB)
                    m.next = "Finish"

            with m.State("Finish"):
                with m.If(free & all_idle):
                    m.d.sync += [busy.eq(0), self.completed.eq(self.completed + 1)]
                    m.next = "Idle"
        return m


class PcuSystem(wiring.Component):
    """The prototype's FPGA part below the host interface, with the device: PCU + one memory
    controller per channel (:class:`hw.memctrl.MemCtrlSystem`) + the PIM device.

    Members (``c`` = channel)
    -------------------------
    macro, busy, error, clear, completed : as :class:`Pcu`
    r<c>, q<c> : normal requests in, responses out (the host window)
    mon<c>, s<c>, k<c> : the command bus the device sees, the device's status, the controller's counters
    bd_load : the device's back door
    """

    def __init__(self, cfg: SystemConfig, device_factory):
        from .memctrl import BusMonitorSignature, MemCtrlCounters
        from .memif import request_layout, response_layout
        from .pim.channel import PimStatusSignature

        self.cfg = cfg
        self._device_factory = device_factory
        members = {"macro": In(stream.Signature(MacroLayout)), "busy": Out(1), "error": Out(8),
                   "clear": In(1), "completed": Out(32), "bd_load": In(1)}
        for c in range(cfg.pim.channels):
            members.update({
                f"r{c}": In(stream.Signature(request_layout(cfg))),
                f"q{c}": Out(stream.Signature(response_layout(cfg))),
                f"mon{c}": Out(BusMonitorSignature(cfg)),
                f"s{c}": Out(PimStatusSignature()),
                f"k{c}": Out(MemCtrlCounters()),
            })
        super().__init__(members)

    def elaborate(self, platform):
        from .memctrl import MemCtrlSystem

        m = Module()
        cfg = self.cfg
        m.submodules.pcu = pcu = Pcu(cfg)
        m.submodules.mem = mem = MemCtrlSystem(cfg, self._device_factory)
        wiring.connect(m, wiring.flipped(self.macro), pcu.macro)
        m.d.comb += [self.busy.eq(pcu.busy), self.error.eq(pcu.error), self.completed.eq(pcu.completed),
                     pcu.clear.eq(self.clear), mem.bd_load.eq(self.bd_load)]
        for c in range(cfg.pim.channels):
            wiring.connect(m, getattr(pcu, f"p{c}"), getattr(mem, f"p{c}"))
            wiring.connect(m, getattr(mem, f"pr{c}"), getattr(pcu, f"pr{c}"))
            m.d.comb += [getattr(mem, f"mode{c}").eq(getattr(pcu, f"mode{c}")),
                         getattr(pcu, f"pidle{c}").eq(getattr(mem, f"pidle{c}")),
                         getattr(pcu, f"perr{c}").eq(getattr(mem, f"perr{c}"))]
            wiring.connect(m, wiring.flipped(getattr(self, f"r{c}")), getattr(mem, f"r{c}"))
            wiring.connect(m, getattr(mem, f"q{c}"), wiring.flipped(getattr(self, f"q{c}")))
            wiring.connect(m, getattr(mem, f"mon{c}"), wiring.flipped(getattr(self, f"mon{c}")))
            wiring.connect(m, getattr(mem, f"s{c}"), wiring.flipped(getattr(self, f"s{c}")))
            wiring.connect(m, getattr(mem, f"k{c}"), wiring.flipped(getattr(self, f"k{c}")))
        return m
