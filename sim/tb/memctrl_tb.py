"""cocotb testbenches for the unified memory controller (hw/memctrl.py) driving the RTL PIM device.

The top is :class:`hw.memctrl.MemCtrlSystem`: one controller per channel and
the device. One cycle loop (:class:`sim.tb.memctrl_harness.TB`) drives every stream of every channel
(random valid gaps on the request side, random ``ready`` back-pressure on the
response side), records every handshake, and feeds the command bus each
controller drives into the independent protocol checker
(:class:`sim.pim_checker.ProtocolChecker`) every cycle. A scoreboard checks
every normal response against a Python memory model: data, tag, write flag,
error flag, exactly one response per request, and per-address order.
Every test requires the checker and the device's sticky violation flags to
stay clean and no refresh to be late.

The configuration comes from ``IANUS_CONFIG`` (a preset name).
"""

from __future__ import annotations

import numpy as np

from firmware.pim import GemvLayout, amortized_cycles, gemv_golden, gemv_program
from hw.config import preset
from hw.spec import fp as G
from sim.golden.pim import PimChannelModel
from sim.pim_sequencer import gemv_resolver
from sim.tb.common import (
    env_int,
    env_str,
    tb_test,
    write_metrics,
)
from sim.tb.memctrl_harness import TB


def _cfg():
    return preset(env_str("IANUS_CONFIG", "tiny"))


def _random_traffic(tb, c, n, rows, same_prob=0.25, write_rows=None):
    """``n`` random reads and writes on ``rows`` (writes only on ``write_rows`` when given)."""
    p = tb.cfg.pim
    rng = tb.rng
    last = None
    for _ in range(n):
        if last is not None and rng.random() < same_prob:
            addr = last
        else:
            addr = tb.random_addr(c, rows)
        last = addr
        writable = write_rows is None or tb.amap.decode(addr)[0] in write_rows
        if writable and rng.random() < 0.45:
            data = int.from_bytes(rng.bytes(p.column_bytes), "little")
            mask = tb.full_mask if rng.random() < 0.7 else int(rng.integers(1, 1 << p.column_bytes))
            tb.write(c, addr, data, mask)
        else:
            tb.read(c, addr)


@tb_test()
async def random_traffic(dut):
    """Random reads/writes (same-address runs, valid gaps, resp back-pressure), then saturating traffic long
    enough for forced refreshes: scoreboard exact, checker and device clean, no refresh late."""
    cfg = _cfg()
    p, t = cfg.pim, cfg.timing
    tb = TB(dut, cfg, seed=env_int("SEED", 3))
    await tb.reset()
    n = env_int("N_REQ", 1200)
    rows = list(range(min(p.rows, 6)))
    # Phase A: random gaps and back-pressure.
    for ch in tb.ch:
        ch.gap, ch.backpressure = 0.4, 0.3
        _random_traffic(tb, ch.c, n, rows)
    cyc_a = await tb.drain(limit=n * 40)
    tb.assert_clean()
    before = [tb.counters(c) for c in range(p.channels)]
    # Phase B: no gaps, no back-pressure, for more than the refresh deadline.
    sat_cycles = env_int("SAT_CYCLES", t.refresh_deadline + 3 * t.tREFI)
    for ch in tb.ch:
        ch.gap, ch.backpressure = 0.0, 0.0
    start_cycle = tb.cycle
    resp0 = [ch.responses for ch in tb.ch]
    while tb.cycle - start_cycle < sat_cycles:
        for ch in tb.ch:
            if len(ch.reqs) < 4:
                _random_traffic(tb, ch.c, 16, rows, same_prob=0.1)
        await tb.step()
    sat_resp = [ch.responses - r for ch, r in zip(tb.ch, resp0, strict=True)]
    for ch in tb.ch:
        ch.reqs.clear()
    await tb.drain()
    tb.assert_clean()
    after = [tb.counters(c) for c in range(p.channels)]
    for c in range(p.channels):
        k = after[c]
        due = tb.cycle // t.tREFI - t.refresh_postpone      # at most refresh_postpone may stay owed
        assert k["refreshes"] >= max(3, due), f"channel {c}: only {k['refreshes']} refreshes, {due} due"
        assert k["forced_refreshes"] - before[c]["forced_refreshes"] >= 1, \
            f"channel {c}: saturating traffic never forced a refresh ({k})"
        dev_refs = int(tb.ch[c].status["n_ref"].value)
        assert dev_refs == k["refreshes"] == tb.ch[c].checker.counts["REF"], \
            f"channel {c}: refresh counts differ: device {dev_refs}, controller {k['refreshes']}"
        assert k["row_hits"] + k["row_misses"] == tb.ch[c].responses - 0, \
            f"channel {c}: hits+misses {k['row_hits'] + k['row_misses']} != responses {tb.ch[c].responses}"
    k = after[0]
    bw = sat_resp[0] * p.column_bytes / (sat_cycles / (cfg.clocks.pim_mhz * 1e6)) / 1e9
    peak = p.column_bytes * cfg.clocks.pim_mhz * 1e6 / t.tCCD / 1e9
    hit_rate = k["row_hits"] / max(1, k["row_hits"] + k["row_misses"])
    dut._log.info("phase A %d cycles; saturated %d requests in %d cycles on channel 0 = %.2f GB/s of %.1f peak; "
                  "row hits %.1f%%; refreshes %d (forced %d); counters %s", cyc_a, sat_resp[0], sat_cycles, bw,
                  peak, 100 * hit_rate, k["refreshes"], k["forced_refreshes"], k)
    write_metrics(name="memctrl_random", config=cfg.name, requests=sum(ch.responses for ch in tb.ch),
                  sat_gbps=bw, peak_gbps=peak, row_hit_rate=hit_rate, refreshes=k["refreshes"],
                  forced_refreshes=k["forced_refreshes"], cycles=tb.cycle)


