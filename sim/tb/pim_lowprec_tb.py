"""cocotb testbenches for the low-precision PIM device (4-bit weights, issue 19).

``w4_gemv``: 4-bit GEMVs (:mod:`firmware.pim_lowprec`) played on every channel by :mod:`sim.pim_sequencer`
with the independent protocol checker on (any violation of device or checker fails); every output compared
bit for bit with the golden unit model :func:`sim.golden.lowprec_unit.unit_acc` (``acc0`` = the bias), which
is written from the numerics contract and shares no code with the RTL; cycles recorded against
:func:`firmware.pim_lowprec.w4_gemv_lower_bound`.

``w4_edges``: the per-slot PU_BUSY rule at its edge (a WRBIAS / RDMAC into the slot of a MAC one cycle
before tMAC flagged by device and checker and not executed, on the exact cycle accepted; into the other slot
right after the MAC accepted), LDSCAB / LDSLAB state rules.

``lds_illegal``: on a BF16 device LDSCAB and LDSLAB are ILLEGAL_OPCODE for device and checker.

The configuration is ``IANUS_CONFIG`` (a preset) with ``IANUS_PIM`` overrides (``"acc_slots=1"``).
"""

from __future__ import annotations

import time

import ml_dtypes
import numpy as np
from cocotb.triggers import FallingEdge

from firmware.pim import amortized_cycles
from firmware.pim_lowprec import W4GemvLayout, act_words, gemv_bytes, w4_gemv_lower_bound, w4_gemv_program
from firmware.quant import quantize_weights
from hw.spec import fp as G
from sim.golden import lowprec_unit as LU
from sim.pim_sequencer import PimDriver, Scheduler, write_backdoor_bin
from sim.tb.common import env_config, env_int, env_str, tb_test, write_metrics
from sim.tb.pim_tb import _backdoor_dir, _words_to_u32, gather_outputs


def _cfg():
    """The preset ``IANUS_CONFIG`` (``tiny-w4``) with the ``pim.*`` overrides of ``IANUS_PIM``."""
    return env_config("tiny-w4", "IANUS_PIM", "pim")


def w4_data(cfg, K, N, seed):
    """(QuantWeights, activation patterns [K] (BF16 uint16 or E4M3 uint8), bias FP32 bits [N])."""
    p = cfg.pim
    rng = np.random.default_rng(seed)
    w = rng.standard_normal((K, N)) / np.sqrt(K)
    q = quantize_weights(w, p.weight_format, p.quant_group, p.scale_format, p.grid_choice)
    if p.act_format == "bf16":
        x = G.bf16_bits(rng.standard_normal(K))
    else:
        x = (rng.standard_normal(K) * 16).astype(np.float32).astype(ml_dtypes.float8_e4m3fn).view(np.uint8)
    bias = G.f32_bits(rng.standard_normal(N).astype(np.float32) * np.float32(0.1))
    return q, x, bias


