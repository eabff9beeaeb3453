"""Lockstep: the RTL PIM channel and the behavioural one (hw/pim/behav.py) on the same bus, compared every cycle.

:class:`~sim.tb.pim_lockstep_top.PimLockstep` instantiates the RTL channel module and a behavioural channel module (under another
name) side by side: the same command bus, ``clear``, ``bd_load``, ``chan_id`` and reset; ``diff`` has one bit
per output (``rvalid``, ``rdata`` and every status member) that differs. The cocotb test ``lockstep`` drives
a random stream of legal and illegal commands (the independent protocol checker, :mod:`sim.pim_checker`,
says which are legal; illegal ones and undefined opcodes are mixed in on purpose), random ``clear`` pulses,
a stretch without refresh (REFRESH_LATE), resets in the middle of traffic and back-door loads of ``.bin`` and
``.hex`` images, and fails on the first cycle on which any output differs, naming the outputs and values.
It also requires every command of the configuration's table to have executed and violations to have
happened (the stream must cover what it claims to).

Environment: ``IANUS_CONFIG`` (preset), ``IANUS_PIM`` (geometry overrides, ``"weight_format=int4,acc_slots=1"``),
``IANUS_TIMING`` (``"tCCD=2,tRRD=3"``), ``N_CYCLES``, ``SEED``,
``MIN_EXECUTED`` (per command; 0 for runs meant to fail early).
"""

from __future__ import annotations

import os

import numpy as np

from sim.tb.common import env_int, env_str, tb_test
from sim.tb.pim_lockstep_top import INPUTS, OUTPUTS, PimLockstep  # noqa: F401  (PimLockstep: the top)

# ---- the random stream ---------------------------------------------------------------------------------

# (command, weight in normal, PIM and refresh phases) for the random stream; "BAD" is an undefined opcode
# (always illegal). PIM phases favour all-bank rows (ACTAB/PACTAB, often of a LUT row) and the processing-unit
# commands, so MACAB and AF chains happen often, not only by chance; refresh phases close every row (with
# long DRAM timings and two row buffers a random stream rarely has every buffer closed otherwise).
WEIGHTS = (("ACT", 10, 1, 0), ("ACTAB", 5, 8, 0), ("PRE", 6, 1, 6), ("PREAB", 4, 6, 12), ("RD", 10, 3, 2),
           ("WR", 10, 3, 2), ("REF", 3, 2, 20), ("WRGB", 6, 6, 2), ("MACSB", 6, 4, 1), ("MACAB", 14, 20, 1),
           ("WRBIAS", 5, 6, 2), ("RDMAC", 6, 6, 2), ("AF", 7, 14, 1), ("RDAF", 6, 8, 2), ("PACTAB", 4, 8, 0),
           ("PPREAB", 3, 6, 12), ("BAD", 1, 1, 1))
PHASES = ("normal", "pim", "refresh")
# With 4-bit weights also the scale / selector loads (LDSLAB is an illegal opcode without grid choice).
LOWPREC_WEIGHTS = (("LDSCAB", 3, 6, 1), ("LDSLAB", 2, 4, 1))


IMAGE_ROWS = 24
"""Data rows of each bank the back-door images fill (all of them on the tiny presets)."""


