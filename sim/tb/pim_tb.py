"""cocotb testbenches for the PIM device (hw/pim): normal traffic, GEMV, GELU, illegal sequences, back door.

Every test runs the independent protocol checker (sim/pim_checker.py) on the
bus the device saw and requires both it and the device's own sticky violation
flag to stay clean (except the illegal-sequence test, which expects them).
The configuration comes from ``IANUS_CONFIG`` (a preset name), with ``IANUS_TIMING`` overrides.
"""

from __future__ import annotations

import json
import os
import time

import numpy as np
from cocotb.triggers import FallingEdge

from firmware.pim import (
    GemvLayout,
    af_lut_row,
    amortized_cycles,
    gelu,
    gemv_golden,
    gemv_lower_bound,
    gemv_program,
)
from hw.spec import fp as G
from sim.golden.pim import PimChannelModel, af_eval
from sim.pim_sequencer import PimDriver, Scheduler, gemv_resolver, write_backdoor
from sim.tb.common import env_config, env_int, env_str, tb_test, write_metrics


def _cfg():
    """The preset ``IANUS_CONFIG`` with the ``timing.*`` overrides of ``IANUS_TIMING`` (``"tCCD=2,tRRD=3"``)."""
    return env_config("tiny", "IANUS_TIMING", "timing")


async def _driver(dut):
    """``(cfg, driver)``: the configuration (:func:`_cfg`) and a :class:`PimDriver` of it, out of reset."""
    cfg = _cfg()
    drv = PimDriver(dut, cfg)
    await drv.reset()
    return cfg, drv


def _backdoor_dir():
    d = os.environ["IANUS_BACKDOOR"]
    os.makedirs(d, exist_ok=True)
    for f in os.listdir(d):
        os.unlink(os.path.join(d, f))
    return d


def _words_to_u32(word: int, count: int) -> np.ndarray:
    return np.frombuffer(int(word).to_bytes(count * 4, "little"), dtype="<u4")[:count].copy()


@tb_test()
async def normal_traffic(dut):
    """Random ACT/RD/WR/PRE on every channel with refreshes, scoreboarded against the golden channel model."""
    cfg, drv = await _driver(dut)
    p = cfg.pim
    rng = np.random.default_rng(env_int("SEED", 7))
    n_ops = env_int("N_OPS", 400)
    schedules, expected = [], []
    forced_ref_at = n_ops // 2
    for _ in range(p.channels):
        sch = Scheduler(cfg, start=drv.cycle + 1)
        model = PimChannelModel(cfg)
        exp = []
        for i in range(n_ops):
            if i == forced_ref_at:                 # a refresh in the middle, whatever is owed
                sch.place("PREAB")
                model.execute("PREAB")
                sch.place("REF")
            sch.refresh_point() if not any(b.open for b in sch.model.banks) else None
            bank = int(rng.integers(p.banks))
            if not sch.model.banks[bank].open:
                row = int(rng.integers(p.rows))
                sch.place("ACT", bank=bank, row=row)
                model.execute("ACT", bank=bank, row=row)
                continue
            kind = rng.random()
            col = int(rng.integers(p.columns))
            if kind < 0.4:
                data = int.from_bytes(rng.bytes(p.column_bytes), "little")
                mask = (1 << p.column_bytes) - 1 if rng.random() < 0.8 else int(rng.integers(1, 1 << p.column_bytes))
                sch.place("WR", bank=bank, col=col, data=data, mask=mask)
                model.execute("WR", bank=bank, col=col, data=data, mask=mask)
            elif kind < 0.85:
                slot = sch.place("RD", bank=bank, col=col)
                exp.append((slot.cycle, model.execute("RD", bank=bank, col=col)))
            else:
                sch.place("PRE", bank=bank)
                model.execute("PRE", bank=bank)
                sch.refresh_point() if not any(b.open for b in sch.model.banks) else None
        schedules.append(sch.slots)
        expected.append(exp)

    got = [[] for _ in range(p.channels)]
    await drv.play(schedules, on_read=lambda c, slot, word: got[c].append((slot.cycle, word)))
    drv.assert_clean()
    for c in range(p.channels):
        assert len(got[c]) == len(expected[c]), f"channel {c}: {len(got[c])} reads returned, {len(expected[c])} issued"
        for (cyc, word), (ecyc, eword) in zip(got[c], expected[c], strict=True):
            assert cyc == ecyc and word == eword, f"channel {c} RD at cycle {cyc}: {word:#x} != {eword:#x}"
    refs = [drv.rtl_status(c)["n_ref"] for c in range(p.channels)]
    assert all(r >= 1 for r in refs), f"no refresh executed: {refs}"
    dut._log.info("%d reads bit-exact per channel, refreshes %s", len(expected[0]), refs)


