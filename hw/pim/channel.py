"""A PIM channel (banks + global buffer + command decoder) and the multi-channel PIM device.

The channel is driven by a DRAM-like command bus (:class:`PimBusSignature`),
one command per cycle (``op = NOP`` when idle). Every command is checked
against the bank state and every timing rule of :mod:`hw.pim.commands`; a
command that breaks one is **not executed** and sets a sticky violation
(code, opcode, cycle) that stays until ``clear``. Refresh is checked with a
credit counter: one refresh falls due every ``tREFI`` cycles, and more than
``refresh_postpone`` owed sets ``REFRESH_LATE``.

Read data (RD, RDMAC, RDAF) returns on ``rvalid``/``rdata`` exactly ``tRL``
cycles after the command.

Banks and channels are instantiated by module name (``Instance``) from
separately generated Verilog (:func:`pim_sources`): every bank of every
channel shares one Verilog module, so Verilator compiles the bank once
instead of once per instance (64 copies of a MAC datapath in the default
device would otherwise dominate the build).
"""

import hashlib
from operator import attrgetter

from amaranth.hdl import Cat, ClockSignal, Const, Instance, Module, Mux, ResetSignal, Signal
from amaranth.lib import wiring
from amaranth.lib.memory import Memory
from amaranth.lib.wiring import In, Out

from ..config import SystemConfig
from ..elab import Shared
from .bank import PimBank, check_pu_timing
from .commands import COLUMN_OPS, COMBINE_ROW_BIT, DUAL_ONLY, LOWPREC_OPCODES, READ_OPS, PimOp, ViolationCode
from .timing import countdown, delay_pipe, faw_window, pim_row_buffer, refresh_credit

__all__ = ["PimBusSignature", "PimStatusSignature", "PimChannel", "PimDevice", "pim_module_names",
           "STATUS_COUNTERS"]

STATUS_COUNTERS = ("n_act", "n_pre", "n_rd", "n_wr", "n_ref", "n_wrgb", "n_mac", "n_rdmac", "n_af", "n_cmd")


class PimBusSignature(wiring.Signature):
    """Command bus of one channel, from the controller's side."""

    def __init__(self, cfg: SystemConfig):
        p = cfg.pim
        super().__init__({
            "op": Out(PimOp),
            "bank": Out(p.bank_addr_bits),
            "row": Out(p.row_addr_bits),
            "col": Out(p.column_addr_bits),
            "data": Out(p.column_bits),
            "mask": Out(p.column_bytes),
            "rvalid": In(1),
            "rdata": In(p.column_bits),
        })


class PimStatusSignature(wiring.Signature):
    """Violation and event counters of one channel, from the device's side."""

    def __init__(self):
        members = {
            "clear": In(1),
            "violation": Out(1),
            "vcode": Out(ViolationCode),
            "vop": Out(PimOp),
            "vcycle": Out(32),
            "nviol": Out(16),
            "owed": Out(8),
            "cycle": Out(32),
        }
        members.update({name: Out(32) for name in STATUS_COUNTERS})
        super().__init__(members)


def pim_module_names(cfg: SystemConfig) -> dict:
    """Verilog module names of the bank and channel for ``cfg`` (unique per configuration)."""
    key = hashlib.sha256(repr((cfg.pim, cfg.timing)).encode()).hexdigest()[:8]
    return {"bank": f"pim_bank_{key}", "channel": f"pim_channel_{key}"}


def _bank_ports(p):
    ins = ["chan_id", "bank_id", "bd_load", "do_act", "do_pre", "do_rd", "do_wr", "do_mac", "do_af",
           "row", "col", "wdata", "wmask", "gb_data", "pim_row", "bias_load", "bias_value"]
    outs = ["is_open", "open_row", "rcdrd_ok", "rcdwr_ok", "ras_ok", "rp_ok", "wr_ok", "rtp_ok",
            "rdata", "acc", "af_out"]
    if p.lowprec:
        ins += ["do_lds", "do_ldsel"]
        if p.acc_slots == 2:
            outs += ["acc1"]
    return ins, outs



