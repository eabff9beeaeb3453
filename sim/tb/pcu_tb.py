"""cocotb testbenches for the PCU (hw/pcu.py) on the memory controllers and the PIM device.

The same macro-command program runs on the functional model (sim/pim_model.py,
prepared by the host driver) and on the RTL; the results in device memory must
be identical bit for bit. The protocol checker runs on every channel's bus and
the device's violation flags must stay clean. ``IANUS_CONFIG`` picks the preset.

``pcu_gemv`` times each macro on its own (macro offered to the PCU until it
completed and its busy fell) and compares two spans of the GEMV with
:func:`firmware.pim.gemv_lower_bound`, refresh charged at its steady-state rate
on both sides (:func:`firmware.pim.amortized_cycles` with the REFs the buses
carried): the whole macro (with the bias read from device memory and the
macro's hand-over, which the bound leaves out), and its row program, from its
first command to its last result word on the device's buses (what the bound
and the sequencer's GEMVs in ``pim_tb`` measure). ``PCU_MAX_RATIO`` and
``PCU_MAX_ROW_RATIO`` make a ratio above them fail.
"""

from __future__ import annotations

import asyncio

import cocotb
import numpy as np
from cocotb.triggers import FallingEdge, ReadOnly

from firmware import driver as D
from firmware.pim import amortized_cycles, gemv_lower_bound
from hw.memif import AddressMap, request_layout, response_layout
from hw.pcu import MacroLayout
from hw.spec import fp as G
from hw.spec.macro import MACRO_LIMITS, Macro, MacroError, MacroFlag, MacroOp
from sim.pim_checker import OPNAMES, BusMonitor
from sim.pim_model import FunctionalDevice
from sim.pim_sequencer import write_backdoor
from sim.tb.common import (
    env_config,
    env_str,
    pack_struct,
    port,
    port_name,
    start,
    tb_test,
    unpack_struct,
    write_metrics,
)


def _cfg():
    """The preset ``IANUS_CONFIG`` with the ``pim.*`` overrides of ``IANUS_PIM`` (``"acc_slots=1"``)."""
    return env_config("tiny", "IANUS_PIM", "pim")


