"""Tests written for bugs the differential fuzzer and the mutation score found (issue 21).

Fast: Amaranth simulations of single units, no Verilator build.
"""

from hw.config import preset


def _sim(dut, bench, cycles_ok=True):
    from amaranth.sim import Simulator

    sim = Simulator(dut)
    sim.add_clock(1e-8)
    sim.add_testbench(bench)
    sim.run()


def test_matrix_unit_busy_covers_a_queued_instruction():
    """Found by the differential fuzzer (``python -m sim.diff_fuzz --seed 2 --cases 100 --only 97``): the
    matrix unit's ``busy`` was low for one cycle while an instruction passed from its decode register into
    its (buffered) queue, so a FENCE right after a MATRIX instruction could pass early and the next GEMM's
    COMPUTE overwrote accumulators the previous STORE had not read yet. A STORE that waits for a semaphore
    nobody signals stays queued: ``busy`` must be high on every cycle after it is taken."""
    from hw.npu.isa import Opcode
    from hw.npu.isa import encode as mu_encode
    from hw.npu.matrix_unit import MatrixUnit

    dut = MatrixUnit(preset("tiny"))
    word = mu_encode(Opcode.STORE, wait=1 << 3, mem_addr=0, mem_stride=32, rows=1, cols=4, spm_addr=0,
                     spm_stride=1)
    seen = []

    async def bench(ctx):
        ctx.set(dut.instr.payload.as_value(), word)
        ctx.set(dut.instr.valid, 1)
        assert ctx.get(dut.instr.ready)          # taken in this cycle
        await ctx.tick()
        ctx.set(dut.instr.valid, 0)
        for _ in range(12):
            seen.append(ctx.get(dut.busy))
            await ctx.tick()

    _sim(dut, bench)
    assert all(seen), f"busy dropped while a STORE was queued: {seen}"


_DEBUG = False


def _memctrl_random_traffic(seed=1, n=400, timing=None, cycles=8000):
    """The memory controller alone on the Amaranth simulator, a Python device behind its bus: random
    reads and writes (few rows, so row hits, misses and conflicts), the independent protocol checker
    (:class:`sim.pim_checker.ProtocolChecker`) on every bus cycle, every read answered with the data of the
    last earlier write to its address. Returns (violations, wrong reads, unanswered requests, bus commands)."""
    import random

    from hw.memctrl import MemoryController
    from hw.memif import AddressMap
    from sim.pim_checker import ProtocolChecker

    cfg = preset("tiny")
    if timing:
        cfg = cfg.replace(**{f"timing.{k}": v for k, v in timing.items()})
    t = cfg.timing
    p = cfg.pim
    amap = AddressMap(p)
    dut = MemoryController(cfg, queue_depth=8)
    rng = random.Random(seed)
    reqs = []
    shadow = {}
    for _ in range(n):
        bank, row, col = rng.randrange(p.banks), rng.randrange(3), rng.randrange(p.columns)
        addr = amap.encode(row, 0, bank, col)
        if rng.random() < 0.5:
            data = rng.getrandbits(p.column_bits)
            shadow[addr] = data
            reqs.append((addr, 1, data, None))
        else:
            reqs.append((addr, 0, 0, shadow.get(addr, 0)))
    ck = ProtocolChecker(cfg, channel=0)
    got = {}
    cmds = []

    async def bench(ctx):
        mem = {}
        pending = {}
        open_row = {}
        i = 0
        ctx.set(dut.chan_id, 0)
        ctx.set(dut.resp.ready, 1)
        ctx.set(dut.pim_resp.ready, 1)
        for cyc in range(cycles):
            op = ctx.get(dut.bus.op)
            op = int(op.value) if hasattr(op, "value") else int(op)
            bank, row, col = ctx.get(dut.bus.bank), ctx.get(dut.bus.row), ctx.get(dut.bus.col)
            ck.check(cyc, op if op else "NOP", bank, row, col)
            if op:
                cmds.append(op)
            if op == 1:                 # ACT: column commands use the bank's open row
                open_row[bank] = row
            elif op == 6:               # WR
                mem[(bank, open_row.get(bank), col)] = ctx.get(dut.bus.data)
            elif op == 5:               # RD
                pending[cyc + t.tRL] = mem.get((bank, open_row.get(bank), col), 0)
            if cyc in pending:
                ctx.set(dut.bus.rvalid, 1)
                ctx.set(dut.bus.rdata, pending.pop(cyc))
            else:
                ctx.set(dut.bus.rvalid, 0)
            if i < len(reqs):
                a, w, d, _ = reqs[i]
                ctx.set(dut.req.valid, 1)
                ctx.set(dut.req.payload.addr, a)
                ctx.set(dut.req.payload.write, w)
                ctx.set(dut.req.payload.data, d)
                ctx.set(dut.req.payload.mask, (1 << p.column_bytes) - 1)
                ctx.set(dut.req.payload.tag, i % 256)
                if ctx.get(dut.req.ready):
                    i += 1
            else:
                ctx.set(dut.req.valid, 0)
            if ctx.get(dut.resp.valid):
                got.setdefault(ctx.get(dut.resp.payload.tag), []).append(
                    (ctx.get(dut.resp.payload.data), ctx.get(dut.resp.payload.write)))
            await ctx.tick()
            if i >= len(reqs) and sum(len(v) for v in got.values()) >= len(reqs) and cmds.count(7) >= 3:
                break

    _sim(dut, bench)
    wrong = missing = 0
    seen = {}
    for i, (a, w, d, want) in enumerate(reqs):
        k = seen.get(i % 256, 0)
        seen[i % 256] = k + 1
        lst = got.get(i % 256, [])
        if k >= len(lst):
            missing += 1
        elif not w and lst[k][0] != want:
            wrong += 1
            if _DEBUG:
                print("wrong", i, hex(a), hex(want)[:12], hex(lst[k][0])[:12],
                      [(j, hex(d)[:12]) for j, (a2, w2, d, _) in enumerate(reqs[:i]) if a2 == a and w2])
    return ck.violations, wrong, missing, cmds


