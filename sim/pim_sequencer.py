"""Test-side command sequencing for the PIM device (until the PCU and memory controller exist).

:class:`Scheduler` places a channel's commands in program order, each at the
earliest cycle its timing rules allow (one command per cycle), using a
private :class:`~sim.pim_checker.ProtocolChecker` as the timing model, and
inserts an all-bank refresh at refresh points whenever one is owed. The
resulting schedule is a list of :class:`Slot` s with absolute cycles.

:class:`PimDriver` plays schedules on every channel of the RTL device in
cocotb, resolves symbolic data (inputs, biases, partial sums read back), runs
a :class:`BusMonitor` (the independent protocol checker on what the device's
bus carried), and collects read data in order.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from hw.config import SystemConfig
from sim.pim_checker import OPCODES, ProtocolChecker
from sim.tb.common import port, port_name


@dataclass
class Slot:
    cycle: int
    op: str
    bank: int = 0
    row: int = 0
    col: int = 0
    data: object = 0
    mask: int | None = None
    tag: object = None


class ScheduleError(RuntimeError):
    pass


@dataclass
class Scheduler:
    cfg: SystemConfig
    start: int = 0
    refresh_threshold: int = 1
    slots: list = field(default_factory=list)

    def __post_init__(self):
        self.model = ProtocolChecker(self.cfg)
        self.t = self.start - 1

    def place(self, op, bank=0, row=0, col=0, data=0, mask=None, tag=None, not_before=None) -> Slot:
        t = max(self.t + 1, self.model.earliest(op, bank, row), not_before if not_before is not None else -1)
        v = self.model.violation(t, op, bank, row, col)
        if v is not None:
            raise ScheduleError(f"{op} bank={bank} row={row} col={col} cannot be issued: {v}")
        self.model.check(t, op, bank, row, col)
        self.t = t
        slot = Slot(t, op, bank, row, col, data, mask, tag)
        self.slots.append(slot)
        return slot

    def refresh_point(self):
        """Refresh here if one is owed (all banks must be closed)."""
        if self.model.owed(self.t + 1) >= self.refresh_threshold:
            self._close_all()
            self.place("REF")

    def _close_all(self):
        """Close every open row (and the PIM row buffer, with two row buffers) before a REF."""
        if any(b.open for b in self.model.banks):
            self.place("PREAB")
        if self.model.pim.open:
            self.place("PPREAB")

    def refresh_ahead(self, target: int = -1):
        """Issue REFs now (pulling refreshes in) until at most ``target`` are owed.

        Before a timed PIM operation this leaves refresh credit, so the
        operation pays about one REF per tREFI of its own length.
        """
        if self.model.owed(self.t + 1) > target:
            self._close_all()
        while self.model.owed(self.t + 1) > target:
            self.place("REF")

    def run_program(self, program):
        for op, fields in program:
            if op == "REFRESH_POINT":
                self.refresh_point()
            elif op == "TILE_END":
                pass
            else:
                self.place(op, **fields)
        return self.slots


class PimDriver:
    """Drive schedules on the RTL PIM device from cocotb (see module docstring)."""

    def __init__(self, dut, cfg: SystemConfig):
        self.dut = dut
        self.cfg = cfg
        p = cfg.pim
        self.channels = p.channels
        self.bus = []
        for c in range(p.channels):
            # Touch every port by name (cocotb handles on Verilator, see STYLE.md).
            self.bus.append({name: port(dut, "c", c, name) for name in
                             ("op", "bank", "row", "col", "data", "mask", "rvalid", "rdata")})
        self.status = [{name: port(dut, "s", c, name) for name in
                        ("violation", "vcode", "vop", "vcycle", "clear", "owed", "cycle", "nviol",
                         "n_act", "n_mac", "n_ref", "n_cmd", "n_rd", "n_wr", "n_wrgb", "n_rdmac", "n_af")}
                       for c in range(p.channels)]
        self.checkers = [ProtocolChecker(cfg, channel=c) for c in range(p.channels)]
        self.cycle = 0
        self.full_mask = (1 << p.column_bytes) - 1

    async def reset(self):
        from sim.tb.common import start

        zero = ["bd_load"] + [port_name("c", c, n) for c in range(self.channels)
                              for n in ("op", "bank", "row", "col", "data", "mask")]
        zero += [port_name("s", c, "clear") for c in range(self.channels)]
        await start(self.dut, zero_inputs=zero)
        from cocotb.triggers import FallingEdge

        await FallingEdge(self.dut.clk)
        # Align the checker's cycle numbering with the device's reset-relative cycle counter.
        self.cycle = int(self.status[0]["cycle"].value)

    async def backdoor_load(self):
        from cocotb.triggers import FallingEdge

        self.dut.bd_load.value = 1
        await FallingEdge(self.dut.clk)
        self.dut.bd_load.value = 0
        await FallingEdge(self.dut.clk)
        self.cycle += 2
        for ck in self.checkers:
            ck.check(self.cycle - 2, "NOP")

    async def play(self, schedules, resolve=None, on_read=None):
        """Play one schedule per channel (lists of Slots with absolute cycles; ``schedules[c]``).

        ``resolve(channel, data)`` turns symbolic data into an integer word;
        ``on_read(channel, slot, word)`` receives read data in command order.
        Returns the cycle after the last read returned.
        """
        from cocotb.triggers import FallingEdge

        t = self.cfg.timing
        idx = [0] * self.channels
        pending = [[] for _ in range(self.channels)]
        idle = [True] * self.channels
        last = max((s[-1].cycle for s in schedules if s), default=self.cycle)
        if schedules and any(s and s[0].cycle < self.cycle for s in schedules):
            raise ScheduleError(f"schedule starts at cycle {min(s[0].cycle for s in schedules if s)}, "
                                f"device is at {self.cycle}")
        end = last + t.tRL + 2
        buses, checkers = self.bus, self.checkers
        while self.cycle <= end or any(pending):
            # --- monitor: what the device sampled at the last rising edge ------------
            cyc = self.cycle - 1
            for c in range(self.channels):
                bus = buses[c]
                op = int(bus["op"].value)
                if op:
                    checkers[c].check(cyc, op, int(bus["bank"].value), int(bus["row"].value),
                                      int(bus["col"].value))
                else:
                    checkers[c].check(cyc, "NOP")
                if bus["rvalid"].value:
                    if not pending[c]:
                        raise AssertionError(f"channel {c}: read data with no read outstanding at cycle {cyc}")
                    slot = pending[c].pop(0)
                    if on_read:
                        on_read(c, slot, int(bus["rdata"].value))
            # --- drive this cycle's commands ------------------------------------------
            for c in range(self.channels):
                sched = schedules[c] if c < len(schedules) else []
                bus = buses[c]
                if idx[c] < len(sched) and sched[idx[c]].cycle == self.cycle:
                    s = sched[idx[c]]
                    idx[c] += 1
                    bus["op"].value = OPCODES[s.op]
                    bus["bank"].value = s.bank
                    bus["row"].value = s.row
                    bus["col"].value = s.col
                    data = s.data
                    if not isinstance(data, int):
                        data = resolve(c, data) if resolve else 0
                    bus["data"].value = int(data)
                    bus["mask"].value = self.full_mask if s.mask is None else s.mask
                    idle[c] = False
                    if s.op in ("RD", "RDMAC", "RDAF"):
                        pending[c].append(s)
                elif not idle[c]:
                    bus["op"].value = 0
                    idle[c] = True
            await FallingEdge(self.dut.clk)
            self.cycle += 1
            if self.cycle > end + 4 * t.tRL + 16:
                raise AssertionError(f"reads still outstanding at cycle {self.cycle}: {pending}")
        return self.cycle

    def protocol_violations(self):
        return [v for ck in self.checkers for v in ck.violations]

    def rtl_status(self, c=0) -> dict:
        return {name: int(sig.value) for name, sig in self.status[c].items()}

    def assert_clean(self):
        """Fail if either the independent checker or the device flagged anything."""
        errors = []
        pv = self.protocol_violations()
        if pv:
            errors.append(f"protocol checker: {len(pv)} violations, first {pv[:5]}")
        for c in range(self.channels):
            st = self.rtl_status(c)
            if st["violation"]:
                errors.append(f"device channel {c}: violation code {st['vcode']} op {st['vop']} "
                              f"at cycle {st['vcycle']} ({st['nviol']} in all)")
        assert not errors, "; ".join(errors)


def write_backdoor_bin(directory, channel: int, bank: int, first_row: int, rows: np.ndarray, columns: int):
    """Append rows ``[n, columns, lanes]`` (BF16) for one bank to its binary back-door file.

    The format ``hw/verilog/pim_storage.v`` reads with ``$fread``: a segment header (first word, word
    count; big-endian 32-bit each), then the words most significant byte first.
    """
    n = rows.shape[0]
    words = np.ascontiguousarray(rows, dtype="<u2").reshape(n * columns, -1)
    data = words.view(np.uint8)[:, ::-1]            # little-endian lanes -> the word's bytes, MSB first
    header = np.array([first_row * columns, n * columns], dtype=">u4").tobytes()
    with open(f"{directory}/ch{channel}_b{bank}.bin", "ab") as f:
        f.write(header)
        f.write(np.ascontiguousarray(data).tobytes())


def write_backdoor(directory, channel: int, bank: int, first_row: int, rows: np.ndarray, columns: int):
    """Append rows ``[n, columns, lanes]`` (BF16) for one bank to its ``$readmemh`` file."""
    from firmware.pim import hex_lines

    path = f"{directory}/ch{channel}_b{bank}.hex"
    n = rows.shape[0]
    lines = hex_lines(rows.reshape(n * columns, -1))
    with open(path, "a") as f:
        f.write(f"@{first_row * columns:x}\n")
        f.write("\n".join(lines))
        f.write("\n")


def gemv_resolver(cfg: SystemConfig, layout, x_bits, bias_bits, partial):
    """``resolve(channel, ref)`` for the symbolic data of :func:`firmware.pim.gemv_program`.

    ``partial(channel, tile, group)`` returns the word read back by that RDMAC (an int), or
    ``None`` while it is not back yet (the caller then waits).
    """
    from sim.golden.pim import PimChannelModel

    p = cfg.pim
    bpw = p.banks_per_word
    xpad = np.zeros(layout.chunks * layout.chunk, dtype=np.uint16)
    xpad[:layout.K] = x_bits
    bpad = np.zeros(layout.tiles * layout.per_tile, dtype=np.uint32)
    bpad[:layout.N] = bias_bits

    def resolve(c, ref):
        kind = ref[0]
        if kind == "x":
            _, chunk, col = ref
            base = chunk * layout.chunk + col * p.lanes
            return PimChannelModel.lanes_to_word(xpad[base:base + p.lanes])
        if kind == "zero":
            return 0
        _, tile, g = ref
        if kind == "bias":
            vals = [bpad[layout.output_index(tile, c, b)] if b < p.banks else 0
                    for b in range(g * bpw, (g + 1) * bpw)]
            return int.from_bytes(np.asarray(vals, dtype="<u4").tobytes(), "little")
        return partial(c, tile, g)

    return resolve