class Stream:
    """Random commands for one channel: legal ones by the protocol checker's verdict, illegal ones on purpose."""

    def __init__(self, cfg, rng):
        from sim.pim_checker import ProtocolChecker

        self.cfg, self.rng = cfg, rng
        weights = WEIGHTS + (LOWPREC_WEIGHTS if cfg.pim.lowprec else ())
        self.names = [w[0] for w in weights]
        self.probs = []
        for k in range(1, 1 + len(PHASES)):
            w = np.array([w[k] for w in weights], dtype=float)
            self.probs.append(w / w.sum())
        self.phase = 0
        self.checker = ProtocolChecker(cfg)
        self.illegal = 0
        self.executed: dict = {}

    def restart(self):
        """After a reset: a new checker (the device forgot every state); executed counts are kept."""
        from sim.pim_checker import ProtocolChecker

        self.totals()
        self.checker = ProtocolChecker(self.cfg)

    def totals(self) -> dict:
        for k, v in self.checker.counts.items():
            self.executed[k] = self.executed.get(k, 0) + v
        self.checker.counts = {k: 0 for k in self.checker.counts}
        return {k: v for k, v in self.executed.items() if v}

    def bf16_lanes(self) -> int:
        p, rng = self.cfg.pim, self.rng
        vals = (rng.standard_normal(p.lanes) * rng.choice([0.01, 1.0, 30.0])).astype(np.float32)
        bits = vals.astype(np.float32).view(np.uint32) >> 16
        kind = rng.random(p.lanes)
        bits = np.where(kind < 0.05, rng.integers(0, 1 << 16, p.lanes), bits)             # any pattern
        bits = np.where((kind >= 0.05) & (kind < 0.1), 0, bits)
        specials = np.array([0x7F80, 0xFF80, 0x7FC1, 0x0001, 0x8040, 0x7F7F, 0x0080, 0x8000], dtype=np.uint32)
        bits = np.where((kind >= 0.1) & (kind < 0.13), rng.choice(specials, p.lanes), bits)
        return int.from_bytes(bits.astype("<u2").tobytes(), "little")

    def lp_words(self) -> int:
        """4-bit weights: a storage column (64 codes, or 16 FP16 / BF16 scales, or selectors): mostly normal
        scales of a moderate range (whose nibbles are varied codes), some random words, some special scales."""
        return _lp_column(self.cfg, self.rng)

    def act_column(self) -> int:
        """4-bit weights: a global-buffer column of activations (BF16 or E4M3), NaN / infinity in about one
        column in ten (64 lanes per MAC: more would leave most accumulators NaN)."""
        p, rng = self.cfg.pim, self.rng
        if p.act_format == "bf16":
            bits = (rng.standard_normal(p.lanes) * rng.choice([0.01, 1.0, 30.0])).astype(np.float32).view(np.uint32)
            bits = (bits >> 16).astype(np.uint32)
            n, width, specials = p.lanes, "<u2", [0x7F80, 0xFF80, 0x7FC1, 0x0001, 0x8040, 0x7F7F, 0x0080, 0x8000]
        else:
            n, width = p.column_bytes, "u1"
            bits = rng.integers(0, 256, n).astype(np.uint32)
            bits = np.where((bits & 0x7F) == 0x7F, bits ^ 0x01, bits)            # no NaN ...
            specials = [0x7F, 0xFF, 0x00, 0x80, 0x01, 0x7E, 0xFE, 0x08]
        if rng.random() < 0.1:                                                   # ... but now and then
            bits[rng.integers(n)] = rng.choice(specials)
        return int.from_bytes(bits.astype(width).tobytes(), "little")

    def fp32_words(self) -> int:
        p, rng = self.cfg.pim, self.rng
        n = p.column_bits // 32
        vals = rng.uniform(-10, 10, n).astype(np.float32).view(np.uint32)
        kind = rng.random(n)
        vals = np.where(kind < 0.05, rng.integers(0, 1 << 32, n, dtype=np.uint64).astype(np.uint32), vals)
        specials = np.array([0, 0x80000000, 0x7F800000, 0xFF800000, 0x7FC00001, 0x00000001, 0x41000000,
                             0xC1000000], dtype=np.uint32)
        vals = np.where((kind >= 0.05) & (kind < 0.1), rng.choice(specials, n), vals)
        return int.from_bytes(vals.astype("<u4").tobytes(), "little")

    def fields(self, op):
        p, rng = self.cfg.pim, self.rng
        bank = int(rng.integers(p.banks))
        lut = 0.5 if PHASES[self.phase] == "pim" else 0.2
        # Data rows: the first IMAGE_ROWS (the back-door images fill them), and any row now and then.
        if p.af_rows and rng.random() < lut:
            row = int(rng.integers(p.data_rows, p.rows))
        else:
            row = int(rng.integers(p.rows if rng.random() < 0.05 else min(p.data_rows, IMAGE_ROWS)))
        if p.lowprec and op in ("MACSB", "MACAB", "WRBIAS", "RDMAC"):
            row = int(rng.integers(p.rows))          # the row field: scale slot (bits 0-3), accumulator slot (bit 4)
        if op == "WRGB":
            col = int(rng.integers(min(p.columns, p.gb_columns + 1)))
        elif op in ("WRBIAS", "RDMAC", "RDAF"):
            col = int(rng.integers(min(p.columns, p.acc_groups + 1)))
        else:
            col = int(rng.integers(p.columns))
        data = 0
        if p.lowprec and op == "WR":
            data = self.lp_words()
        elif p.lowprec and op == "WRGB":
            data = self.act_column()
        elif op in ("WR", "WRGB"):
            data = self.bf16_lanes()
        elif op == "WRBIAS":
            data = self.fp32_words()
        elif op == "BAD" or rng.random() < 0.1:
            data = int.from_bytes(rng.bytes(p.column_bytes), "little")
        full = (1 << p.column_bytes) - 1
        mask = full if rng.random() < 0.8 else int(rng.integers(0, full + 1))
        return bank, row, col, data, mask

    def next(self, cycle, refresh=True, p_nop=0.25, p_illegal=0.25):
        """(opcode, bank, row, col, data, mask) for ``cycle``; the checker records it."""
        from sim.pim_checker import OPCODES

        rng = self.rng
        if cycle % 400 == 0:
            self.phase = int(rng.choice(len(PHASES), p=[0.4, 0.4, 0.2]))
        if rng.random() < p_nop:
            self.checker.check(cycle, "NOP")
            return 0, 0, 0, 0, 0, 0
        first = None
        for _ in range(6):
            op = str(rng.choice(self.names, p=self.probs[self.phase]))
            if op == "REF" and not refresh:
                continue
            bank, row, col, data, mask = self.fields(op)
            code = int(rng.integers(19 if self.cfg.pim.lowprec else 17, 32)) if op == "BAD" else OPCODES[op]
            cand = (code, bank, row, col, data, mask)
            first = first or cand
            if op != "BAD" and self.checker.violation(cycle, op, bank, row, col) is None:
                self.checker.check(cycle, op, bank, row, col)
                return cand
        if first is not None and rng.random() < p_illegal:
            code, bank, row, col, data, mask = first
            self.illegal += 1
            self.checker.check(cycle, code, bank, row, col)
            return first
        self.checker.check(cycle, "NOP")
        return 0, 0, 0, 0, 0, 0


