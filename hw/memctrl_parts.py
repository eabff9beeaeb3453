"""The memory controller's parts (:class:`hw.memctrl.MemoryController` wires them; issue 16).

One channel's controller is seven components around one command per cycle:

* :class:`ChannelState` - the controller's copy of the device's state: bank and PIM-row-buffer state, every
  DRAM timing window (tRCD, tRAS, tRP, tWR, tRTP per bank; tCCD, tRRD, tFAW, tRFC, tMAC, tAF channel-wide),
  updated by the command issued (:class:`CommandSignature`) and read by everyone else
  (:class:`ChannelStateSignature`);
* :class:`RefreshMachine` - the refresh credit and the Drain / REF / Reopen sequence;
* :class:`~hw.memctrl_pim.PimPath` (in :mod:`hw.memctrl_pim`) - the mode machine (Normal / Close-Rows /
  PIM) and the PIM micro-command stream's legality (state and timing of the head command);
* :class:`~hw.memctrl_queue.RequestQueue` and :class:`~hw.memctrl_queue.Scheduler` (in
  :mod:`hw.memctrl_queue`) - the normal requests and their FR-FCFS pick;
* :class:`Arbiter` - who gets the bus this cycle (refresh, closing rows, PIM stream, normal requests);
* :class:`ResponsePipe` - the read-latency pipe and the two response FIFOs with their credits.

Each client bids for the bus with a :class:`BidSignature` (``go``: it wants the cycle; ``cmd``: the command
it puts on the bus if granted, ``cmd.valid`` low for a granted cycle without a bus command) and learns of
its grant from the :class:`Arbiter`. Everything here is combinational from the registers of the cycle (the
decision of cycle ``t`` is on the bus in ``t + 1``, :class:`hw.memctrl.MemoryController`'s bus register).
"""

from amaranth.hdl import Array, Cat, Const, Module, Mux, Signal
from amaranth.lib import data, stream, wiring
from amaranth.lib.fifo import SyncFIFOBuffered
from amaranth.lib.wiring import In, Out

from .config import COMBINE_ROW_BIT, SystemConfig
from .memif import TAG_BITS, response_layout
from .pim.commands import COLUMN_OPS, LOWPREC_OPCODES, PimOp
from .pim.timing import countdown, faw_window, pim_row_buffer, refresh_credit

__all__ = ["lds_op", "pim_command_layout", "pim_response_layout", "CommandSignature", "BidSignature", "ChannelStateSignature",
           "ResponseSourceSignature", "ChannelState", "RefreshMachine", "Arbiter", "ResponsePipe",
           "ARBITRATION", "bit_of", "propose", "widths"]

ARBITRATION = ("pim_first", "normal_first", "fair")
"""Command-bus policies between the PIM stream and normal requests with two row buffers."""


def pim_command_layout(cfg: SystemConfig) -> data.StructLayout:
    """Payload of the PIM micro-command stream (the bus fields of the command, plus a tag)."""
    p = cfg.pim
    return data.StructLayout({
        "op": PimOp,
        "bank": p.bank_addr_bits,
        "row": p.row_addr_bits,
        "col": p.column_addr_bits,
        "data": p.column_bits,
        "mask": p.column_bytes,
        "tag": TAG_BITS,
    })


def pim_response_layout(cfg: SystemConfig) -> data.StructLayout:
    """Payload of the PIM response stream: data of RD/RDMAC/RDAF, the command's tag, and ``error``
    for a command the controller refused (see :class:`hw.memctrl.MemoryController`)."""
    return data.StructLayout({
        "data": cfg.pim.column_bits,
        "tag": TAG_BITS,
        "error": 1,
    })


def widths(cfg: SystemConfig) -> tuple[int, int, int]:
    """``(row, bank, column)`` widths of the controller's internal fields (at least one bit each)."""
    p = cfg.pim
    return max(p.row_addr_bits, 1), max(p.bank_addr_bits, 1), max(p.column_addr_bits, 1)


def bit_of(vec, index, nb: int):
    """Bit ``index`` (a value) of the per-bank vector ``vec`` of ``nb`` bits."""
    return vec.bit_select(index, 1) if nb > 1 else vec[0]


class CommandSignature(wiring.Signature):
    """A command on its way to the bus (driver's side): ``valid`` and the bus fields ``op``, ``bank``,
    ``row``, ``col``, ``data``, ``mask`` (fields a command does not use are 0)."""

    def __init__(self, cfg: SystemConfig):
        p = cfg.pim
        rb, bb, cb = widths(cfg)
        super().__init__({"valid": Out(1), "op": Out(PimOp), "bank": Out(bb), "row": Out(rb), "col": Out(cb),
                          "data": Out(p.column_bits), "mask": Out(p.column_bytes)})


class BidSignature(wiring.Signature):
    """A client's bid for the command bus (client's side): ``go`` (it wants this cycle), ``cmd`` (what goes on
    the bus if granted; ``cmd.valid`` low: the granted cycle carries no bus command) and ``grant`` (in)."""

    def __init__(self, cfg: SystemConfig):
        super().__init__({"go": Out(1), "cmd": Out(CommandSignature(cfg)), "grant": In(1)})


