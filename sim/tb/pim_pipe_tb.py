"""cocotb testbenches for the pipelined PIM processing unit (issue 15; ``PimGeometry.acc_stages > 1``).

The combine of the interleaved partial sums is triggered by the command sequence (a MAC with the combine
flag, ``row`` bit :data:`hw.config.COMBINE_ROW_BIT`; :mod:`hw.pim.bank`). These tests hold the device to
that contract, with the independent protocol checker (:mod:`sim.pim_checker`) on every command and the
golden channel model (:class:`sim.golden.pim.PimChannelModel`) for every bit read back:

* ``combine_edges``: RDMAC, WRBIAS, AF and MAC one cycle before ``tMAC`` after a combining MAC are
  flagged PU_BUSY by the device and the checker and not executed; on the exact cycle they are accepted, and
  the RDMAC / RDAF data then is the golden total; RDMAC / AF of banks whose partial sums are not combined
  are PU_BUSY (and not executed) until a combining MAC or a preload.
* ``refresh_mid_row``: GEMVs with a refresh (PREAB, REF, ACTAB of the same row) between two MACs of a row
  give the same bits as without, and the golden model's.
"""

from __future__ import annotations

import numpy as np
from cocotb.triggers import FallingEdge

from firmware.pim import GemvLayout, af_lut_row, gemv_golden, gemv_program
from hw.pim.commands import VIOLATIONS
from hw.spec import fp as G
from sim.golden.pim import PimChannelModel, af_eval
from sim.pim_checker import OPCODES
from sim.pim_sequencer import PimDriver, Scheduler, gemv_resolver, write_backdoor
from sim.tb.common import tb_test, write_metrics
from sim.tb.pim_tb import _backdoor_dir, _cfg, _words_to_u32

NAMES = {v.code: v.name for v in VIOLATIONS}