class PcuTB:
    def __init__(self, dut, cfg):
        self.dut, self.cfg = dut, cfg
        C = cfg.pim.channels
        g = lambda name: getattr(dut, name)  # noqa: E731 - touch every port by name (STYLE.md)
        self.macro_valid, self.macro_payload, self.macro_ready = g("macro__valid"), g("macro__payload"), \
            g("macro__ready")
        self.busy, self.error, self.completed, self.clear = g("busy"), g("error"), g("completed"), g("clear")
        self.r = [tuple(port(dut, "r", c, n) for n in ("valid", "payload", "ready")) for c in range(C)]
        self.q = [tuple(port(dut, "q", c, n) for n in ("valid", "payload", "ready")) for c in range(C)]
        self.monitor = None
        self.cycle = 0
        self.rl, self.ql = request_layout(cfg), response_layout(cfg)

    async def reset(self):
        C = self.cfg.pim.channels
        await start(self.dut, zero_inputs=["macro__valid", "clear", "bd_load"]
                    + [port_name("r", c, "valid") for c in range(C)] + [port_name("q", c, "ready") for c in range(C)])
        await FallingEdge(self.dut.clk)
        self.monitor = BusMonitor(self.dut, self.cfg)
        cocotb.start_soon(self.monitor.run())
        self.cycle = self.monitor.cycle
        self.bus_log = []               # (cycle, channel, op name) of every command on the device's buses
        self.slot1_macs = 0             # MACAB commands into accumulator slot 1 (row bit 4; 4-bit devices)
        cocotb.start_soon(self._record(self.cycle))

    async def _record(self, cycle):
        ops = [port(self.dut, "mon", c, "op") for c in range(self.cfg.pim.channels)]
        rows = [port(self.dut, "mon", c, "row") for c in range(self.cfg.pim.channels)]
        slots = self.cfg.pim.acc_slots == 2
        while True:
            for c, op in enumerate(ops):
                v = int(op.value)
                if v:
                    self.bus_log.append((cycle, c, OPNAMES[v]))
                    if slots and OPNAMES[v] == "MACAB" and int(rows[c].value) >> 4 & 1:
                        self.slot1_macs += 1
            await FallingEdge(self.dut.clk)
            cycle += 1

    def row_window(self, first_cycle, last_cycle):
        """The GEMV row program's span on the buses between two cycles, measured like
        :func:`firmware.pim.gemv_lower_bound` (and the sequencer's GEMVs in ``sim/tb/pim_tb.py``): from its
        first command (the first WRGB or ACTAB / PACTAB, with two row buffers no earlier than one cycle before
        the first WRBIAS: see below; the bias transfer's ACT / RD / PREAB come before it) to its
        last result word (the last RDMAC / RDAF + tRL + 1). The channels run the program in lockstep; one
        that did not take part in the bias transfer may start it a few cycles early and then waits for the
        others, so the span starts when the last channel starts it. Returns (cycles, REFs inside on
        every channel)."""
        C = self.cfg.pim.channels
        logs = [[(cy, op) for cy, c, op in self.bus_log if c == ch and first_cycle <= cy <= last_cycle]
                for ch in range(C)]
        start = max(min(cy for cy, op in log if op in ("WRGB", "ACTAB", "PACTAB")) for log in logs)
        if self.cfg.pim.row_buffers == 2:
            # With two row buffers PACTAB needs no tRP after the transfer's PREAB, so it opens the first row
            # while the transfer's data (the bias) is still being handed over; the row program proper starts
            # when its first preload can go (one slot after the activation in the bound's accounting).
            start = max(start, max(min((cy for cy, op in log if op == "WRBIAS"), default=start + 1) - 1
                                   for log in logs))
        end = max(max(cy for cy, op in log if op in ("RDMAC", "RDAF")) for log in logs) + self.cfg.timing.tRL + 1
        refs = min(sum(1 for cy, op in log if op == "REF" and start <= cy < end) for log in logs)
        return end - start, refs

    async def tick(self):
        await FallingEdge(self.dut.clk)
        self.cycle += 1

    async def backdoor(self, fd: FunctionalDevice, rows):
        import os

        d = os.environ["IANUS_BACKDOOR"]
        os.makedirs(d, exist_ok=True)
        for name in os.listdir(d):
            os.unlink(os.path.join(d, name))
        p = self.cfg.pim
        for first, count in rows:
            image = fd.mem.rows(first, count)           # [rows, ch, banks, cols, lanes]
            for c in range(p.channels):
                for b in range(p.banks):
                    write_backdoor(d, c, b, first, image[:, c, b], p.columns)
        self.dut.bd_load.value = 1
        await self.tick()
        self.dut.bd_load.value = 0
        await self.tick()

    async def run_macros(self, macros, limit=2_000_000):
        """Push macro commands, then run until all are completed."""
        done0 = int(self.completed.value)
        start_cycle = self.cycle
        for mc in macros:
            self.macro_payload.value = pack_struct(MacroLayout, op=int(mc.op), flags=int(mc.flags), n=mc.n, m=mc.m,
                                                   row=mc.row, addr0=mc.addr0, addr1=mc.addr1)
            self.macro_valid.value = 1
            while True:
                ready = int(self.macro_ready.value)
                await self.tick()
                if ready:
                    break
            self.macro_valid.value = 0
        while int(self.completed.value) - done0 < len(macros) or int(self.busy.value):
            await self.tick()
            if self.cycle - start_cycle > limit:
                raise AssertionError(f"PCU did not finish {len(macros)} macro commands in {limit} cycles")
        return self.cycle - start_cycle

    async def expect_words(self, spec, addr, expected: bytes):
        """Read the results at ``addr`` and compare them word for word with ``expected`` (the functional model's
        bytes); the first differing FP32 word is named."""
        got = await self.read_words(addr, len(expected) // 32)
        if got != expected:
            a, e = np.frombuffer(got, dtype="<u4"), np.frombuffer(expected, dtype="<u4")
            bad = np.flatnonzero(a != e)
            raise AssertionError(f"{spec}: {bad.size} result words differ from the functional model; first at "
                                 f"{bad[0]}: RTL {a[bad[0]]:#x} model {e[bad[0]]:#x}")

    async def read_words(self, addr, n_words):
        """Read ``n_words`` 32-byte columns through the normal-request ports (the host window)."""
        amap = AddressMap(self.cfg.pim)
        out = []
        for w in range(n_words):
            a = addr + 32 * w
            _, ch, _, _ = amap.decode(a)
            valid, payload, ready = self.r[ch]
            payload.value = pack_struct(self.rl, addr=a, write=0, tag=w % 256)
            valid.value = 1
            while True:
                # Settle first: the controller's ready may depend on the request just driven (sampled
                # before it, a request taken at this edge looked refused and was sent twice).
                await ReadOnly()
                rd = int(ready.value)
                await self.tick()
                if rd:
                    break
            valid.value = 0
            qv, qp, qr = self.q[ch]
            qr.value = 1
            for _ in range(10_000):
                await ReadOnly()
                got = int(qv.value)
                word = int(qp.value)
                await self.tick()
                if got:
                    break
            else:
                raise AssertionError(f"no response to the read of {a:#x}")
            qr.value = 0
            resp = unpack_struct(self.ql, word)
            assert not resp["error"], f"read of {a:#x} answered with an error"
            assert resp["tag"] == w % 256, f"read of {a:#x} answered with tag {resp['tag']}, not {w % 256}"
            out.append(int(resp["data"]).to_bytes(32, "little"))
        return b"".join(out)

    def assert_clean(self):
        self.monitor.assert_clean()


def _operands(cfg, K, N, seed):
    """A functional device with its driver, the seeded generator, and random BF16 weights [K, N], FP32 bias, x."""
    fd = FunctionalDevice(cfg)
    dev = D.Device(D.FunctionalTransport(fd), cfg)
    rng = np.random.default_rng(seed)
    w = G.bf16_bits(rng.standard_normal((K, N)) * (3 / np.sqrt(K)))
    b = (rng.standard_normal(N) * 0.1).astype(np.float32)
    x = G.bf16_bits(rng.standard_normal(K))
    return fd, dev, rng, w, b, x


def prepare(cfg, K, N, gelu, bf16, seed, bias=True):
    """Driver on the functional model: weights, bias, GELU table, x; returns (fd, macros, y_addr, y_bytes, rows).
    Without ``bias`` the GEMV macro has no BIAS flag (the accumulators start at zero)."""
    fd, dev, rng, w, b, x = _operands(cfg, K, N, seed)

    async def setup():
        await dev.upload_gelu_table()
        h = await dev.upload_weights(w, bias=b)
        x_addr = dev.alloc(K * 2)
        await dev.write(x_addr, x.astype("<u2").tobytes())
        y_addr = dev.alloc(h.layout.N * 4)
        return h, x_addr, y_addr

    h, x_addr, y_addr = asyncio.run(setup())
    n_out = h.layout.N
    flags = (MacroFlag.BIAS if bias else 0) | (MacroFlag.GELU if gelu else 0)
    macros = [Macro(MacroOp.WRITE_VEC, n=K, addr0=x_addr),
              Macro(MacroOp.GEMV, flags=int(flags), n=K, m=n_out, row=h.layout.base_row, addr0=h.bias_addr if bias else 0),
              Macro(MacroOp.READ_RES, flags=int(MacroFlag.BF16) if bf16 else 0, n=n_out, addr0=y_addr)]
    p = cfg.pim
    rows = [(0, dev.next_weight_row), (dev.next_data_row, p.rows - dev.next_data_row)]
    snapshot = fd.mem.data.copy()
    for mc in macros:
        assert fd.execute(mc) == MacroError.NONE
    y_bytes = -(-n_out * (2 if bf16 else 4) // 32) * 32
    expected = fd.mem.read(y_addr, y_bytes)
    fd.mem.data[:] = snapshot                      # the RTL starts from the image before the macros
    return fd, macros, y_addr, expected, rows


@tb_test()
async def pcu_gemv(dut):
    """WRITE_VEC, GEMV (+bias, +GELU), READ_RES on the RTL: identical bytes to the functional model."""
    cfg = _cfg()
    shapes = env_str("PCU_SHAPES", "64x32")
    max_ratio = float(env_str("PCU_MAX_RATIO", "0"))          # GEMV macro / gemv_lower_bound (0: not checked)
    max_row_ratio = float(env_str("PCU_MAX_ROW_RATIO", "0"))  # its row program / gemv_lower_bound
    tb = PcuTB(dut, cfg)
    await tb.reset()
    report = []
    for i, spec in enumerate(shapes.split(",")):
        gelu = "g" in spec
        bf16 = "h" in spec
        K, N = (int(v) for v in spec.rstrip("ghn").split("x"))
        fd, macros, y_addr, expected, rows = prepare(cfg, K, N, gelu, bf16, seed=10 + i, bias="n" not in spec)
        assert any(expected), "the expected result is all zeros: the test would prove nothing"
        await tb.backdoor(fd, rows)
        # One macro at a time: WRITE_VEC, GEMV (its refreshes counted on the bus), READ_RES.
        per = []
        for mc in macros:
            refs0 = [ck.refs for ck in tb.monitor.checkers]
            t0 = tb.cycle
            n = await tb.run_macros([mc])
            per.append((n, min(ck.refs - r for ck, r in zip(tb.monitor.checkers, refs0, strict=True)), t0, tb.cycle))
        cycles = sum(e[0] for e in per)
        assert int(tb.error.value) == 0, f"{spec}: PCU error {MacroError(int(tb.error.value)).name}"
        g_cycles, g_refs, g_t0, g_t1 = per[1]
        lb = gemv_lower_bound(cfg, K, N, activation=gelu)
        ratio = amortized_cycles(cfg, g_cycles, g_refs) / lb["amortized_cycles"]
        row_cycles, row_refs = tb.row_window(g_t0, g_t1)
        row_ratio = amortized_cycles(cfg, row_cycles, row_refs) / lb["amortized_cycles"]
        await tb.expect_words(spec, y_addr, expected)
        report.append({"shape": spec, "cycles": cycles, "write_vec": per[0][0], "gemv": g_cycles,
                       "gemv_refreshes": g_refs, "read_res": per[2][0], "bound": lb["cycles"],
                       "ratio": ratio, "row_cycles": row_cycles, "row_refreshes": row_refs, "row_ratio": row_ratio})
        dut._log.info("%s: %d cycles for WRITE_VEC + GEMV + READ_RES (%d + %d + %d), identical to the functional "
                      "model; bound %d (firmware.pim.gemv_lower_bound); GEMV macro %d cycles (%d REF): ratio %.3f; "
                      "its row program %d cycles (%d REF): ratio %.3f (refresh at its steady-state rate on both sides)",
                      spec, cycles, per[0][0], g_cycles, per[2][0], lb["cycles"], g_cycles, g_refs, ratio,
                      row_cycles, row_refs, row_ratio)
        if max_row_ratio > 0:
            ops = [(cy - g_t0, op) for cy, c, op in tb.bus_log if c == 0 and g_t0 <= cy <= g_t1]
            assert row_ratio <= max_row_ratio, (
                f"{spec}: the GEMV row program takes {row_cycles} cycles ({row_refs} REF), {row_ratio:.3f}x its "
                f"bound {lb['cycles']}, above {max_row_ratio}; channel 0's commands (cycle, op): {ops}")
        if max_ratio > 0:
            assert ratio <= max_ratio, (f"{spec}: the GEMV macro takes {g_cycles} cycles ({g_refs} REF), "
                                        f"{ratio:.3f}x its bound {lb['cycles']}, above {max_ratio}")
    tb.assert_clean()
    write_metrics(name="pcu_gemv", config=cfg.name, runs=report)


def prepare_packed(cfg, K, N, pitch, slot0, gelu, bf16, seed, bias=True):
    """A packed GEMV (hw/spec/macro.py ``addr1``) on the functional model: the weights in the packed layout
    (:class:`firmware.pim.GemvLayout` with ``pitch`` and ``slot0``) at row 0, every other column of its rows
    random BF16 (a GEMV that ignored the column offsets would read them), bias, GELU table and x by the driver.
    Returns ``(fd, macros, y_addr, expected, rows)`` like :func:`prepare`; without GELU the expected result is
    also checked against :func:`firmware.pim.gemv_golden` of the same weights."""
    from firmware.pim import GemvLayout, gemv_golden

    fd, dev, rng, w, b, x = _operands(cfg, K, N, seed)
    lay = GemvLayout(cfg, K, N, base_row=0, pitch=pitch, slot0=slot0)
    p = cfg.pim

    async def setup():
        await dev.upload_gelu_table()
        addrs = [dev.alloc(n) for n in (N * 4, K * 2, N * 4)]
        await dev.write(addrs[0], b.tobytes())
        await dev.write(addrs[1], x.astype("<u2").tobytes())
        return addrs

    b_addr, x_addr, y_addr = asyncio.run(setup())
    assert lay.rows_used <= dev.next_data_row, "the packed weights overlap the data buffers"
    rows = G.bf16_bits(rng.standard_normal((lay.rows_used, p.channels, p.banks, p.columns, p.lanes)))
    packed = lay.pack(w).transpose(2, 0, 1, 3, 4)
    n = lay.chunk_cols(0)
    for t in range(lay.tiles):
        r, c0 = lay.row_of(t, 0), lay.col_of(t)
        rows[r, ..., c0:c0 + n, :] = packed[r, ..., c0:c0 + n, :]
    fd.mem.set_rows(0, rows)
    flags = (MacroFlag.BIAS if bias else 0) | (MacroFlag.GELU if gelu else 0)
    macros = [Macro(MacroOp.WRITE_VEC, n=K, addr0=x_addr),
              Macro(MacroOp.GEMV, flags=int(flags), n=K, m=N, row=0, addr0=b_addr if bias else 0, addr1=lay.addr1),
              Macro(MacroOp.READ_RES, flags=int(MacroFlag.BF16) if bf16 else 0, n=N, addr0=y_addr)]
    snapshot = fd.mem.data.copy()
    for mc in macros:
        assert fd.execute(mc) == MacroError.NONE, mc
    if not gelu:
        y = gemv_golden(cfg, w, x, G.f32_bits(b) if bias else None)
        assert (fd.result == y).all(), "packed GEMV of the functional model differs from gemv_golden"
    y_bytes = -(-N * (2 if bf16 else 4) // 32) * 32
    expected = fd.mem.read(y_addr, y_bytes)
    fd.mem.data[:] = snapshot
    return fd, macros, y_addr, expected, [(0, lay.rows_used), (dev.next_data_row, p.rows - dev.next_data_row)]


@tb_test()
async def pcu_gemv_packed(dut):
    """Packed GEMVs (``PCU_PACKED``: ``KxN`` ``p<pitch>`` ``s<slot0>`` [g GELU] [h BF16] [n no bias]) on the RTL:
    identical bytes to the functional model, the other columns of the packed rows random (a PCU that ignored
    the column offsets, or wrote the input at the wrong global-buffer slots, would read them)."""
    import re

    cfg = _cfg()
    tb = PcuTB(dut, cfg)
    await tb.reset()
    report = []
    for i, spec in enumerate(env_str("PCU_PACKED", "16x40p1s3").split(",")):
        K, N, pitch, slot0, opts = re.fullmatch(r"(\d+)x(\d+)p(\d+)s(\d+)([ghn]*)", spec).groups()
        fd, macros, y_addr, expected, rows = prepare_packed(cfg, int(K), int(N), int(pitch), int(slot0), "g" in opts,
                                                            "h" in opts, seed=40 + i, bias="n" not in opts)
        await tb.backdoor(fd, rows)
        per = [await tb.run_macros([mc]) for mc in macros]
        assert int(tb.error.value) == 0, f"{spec}: PCU error {MacroError(int(tb.error.value)).name}"
        await tb.expect_words(spec, y_addr, expected)
        report.append({"shape": spec, "write_vec": per[0], "gemv": per[1], "read_res": per[2]})
        dut._log.info("%s: GEMV %d cycles, identical to the functional model", spec, per[1])
    tb.assert_clean()
    write_metrics(name="pcu_gemv_packed", config=cfg.name, runs=report)


@tb_test()
async def pcu_errors(dut):
    """Malformed macro commands set the same error code as the functional model; after CLEAR the PCU works."""
    cfg = _cfg()
    tb = PcuTB(dut, cfg)
    await tb.reset()
    size = cfg.pim.total_bytes
    cases = [
        (Macro(13), MacroError.BAD_OPCODE),
        (Macro(MacroOp.READ_RES, n=4, addr0=0), MacroError.NO_RESULT),
        (Macro(MacroOp.WRITE_VEC, n=16, addr0=3), MacroError.BAD_ADDRESS),
        (Macro(MacroOp.WRITE_VEC, n=0, addr0=0), MacroError.BAD_LENGTH),
        (Macro(MacroOp.WRITE_VEC, n=16, addr0=size - 16), MacroError.BAD_ADDRESS),
        (Macro(MacroOp.GEMV, n=16, m=8, row=0), MacroError.NO_INPUT),
        (Macro(MacroOp.WRITE_VEC, n=16, addr0=0, flags=1), MacroError.BAD_FLAGS),
        (Macro(MacroOp.NOP, addr1=5), MacroError.RESERVED_NONZERO),
        (Macro(MacroOp.GEMV, n=16, m=8, addr1=1 << 16), MacroError.RESERVED_NONZERO),
        (Macro(MacroOp.WRITE_VEC, n=64, addr0=0), MacroError.NONE),
        # Packed GEMVs (addr1 = pack | slot0 << 8): pitch past the global buffer, tiles wider than the pitch,
        # first slot past the row, a first slot without packing; the last slot's row past the data rows.
        (Macro(MacroOp.GEMV, n=16, m=8, addr1=cfg.pim.gb_columns.bit_length() + 1), MacroError.BAD_PACKING),
        (Macro(MacroOp.GEMV, n=40, m=8, addr1=2), MacroError.BAD_PACKING),
        (Macro(MacroOp.GEMV, n=16, m=8, addr1=1 | cfg.pim.columns << 8), MacroError.BAD_PACKING),
        (Macro(MacroOp.GEMV, n=16, m=8, addr1=1 << 8), MacroError.BAD_PACKING),
        (Macro(MacroOp.GEMV, n=16, m=2 * cfg.pim.banks * cfg.pim.channels, row=cfg.pim.data_rows - 1,
               addr1=1 | (cfg.pim.columns - 1) << 8), MacroError.BAD_REGION),
    ]
    loaded = 0          # input values the PCU holds (from the WRITE_VEC case on)
    for mc, code in cases:
        fd = FunctionalDevice(cfg)
        fd.input = np.zeros(loaded, dtype=np.uint16)
        if mc.op == MacroOp.WRITE_VEC and code == MacroError.NONE:
            loaded = mc.n
        assert fd.execute(mc) == code, f"functional model gives {fd.execute(mc)!r} for {mc}"
        await tb.run_macros([mc])
        got = int(tb.error.value)
        assert got == code, f"{mc}: PCU error {got}, expected {code.name} ({int(code)})"
        # Sticky: the next command is consumed without effect.
        await tb.run_macros([Macro(MacroOp.NOP)])
        assert int(tb.error.value) == code
        tb.clear.value = 1
        await tb.tick()
        tb.clear.value = 0
        await tb.tick()
        assert int(tb.error.value) == 0
    # Recovery: a real GEMV afterwards.
    fd, macros, y_addr, expected, rows = prepare(cfg, 32, 16, False, False, seed=3)
    await tb.backdoor(fd, rows)
    await tb.run_macros(macros)
    assert int(tb.error.value) == 0
    assert await tb.read_words(y_addr, len(expected) // 32) == expected
    tb.assert_clean()


# -- 4-bit weights (issue 19; hw/pcu_w4.py) ----------------------------------------------------------------

def _w4_addr(cfg, row):
    """Byte address of the first column of data row ``row`` (every channel and bank of it)."""
    return row * (cfg.pim.total_bytes // cfg.pim.rows)


def prepare_w4(cfg, K, N, bf16, seed, bias=True, base_row=0, cg=0):
    """A 4-bit GEMV on the functional model: weights quantized and placed by ``W4GemvLayout(cfg, K, N, base_row,
    chunk_size=cg * quant_group)`` (the macro's layout; ``cg`` = 0: max_chunk), the rest of the weight rows random (a PCU that read a wrong column would
    take them), the input (BF16, or E4M3 codes on an FP8 device) and the bias in data rows. Returns ``(fd, macros,
    y_addr, expected, rows)`` like :func:`prepare`; the GEMV's result is also checked against the independent
    golden of ``sim/tb/pim_lowprec_tb.py`` (:func:`w4_golden`)."""
    from firmware.pim_lowprec import W4GemvLayout
    from sim.tb.pim_lowprec_tb import w4_data, w4_golden

    p = cfg.pim
    fd = FunctionalDevice(cfg)
    rng = np.random.default_rng(seed + 1000)
    q, x, b = w4_data(cfg, K, N, seed)
    max_chunk = p.gb_slots * 64 // p.quant_group * p.quant_group
    lay = W4GemvLayout(cfg, K, N, base_row=base_row, chunk_size=cg * p.quant_group or max_chunk)
    img = lay.image(q).transpose(2, 0, 1, 3, 4).copy().view("<u2")       # [rows, ch, banks, cols, 16]
    for ch in range(lay.chunks):
        used = set()
        for j in range(lay.per_row):
            for cols in lay.unit_columns_at(j, ch):
                used.update(cols)
        rows = slice(ch * lay.rows_per_chunk, (ch + 1) * lay.rows_per_chunk)
        for c in range(p.columns):
            if c not in used:
                img[rows, :, :, c] = rng.integers(0, 1 << 16, img[rows, :, :, c].shape, dtype=np.uint16)
    fd.mem.set_rows(base_row, img)
    data_row = p.data_rows - 6
    assert base_row + lay.rows_used <= data_row, "the weights overlap the data rows of the test"
    x_addr, b_addr, y_addr = (_w4_addr(cfg, data_row + 2 * i) for i in range(3))
    fd.mem.write(x_addr, (x.astype("<u2") if p.act_format == "bf16" else x.astype(np.uint8)).tobytes())
    fd.mem.write(b_addr, b.astype("<u4").tobytes())
    macros = [Macro(MacroOp.WRITE_VEC, n=K, addr0=x_addr),
              Macro(MacroOp.GEMV, flags=int(MacroFlag.BIAS) if bias else 0, n=K, m=N, row=base_row,
                    addr0=b_addr if bias else 0, addr1=cg),
              Macro(MacroOp.READ_RES, flags=int(MacroFlag.BF16) if bf16 else 0, n=N, addr0=y_addr)]
    snapshot = fd.mem.data.copy()
    for mc in macros[:2]:
        assert fd.execute(mc) == MacroError.NONE, mc
    want = w4_golden(cfg, q, x, b if bias else np.zeros(N, np.uint32))
    assert (fd.result == want).all(), "the functional model's 4-bit GEMV differs from the golden unit model"
    assert fd.execute(macros[2]) == MacroError.NONE
    y_bytes = -(-N * (2 if bf16 else 4) // 32) * 32
    expected = fd.mem.read(y_addr, y_bytes)
    fd.mem.data[:] = snapshot
    return fd, macros, y_addr, expected, [(base_row, lay.rows_used), (data_row, 6)]


@tb_test()
async def pcu_w4_gemv(dut):
    """4-bit GEMVs (``PCU_W4``: ``KxN`` [h BF16 results] [n no bias] [r<row> base row] [c<g> chunks of g groups,
    addr1]) through the PCU on a 4-bit
    device: identical bytes to the functional model (itself checked against the golden unit model), the protocol
    checker clean."""
    import re

    from firmware.pim_lowprec import w4_gemv_lower_bound

    cfg = _cfg()
    tb = PcuTB(dut, cfg)
    await tb.reset()
    report = []
    for i, spec in enumerate(env_str("PCU_W4", "128x16").split(",")):
        K, N, opts, row, cg = re.fullmatch(r"(\d+)x(\d+)([hn]*)(?:r(\d+))?(?:c(\d+))?", spec).groups()
        fd, macros, y_addr, expected, rows = prepare_w4(cfg, int(K), int(N), "h" in opts, seed=60 + i,
                                                        bias="n" not in opts, base_row=int(row or 0), cg=int(cg or 0))
        assert any(expected), "the expected result is all zeros: the test would prove nothing"
        await tb.backdoor(fd, rows)
        slot1 = tb.slot1_macs
        per = [await tb.run_macros([mc]) for mc in macros]
        assert int(tb.error.value) == 0, f"{spec}: PCU error {MacroError(int(tb.error.value)).name}"
        await tb.expect_words(spec, y_addr, expected)
        K_, N_ = macros[1].n, macros[1].m
        units = -(-K_ // (int(cg or 0) * cfg.pim.quant_group or cfg.pim.gb_slots * 64)) * \
            -(-N_ // (cfg.pim.banks * cfg.pim.channels))
        if cfg.pim.acc_slots == 2 and units > 1:
            assert tb.slot1_macs > slot1, f"{spec}: {units} units, but no MAC into accumulator slot 1"
        # (The bound is for the layout firmware.pim_lowprec chooses, which may cut K differently: information.)
        lb = w4_gemv_lower_bound(cfg, K_, N_)["cycles"]
        report.append({"shape": spec, "write_vec": per[0], "gemv": per[1], "read_res": per[2], "bound": lb})
        dut._log.info("4-bit %s: GEMV %d cycles (w4_gemv_lower_bound %d), identical to the functional model",
                      spec, per[1], lb)
    tb.assert_clean()
    write_metrics(name="pcu_w4_gemv", config=cfg.name, runs=report)


@tb_test()
async def pcu_w4_errors(dut):
    """4-bit GEMV macros the PCU does not issue set the functional model's error code (GELU: BAD_FLAGS, K not whole
    groups or too long: BAD_LENGTH, addr1 (a chunk above the global buffer, bits 8..15): BAD_PACKING, rows: BAD_REGION, bias address: BAD_ADDRESS) and nothing
    reaches the device; after CLEAR a GEMV works. (UNSUPPORTED, a unit of a full chunk wider than a row, does
    not arise on the presets: tests/test_pcu_w4.py checks it on the decoder.)"""
    cfg = _cfg()
    p = cfg.pim
    tb = PcuTB(dut, cfg)
    await tb.reset()
    q = p.quant_group
    big = p.gb_slots * 64 // q * q + q                      # one group more than one chunk holds
    too_long = (MACRO_LIMITS["input_values"] // q + 1) * q
    two_rows = (p.columns + 1) * p.banks * p.channels       # more tiles than one row holds
    cases = [
        (Macro(MacroOp.GEMV, n=q, m=8), MacroError.NO_INPUT),
        (Macro(MacroOp.WRITE_VEC, n=big, addr0=0), MacroError.NONE),
        (Macro(MacroOp.GEMV, flags=int(MacroFlag.GELU), n=q, m=8), MacroError.BAD_FLAGS),
        (Macro(MacroOp.GEMV, flags=int(MacroFlag.BIAS | MacroFlag.GELU), n=q, m=8), MacroError.BAD_FLAGS),
        (Macro(MacroOp.GEMV, n=q // 2, m=8), MacroError.BAD_LENGTH),
        (Macro(MacroOp.GEMV, n=q + 64, m=8), MacroError.BAD_LENGTH),
        (Macro(MacroOp.GEMV, n=q, m=8, addr1=p.gb_slots * 64 // q + 1), MacroError.BAD_PACKING),
        (Macro(MacroOp.GEMV, n=q, m=8, addr1=1 << 8), MacroError.BAD_PACKING),
        (Macro(MacroOp.GEMV, n=q, m=8, addr1=1 << 16), MacroError.RESERVED_NONZERO),
        (Macro(MacroOp.GEMV, n=too_long, m=8), MacroError.BAD_LENGTH),
        (Macro(MacroOp.GEMV, n=q, m=two_rows, row=p.data_rows - 1), MacroError.BAD_REGION),
        (Macro(MacroOp.GEMV, n=q, m=8, row=p.data_rows), MacroError.BAD_REGION),
        (Macro(MacroOp.GEMV, flags=int(MacroFlag.BIAS), n=q, m=8, addr0=4), MacroError.BAD_ADDRESS),
        (Macro(MacroOp.GEMV, n=q, m=8, row=p.data_rows - 1), MacroError.NONE),
    ]
    fd = FunctionalDevice(cfg)
    for mc, code in cases:
        assert fd.execute(mc) == code, f"functional model gives {fd.execute(mc)!r} for {mc}"
        commands0 = len(tb.bus_log)
        await tb.run_macros([mc])
        got = int(tb.error.value)
        assert got == code, f"{mc}: PCU error {got}, expected {code.name} ({int(code)})"
        if code != MacroError.NONE:
            assert len(tb.bus_log) == commands0 or all(op == "REF" for _, _, op in tb.bus_log[commands0:]), \
                f"{mc}: refused, but commands reached the device: {tb.bus_log[commands0:]}"
            tb.clear.value = 1
            await tb.tick()
            tb.clear.value = 0
            await tb.tick()
            assert int(tb.error.value) == 0
    # Recovery: a real GEMV afterwards.
    fd, macros, y_addr, expected, rows = prepare_w4(cfg, q, 24, False, seed=7)
    await tb.backdoor(fd, rows)
    await tb.run_macros(macros)
    assert int(tb.error.value) == 0
    assert await tb.read_words(y_addr, len(expected) // 32) == expected
    tb.assert_clean()