def test_memctrl_random_traffic_protocol_and_data_amaranth_sim():
    """Random reads and writes through the memory controller (Amaranth simulator): no DRAM protocol
    violation, every read returns the last written data, every request answered, refreshes issued; with the
    tiny timing and with a longer timing where every rule is at least 2 cycles (so that each rule's
    off-by-one shows). All eight banks (tFAW) and traffic queued across several refreshes (tRFC)."""
    for timing in (None, {"tRCDRD": 5, "tRCDWR": 4, "tRP": 5, "tRAS": 9, "tCCD": 2, "tRRD": 2, "tFAW": 9,
                          "tWR": 5, "tRTP": 3, "tRL": 3, "tREFI": 60, "refresh_postpone": 2}):
        viol, wrong, missing, cmds = _memctrl_random_traffic(timing=timing)
        assert not viol, (timing, viol[:5])
        assert (wrong, missing) == (0, 0), (timing, wrong, missing)
        assert cmds.count(7) >= 3, "fewer than three refreshes issued"          # REF
        assert cmds.count(1) > 10 and cmds.count(3) > 5, "few row misses: the traffic does not test timing"
    # the short refresh interval forces refreshes in the middle of the traffic (tRFC before the next ACT)
    assert cmds.index(7) < len(cmds) // 2, "no refresh during the traffic"


def test_matrix_unit_semaphores_and_store_amaranth_sim():
    """Matrix unit (Amaranth simulator): a STORE waiting for a semaphore nobody signals issues no memory
    request; a lone NOP passes through and ``busy`` falls again (mutation survivors ``mu.ignore_waits``,
    ``mu.dropped_valid``)."""
    from hw.npu.isa import Opcode
    from hw.npu.isa import encode as mu_encode
    from hw.npu.matrix_unit import MatrixUnit

    dut = MatrixUnit(preset("tiny"))
    store = mu_encode(Opcode.STORE, wait=1 << 3, mem_addr=0, mem_stride=32, rows=1, cols=4, spm_addr=0,
                      spm_stride=1)
    nop = mu_encode(Opcode.NOP)
    log = {"req": 0, "busy_after_nop": []}

    async def bench(ctx):
        ctx.set(dut.mem.req.ready, 1)
        ctx.set(dut.instr.payload.as_value(), nop)
        ctx.set(dut.instr.valid, 1)
        await ctx.tick()
        ctx.set(dut.instr.valid, 0)
        for _ in range(16):
            log["busy_after_nop"].append(ctx.get(dut.busy))
            await ctx.tick()
        ctx.set(dut.instr.payload.as_value(), store)
        ctx.set(dut.instr.valid, 1)
        await ctx.tick()
        ctx.set(dut.instr.valid, 0)
        for _ in range(40):
            log["req"] += ctx.get(dut.mem.req.valid)
            await ctx.tick()

    _sim(dut, bench)
    assert log["busy_after_nop"][-1] == 0, f"busy stays high after a lone NOP: {log['busy_after_nop']}"
    assert log["req"] == 0, "a STORE waiting for an unsignalled semaphore issued memory requests"