@tb_test()
async def combine_edges(dut):
    """See the module docstring."""
    cfg = _cfg()
    p, t = cfg.pim, cfg.timing
    assert p.acc_stages > 1, f"{cfg.name}: this test needs a pipelined processing unit (acc_stages > 1)"
    flag = p.combine_flag
    rng = np.random.default_rng(15)
    drv = PimDriver(dut, cfg)
    await drv.reset()
    bus, st, ck = drv.bus[0], drv.status[0], drv.checkers[0]
    model = PimChannelModel(cfg)
    # Channel 0's banks: random weights in row 0, the GELU table in the reserved row.
    d = _backdoor_dir()
    weights = G.bf16_bits(rng.standard_normal((p.banks, 1, p.columns, p.lanes))).astype(np.uint16)
    lut = af_lut_row(cfg)
    for b in range(p.banks):
        write_backdoor(d, 0, b, 0, weights[b], p.columns)
        write_backdoor(d, 0, b, p.data_rows, lut[None], p.columns)
        model.load_rows(b, 0, weights[b])
        model.load_rows(b, p.data_rows, lut[None])
    await drv.backdoor_load()
    bpw = p.banks_per_word

    def word(values_u32):
        out = np.zeros(bpw, dtype="<u4")
        out[:len(values_u32)] = values_u32
        return int.from_bytes(out.tobytes(), "little")

    reads = []          # (cycle of rvalid, word)

    async def tick():
        await FallingEdge(dut.clk)
        drv.cycle += 1
        if int(bus["rvalid"].value):
            reads.append((drv.cycle - 1, int(bus["rdata"].value)))

    async def issue(op, bank=0, row=0, col=0, data=0):
        """Drive one command; the checker sees it, the golden model executes it if the checker accepts it."""
        bus["op"].value = OPCODES[op]
        bus["bank"].value, bus["row"].value, bus["col"].value = bank, row, col
        bus["data"].value, bus["mask"].value = data, drv.full_mask
        await tick()
        cyc = drv.cycle - 1
        v = ck.check(cyc, op, bank, row, col)
        result = None
        if v is None and op != "NOP":
            result = model.execute(op, bank=bank, row=row, col=col, data=data)
        bus["op"].value = 0
        return cyc, v, result

    async def idle(n):
        for _ in range(n):
            await tick()
            ck.check(drv.cycle - 1, "NOP")

    async def at(cycle):
        assert drv.cycle <= cycle, f"setup too slow: at cycle {drv.cycle}, the command is due at {cycle}"
        await idle(cycle - drv.cycle)

    def clean(what):
        assert int(st["violation"].value) == 0 and not ck.violations, \
            f"{what}: device {NAMES[int(st['vcode'].value)] if int(st['violation'].value) else '-'}, " \
            f"checker {ck.violations}"

    async def clear():
        st["clear"].value = 1
        await idle(1)
        st["clear"].value = 0
        ck.violations.clear()

    async def read(op, col=0):
        """Issue RDMAC / RDAF (legal) and return the word the device sends back, checked against the model."""
        n = len(reads)
        _, v, want = await issue(op, col=col)
        assert v is None, f"{op}: checker flagged {v}"
        await idle(t.tRL + 1)
        assert len(reads) == n + 1, f"{op}: {len(reads) - n} words returned"
        got = reads[-1][1]
        assert got == want, f"{op}: device {got:#x}, golden {want:#x}"
        return got

    async def settle():
        await idle(max(t.tRAS, t.tWR, t.tRTP, t.tMAC, t.tAF, t.tRCDRD) + 1)
        await issue("PREAB")
        await idle(t.tRP + t.tRFC + 1)
        clean("settle")

    async def open_and_load(row):
        """ACTAB ``row``, random inputs into the global buffer, random biases into every accumulator."""
        await issue("ACTAB", row=row)
        for c in range(p.gb_columns):
            x = G.bf16_bits(rng.standard_normal(p.lanes))
            await issue("WRGB", col=c, data=PimChannelModel.lanes_to_word(x))
        await idle(t.tRCDRD)
        for g in range(p.acc_groups):
            bias = G.f32_bits(rng.standard_normal(bpw).astype(np.float32))
            await issue("WRBIAS", col=g, data=word(bias))
        await idle(t.tCCD)

    async def combining_run(row=0, n=5):
        """``n`` MACs (the last one combining) on the open row; returns the cycle of the combining MAC."""
        for c in range(n):
            cyc, v, _ = await issue("MACAB", col=c % p.columns, row=flag if c == n - 1 else 0)
            assert v is None, f"MACAB: checker flagged {v}"
            await idle(t.tCCD - 1)
        return cyc

    def flagged(rule, what):
        assert int(st["violation"].value) and NAMES[int(st["vcode"].value)] == rule, \
            f"{what}: device flagged {NAMES[int(st['vcode'].value)] if int(st['violation'].value) else 'nothing'}"
        assert ck.violations and ck.violations[0][1] == rule, f"{what}: checker saw {ck.violations}"

    checked = []
    # --- tMAC after a combining MAC, at its edge ------------------------------------------------------------
    for op in ("RDMAC", "WRBIAS", "MACAB", "AF"):
        for early in (True, False):
            await settle()
            row = p.data_rows if op == "AF" else 0
            await open_and_load(row)
            start = await combining_run(row)
            clean(f"{op} setup")
            counts = {k: drv.rtl_status(0)[k] for k in ("n_rdmac", "n_mac", "n_af")}
            await at(start + t.tMAC - (1 if early else 0))
            n_reads = len(reads)
            bias = G.f32_bits(rng.standard_normal(bpw).astype(np.float32))
            fields = {"RDMAC": dict(col=0), "WRBIAS": dict(col=0, data=word(bias)), "MACAB": dict(col=5),
                      "AF": {}}[op]
            _, v, want = await issue(op, **fields)
            await idle(t.tRL + 1)
            what = f"{op} {'one cycle before' if early else 'exactly'} tMAC={t.tMAC} after a combining MAC"
            after = {k: drv.rtl_status(0)[k] for k in counts}
            if early:
                flagged("PU_BUSY", what)
                assert after == counts and len(reads) == n_reads, f"{what}: executed ({counts} -> {after})"
                await clear()
                await idle(t.tMAC)
            else:
                clean(what)
                if op == "RDMAC":
                    assert len(reads) == n_reads + 1 and reads[-1][1] == want, \
                        f"{what}: read {reads[n_reads:]}, golden {want:#x}"
            # What the accumulators hold now (the combined total, the preload, the total with one more
            # column, or the AF result) must be the golden model's.
            if op == "MACAB" and not early:
                await combining_run(row, 1)       # combine the column just added
                await idle(t.tMAC)
            if op == "AF":
                await idle(t.tAF)
                await read("RDAF", 0)
            else:
                await idle(t.tMAC)
                for g in range(p.acc_groups):
                    await read("RDMAC", g)
            clean(f"{what}: read back")
        checked.append(f"PU_BUSY:{op}")

    # --- uncombined partial sums: RDMAC / AF refused until a combining MAC or a preload -------------------
    await settle()
    await open_and_load(0)
    await issue("MACAB", col=0)                     # a plain MAC: partials not combined
    await idle(t.tMAC)
    for op in ("RDMAC",):
        n_reads = len(reads)
        await issue(op, col=0)
        await idle(t.tRL + 1)
        flagged("PU_BUSY", f"{op} of uncombined partial sums")
        assert len(reads) == n_reads, f"{op} of uncombined partial sums executed"
        await clear()
    bias = G.f32_bits(rng.standard_normal(bpw).astype(np.float32))
    for g in range(p.acc_groups):
        await issue("WRBIAS", col=g, data=word(bias))   # a preload: nothing uncombined
    await idle(t.tCCD)
    await read("RDMAC", 0)
    clean("RDMAC after a preload")
    await issue("MACSB", bank=1, col=1)             # one bank's partials not combined
    await idle(t.tMAC)
    await issue("RDMAC", col=(1 // bpw))
    flagged("PU_BUSY", "RDMAC of a group with one uncombined bank")
    await clear()
    await issue("MACSB", bank=1, col=2, row=flag)   # that bank's combining MAC
    await idle(t.tMAC)
    await read("RDMAC", 1 // bpw)
    clean("RDMAC after the bank's combining MAC")
    checked.append("PU_BUSY:RDMAC-uncombined")
    await settle()
    await open_and_load(p.data_rows)
    await idle(t.tMAC)
    await issue("MACAB", col=0)
    await idle(t.tMAC)
    n_af = drv.rtl_status(0)["n_af"]
    await issue("AF")
    await idle(1)
    flagged("PU_BUSY", "AF of uncombined partial sums")
    assert drv.rtl_status(0)["n_af"] == n_af, "AF of uncombined partial sums executed"
    await clear()
    await issue("MACAB", col=1, row=flag)
    await idle(t.tMAC)
    await issue("AF")
    await idle(t.tAF)
    await read("RDAF", 0)
    clean("AF after a combining MAC")
    checked.append("PU_BUSY:AF-uncombined")
    await settle()
    write_metrics(name="pim_combine_edges", config=cfg.name, rules=checked)
    dut._log.info("%d combine rules checked at their edges: %s", len(checked), ", ".join(checked))


def _with_refresh(program, split_row: int, after_macs: int, lut_row: int):
    """``program`` with PREAB, REF and ACTAB of the same row after the ``after_macs``-th MAC of the
    ``split_row``-th weight row (LUT rows not counted): the accumulators keep uncombined partial sums across it."""
    row_i = -1
    macs = 0
    current = None
    for op, fields in program:
        yield op, fields
        if op == "ACTAB" and fields["row"] != lut_row:
            current = fields["row"]
            row_i += 1
            macs = 0
        elif op == "MACAB":
            macs += 1
            if row_i == split_row and macs == after_macs:
                yield "PREAB", {}
                yield "REF", {}
                yield "ACTAB", {"row": current}


@tb_test()
async def refresh_mid_row(dut):
    """GEMVs with a refresh between two MACs of a row (partial sums held across it): same bits as without,
    and the golden model's."""
    cfg = _cfg()
    p = cfg.pim
    drv = PimDriver(dut, cfg)
    await drv.reset()
    state = {}
    report = []
    for i, (K, N, act, split_row, after) in enumerate([(200, 24, False, 2, 2), (200, 24, True, 3, 3),
                                                       (96, 64, False, 1, 4)]):
        rng = np.random.default_rng(150 + i)
        w = G.bf16_bits(rng.standard_normal((K, N)) / np.sqrt(K))
        x = G.bf16_bits(rng.standard_normal(K))
        bias = G.f32_bits(rng.standard_normal(N).astype(np.float32) * np.float32(0.1))
        layout = GemvLayout(cfg, K, N)
        want = gemv_golden(cfg, w, x, bias)
        seq = gemv_golden(cfg.replace(**{"pim.acc_stages": 1}), w, x, bias)
        assert np.any(want != seq), f"{K}x{N}: the interleaved order gives the sequential bits (no test)"
        if act:
            want = af_eval(cfg, want, af_lut_row(cfg))
        d = _backdoor_dir()
        packed = layout.pack(w)
        for c in range(p.channels):
            for b in range(p.banks):
                write_backdoor(d, c, b, 0, packed[c, b], p.columns)
                if act:
                    write_backdoor(d, c, b, p.data_rows, af_lut_row(cfg)[None], p.columns)
        await drv.backdoor_load()
        ys = []
        for refresh in (False, True):
            if "sch" not in state:
                state["sch"] = Scheduler(cfg, start=drv.cycle + 1)
            sch = state["sch"]
            sch.slots = []
            sch.t = max(sch.t, drv.cycle)
            sch.refresh_ahead()
            first = len(sch.slots)
            program = gemv_program(layout, with_bias=True, activation=act)
            if refresh:
                program = _with_refresh(program, split_row, after, p.data_rows)
            slots = sch.run_program(program)
            results = {}
            resolve = gemv_resolver(cfg, layout, x, bias, lambda c, tile, g, results=results: int.from_bytes(
                np.asarray(results[(c, tile, g)], dtype="<u4").tobytes(), "little"))

            def on_read(c, slot, word, results=results):
                results[(c, slot.tag[1], slot.tag[2])] = _words_to_u32(word, p.banks_per_word)

            n_ref = drv.rtl_status(0)["n_ref"]
            await drv.play([slots] * p.channels, resolve=resolve, on_read=on_read)
            refs = drv.rtl_status(0)["n_ref"] - n_ref
            mid = sum(1 for s in slots[first:] if s.op == "REF")
            y = np.zeros(layout.tiles * layout.per_tile, dtype=np.uint32)
            for (c, tile, g), vals in results.items():
                for k in range(p.banks_per_word):
                    b = g * p.banks_per_word + k
                    if b < p.banks:
                        y[layout.output_index(tile, c, b)] = vals[k]
            y = y[:N]
            bad = np.flatnonzero(y != want)
            assert bad.size == 0, (f"GEMV {K}x{N}{'+GELU' if act else ''} refresh={refresh}: {bad.size} outputs "
                                   f"differ from the golden model; first n={bad[0]}: {int(y[bad[0]]):#x} vs "
                                   f"{int(want[bad[0]]):#x}")
            if refresh:
                assert refs >= 1 and mid >= 1, f"GEMV {K}x{N}: no refresh inside the GEMV ({refs} executed)"
            ys.append(y)
            cycles = slots[-1].cycle - slots[first].cycle
            report.append({"shape": f"{K}x{N}" + ("+GELU" if act else ""), "refresh": refresh, "cycles": cycles,
                           "refs": mid})
        assert np.array_equal(ys[0], ys[1])
    drv.assert_clean()
    write_metrics(name="pim_refresh_mid_row", config=cfg.name, runs=report)
    dut._log.info("refresh mid-row: %s", report)
