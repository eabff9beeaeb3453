"""Independent DRAM protocol checker for a PIM channel's command bus.

Written from the timing table (:class:`hw.config.DramTiming` and the rules in
``hw/pim/commands.py``'s docstring), not from the RTL: it keeps, per bank, the
cycle of the last ACT, PRE, WR and read-type column command and, per channel,
the last column command, the recent ACTs, the last REF and refresh credit.

With two row buffers per bank (``PimGeometry.row_buffers = 2``, NeuPIMs) the
checker keeps a second state for the PIM buffer (open, row, last PACTAB,
PPREAB and PIM read) and applies the rules between the buffers listed in
``hw/pim/commands.py``: no row open in both buffers of a bank, activations of
both buffers in one tRRD/tFAW window, one tCCD for every column command, REF
with both buffers closed.

With 4-bit weights (``PimGeometry.weight_format`` ``int4`` / ``fp4``) LDSCAB (and, for ``fp4`` with
grid choice, LDSLAB) are legal: all-bank read-type column commands on the open (PIM) row, like MACAB.
With ``acc_slots = 2`` the PU_BUSY rule is per accumulator slot (``row`` bit 4 of MAC, WRBIAS and RDMAC;
AF uses slot 0): tMAC after the last MAC into the same slot.

With a pipelined processing unit (``PimGeometry.acc_stages > 1``, issue 15) a MACSB / MACAB with ``row``
bit 0 set is a combining MAC (``hw/pim/commands.py``): PU_BUSY also covers a MAC within tMAC of a combining
MAC, and RDMAC of a group with a bank (AF: any bank) whose last MAC since its preload (WRBIAS) was not a
combining MAC (its partial sums are not combined).

``check(cycle, op, bank, row, col)`` returns the name of the first rule the
command breaks (the same names and priority as the RTL's violation codes) or
``None``, and updates the state only for legal commands (the device does not
execute illegal ones). ``earliest(op, bank, ...)`` returns the first cycle at
which the command's timing rules are met; the test sequencer uses it to place
commands, so sequencer, checker and RTL cross-check one another.

:class:`BusMonitor` samples a channel's bus in cocotb every cycle and feeds
the checker; a test fails if any violation was recorded.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from hw.config import SystemConfig
from sim.tb.common import port

NEVER = -(10**12)

COL_OPS = {"RD", "WR", "WRGB", "MACSB", "MACAB", "WRBIAS", "RDMAC", "AF", "RDAF", "LDSCAB", "LDSLAB"}
READ_TYPE = {"RD", "MACSB", "MACAB", "AF", "LDSCAB", "LDSLAB"}
PIM_READS = {"MACSB", "MACAB", "AF", "LDSCAB", "LDSLAB"}        # with two row buffers: read the PIM buffer
ALL_BANK_READS = {"MACAB", "AF", "LDSCAB", "LDSLAB"}
ACTS = {"ACT", "ACTAB", "PACTAB"}
OPCODES = {"NOP": 0, "ACT": 1, "ACTAB": 2, "PRE": 3, "PREAB": 4, "RD": 5, "WR": 6, "REF": 7, "WRGB": 8,
           "MACSB": 9, "MACAB": 10, "WRBIAS": 11, "RDMAC": 12, "AF": 13, "RDAF": 14,
           "PACTAB": 15, "PPREAB": 16, "LDSCAB": 17, "LDSLAB": 18}
DUAL_ONLY = {"PACTAB", "PPREAB"}
OPNAMES = {v: k for k, v in OPCODES.items()}


@dataclass
class _Bank:
    open: bool = False
    row: int = 0
    act: int = NEVER
    pre: int = NEVER
    wr: int = NEVER
    rd: int = NEVER


@dataclass
class ProtocolChecker:
    cfg: SystemConfig
    channel: int = 0
    violations: list = field(default_factory=list)

    def __post_init__(self):
        p = self.cfg.pim
        self.banks = [_Bank() for _ in range(p.banks)]
        self.dual = p.row_buffers == 2
        self.pim = _Bank()          # the PIM row buffer of every bank (all its commands are all-bank)
        self.last_col = NEVER
        self.acts = deque(maxlen=4)
        self.last_ref = NEVER
        self.slots = p.acc_slots
        self.last_mac = [NEVER, NEVER]          # per accumulator slot
        self.last_af = NEVER
        self.pipelined = p.acc_stages > 1
        self.last_combine = NEVER                       # the last combining MAC (pipelined units)
        self.uncombined = [False] * p.banks             # per bank: MACs since the preload / last combine
        self.refs = 0
        self.late_reported = False
        self.counts = {name: 0 for name in OPCODES}

    # -- rules ---------------------------------------------------------------
    def _slot(self, row):
        return (row >> 4) & 1 if self.slots == 2 else 0

    def _timing_rules(self, op, bank, row=0):
        """(violation name, earliest legal cycle) for the timing rules of ``op``, in priority order."""
        t = self.cfg.timing
        banks = self.banks
        rules = []
        pim = self.pim
        if self.dual and op == "PACTAB":
            rules.append(("T_RP", pim.pre + t.tRP))
            rules.append(("T_RFC", self.last_ref + t.tRFC))
            rules.append(("T_RRD", (self.acts[-1] if self.acts else NEVER) + t.tRRD))
            rules.append(("T_FAW", (self.acts[0] + t.tFAW) if len(self.acts) == 4 else NEVER))
        elif self.dual and op == "PPREAB":
            if pim.open:
                rules.append(("T_RAS", pim.act + t.tRAS))
                rules.append(("T_RTP", pim.rd + t.tRTP))
        elif op in ("ACT", "ACTAB"):
            targets = banks if op == "ACTAB" else [banks[bank]]
            rules.append(("T_RP", max(b.pre for b in targets) + t.tRP))
            rules.append(("T_RFC", self.last_ref + t.tRFC))
            rules.append(("T_RRD", (self.acts[-1] if self.acts else NEVER) + t.tRRD))
            rules.append(("T_FAW", (self.acts[0] + t.tFAW) if len(self.acts) == 4 else NEVER))
        elif op in ("PRE", "PREAB"):
            targets = [b for b in (banks if op == "PREAB" else [banks[bank]]) if b.open]
            rules.append(("T_RAS", max((b.act for b in targets), default=NEVER) + t.tRAS))
            rules.append(("T_WR", max((b.wr for b in targets), default=NEVER) + t.tWR))
            rules.append(("T_RTP", max((b.rd for b in targets), default=NEVER) + t.tRTP))
        elif op == "REF":
            rules.append(("T_RP", max([b.pre for b in banks] + [pim.pre]) + t.tRP))
            rules.append(("T_RFC", self.last_ref + t.tRFC))
        if self.dual and op in PIM_READS:
            rules.append(("T_RCD", pim.act + t.tRCDRD))
        elif op in ("RD", "MACSB", "WR") or op in ALL_BANK_READS:
            targets = banks if op in ALL_BANK_READS else [banks[bank]]
            trcd = t.tRCDWR if op == "WR" else t.tRCDRD
            rules.append(("T_RCD", max(b.act for b in targets) + trcd))
        if self.pipelined and op in ("MACSB", "MACAB"):
            rules.append(("PU_BUSY", self.last_combine + t.tMAC))
        if op in ("WRBIAS", "RDMAC", "AF"):
            rules.append(("PU_BUSY", self.last_mac[0 if op == "AF" else self._slot(row)] + t.tMAC))
        if op == "RDAF":
            rules.append(("PU_BUSY", self.last_af + t.tAF))
        if op in COL_OPS:
            rules.append(("T_CCD", self.last_col + t.tCCD))
        return rules

    def _state_violation(self, op, bank, col, row=0):
        p = self.cfg.pim
        banks = self.banks
        pim = self.pim
        if op not in OPCODES or (op in DUAL_ONLY and not self.dual):
            return "ILLEGAL_OPCODE"
        if (op == "LDSCAB" and not p.lowprec) or (op == "LDSLAB" and not p.grid_choice):
            return "ILLEGAL_OPCODE"
        pim_holds = pim.open and pim.row == row
        if op == "ACT" and (banks[bank].open or pim_holds):
            return "BANK_OPEN"
        if op == "ACTAB" and (any(b.open for b in banks) or pim_holds):
            return "BANK_OPEN"
        if op == "REF" and (any(b.open for b in banks) or pim.open):
            return "BANK_OPEN"
        if op == "PACTAB" and (pim.open or any(b.open and b.row == row for b in banks)):
            return "BANK_OPEN"
        if self.dual and op in PIM_READS:
            if not pim.open:
                return "BANK_CLOSED"
            if op == "AF" and pim.row < p.data_rows:
                return "BAD_ADDRESS"
            return self._uncombined_violation(op, col)
        if op in ("RD", "WR", "MACSB") and not banks[bank].open:
            return "BANK_CLOSED"
        if op in ALL_BANK_READS and not all(b.open for b in banks):
            return "BANK_CLOSED"
        if op == "AF" and any(b.row < p.data_rows for b in banks):
            return "BAD_ADDRESS"
        if op == "WRGB" and col >= p.gb_columns:
            return "BAD_ADDRESS"
        if op in ("WRBIAS", "RDMAC", "RDAF") and col >= p.acc_groups:
            return "BAD_ADDRESS"
        return self._uncombined_violation(op, col)

    def _uncombined_violation(self, op, col):
        """Pipelined units: RDMAC / AF must not read a bank whose partial sums are not combined."""
        if not self.pipelined:
            return None
        bpw = self.cfg.pim.banks_per_word
        if op == "RDMAC" and any(self.uncombined[col * bpw:(col + 1) * bpw]):
            return "PU_BUSY"
        if op == "AF" and any(self.uncombined):
            return "PU_BUSY"
        return None


    def earliest(self, op, bank=0, row=0):
        """First cycle at which ``op`` meets its timing rules (state rules not considered)."""
        return max((c for _, c in self._timing_rules(op, bank, row)), default=NEVER)

    def violation(self, cycle, op, bank=0, row=0, col=0):
        """The first rule ``op`` breaks at ``cycle`` (or ``None``), without changing state."""
        if op == "NOP":
            return None
        state = self._state_violation(op, bank, col, row)
        timing = next((name for name, c in self._timing_rules(op, bank, row) if cycle < c), None) \
            if op in OPCODES and not state else None
        return state or timing     # state rules come first, as in the RTL's priority

    def check(self, cycle, op, bank=0, row=0, col=0):
        """Check a command seen on the bus at ``cycle``; record and return its violation, if any."""
        if isinstance(op, int):
            op = OPNAMES.get(op, f"OP{op}")
        owed = cycle // self.cfg.timing.tREFI - self.refs
        if owed > self.cfg.timing.refresh_postpone and not self.late_reported:
            self.late_reported = True
            self.violations.append((cycle, "REFRESH_LATE", "-", self.channel))
        v = self.violation(cycle, op, bank, row, col)
        if v is not None:
            self.violations.append((cycle, v, op, self.channel))
            return v
        if op != "NOP":
            self._apply(cycle, op, bank, row, col)
        return None

    def _apply(self, cycle, op, bank, row, col=0):
        self.counts[op] += 1
        banks = self.banks
        pim = self.pim
        if op == "PACTAB":
            pim.open, pim.row, pim.act = True, row, cycle
            self.acts.append(cycle)
        elif op == "PPREAB":
            if pim.open:
                pim.open, pim.pre = False, cycle
        elif op in ("ACT", "ACTAB"):
            for b in (banks if op == "ACTAB" else [banks[bank]]):
                b.open, b.row, b.act = True, row, cycle
            self.acts.append(cycle)
        elif op in ("PRE", "PREAB"):
            for b in (banks if op == "PREAB" else [banks[bank]]):
                if b.open:
                    b.open, b.pre = False, cycle
        elif op == "REF":
            self.last_ref = cycle
            self.refs += 1
        if op in COL_OPS:
            self.last_col = cycle
        if self.dual and op in PIM_READS:
            pim.rd = cycle
        elif op in READ_TYPE:
            for b in (banks if op in ALL_BANK_READS else [banks[bank]]):
                b.rd = cycle
        if op == "WR":
            banks[bank].wr = cycle
        if op in ("MACSB", "MACAB"):
            self.last_mac[self._slot(row)] = cycle
            if self.pipelined:
                combining = bool(row & 1)
                if combining:
                    self.last_combine = cycle
                for b in (range(len(banks)) if op == "MACAB" else [bank]):
                    self.uncombined[b] = not combining
        if self.pipelined and op == "WRBIAS":
            bpw = self.cfg.pim.banks_per_word
            for b in range(col * bpw, min(len(banks), (col + 1) * bpw)):
                self.uncombined[b] = False
        if op == "AF":
            self.last_af = cycle

    def owed(self, cycle) -> int:
        return cycle // self.cfg.timing.tREFI - self.refs


class BusMonitor:
    """cocotb monitor: feeds a :class:`ProtocolChecker` per channel from the bus copies ``mon__<c>__*``
    of a top (what the device sees), every cycle, and checks the device's sticky violation flags.

    Start :meth:`run` with ``cocotb.start_soon`` right after reset, at a falling edge.
    """

    def __init__(self, dut, cfg: SystemConfig):
        self.dut = dut
        C = cfg.pim.channels
        self.mon = [{n: port(dut, "mon", c, n) for n in ("op", "bank", "row", "col")} for c in range(C)]
        self.viol = [port(dut, "s", c, "violation") for c in range(C)]
        self.vcode = [port(dut, "s", c, "vcode") for c in range(C)]
        self.nref = [port(dut, "s", c, "n_ref") for c in range(C)]
        self.checkers = [ProtocolChecker(cfg, channel=c) for c in range(C)]
        # The checker's cycle numbering follows the device's reset-relative cycle counter.
        self.cycle = int(port(dut, "s", 0, "cycle").value)

    async def run(self):
        from cocotb.triggers import FallingEdge

        while True:
            for c, mon in enumerate(self.mon):
                op = int(mon["op"].value)
                if op:
                    self.checkers[c].check(self.cycle, op, int(mon["bank"].value), int(mon["row"].value),
                                           int(mon["col"].value))
                else:
                    self.checkers[c].check(self.cycle, "NOP")
            await FallingEdge(self.dut.clk)
            self.cycle += 1

    def assert_clean(self):
        errors = []
        for c, ck in enumerate(self.checkers):
            if ck.violations:
                errors.append(f"checker channel {c}: {ck.violations[:5]}")
            if int(self.viol[c].value):
                errors.append(f"device channel {c}: violation code {int(self.vcode[c].value)}")
        assert not errors, "; ".join(errors)