@tb_test()
async def error_responses(dut):
    """Misaligned and wrong-channel addresses: error responses, no DRAM access, memory unchanged."""
    cfg = _cfg()
    p = cfg.pim
    tb = TB(dut, cfg, seed=env_int("SEED", 4))
    await tb.reset()
    amap = tb.amap
    # Known contents first.
    for ch in tb.ch:
        for i in range(8):
            tb.write(ch.c, amap.encode(i % p.rows, ch.c, i % p.banks, i % p.columns), 0x1111 * (i + 1))
    await tb.drain()
    cmds_before = [len(ch.bus_log) for ch in tb.ch]
    for ch in tb.ch:
        ch.backpressure = 0.3
        for i in range(24):
            good = amap.encode(i % p.rows, ch.c, i % p.banks, i % p.columns)
            if i % 3 == 0 and amap.col_lo:
                bad = good | int(tb.rng.integers(1, 1 << amap.col_lo))
            elif p.channels > 1:
                bad = amap.encode(i % p.rows, (ch.c + 1 + i) % p.channels if (ch.c + 1 + i) % p.channels != ch.c
                                  else (ch.c + 1) % p.channels, i % p.banks, i % p.columns)
            else:
                bad = good | 1
            if i % 2:
                tb.write(ch.c, bad, 0xDEAD, expect_error=True)
            else:
                tb.read(ch.c, bad, expect_error=True)
    await tb.drain()
    for ch in tb.ch:
        new = ch.bus_log[cmds_before[ch.c]:]
        col = [e for e in new if e[1] in ("RD", "WR")]
        assert not col, f"channel {ch.c}: erroneous requests reached DRAM: {col[:4]}"
    # Memory unchanged: read back the known contents (scoreboard compares).
    for ch in tb.ch:
        ch.backpressure = 0.0
        for i in range(8):
            tb.read(ch.c, amap.encode(i % p.rows, ch.c, i % p.banks, i % p.columns))
    await tb.drain()
    tb.assert_clean()
    dut._log.info("%d error responses per channel, no DRAM access", 24)