def _lp_column(cfg, rng, n=1):
    """``n`` storage columns for 4-bit weights as one integer each (see :meth:`Stream.lp_words`)."""
    p = cfg.pim
    out = []
    for _ in range(n):
        mant = rng.integers(0, 1 << 16, p.lanes)
        if p.scale_format == "fp16":
            normal = (rng.integers(8, 20, p.lanes) << 10) | (mant & 0x83FF)          # 2^-7 .. 2^4, either sign
            specials = [0x7C00, 0xFC00, 0x7E00, 0x0001, 0x83FF, 0x0000, 0x8000, 0x7BFF]
        else:
            normal = (rng.integers(120, 132, p.lanes) << 7) | (mant & 0x807F)
            specials = [0x7F80, 0xFF80, 0x7FC0, 0x0001, 0x807F, 0x0000, 0x8000, 0x7F7F]
        kind = rng.random(p.lanes)
        words = np.where(kind < 0.15, mant, normal)
        words = np.where(kind > 0.98, rng.choice(specials, p.lanes), words)
        out.append(int.from_bytes(words.astype("<u2").tobytes(), "little"))
    return out[0] if n == 1 else out


def _write_images(cfg, directory, chan, rng, generation):
    """Back-door images of channel ``chan``: even banks as ``.bin`` segments, odd banks as ``.hex``."""
    from firmware.pim import af_lut_row
    from sim.pim_sequencer import write_backdoor, write_backdoor_bin

    p = cfg.pim
    for f in os.listdir(directory):
        os.unlink(os.path.join(directory, f))
    for b in range(p.banks):
        n = min(p.data_rows, IMAGE_ROWS)
        if p.lowprec:
            words = _lp_column(cfg, rng, n * p.columns)
            bits = np.frombuffer(b"".join(w.to_bytes(p.column_bytes, "little") for w in words),
                                 dtype="<u2").reshape(n, p.columns, p.lanes)
        else:
            rows = (rng.standard_normal((n, p.columns, p.lanes)) * (1 + generation)).astype(np.float32)
            bits = (rows.view(np.uint32) >> 16).astype(np.uint16)
        first = int(rng.integers(0, 2))
        writer = write_backdoor_bin if b % 2 == 0 else write_backdoor
        writer(directory, chan, b, first, bits[first:], p.columns)
        if p.af_rows:
            lut = af_lut_row(cfg) if b % 3 else rng.integers(0, 1 << 16, (p.columns, p.lanes), dtype=np.uint16)
            writer(directory, chan, b, p.data_rows, lut[None], p.columns)


def _value(text: str):
    """An ``IANUS_PIM`` value: an integer, True / False, or a string (``weight_format=int4``)."""
    if text.lstrip("-").isdigit():
        return int(text)
    return {"True": True, "False": False}.get(text, text)