def w4_golden(cfg, q, x, bias) -> np.ndarray:
    """FP32 bits ``[N]`` of the accumulators: unit_acc per output with acc0 = bias (independent of the RTL)."""
    p = cfg.pim
    K, N = q.shape
    if p.scale_format == "fp16":
        sbits = q.scales.astype(np.float16).view(np.uint16)
    else:
        sbits = q.scales.astype(ml_dtypes.bfloat16).view(np.uint16)
    xc = np.asarray(x).reshape(K // 64, 64)
    out = np.empty(N, np.uint32)
    for n in range(N):
        out[n] = LU.unit_acc(p.weight_format, p.act_format, q.codes[:, n].reshape(-1, 64), xc, sbits[:, n],
                             q.selectors[:, n], int(bias[n]), p.quant_group, p.scale_format, p.grid_choice)
    return out


async def run_w4_gemv(drv: PimDriver, sch: Scheduler, layout: W4GemvLayout, q, x, bias):
    """Back-door load, schedule and play the program on every channel: (y bits [N], cycles, refreshes, wall
    seconds of the play alone: the simulation of the program's cycles, without the setup)."""
    cfg = drv.cfg
    p, t = cfg.pim, cfg.timing
    d = _backdoor_dir()
    img = layout.image(q)
    for c in range(p.channels):
        for b in range(p.banks):
            rows = img[c, b].reshape(layout.rows_used, p.columns, 32).view("<u2")
            write_backdoor_bin(d, c, b, layout.base_row, rows, p.columns)
    await drv.backdoor_load()
    sch.slots = []
    sch.t = max(sch.t, drv.cycle)
    sch.refresh_ahead()
    first = len(sch.slots)
    read_at = {}
    for op, fields in w4_gemv_program(layout, with_bias=True):
        if op == "REFRESH_POINT":
            sch.refresh_point()
            continue
        fields = dict(fields)
        after = fields.pop("after", None)
        nb = read_at[after] + t.tRL + 1 if after is not None else None
        s = sch.place(op, not_before=nb, **fields)
        if op == "RDMAC":
            read_at[s.tag] = s.cycle
    slots = sch.slots
    words = act_words(layout, x)
    bpw = p.banks_per_word
    bpad = np.zeros(layout.tiles * layout.per_tile, np.uint32)
    bpad[:layout.N] = bias
    results = {}

    def resolve(c, ref):
        kind = ref[0]
        if kind == "x":
            return words[(ref[1], ref[2])]
        if kind == "zero":
            return 0
        _, tile, g = ref
        if kind == "bias":
            vals = [bpad[layout.output_index(tile, c, b)] if b < p.banks else 0 for b in range(g * bpw, (g + 1) * bpw)]
            return int.from_bytes(np.asarray(vals, dtype="<u4").tobytes(), "little")
        return int.from_bytes(np.asarray(results[(c, "partial_out", tile, g)], dtype="<u4").tobytes(), "little")

    def on_read(c, slot, word):
        results[(c, *slot.tag)] = _words_to_u32(word, bpw)

    t0 = slots[first].cycle
    w0 = time.perf_counter()
    await drv.play([slots] * p.channels, resolve=resolve, on_read=on_read)
    play_s = time.perf_counter() - w0
    cycles = slots[-1].cycle + t.tRL + 1 - t0
    y = gather_outputs(layout, (((c, tile, g), vals) for (c, kind, tile, g), vals in results.items()
                                if kind == "result"), bpw, p.banks, layout.tiles * layout.per_tile)
    refs = sum(1 for s_ in slots[first:] if s_.op == "REF")
    return y[:layout.N], cycles, refs, play_s


@tb_test()
async def w4_gemv(dut):
    """4-bit GEMV shapes from GEMV_SHAPES ("KxN,..."): bit-exact vs unit_acc, cycles vs the lower bound."""
    cfg = _cfg()
    shapes = [tuple(int(v) for v in s.split("x")) for s in env_str("GEMV_SHAPES", "128x32").split(",")]
    check = env_int("CHECK_ALL", 1)
    drv = PimDriver(dut, cfg)
    await drv.reset()
    sch = Scheduler(cfg, start=drv.cycle + 1)
    report = []
    for i, (K, N) in enumerate(shapes):
        q, x, bias = w4_data(cfg, K, N, seed=300 + i)
        layout = W4GemvLayout(cfg, K, N)
        t0 = time.perf_counter()
        y, cycles, refs, play_s = await run_w4_gemv(drv, sch, layout, q, x, bias)
        wall = time.perf_counter() - t0
        # Every output, or (CHECK_ALL=0, long benches) every output of a sample of tiles incl. the last.
        idx = np.arange(N) if check else np.unique(np.concatenate(
            [np.arange(min(N, 2 * layout.per_tile)), np.arange(max(0, N - layout.per_tile), N)]))
        want = w4_golden(cfg, _sub(q, idx), x, bias[idx])
        bad = np.flatnonzero(y[idx] != want)
        assert bad.size == 0, (f"w4 GEMV {K}x{N}: {bad.size} of {idx.size} outputs differ from the golden model; "
                               f"first n={idx[bad[0]]}: RTL {int(y[idx[bad[0]]]):#x} golden {int(want[bad[0]]):#x}")
        lb = w4_gemv_lower_bound(cfg, K, N)
        am = amortized_cycles(cfg, cycles, refs)
        report.append({"shape": f"{K}x{N}", "cycles": cycles, "bound": lb["cycles"], "refreshes": refs,
                       "amortized_cycles": am, "amortized_bound": lb["amortized_cycles"],
                       "efficiency": lb["amortized_cycles"] / am, "per_row": layout.per_row,
                       "rows": layout.rows_used, "checked_outputs": int(idx.size), "wall_s": wall,
                       "play_s": play_s,
                       "weight_bytes": gemv_bytes(cfg, K, N)})
        dut._log.info("w4 GEMV %dx%d: %d cycles (%d REF), bound %d, amortized efficiency %.3f, %d units/row, "
                      "%d outputs bit-exact", K, N, cycles, refs, lb["cycles"], report[-1]["efficiency"],
                      layout.per_row, idx.size)
    drv.assert_clean()
    write_metrics(name="pim_w4_gemv", config=cfg.name, shapes=report)


def _sub(q, idx):
    from dataclasses import replace
    return replace(q, codes=q.codes[:, idx], scales=q.scales[:, idx], selectors=q.selectors[:, idx])


class _Issuer:
    """Issue single commands on channel 0 with the checker watching (as pim_tb's illegal tests do)."""

    def __init__(self, dut, drv):
        from hw.pim.commands import VIOLATIONS

        self.dut, self.drv = dut, drv
        self.names = {v.code: v.name for v in VIOLATIONS}
        self.bus, self.st, self.ck = drv.bus[0], drv.status[0], drv.checkers[0]

    async def issue(self, op, bank=0, row=0, col=0, data=0):
        from sim.pim_checker import OPCODES

        bus, drv = self.bus, self.drv
        bus["op"].value = OPCODES[op]
        bus["bank"].value, bus["row"].value, bus["col"].value = bank, row, col
        bus["data"].value, bus["mask"].value = data, drv.full_mask
        await FallingEdge(self.dut.clk)
        drv.cycle += 1
        self.ck.check(drv.cycle - 1, op, bank, row, col)
        bus["op"].value = 0
        return drv.cycle - 1

    async def idle(self, n):
        for _ in range(n):
            await FallingEdge(self.dut.clk)
            self.drv.cycle += 1
            self.ck.check(self.drv.cycle - 1, "NOP")

    async def at(self, cycle):
        assert self.drv.cycle <= cycle, f"setup too slow: at {self.drv.cycle}, due at {cycle}"
        await self.idle(cycle - self.drv.cycle)

    async def expect(self, name, op, **kw):
        """``op`` must be flagged ``name`` by device and checker; the flag is then cleared."""
        before = len(self.ck.violations)
        await self.issue(op, **kw)
        await self.idle(1)
        code = int(self.st["vcode"].value)
        assert int(self.st["violation"].value) == 1, f"{op} {kw}: device did not flag {name}"
        assert self.names[code] == name, f"{op} {kw}: device flagged {self.names[code]}, expected {name}"
        new = self.ck.violations[before:]
        assert new and new[0][1] == name, f"{op} {kw}: checker saw {new}, expected {name}"
        self.st["clear"].value = 1
        await self.idle(1)
        self.st["clear"].value = 0
        await self.idle(1)
        self.ck.violations[before:] = []

    async def accepted(self, op, **kw):
        before = len(self.ck.violations)
        c = await self.issue(op, **kw)
        await self.idle(1)
        assert int(self.st["violation"].value) == 0, f"{op} {kw}: device flagged {int(self.st['vcode'].value)}"
        assert len(self.ck.violations) == before, f"{op} {kw}: checker flagged {self.ck.violations[before:]}"
        return c


@tb_test()
async def w4_edges(dut):
    """Per-slot PU_BUSY at its edge, LDSCAB / LDSLAB state rules, on a 4-bit device (slots: its acc_slots)."""
    cfg = _cfg()
    p, t = cfg.pim, cfg.timing
    drv = PimDriver(dut, cfg)
    await drv.reset()
    io = _Issuer(dut, drv)
    await io.idle(2)
    await io.expect("BANK_CLOSED", "LDSCAB", col=0)
    a = await io.issue("ACTAB", row=0)
    await io.at(a + t.tRCDRD - 1)
    await io.expect("T_RCD", "LDSCAB", col=0)
    await io.accepted("LDSCAB", col=1)
    if p.grid_choice:
        await io.accepted("LDSLAB", col=2)
    else:
        await io.expect("ILLEGAL_OPCODE", "LDSLAB", col=2)
    for s in range(p.acc_slots):
        for op in ("WRBIAS", "RDMAC"):
            m = await io.accepted("MACAB", col=0, row=3 | (s << 4))
            if p.acc_slots == 2:
                # The other slot is free right after the MAC.
                await io.accepted(op, col=0, row=(1 - s) << 4)
            await io.at(m + t.tMAC - 1)
            await io.expect("PU_BUSY", op, col=0, row=s << 4)
            # The exact edge: a fresh MAC, the command at m2 + tMAC.
            m2 = await io.issue("MACAB", col=0, row=s << 4)
            await io.at(m2 + t.tMAC)
            await io.accepted(op, col=0, row=s << 4)
    await io.idle(t.tMAC + t.tRTP)
    await io.issue("PREAB")
    await io.idle(t.tRP)
    drv.assert_clean()
    dut._log.info("per-slot PU_BUSY edges (%d slots) and LDSCAB/LDSLAB rules: device and checker agree",
                  p.acc_slots)


@tb_test()
async def lds_illegal(dut):
    """On a device without 4-bit weights LDSCAB / LDSLAB are illegal opcodes (device and checker)."""
    cfg = _cfg()
    drv = PimDriver(dut, cfg)
    await drv.reset()
    io = _Issuer(dut, drv)
    await io.idle(2)
    await io.issue("ACTAB", row=0)
    await io.idle(cfg.timing.tRCDRD)
    await io.expect("ILLEGAL_OPCODE", "LDSCAB", col=0)
    await io.expect("ILLEGAL_OPCODE", "LDSLAB", col=0)
    await io.accepted("MACAB", col=0)
    await io.idle(cfg.timing.tMAC + cfg.timing.tRTP)
    await io.issue("PREAB")
    await io.idle(cfg.timing.tRP)
    drv.assert_clean()