@tb_test()
async def fr_fcfs_order(dut):
    """A younger row hit goes before an older row miss; a same-address pair is never reordered even when the
    younger one could go first (WR needs tRCDWR < tRCDRD)."""
    cfg = _cfg()
    t = cfg.timing
    tb = TB(dut, cfg, seed=5)
    await tb.reset()
    amap = tb.amap
    c = 0
    ch = tb.ch[c]
    # Case 1: P (row 1) opens the row; X (row 2, older, miss) then Y (row 1, younger, hit).
    P = amap.encode(1, c, 0, 0)
    X = amap.encode(2, c, 0, 1)
    Y = amap.encode(1, c, 0, 2)
    tb.read(c, P)
    tb.read(c, X)
    tb.read(c, Y)
    await tb.drain()
    log = [e for e in ch.bus_log if e[1] in ("RD", "ACT", "PRE") and e[2] == 0]
    rds = [e[4] for e in log if e[1] == "RD"]
    assert rds == [0, 2, 1], f"bus order of the reads (columns) {rds}, expected P, Y (hit), X (miss); log {log}"
    k = tb.counters(c)
    assert (k["row_hits"], k["row_misses"]) == (1, 2), f"row hits/misses {k['row_hits']}/{k['row_misses']}"
    # Case 2: bank 1 closed; RD(A) then WR(A): the write's tRCDWR ends first, but it must wait for the read.
    assert t.tRCDWR < t.tRCDRD, "this case needs tRCDWR < tRCDRD"
    A = amap.encode(3, c, 1, 5)
    tb.write(c, A, 0xAAAA)
    await tb.drain()
    tb.write(c, amap.encode(4, c, 1, 0), 0x5555)          # close A's row again (row miss in bank 1)
    await tb.drain()
    n0 = len(ch.bus_log)
    tb.read(c, A)
    tb.write(c, A, 0xBBBB)
    tb.read(c, A)
    await tb.drain()                                      # the scoreboard expects 0xAAAA, then 0xBBBB
    seq = [e[1] for e in ch.bus_log[n0:] if e[1] in ("RD", "WR") and e[2] == 1]
    assert seq == ["RD", "WR", "RD"], f"same-address commands reordered: {seq}"
    tb.assert_clean()
    dut._log.info("FR-FCFS order %s; same-address order %s", log, seq)


@tb_test()
async def stream_reads(dut):
    """Full-rate streams: reads of every column of one row, then of one column in every bank (the row opened
    first), with no request gaps or back-pressure. With ``FULL_RATE`` (default 1) the column commands must
    follow each other every ``tCCD`` cycles (no bubble from the registered pick of ``pick_stages = 1``).
    Metrics: the first command of a request to an idle controller (``first_act``, cycles after reset) and each
    stream's span. (With the pick in one cycle and ``tRL + 4`` response credits, tiny's 8-read row stream has one
    3-cycle gap: the credits run out before the first responses are read.)"""
    cfg = _cfg()
    p, t = cfg.pim, cfg.timing
    tb = TB(dut, cfg, seed=3)
    await tb.reset()
    ch = tb.ch[0]
    amap = tb.amap
    t0 = tb.cycle
    # 1. One request to an idle controller, bank closed: request accepted -> ACT on the bus.
    tb.read(0, amap.encode(1, 0, 0, 0))
    await tb.drain()
    acts = [e[0] - t0 for e in ch.bus_log if e[1] == "ACT"]
    # 2. Streams from open rows.
    ncol = min(p.columns, 32)
    runs = {"row": [amap.encode(1, 0, 0, col) for col in range(ncol)],
            "banks": [amap.encode(1, 0, b, 0) for b in range(p.banks)]}
    for b in range(1, p.banks):                       # open row 1 in every bank first
        tb.read(0, amap.encode(1, 0, b, 1))
    await tb.drain()
    spans = {}
    for name, addrs in runs.items():
        n0 = len(ch.bus_log)
        for a in addrs:
            tb.read(0, a)
        await tb.drain()
        rds = [e[0] for e in ch.bus_log[n0:] if e[1] == "RD"]
        assert len(rds) == len(addrs), f"{name}: {len(rds)} reads on the bus for {len(addrs)} requests"
        gaps = [b - a for a, b in zip(rds, rds[1:], strict=False)]
        if env_int("FULL_RATE", 1):
            assert all(g == t.tCCD for g in gaps), (f"{name}: column commands {t.tCCD} apart expected, gaps "
                                                    f"{gaps}; bus {ch.bus_log[n0:]}")
        spans[name] = rds[-1] - rds[0]
    tb.assert_clean()
    write_metrics(first_act=acts[0], **spans)
    dut._log.info("stream spans %s, first ACT %s cycles after reset", spans, acts[0])


# --------------------------------------------------------------------------- GEMV through the controller
def _gemv_data(K, N, seed):
    rng = np.random.default_rng(seed)
    w = G.bf16_bits(rng.standard_normal((K, N)) / np.sqrt(K))
    x = G.bf16_bits(rng.standard_normal(K))
    bias = G.f32_bits(rng.standard_normal(N).astype(np.float32) * np.float32(0.1))
    return w, x, bias


