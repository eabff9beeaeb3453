"""PIM control unit (PCU): macro PIM commands in, a streamed micro-command program out.

The PCU decodes the macro commands of :mod:`hw.spec.macro` (``WRITE_VEC``,
``GEMV`` with optional bias and GELU, ``READ_RES``) into PIM micro commands
for every channel's :class:`hw.memctrl.MemoryController` (which times them,
strictly in order), with the same semantics as the functional model
(:mod:`sim.pim_model`): the same validation order and error codes, bit-exact
results. The GEMV command order is that of :func:`firmware.pim.gemv_program`.

Command stream
--------------
One output register holds the command being offered (per channel ``valid``,
shared fields); a new command is loaded in the cycle the last channel accepts
the previous one, so accepted commands follow one another without a bubble
(one per cycle when the controllers take them as fast). Command data that
comes from a buffer (a global-buffer column of the input, a preload, a result
word) is read when the command is loaded: the buffer's read port samples its
address at that clock edge and holds its output (read enable low) until the
command is accepted, so buffer reads cost no cycle of their own.

GEMV order (per channel, all channels in lockstep)
--------------------------------------------------
Bias (``BIAS``): the bias words are read first (a memory transfer, below);
the first input chunk's WRGBs that would delay the first row's MACs fill the
tRP wait after its PREAB.
Then per tile row (chunk-major): ``ACTAB``, the previous row's ``RDMAC`` /
``RDAF``, ``WRBIAS`` per accumulator group (the bias, zero, or the partial
sums this tile's row of the previous chunk left: they wait until read back;
a GEMV of one tile keeps them in the accumulators instead, which gives the
same bits: an FP32 word read out and preloaded again is unchanged),
the chunk's remaining ``WRGB`` (first tile of a chunk), ``MACAB`` per column (with a pipelined processing
unit, ``acc_stages > 1``, the last one carries the combine flag in its ``row`` field),
then, when the next row starts a new chunk, its first WRGBs in the tRTP slot
before ``PREAB`` and the tRP wait after it; with GELU on the last chunk
``ACTAB`` (LUT row), ``AF``, ``PREAB``. Finally the last row's reads.

Buffers
-------
``xbuf``: the input vector, one 16-lane BF16 column word per entry
(``input_values / lanes`` entries). ``rbuf<c>``: per channel, one word of
``banks_per_word`` FP32 accumulators per (tile, group) — index
``tile * groups + group`` — holding the bias, then the partial sums between
input chunks, then the results (``result_values`` outputs in all); a second
read port gives READ_RES both halves of a BF16 result word in one cycle.

Results in device memory are contiguous FP32 (or BF16) in output order: result
word ``j`` (8 FP32) is output block ``8j .. 8j+7`` = rbuf entry
``(channel (j // groups) % channels, index (j // (groups*channels)) * groups + j % groups)``;
this needs ``banks`` to be a multiple of ``banks_per_word`` (checked).

Memory access (WRITE_VEC, the bias, READ_RES) uses ACT/RD/WR/PREAB micro
commands on the channel that owns each 32-byte column, in segments that stay
inside one row of every bank (a transfer crosses a row only every
``channels * banks * columns`` words, in either address map): the segment's
banks are activated first (Row-Channel-Bank-Column: one ACT per bank row, on
its channel; channel-interleaved map: one ACT per bank, in every channel the
segment touches in that bank's row), then its columns are read or written in
order, then PREAB. Read
responses return in order per channel, so a per-channel counter of the next
expected word gives each response its destination.

While a macro command runs, ``mode<c>`` holds every channel in PIM mode (the
controllers hold normal traffic back); it falls when the controllers are idle.
"""

from amaranth.hdl import Array, Cat, Const, Module, Mux, Signal, signed
from amaranth.lib import data, stream, wiring
from amaranth.lib.memory import Memory
from amaranth.lib.wiring import In, Out