class ChannelStateSignature(wiring.Signature):
    """The channel's state as :class:`ChannelState` publishes it (publisher's side). Per bank (``nb`` bits):
    ``is_open``, ``open_row`` (an array of rows), and the windows ``rcdrd_ok``, ``rcdwr_ok``, ``rp_ok``,
    ``pre_ok`` (tRAS, tWR and tRTP all allow a PRE). Channel-wide: ``all_closed``, ``preab_ok``, the PIM row
    buffer (``p_open``, ``p_row``, ``p_rcd_ok``, ``p_rp_ok``, ``p_pre_ok``; closed and always allowed with
    one row buffer), ``ccd_ok``, ``mac_ok``, ``af_ok``, ``act_timing_ok`` (tRFC, tRRD, tFAW allow an
    activation) and ``ref_ok`` (every row closed, tRP and tRFC allow a REF). With a pipelined processing
    unit (``PimGeometry.acc_stages > 1``) also ``cmb_ok``: tMAC since the last combining MAC (a MAC whose
    ``row`` bit :data:`hw.config.COMBINE_ROW_BIT` is set), which every MAC waits for (:mod:`hw.pim.bank`).
    With a registered pick (``PimGeometry.pick_stages = 1``) also the windows one cycle ahead (``rcdrd_nx``,
    ``rcdwr_nx``, ``rp_nx``, ``pre_nx`` per bank; ``ccd_nx``, ``act_timing_nx``: allowed next cycle unless
    this cycle's command restarts them) and this cycle's command: ``x_row`` / ``x_col`` (per bank: it
    activates or precharges / reads or writes the bank's normal row buffer), ``x_column`` (a column-type
    command) and ``x_act`` (an activation or a REF); for the readiness the request queue registers per entry
    (:meth:`hw.memctrl_queue.RequestQueue._readiness`) the bank windows two cycles ahead (``rcdrd_n2``,
    ``rcdwr_n2``, ``rp_n2``, ``pre_n2``: allowed in two cycles unless this cycle's or the next cycle's
    command restarts them) and ``x_pre2`` (per bank: this cycle's command restarts a PRE window, tRAS / tWR
    / tRTP, that still runs two cycles later); and ``af_row`` (per bank: ``open_row`` is at least
    ``PimGeometry.data_rows``, an AF row), ``rp_all`` and ``rcdrd_all`` (``rp_ok`` / ``rcdrd_ok`` all ones, from a
    register). With 4-bit
    weights and two accumulator slots also ``mac_ok0`` / ``mac_ok1``: tMAC since the last MAC into slot 0 / 1
    (``row`` bit 4), which WRBIAS and RDMAC into that slot wait for (``mac_ok`` counts every MAC)."""

    def __init__(self, cfg: SystemConfig):
        nb = cfg.pim.banks
        rb, _, _ = widths(cfg)
        members = {"is_open": Out(nb), "open_row": Out(data.ArrayLayout(rb, nb))}
        members.update({n: Out(nb) for n in ("rcdrd_ok", "rcdwr_ok", "rp_ok", "pre_ok")})
        members.update({n: Out(1) for n in ("all_closed", "preab_ok", "p_open")})
        members["p_row"] = Out(rb)
        members.update({n: Out(1) for n in ("p_rcd_ok", "p_rp_ok", "p_pre_ok", "ccd_ok", "mac_ok", "af_ok",
                                            "act_timing_ok", "ref_ok")})
        if cfg.pim.pipelined:
            members["cmb_ok"] = Out(1)
        if cfg.pim.lowprec and cfg.pim.acc_slots == 2:
            members.update({n: Out(1) for n in ("mac_ok0", "mac_ok1")})     # PU_BUSY per accumulator slot
        if cfg.pim.pick_stages:
            # For the registered pick: the windows as they will be next cycle unless this cycle's command
            # restarts them, and what this cycle's command does (per bank: an ACT / PRE, a column command).
            members.update({n: Out(nb) for n in ("rcdrd_nx", "rcdwr_nx", "rp_nx", "pre_nx", "x_row", "x_col")})
            members.update({n: Out(1) for n in ("ccd_nx", "act_timing_nx", "x_column", "x_act")})
            # For the per-entry readiness the request queue registers: the bank windows two cycles ahead.
            members.update({n: Out(nb) for n in ("rcdrd_n2", "rcdwr_n2", "rp_n2", "pre_n2", "x_pre2")})
            # Per bank: its open row is an AF row (registered with the row, for the PIM path's AF check);
            # channel-wide: tRP allows every bank (``rp_ok`` all ones, registered a cycle ahead).
            members["af_row"] = Out(nb)
            members["rp_all"] = Out(1)
            members["rcdrd_all"] = Out(1)
        super().__init__(members)


class ResponseSourceSignature(wiring.Signature):
    """An entry for the response pipe (source's side): ``valid``, ``write`` (a write acknowledgement),
    ``err`` (an error response) and the ``tag``; which fields count depends on the pipe's input."""

    def __init__(self):
        super().__init__({"valid": Out(1), "write": Out(1), "err": Out(1), "tag": Out(TAG_BITS)})


