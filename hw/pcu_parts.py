"""The PIM control unit's parts (:class:`hw.pcu.Pcu` wires them; issue 16).

* :class:`MacroDecoder` - a macro command's check (the functional model's validation order and error codes)
  and the sizes derived from it: GEMV tiles and input chunks, a memory transfer's word count;
* :class:`RowAccessSequencer` - the row-access sequence of a memory transfer (WRITE_VEC and the GEMV bias
  read device memory, READ_RES writes it): per segment ACT of every bank row it touches, its columns in
  order, PREAB;
* :class:`ResponseRouter` - micro-command responses into the input buffer or the result buffers, with the
  per-channel counts the GEMV's dependencies wait on.

Each is a :class:`~amaranth.lib.wiring.Component` that the Amaranth simulator tests alone
(``tests/test_pcu_parts.py``).
"""



from amaranth.hdl import Array, Cat, Const, Module, Mux, Signal
from amaranth.lib import data, enum, stream, wiring
from amaranth.lib.memory import WritePort
from amaranth.lib.wiring import In, Out

from .config import SystemConfig
from .memctrl import pim_response_layout
from .memif import AddressMap
from .spec.macro import FIELDS as MACRO_FIELDS
from .spec.macro import MACRO_LIMITS, MacroError, MacroFlag, MacroOp

__all__ = ["MacroLayout", "MacroDecoder", "StepKind", "step_layout", "RowAccessSequencer", "Phase",
           "ResponseRouter", "XFER_WORD_BITS"]

# The macro command's codes from its table (hw/spec/macro.py), as plain integers: Amaranth constants of
# their natural width, not of the enum's (and ``~`` of a flag is every other bit, not the other flags).
OP_NOP, OP_WRITE_VEC, OP_GEMV, OP_READ_RES = (int(MacroOp[n]) for n in ("NOP", "WRITE_VEC", "GEMV", "READ_RES"))
F_BIAS, F_GELU, F_BF16 = (int(MacroFlag[n]) for n in ("BIAS", "GELU", "BF16"))
(E_NONE, E_BAD_OPCODE, E_BAD_FLAGS, E_BAD_LENGTH, E_BAD_ADDRESS, E_BAD_REGION, E_NO_INPUT, E_NO_RESULT,
 E_DEVICE_VIOLATION, E_RESERVED_NONZERO, E_BAD_PACKING, E_UNSUPPORTED) = (int(MacroError[n]) for n in (
    "NONE", "BAD_OPCODE", "BAD_FLAGS", "BAD_LENGTH", "BAD_ADDRESS", "BAD_REGION", "NO_INPUT", "NO_RESULT",
    "DEVICE_VIOLATION", "RESERVED_NONZERO", "BAD_PACKING", "UNSUPPORTED"))

# The 128-bit macro command, field for field as the table lays it out (contiguous from bit 0, in order).
MacroLayout = data.StructLayout({name: width for name, _, width in MACRO_FIELDS})

XFER_WORD_BITS = 17
"""Width of a memory transfer's word counters (READ_RES of ``result_values`` FP32 words fits)."""


def _check_config(cfg):
    if not isinstance(cfg, SystemConfig):
        raise TypeError(f"Configuration must be a SystemConfig, not {cfg!r}")