@tb_test()
async def pim_gemv(dut):
    """Weights written through the normal port; then pim_mode with normal traffic queued: the GEMV runs
    through the PIM port bit-exact vs golden. With one row buffer the normal requests wait and complete
    afterwards; with two (NeuPIMs) they are served during the GEMV (reads of the weight rows included,
    which make the controller close normal rows before its PACTABs; writes go to other rows)."""
    cfg = _cfg()
    p, t = cfg.pim, cfg.timing
    K, N = (int(v) for v in env_str("GEMV_SHAPE", "200x24").split("x"))
    tb = TB(dut, cfg, seed=env_int("SEED", 6))
    await tb.reset()
    amap = tb.amap
    layout = GemvLayout(cfg, K, N, base_row=0)
    w, x, bias = _gemv_data(K, N, seed=9)
    packed = layout.pack(w)
    # 1. Weights through the normal port.
    for ch in tb.ch:
        ch.gap, ch.backpressure = 0.1, 0.2
        for b in range(p.banks):
            for r in range(layout.rows_used):
                for col in range(p.columns):
                    tb.write(ch.c, amap.encode(layout.base_row + r, ch.c, b, col),
                             PimChannelModel.lanes_to_word(packed[ch.c, b, r, col]))
    await tb.drain(limit=200 * p.banks * layout.rows_used * p.columns)
    # 2. pim_mode up, normal traffic queued (including writes into the weight rows, which must wait).
    dual = p.row_buffers == 2
    rows = list(range(min(p.data_rows, layout.rows_used + 3)))
    write_rows = set(rows[layout.rows_used:]) if dual else None
    for ch in tb.ch:
        ch.mode.value = int(not dual)      # with two row buffers the PCU raises it only for its transfers
        ch.pim_window = True
        ch.pim_gap, ch.pim_ready_prob = 0.3, 0.7
        _random_traffic(tb, ch.c, env_int("N_NORMAL", 40), rows, write_rows=write_rows)
    # 3. The GEMV program on every channel.
    resolve = gemv_resolver(cfg, layout, x, bias,
                            lambda c, tile, g: tb.ch[c].pim_results.get(("result", tile, g)))   # None: not back yet
    tb.resolve = resolve
    n_cmds = 0
    for ch in tb.ch:
        for op, fields in gemv_program(layout, with_bias=True):
            if op in ("REFRESH_POINT", "TILE_END"):
                continue
            tb.pim(ch.c, op, **fields)
            n_cmds += 1
    t0 = tb.cycle
    await tb.run_until(lambda: all(not ch.pims and ch.cur_pim is None and not ch.pim_expect for ch in tb.ch),
                       limit=50 * n_cmds + 20 * t.tREFI, what="GEMV commands done")
    await tb.run_until(lambda: all(int(ch.pidle.value) for ch in tb.ch), limit=100, what="pim_idle")
    gemv_cycles = tb.cycle - t0
    for ch in tb.ch:
        assert ch.pim_errors == 0 and not int(ch.perr.value), f"channel {ch.c}: PIM command refused"
        k = tb.counters(ch.c)
        if dual:
            assert ch.resp_during_pim > 0, f"channel {ch.c}: no normal response during the GEMV"
            assert k["pim_wait"] == 0, f"channel {ch.c}: normal requests waited {k['pim_wait']} cycles"
        else:
            assert ch.resp_during_pim == 0, f"channel {ch.c}: {ch.resp_during_pim} normal responses in PIM mode"
            assert k["pim_wait"] > 0, f"channel {ch.c}: normal requests never waited for PIM mode"
            assert len(ch.outstanding) > 0, f"channel {ch.c}: normal requests completed during PIM mode"
    waited = [tb.counters(c)["pim_wait"] for c in range(p.channels)]
    # 4. pim_mode down: the normal requests complete.
    for ch in tb.ch:
        ch.mode.value = 0
        ch.pim_window = False
    await tb.drain()
    tb.assert_clean()
    # 5. Results.
    bpw = p.banks_per_word
    npad = layout.tiles * layout.per_tile
    y = np.zeros(npad, dtype=np.uint32)
    for c in range(p.channels):
        for (_kind, tile, g), word in tb.ch[c].pim_results.items():
            vals = np.frombuffer(int(word).to_bytes(bpw * 4, "little"), dtype="<u4")
            for k_ in range(bpw):
                b = g * bpw + k_
                if b < p.banks:
                    y[layout.output_index(tile, c, b)] = vals[k_]
    y = y[:N]
    want = gemv_golden(cfg, w, x, bias)
    bad = np.flatnonzero(y != want)
    assert bad.size == 0, (f"GEMV {K}x{N}: {bad.size} outputs differ from golden; first n={bad[0]}: "
                           f"RTL {int(y[bad[0]]):#x} golden {int(want[bad[0]]):#x}")
    refs = [tb.counters(c)["refreshes"] for c in range(p.channels)]
    dut._log.info("GEMV %dx%d through the controllers: %d cycles, bit-exact; normal requests waited %s cycles; "
                  "refreshes %s", K, N, gemv_cycles, waited, refs)
    write_metrics(name="memctrl_gemv", config=cfg.name, shape=f"{K}x{N}", cycles=gemv_cycles, waited=waited)