def lds_op(op, p):
    """4-bit weights: ``op`` is LDSCAB (or LDSLAB, fp4 with grid choice), opcodes outside :class:`PimOp`
    (:mod:`hw.pim.commands`); ``None`` on a BF16 device (nothing is elaborated)."""
    if not p.lowprec:
        return None
    ops = [LOWPREC_OPCODES["LDSCAB"]] + ([LOWPREC_OPCODES["LDSLAB"]] if p.grid_choice else [])
    return op.as_value().matches(*ops)


def propose(m: Module, cmd, op, bank=0, row=0, col=0, data_=0, mask=0):
    """Drive ``cmd`` (a :class:`CommandSignature` interface) with a command in the current ``m.If`` branch."""
    m.d.comb += [cmd.valid.eq(1), cmd.op.eq(op), cmd.bank.eq(bank), cmd.row.eq(row), cmd.col.eq(col),
                 cmd.data.eq(data_), cmd.mask.eq(mask)]


class ChannelState(wiring.Component):
    """The controller's copy of the channel's state and timing windows.

    Members
    -------
    issued : In(CommandSignature(cfg))
        The command decided this cycle (on the bus the next cycle).
    state : Out(ChannelStateSignature(cfg))

    A countdown of ``n`` cycles started by a command in cycle ``t`` allows the constrained command from
    cycle ``t + n`` on (:func:`hw.pim.timing.countdown`): ACT starts tRCDRD, tRCDWR and tRAS; PRE (of an
    open bank) starts tRP; WR starts tWR; RD, MACSB, MACAB and AF start tRTP (with two row buffers, MAC and
    AF read the PIM buffer, :func:`hw.pim.timing.pim_row_buffer`). Channel-wide: tCCD (every column-type
    command), tRRD (ACT, ACTAB, PACTAB), tFAW (:func:`hw.pim.timing.faw_window`), tRFC (REF), tMAC (MACSB,
    MACAB) and tAF (AF). With the registered pick (``PimGeometry.pick_stages = 1``, for Fmax) the countdowns
    load from their registered start (``countdown(..., late=True)``: the same windows on every cycle, but the
    issued command only drives one flip-flop per window), and ``rp_all`` / ``rcdrd_all`` are registers whose
    inputs choose on ``issued.valid`` between two terms computed from registers and the ungated decode.
    """

    def __init__(self, cfg: SystemConfig):
        self._cfg = cfg
        super().__init__({"issued": In(CommandSignature(cfg)), "state": Out(ChannelStateSignature(cfg))})

    def elaborate(self, platform):
        m = Module()
        p, t = self._cfg.pim, self._cfg.timing
        nb = p.banks
        all_banks = (1 << nb) - 1
        rb, _, _ = widths(self._cfg)
        iss, op, iss_bank, iss_row = self.issued.valid, self.issued.op, self.issued.bank, self.issued.row
        s = self.state

        # ------------------------------------------------------- bank state machines
        is_open = Signal(nb)
        open_row = [Signal(rb, name=f"open_row{b}") for b in range(nb)]
        rcdrd_ok, rcdwr_ok, ras_ok, rp_ok, wr_ok, rtp_ok = (Signal(nb, name=n) for n in
                                                            ("rcdrd_ok", "rcdwr_ok", "ras_ok", "rp_ok",
                                                             "wr_ok", "rtp_ok"))
        dual = p.row_buffers == 2
        ahead = p.pick_stages > 0
        nx = {rule: Signal(nb, name=f"{rule}_ok_next") for rule in ("rcdrd", "rcdwr", "ras", "rp", "wr", "rtp")
              } if ahead else {}
        n2 = {rule: Signal(nb, name=f"{rule}_ok_next2") for rule in ("rcdrd", "rcdwr", "ras", "rp", "wr", "rtp")
              } if ahead else {}
        dec_act, dec_pre = Signal(nb, name="dec_act"), Signal(nb, name="dec_pre")    # ungated (ahead only)
        is_lds = lds_op(op, p)
        for b in range(nb):
            here = iss_bank == b
            do_act = iss & (((op == PimOp.ACT) & here) | (op == PimOp.ACTAB))
            do_pre = iss & is_open[b] & (((op == PimOp.PRE) & here) | (op == PimOp.PREAB))
            do_wr = iss & (op == PimOp.WR) & here
            if dual:        # MAC and AF read the PIM buffer
                rd_type = iss & (op == PimOp.RD) & here
            else:
                rd_type = iss & ((op.as_value().matches(PimOp.RD, PimOp.MACSB) & here) |
                                 op.as_value().matches(PimOp.MACAB, PimOp.AF))
                if p.lowprec:   # LDSCAB / LDSLAB: all-bank reads of the open row (tRTP)
                    rd_type = rd_type | (iss & is_lds)
            with m.If(do_act):
                m.d.sync += [is_open[b].eq(1), open_row[b].eq(iss_row)]
                if ahead:
                    m.d.sync += s.af_row[b].eq(iss_row >= p.data_rows)
            with m.Elif(do_pre):
                m.d.sync += is_open[b].eq(0)
            if ahead:
                rules = [(rcdrd_ok, "rcdrd", t.tRCDRD, do_act), (rcdwr_ok, "rcdwr", t.tRCDWR, do_act),
                         (ras_ok, "ras", t.tRAS, do_act), (rp_ok, "rp", t.tRP, do_pre),
                         (wr_ok, "wr", t.tWR, do_wr), (rtp_ok, "rtp", t.tRTP, rd_type)]
                for vec, rule, cycles, start in rules:
                    ok, ok_next, ok_next2 = countdown(m, f"b{b}_{rule}", cycles, start, ahead=2, late=True)
                    m.d.comb += [vec[b].eq(ok), nx[rule][b].eq(ok_next), n2[rule][b].eq(ok_next2)]
                # a PRE window this cycle's command restarts and that still runs two cycles later
                pre2 = [start for _, rule, cycles, start in rules if rule in ("ras", "wr", "rtp") and cycles > 2]
                m.d.comb += [s.x_row[b].eq(do_act | do_pre), s.x_col[b].eq(do_wr | rd_type),
                             s.x_pre2[b].eq(Cat(*pre2).any() if pre2 else 0)]
                m.d.comb += [dec_act[b].eq(((op == PimOp.ACT) & here) | (op == PimOp.ACTAB)),
                             dec_pre[b].eq(is_open[b] & (((op == PimOp.PRE) & here) | (op == PimOp.PREAB)))]
                continue
            m.d.comb += [
                rcdrd_ok[b].eq(countdown(m, f"b{b}_rcdrd", t.tRCDRD, do_act)),
                rcdwr_ok[b].eq(countdown(m, f"b{b}_rcdwr", t.tRCDWR, do_act)),
                ras_ok[b].eq(countdown(m, f"b{b}_ras", t.tRAS, do_act)),
                rp_ok[b].eq(countdown(m, f"b{b}_rp", t.tRP, do_pre)),
                wr_ok[b].eq(countdown(m, f"b{b}_wr", t.tWR, do_wr)),
                rtp_ok[b].eq(countdown(m, f"b{b}_rtp", t.tRTP, rd_type)),
            ]
        pre_ok = ras_ok & wr_ok & rtp_ok           # per bank: a PRE may close it now
        if ahead:
            m.d.comb += [s.rcdrd_nx.eq(nx["rcdrd"]), s.rcdwr_nx.eq(nx["rcdwr"]), s.rp_nx.eq(nx["rp"]),
                         s.pre_nx.eq(nx["ras"] & nx["wr"] & nx["rtp"]),
                         s.rcdrd_n2.eq(n2["rcdrd"]), s.rcdwr_n2.eq(n2["rcdwr"]), s.rp_n2.eq(n2["rp"]),
                         s.pre_n2.eq(n2["ras"] & n2["wr"] & n2["rtp"])]
        all_closed = is_open == 0

        # ------------------------------------------------------- PIM row buffer (two row buffers)
        # Only all-bank commands use it, so one state stands for every bank's PIM buffer (as in the device).
        pim_rd_op = op.as_value().matches(PimOp.MACSB, PimOp.MACAB, PimOp.AF)
        if p.lowprec:
            pim_rd_op = pim_rd_op | is_lds
        if dual:
            p_open, p_row, p_rcd_ok, p_ras_ok, p_rp_ok, p_rtp_ok = pim_row_buffer(
                m, t, iss & (op == PimOp.PACTAB), iss & (op == PimOp.PPREAB), iss & pim_rd_op, iss_row, late=ahead)
            p_pre_ok = ~p_open | (p_ras_ok & p_rtp_ok)
        else:
            p_open = Const(0, 1)
            p_row = Const(0, rb)
            p_rcd_ok = p_rp_ok = p_pre_ok = Const(1, 1)

        # ------------------------------------------------------- channel-wide timing
        is_act = op.as_value().matches(PimOp.ACT, PimOp.ACTAB, *((PimOp.PACTAB,) if dual else ()))
        col_cmd = op.as_value().matches(*COLUMN_OPS)
        if p.lowprec:
            col_cmd = col_cmd | is_lds
        is_mac = op.as_value().matches(PimOp.MACSB, PimOp.MACAB)
        if ahead:
            ccd_ok, ccd_nx = countdown(m, "ccd", t.tCCD, iss & col_cmd, ahead=True, late=True)
            rrd_ok, rrd_nx = countdown(m, "rrd", t.tRRD, iss & is_act, ahead=True, late=True)
            rfc_ok, rfc_nx = countdown(m, "rfc", t.tRFC, iss & (op == PimOp.REF), ahead=True, late=True)
        else:
            ccd_ok = countdown(m, "ccd", t.tCCD, iss & col_cmd)
            rrd_ok = countdown(m, "rrd", t.tRRD, iss & is_act)
            rfc_ok = countdown(m, "rfc", t.tRFC, iss & (op == PimOp.REF))
        mac_ok = countdown(m, "mac", t.tMAC, iss & is_mac, late=ahead)
        if p.lowprec and p.acc_slots == 2:
            # tMAC after the last MAC into each accumulator slot (``row`` bit 4), as the device's PU_BUSY.
            m.d.comb += [s.mac_ok0.eq(countdown(m, "mac0", t.tMAC, iss & is_mac & ~iss_row[4], late=ahead)),
                         s.mac_ok1.eq(countdown(m, "mac1", t.tMAC, iss & is_mac & iss_row[4], late=ahead))]
        af_ok = countdown(m, "afl", t.tAF, iss & (op == PimOp.AF), late=ahead)
        if ahead:
            faw_ok, faw_nx = faw_window(m, t.tFAW, iss & is_act, ahead=True)
            m.d.comb += [s.ccd_nx.eq(ccd_nx), s.act_timing_nx.eq(rfc_nx & rrd_nx & faw_nx),
                         s.x_column.eq(iss & col_cmd), s.x_act.eq(iss & (is_act | (op == PimOp.REF)))]
        else:
            faw_ok = faw_window(m, t.tFAW, iss & is_act)
        if p.pipelined:
            m.d.comb += s.cmb_ok.eq(countdown(m, "cmb", t.tMAC, iss & is_mac & iss_row[COMBINE_ROW_BIT], late=ahead))

        m.d.comb += [s.open_row[b].eq(open_row[b]) for b in range(nb)]
        m.d.comb += [
            s.is_open.eq(is_open), s.rcdrd_ok.eq(rcdrd_ok), s.rcdwr_ok.eq(rcdwr_ok), s.rp_ok.eq(rp_ok),
            s.pre_ok.eq(pre_ok), s.all_closed.eq(all_closed), s.preab_ok.eq((is_open & ~pre_ok) == 0),
            s.p_open.eq(p_open), s.p_row.eq(p_row), s.p_rcd_ok.eq(p_rcd_ok), s.p_rp_ok.eq(p_rp_ok),
            s.p_pre_ok.eq(p_pre_ok), s.ccd_ok.eq(ccd_ok), s.mac_ok.eq(mac_ok), s.af_ok.eq(af_ok),
            s.act_timing_ok.eq(rfc_ok & rrd_ok & faw_ok),      # plus the bank's tRP
            s.ref_ok.eq(all_closed & (s.rp_all if ahead else (rp_ok == all_banks)) & rfc_ok & ~p_open & p_rp_ok),
        ]
        if ahead:
            # tRP allows every bank: registered from next cycle's per-bank windows (reset: every bank allows).
            # Likewise tRCDRD for every bank (the all-bank MACs and AF). Written as a choice on ``iss`` between
            # the two cases, each from registers and the (ungated) decode, so it waits for ``iss`` one level.
            rp_all = Signal(init=1, name="rp_all_r")
            rcdrd_all = Signal(init=1, name="rcdrd_all_r")

            def all_next(ok_next, dec, cycles):
                if cycles <= 1:
                    return Const(1, 1)
                return Mux(iss, (ok_next & ~dec).all(), ok_next.all())
            m.d.sync += [rp_all.eq(all_next(nx["rp"], dec_pre, t.tRP)),
                         rcdrd_all.eq(all_next(nx["rcdrd"], dec_act, t.tRCDRD))]
            m.d.comb += [s.rp_all.eq(rp_all), s.rcdrd_all.eq(rcdrd_all)]
        return m