class MacroDecoder(wiring.Component):
    """A macro command's check and derived sizes (combinational).

    The checks run in the order of the functional model (:meth:`sim.pim_model.FunctionalDevice.execute`);
    ``code`` is the first that fails (:class:`hw.spec.macro.MacroError`, ``NONE`` when it is legal).

    Members
    -------
    macro : In(MacroLayout)
    input_n : In(16)
        Input values loaded by the last WRITE_VEC (0 when none).
    result_n : In(16)
        Results left by the last GEMV (0 when none).
    code : Out(8)
    tiles, chunks : Out(16)
        GEMV: tiles of ``banks * channels`` outputs, input chunks of ``gb_values`` inputs.
    words : Out(XFER_WORD_BITS)
        Column words the command's memory transfer moves: the input (WRITE_VEC), the bias (GEMV), the
        results (READ_RES, FP32 or BF16).
    packed : Out(1)
        GEMV packed mode (``addr1``'s ``pack`` != 0, :mod:`hw.spec.macro`).
    plog : Out(range(log2(gb_columns) + 1))
        log2 of the tile pitch (packed; valid when ``code`` is NONE).
    slot0 : Out(8)
        The first tile's slot.
    """

    def __init__(self, cfg: SystemConfig):
        _check_config(cfg)
        self.cfg = cfg
        super().__init__({"macro": In(MacroLayout), "input_n": In(16), "result_n": In(16), "code": Out(8),
                          "tiles": Out(16), "chunks": Out(16), "words": Out(XFER_WORD_BITS), "packed": Out(1),
                          "plog": Out(range(cfg.pim.gb_columns.bit_length())), "slot0": Out(8)})

    def elaborate(self, platform):
        m = Module()
        p = self.cfg.pim
        amap = AddressMap(p)
        col_bytes = p.column_bytes
        per_tile = p.banks * p.channels
        mc, code = self.macro, self.code
        K, N = mc.n, mc.m
        bf16 = mc.flags[2]
        m.d.comb += [
            self.tiles.eq((N + per_tile - 1) >> (per_tile.bit_length() - 1)),
            self.chunks.eq((K + p.gb_values - 1) >> (p.gb_values.bit_length() - 1)),
        ]

        def words(nvals, bytes_per_value):
            return (nvals * bytes_per_value + col_bytes - 1) >> (col_bytes.bit_length() - 1)

        def addr_ok(nvals, bytes_per_value):
            end = mc.addr0 + words(nvals, bytes_per_value) * col_bytes
            return (mc.addr0[:amap.col_lo] == 0) & (end <= p.total_bytes)

        # Bytes per input value: BF16, or an FP8-E4M3 code on a device with FP8 activations (issue 19).
        xb = 1 if p.act_format == "fp8_e4m3" else 2
        with m.Switch(mc.op):
            with m.Case(OP_WRITE_VEC):
                m.d.comb += self.words.eq(words(mc.n, xb))
            with m.Case(OP_GEMV):
                m.d.comb += self.words.eq(words(N, 4))
            with m.Case(OP_READ_RES):
                m.d.comb += self.words.eq(words(mc.n, Mux(bf16, 2, 4)))

        # addr1 of a GEMV: pack (bits 0..7), slot0 (8..15), the rest reserved (hw/spec/macro.py).
        pack, slot0 = mc.addr1[:8], mc.addr1[8:16]
        gb_lg, col_lg = p.gb_columns.bit_length() - 1, p.columns.bit_length() - 1
        m.d.comb += [self.packed.eq(pack != 0), self.plog.eq(pack - 1), self.slot0.eq(slot0)]
        ncols = (K + p.lanes - 1) >> (p.lanes.bit_length() - 1)
        per_row_lg = Signal(range(col_lg + 1))
        m.d.comb += per_row_lg.eq(col_lg - self.plog)
        bad_packing = Mux(pack == 0, slot0 != 0,
                          (pack > gb_lg + 1) | (ncols > (Const(1, 1) << self.plog)) |
                          ((slot0 >> per_row_lg) != 0))
        rows_used = Mux(pack == 0, self.tiles * self.chunks, ((slot0 + self.tiles - 1) >> per_row_lg) + 1)
        with m.If(Mux(mc.op == OP_GEMV, mc.addr1[16:] != 0, mc.addr1 != 0)):
            m.d.comb += code.eq(E_RESERVED_NONZERO)
        with m.Elif(mc.op == OP_NOP):
            m.d.comb += code.eq(E_NONE)
        with m.Elif(mc.op == OP_WRITE_VEC):
            with m.If(mc.flags != 0):
                m.d.comb += code.eq(E_BAD_FLAGS)
            with m.Elif((mc.n == 0) | (mc.n > MACRO_LIMITS["input_values"])):
                m.d.comb += code.eq(E_BAD_LENGTH)
            with m.Elif(~addr_ok(mc.n, xb)):
                m.d.comb += code.eq(E_BAD_ADDRESS)
        with m.Elif(mc.op == OP_GEMV):
            with m.If((mc.flags & ~(F_BIAS | F_GELU)) != 0):
                m.d.comb += code.eq(E_BAD_FLAGS)
            with m.Elif((K == 0) | (K > MACRO_LIMITS["input_values"]) | (N == 0) |
                        (N > MACRO_LIMITS["result_values"])):
                m.d.comb += code.eq(E_BAD_LENGTH)
            with m.Elif(K > self.input_n):
                m.d.comb += code.eq(E_NO_INPUT)
            with m.Elif(bad_packing):
                m.d.comb += code.eq(E_BAD_PACKING)
            with m.Elif(mc.row + rows_used > p.data_rows):
                m.d.comb += code.eq(E_BAD_REGION)
            with m.Elif(mc.flags[0] & ~addr_ok(N, 4)):
                m.d.comb += code.eq(E_BAD_ADDRESS)
        with m.Elif(mc.op == OP_READ_RES):
            with m.If((mc.flags & ~F_BF16) != 0):
                m.d.comb += code.eq(E_BAD_FLAGS)
            with m.Elif((mc.n == 0) | (mc.n > MACRO_LIMITS["result_values"])):
                m.d.comb += code.eq(E_BAD_LENGTH)
            with m.Elif(mc.n > self.result_n):
                m.d.comb += code.eq(E_NO_RESULT)
            with m.Elif(~addr_ok(mc.n, Mux(bf16, 2, 4))):
                m.d.comb += code.eq(E_BAD_ADDRESS)
        with m.Else():
            m.d.comb += code.eq(E_BAD_OPCODE)
        return m