@tb_test()
async def pim_refresh_reopen(dut):
    """The PIM stream stalls with its rows open for longer than the refresh deadline: the controller forces
    refreshes (PREAB, REF) and re-opens the rows before the stream continues; the GEMV stays bit-exact."""
    cfg = _cfg()
    p, t = cfg.pim, cfg.timing
    K, N = p.gb_values // 2, p.banks * p.channels          # one tile, one chunk
    tb = TB(dut, cfg, seed=8)
    await tb.reset()
    layout = GemvLayout(cfg, K, N, base_row=2)
    w, x, bias = _gemv_data(K, N, seed=12)
    packed = layout.pack(w)
    for ch in tb.ch:
        for b in range(p.banks):
            for col in range(p.columns):
                tb.write(ch.c, tb.amap.encode(layout.base_row, ch.c, b, col),
                         PimChannelModel.lanes_to_word(packed[ch.c, b, 0, col]))
    await tb.drain()
    bpw = p.banks_per_word
    xpad = np.zeros(layout.chunk, dtype=np.uint16)
    xpad[:K] = x
    results = {}

    def resolve(c, ref):
        if ref[0] == "x":
            return PimChannelModel.lanes_to_word(xpad[ref[2] * p.lanes:(ref[2] + 1) * p.lanes])
        if ref[0] == "bias":
            vals = [bias[layout.output_index(0, c, b)] if b < p.banks else 0
                    for b in range(ref[2] * bpw, (ref[2] + 1) * bpw)]
            return int.from_bytes(np.asarray(vals, dtype="<u4").tobytes(), "little")
        return 0

    tb.resolve = resolve
    program = [(op, f) for op, f in gemv_program(layout, with_bias=True) if op not in ("REFRESH_POINT", "TILE_END")]
    first_mac = next(i for i, (op, _) in enumerate(program) if op == "MACAB")
    for ch in tb.ch:
        ch.mode.value = int(p.row_buffers == 1)
        for op, f in program[:first_mac + 1]:
            tb.pim(ch.c, op, **f)
    await tb.run_until(lambda: all(not ch.pims and ch.cur_pim is None for ch in tb.ch), 2000, "first part")
    forced0 = [tb.counters(c)["forced_refreshes"] for c in range(p.channels)]
    stall = (t.refresh_postpone + 2) * t.tREFI
    n0 = [len(ch.bus_log) for ch in tb.ch]
    for _ in range(stall):
        await tb.step()
    for ch in tb.ch:
        for op, f in program[first_mac + 1:]:
            tb.pim(ch.c, op, **f)
    await tb.run_until(lambda: all(not ch.pims and ch.cur_pim is None and not ch.pim_expect for ch in tb.ch),
                       2000, "second part")
    tb.assert_clean()
    for ch in tb.ch:
        forced = tb.counters(ch.c)["forced_refreshes"] - forced0[ch.c]
        assert forced >= 1, f"channel {ch.c}: no forced refresh while the PIM rows stayed open"
        ops = [e[1] for e in ch.bus_log[n0[ch.c]:]]
        i = ops.index("REF")
        act, pre = ("PACTAB", "PPREAB") if p.row_buffers == 2 else ("ACTAB", "PREAB")
        assert ops[i - 1] == pre and ops[i + 1] == act, f"channel {ch.c}: refresh sequence {ops[:12]}"
        assert ch.pim_errors == 0
        results[ch.c] = ch.pim_results
    y = np.zeros(layout.per_tile, dtype=np.uint32)
    for c, res in results.items():
        for (_kind, tile, g), word in res.items():
            vals = np.frombuffer(int(word).to_bytes(bpw * 4, "little"), dtype="<u4")
            for k_ in range(bpw):
                if g * bpw + k_ < p.banks:
                    y[layout.output_index(tile, c, g * bpw + k_)] = vals[k_]
    want = gemv_golden(cfg, w, x, bias)
    assert np.array_equal(y[:N], want), f"GEMV after forced refresh differs: {y[:N]} vs {want}"
    dut._log.info("stall of %d cycles with PIM rows open: forced refreshes %s, rows re-opened, GEMV bit-exact",
                  stall, [tb.counters(c)["forced_refreshes"] - forced0[c] for c in range(p.channels)])