def test_memctrl_fr_fcfs_oldest_first_amaranth_sim():
    """FR-FCFS among ready row hits: writes to one row queued while the row opens are issued oldest first
    (mutation survivor ``memctrl.frfcfs_youngest``)."""
    from amaranth.sim import Simulator

    from hw.memctrl import MemoryController
    from hw.memif import AddressMap

    cfg = preset("tiny").replace(**{"timing.tRCDWR": 8})
    p = cfg.pim
    amap = AddressMap(p)
    dut = MemoryController(cfg, queue_depth=8)
    cols = []

    async def bench(ctx):
        ctx.set(dut.chan_id, 0)
        ctx.set(dut.resp.ready, 1)
        i = 0
        for _ in range(80):
            op = ctx.get(dut.bus.op)
            if (int(op.value) if hasattr(op, "value") else int(op)) == 6:
                cols.append(ctx.get(dut.bus.col))
            if i < 4:
                ctx.set(dut.req.valid, 1)
                ctx.set(dut.req.payload.addr, amap.encode(1, 0, 2, i))
                ctx.set(dut.req.payload.write, 1)
                ctx.set(dut.req.payload.data, i + 1)
                ctx.set(dut.req.payload.mask, (1 << p.column_bytes) - 1)
                ctx.set(dut.req.payload.tag, i)
                if ctx.get(dut.req.ready):
                    i += 1
            else:
                ctx.set(dut.req.valid, 0)
            await ctx.tick()

    sim = Simulator(dut)
    sim.add_clock(1e-8)
    sim.add_testbench(bench)
    sim.run()
    assert cols == [0, 1, 2, 3], f"column commands in order {cols}, not oldest first"


def test_fabric_round_robin_amaranth_sim():
    """The fabric's round-robin arbiter: three requesters always requesting are granted in turn, one at a
    time (mutation survivor ``fabric.rr_fixed_priority``)."""
    from amaranth.hdl import Module, Signal
    from amaranth.sim import Simulator

    from hw.fabric import _round_robin

    m = Module()
    req = Signal(3)
    adv = Signal()
    grant = _round_robin(m, "t", req, advance=adv)
    grants = []

    async def bench(ctx):
        ctx.set(req, 0b111)
        ctx.set(adv, 1)
        for _ in range(6):
            grants.append(ctx.get(grant))
            await ctx.tick()
        ctx.set(req, 0b101)
        for _ in range(4):
            grants.append(ctx.get(grant))
            await ctx.tick()

    sim = Simulator(m)
    sim.add_clock(1e-8)
    sim.add_testbench(bench)
    sim.run()
    assert grants[:6] == [1, 2, 4, 1, 2, 4], grants
    assert set(grants[6:]) == {1, 4} and all(g in (1, 4) for g in grants[6:]), grants
    assert all(a != b for a, b in zip(grants[6:], grants[7:], strict=False)), grants


def _adder_operands(rng, n):
    """FP32 pairs that reach the adder's corners: every exponent difference 0..30, ties (few significant
    bits below the result's LSB), carries out of the top bit, cancellation down to and below the smallest
    normal number."""
    import numpy as np

    sa = rng.integers(0, 2, n, dtype=np.uint32) << 31
    sb = rng.integers(0, 2, n, dtype=np.uint32) << 31
    ea = rng.integers(1, 255, n).astype(np.int64)
    d = rng.integers(0, 31, n)
    eb = np.clip(ea - d, 1, 254)
    fa = rng.integers(0, 1 << 23, n, dtype=np.uint32)
    fb = rng.integers(0, 1 << 23, n, dtype=np.uint32)
    few = rng.random(n) < 0.5                          # b with few significant bits: ties and exact sums
    fb = np.where(few, fb & np.uint32(0x7F0000), fb)
    a = sa | (ea.astype(np.uint32) << 23) | fa
    b = sb | (eb.astype(np.uint32) << 23) | fb
    k = n // 4                                         # near the bottom of the normal range, opposite signs
    a[:k] = (a[:k] & np.uint32(0x807FFFFF)) | (rng.integers(1, 4, k).astype(np.uint32) << 23)
    b[:k] = (np.uint32(0x80000000) ^ (a[:k] & np.uint32(0x80000000))) | (rng.integers(1, 4, k).astype(np.uint32) << 23) \
        | (b[:k] & np.uint32(0x7FFFFF))
    # Carry out of the top bit with the aligned operand's sticky bit alone set below the guard (the
    # adder's low bits 0b1_0001 after the carry, found by emulating its alignment): a tie only if the
    # sticky bit is lost in normalisation.
    ca, cb = [], []
    while len(ca) < 300:
        fx, fy = int(rng.integers(0x600000, 1 << 23)), int(rng.integers(0, 1 << 23))
        dd = int(rng.integers(4, 12))
        mx, my = ((1 << 23) | fx) << 3, ((1 << 23) | fy) << 3
        sh = my >> dd
        total = mx + (sh | int((sh << dd) != my))
        if total >> 27 and (total & 0x1F) == 0b01001:
            e = int(rng.integers(20, 200))
            sign = int(rng.integers(0, 2)) << 31
            ca.append(sign | (e << 23) | fx)
            cb.append(sign | ((e - dd) << 23) | fy)
    return np.concatenate([a, np.array(ca, dtype=np.uint32)]), np.concatenate([b, np.array(cb, dtype=np.uint32)])


