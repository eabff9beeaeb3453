"""The memory controller's PIM path (:class:`hw.memctrl.MemoryController` wires it; issue 16): the mode
machine (Normal / Close-Rows / PIM) and the legality of the PIM micro-command stream's head command, one of
the clients that bid for the command bus (:mod:`hw.memctrl_parts` holds the others and the signatures).
"""

from amaranth.hdl import Array, Cat, Const, Module, Mux, Signal
from amaranth.lib import stream, wiring
from amaranth.lib.wiring import In, Out

from .config import SystemConfig
from .memctrl_parts import (
    BidSignature,
    ChannelStateSignature,
    ResponseSourceSignature,
    bit_of,
    lds_op,
    pim_command_layout,
    propose,
    widths,
)
from .pim.commands import READ_OPS, PimOp

__all__ = ["PimPath"]


class PimPath(wiring.Component):
    """The mode machine and the PIM micro-command stream's head.

    *Mode*: ``Normal`` -> (``pim_mode``) ``Close-Rows`` (the ``close`` bid: PREAB once tRAS, tWR, tRTP
    allow) -> ``PIM`` -> (``pim_mode`` low) ``Normal``. With two row buffers the PIM stream's PIM-buffer
    and global-buffer commands run beside normal traffic; only its normal-buffer commands need the channel
    to itself (the controller enters the exclusive mode when one reaches the head of the stream or when
    ``pim_mode`` announces them).

    *Legality* of the head command: ``state_bad`` (the device would refuse it: it is consumed, not issued,
    and answered with an error if it reads) or ``timing_ok`` (it may issue this cycle). A PACTAB whose row a
    bank's normal buffer holds first closes that bank (a PRE in the ``bid``).

    Members
    -------
    pim : In(stream.Signature(pim_command_layout(cfg)))
        The micro-command stream; ``ready`` is ``take``.
    pim_mode : In(1)
    state : In(ChannelStateSignature(cfg))
    credit : In(1)
        The PIM response FIFO has room (a reading command waits for it).
    mode_pim, mode_normal, closing : Out(1)
        The mode machine: the stream is served exclusively / normal requests are served / rows are closed.
    close : Out(BidSignature(cfg))
        The Close-Rows state's PREAB (``go`` while closing; granted before the PIM stream and normal requests).
    bid : Out(BidSignature(cfg))
        The head command (``go``: it can be consumed or issued now, or a conflicting row closed).
    take, refused : Out(1)
        The head command is consumed this cycle / consumed as refused.
    resp : Out(ResponseSourceSignature())
        A reading command consumed this cycle (refused: ``err``), for the response pipe.
    pact_pending : Out(1)
        A PACTAB waits at the head (two row buffers): normal traffic keeps off its row (``pact_row``).
    pact_row : Out(row bits)
    """

    def __init__(self, cfg: SystemConfig):
        self._cfg = cfg
        rb, _, _ = widths(cfg)
        super().__init__({
            "pim": In(stream.Signature(pim_command_layout(cfg))), "pim_mode": In(1),
            "state": In(ChannelStateSignature(cfg)), "credit": In(1),
            "mode_pim": Out(1), "mode_normal": Out(1), "closing": Out(1),
            "close": Out(BidSignature(cfg)), "bid": Out(BidSignature(cfg)),
            "take": Out(1), "refused": Out(1), "resp": Out(ResponseSourceSignature()),
            "pact_pending": Out(1), "pact_row": Out(rb),
        })

    def elaborate(self, platform):
        m = Module()
        p = self._cfg.pim
        nb = p.banks
        all_banks = (1 << nb) - 1
        _, bb, _ = widths(self._cfg)
        dual = p.row_buffers == 2
        s = self.state
        is_open, all_closed, p_open, p_row, ccd_ok, mac_ok = s.is_open, s.all_closed, s.p_open, s.p_row, \
            s.ccd_ok, s.mac_ok
        open_row = Array(s.open_row[b] for b in range(nb))
        act_timing_ok = s.act_timing_ok

        def rcdrd_all():
            """tRCDRD allows every bank (registered with the registered pick)."""
            return s.rcdrd_all if p.pick_stages else (s.rcdrd_ok == all_banks)

        def bit(vec, index):
            return bit_of(vec, index, nb)

        # ------------------------------------------------------- mode machine
        mode_pim = self.mode_pim         # "PIM": the PIM stream is served (exclusively)
        mode_normal = self.mode_normal   # "Normal": normal requests are served
        head_normal = self.pim.valid & self.pim.payload.op.as_value().matches(
            PimOp.ACT, PimOp.ACTAB, PimOp.PRE, PimOp.PREAB, PimOp.RD, PimOp.WR, PimOp.REF)
        want_excl = (head_normal | self.pim_mode) if dual else self.pim_mode
        with m.FSM(name="mode"):
            with m.State("Normal"):
                m.d.comb += mode_normal.eq(~want_excl)
                with m.If(want_excl):
                    m.next = "Close-Rows"
            with m.State("Close-Rows"):
                with m.If(~want_excl):
                    m.next = "Normal"
                with m.Elif(all_closed):
                    m.next = "PIM"
            with m.State("PIM"):
                if dual:
                    # Leave once the stream's normal-buffer work is over and its rows are closed.
                    m.d.comb += mode_pim.eq(1)
                    with m.If(all_closed & ~want_excl):
                        m.next = "Normal"
                else:
                    m.d.comb += mode_pim.eq(self.pim_mode)
                    with m.If(~self.pim_mode):
                        m.next = "Normal"
        closing = self.closing
        m.d.comb += closing.eq(want_excl & ~mode_normal & ~mode_pim)
        m.d.comb += self.close.go.eq(closing)
        with m.If(closing & ~all_closed & s.preab_ok):
            propose(m, self.close.cmd, PimOp.PREAB)

        # ------------------------------------------------------- PIM command legality
        pc = self.pim.payload
        pop = pc.op.as_value()
        pbank = pc.bank if p.bank_addr_bits else Const(0, 1)
        p_open_b = bit(is_open, pbank)
        timing_ok = Signal()
        state_bad = Signal()
        pim_holds = p_open & (p_row == pc.row)
        # PACTAB of a row some bank's normal buffer holds: the controller closes those banks first.
        conflict = Signal(nb)
        if dual:
            m.d.comb += conflict.eq(Mux(self.pim.valid & (pc.op == PimOp.PACTAB),
                                        Cat(*[is_open[b] & (open_row[b] == pc.row) for b in range(nb)]), 0))
        conflict_bank = Signal(bb)
        for b in reversed(range(nb)):
            with m.If(conflict[b]):
                m.d.comb += conflict_bank.eq(b)
        def mac_timing(ok):
            """A MAC's timing: with a pipelined unit also tMAC after a combining MAC (no term otherwise)."""
            return ok & s.cmb_ok if p.pipelined else ok

        with m.Switch(pc.op):
            with m.Case(PimOp.NOP):
                m.d.comb += timing_ok.eq(1)
            with m.Case(PimOp.ACT):
                m.d.comb += [state_bad.eq(p_open_b | pim_holds),
                             timing_ok.eq(bit(s.rp_ok, pbank) & act_timing_ok)]
            with m.Case(PimOp.ACTAB):
                m.d.comb += [state_bad.eq(~all_closed | pim_holds),
                             timing_ok.eq((s.rp_all if p.pick_stages else (s.rp_ok == all_banks)) &
                                          act_timing_ok)]
            with m.Case(PimOp.PRE):
                m.d.comb += timing_ok.eq(~p_open_b | bit(s.pre_ok, pbank))
            with m.Case(PimOp.PREAB):
                m.d.comb += timing_ok.eq(s.preab_ok)
            with m.Case(PimOp.RD):
                m.d.comb += [state_bad.eq(~p_open_b), timing_ok.eq(bit(s.rcdrd_ok, pbank) & ccd_ok)]
            with m.Case(PimOp.WR):
                m.d.comb += [state_bad.eq(~p_open_b), timing_ok.eq(bit(s.rcdwr_ok, pbank) & ccd_ok)]
            if dual:
                with m.Case(PimOp.MACSB, PimOp.MACAB):
                    m.d.comb += [state_bad.eq(~p_open), timing_ok.eq(mac_timing(s.p_rcd_ok & ccd_ok))]
                with m.Case(PimOp.AF):
                    m.d.comb += [state_bad.eq(~p_open | (p_row < p.data_rows)),
                                 timing_ok.eq(s.p_rcd_ok & mac_ok & ccd_ok)]
                with m.Case(PimOp.PACTAB):
                    m.d.comb += [state_bad.eq(p_open),
                                 timing_ok.eq(s.p_rp_ok & act_timing_ok & (conflict == 0))]
                with m.Case(PimOp.PPREAB):
                    m.d.comb += timing_ok.eq(s.p_pre_ok)
            else:
                with m.Case(PimOp.MACSB):
                    m.d.comb += [state_bad.eq(~p_open_b), timing_ok.eq(mac_timing(bit(s.rcdrd_ok, pbank) & ccd_ok))]
                with m.Case(PimOp.MACAB):
                    m.d.comb += [state_bad.eq(is_open != all_banks),
                                 timing_ok.eq(mac_timing(rcdrd_all() & ccd_ok))]
                with m.Case(PimOp.AF):
                    af_rows = s.af_row if p.pick_stages else Cat(*[open_row[b] >= p.data_rows for b in range(nb)])
                    m.d.comb += [state_bad.eq((is_open != all_banks) | (af_rows != all_banks)),
                                 timing_ok.eq(rcdrd_all() & mac_ok & ccd_ok)]
            with m.Case(PimOp.REF):
                m.d.comb += [state_bad.eq(~all_closed | p_open), timing_ok.eq(s.ref_ok)]
            with m.Case(PimOp.WRGB):
                m.d.comb += [state_bad.eq(pc.col >= p.gb_columns), timing_ok.eq(ccd_ok)]
            with m.Case(PimOp.WRBIAS, PimOp.RDMAC):
                m.d.comb += [state_bad.eq(pc.col >= p.acc_groups), timing_ok.eq(mac_ok & ccd_ok)]
            with m.Case(PimOp.RDAF):
                m.d.comb += [state_bad.eq(pc.col >= p.acc_groups), timing_ok.eq(s.af_ok & ccd_ok)]
            with m.Default():
                m.d.comb += [state_bad.eq(1), timing_ok.eq(1)]
        if p.lowprec:
            self._lowprec_rules(m, state_bad, timing_ok)
        p_reads = pop.matches(*READ_OPS)

        # ------------------------------------------------------- the bid and its outcome
        # Served exclusively in PIM mode, or beside normal traffic with two row buffers.
        conflict_pre = (conflict != 0) & bit(s.pre_ok, conflict_bank)
        serve_pim = (mode_pim | mode_normal) if dual else mode_pim
        m.d.comb += self.bid.go.eq(serve_pim & self.pim.valid & (~p_reads | self.credit) &
                                   (state_bad | timing_ok | conflict_pre))
        self._bid_command(m, pbank, state_bad, timing_ok, conflict_bank)
        take = self.bid.grant & (state_bad | timing_ok)
        m.d.comb += [
            self.take.eq(take), self.refused.eq(self.bid.grant & state_bad), self.pim.ready.eq(take),
            self.resp.valid.eq(take & p_reads), self.resp.err.eq(self.refused), self.resp.tag.eq(pc.tag),
            self.pact_pending.eq((self.pim.valid & (pc.op == PimOp.PACTAB)) if dual else Const(0, 1)),
            self.pact_row.eq(pc.row),
        ]
        return m

    def _bid_command(self, m, pbank, state_bad, timing_ok, conflict_bank):
        """The bid's command: the head command when it may issue, else (two row buffers) the PRE that closes a
        normal row its PACTAB needs."""
        p, pc = self._cfg.pim, self.pim.payload
        dual = p.row_buffers == 2
        if p.pick_stages:
            # For Fmax: the fields do not wait for the checks (only ``valid`` does; :class:`Arbiter`).
            cmd = self.bid.cmd
            m.d.comb += cmd.valid.eq(~state_bad & (~timing_ok | (pc.op != PimOp.NOP)))
            if dual:
                m.d.comb += [cmd.op.eq(Mux(timing_ok, pc.op, PimOp.PRE)),
                             cmd.bank.eq(Mux(timing_ok, pbank, conflict_bank))]
            else:
                m.d.comb += [cmd.op.eq(pc.op), cmd.bank.eq(pbank)]
            m.d.comb += [cmd.row.eq(pc.row), cmd.col.eq(pc.col), cmd.data.eq(pc.data), cmd.mask.eq(pc.mask)]
            if dual:        # the conflict PRE carries no row or column
                with m.If(~timing_ok):
                    m.d.comb += [cmd.row.eq(0), cmd.col.eq(0), cmd.data.eq(0), cmd.mask.eq(0)]
        else:
            with m.If(~state_bad):
                with m.If(timing_ok):
                    with m.If(pc.op != PimOp.NOP):
                        propose(m, self.bid.cmd, pc.op, pbank, pc.row, pc.col, pc.data, pc.mask)
                with m.Else():             # close a normal row the PACTAB needs (two row buffers)
                    propose(m, self.bid.cmd, PimOp.PRE, bank=conflict_bank)

    def _lowprec_rules(self, m, state_bad, timing_ok):
        """4-bit weights: LDSCAB / LDSLAB (opcodes outside PimOp) are all-bank read-type column commands, like
        MACAB; with two accumulator slots WRBIAS / RDMAC wait tMAC after the last MAC into their slot (``row``
        bit 4). (Later assignments than the command switch's: they take precedence.)"""
        p, s, pc = self._cfg.pim, self.state, self.pim.payload
        all_banks = (1 << p.banks) - 1
        if p.acc_slots == 2:
            with m.If(pc.op.as_value().matches(PimOp.WRBIAS, PimOp.RDMAC)):
                m.d.comb += timing_ok.eq(Mux(pc.row[4], s.mac_ok1, s.mac_ok0) & s.ccd_ok)
        with m.If(lds_op(pc.op, p)):
            if p.row_buffers == 2:
                m.d.comb += [state_bad.eq(~s.p_open), timing_ok.eq(s.p_rcd_ok & s.ccd_ok)]
            else:
                rcdrd_all = s.rcdrd_all if p.pick_stages else (s.rcdrd_ok == all_banks)
                m.d.comb += [state_bad.eq(s.is_open != all_banks), timing_ok.eq(rcdrd_all & s.ccd_ok)]