@tb_test()
async def lockstep(dut):
    """Random legal and illegal traffic into both channels; every output equal on every cycle."""
    from cocotb.triggers import FallingEdge

    from hw.config import preset
    from sim.pim_checker import OPNAMES
    from sim.tb.common import start

    cfg = preset(env_str("IANUS_CONFIG", "tiny"))
    geo = env_str("IANUS_PIM", "")
    if geo:
        cfg = cfg.replace(**{f"pim.{k}": _value(v) for k, v in (kv.split("=") for kv in geo.split(","))})
    over = env_str("IANUS_TIMING", "")
    if over:
        cfg = cfg.replace(**{f"timing.{k}": int(v) for k, v in (kv.split("=") for kv in over.split(","))})
    p, t = cfg.pim, cfg.timing
    n_cycles = env_int("N_CYCLES", 20000)
    min_executed = env_int("MIN_EXECUTED", 1)
    rng = np.random.default_rng(env_int("SEED", 1))
    chan = 1
    bdir = os.environ["IANUS_BACKDOOR"]
    os.makedirs(bdir, exist_ok=True)
    _write_images(cfg, bdir, chan, rng, 0)

    bus = {name: getattr(dut, name) for name in INPUTS}
    diff = dut.diff
    outs = {name: (getattr(dut, f"r_{name}"), getattr(dut, f"b_{name}")) for name in OUTPUTS}
    await start(dut, zero_inputs=[*INPUTS, "bd_load"])
    dut.chan_id.value = chan
    await FallingEdge(dut.clk)
    cycle = int(outs["status__cycle"][0].value)

    async def edge():
        nonlocal cycle
        await FallingEdge(dut.clk)
        cycle += 1
        d = int(diff.value)
        if d:
            bad = [OUTPUTS[i] for i in range(len(OUTPUTS)) if d >> i & 1]
            detail = ", ".join(f"{n}: rtl {int(outs[n][0].value):#x} behav {int(outs[n][1].value):#x}" for n in bad)
            raise AssertionError(f"cycle {cycle - 1} (after the edge ending it; last command {last}): {detail}")

    def drive(cmd, clear=0):
        op, bank, row, col, data, mask = cmd
        bus["bus__op"].value, bus["bus__bank"].value, bus["bus__row"].value = op, bank, row
        bus["bus__col"].value, bus["bus__data"].value, bus["bus__mask"].value = col, data, mask
        bus["status__clear"].value = clear

    async def backdoor(generation):
        nonlocal last
        _write_images(cfg, bdir, chan, rng, generation)
        drive((0, 0, 0, 0, 0, 0))
        last = "bd_load"
        dut.bd_load.value = 1
        await edge()
        dut.bd_load.value = 0
        stream.checker.check(cycle - 1, "NOP")

    stream = Stream(cfg, rng)
    last = "reset"
    await backdoor(0)
    late_window = (n_cycles // 3, n_cycles // 3 + (t.refresh_postpone + 2) * t.tREFI)
    resets = {n_cycles // 2, n_cycles // 2 + 7, (3 * n_cycles) // 4}
    rvalids = violations = resets_done = clears = 0
    for i in range(n_cycles):
        if i == (2 * n_cycles) // 3:
            await backdoor(1)
        if i in resets:
            # Reset for two edges with random commands on the bus (storage writes still happen; registers reset).
            dut.rst.value = 1
            for _ in range(2):
                cmd = Stream(cfg, rng).next(0, p_nop=0.0, p_illegal=1.0)
                drive(cmd)
                last = f"{OPNAMES.get(cmd[0], cmd[0])} during reset"
                await edge()
            dut.rst.value = 0
            cycle = 0
            stream.restart()
            resets_done += 1
        clear = int(rng.random() < 0.01)
        clears += clear
        cmd = stream.next(cycle, refresh=not (late_window[0] <= i < late_window[1]))
        drive(cmd, clear)
        last = f"{OPNAMES.get(cmd[0], cmd[0])} bank {cmd[1]} row {cmd[2]} col {cmd[3]}" + (" + clear" if clear else "")
        await edge()
        rvalids += int(outs["bus__rvalid"][0].value)
        violations = max(violations, int(outs["status__nviol"][0].value))
    drive((0, 0, 0, 0, 0, 0))
    for _ in range(t.tRL + t.tMAC + 4):
        await edge()
    counts = stream.totals()
    dut._log.info("%d cycles equal on every output: executed %s, %d illegal issued, %d reads returned, "
                  "%d resets, %d clears", n_cycles, counts, stream.illegal, rvalids, resets_done, clears)
    if min_executed:
        from hw.pim.commands import COMMANDS, DUAL_ONLY, LOWPREC_ONLY

        # (the 4-bit-weight commands exist on 4-bit devices only, LDSLAB with grid choice only)
        lp_cmds = ("LDSCAB", "LDSLAB") if p.grid_choice else ("LDSCAB",) if p.lowprec else ()
        want = [c.name for c in COMMANDS if c.name != "NOP" and (p.row_buffers == 2 or c.name not in DUAL_ONLY)
                and (c.name not in LOWPREC_ONLY or c.name in lp_cmds)]
        missing = [n for n in want if counts.get(n, 0) < min_executed]
        assert not missing, f"the stream executed too few of {missing} (counts {counts})"
        assert stream.illegal > 100 and rvalids > 100 and violations > 0, (stream.illegal, rvalids, violations)