class RefreshMachine(wiring.Component):
    """The refresh credit and sequence.

    A copy of the device's credit counter (:func:`hw.pim.timing.refresh_credit`: one REF falls due per
    tREFI; the device is late with more than ``refresh_postpone`` owed). ``Idle`` -> ``Drain`` when at
    least one REF is owed and the channel is idle (normal mode: empty queue; PIM mode: every bank closed),
    or forced when ``refresh_postpone`` are owed. ``Drain``: PREAB (and PPREAB) when tRAS/tWR/tRTP allow,
    then REF when tRP and tRFC allow. A forced refresh in PIM mode closes the PIM stream's rows, so
    ``Reopen`` activates them again (ACTAB when every bank had the same row, else ACT per bank under
    tRRD/tFAW; PACTAB for the PIM buffer) before the stream continues. With the registered pick
    (``PimGeometry.pick_stages = 1``, for Fmax) the banks left to reopen come with registers of the lowest
    one, its row and whether none / all are left, and the every-bank-same-row check is registered.

    Members
    -------
    issued : In(CommandSignature(cfg))
        The command decided this cycle (a REF pays one credit back, whoever issued it).
    state : In(ChannelStateSignature(cfg))
    mode_pim, mode_normal, queue_empty : In(1)
        The mode machine's state and whether normal requests are queued (the channel is idle when they
        allow).
    bid : Out(BidSignature(cfg))
        ``go`` in the cycle a refresh starts and while it runs: the machine has the bus to itself.
    refreshing : Out(1)
        In ``Drain`` or ``Reopen``.
    owed : Out(8)
        Refreshes owed (0 when refreshes were pulled in).
    forced : Out(32)
        Refreshes forced by the deadline (wrapping).
    """

    def __init__(self, cfg: SystemConfig):
        self._cfg = cfg
        super().__init__({
            "issued": In(CommandSignature(cfg)), "state": In(ChannelStateSignature(cfg)),
            "mode_pim": In(1), "mode_normal": In(1), "queue_empty": In(1),
            "bid": Out(BidSignature(cfg)), "refreshing": Out(1), "owed": Out(8), "forced": Out(32),
        })

    def elaborate(self, platform):
        m = Module()
        p, t = self._cfg.pim, self._cfg.timing
        nb = p.banks
        all_banks = (1 << nb) - 1
        _, bb, _ = widths(self._cfg)
        dual = p.row_buffers == 2
        s = self.state
        open_row = Array(s.open_row[b] for b in range(nb))
        mode_pim = self.mode_pim
        cmd = self.bid.cmd

        owed = refresh_credit(m, t.tREFI, t.refresh_postpone, self.issued.valid & (self.issued.op == PimOp.REF))
        m.d.comb += self.owed.eq(Mux(owed < 0, 0, owed))
        urgent = owed >= t.refresh_postpone

        reopen = Signal(nb)
        reopen_bank = Signal(bb)
        reg = p.pick_stages > 0
        if reg:
            # With the registered pick (for Fmax): the banks still to reopen are followed by registers of their
            # lowest bank, its row and whether none / all are left, computed from the next value (``reopen_next``).
            rb, _, _ = widths(self._cfg)
            reopen_next = Signal(nb, name="reopen_next")
            first = Signal(bb, name="reopen_first")
            reopen_row, reopen_none, reopen_all = Signal(rb, name="reopen_row"), Signal(name="reopen_none"), \
                Signal(name="reopen_all")
            m.d.comb += reopen_next.eq(reopen)
            for b in reversed(range(nb)):
                with m.If(reopen_next[b]):
                    m.d.comb += first.eq(b)
            m.d.sync += [reopen.eq(reopen_next), reopen_bank.eq(first), reopen_row.eq(open_row[first]),
                         reopen_none.eq(reopen_next == 0), reopen_all.eq(reopen_next == all_banks)]

            def set_reopen(value):
                m.d.comb += reopen_next.eq(value)

            def clear_reopen():
                m.d.comb += reopen_next.bit_select(reopen_bank, 1).eq(0) if nb > 1 else reopen_next.eq(0)
        else:
            for b in reversed(range(nb)):
                with m.If(reopen[b]):
                    m.d.comb += reopen_bank.eq(b)
            reopen_row, reopen_none, reopen_all = open_row[reopen_bank], reopen == 0, reopen == all_banks

            def set_reopen(value):
                m.d.sync += reopen.eq(value)

            def clear_reopen():
                m.d.sync += reopen.bit_select(reopen_bank, 1).eq(0) if nb > 1 else reopen.eq(0)
        same_rows = Cat(*[open_row[b] == open_row[0] for b in range(nb)]).all()
        if p.pick_stages:
            # Registered (with the registered pick, for Fmax): the rows Reopen activates are only changed by
            # an ACT, and Drain (at least a REF) precedes Reopen with nothing else issued.
            same_rows_r = Signal(name="same_rows")
            m.d.sync += same_rows_r.eq(same_rows)
            same_rows = same_rows_r
        refreshing = self.refreshing
        ref_start = Signal()
        forced = Signal()
        n_forced = self.forced
        m.d.comb += self.bid.go.eq(refreshing | ref_start)

        chan_idle = Mux(mode_pim, s.all_closed, self.mode_normal & self.queue_empty) & ~s.p_open
        p_reopen = Signal()            # the PIM buffer's row is reopened after the refresh
        with m.FSM(name="refresh"):
            with m.State("Idle"):
                with m.If((owed >= 1) & (urgent | chan_idle)):
                    # Nothing else issues in this cycle either, so ``is_open`` is what Drain closes.
                    m.d.comb += ref_start.eq(1)
                    set_reopen(Mux(mode_pim, s.is_open, 0))
                    m.d.sync += [forced.eq(urgent), p_reopen.eq(s.p_open)]
                    m.next = "Drain"
            with m.State("Drain"):
                m.d.comb += refreshing.eq(1)
                with m.If(~s.all_closed):
                    with m.If(s.preab_ok):
                        propose(m, cmd, PimOp.PREAB)
                if dual:
                    with m.Elif(s.p_open):
                        with m.If(s.p_pre_ok):
                            propose(m, cmd, PimOp.PPREAB)
                with m.Elif(s.ref_ok):
                    propose(m, cmd, PimOp.REF)
                    m.d.sync += n_forced.eq(n_forced + forced)
                    m.next = "Reopen"
            with m.State("Reopen"):
                m.d.comb += refreshing.eq(1)
                if dual:
                    with m.If(p_reopen):
                        with m.If(s.p_rp_ok & s.act_timing_ok):
                            propose(m, cmd, PimOp.PACTAB, row=s.p_row)
                            m.d.sync += p_reopen.eq(0)
                with (m.Elif if dual else m.If)(reopen_none):
                    m.next = "Idle"
                with m.Elif(reopen_all & same_rows):
                    with m.If((s.rp_all if reg else (s.rp_ok == all_banks)) & s.act_timing_ok):
                        propose(m, cmd, PimOp.ACTAB, row=open_row[0])
                        set_reopen(0)
                        m.next = "Idle"
                with m.Elif(bit_of(s.rp_ok, reopen_bank, nb) & s.act_timing_ok):
                    propose(m, cmd, PimOp.ACT, bank=reopen_bank, row=reopen_row)
                    clear_reopen()
        return m