from .arith import fp32_to_bf16
from .config import SystemConfig
from .memctrl import pim_command_layout, pim_response_layout
from .memif import AddressMap
from .pim.commands import PimOp
from .spec.macro import FIELDS as MACRO_FIELDS
from .spec.macro import MACRO_LIMITS, MacroError, MacroFlag, MacroOp

__all__ = ["Pcu", "PcuSystem", "MacroLayout", "MACRO_LIMITS"]

# The macro command's codes from its table (hw/spec/macro.py), as plain integers: Amaranth constants of
# their natural width, not of the enum's.
OP_NOP, OP_WRITE_VEC, OP_GEMV, OP_READ_RES = (int(MacroOp[n]) for n in ("NOP", "WRITE_VEC", "GEMV", "READ_RES"))
F_BIAS, F_GELU, F_BF16 = (int(MacroFlag[n]) for n in ("BIAS", "GELU", "BF16"))
(E_NONE, E_BAD_OPCODE, E_BAD_FLAGS, E_BAD_LENGTH, E_BAD_ADDRESS, E_BAD_REGION, E_NO_INPUT, E_NO_RESULT,
 E_DEVICE_VIOLATION, E_RESERVED_NONZERO) = (int(MacroError[n]) for n in (
    "NONE", "BAD_OPCODE", "BAD_FLAGS", "BAD_LENGTH", "BAD_ADDRESS", "BAD_REGION", "NO_INPUT", "NO_RESULT",
    "DEVICE_VIOLATION", "RESERVED_NONZERO"))