def _gemv_data(cfg, K, N, seed):
    rng = np.random.default_rng(seed)
    w = G.bf16_bits(rng.standard_normal((K, N)) / np.sqrt(K))
    x = G.bf16_bits(rng.standard_normal(K))
    bias = G.f32_bits(rng.standard_normal(N).astype(np.float32) * np.float32(0.1))
    return w, x, bias


async def run_gemv(drv: PimDriver, sch_for, layout: GemvLayout, w, x, bias, backdoor=True, activation=False):
    """Load ``w`` for ``layout`` (back door), run the GEMV program on every channel; return (y bits, cycles).

    With ``activation`` the GELU table goes into every bank's reserved row and the
    results come from the AF units."""
    cfg = drv.cfg
    p = cfg.pim
    if backdoor:
        d = _backdoor_dir()
        packed = layout.pack(w)
        lut = af_lut_row(cfg)
        for c in range(p.channels):
            for b in range(p.banks):
                write_backdoor(d, c, b, layout.base_row, packed[c, b], p.columns)
                if activation:
                    write_backdoor(d, c, b, p.data_rows, lut[None], p.columns)
        await drv.backdoor_load()
    sch = sch_for(drv.cycle + 1)
    sch.refresh_ahead()
    first = len(sch.slots)
    slots = sch.run_program(gemv_program(layout, with_bias=True, activation=activation))
    bpw = p.banks_per_word
    results = {}
    resolve = gemv_resolver(cfg, layout, x, bias, lambda c, tile, g: int.from_bytes(
        np.asarray(results[(c, tile, g)], dtype="<u4").tobytes(), "little"))
    npad = layout.tiles * layout.per_tile

    def on_read(c, slot, word):
        results[(c, slot.tag[1], slot.tag[2])] = _words_to_u32(word, bpw)

    t0 = slots[first].cycle
    end = await drv.play([slots] * p.channels, resolve=resolve, on_read=on_read)
    cycles = slots[-1].cycle + cfg.timing.tRL + 1 - t0
    y = gather_outputs(layout, results.items(), bpw, p.banks, npad)
    refs = sum(1 for s_ in slots[first:] if s_.op == "REF")
    return y[:layout.N], cycles, end, refs


def gather_outputs(layout, words, bpw: int, banks: int, size: int) -> np.ndarray:
    """The GEMV's output vector (``size`` uint32) from its RDMAC words: ``((channel, tile, group), values)``
    with ``bpw`` banks' results per word, bank ``group * bpw + k`` at ``layout.output_index(tile, channel,
    bank)`` (the words of padding banks past ``banks`` ignored)."""
    y = np.zeros(size, dtype=np.uint32)
    for (c, tile, g), vals in words:
        for k in range(bpw):
            b = g * bpw + k
            if b < banks:
                y[layout.output_index(tile, c, b)] = vals[k]
    return y


