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

Packed GEMV (``addr1``, :mod:`hw.spec.macro`; one input chunk): tile ``t`` is in slot ``slot0 + t`` of rows
of ``columns / pitch`` slots (registers ``slot`` and ``trow`` step with the tile); its MACs read columns
``slot * pitch + c`` and each of the first ``gb_columns / pitch`` tiles writes the input's columns at global-
buffer slots ``(slot * pitch + c) mod gb_columns`` (its WRGBs after its WRBIAS, as the first tile's). When
the next tile is in the same row (and no GELU), the last MAC is followed by the next tile's RDMAC of the
previous results, WRBIAS, WRGB and MACs without PREAB / ACTAB (the controller holds them tMAC after the last
MAC); the order is :func:`firmware.pim.gemv_program`'s for a packed layout.

4-bit weights (issue 19): on a device with ``weight_format`` ``int4`` / ``fp4`` the GEMV is the 4-bit macro of
:mod:`hw.spec.macro`: its check and rows are :mod:`hw.pcu_w4`'s (:class:`~hw.pcu_w4.W4Decoder`,
:func:`~hw.pcu_w4.w4_row_states`, the order of :func:`firmware.pim_lowprec.w4_gemv_program` with one or two
accumulator slots, K in input chunks), elaborated only for such a device; the bias transfer, the result buffers and
READ_RES are the ones above.

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

from types import SimpleNamespace

from amaranth.hdl import Array, Cat, Const, Module, Mux, Signal, signed
from amaranth.lib import stream, wiring
from amaranth.lib.memory import Memory
from amaranth.lib.wiring import In, Out

from .arith import fp32_to_bf16
from .config import SystemConfig
from .memctrl import pim_command_layout, pim_response_layout
from .pcu_parts import (
    E_BAD_ADDRESS,
    E_BAD_FLAGS,
    E_BAD_LENGTH,
    E_BAD_OPCODE,
    E_BAD_REGION,
    E_DEVICE_VIOLATION,
    E_NO_INPUT,
    E_NO_RESULT,
    E_NONE,
    E_RESERVED_NONZERO,
    F_BF16,
    F_BIAS,
    F_GELU,
    OP_GEMV,
    OP_NOP,
    OP_READ_RES,
    OP_WRITE_VEC,
    MacroDecoder,
    MacroLayout,
    Phase,
    ResponseRouter,
    RowAccessSequencer,
    StepKind,
)
from .pcu_w4 import W4Decoder, w4_row_states
from .pim.commands import PimOp
from .spec.macro import MACRO_LIMITS

__all__ = ["Pcu", "PcuSystem", "MacroLayout", "MACRO_LIMITS",
           "OP_NOP", "OP_WRITE_VEC", "OP_GEMV", "OP_READ_RES", "F_BIAS", "F_GELU", "F_BF16",
           "E_NONE", "E_BAD_OPCODE", "E_BAD_FLAGS", "E_BAD_LENGTH", "E_BAD_ADDRESS", "E_BAD_REGION", "E_NO_INPUT",
           "E_NO_RESULT", "E_DEVICE_VIOLATION", "E_RESERVED_NONZERO"]