class StepKind(enum.Enum, shape=2):
    """One step of a memory transfer's row access."""
    ACT = 0         # activate a bank row (``bank``, ``row``) on ``channels``
    COLUMN = 1      # read or write word ``index`` (``bank``, ``col``) on its channel
    PRE = 2         # precharge all banks (every channel)


def step_layout(cfg: SystemConfig) -> data.StructLayout:
    """Payload of :class:`RowAccessSequencer`'s step stream."""
    p = cfg.pim
    return data.StructLayout({
        "kind": StepKind,
        "channels": p.channels,                         # mask of the channels the command goes to
        "bank": max(p.bank_addr_bits, 1),
        "row": max(p.row_addr_bits, 1),
        "col": max(p.column_addr_bits, 1),
        "index": XFER_WORD_BITS,                        # COLUMN: the word's index in the transfer
        "last": 1,                                      # COLUMN: the transfer's last word; PRE: its last PRE
    })


class RowAccessSequencer(wiring.Component):
    """The row-access sequence of a memory transfer of ``count`` column words from byte ``addr``.

    The transfer is cut into segments that stay inside one row of every bank (a row group: ``columns *
    banks * channels`` words, in either address map). Per segment: its banks are activated (Row-Channel-Bank-
    Column map: one ACT per bank row, on its channel; channel-interleaved map: one ACT per bank, in every
    channel the segment touches in that bank's row), then its words are read or written in order (one
    COLUMN step each, on the word's channel), then PREAB. The user turns each step into a micro command
    (ACT / RD or WR / PREAB) and takes it with ``step.ready``; one step per cycle at most.

    Members
    -------
    start : In(1)
        Begin a transfer (when idle, ``count`` > 0): ``addr`` and ``count`` are sampled.
    addr : In(32)
        Byte address of the first word (column-aligned).
    count : In(XFER_WORD_BITS)
    words : Out(XFER_WORD_BITS)
        ``count`` of the last transfer started.
    step : Out(stream.Signature(step_layout(cfg)))
        Valid from the cycle after ``start`` to the last PRE, taken.
    """

    def __init__(self, cfg: SystemConfig):
        _check_config(cfg)
        self.cfg = cfg
        super().__init__({"start": In(1), "addr": In(32), "count": In(XFER_WORD_BITS),
                          "words": Out(XFER_WORD_BITS), "step": Out(stream.Signature(step_layout(cfg)))})

    def elaborate(self, platform):
        m = Module()
        p = self.cfg.pim
        C = p.channels
        amap = AddressMap(p)
        addr = Signal(32)
        nwords = self.words
        j = Signal(XFER_WORD_BITS)          # word index
        jseg = Signal(XFER_WORD_BITS)       # first word of the current segment
        seg_end = Signal(XFER_WORD_BITS)    # one past its last word

        # Address of word j.
        waddr = Signal(32)
        m.d.comb += waddr.eq(addr + (j << amap.col_lo))
        f = amap.rtl_fields(waddr)
        w_ch = Signal(range(C))
        m.d.comb += w_ch.eq(f["channel"] if p.channel_addr_bits else 0)
        ch_mask = Signal(C)
        m.d.comb += ch_mask.eq((Const(1, C) << w_ch)[:C])
        # Segments: a row group (every bank of every channel, one row each) is rg words.
        rg = p.columns * p.banks * C
        rg_lg = rg.bit_length() - 1
        first_room = Signal(XFER_WORD_BITS)
        m.d.comb += first_room.eq(rg - (self.addr >> amap.col_lo)[:rg_lg])
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

        st = self.step
        m.d.comb += [st.payload.bank.eq(f["bank"]), st.payload.row.eq(f["row"]), st.payload.col.eq(f["column"]),
                     st.payload.index.eq(j)]
        take = st.valid & st.ready
        with m.FSM(name="row_access"):
            with m.State("Idle"):
                with m.If(self.start):
                    n = self.count
                    m.d.sync += [addr.eq(self.addr), nwords.eq(n), j.eq(0), jseg.eq(0),
                                 seg_end.eq(Mux(n < first_room, n, first_room))]
                    m.next = "Act"
            with m.State("Act"):
                # Every bank row of the segment (each bank appears once in a segment).
                m.d.comb += [st.valid.eq(1), st.payload.kind.eq(StepKind.ACT), st.payload.channels.eq(act_mask)]
                with m.If(take):
                    with m.If(j_next_bank >= seg_end):
                        m.d.sync += j.eq(jseg)
                        m.next = "Column"
                    with m.Else():
                        m.d.sync += j.eq(j_next_bank)
            with m.State("Column"):
                m.d.comb += [st.valid.eq(1), st.payload.kind.eq(StepKind.COLUMN), st.payload.channels.eq(ch_mask),
                             st.payload.last.eq(j + 1 == nwords)]
                with m.If(take):
                    m.d.sync += j.eq(j + 1)
                    with m.If(j + 1 == seg_end):
                        m.next = "Pre"
            with m.State("Pre"):
                m.d.comb += [st.valid.eq(1), st.payload.kind.eq(StepKind.PRE),
                             st.payload.channels.eq((1 << C) - 1), st.payload.last.eq(seg_end == nwords)]
                with m.If(take):
                    with m.If(seg_end == nwords):
                        m.next = "Idle"
                    with m.Else():
                        m.d.sync += [jseg.eq(seg_end),
                                     seg_end.eq(Mux(nwords - seg_end < rg, nwords, seg_end + rg))]
                        m.next = "Act"
        return m


