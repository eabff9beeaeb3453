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


def _memctrl_random_traffic(seed=1, n=160, timing=None, cycles=6000):
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
        bank, row, col = rng.randrange(4), rng.randrange(3), rng.randrange(p.columns)
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
            if i >= len(reqs) and sum(len(v) for v in got.values()) >= len(reqs) and cyc > 2 * t.tREFI:
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
    off-by-one shows)."""
    for timing in (None, {"tRCDRD": 5, "tRCDWR": 4, "tRP": 5, "tRAS": 9, "tCCD": 2, "tRRD": 2, "tFAW": 9,
                          "tWR": 5, "tRTP": 3, "tRL": 3}):
        viol, wrong, missing, cmds = _memctrl_random_traffic(timing=timing)
        assert not viol, (timing, viol[:5])
        assert (wrong, missing) == (0, 0), (timing, wrong, missing)
        assert cmds.count(7) >= 1, "no refresh issued"          # REF
        assert cmds.count(1) > 10 and cmds.count(3) > 5, "few row misses: the traffic does not test timing"