# Where the data of the command being offered comes from.
SRC_ZERO, SRC_X, SRC_R, SRC_RES32, SRC_RES16 = range(5)


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
        C, G = p.channels, self.groups
        # The signals and helpers the state machine's parts (the methods below) share.
        s = SimpleNamespace(m=m)

        # ---------------- buffers ----------------
        m.submodules.xbuf = xbuf = Memory(shape=p.column_bits, depth=self.x_words, init=[])
        x_w, s.x_r = xbuf.write_port(), xbuf.read_port()
        r_ws, s.r_rs, s.r_rs2 = [], [], []
        for c in range(C):
            rb = m.submodules[f"rbuf{c}"] = Memory(shape=p.column_bits, depth=self.r_words, init=[])
            r_ws.append(rb.write_port())
            s.r_rs.append(rb.read_port())
            s.r_rs2.append(rb.read_port())      # READ_RES BF16: a word's second half
        # Read ports sample only when a command is loaded: their outputs hold the data of the command
        # being offered until it is accepted.
        m.d.comb += [s.x_r.en.eq(0)] + [r.en.eq(0) for r in s.r_rs + s.r_rs2]

        # ---------------- macro registers and parts ----------------
        s.mc = mc = Signal(MacroLayout)
        err = self.error
        with m.If(self.clear):
            m.d.sync += err.eq(E_NONE)
        for c in range(C):
            with m.If(self.perr[c] & (err == E_NONE) & ~self.clear):
                m.d.sync += err.eq(E_DEVICE_VIOLATION)
        input_n = Signal(16)
        result_n = Signal(16)
        s.dec = dec = m.submodules.decoder = MacroDecoder(cfg)
        m.d.comb += [dec.macro.eq(mc), dec.input_n.eq(input_n), dec.result_n.eq(result_n)]
        s.K, s.N, s.tiles, s.chunks = mc.n, mc.m, dec.tiles, dec.chunks
        s.code = dec.code
        if p.lowprec:
            # 4-bit weights (hw/pcu_w4.py): the GEMV's own check and layout.
            s.w4 = w4 = m.submodules.w4 = W4Decoder(cfg)
            m.d.comb += [w4.macro.eq(mc), w4.input_n.eq(input_n), w4.tiles.eq(dec.tiles)]
            s.code = Mux(mc.op == OP_GEMV, w4.code, dec.code)
        s.SRC_ZERO, s.SRC_X, s.SRC_R = SRC_ZERO, SRC_X, SRC_R
        s.seq = seq = m.submodules.row_access = RowAccessSequencer(cfg)
        s.rsp = rsp = m.submodules.responses = ResponseRouter(cfg, self.x_words, self.r_words, G)
        wiring.connect(m, rsp.xw, x_w)
        for c in range(C):
            wiring.connect(m, rsp.rw[c], r_ws[c])
            wiring.connect(m, wiring.flipped(self.pr[c]), rsp.pr[c])
        m.d.comb += [seq.addr.eq(mc.addr0), seq.count.eq(dec.words), rsp.addr.eq(mc.addr0)]
        s.phase = phase = Signal(Phase)
        m.d.comb += rsp.phase.eq(phase)

        self._command_register(s)

        # ---------------- counters of the loops ----------------
        s.need_total = Signal(16)   # responses the macro waits for before it finishes
        s.fin_input = Signal()
        s.fin_result = Signal()
        s.tile = Signal(16)
        s.chunk = Signal(16)
        s.colc = Signal(16)
        s.written = Signal(16)      # global-buffer columns of the chunk being loaded already written
        s.g = Signal(8)
        s.row_i = Signal(16)        # rows emitted so far (tile-major within a chunk)
        s.ncols = Signal(16)
        self._packing(s)
        s.last_chunk = s.chunk == s.chunks - 1
        s.last_tile = s.tile == s.tiles - 1
        s.one_tile = s.tiles == 1
        s.gelu, s.with_bias, s.bf16 = mc.flags[1], mc.flags[0], mc.flags[2]
        s.prev_tile = Signal(16)
        s.have_prev = Signal()
        s.prev_af = Signal()
        # Free command slots in the controllers' timing waits, filled with a new chunk's WRGBs (as
        # firmware.pim.gemv_program does): before PREAB (tRTP after the last MAC), before ACTAB (tRP).
        s.before_pre = max(0, t.tRTP // t.tCCD - 1)
        s.before_act = max(0, t.tRP // t.tCCD - 1)
        after_act = max(0, t.tRCDRD // t.tCCD - 1 - G)   # slots between ACTAB + WRBIAS and the first MAC
        s.n_next = Signal(16)
        m.d.comb += s.n_next.eq(self._ncols(s, s.chunk + 1))
        s.bias_gb = Signal(16)
        if not p.lowprec:           # (4-bit: the input is written after the first ACTAB)
            m.d.comb += s.bias_gb.eq(_cmin(Mux(s.ncols > after_act, s.ncols - after_act, 0), s.before_act))

        s.busy = busy = Signal()
        m.d.comb += self.busy.eq(busy)
        # PIM mode asks the controllers for the channel: for the whole macro with one row buffer; with two
        # only around the transfers (their ACT / RD / WR / PREAB use the normal row buffer), so normal
        # requests keep being served while the GEMV's rows stream through the PIM buffers.
        mode = Signal()
        for c in range(C):
            m.d.comb += self.mode[c].eq(mode)
        all_idle = Cat(self.pidle) == (1 << C) - 1

        # Bias words arrived: the phase changes when the last one is taken.
        s.bias_in = (phase == Phase.RESULT) | (rsp.total == seq.words)
        with m.If((phase == Phase.BIAS) & (rsp.total == seq.words) & (mc.op == OP_GEMV) & busy):
            m.d.sync += phase.eq(Phase.RESULT)
            m.d.comb += rsp.clear.eq(1)

        with m.FSM(name="pcu") as fsm:
            with m.State("Idle"):
                m.d.comb += self.macro.ready.eq(1)
                with m.If(self.macro.valid):
                    m.d.sync += [mc.eq(self.macro.payload), busy.eq(1)]
                    m.next = "Check"
            self._check_state(s)
            self._transfer_states(s)
            if p.lowprec:
                w4_row_states(self, s)
            else:
                self._row_states(s)
            with m.State("Finish"):
                # Every command taken, every response in, the controllers idle.
                with m.If(s.free & all_idle & (rsp.total == s.need_total)):
                    m.d.sync += [busy.eq(0), self.completed.eq(self.completed + 1)]
                    with m.If(s.fin_input):
                        m.d.sync += input_n.eq(mc.n)
                    with m.If(s.fin_result):
                        m.d.sync += result_n.eq(s.N)
                    m.next = "Idle"
        if p.row_buffers == 2:
            xfer_op = (mc.op == OP_WRITE_VEC) | (mc.op == OP_READ_RES) | ((mc.op == OP_GEMV) & s.with_bias)
            m.d.comb += mode.eq(busy & ((fsm.ongoing("Check") & xfer_op) | fsm.ongoing("Xfer")))
        else:
            m.d.comb += mode.eq(busy)
        return m

    # ---------------- the command output register ----------------
    def _command_register(self, s):
        """The register of the micro command being offered to the channels; ``s.emit`` loads it."""
        m, p = s.m, self.cfg.pim
        C, L, bpw = p.channels, p.lanes, p.banks_per_word
        pins, x_r, r_rs = self.p, s.x_r, s.r_rs
        s.o_valid = o_valid = Signal(C)     # channels still to accept the offered command
        s.o_op = o_op = Signal(PimOp)
        o_bank = Signal(max(p.bank_addr_bits, 1))
        o_row = Signal(p.row_addr_bits)
        o_col = Signal(p.column_addr_bits)
        o_tag = Signal(8)
        o_src = Signal(range(5))
        s.o_sel = Signal(range(C))          # READ_RES: the rbuf the result word (its first half) comes from
        s.o_sel2 = Signal(range(C))         # READ_RES BF16: the rbuf of the word's second half
        s.o_xmask = Signal(L)               # WRGB: the input lanes below K (the rest are sent as zero)
        o_bmask = Signal(p.column_bytes)    # WR of READ_RES: the bytes of the results (the last word's tail
                                            # past n is not written); all ones for every other command
        res_word = Array(r.data for r in r_rs)[s.o_sel]
        res_word2 = Array(r.data for r in s.r_rs2)[s.o_sel2]

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
                    m.d.comb += data.eq(x_r.data & Cat(s.o_xmask[k].replicate(16) for k in range(L)))
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
        s.can_load = Signal()
        m.d.comb += s.can_load.eq((o_valid & ~accepted) == 0)
        m.d.sync += o_valid.eq(o_valid & ~accepted)
        s.free = o_valid == 0

        def emit(op, channels=None, bank=0, row=0, col=0, tag=0, src=SRC_ZERO, bmask=(1 << p.column_bytes) - 1):
            """Load the output register (sync statements; only under ``can_load``)."""
            return [o_op.eq(op), o_bank.eq(bank), o_row.eq(row), o_col.eq(col), o_tag.eq(tag), o_src.eq(src),
                    o_bmask.eq(bmask), o_valid.eq((1 << C) - 1 if channels is None else channels)]
        s.emit = emit

    # ---------------- helpers of the state machine ----------------
    def _packing(self, s):
        """Packed GEMV (``addr1``, hw/spec/macro.py): the tile's slot in its row and its row offset, its first
        column, whether it writes the input into the global buffer, whether the next tile shares its row."""
        m, p, dec = s.m, self.cfg.pim, s.dec
        gbc = p.gb_columns
        s.packed, s.plog = dec.packed, dec.plog
        s.slot = Signal(max(8, p.column_addr_bits + 1))   # the tile's slot in its row (packed; 0 otherwise)
        s.trow = Signal(16)                 # its row's offset from the macro's row (packed)
        s.colbase = Signal(p.column_addr_bits + 1)
        m.d.comb += s.colbase.eq(Mux(s.packed, s.slot << s.plog, 0))
        last_slot = Signal(len(s.slot))
        m.d.comb += last_slot.eq((p.columns >> s.plog) - 1)
        # Tiles that write the input at their global-buffer slots: the first only, or (packed) the first
        # gb_columns / pitch (later tiles' slots repeat theirs).
        s.gb_tile = Mux(s.packed, s.tile < (Const(gbc, 16) >> s.plog), s.tile == 0)
        s.row_end = ~s.packed | (s.slot == last_slot)

        def next_tile():
            """The slot / row / input-column bookkeeping of the step to the next tile (packed)."""
            with m.If(s.packed):
                m.d.sync += [s.written.eq(0), s.slot.eq(Mux(s.row_end, 0, s.slot + 1)),
                             s.trow.eq(s.trow + s.row_end)]
        s.next_tile = next_tile

    def _ncols(self, s, ch):
        """Global-buffer columns of input chunk ``ch``."""
        p = self.cfg.pim
        rem = s.K - (ch << (p.gb_values.bit_length() - 1))
        return Mux(rem >= p.gb_values, p.gb_columns, (rem + p.lanes - 1) >> (p.lanes.bit_length() - 1))

    def _rbuf_read(self, s, addr):
        return [r.addr.eq(addr) for r in s.r_rs] + [r.en.eq(1) for r in s.r_rs]

    def _gb_write(self, s, chunk_value):
        """WRGB of column ``written`` of ``chunk_value`` (comb: the xbuf read; sync: the load)."""
        m, p = s.m, self.cfg.pim
        L = p.lanes
        xcol = (chunk_value << (p.gb_columns.bit_length() - 1)) + s.written
        left = Signal(signed(18))           # input values from this column's first lane to K
        m.d.comb += [s.x_r.addr.eq(xcol), s.x_r.en.eq(1), left.eq(s.K - (xcol << (L.bit_length() - 1)))]
        gb_col = Mux(s.packed, (s.colbase + s.written)[:(p.gb_columns - 1).bit_length()], s.written)
        m.d.sync += s.emit(PimOp.WRGB, col=gb_col, src=SRC_X)
        m.d.sync += s.o_xmask.eq(Cat(left > k for k in range(L)))
        m.d.sync += s.written.eq(s.written + 1)

    def _finish(self, s, n_resp=0, inp=False, res=False):
        s.m.d.sync += [s.need_total.eq(n_resp), s.fin_input.eq(inp), s.fin_result.eq(res)]
        s.m.next = "Finish"

    # ---------------- Check ----------------
    def _check_state(self, s):
        """The macro's check (:class:`MacroDecoder`), then its first phase."""
        m, mc = s.m, s.mc

        def start_xfer():
            m.d.comb += [s.seq.start.eq(1), s.rsp.start.eq(1)]
            m.next = "Xfer"

        with m.State("Check"):
            code = s.code
            m.d.comb += s.rsp.clear.eq(1)
            m.d.sync += s.written.eq(0)
            with m.If(self.error != E_NONE):
                self._finish(s)
            with m.Elif(code != E_NONE):
                m.d.sync += self.error.eq(code)
                self._finish(s)
            with m.Elif(mc.op == OP_WRITE_VEC):
                m.d.sync += s.phase.eq(Phase.INPUT)
                start_xfer()
            with m.Elif(mc.op == OP_GEMV):
                m.d.sync += [s.tile.eq(0), s.chunk.eq(0), s.row_i.eq(0), s.have_prev.eq(0), s.g.eq(0),
                             s.ncols.eq(self._ncols(s, 0)), s.slot.eq(s.dec.slot0), s.trow.eq(0)]
                with m.If(s.with_bias):
                    m.d.sync += s.phase.eq(Phase.BIAS)
                    start_xfer()
                with m.Else():
                    m.d.sync += s.phase.eq(Phase.RESULT)
                    m.next = "Row-Act"
            with m.Elif(mc.op == OP_READ_RES):
                start_xfer()
            with m.Else():
                self._finish(s)

    # ---------------- memory transfers ----------------
    def _transfer_states(self, s):
        """WRITE_VEC (into xbuf), the bias (into rbuf), READ_RES (from rbuf): the :class:`RowAccessSequencer`'s
        steps as micro commands."""
        m, mc, p = s.m, s.mc, self.cfg.pim
        C, G = p.channels, self.groups
        col_bytes = p.column_bytes

        # READ_RES: result word -> rbuf entry (FP32: word j is entry j; BF16: entries 2j, 2j+1).
        def r_chan(e):
            return (e >> (G.bit_length() - 1)) & (C - 1) if C > 1 else Const(0, 1)

        def r_idx(e):
            return Cat(e[:(G - 1).bit_length()] if G > 1 else Const(0, 0), e >> ((G * C).bit_length() - 1))

        with m.State("Xfer"):
            st = s.seq.step.payload
            j = st.index
            with m.If(s.can_load):
                m.d.comb += s.seq.step.ready.eq(1)
                with m.Switch(st.kind):
                    with m.Case(StepKind.ACT):
                        m.d.sync += s.emit(PimOp.ACT, channels=st.channels, bank=st.bank, row=st.row)
                    with m.Case(StepKind.COLUMN):
                        # READ_RES writes the first n results only: the last word's bytes past them keep
                        # memory's.
                        tail = Signal(range(col_bytes))
                        m.d.comb += tail.eq(Mux(s.bf16, mc.n << 1, mc.n << 2)[:col_bytes.bit_length() - 1])
                        res_mask = Mux(st.last & (tail != 0), Cat(tail > k for k in range(col_bytes)),
                                       (1 << col_bytes) - 1)
                        with m.If(mc.op == OP_READ_RES):
                            with m.If(s.bf16):
                                e0, e1 = Cat(Const(0, 1), j), Cat(Const(1, 1), j)
                                m.d.comb += self._rbuf_read(s, r_idx(e0))
                                m.d.comb += [r.addr.eq(r_idx(e1)) for r in s.r_rs2] + [r.en.eq(1) for r in s.r_rs2]
                                m.d.sync += [s.o_sel.eq(r_chan(e0)), s.o_sel2.eq(r_chan(e1))]
                                m.d.sync += s.emit(PimOp.WR, channels=st.channels, bank=st.bank, col=st.col,
                                                   src=SRC_RES16, bmask=res_mask)
                            with m.Else():
                                m.d.comb += self._rbuf_read(s, r_idx(j))
                                m.d.sync += s.o_sel.eq(r_chan(j))
                                m.d.sync += s.emit(PimOp.WR, channels=st.channels, bank=st.bank, col=st.col,
                                                   src=SRC_RES32, bmask=res_mask)
                        with m.Else():
                            m.d.sync += s.emit(PimOp.RD, channels=st.channels, bank=st.bank, col=st.col,
                                               tag=j[:8])
                    with m.Case(StepKind.PRE):
                        m.d.sync += s.emit(PimOp.PREAB)
                        with m.If(st.last):
                            # What follows the transfer, per macro.
                            with m.If(mc.op == OP_WRITE_VEC):
                                self._finish(s, n_resp=s.seq.words, inp=True)
                            with m.Elif(mc.op == OP_GEMV):
                                with m.If(s.written < s.bias_gb):
                                    m.next = "Bias-Gb"
                                with m.Else():
                                    m.next = "Row-Act"
                            with m.Else():
                                self._finish(s)
        with m.State("Bias-Gb"):
            # The first chunk's columns that the tRCD wait of the first row cannot take, in the tRP wait
            # after the bias transfer's PREAB.
            with m.If(s.can_load):
                self._gb_write(s, 0)
                with m.If(s.written + 1 >= s.bias_gb):
                    m.next = "Row-Act"

    # ---------------- GEMV rows ----------------
    def _row_states(self, s):
        """A GEMV's rows, tile-major within an input chunk (the module docstring's GEMV order)."""
        m, p = s.m, self.cfg.pim
        C, G = p.channels, self.groups
        emit, can_load, g, tile, chunk, written = s.emit, s.can_load, s.g, s.tile, s.chunk, s.written
        ncols, colc = s.ncols, s.colc
        before_pre, before_act = s.before_pre, s.before_act
        # The rows MACAB and AF read: the bank's row buffer, or its PIM row buffer when there are two.
        ACT_PIM = PimOp.PACTAB if p.row_buffers == 2 else PimOp.ACTAB
        PRE_PIM = PimOp.PPREAB if p.row_buffers == 2 else PimOp.PREAB

        def advance_row():
            """After a row's last PREAB: the next row (tile-major within a chunk), or the last reads."""
            with m.If(s.last_tile & s.last_chunk):
                m.d.sync += g.eq(0)
                m.next = "Final-Read"
            with m.Elif(s.last_tile):
                m.d.sync += [tile.eq(0), chunk.eq(chunk + 1), ncols.eq(s.n_next)]
                with m.If(written < _cmin(s.n_next, before_pre + before_act)):
                    m.next = "Next-Gb-Act"
                with m.Else():
                    m.next = "Row-Act"
            with m.Else():
                m.d.sync += tile.eq(tile + 1)
                s.next_tile()
                m.next = "Row-Act"

        def read_back():
            """RDMAC / RDAF of the previous row's accumulator group ``g``."""
            return emit(Mux(s.prev_af, PimOp.RDAF, PimOp.RDMAC), col=g, tag=(s.prev_tile * G + g)[:8])

        with m.State("Row-Act"):
            with m.If(can_load):
                m.d.sync += emit(ACT_PIM, row=s.mc.row + Mux(s.packed, s.trow, tile * s.chunks + chunk))
                m.d.sync += [g.eq(0), colc.eq(0)]
                with m.If(s.have_prev & ~s.one_tile):
                    m.next = "Row-Read"
                with m.Elif(s.one_tile & (chunk != 0)):
                    # One tile: its partial sums stay in the accumulators from chunk to chunk.
                    with m.If(written < ncols):
                        m.next = "Row-Gb"
                    with m.Else():
                        m.next = "Row-Mac"
                with m.Else():
                    m.next = "Row-Bias"
        with m.State("Row-Read"):
            with m.If(can_load):
                m.d.sync += read_back()
                with m.If(g == G - 1):
                    m.d.sync += g.eq(0)
                    m.next = "Row-Bias"
                with m.Else():
                    m.d.sync += g.eq(g + 1)
        with m.State("Row-Bias"):
            # Chunk 0 preloads the bias (once it is in) or zero; chunk > 0 the partial sums of this
            # tile's row of the previous chunk (row index row_i - tiles): its responses must be in.
            need = Signal(16)
            m.d.comb += need.eq((s.row_i - s.tiles + 1) * G)
            dep_ok = Mux(chunk == 0, s.bias_in, Cat(r >= need for r in s.rsp.recv) == (1 << C) - 1)
            with m.If(can_load & dep_ok):
                m.d.comb += self._rbuf_read(s, tile * G + g)
                m.d.sync += emit(PimOp.WRBIAS, col=g, src=Mux((chunk != 0) | s.with_bias, SRC_R, SRC_ZERO))
                with m.If(g == G - 1):
                    m.d.sync += [g.eq(0), colc.eq(0)]
                    with m.If(s.gb_tile & (written < ncols)):
                        m.next = "Row-Gb"
                    with m.Else():
                        m.next = "Row-Mac"
                with m.Else():
                    m.d.sync += g.eq(g + 1)
        with m.State("Row-Gb"):
            with m.If(can_load):
                self._gb_write(s, chunk)
                with m.If(written + 1 >= ncols):
                    m.next = "Row-Mac"
        with m.State("Row-Mac"):
            with m.If(can_load):
                if p.pipelined:
                    # The row's last MAC combines the interleaved partial sums (hw/pim/bank.py).
                    m.d.sync += emit(PimOp.MACAB, col=s.colbase + colc, row=Mux(colc == ncols - 1, p.combine_flag, 0))
                else:
                    m.d.sync += emit(PimOp.MACAB, col=s.colbase + colc)
                m.d.sync += colc.eq(colc + 1)
                with m.If(colc == ncols - 1):
                    with m.If(~s.row_end & ~s.last_tile & ~s.gelu):
                        # Packed: the next tile is in this row, which stays open (no PREAB / ACTAB).
                        m.d.sync += [s.prev_tile.eq(tile), s.have_prev.eq(1), s.prev_af.eq(0),
                                     s.row_i.eq(s.row_i + 1), tile.eq(tile + 1), g.eq(0)]
                        s.next_tile()
                        m.next = "Row-Read"
                    with m.Elif(s.last_tile & ~s.last_chunk):
                        m.d.sync += written.eq(0)
                        m.next = "Next-Gb-Pre" if before_pre else "Row-Pre"
                    with m.Else():
                        m.next = "Row-Pre"
        with m.State("Next-Gb-Pre"):
            # The next chunk's first columns, in the slots before PREAB (tRTP after the last MAC).
            with m.If(can_load):
                self._gb_write(s, chunk + 1)
                with m.If(written + 1 >= _cmin(s.n_next, before_pre)):
                    m.next = "Row-Pre"
        with m.State("Row-Pre"):
            with m.If(can_load):
                m.d.sync += emit(PRE_PIM)
                m.d.sync += [s.prev_tile.eq(tile), s.have_prev.eq(1), s.prev_af.eq(s.gelu & s.last_chunk),
                             s.row_i.eq(s.row_i + 1)]
                with m.If(s.gelu & s.last_chunk):
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
                self._gb_write(s, chunk)
                with m.If(written + 1 >= _cmin(ncols, before_pre + before_act)):
                    m.next = "Row-Act"
        with m.State("Final-Read"):
            with m.If(can_load):
                m.d.sync += read_back()
                with m.If(g == G - 1):
                    self._finish(s, n_resp=Mux(s.one_tile, G * C, s.tiles * s.chunks * G * C), res=True)
                with m.Else():
                    m.d.sync += g.eq(g + 1)


def _cmin(a, k):
    return Mux(a < k, a, k)


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