class Arbiter(wiring.Component):
    """Who gets the command bus this cycle, and the command decided (one per cycle).

    Priority: the refresh machine (``refresh.go``: nothing else is granted), then closing rows for PIM mode
    (``close``), then the PIM stream (``pim``) and the FR-FCFS scheduler (``normal``), between which
    ``arbitration`` decides when both bid (only possible with two row buffers): ``pim_first``,
    ``normal_first`` or ``fair`` (alternating while both bid).

    Members
    -------
    refresh, close, pim, normal : In(BidSignature(cfg))
    issued : Out(CommandSignature(cfg))
        The granted bid's command (``valid`` low and every field 0 when no command is issued). With the
        registered pick (``PimGeometry.pick_stages = 1``, for Fmax) the fields are the granted bid's whatever
        its ``valid`` (a bid may drive them without a command), so only ``valid`` waits for the bids' timing
        checks; every user qualifies them with ``valid`` and the bus register zeroes them without a command.
    """

    def __init__(self, cfg: SystemConfig, arbitration: str = "pim_first"):
        if arbitration not in ARBITRATION:
            raise ValueError(f"Arbitration must be one of {', '.join(ARBITRATION)}, not {arbitration!r}")
        self._cfg = cfg
        self._arbitration = arbitration
        super().__init__({**{n: In(BidSignature(cfg)) for n in ("refresh", "close", "pim", "normal")},
                          "issued": Out(CommandSignature(cfg))})

    def elaborate(self, platform):
        m = Module()
        dual = self._cfg.pim.row_buffers == 2
        pim_go, norm_go = self.pim.go, self.normal.go
        busy = self.refresh.go | self.close.go
        pim_win = Signal()
        if not dual or self._arbitration == "pim_first":
            m.d.comb += pim_win.eq(pim_go)
        elif self._arbitration == "normal_first":
            m.d.comb += pim_win.eq(pim_go & ~norm_go)
        else:                          # fair: alternate while both want the bus
            last_pim = Signal()
            m.d.comb += pim_win.eq(pim_go & (~norm_go | ~last_pim))
            with m.If(pim_go & norm_go & ~busy):
                m.d.sync += last_pim.eq(pim_win)

        ungated = self._cfg.pim.pick_stages > 0

        def grant(bid):
            m.d.comb += bid.grant.eq(1)
            if ungated:     # the fields follow the grant alone (meaningful with ``valid``; the bus gates them)
                m.d.comb += [getattr(self.issued, n).eq(getattr(bid.cmd, n))
                             for n in ("valid", "op", "bank", "row", "col", "data", "mask")]
                return
            with m.If(bid.cmd.valid):
                m.d.comb += [getattr(self.issued, n).eq(getattr(bid.cmd, n))
                             for n in ("valid", "op", "bank", "row", "col", "data", "mask")]

        with m.If(self.refresh.go):
            grant(self.refresh)
        with m.Elif(self.close.go):
            grant(self.close)
        with m.Elif(pim_win):
            grant(self.pim)
        with m.Elif(norm_go):
            grant(self.normal)
        return m