# The 128-bit macro command, field for field as the table lays it out (contiguous from bit 0, in order).
MacroLayout = data.StructLayout({name: width for name, _, width in MACRO_FIELDS})


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
    p, pr, mode, pidle, perr : arrays indexed by channel
        Micro commands out, micro responses in, PIM mode out, controller
        idle in, controller error in.
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
        C = p.channels
        super().__init__({"macro": In(stream.Signature(MacroLayout)), "busy": Out(1), "error": Out(8),
                          "clear": In(1), "completed": Out(32),
                          "p": Out(stream.Signature(pim_command_layout(cfg))).array(C),
                          "pr": In(stream.Signature(pim_response_layout(cfg))).array(C),
                          "mode": Out(1).array(C), "pidle": In(1).array(C), "perr": In(1).array(C)})

    def elaborate(self, platform):
        m = Module()
        cfg = self.cfg
        p, t = cfg.pim, cfg.timing
        C, B, G, L = p.channels, p.banks, self.groups, p.lanes
        bpw = p.banks_per_word
        amap = AddressMap(p)
        col_bytes = p.column_bytes
        gbc = p.gb_columns                      # columns per input chunk
        gbc_lg = gbc.bit_length() - 1
        per_tile = B * C
        pins, prs = self.p, self.pr
        # Free command slots in the controllers' timing waits, filled with a new chunk's WRGBs (as
        # firmware.pim.gemv_program does): before PREAB (tRTP after the last MAC), before ACTAB (tRP).
        before_pre = max(0, t.tRTP // t.tCCD - 1)
        before_act = max(0, t.tRP // t.tCCD - 1)
        after_act = max(0, t.tRCDRD // t.tCCD - 1 - G)   # slots between ACTAB + WRBIAS and the first MAC

        # ---------------- buffers ----------------
        m.submodules.xbuf = xbuf = Memory(shape=p.column_bits, depth=self.x_words, init=[])
        x_w, x_r = xbuf.write_port(), xbuf.read_port()
        r_ws, r_rs, r_rs2 = [], [], []
        for c in range(C):
            rb = m.submodules[f"rbuf{c}"] = Memory(shape=p.column_bits, depth=self.r_words, init=[])
            r_ws.append(rb.write_port())
            r_rs.append(rb.read_port())
            r_rs2.append(rb.read_port())        # READ_RES BF16: a word's second half
        # Read ports sample only when a command is loaded: their outputs hold the data of the command
        # being offered until it is accepted.
        m.d.comb += [x_r.en.eq(0)] + [r.en.eq(0) for r in r_rs + r_rs2]

        # ---------------- macro registers ----------------
        mc = Signal(MacroLayout)
        err = self.error
        with m.If(self.clear):
            m.d.sync += err.eq(E_NONE)
        for c in range(C):
            with m.If(self.perr[c] & (err == E_NONE) & ~self.clear):
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

        # ---------------- the command output register ----------------
        SRC_ZERO, SRC_X, SRC_R, SRC_RES32, SRC_RES16 = range(5)
        o_valid = Signal(C)                 # channels still to accept the offered command
        o_op = Signal(PimOp)
        o_bank = Signal(max(p.bank_addr_bits, 1))
        o_row = Signal(p.row_addr_bits)
        o_col = Signal(p.column_addr_bits)
        o_tag = Signal(8)
        o_src = Signal(range(5))
        o_sel = Signal(range(C))            # READ_RES: the rbuf the result word (its first half) comes from
        o_sel2 = Signal(range(C))           # READ_RES BF16: the rbuf of the word's second half
        o_xmask = Signal(L)                 # WRGB: the input lanes below K (the rest are sent as zero)
        o_bmask = Signal(p.column_bytes)    # WR of READ_RES: the bytes of the results (the last word's tail
                                            # past n is not written); all ones for every other command
        res_word = Array(r.data for r in r_rs)[o_sel]
        res_word2 = Array(r.data for r in r_rs2)[o_sel2]

        def pack_bf16(word):
            return Cat(*[fp32_to_bf16(word[32 * k:32 * k + 32]) for k in range(bpw)])

        accepted = Signal(C)
        for c in range(C):
            pl = pins[c].payload
            data = Signal(p.column_bits, name=f"o_data{c}")
            with m.Switch(o_src):
                with m.Case(SRC_X):
                    # Lanes past K hold whatever memory held after the input vector: zero them, so a NaN
                    # or Inf there does not meet the layout's zero padding (0 x Inf = NaN).
                    m.d.comb += data.eq(x_r.data & Cat(o_xmask[k].replicate(16) for k in range(L)))
                with m.Case(SRC_R):
                    m.d.comb += data.eq(r_rs[c].data)
                with m.Case(SRC_RES32):
                    m.d.comb += data.eq(res_word)
                with m.Case(SRC_RES16):
                    m.d.comb += data.eq(Cat(pack_bf16(res_word), pack_bf16(res_word2)))
            m.d.comb += [
                pins[c].valid.eq(o_valid[c]),
                pl.op.eq(o_op), pl.row.eq(o_row), pl.col.eq(o_col), pl.tag.eq(o_tag),
                pl.data.eq(data), pl.mask.eq(o_bmask),
                accepted[c].eq(pins[c].valid & pins[c].ready),
            ]
            if p.bank_addr_bits:
                m.d.comb += pl.bank.eq(o_bank)
        # A command may be loaded when nothing is offered or the last channel takes the offered one now.
        can_load = Signal()
        m.d.comb += can_load.eq((o_valid & ~accepted) == 0)
        m.d.sync += o_valid.eq(o_valid & ~accepted)
        free = o_valid == 0

        # The rows MACAB and AF read: the bank's row buffer, or its PIM row buffer when there are two.
        ACT_PIM = PimOp.PACTAB if p.row_buffers == 2 else PimOp.ACTAB
        PRE_PIM = PimOp.PPREAB if p.row_buffers == 2 else PimOp.PREAB

        def emit(op, channels=None, bank=0, row=0, col=0, tag=0, src=SRC_ZERO, bmask=(1 << p.column_bytes) - 1):
            """Load the output register (sync statements; only under ``can_load``)."""
            return [o_op.eq(op), o_bank.eq(bank), o_row.eq(row), o_col.eq(col), o_tag.eq(tag), o_src.eq(src),
                    o_bmask.eq(bmask), o_valid.eq((1 << C) - 1 if channels is None else channels)]

        # ---------------- responses ----------------
        # One response per cycle (lowest channel first); destination by phase.
        PH_X, PH_B, PH_R = 0, 1, 2
        phase = Signal(2)
        recv = [Signal(16, name=f"recv{c}") for c in range(C)]      # responses taken, per source channel
        next_w = [Signal(16, name=f"next_w{c}") for c in range(C)]  # next word index expected, per channel
        recv_total = Signal(16)
        row_words = amap.run_words                                    # words before the channel field changes
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

        # ---------------- counters of the loops ----------------
        j = Signal(17)            # word index (memory transfers)
        jseg = Signal(17)         # first word of the current segment
        seg_end = Signal(17)      # one past its last word
        nwords = Signal(17)
        need_total = Signal(16)   # responses the macro waits for before it finishes
        fin_input = Signal()
        fin_result = Signal()
        tile = Signal(16)
        chunk = Signal(16)
        colc = Signal(16)
        written = Signal(16)      # global-buffer columns of the chunk being loaded already written
        g = Signal(8)
        row_i = Signal(16)        # rows emitted so far (tile-major within a chunk)
        ncols = Signal(16)
        last_chunk = chunk == chunks - 1
        last_tile = tile == tiles - 1
        one_tile = tiles == 1
        gelu = mc.flags[1]
        with_bias = mc.flags[0]
        bf16 = mc.flags[2]
        prev_tile = Signal(16)
        have_prev = Signal()
        prev_af = Signal()

        def compute_ncols(ch):
            rem = K - (ch << (p.gb_values.bit_length() - 1))
            return Mux(rem >= p.gb_values, gbc, (rem + L - 1) >> (L.bit_length() - 1))

        def cmin(a, k):
            return Mux(a < k, a, k)

        n_next = Signal(16)
        m.d.comb += n_next.eq(compute_ncols(chunk + 1))
        bias_gb = Signal(16)
        m.d.comb += bias_gb.eq(cmin(Mux(ncols > after_act, ncols - after_act, 0), before_act))

        # Address of word j.
        waddr = Signal(32)
        m.d.comb += waddr.eq(mc.addr0 + (j << amap.col_lo))
        f = amap.rtl_fields(waddr)
        w_ch = Signal(range(C))
        m.d.comb += w_ch.eq(f["channel"] if p.channel_addr_bits else 0)
        ch_mask = Signal(C)
        m.d.comb += ch_mask.eq((Const(1, C) << w_ch)[:C])
        # Segments: a row group (every bank of every channel, one row each) is rg words.
        rg = p.columns * B * C
        rg_lg = rg.bit_length() - 1
        first_room = Signal(17)
        m.d.comb += first_room.eq(rg - (mc.addr0 >> amap.col_lo)[:rg_lg])
        if amap.interleave and C > 1:
            # Channel-interleaved map: a bank group (one row of one bank in every channel, columns * C words)
            # is activated by one ACT in every channel the segment touches inside it (runs of row_words).
            bg = p.columns * C
            pos = Signal(range(bg))                      # word j's position in its bank group
            m.d.comb += pos.eq((waddr >> amap.col_lo)[:(bg - 1).bit_length()])
            j_next_bank = j + bg - pos                   # first word of the next bank group
            g_end = Mux(j_next_bank < seg_end, j_next_bank, seg_end)
            runs = Signal(range(bg + 1))                 # runs of row_words of [j, g_end)
            m.d.comb += runs.eq(((pos + (g_end - j) - 1) >> amap.col_low_bits) - (pos >> amap.col_low_bits) + 1)
            run_mask = Signal(C)
            m.d.comb += run_mask.eq((Const(1, 2 * C) << runs) - 1)
            act_mask = Signal(C)
            m.d.comb += act_mask.eq(Mux(runs >= C, (1 << C) - 1, (Cat(run_mask, run_mask) << w_ch)[C:2 * C]))
        else:
            j_next_bank = j + p.columns - f["column"]    # first word of the next bank row
            act_mask = ch_mask

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

        def start_xfer(n):
            return [nwords.eq(n), j.eq(0), jseg.eq(0), seg_end.eq(Mux(n < first_room, n, first_room))] + \
                start_words

        busy = Signal()
        m.d.comb += self.busy.eq(busy)
        # PIM mode asks the controllers for the channel: for the whole macro with one row buffer; with two
        # only around the transfers (their ACT / RD / WR / PREAB use the normal row buffer), so normal
        # requests keep being served while the GEMV's rows stream through the PIM buffers.
        mode = Signal()
        for c in range(C):
            m.d.comb += self.mode[c].eq(mode)

        all_idle = Cat(self.pidle) == (1 << C) - 1

        # READ_RES: result word -> rbuf entry (FP32: word j is entry j; BF16: entries 2j, 2j+1).
        def r_chan(e):
            return (e >> (G.bit_length() - 1)) & (C - 1) if C > 1 else Const(0, 1)

        def r_idx(e):
            return Cat(e[:(G - 1).bit_length()] if G > 1 else Const(0, 0), e >> ((G * C).bit_length() - 1))

        def rbuf_read(addr):
            return [r.addr.eq(addr) for r in r_rs] + [r.en.eq(1) for r in r_rs]

        def gb_write(chunk_value):
            """WRGB of column ``written`` of ``chunk_value`` (comb: the xbuf read; sync: the load)."""
            xcol = (chunk_value << gbc_lg) + written
            left = Signal(signed(18))           # input values from this column's first lane to K
            m.d.comb += [x_r.addr.eq(xcol), x_r.en.eq(1), left.eq(K - (xcol << (L.bit_length() - 1)))]
            m.d.sync += emit(PimOp.WRGB, col=written, src=SRC_X)
            m.d.sync += o_xmask.eq(Cat(left > k for k in range(L)))
            m.d.sync += written.eq(written + 1)

        def finish(n_resp=0, inp=False, res=False):
            m.d.sync += [need_total.eq(n_resp), fin_input.eq(inp), fin_result.eq(res)]
            m.next = "Finish"

        def advance_row():
            """After a row's last PREAB: the next row (tile-major within a chunk), or the last reads."""
            with m.If(last_tile & last_chunk):
                m.d.sync += g.eq(0)
                m.next = "Final-Read"
            with m.Elif(last_tile):
                m.d.sync += [tile.eq(0), chunk.eq(chunk + 1), ncols.eq(n_next)]
                with m.If(written < cmin(n_next, before_pre + before_act)):
                    m.next = "Next-Gb-Act"
                with m.Else():
                    m.next = "Row-Act"
            with m.Else():
                m.d.sync += tile.eq(tile + 1)
                m.next = "Row-Act"

        def after_xfer():
            """The transfer's last PREAB is loaded: what follows it, per macro."""
            with m.If(mc.op == OP_WRITE_VEC):
                finish(n_resp=nwords, inp=True)
            with m.Elif(mc.op == OP_GEMV):
                with m.If(written < bias_gb):
                    m.next = "Bias-Gb"
                with m.Else():
                    m.next = "Row-Act"
            with m.Else():
                finish()

        # Bias words arrived: the phase changes when the last one is taken.
        bias_in = (phase == PH_R) | (recv_total == nwords)
        with m.If((phase == PH_B) & (recv_total == nwords) & (mc.op == OP_GEMV) & busy):
            m.d.sync += [phase.eq(PH_R), recv_total.eq(0)] + [r.eq(0) for r in recv]

        with m.FSM(name="pcu") as fsm:
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
                m.d.sync += [recv_total.eq(0), written.eq(0)] + [r.eq(0) for r in recv]
                with m.If(err != E_NONE):
                    finish()
                with m.Elif(code != E_NONE):
                    m.d.sync += err.eq(code)
                    finish()
                with m.Elif(op == OP_WRITE_VEC):
                    m.d.sync += [phase.eq(PH_X)] + start_xfer(words(mc.n, 2))
                    m.next = "Xfer-Act"
                with m.Elif(op == OP_GEMV):
                    m.d.sync += [tile.eq(0), chunk.eq(0), row_i.eq(0), have_prev.eq(0), g.eq(0),
                                 ncols.eq(compute_ncols(0))]
                    with m.If(with_bias):
                        m.d.sync += [phase.eq(PH_B)] + start_xfer(words(N, 4))
                        m.next = "Xfer-Act"
                    with m.Else():
                        m.d.sync += [phase.eq(PH_R), nwords.eq(0)]
                        m.next = "Row-Act"
                with m.Elif(op == OP_READ_RES):
                    m.d.sync += start_xfer(words(mc.n, Mux(mc.flags[2], 2, 4)))
                    m.next = "Xfer-Act"
                with m.Else():
                    finish()

            # ---- memory transfers: WRITE_VEC (into xbuf), the bias (into rbuf), READ_RES (from rbuf) ----
            with m.State("Xfer-Act"):
                # Activate every bank row of the segment (each bank appears once in a segment).
                with m.If(can_load):
                    m.d.sync += emit(PimOp.ACT, channels=act_mask, bank=f["bank"], row=f["row"])
                    with m.If(j_next_bank >= seg_end):
                        m.d.sync += j.eq(jseg)
                        m.next = "Xfer-Col"
                    with m.Else():
                        m.d.sync += j.eq(j_next_bank)
            with m.State("Xfer-Col"):
                # READ_RES writes the first n results only: the last word's bytes past them keep memory's.
                tail = Signal(range(col_bytes))
                m.d.comb += tail.eq(Mux(bf16, mc.n << 1, mc.n << 2)[:col_bytes.bit_length() - 1])
                res_mask = Mux((j + 1 == nwords) & (tail != 0), Cat(tail > k for k in range(col_bytes)),
                               (1 << col_bytes) - 1)
                with m.If(can_load):
                    with m.If(mc.op == OP_READ_RES):
                        with m.If(bf16):
                            e0, e1 = Cat(Const(0, 1), j), Cat(Const(1, 1), j)
                            m.d.comb += rbuf_read(r_idx(e0))
                            m.d.comb += [r.addr.eq(r_idx(e1)) for r in r_rs2] + [r.en.eq(1) for r in r_rs2]
                            m.d.sync += [o_sel.eq(r_chan(e0)), o_sel2.eq(r_chan(e1))]
                            m.d.sync += emit(PimOp.WR, channels=ch_mask, bank=f["bank"], col=f["column"],
                                             src=SRC_RES16, bmask=res_mask)
                        with m.Else():
                            m.d.comb += rbuf_read(r_idx(j))
                            m.d.sync += o_sel.eq(r_chan(j))
                            m.d.sync += emit(PimOp.WR, channels=ch_mask, bank=f["bank"], col=f["column"],
                                             src=SRC_RES32, bmask=res_mask)
                    with m.Else():
                        m.d.sync += emit(PimOp.RD, channels=ch_mask, bank=f["bank"], col=f["column"], tag=j[:8])
                    m.d.sync += j.eq(j + 1)
                    with m.If(j + 1 == seg_end):
                        m.next = "Xfer-Pre"
            with m.State("Xfer-Pre"):
                with m.If(can_load):
                    m.d.sync += emit(PimOp.PREAB)
                    with m.If(seg_end == nwords):
                        after_xfer()
                    with m.Else():
                        m.d.sync += [jseg.eq(seg_end),
                                     seg_end.eq(Mux(nwords - seg_end < rg, nwords, seg_end + rg))]
                        m.next = "Xfer-Act"
            with m.State("Bias-Gb"):
                # The first chunk's columns that the tRCD wait of the first row cannot take, in the tRP wait
                # after the bias transfer's PREAB.
                with m.If(can_load):
                    gb_write(0)
                    with m.If(written + 1 >= bias_gb):
                        m.next = "Row-Act"

            # ---- GEMV rows ----
            with m.State("Row-Act"):
                with m.If(can_load):
                    m.d.sync += emit(ACT_PIM, row=mc.row + tile * chunks + chunk)
                    m.d.sync += [g.eq(0), colc.eq(0)]
                    with m.If(have_prev & ~one_tile):
                        m.next = "Row-Read"
                    with m.Elif(one_tile & (chunk != 0)):
                        # One tile: its partial sums stay in the accumulators from chunk to chunk.
                        with m.If(written < ncols):
                            m.next = "Row-Gb"
                        with m.Else():
                            m.next = "Row-Mac"
                    with m.Else():
                        m.next = "Row-Bias"
            with m.State("Row-Read"):
                with m.If(can_load):
                    m.d.sync += emit(Mux(prev_af, PimOp.RDAF, PimOp.RDMAC), col=g, tag=(prev_tile * G + g)[:8])
                    with m.If(g == G - 1):
                        m.d.sync += g.eq(0)
                        m.next = "Row-Bias"
                    with m.Else():
                        m.d.sync += g.eq(g + 1)
            with m.State("Row-Bias"):
                # Chunk 0 preloads the bias (once it is in) or zero; chunk > 0 the partial sums of this
                # tile's row of the previous chunk (row index row_i - tiles): its responses must be in.
                need = Signal(16)
                m.d.comb += need.eq((row_i - tiles + 1) * G)
                dep_ok = Mux(chunk == 0, bias_in, Cat(r >= need for r in recv) == (1 << C) - 1)
                with m.If(can_load & dep_ok):
                    m.d.comb += rbuf_read(tile * G + g)
                    m.d.sync += emit(PimOp.WRBIAS, col=g,
                                     src=Mux((chunk != 0) | with_bias, SRC_R, SRC_ZERO))
                    with m.If(g == G - 1):
                        m.d.sync += [g.eq(0), colc.eq(0)]
                        with m.If((tile == 0) & (written < ncols)):
                            m.next = "Row-Gb"
                        with m.Else():
                            m.next = "Row-Mac"
                    with m.Else():
                        m.d.sync += g.eq(g + 1)
            with m.State("Row-Gb"):
                with m.If(can_load):
                    gb_write(chunk)
                    with m.If(written + 1 >= ncols):
                        m.next = "Row-Mac"
            with m.State("Row-Mac"):
                with m.If(can_load):
                    if p.pipelined:
                        # The row's last MAC combines the interleaved partial sums (hw/pim/bank.py).
                        m.d.sync += emit(PimOp.MACAB, col=colc, row=Mux(colc == ncols - 1, p.combine_flag, 0))
                    else:
                        m.d.sync += emit(PimOp.MACAB, col=colc)
                    m.d.sync += colc.eq(colc + 1)
                    with m.If(colc == ncols - 1):
                        with m.If(last_tile & ~last_chunk):
                            m.d.sync += written.eq(0)
                            m.next = "Next-Gb-Pre" if before_pre else "Row-Pre"
                        with m.Else():
                            m.next = "Row-Pre"
            with m.State("Next-Gb-Pre"):
                # The next chunk's first columns, in the slots before PREAB (tRTP after the last MAC).
                with m.If(can_load):
                    gb_write(chunk + 1)
                    with m.If(written + 1 >= cmin(n_next, before_pre)):
                        m.next = "Row-Pre"
            with m.State("Row-Pre"):
                with m.If(can_load):
                    m.d.sync += emit(PRE_PIM)
                    m.d.sync += [prev_tile.eq(tile), have_prev.eq(1), prev_af.eq(gelu & last_chunk),
                                 row_i.eq(row_i + 1)]
                    with m.If(gelu & last_chunk):
                        m.next = "Af-Act"
                    with m.Else():
                        advance_row()
            with m.State("Af-Act"):
                with m.If(can_load):
                    m.d.sync += emit(ACT_PIM, row=p.data_rows)
                    m.next = "Af"
            with m.State("Af"):
                with m.If(can_load):
                    m.d.sync += emit(PimOp.AF)
                    m.next = "Af-Pre"
            with m.State("Af-Pre"):
                with m.If(can_load):
                    m.d.sync += emit(PRE_PIM)
                    advance_row()
            with m.State("Next-Gb-Act"):
                # More of the new chunk in the tRP wait before its first row's ACTAB.
                with m.If(can_load):
                    gb_write(chunk)
                    with m.If(written + 1 >= cmin(ncols, before_pre + before_act)):
                        m.next = "Row-Act"
            with m.State("Final-Read"):
                with m.If(can_load):
                    m.d.sync += emit(Mux(prev_af, PimOp.RDAF, PimOp.RDMAC), col=g, tag=(prev_tile * G + g)[:8])
                    with m.If(g == G - 1):
                        finish(n_resp=Mux(one_tile, G * C, tiles * chunks * G * C), res=True)
                    with m.Else():
                        m.d.sync += g.eq(g + 1)

            with m.State("Finish"):
                # Every command taken, every response in, the controllers idle.
                with m.If(free & all_idle & (recv_total == need_total)):
                    m.d.sync += [busy.eq(0), self.completed.eq(self.completed + 1)]
                    with m.If(fin_input):
                        m.d.sync += input_n.eq(mc.n)
                    with m.If(fin_result):
                        m.d.sync += result_n.eq(N)
                    m.next = "Idle"
        if p.row_buffers == 2:
            xfer_op = (mc.op == OP_WRITE_VEC) | (mc.op == OP_READ_RES) | ((mc.op == OP_GEMV) & with_bias)
            m.d.comb += mode.eq(busy & ((fsm.ongoing("Check") & xfer_op) | fsm.ongoing("Xfer-Act") |
                                        fsm.ongoing("Xfer-Col") | fsm.ongoing("Xfer-Pre")))
        else:
            m.d.comb += mode.eq(busy)
        return m


class PcuSystem(wiring.Component):
    """The prototype's FPGA part below the host interface, with the device: PCU + one memory
    controller per channel (:class:`hw.memctrl.MemCtrlSystem`) + the PIM device.

    Members (``c`` = channel)
    -------------------------
    macro, busy, error, clear, completed : as :class:`Pcu`
    r, q : normal requests in, responses out (the host window), arrays indexed by channel
    mon, s, k : the command bus the device sees, the device's status, the controller's counters (arrays)
    bd_load : the device's back door
    """

    def __init__(self, cfg: SystemConfig, device_factory):
        from .memctrl import BusMonitorSignature, MemCtrlCounters
        from .memif import request_layout, response_layout
        from .pim.channel import PimStatusSignature

        self.cfg = cfg
        self._device_factory = device_factory
        C = cfg.pim.channels
        super().__init__({"macro": In(stream.Signature(MacroLayout)), "busy": Out(1), "error": Out(8),
                          "clear": In(1), "completed": Out(32), "bd_load": In(1),
                          "r": In(stream.Signature(request_layout(cfg))).array(C),
                          "q": Out(stream.Signature(response_layout(cfg))).array(C),
                          "mon": Out(BusMonitorSignature(cfg)).array(C),
                          "s": Out(PimStatusSignature()).array(C),
                          "k": Out(MemCtrlCounters()).array(C)})

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
            wiring.connect(m, pcu.p[c], mem.p[c])
            wiring.connect(m, mem.pr[c], pcu.pr[c])
            m.d.comb += [mem.mode[c].eq(pcu.mode[c]), pcu.pidle[c].eq(mem.pidle[c]), pcu.perr[c].eq(mem.perr[c])]
            wiring.connect(m, wiring.flipped(self.r[c]), mem.r[c])
            wiring.connect(m, mem.q[c], wiring.flipped(self.q[c]))
            wiring.connect(m, mem.mon[c], wiring.flipped(self.mon[c]))
            wiring.connect(m, mem.s[c], wiring.flipped(self.s[c]))
            wiring.connect(m, mem.k[c], wiring.flipped(self.k[c]))
        return m