# --------------------------------------------------------------------------- dual row buffers: concurrency
def _gemv_outputs(tb, layout):
    p = tb.cfg.pim
    bpw = p.banks_per_word
    y = np.zeros(layout.tiles * layout.per_tile, dtype=np.uint32)
    for c in range(p.channels):
        for (_kind, tile, g), word in tb.ch[c].pim_results.items():
            vals = np.frombuffer(int(word).to_bytes(bpw * 4, "little"), dtype="<u4")
            for k_ in range(bpw):
                if g * bpw + k_ < p.banks:
                    y[layout.output_index(tile, c, g * bpw + k_)] = vals[k_]
    return y[:layout.N]


@tb_test()
async def dualrb_concurrency(dut):
    """A GEMV through the PIM port while a saturating stream of normal reads runs in the same channels.

    Three phases on one device: the reads alone (their rate), the GEMV alone (its cycles), both at once.
    With one row buffer the reads wait for the whole GEMV; with two (NeuPIMs) they share the command bus
    with it. The GEMV is checked bit-exact against the golden model in both runs, every read against the
    memory model, and the protocol checker watches every cycle. Writes ``dualrb_concurrency`` metrics."""
    import os

    from sim.pim_sequencer import write_backdoor_bin

    cfg = _cfg()
    p = cfg.pim
    K, N = (int(v) for v in env_str("GEMV_SHAPE", "768x3072").split("x"))
    n_reads = env_int("N_READS", 4000)
    tb = TB(dut, cfg, seed=env_int("SEED", 21))
    await tb.reset()
    layout = GemvLayout(cfg, K, N, base_row=0)
    w, x, bias = _gemv_data(K, N, seed=31)
    d = os.environ["IANUS_BACKDOOR"]
    os.makedirs(d, exist_ok=True)
    for f in os.listdir(d):
        os.unlink(os.path.join(d, f))
    packed = layout.pack(w)
    for c in range(p.channels):
        for b in range(p.banks):
            write_backdoor_bin(d, c, b, layout.base_row, packed[c, b], p.columns)
    dut.bd_load.value = 1
    await tb.step()
    dut.bd_load.value = 0
    await tb.step()
    want = gemv_golden(cfg, w, x, bias)
    read_rows = list(range(layout.rows_used, p.data_rows))
    assert read_rows, f"GEMV {K}x{N} leaves no rows for the normal reads"

    def queue_reads(n):
        # Sequential columns, banks, then rows (the order a DMA stream of this channel would use).
        for ch in tb.ch:
            ch.gap, ch.backpressure = 0.0, 0.0
            for i in range(n):
                col, rest = i % p.columns, i // p.columns
                bank, r = rest % p.banks, read_rows[(rest // p.banks) % len(read_rows)]
                tb.read(ch.c, tb.amap.encode(r, ch.c, bank, col))

    def queue_gemv():
        tb.resolve = gemv_resolver(cfg, layout, x, bias,
                                   lambda c, tile, g: tb.ch[c].pim_results.get(("result", tile, g)))
        for ch in tb.ch:
            ch.pim_results = {}
            ch.pim_gap, ch.pim_ready_prob = 0.0, 1.0
            ch.mode.value = int(p.row_buffers == 1)     # (the PCU's convention: see hw/pcu.py)
            for op, fields in gemv_program(layout, with_bias=True):
                if op not in ("REFRESH_POINT", "TILE_END"):
                    tb.pim(ch.c, op, **fields)

    def gemv_done():
        return all(not ch.pims and ch.cur_pim is None and not ch.pim_expect for ch in tb.ch)

    async def finish_gemv(what):
        await tb.run_until(lambda: all(int(ch.pidle.value) for ch in tb.ch), limit=100, what="pim_idle")
        for ch in tb.ch:
            ch.mode.value = 0
            assert ch.pim_errors == 0, f"{what}: channel {ch.c}: PIM command refused"
        y = _gemv_outputs(tb, layout)
        bad = np.flatnonzero(y != want)
        assert bad.size == 0, f"{what}: {bad.size} GEMV outputs differ from the golden model (first {bad[0]})"

    responses = lambda: sum(ch.responses for ch in tb.ch)  # noqa: E731
    refreshes = lambda: max(tb.counters(c)["refreshes"] for c in range(p.channels))  # noqa: E731

    async def settle():
        # Every phase starts with no refresh owed; its refreshes are charged at the steady-state rate
        # (firmware.pim.amortized_cycles), as the GEMV efficiency figures are: a phase that postpones its
        # refreshes past its end is not credited with them.
        await tb.run_until(lambda: all(int(ch.owed.value) == 0 for ch in tb.ch), limit=20 * cfg.timing.tREFI,
                           what="refreshes caught up")

    # 1. Normal reads alone.
    await settle()
    queue_reads(n_reads)
    r0, f0 = responses(), refreshes()
    alone_cycles = amortized_cycles(cfg, await tb.drain(limit=100 * n_reads), refreshes() - f0)
    rate_alone = (responses() - r0) / alone_cycles / p.channels
    # 2. The GEMV alone.
    await settle()
    queue_gemv()
    f0 = refreshes()
    gemv_alone = amortized_cycles(cfg, await tb.run_until(gemv_done, limit=10_000_000, what="GEMV alone"),
                                  refreshes() - f0)
    await finish_gemv("GEMV alone")
    # 3. Both: enough reads to outlast the GEMV at the rate they get alone.
    await settle()
    n_both = int(rate_alone * gemv_alone * 1.5) + 64
    queue_reads(n_both)
    queue_gemv()
    r0, f0 = responses(), refreshes()
    gemv_both = amortized_cycles(cfg, await tb.run_until(gemv_done, limit=10_000_000, what="GEMV beside reads"),
                                 refreshes() - f0)
    served = responses() - r0
    await finish_gemv("GEMV beside reads")
    left = sum(len(ch.reqs) + len(ch.outstanding) + (ch.cur is not None) for ch in tb.ch)
    rest = await tb.drain(limit=100 * n_both)
    tb.assert_clean()
    rate_both = served / gemv_both / p.channels
    share = rate_both / rate_alone
    slowdown = gemv_both / gemv_alone - 1
    k = tb.counters(0)
    dut._log.info("row buffers %d, %dx%d: reads alone %.3f/cycle/channel; GEMV alone %.0f cycles; both: GEMV %.0f "
                  "cycles (%+.1f %%), reads %.3f/cycle/channel (%.1f %% of alone); %d reads after the GEMV in "
                  "%d cycles; pim_wait %d", p.row_buffers, K, N, rate_alone, gemv_alone, gemv_both,
                  100 * slowdown, rate_both, 100 * share, left, rest,
                  k["pim_wait"])
    write_metrics(name="dualrb_concurrency", config=cfg.name, row_buffers=p.row_buffers, shape=f"{K}x{N}",
                  normal_rate_alone=rate_alone, gemv_alone_cycles=gemv_alone, gemv_with_normal_cycles=gemv_both,
                  normal_rate_during_gemv=rate_both, normal_share=share, gemv_slowdown=slowdown,
                  reads_during_gemv=served, pim_wait=k["pim_wait"])
    lo = float(env_str("MIN_SHARE", "-1"))
    hi = float(env_str("MAX_SLOWDOWN", "1e9"))
    top = float(env_str("MAX_SHARE", "1e9"))
    assert share <= top, f"normal reads kept {share:.3f} of their bandwidth during the GEMV, above {top}"
    assert share >= lo, f"normal reads kept {share:.3f} of their bandwidth during the GEMV, below {lo}"
    assert slowdown <= hi, f"GEMV slowed by {slowdown:.3f} beside the reads, above {hi}"