def test_fp32_adder_corners_amaranth_sim():
    """The FP32 adder (combinational, Amaranth simulator) against the golden model on corner operands:
    exponent differences 0..30, ties, carries, results at and below the smallest normal (mutation
    survivors ``arith.add_flush_edge``, ``arith.align_clamp``, ``arith.carry_sticky``)."""
    import numpy as np
    from amaranth.sim import Simulator

    from hw.arith import FP32Adder
    from sim.golden import fp as G

    dut = FP32Adder(stages=0)
    a, b = _adder_operands(np.random.default_rng(5), 3000)
    got = []

    async def bench(ctx):
        for x, y in zip(a.tolist(), b.tolist(), strict=True):
            ctx.set(dut.a, x)
            ctx.set(dut.b, y)
            got.append(ctx.get(dut.s))

    sim = Simulator(dut)
    sim.add_testbench(bench)
    sim.run()
    want = G.add_f32(a, b)
    bad = np.flatnonzero(np.array(got, dtype=np.uint32) != want)
    assert bad.size == 0, [(hex(a[i]), hex(b[i]), hex(got[i]), hex(want[i])) for i in bad[:5]]


def test_fp32ext_multiplier_ties_amaranth_sim():
    """The vector unit's FP32 multiplier (Amaranth simulator) against the golden model on products with
    exact ties (one operand with four significant bits), and products at the bottom of the normal range
    (mutation survivors ``fp32ext.mul_round``, ``fp32ext.mul_flush_edge``)."""
    import numpy as np
    from amaranth.hdl import Module, Signal
    from amaranth.sim import Simulator

    from hw.npu.fp32ext import fp32_mul_product, fp32_mul_round
    from sim.golden import fp32ext as X

    m = Module()
    a_s, b_s = Signal(32), Signal(32)
    p_s = fp32_mul_round(m, m.d.comb, fp32_mul_product(m, m.d.comb, a_s, b_s))   # the two stages, unregistered
    rng = np.random.default_rng(9)
    n = 3000
    a = (rng.integers(0, 2, n, dtype=np.uint32) << 31) | (rng.integers(1, 255, n, dtype=np.uint32) << 23) \
        | rng.integers(0, 1 << 23, n, dtype=np.uint32)
    eb = np.where(rng.random(n) < 0.3, 254 - ((a >> 23) & 0xFF) + rng.integers(-3, 3, n),
                  rng.integers(100, 150, n)).clip(1, 254).astype(np.uint32)
    b = (rng.integers(0, 2, n, dtype=np.uint32) << 31) | (eb << 23) | (rng.integers(0, 16, n, dtype=np.uint32) << 19)
    got = []

    async def bench(ctx):
        for x, y in zip(a.tolist(), b.tolist(), strict=True):
            ctx.set(a_s, x)
            ctx.set(b_s, y)
            got.append(ctx.get(p_s))

    sim = Simulator(m)
    sim.add_testbench(bench)
    sim.run()
    want = X.mul_f32(a, b)
    bad = np.flatnonzero(np.array(got, dtype=np.uint32) != want)
    assert bad.size == 0, [(hex(a[i]), hex(b[i]), hex(got[i]), hex(want[i])) for i in bad[:5]]