@tb_test()
async def gemv(dut):
    """GEMV shapes from env GEMV_SHAPES ("KxN,KxN"): bit-exact vs golden, bounded vs float64, cycle efficiency."""
    cfg, drv = await _driver(dut)
    # "KxN" or "KxNg" (with GELU through the AF units); "KxNpPsS[g]": a packed layout (pitch P, first slot S:
    # firmware.pim.GemvLayout, the GEMV macro's addr1) run by gemv_program's packed order.
    shapes = []
    for s in env_str("GEMV_SHAPES", "96x64").split(","):
        kn, _, pk = s.rstrip("g").partition("p")
        pitch, _, slot0 = pk.partition("s")
        shapes.append((int(kn.split("x")[0]), int(kn.split("x")[1]), s.endswith("g"), int(pitch or 0),
                       int(slot0 or 0)))
    min_eff = float(env_str("MIN_EFFICIENCY", "0.95"))
    state = {}

    def sch_for(start):
        # One scheduler (the controller's view of the device) across the whole test.
        if "sch" not in state:
            state["sch"] = Scheduler(cfg, start=start)
        sch = state["sch"]
        sch.slots = []
        sch.t = max(sch.t, start - 1)
        return sch

    report = []
    for i, (K, N, act, pitch, slot0) in enumerate(shapes):
        w, x, bias = _gemv_data(cfg, K, N, seed=100 + i)
        layout = GemvLayout(cfg, K, N, 0, pitch, slot0)
        y, cycles, _, refs = await run_gemv(drv, sch_for, layout, w, x, bias, activation=act)
        want = gemv_golden(cfg, w, x, bias)
        pre = want
        if act:
            want = af_eval(cfg, pre, af_lut_row(cfg))
        bad = np.flatnonzero(y != want)
        assert bad.size == 0, (f"GEMV {K}x{N}: {bad.size} outputs differ from the golden model; first n={bad[0]}: "
                               f"RTL {int(y[bad[0]]):#x} golden {int(want[bad[0]]):#x}")
        # Golden vs float64: |err| <= (log2(lanes) + K/lanes + 1) * 2^-24 * (sum |w x| + |bias|).
        wf = G.bf16_to_f32(w).astype(np.float64)
        xf = G.bf16_to_f32(x).astype(np.float64)
        bf = G.bits_to_f32(bias).astype(np.float64)
        exact = xf @ wf + bf
        scale = np.abs(xf) @ np.abs(wf) + np.abs(bf)
        nterms = np.log2(cfg.pim.lanes) + -(-K // cfg.pim.lanes) + 1
        bound = nterms * 2.0**-24 * scale
        if act:
            # GELU of the exact pre-activation; GELU's slope is at most 1.13, plus the AF unit's bound.
            step = 16.0 / cfg.pim.af_segments
            pref = G.bits_to_f32(pre).astype(np.float64)
            bound = 1.13 * bound + 0.8 * step**2 / 8 + 2.0**-8 * np.abs(pref) * 1.13 + 1e-6
            exact = gelu(exact)
            scale = np.maximum(np.abs(exact), 1.0)
        err = np.abs(G.bits_to_f32(y).astype(np.float64) - exact)
        assert np.all(err <= bound), f"GEMV {K}x{N}: error vs float64 above bound at {np.argmax(err - bound)}"
        lb = gemv_lower_bound(cfg, K, N, activation=act, pitch=pitch, slot0=slot0)
        measured_am = amortized_cycles(cfg, cycles, refs)
        eff = lb["amortized_cycles"] / measured_am
        rel = float(np.max(err / np.maximum(scale, 1e-30)))
        p = cfg.pim
        weight_bytes = lb["macs"] * p.banks * p.channels * p.column_bytes
        report.append({"shape": f"{K}x{N}" + (f"p{pitch}s{slot0}" if pitch else "") + ("+GELU" if act else ""),
                       "cycles": cycles, "bound": lb["cycles"], "efficiency": eff,
                       "amortized_cycles": measured_am, "amortized_bound": lb["amortized_cycles"],
                       "max_rel_err": rel, "max_abs_err": float(err.max()), "refreshes": refs,
                       "weight_bytes": weight_bytes,
                       "internal_gbps": weight_bytes / (cycles / (cfg.clocks.pim_mhz * 1e6)) / 1e9,
                       "peak_gbps": cfg.pim_peak_internal_gbps})
        dut._log.info("GEMV %dx%d%s: %d cycles (%d REF), amortized %.0f, bound %.0f, efficiency %.3f, "
                      "max err/scale %.2e", K, N, "+GELU" if act else "", cycles, refs, measured_am, lb["amortized_cycles"], eff, rel)
        assert min_eff <= 0 or measured_am <= lb["amortized_cycles"] / min_eff, (
            f"GEMV {K}x{N}: efficiency {eff:.3f} below {min_eff} ({cycles} cycles with {refs} REF, bound {lb})")
    drv.assert_clean()
    st = drv.rtl_status(0)
    write_metrics(name="pim_gemv", config=cfg.name, shapes=report, n_ref=st["n_ref"], n_mac=st["n_mac"])


@tb_test()
async def gelu_af(dut):
    """AF unit with the GELU table in the reserved row: bit-exact vs golden, bounded vs float64 GELU."""
    cfg, drv = await _driver(dut)
    p = cfg.pim
    rng = np.random.default_rng(env_int("SEED", 11))
    n_rounds = env_int("N_ROUNDS", 8)
    lut = af_lut_row(cfg)
    d = _backdoor_dir()
    for c in range(p.channels):
        for b in range(p.banks):
            write_backdoor(d, c, b, p.data_rows, lut[None], p.columns)
    await drv.backdoor_load()
    sch = Scheduler(cfg, start=drv.cycle + 1)
    bpw = p.banks_per_word
    xs = []
    for r in range(n_rounds):
        vals = rng.uniform(-10, 10, (p.channels, p.acc_groups * bpw)).astype(np.float32)
        if r == 0:      # specials: zeros, segment edges, out of range
            special = np.array([0.0, -0.0, 8.0, -8.0, 7.9999, -7.9999, 100.0, -100.0, 0.0625, -0.0625,
                                1e-30, 3.0, -3.0, 0.5, -0.5, 1.0], dtype=np.float32)
            vals[:, :min(special.size, vals.shape[1])] = special[:vals.shape[1]]
        xs.append(G.f32_bits(vals))
        for g in range(p.acc_groups):
            sch.place("WRBIAS", col=g, data=("x", r, g))
        act, pre = ("PACTAB", "PPREAB") if p.row_buffers == 2 else ("ACTAB", "PREAB")
        sch.place(act, row=p.data_rows)
        sch.place("AF")
        sch.place(pre)
        for g in range(p.acc_groups):
            sch.place("RDAF", col=g, tag=(r, g))
        sch.refresh_point()
    out = {}

    def resolve(c, ref):
        _, r, g = ref
        return int.from_bytes(xs[r][c, g * bpw:(g + 1) * bpw].astype("<u4").tobytes(), "little")

    def on_read(c, slot, word):
        out[(c, *slot.tag)] = _words_to_u32(word, bpw)

    await drv.play([sch.slots] * p.channels, resolve=resolve, on_read=on_read)
    drv.assert_clean()
    worst = 0.0
    for r in range(n_rounds):
        for c in range(p.channels):
            x = xs[r][c, :p.banks]
            got = np.concatenate([out[(c, r, g)] for g in range(p.acc_groups)])[:p.banks]
            want = af_eval(cfg, x, lut)
            assert np.array_equal(got, want), f"AF round {r} channel {c}: RTL {got} golden {want}"
            xf = G.bits_to_f32(x).astype(np.float64)
            err = np.abs(G.bits_to_f32(got).astype(np.float64) - gelu(xf))
            step = 16.0 / p.af_segments
            # Interpolation (step^2/8 * max|gelu''| ~ 0.8) + BF16 rounding of x (2^-8 |slope x|) + FP32.
            bound = 0.8 * step**2 / 8 + 2.0**-8 * np.abs(xf) * 1.13 + 1e-6
            assert np.all(err <= bound), f"AF error {err.max():.3g} above bound at x={xf[np.argmax(err - bound)]}"
            worst = max(worst, float(err.max()))
    write_metrics(name="pim_gelu", config=cfg.name, max_abs_err=worst)
    dut._log.info("GELU via AF: %d values bit-exact, max |err| vs float64 %.3g", n_rounds * p.banks * p.channels,
                  worst)


@tb_test()
async def illegal_sequences(dut):
    """Deliberately illegal commands: each must be flagged by the device (code) and the checker (same name),
    and must not execute (a read afterwards still returns the old data)."""
    from hw.pim.commands import VIOLATIONS

    cfg, drv = await _driver(dut)
    t = cfg.timing
    names = {v.code: v.name for v in VIOLATIONS}
    bus, st = drv.bus[0], drv.status[0]
    ck = drv.checkers[0]

    async def issue(op, bank=0, row=0, col=0, data=0):
        from sim.pim_checker import OPCODES
        bus["op"].value = OPCODES.get(op, op) if isinstance(op, str) else op
        bus["bank"].value, bus["row"].value, bus["col"].value = bank, row, col
        bus["data"].value, bus["mask"].value = data, drv.full_mask
        await FallingEdge(dut.clk)
        drv.cycle += 1
        opv = int(bus["op"].value)
        ck.check(drv.cycle - 1, opv, bank, row, col)
        bus["op"].value = 0

    async def idle(n):
        for _ in range(n):
            await FallingEdge(dut.clk)
            drv.cycle += 1
            ck.check(drv.cycle - 1, "NOP")

    async def expect(name, *cmd, **kw):
        before = len(ck.violations)
        await issue(*cmd, **kw)
        await idle(1)
        code = int(st["vcode"].value)
        assert int(st["violation"].value) == 1, f"{cmd}: device did not flag {name}"
        assert names[code] == name, f"{cmd}: device flagged {names[code]}, expected {name}"
        new = ck.violations[before:]
        assert new and new[0][1] == name, f"{cmd}: checker saw {new}, expected {name}"
        st["clear"].value = 1
        await idle(1)
        st["clear"].value = 0
        await idle(1)

    await idle(2)
    await expect("BANK_CLOSED", "RD", bank=1, col=0)
    await issue("ACT", bank=1, row=3)
    await expect("T_RCD", "RD", bank=1, col=0)          # tRCD not yet elapsed
    await expect("T_RAS", "PRE", bank=1)
    await expect("BANK_OPEN", "ACT", bank=1, row=4)
    if t.tRRD > 1:
        await issue("ACT", bank=2, row=0)
        await expect("T_RRD", "ACT", bank=3, row=0)
    await idle(max(t.tRCDWR, t.tRCDRD, t.tRAS, t.tFAW) + 1)
    await issue("WR", bank=1, col=2, data=0x1234)
    await expect("T_WR", "PRE", bank=1)                  # write recovery
    await expect("ILLEGAL_OPCODE", 31)
    await expect("BAD_ADDRESS", "RDMAC", col=cfg.pim.acc_groups)
    await expect("BANK_OPEN", "REF")
    if cfg.pim.row_buffers == 1:     # (with two, MACs read the PIM buffer: see _illegal_dual)
        await issue("MACSB", bank=1, col=0)
        await expect("PU_BUSY", "RDMAC", col=0)          # within tMAC of a MAC
        await expect("BANK_CLOSED", "MACAB", col=0)      # not every bank is open
    await idle(t.tWR + t.tMAC + 2)
    # The illegal RD/WR/ACT above did not execute: the row still holds 0x1234 at column 2.
    got = []
    await issue("RD", bank=1, col=2)
    for _ in range(t.tRL + 1):
        if int(bus["rvalid"].value):
            got.append(int(bus["rdata"].value))
        await idle(1)
    assert got == [0x1234], f"read after illegal commands returned {got}"
    assert int(st["violation"].value) == 0
    # Row-cycle and refresh rules.
    await issue("PREAB")
    await expect("T_RP", "ACT", bank=1, row=0)           # tRP after PRE
    await idle(t.tRP + 1)
    await issue("REF")
    await expect("T_RFC", "ACT", bank=0, row=0)          # tRFC after REF
    await idle(t.tRFC + 1)
    p = cfg.pim
    if p.banks >= 5 and t.tFAW > 4 * t.tRRD:
        for b in range(4):
            await issue("ACT", bank=b, row=0)
            await idle(t.tRRD - 1)
        await expect("T_FAW", "ACT", bank=4, row=0)      # fifth ACT inside tFAW
        await idle(t.tFAW + t.tRAS)
        await issue("PREAB")
        await idle(t.tRP + 1)
    if p.row_buffers == 2:
        await _illegal_dual(cfg, drv, issue, idle, expect)
    else:
        await expect("ILLEGAL_OPCODE", "PACTAB", row=0)   # only with two row buffers
    if env_int("CHECK_REFRESH_LATE", 0):
        # No REF for more than refresh_postpone x tREFI: both must report REFRESH_LATE.
        before = len(ck.violations)
        owed = ck.owed(drv.cycle)
        await idle((t.refresh_postpone + 1 - owed) * t.tREFI + 2)
        assert int(st["violation"].value) == 1 and names[int(st["vcode"].value)] == "REFRESH_LATE", \
            f"device did not flag REFRESH_LATE: code {names[int(st['vcode'].value)]}"
        assert any(v[1] == "REFRESH_LATE" for v in ck.violations[before:]), "checker did not flag REFRESH_LATE"
    dut._log.info("every illegal command flagged by device and checker, none executed")


async def _illegal_dual(cfg, drv, issue, idle, expect):
    """The rules between the two row buffers (their own timing rules are in ``timing_edges``); every bank
    is closed on entry."""
    t = cfg.timing
    r_pim, r_norm = 1, 2
    st = drv.status[0]

    async def at(cycle):                # idle until the next command would be on ``cycle``
        assert drv.cycle <= cycle, f"sequence too slow: at {drv.cycle}, wanted {cycle}"
        await idle(cycle - drv.cycle)

    async def accepted(*cmd, **kw):
        before = len(drv.checkers[0].violations)
        await issue(*cmd, **kw)
        await idle(1)
        assert int(st["violation"].value) == 0, f"{cmd} {kw}: device flagged code {int(st['vcode'].value)}"
        assert len(drv.checkers[0].violations) == before, f"{cmd}: checker flagged {drv.checkers[0].violations[-1]}"

    async def cleanup():
        await idle(t.tRAS + t.tRTP + t.tMAC)
        await issue("PPREAB")
        await issue("PREAB")
        await idle(t.tRP + t.tFAW + 1)

    async def open_pim():
        await issue("PACTAB", row=r_pim)

    # Rules between the buffers.
    await issue("ACT", bank=1, row=r_norm)
    await idle(max(t.tRRD, t.tFAW))
    await expect("BANK_OPEN", "PACTAB", row=r_norm)       # bank 1's normal buffer holds that row
    await idle(max(t.tRRD, t.tFAW))
    await expect("BANK_CLOSED", "MACAB", col=0)           # the PIM buffer is closed (the normal one is not)
    await idle(t.tRCDRD)
    await open_pim()
    await expect("BANK_OPEN", "ACT", bank=2, row=r_pim)   # the PIM buffer holds that row
    await expect("BANK_OPEN", "PACTAB", row=r_pim + 1)    # already open
    await expect("BANK_OPEN", "REF")                      # rows open in both buffers
    await idle(t.tRCDRD)
    await accepted("MACAB", col=0)
    await accepted("RD", bank=1, col=0)                   # a normal read right after a PIM read: no extra delay
    await cleanup()


@tb_test()
async def timing_edges(dut):
    """Every timing rule at its edge: the constrained command one cycle early is flagged by the device (its
    code) and by the independent checker (the same name) and is not executed; on the exact cycle it is
    accepted by both. Rules: tRCD (RD and WR), tRAS, tRP, tWR, tRTP, tRRD, tFAW, tCCD, tRFC (ACT and REF),
    tMAC, tAF and, with two row buffers, the PIM buffer's tRCD, tRAS, tRTP and tRP. (The refresh deadline:
    ``illegal_sequences`` with CHECK_REFRESH_LATE.)"""
    from hw.pim.commands import VIOLATIONS

    cfg, drv = await _driver(dut)
    t, p = cfg.timing, cfg.pim
    dual = p.row_buffers == 2
    act_pim, pre_pim = ("PACTAB", "PPREAB") if dual else ("ACTAB", "PREAB")
    names = {v.code: v.name for v in VIOLATIONS}
    bus, st, ck = drv.bus[0], drv.status[0], drv.checkers[0]
    from sim.pim_checker import OPCODES

    async def issue(op, bank=0, row=0, col=0):
        bus["op"].value = OPCODES[op]
        bus["bank"].value, bus["row"].value, bus["col"].value = bank, row, col
        bus["data"].value, bus["mask"].value = 0, drv.full_mask
        await FallingEdge(dut.clk)
        drv.cycle += 1
        ck.check(drv.cycle - 1, op, bank, row, col)
        bus["op"].value = 0
        return drv.cycle - 1

    async def idle(n):
        for _ in range(n):
            await FallingEdge(dut.clk)
            drv.cycle += 1
            ck.check(drv.cycle - 1, "NOP")

    async def at(cycle):
        assert drv.cycle <= cycle, f"setup too slow: at cycle {drv.cycle}, the command is due at {cycle}"
        await idle(cycle - drv.cycle)

    async def settle():
        # Every window of every rule over; every row of both buffers closed.
        await idle(max(t.tRAS, t.tWR, t.tRTP, t.tMAC, t.tAF, t.tRCDRD) + 1)
        await issue("PREAB")
        if dual:
            await issue("PPREAB")
        await idle(t.tRP + t.tFAW + t.tRFC + 1)

    # Setups: issue the command that opens the window, return (its cycle, what the check needs).
    async def s_act():
        return await issue("ACT", bank=1, row=3)

    async def s_act_then(op, wait):
        await issue("ACT", bank=1, row=3)
        await idle(wait)
        return await issue(op, bank=1, col=2)

    async def s_pre():
        await issue("ACT", bank=1, row=3)
        await idle(t.tRAS)
        return await issue("PRE", bank=1)

    async def s_acts(n):
        c = None
        for b in range(n):
            c0 = await issue("ACT", bank=b, row=3)
            c = c0 if c is None else c
            await idle(t.tRRD - 1)
        return c

    async def s_ref():
        return await issue("REF")

    async def s_mac():
        await issue(act_pim, row=0)
        await idle(t.tRCDRD)
        # A combining MAC with a pipelined unit (acc_stages > 1; row 0, a plain MAC, otherwise): RDMAC reads
        # the combined total (tests/test_pim_pipelined.py tests the combine's own rules).
        return await issue("MACAB", col=0, row=p.combine_flag)

    async def s_af():
        await issue(act_pim, row=p.data_rows)
        await idle(max(t.tRCDRD, t.tMAC))
        return await issue("AF")

    async def s_pact():
        return await issue(act_pim, row=0)

    async def s_ppre():
        await issue(act_pim, row=0)
        await idle(t.tRAS)
        return await issue(pre_pim)

    async def s_pmac_rtp():
        await issue(act_pim, row=0)
        await idle(max(t.tRCDRD, t.tRAS))
        return await issue("MACAB", col=0)

    # (violation, setup, window in cycles, constrained command, its fields)
    rules = [
        ("T_RCD", s_act, t.tRCDRD, "RD", dict(bank=1, col=0)),
        ("T_RCD", s_act, t.tRCDWR, "WR", dict(bank=1, col=0)),
        ("T_RAS", s_act, t.tRAS, "PRE", dict(bank=1)),
        ("T_RP", s_pre, t.tRP, "ACT", dict(bank=1, row=4)),
        ("T_WR", lambda: s_act_then("WR", max(t.tRCDWR, t.tRAS)), t.tWR, "PRE", dict(bank=1)),
        ("T_RTP", lambda: s_act_then("RD", max(t.tRCDRD, t.tRAS)), t.tRTP, "PRE", dict(bank=1)),
        ("T_RRD", s_act, t.tRRD, "ACT", dict(bank=2, row=3)),
        ("T_CCD", lambda: s_act_then("RD", t.tRCDRD), t.tCCD, "RD", dict(bank=1, col=3)),
        ("T_RFC", s_ref, t.tRFC, "ACT", dict(bank=1, row=3)),
        ("T_RFC", s_ref, t.tRFC, "REF", {}),
        ("PU_BUSY", s_mac, t.tMAC, "RDMAC", dict(col=0)),
        ("PU_BUSY", s_af, t.tAF, "RDAF", dict(col=0)),
        ("T_RCD", s_pact, t.tRCDRD, "MACAB", dict(col=0)),
    ]
    if dual:
        rules += [("T_RAS", s_pact, t.tRAS, "PPREAB", {}),
                  ("T_RTP", s_pmac_rtp, t.tRTP, "PPREAB", {}),
                  ("T_RP", s_ppre, t.tRP, "PACTAB", dict(row=0))]
    # tFAW: the fifth ACT inside the window, where tRRD alone would allow it.
    if p.banks >= 5 and t.tFAW - 1 >= 4 * t.tRRD:
        rules.append(("T_FAW", lambda: s_acts(4), t.tFAW, "ACT", dict(bank=4, row=3)))
    checked = []
    for rule, setup, window, op, fields in rules:
        for early in (True, False):
            if early and window <= 1:
                continue               # a one-cycle window has no early cycle
            await settle()
            before = len(ck.violations)
            start = await setup()
            assert int(st["violation"].value) == 0 and len(ck.violations) == before, \
                f"{rule}: setup flagged {names[int(st['vcode'].value)]} / {ck.violations[before:]}"
            await at(start + window - (1 if early else 0))
            await issue(op, **fields)
            await idle(1)
            flagged = int(st["violation"].value)
            new = ck.violations[before:]
            if early:
                assert flagged and names[int(st["vcode"].value)] == rule, \
                    f"{op} one cycle inside {rule}: device flagged {names[int(st['vcode'].value)] if flagged else 'nothing'}"
                assert new and new[0][1] == rule, f"{op} one cycle inside {rule}: checker saw {new}"
                st["clear"].value = 1
                await idle(1)
                st["clear"].value = 0
            else:
                assert not flagged, f"{op} exactly {window} cycles after: device flagged {names[int(st['vcode'].value)]}"
                assert not new, f"{op} exactly {window} cycles after: checker saw {new}"
        checked.append(f"{rule}:{op}")
    await settle()
    assert int(st["violation"].value) == 0
    write_metrics(name="pim_timing_edges", config=cfg.name, rules=checked)
    dut._log.info("%d rules checked at their edges: %s", len(checked), ", ".join(checked))


@tb_test()
async def backdoor_layer(dut):
    """Fill the banks with a whole GPT-2-small layer's FC weights (~7M BF16) through the back door,
    then read samples back with normal RD commands."""
    cfg, drv = await _driver(dut)
    p = cfg.pim
    d_model = env_int("D_MODEL", 768)
    n_samples = env_int("N_SAMPLES", 64)
    shapes = [(d_model, 3 * d_model), (d_model, d_model), (d_model, 4 * d_model), (4 * d_model, d_model)]
    rng = np.random.default_rng(5)
    d = _backdoor_dir()
    t0 = time.perf_counter()
    layouts, packs = [], []
    base = 0
    total_values = 0
    for K, N in shapes:
        lay = GemvLayout(cfg, K, N, base_row=base)
        w = rng.integers(0, 1 << 16, (K, N), dtype=np.uint16)
        total_values += w.size
        packed = lay.pack(w)
        for c in range(p.channels):
            for b in range(p.banks):
                write_backdoor(d, c, b, base, packed[c, b], p.columns)
        layouts.append(lay)
        packs.append(packed)
        base += lay.rows_used
    t_files = time.perf_counter() - t0
    t1 = time.perf_counter()
    await drv.backdoor_load()
    t_load = time.perf_counter() - t1
    # Samples through normal RD commands.
    schedules, expect = [], []
    for c in range(p.channels):
        sch = Scheduler(cfg, start=drv.cycle + 1)
        exp = []
        for _ in range(n_samples):
            i = int(rng.integers(len(layouts)))
            lay, packed = layouts[i], packs[i]
            b = int(rng.integers(p.banks))
            r = int(rng.integers(lay.rows_used))
            col = int(rng.integers(p.columns))
            sch.place("ACT", bank=b, row=lay.base_row + r)
            sch.place("RD", bank=b, col=col)
            sch.place("PRE", bank=b)
            sch.refresh_point()
            exp.append(PimChannelModel.lanes_to_word(packed[c, b, r, col]))
        schedules.append(sch.slots)
        expect.append(exp)
    got = [[] for _ in range(p.channels)]
    await drv.play(schedules, on_read=lambda c, slot, word: got[c].append(word))
    drv.assert_clean()
    for c in range(p.channels):
        assert got[c] == expect[c], f"channel {c}: back-door contents differ from RD results"
    write_metrics(name="pim_backdoor", config=cfg.name, values=total_values, rows=base,
                  file_seconds=t_files, load_seconds=t_load, seconds=t_files + t_load)
    dut._log.info("%d BF16 values in %d rows per bank: files %.2f s, $readmemh %.2f s; %d samples verified",
                  total_values, base, t_files, t_load, n_samples * p.channels)
    with open(os.path.join(os.environ["IANUS_TEST_DIR"], "backdoor.json"), "w") as f:
        json.dump({"values": total_values, "seconds": t_files + t_load}, f)