class Phase(enum.Enum, shape=2):
    """Where :class:`ResponseRouter` puts a response's data."""
    INPUT = 0       # WRITE_VEC: word w of the input -> xbuf entry w
    BIAS = 1        # GEMV bias: word w -> the rbuf entry of output block w
    RESULT = 2      # GEMV reads (RDMAC / RDAF): the response's tag is the rbuf entry, on its channel


class ResponseRouter(wiring.Component):
    """Micro-command responses into the PCU's buffers: one response per cycle, lowest channel first.

    Read responses return in order per channel, so a per-channel counter of the next expected word of the
    transfer gives each response its word index: a transfer's words come from one channel in runs of
    ``row_words`` (the words before the channel field changes), then from the next channel's.

    Members
    -------
    pr : In(stream.Signature(pim_response_layout(cfg))).array(channels)
    phase : In(Phase)
    start : In(1)
        A transfer from byte ``addr`` begins: the per-channel word counters are set for it.
    addr : In(32)
    clear : In(1)
        Zero ``recv`` and ``total`` (over this cycle's response).
    recv : Out(16).array(channels)
        Responses taken per channel since ``clear``.
    total : Out(16)
        Responses taken since ``clear``.
    xw : In(WritePort.Signature(...))
        The input buffer's write port (``x_words`` entries).
    rw : In(WritePort.Signature(...)).array(channels)
        The result buffers' write ports (``r_words`` entries each).
    """

    def __init__(self, cfg: SystemConfig, x_words: int, r_words: int, groups: int):
        _check_config(cfg)
        self.cfg = cfg
        self.groups = groups
        C, bits = cfg.pim.channels, cfg.pim.column_bits
        super().__init__({
            "pr": In(stream.Signature(pim_response_layout(cfg))).array(C),
            "phase": In(Phase), "start": In(1), "addr": In(32), "clear": In(1),
            "recv": Out(16).array(C), "total": Out(16),
            "xw": In(WritePort.Signature(addr_width=(x_words - 1).bit_length(), shape=bits)),
            "rw": In(WritePort.Signature(addr_width=(r_words - 1).bit_length(), shape=bits)).array(C)})

    def elaborate(self, platform):
        m = Module()
        p = self.cfg.pim
        C, G = p.channels, self.groups
        amap = AddressMap(p)
        prs, recv = self.pr, self.recv
        next_w = [Signal(16, name=f"next_w{c}") for c in range(C)]  # next word index expected, per channel
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
            rw = self.rw[c]
            m.d.comb += [rw.data.eq(resp_data), self.xw.data.eq(resp_data)]
            with m.If(any_resp):
                with m.If(self.phase == Phase.RESULT):
                    m.d.comb += [rw.addr.eq(resp_tag), rw.en.eq(pick == c)]
                with m.If(self.phase == Phase.BIAS):
                    m.d.comb += [rw.addr.eq(b_idx), rw.en.eq(b_chan == c)]
        with m.If(any_resp & (self.phase == Phase.INPUT)):
            m.d.comb += [self.xw.addr.eq(w_cur), self.xw.en.eq(1)]
        with m.If(any_resp):
            m.d.sync += self.total.eq(self.total + 1)
            for c in range(C):
                with m.If(pick == c):
                    m.d.sync += recv[c].eq(recv[c] + 1)
                    nxt = next_w[c] + 1
                    # Words of one channel come in runs of row_words; then the other channels' runs.
                    m.d.sync += next_w[c].eq(Mux(((nxt + o_off) % row_words) == 0,
                                                 nxt + row_words * (C - 1), nxt))
        with m.If(self.clear):
            m.d.sync += [self.total.eq(0)] + [r.eq(0) for r in recv]
        # Per source channel, the first word index it serves, for a transfer starting at addr:
        # word j's channel is ((o + j) // row_words) % C with o the column offset of addr in its row group.
        o_all = (self.addr >> amap.col_lo) % (row_words * C)
        o_in = Signal(range(row_words))
        ch0 = Signal(range(C))
        m.d.comb += [o_in.eq(o_all % row_words), ch0.eq((o_all // row_words) if C > 1 else 0)]
        with m.If(self.start):
            m.d.sync += o_off.eq(o_in)
            for c in range(C):
                dist = (c - ch0) % C if C > 1 else 0
                m.d.sync += next_w[c].eq(Mux(ch0 == c, 0, dist * row_words - o_in))
        return m