class PimChannel(wiring.Component):
    """One PIM channel: ``banks`` :class:`~hw.pim.bank.PimBank` + global buffer + decoder + checks.

    Members
    -------
    bus : In(PimBusSignature)
    status : Out(PimStatusSignature)
    chan_id : In(8)
        This channel's index (for back-door file names).
    bd_load : In(1)
        Back door: load every bank's storage from ``+PIM_BACKDOOR`` files.
    """

    def __init__(self, cfg: SystemConfig, bank_module: str | None = None):
        if not isinstance(cfg, SystemConfig):
            raise TypeError(f"Configuration must be a SystemConfig, not {cfg!r}")
        self.cfg = cfg
        self.bank_module = bank_module
        check_pu_timing(cfg)
        super().__init__({
            "bus": In(PimBusSignature(cfg)),
            "status": Out(PimStatusSignature()),
            "chan_id": In(8),
            "bd_load": In(1),
        })

    def elaborate(self, platform):
        m = Module()
        cfg = self.cfg
        bus = self.bus
        # The parts below hand each other their signals by name.
        s = Shared(cfg=cfg, p=cfg.pim, t=cfg.timing, nb=cfg.pim.banks, bus=bus, st=self.status, op=bus.op,
                   bank=bus.bank, col=bus.col)
        self._banks(m, s)
        self._state(m, s)
        self._violation(m, s)
        m.d.comb += s.execute.eq((s.op != PimOp.NOP) & (s.code == ViolationCode.NONE))
        self._record(m, s)
        self._global_buffer(m, s)
        self._bank_strobes(m, s)
        self._read_return(m, s)
        self._counters(m, s)
        return m

    def _banks(self, m, s):
        """The banks (:class:`~hw.pim.bank.PimBank`, or Instances of the shared bank module); their ports by
        name."""
        p, nb, cfg = attrgetter('p', 'nb', 'cfg')(s)
        # Banks ----------------------------------------------------------
        ins, outs = _bank_ports(p)
        banks = []
        for b in range(nb):
            sig = {name: Signal(_width(cfg, name), name=f"b{b}_{name}") for name in ins + outs}
            banks.append(sig)
            if self.bank_module is None:
                bank_c = PimBank(cfg)
                m.submodules[f"bank{b}"] = bank_c
                for name in ins:
                    m.d.comb += getattr(bank_c, name).eq(sig[name])
                for name in outs:
                    m.d.comb += sig[name].eq(getattr(bank_c, name))
            else:
                kwargs = {"i_clk": ClockSignal(), "i_rst": ResetSignal()}
                kwargs.update({f"i_{n}": sig[n] for n in ins})
                kwargs.update({f"o_{n}": sig[n] for n in outs})
                m.submodules[f"bank{b}"] = Instance(self.bank_module, **kwargs)
        s.update(banks=banks)

    def _state(self, m, s):
        """The banks' state as vectors, the PIM row buffer and the channel-wide timing windows."""
        banks, p, nb, bank, op, t, bus, col = attrgetter('banks', 'p', 'nb', 'bank', 'op', 't', 'bus', 'col')(s)
        is_open = Cat(bk["is_open"] for bk in banks)
        rcdrd_ok = Cat(bk["rcdrd_ok"] for bk in banks)
        rcdwr_ok = Cat(bk["rcdwr_ok"] for bk in banks)
        rp_ok = Cat(bk["rp_ok"] for bk in banks)
        ras_ok = Cat(bk["ras_ok"] for bk in banks)
        wr_ok = Cat(bk["wr_ok"] for bk in banks)
        rtp_ok = Cat(bk["rtp_ok"] for bk in banks)
        af_row_ok = Cat(bk["open_row"] >= p.data_rows for bk in banks)
        all_banks = (1 << nb) - 1

        def sel(vec):      # the addressed bank's bit
            return vec.bit_select(bank, 1) if nb > 1 else vec[0]

        # PIM row buffer (two row buffers only) ----------------------------
        # Every PIM-buffer command is all-bank, so the channel keeps one state for every bank's PIM buffer.
        dual = p.row_buffers == 2
        execute = Signal()
        pim_rd = op.as_value().matches(PimOp.MACSB, PimOp.MACAB, PimOp.AF)
        # 4-bit weights: LDSCAB / LDSLAB (opcodes outside PimOp, hw/pim/commands.py), all-bank reads.
        lp = p.lowprec
        lp_ops = [LOWPREC_OPCODES["LDSCAB"]] + ([LOWPREC_OPCODES["LDSLAB"]] if p.grid_choice else [])
        is_lds = op.as_value().matches(*lp_ops) if lp else Const(0, 1)
        if lp:
            pim_rd = pim_rd | is_lds
        if dual:
            p_open, p_row, p_rcd_ok, p_ras_ok, p_rp_ok, p_rtp_ok = pim_row_buffer(
                m, t, execute & (op == PimOp.PACTAB), execute & (op == PimOp.PPREAB), execute & pim_rd, bus.row)
            # One row is never open in both buffers of a bank.
            pim_holds = p_open & (p_row == bus.row)
            normal_holds = Cat(bk["is_open"] & (bk["open_row"] == bus.row) for bk in banks).any()
        else:
            p_open = pim_holds = Const(0, 1)
            p_row = Const(0, max(p.row_addr_bits, 1))
            normal_holds = p_rcd_ok = p_ras_ok = p_rp_ok = p_rtp_ok = None     # (read only with two buffers)

        # Channel-wide timing --------------------------------------------
        col_cmd = Signal()
        act_ops = (PimOp.ACT, PimOp.ACTAB) + ((PimOp.PACTAB,) if dual else ())
        is_act = op.as_value().matches(*act_ops)
        m.d.comb += col_cmd.eq(op.as_value().matches(*COLUMN_OPS) | is_lds if lp else
                               op.as_value().matches(*COLUMN_OPS))
        is_mac = op.as_value().matches(PimOp.MACSB, PimOp.MACAB)
        ccd_ok = countdown(m, "ccd", t.tCCD, execute & col_cmd)
        rrd_ok = countdown(m, "rrd", t.tRRD, execute & is_act)
        rfc_ok = countdown(m, "rfc", t.tRFC, execute & (op == PimOp.REF))
        if p.acc_slots == 2:
            # PU_BUSY per accumulator slot (row bit 4): tMAC after the last MAC into the same slot; AF uses slot 0.
            slot = bus.row[4]
            mac_ok0 = countdown(m, "mac0", t.tMAC, execute & is_mac & ~slot)
            mac_ok1 = countdown(m, "mac1", t.tMAC, execute & is_mac & slot)
            mac_ok = Mux(slot, mac_ok1, mac_ok0)
            af_mac_ok = mac_ok0
        else:
            mac_ok = countdown(m, "mac", t.tMAC, execute & is_mac)
            af_mac_ok = mac_ok
        af_ok = countdown(m, "afl", t.tAF, execute & (op == PimOp.AF))
        faw_ok = faw_window(m, t.tFAW, execute & is_act, count_name="count")
        bpw = p.banks_per_word
        if p.pipelined:
            # Interleaved partial sums (hw/pim/bank.py): tMAC after a combining MAC the units are busy for
            # MACs too, and a bank whose last MAC since its preload was not a combining MAC holds uncombined
            # partials (``uncombined``, one bit per bank), which RDMAC and AF must not read.
            combining = bus.row[COMBINE_ROW_BIT]
            cmb_ok = countdown(m, "cmb", t.tMAC, execute & is_mac & combining)
            uncombined = Signal(nb, name="uncombined")
            with m.If(execute):
                with m.Switch(op):
                    with m.Case(PimOp.MACAB):
                        m.d.sync += uncombined.eq(Mux(combining, 0, all_banks))
                    with m.Case(PimOp.MACSB):
                        m.d.sync += uncombined.bit_select(bank, 1).eq(~combining)
                    with m.Case(PimOp.WRBIAS):
                        with m.Switch(col):
                            for g in range(p.acc_groups):
                                with m.Case(g):
                                    m.d.sync += uncombined[g * bpw:min(nb, (g + 1) * bpw)].eq(0)
            group_uncombined = Signal(name="group_uncombined")
            with m.Switch(col):
                for g in range(p.acc_groups):
                    with m.Case(g):
                        m.d.comb += group_uncombined.eq(uncombined[g * bpw:min(nb, (g + 1) * bpw)].any())
            mac_rules = [(~cmb_ok, ViolationCode.PU_BUSY)]
            af_rules = [(uncombined != 0, ViolationCode.PU_BUSY)]
            rdmac_rules = [(group_uncombined, ViolationCode.PU_BUSY)]
        else:
            mac_rules = af_rules = rdmac_rules = []
        s.update(af_mac_ok=af_mac_ok, af_ok=af_ok, af_row_ok=af_row_ok, af_rules=af_rules,
                 all_banks=all_banks, bpw=bpw, ccd_ok=ccd_ok, dual=dual, execute=execute, faw_ok=faw_ok,
                 is_act=is_act, is_lds=is_lds, is_mac=is_mac, is_open=is_open, lp=lp, mac_ok=mac_ok,
                 mac_rules=mac_rules, normal_holds=normal_holds, p_open=p_open, p_ras_ok=p_ras_ok,
                 p_rcd_ok=p_rcd_ok, p_row=p_row, p_rp_ok=p_rp_ok, p_rtp_ok=p_rtp_ok, pim_holds=pim_holds,
                 ras_ok=ras_ok, rcdrd_ok=rcdrd_ok, rcdwr_ok=rcdwr_ok, rdmac_rules=rdmac_rules, rfc_ok=rfc_ok,
                 rp_ok=rp_ok, rrd_ok=rrd_ok, rtp_ok=rtp_ok, sel=sel, wr_ok=wr_ok)

    def _violation(self, m, s):
        """The first rule the command on the bus breaks (``ViolationCode.NONE``: none)."""
        (dual, lp, op, is_lds, sel, is_open, pim_holds, rp_ok, rfc_ok, rrd_ok, faw_ok, all_banks, ras_ok,
         wr_ok, rtp_ok, rcdrd_ok, ccd_ok, rcdwr_ok, p_open, p_rcd_ok, mac_rules, p_row, p, af_rules,
         af_mac_ok, normal_holds, p_rp_ok, p_ras_ok, p_rtp_ok, af_row_ok, col, rdmac_rules, mac_ok, af_ok) = attrgetter(
            'dual', 'lp', 'op', 'is_lds', 'sel', 'is_open', 'pim_holds', 'rp_ok', 'rfc_ok', 'rrd_ok',
            'faw_ok', 'all_banks', 'ras_ok', 'wr_ok', 'rtp_ok', 'rcdrd_ok', 'ccd_ok', 'rcdwr_ok', 'p_open',
            'p_rcd_ok', 'mac_rules', 'p_row', 'p', 'af_rules', 'af_mac_ok', 'normal_holds', 'p_rp_ok',
            'p_ras_ok', 'p_rtp_ok', 'af_row_ok', 'col', 'rdmac_rules', 'mac_ok', 'af_ok')(s)
        # Violation decision (first failing rule) -------------------------
        code = Signal(ViolationCode)
        legal_ops = [c for c in PimOp if dual or c.name not in DUAL_ONLY]
        with m.If(~(op.as_value().matches(*legal_ops) | is_lds) if lp else ~op.as_value().matches(*legal_ops)):
            m.d.comb += code.eq(ViolationCode.ILLEGAL_OPCODE)
        with m.Else():
            with m.Switch(op):
                with m.Case(PimOp.ACT):
                    self._first(m, code, [
                        (sel(is_open) | pim_holds, ViolationCode.BANK_OPEN), (~sel(rp_ok), ViolationCode.T_RP),
                        (~rfc_ok, ViolationCode.T_RFC), (~rrd_ok, ViolationCode.T_RRD),
                        (~faw_ok, ViolationCode.T_FAW)])
                with m.Case(PimOp.ACTAB):
                    self._first(m, code, [
                        ((is_open != 0) | pim_holds, ViolationCode.BANK_OPEN),
                        (rp_ok != all_banks, ViolationCode.T_RP),
                        (~rfc_ok, ViolationCode.T_RFC), (~rrd_ok, ViolationCode.T_RRD),
                        (~faw_ok, ViolationCode.T_FAW)])
                with m.Case(PimOp.PRE):
                    self._first(m, code, [
                        (sel(is_open) & ~sel(ras_ok), ViolationCode.T_RAS),
                        (sel(is_open) & ~sel(wr_ok), ViolationCode.T_WR),
                        (sel(is_open) & ~sel(rtp_ok), ViolationCode.T_RTP)])
                with m.Case(PimOp.PREAB):
                    self._first(m, code, [
                        ((is_open & ~ras_ok) != 0, ViolationCode.T_RAS),
                        ((is_open & ~wr_ok) != 0, ViolationCode.T_WR),
                        ((is_open & ~rtp_ok) != 0, ViolationCode.T_RTP)])
                with m.Case(PimOp.RD):
                    self._first(m, code, [
                        (~sel(is_open), ViolationCode.BANK_CLOSED), (~sel(rcdrd_ok), ViolationCode.T_RCD),
                        (~ccd_ok, ViolationCode.T_CCD)])
                with m.Case(PimOp.WR):
                    self._first(m, code, [
                        (~sel(is_open), ViolationCode.BANK_CLOSED), (~sel(rcdwr_ok), ViolationCode.T_RCD),
                        (~ccd_ok, ViolationCode.T_CCD)])
                if dual:
                    with m.Case(PimOp.MACSB, PimOp.MACAB):
                        self._first(m, code, [
                            (~p_open, ViolationCode.BANK_CLOSED), (~p_rcd_ok, ViolationCode.T_RCD), *mac_rules,
                            (~ccd_ok, ViolationCode.T_CCD)])
                    with m.Case(PimOp.AF):
                        self._first(m, code, [
                            (~p_open, ViolationCode.BANK_CLOSED),
                            (p_row < p.data_rows, ViolationCode.BAD_ADDRESS), *af_rules,
                            (~p_rcd_ok, ViolationCode.T_RCD), (~af_mac_ok, ViolationCode.PU_BUSY),
                            (~ccd_ok, ViolationCode.T_CCD)])
                    with m.Case(PimOp.PACTAB):
                        self._first(m, code, [
                            (p_open | normal_holds, ViolationCode.BANK_OPEN), (~p_rp_ok, ViolationCode.T_RP),
                            (~rfc_ok, ViolationCode.T_RFC), (~rrd_ok, ViolationCode.T_RRD),
                            (~faw_ok, ViolationCode.T_FAW)])
                    with m.Case(PimOp.PPREAB):
                        self._first(m, code, [
                            (p_open & ~p_ras_ok, ViolationCode.T_RAS), (p_open & ~p_rtp_ok, ViolationCode.T_RTP)])
                else:
                    with m.Case(PimOp.MACSB):
                        self._first(m, code, [
                            (~sel(is_open), ViolationCode.BANK_CLOSED), (~sel(rcdrd_ok), ViolationCode.T_RCD),
                            *mac_rules, (~ccd_ok, ViolationCode.T_CCD)])
                    with m.Case(PimOp.MACAB):
                        self._first(m, code, [
                            (is_open != all_banks, ViolationCode.BANK_CLOSED),
                            (rcdrd_ok != all_banks, ViolationCode.T_RCD), *mac_rules, (~ccd_ok, ViolationCode.T_CCD)])
                    with m.Case(PimOp.AF):
                        self._first(m, code, [
                            (is_open != all_banks, ViolationCode.BANK_CLOSED),
                            (af_row_ok != all_banks, ViolationCode.BAD_ADDRESS), *af_rules,
                            (rcdrd_ok != all_banks, ViolationCode.T_RCD), (~af_mac_ok, ViolationCode.PU_BUSY),
                            (~ccd_ok, ViolationCode.T_CCD)])
                with m.Case(PimOp.REF):
                    self._first(m, code, [
                        ((is_open != 0) | p_open, ViolationCode.BANK_OPEN),
                        ((rp_ok != all_banks) | (~p_rp_ok if dual else Const(0, 1)), ViolationCode.T_RP),
                        (~rfc_ok, ViolationCode.T_RFC)])
                with m.Case(PimOp.WRGB):
                    self._first(m, code, [
                        (col >= p.gb_columns, ViolationCode.BAD_ADDRESS), (~ccd_ok, ViolationCode.T_CCD)])
                # (One case for both unless RDMAC has the pipelined unit's extra rule: the Verilog of the
                # other configurations stays as it was.)
                for ops, extra in (((PimOp.WRBIAS,), []), ((PimOp.RDMAC,), rdmac_rules)) if rdmac_rules else \
                        (((PimOp.WRBIAS, PimOp.RDMAC), []),):
                    with m.Case(*ops):
                        self._first(m, code, [
                            (col >= p.acc_groups, ViolationCode.BAD_ADDRESS), *extra,
                            (~mac_ok, ViolationCode.PU_BUSY), (~ccd_ok, ViolationCode.T_CCD)])
                with m.Case(PimOp.RDAF):
                    self._first(m, code, [
                        (col >= p.acc_groups, ViolationCode.BAD_ADDRESS), (~af_ok, ViolationCode.PU_BUSY),
                        (~ccd_ok, ViolationCode.T_CCD)])
            if lp:
                with m.If(is_lds):
                    if dual:
                        self._first(m, code, [
                            (~p_open, ViolationCode.BANK_CLOSED), (~p_rcd_ok, ViolationCode.T_RCD),
                            (~ccd_ok, ViolationCode.T_CCD)])
                    else:
                        self._first(m, code, [
                            (is_open != all_banks, ViolationCode.BANK_CLOSED),
                            (rcdrd_ok != all_banks, ViolationCode.T_RCD), (~ccd_ok, ViolationCode.T_CCD)])
        s.update(code=code)

    def _record(self, m, s):
        """The refresh credit and the sticky violation record."""
        t, execute, op, st, code = attrgetter('t', 'execute', 'op', 'st', 'code')(s)
        # Refresh credit --------------------------------------------------
        owed = refresh_credit(m, t.tREFI, t.refresh_postpone, execute & (op == PimOp.REF))
        late = owed > t.refresh_postpone
        m.d.comb += st.owed.eq(Mux(owed < 0, 0, owed))

        # Sticky violation record -----------------------------------------
        cycle = Signal(32)
        m.d.sync += cycle.eq(cycle + 1)
        m.d.comb += st.cycle.eq(cycle)
        bad = (op != PimOp.NOP) & (code != ViolationCode.NONE)
        with m.If(st.clear):
            m.d.sync += [st.violation.eq(0), st.nviol.eq(0)]
        with m.Elif(bad | late):
            with m.If(~st.violation):
                m.d.sync += [st.violation.eq(1), st.vcode.eq(Mux(bad, code, ViolationCode.REFRESH_LATE)),
                             st.vop.eq(Mux(bad, op, PimOp.NOP)), st.vcycle.eq(cycle)]
            with m.If(bad & (st.nviol != 0xFFFF)):
                m.d.sync += st.nviol.eq(st.nviol + 1)

    def _global_buffer(self, m, s):
        """The global buffer: WRGB writes it, the banks' MACs read it."""
        lp, p, execute, op, col, bus = attrgetter('lp', 'p', 'execute', 'op', 'col', 'bus')(s)
        # Global buffer ---------------------------------------------------
        if lp:
            gb_data = self._wide_gb(m, p, execute & (op == PimOp.WRGB), col, bus.data)
        else:
            m.submodules.gb = gb = Memory(shape=p.column_bits, depth=p.gb_columns, init=[])
            gb_w = gb.write_port()
            gb_r = gb.read_port()
            gb_bits = (p.gb_columns - 1).bit_length()
            m.d.comb += [
                gb_w.en.eq(execute & (op == PimOp.WRGB)),
                gb_w.addr.eq(col[:gb_bits] if gb_bits else 0),
                gb_w.data.eq(bus.data),
                gb_r.addr.eq(col[:gb_bits] if gb_bits else 0),
            ]
            gb_data = gb_r.data
        s.update(gb_data=gb_data)

    def _bank_strobes(self, m, s):
        """Each bank's command strobes and operands."""
        (banks, bank, execute, op, bus, col, gb_data, p_row, bpw, lp, p) = attrgetter(
            'banks', 'bank', 'execute', 'op', 'bus', 'col', 'gb_data', 'p_row', 'bpw', 'lp', 'p')(s)
        # Bank strobes -------------------------------------------------------
        for b, bk in enumerate(banks):
            here = bank == b
            m.d.comb += [
                bk["chan_id"].eq(self.chan_id), bk["bank_id"].eq(b), bk["bd_load"].eq(self.bd_load),
                bk["do_act"].eq(execute & (((op == PimOp.ACT) & here) | (op == PimOp.ACTAB))),
                bk["do_pre"].eq(execute & bk["is_open"] & (((op == PimOp.PRE) & here) | (op == PimOp.PREAB))),
                bk["do_rd"].eq(execute & (op == PimOp.RD) & here),
                bk["do_wr"].eq(execute & (op == PimOp.WR) & here),
                bk["do_mac"].eq(execute & (((op == PimOp.MACSB) & here) | (op == PimOp.MACAB))),
                bk["do_af"].eq(execute & (op == PimOp.AF)),
                bk["row"].eq(bus.row), bk["col"].eq(col), bk["wdata"].eq(bus.data), bk["wmask"].eq(bus.mask),
                bk["gb_data"].eq(gb_data), bk["pim_row"].eq(p_row),
                bk["bias_load"].eq(execute & (op == PimOp.WRBIAS) & (col == b // bpw)),
                bk["bias_value"].eq(bus.data[32 * (b % bpw):32 * (b % bpw + 1)]),
            ]
            if lp:
                m.d.comb += [bk["do_lds"].eq(execute & (op.as_value() == LOWPREC_OPCODES["LDSCAB"])),
                             bk["do_ldsel"].eq(execute & (op.as_value() == LOWPREC_OPCODES["LDSLAB"])
                                               if p.grid_choice else 0)]

    def _read_return(self, m, s):
        """Read data: sampled one cycle after the command, delivered at tRL."""
        (p, execute, op, bank, col, bus, banks, bpw, nb, t) = attrgetter(
            'p', 'execute', 'op', 'bank', 'col', 'bus', 'banks', 'bpw', 'nb', 't')(s)
        # Read return: sample one cycle after the command, deliver at tRL --------
        r_valid = Signal()
        r_kind = Signal(PimOp)
        r_bank = Signal(max(p.bank_addr_bits, 1))
        r_col = Signal(p.column_addr_bits)
        returns = execute & op.as_value().matches(*READ_OPS)
        m.d.sync += [r_valid.eq(returns), r_kind.eq(op), r_bank.eq(bank), r_col.eq(col)]
        if p.acc_slots == 2:
            r_slot = Signal(name="r_slot")
            m.d.sync += r_slot.eq(bus.row[4])
        r_data = Signal(p.column_bits)
        with m.Switch(r_kind):
            with m.Case(PimOp.RD):
                with m.Switch(r_bank):
                    for b, bk in enumerate(banks):
                        with m.Case(b):
                            m.d.comb += r_data.eq(bk["rdata"])
            for kind, src in ((PimOp.RDMAC, "acc"), (PimOp.RDAF, "af_out")):
                with m.Case(kind):
                    with m.Switch(r_col):
                        for g in range(p.acc_groups):
                            with m.Case(g):
                                group = [banks[b][src] if src == "af_out" or p.acc_slots == 1 else
                                         Mux(r_slot, banks[b]["acc1"], banks[b]["acc"])
                                         for b in range(g * bpw, min(nb, (g + 1) * bpw))]
                                m.d.comb += r_data.eq(Cat(*group))
        valid, data = delay_pipe(m, r_valid, r_data, t.tRL - 1, "rl")
        m.d.comb += [bus.rvalid.eq(valid), bus.rdata.eq(data)]

    def _counters(self, m, s):
        """The event counters (commands executed)."""
        (op, nb, is_act, banks, sel, is_open, p_open, is_mac, st, execute) = attrgetter(
            'op', 'nb', 'is_act', 'banks', 'sel', 'is_open', 'p_open', 'is_mac', 'st', 'execute')(s)
        events = {
            "n_act": Mux(op.as_value().matches(PimOp.ACTAB, PimOp.PACTAB), nb, 1) * is_act,
            "n_pre": Mux(op == PimOp.PREAB, sum(bk["is_open"] for bk in banks), sel(is_open)) *
            op.as_value().matches(PimOp.PRE, PimOp.PREAB) + Mux(op == PimOp.PPREAB, nb, 0) * p_open,
            "n_rd": op == PimOp.RD, "n_wr": op == PimOp.WR, "n_ref": op == PimOp.REF,
            "n_wrgb": op == PimOp.WRGB,
            "n_mac": Mux(op == PimOp.MACAB, nb, 1) * is_mac,
            "n_rdmac": op == PimOp.RDMAC, "n_af": op == PimOp.AF, "n_cmd": Const(1, 1),
        }
        for name in STATUS_COUNTERS:
            counter = getattr(st, name)
            with m.If(execute):
                m.d.sync += counter.eq(counter + events[name])
        return m

    @staticmethod
    def _wide_gb(m, p, we, col, wdata):
        """4-bit weights: the global buffer as ``act_ratio`` memories of ``gb_slots`` columns. WRGB of column
        ``col`` writes memory ``col mod act_ratio`` at ``col // act_ratio`` (256 bits); a MAC of column ``col``
        reads slot ``col mod gb_slots`` of every memory: one MAC's 64 activations, one cycle later."""
        r = p.act_ratio
        rb = (r - 1).bit_length()
        sb = (p.gb_slots - 1).bit_length()
        words = []
        for i in range(r):
            mem = m.submodules[f"gb{i}"] = Memory(shape=p.column_bits, depth=p.gb_slots, init=[])
            w, rd = mem.write_port(), mem.read_port()
            m.d.comb += [
                w.en.eq(we & (col[:rb] == i)),
                w.addr.eq(col[rb:rb + sb] if sb else 0),
                w.data.eq(wdata),
                rd.addr.eq(col[:sb] if sb else 0),
            ]
            words.append(rd.data)
        return Cat(*words)

    @staticmethod
    def _first(m, code, rules):
        """Set ``code`` to the first rule whose condition holds."""
        with m.If(rules[0][0]):
            m.d.comb += code.eq(rules[0][1])
        for cond, value in rules[1:]:
            with m.Elif(cond):
                m.d.comb += code.eq(value)


def _width(cfg, name):
    p = cfg.pim
    return {
        "chan_id": 8, "bank_id": 8, "row": p.row_addr_bits, "col": p.column_addr_bits,
        "wdata": p.column_bits, "wmask": p.column_bytes, "gb_data": p.column_bits * p.act_ratio, "bias_value": 32,
        "pim_row": p.row_addr_bits,
        "open_row": p.row_addr_bits, "rdata": p.column_bits, "acc": 32, "af_out": 32, "acc1": 32,
    }.get(name, 1)


class PimDevice(wiring.Component):
    """The PIM memory: ``channels`` independent :class:`PimChannel` s.

    Members
    -------
    c : In(PimBusSignature).array(channels)      command bus of each channel (``c[i]``; ``c__<i>__op``)
    s : Out(PimStatusSignature).array(channels)  status of each channel
    bd_load : In(1)                              back door for every bank of every channel
    """

    def __init__(self, cfg: SystemConfig, channel_module: str | None = None, bank_module: str | None = None):
        if not isinstance(cfg, SystemConfig):
            raise TypeError(f"Configuration must be a SystemConfig, not {cfg!r}")
        self.cfg = cfg
        self.channel_module = channel_module
        self.bank_module = bank_module
        super().__init__({"c": In(PimBusSignature(cfg)).array(cfg.pim.channels),
                          "s": Out(PimStatusSignature()).array(cfg.pim.channels), "bd_load": In(1)})

    def elaborate(self, platform):
        m = Module()
        for c in range(self.cfg.pim.channels):
            bus, st = self.c[c], self.s[c]
            if self.channel_module is None:
                ch = m.submodules[f"ch{c}"] = PimChannel(self.cfg, self.bank_module)
                wiring.connect(m, wiring.flipped(bus), ch.bus)
                wiring.connect(m, ch.status, wiring.flipped(st))
                m.d.comb += [ch.chan_id.eq(c), ch.bd_load.eq(self.bd_load)]
            else:
                kwargs = {"i_clk": ClockSignal(), "i_rst": ResetSignal(), "i_chan_id": Const(c, 8),
                          "i_bd_load": self.bd_load}
                for path, member, value in bus.signature.flatten(bus):
                    name = "bus__" + "__".join(str(x) for x in path)
                    kwargs[("i_" if member.flow == In else "o_") + name] = value
                for path, member, value in st.signature.flatten(st):
                    name = "status__" + "__".join(str(x) for x in path)
                    kwargs[("o_" if member.flow == Out else "i_") + name] = value
                m.submodules[f"ch{c}"] = Instance(self.channel_module, **kwargs)
        return m