class ResponsePipe(wiring.Component):
    """The read-latency pipe and the response FIFOs.

    Every column command enters a ``tRL + 1`` stage pipeline (register stage + read latency) whose output
    meets the device's read data, then a FIFO toward ``resp`` / ``pim_resp``. The pipe's input in a cycle is
    the column command of a normal request (``col``), else a consumed reading PIM command (``pim``; ``err``
    when refused), else an error response to a request (``err``, accepted when ``resp`` has a credit:
    ``err_accept``). ``resp_credit`` / ``pim_credit``: the FIFO has room for another response counting those
    in the pipe (a column command is only issued with a credit, so back-pressure stalls scheduling instead
    of losing data).

    Members
    -------
    col, pim, err : In(ResponseSourceSignature())
    err_accept : Out(1)
    rdata : In(column bits)
        The device's read data (the bus's ``rdata``).
    resp : Out(stream.Signature(response_layout(cfg)))
    pim_resp : Out(stream.Signature(pim_response_layout(cfg)))
    resp_credit, pim_credit : Out(1)
    resp_credit2 : Out(1)
        With a registered pick (``PimGeometry.pick_stages = 1``): room for two more responses (the pick is
        made a cycle ahead, while the command or error response of the cycle in between may take one).
    busy : Out(1)
        A response in the pipe or a FIFO.
    pim_in_flight : Out(1)
        A PIM response in the pipe.
    """

    def __init__(self, cfg: SystemConfig, depth: int):
        self._cfg = cfg
        self._depth = depth
        super().__init__({
            **{n: In(ResponseSourceSignature()) for n in ("col", "pim", "err")}, "err_accept": Out(1),
            "rdata": In(cfg.pim.column_bits),
            "resp": Out(stream.Signature(response_layout(cfg))),
            "pim_resp": Out(stream.Signature(pim_response_layout(cfg))),
            "resp_credit": Out(1), "pim_credit": Out(1), "busy": Out(1), "pim_in_flight": Out(1),
            **({"resp_credit2": Out(1)} if cfg.pim.pick_stages else {}),
        })

    def elaborate(self, platform):
        m = Module()
        cfg = self._cfg
        t = cfg.timing

        # Input: a column command, else a refused PIM read, else an error request.
        in_valid, in_pim, in_read, in_write, in_err = Signal(), Signal(), Signal(), Signal(), Signal()
        in_tag = Signal(TAG_BITS)
        with m.If(self.col.valid):
            m.d.comb += [in_valid.eq(1), in_read.eq(~self.col.write), in_write.eq(self.col.write),
                         in_tag.eq(self.col.tag)]
        with m.Elif(self.pim.valid):
            m.d.comb += [in_valid.eq(1), in_pim.eq(1), in_read.eq(1), in_err.eq(self.pim.err),
                         in_tag.eq(self.pim.tag)]
        with m.Elif(self.err.valid & self.resp_credit):
            m.d.comb += [self.err_accept.eq(1), in_valid.eq(1), in_err.eq(1), in_write.eq(self.err.write),
                         in_tag.eq(self.err.tag)]

        # Stage k holds what was decided k+1 cycles ago; stage tRL meets the device's read data.
        n_stages = t.tRL + 1
        st_valid = Signal(n_stages)
        st_pim = Signal(n_stages)
        st_read = Signal(n_stages)
        st_write = Signal(n_stages)
        st_err = Signal(n_stages)
        st_tag = [Signal(TAG_BITS, name=f"st_tag{k}") for k in range(n_stages)]
        m.d.sync += [
            st_valid.eq(Cat(in_valid, st_valid[:-1])), st_pim.eq(Cat(in_pim, st_pim[:-1])),
            st_read.eq(Cat(in_read, st_read[:-1])), st_write.eq(Cat(in_write, st_write[:-1])),
            st_err.eq(Cat(in_err, st_err[:-1])), st_tag[0].eq(in_tag),
        ]
        m.d.sync += [st_tag[k].eq(st_tag[k - 1]) for k in range(1, n_stages)]
        last = n_stages - 1
        out_data = Mux(st_read[last] & ~st_err[last], self.rdata, 0)

        depth = self._depth
        m.submodules.resp_fifo = resp_fifo = SyncFIFOBuffered(width=len(self.resp.payload.as_value()),
                                                              depth=depth)
        m.submodules.pim_fifo = pim_fifo = SyncFIFOBuffered(width=len(self.pim_resp.payload.as_value()),
                                                             depth=depth)
        resp_word = Signal(response_layout(cfg))
        pim_word = Signal(pim_response_layout(cfg))
        m.d.comb += [
            resp_word.data.eq(out_data), resp_word.tag.eq(st_tag[last]), resp_word.write.eq(st_write[last]),
            resp_word.error.eq(st_err[last]),
            pim_word.data.eq(out_data), pim_word.tag.eq(st_tag[last]), pim_word.error.eq(st_err[last]),
            resp_fifo.w_data.eq(resp_word.as_value()),
            resp_fifo.w_en.eq(st_valid[last] & ~st_pim[last]),
            pim_fifo.w_data.eq(pim_word.as_value()),
            pim_fifo.w_en.eq(st_valid[last] & st_pim[last]),
            self.resp.valid.eq(resp_fifo.r_rdy), self.resp.payload.eq(resp_fifo.r_data),
            resp_fifo.r_en.eq(self.resp.ready),
            self.pim_resp.valid.eq(pim_fifo.r_rdy), self.pim_resp.payload.eq(pim_fifo.r_data),
            pim_fifo.r_en.eq(self.pim_resp.ready),
        ]
        # Credits: responses reserved (in the pipeline or the FIFO) per FIFO.
        resp_used = Signal(range(depth + 1))
        pim_used = Signal(range(depth + 1))
        m.d.comb += [self.resp_credit.eq(resp_used < depth), self.pim_credit.eq(pim_used < depth)]
        if cfg.pim.pick_stages:
            m.d.comb += self.resp_credit2.eq(resp_used < depth - 1)
        m.d.sync += [
            resp_used.eq(resp_used + (in_valid & ~in_pim) - (self.resp.valid & self.resp.ready)),
            pim_used.eq(pim_used + (in_valid & in_pim) - (self.pim_resp.valid & self.pim_resp.ready)),
        ]
        m.d.comb += [self.busy.eq((st_valid != 0) | resp_fifo.r_rdy | pim_fifo.r_rdy),
                     self.pim_in_flight.eq((st_valid & st_pim).any())]
        return m
