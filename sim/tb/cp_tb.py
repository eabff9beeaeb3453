"""cocotb testbench for the command processor (``hw.cp.CommandProcessor``) on its test top.

The top (``tests/test_cp.py``: ``CpTestTop``) is the CP with an in-order RTL
memory model (:class:`hw.npu.memmodel.MemoryModel`, back door ``mem_load``,
pseudo-random back-pressure ``mem_bp``, and ``mem_hold`` that blocks every
fetch, as a PIM macro blocks the controllers). The three units are Python
stubs (:class:`Units`): each takes its stream with random back-pressure,
stays busy for a random number of cycles per instruction (in order), and can
raise an error some cycles after accepting an instruction whose payload
carries a marker. Every handshake is recorded with its cycle, so the checks
are exact: per-unit payloads and order, global program order, FENCE and END
semantics (nothing after a FENCE goes out before the fenced unit's earlier
instructions are finished), error codes and ``error_pc``.

Cycle numbering: ``Units.edge`` counts falling edges; inputs change at
falling edges, and a handshake seen at falling edge ``n`` happens at the
following rising edge.
"""

import random
from pathlib import Path

import cocotb
from cocotb.triggers import FallingEdge, ReadOnly

from hw.config import preset
from hw.spec.soc_isa import INSTR_BYTES, CpError, IsaError, SocOp, decode, encode
from sim.tb.common import env_int, env_str, start, tb_test, write_metrics

UNITS = ("mu", "vq", "pcu")
UNIT_BIT = {"mu": 1, "vq": 2, "pcu": 4}
OP_UNIT = {SocOp.MATRIX: "mu", SocOp.VECTOR: "vq", SocOp.VLOAD: "vq", SocOp.VSTORE: "vq", SocOp.PIM: "pcu"}
PAYLOAD_BITS = {SocOp.MATRIX: 192, SocOp.VECTOR: 220, SocOp.PIM: 128}
ERR_MARK = 0xE5       # payload byte 0: raise an error (code in byte 1, latency in byte 2)
COUNTER_NAMES = ("cycles", "fetch_stall", "fence_mu", "fence_vq", "fence_pcu", "dispatch_stall", "instructions")


def _cfg():
    return preset(env_str("IANUS_CONFIG", "tiny"))


class Stub:
    def __init__(self, dut, name, rng):
        self.name = name
        self.shift = 32 if name == "vq" else 0       # the vector queue gets the whole instruction
        self.rng = rng
        self.valid = getattr(dut, f"{name}__valid")
        self.ready = getattr(dut, f"{name}__ready")
        self.payload = getattr(dut, f"{name}__payload")
        self.busy = getattr(dut, f"{name}_busy")
        self.error = getattr(dut, f"{name}_error")
        self.ready_prob = 1.0
        self.busy_max = 0
        self.busy_lag = 0         # extra cycles before busy rises after a handshake
        self.reset()

    def reset(self):
        self.accepted = []        # (edge, payload, end edge)
        self.last_end = 0
        self.spans = []           # [start, end) edges of busy
        self.err_code = 0
        self.err_at = None        # edge at which the error appears
        self.err_seen_at = None

    def drive(self, n):
        self.ready.value = int(self.rng.random() < self.ready_prob)
        self.spans = [(a, b) for a, b in self.spans if b > n]
        self.busy.value = int(any(a <= n < b for a, b in self.spans))
        if self.err_at is not None and n >= self.err_at and self.err_seen_at is None:
            self.error.value = self.err_code
            self.err_seen_at = n

    def sample(self, n):
        if self.valid.value and self.ready.value:
            word = int(self.payload.value)
            d = self.rng.randint(0, self.busy_max) if self.busy_max else 0
            start_ = max(n + 1 + self.busy_lag, self.last_end)
            self.last_end = start_ + d
            self.spans.append((start_, self.last_end))
            self.accepted.append((n, word, self.last_end))
            mark = word >> self.shift
            if mark & 0xFF == ERR_MARK and self.err_at is None:
                # A unit that will report an error stays busy until then (a DMA error ends the DMA).
                self.err_code = (mark >> 8) & 0xFF
                self.err_at = n + max(2, (mark >> 16) & 0xFF)
                self.last_end = max(self.last_end, self.err_at + 1)
                self.spans.append((n + 1, self.last_end))

    def clear_error(self):
        self.error.value = 0
        self.err_code, self.err_at, self.err_seen_at = 0, None, None


class Units:
    """The three unit stubs, stepped every falling edge; also watches ``done`` and ``busy``."""

    def __init__(self, dut, seed):
        self.dut = dut
        self.rng = random.Random(seed)
        self.stubs = {name: Stub(dut, name, random.Random(seed * 7 + i)) for i, name in enumerate(UNITS)}
        self.edge = 0
        self.done_edge = None
        self.start_edge = None
        self.prev_done = 0
        for s in self.stubs.values():
            s.ready.value = 0
            s.busy.value = 0
            s.error.value = 0

    def set(self, ready_prob=None, busy_max=None, busy_lag=None):
        for s in self.stubs.values():
            if busy_lag is not None:
                s.busy_lag = busy_lag
            if ready_prob is not None:
                s.ready_prob = ready_prob
            if busy_max is not None:
                s.busy_max = busy_max

    def reset(self):
        for s in self.stubs.values():
            s.reset()
            s.error.value = 0
        self.done_edge = None

    async def run(self):
        dut = self.dut
        while True:
            await FallingEdge(dut.clk)
            self.edge += 1
            n = self.edge
            for s in self.stubs.values():
                s.drive(n)
            await ReadOnly()
            for s in self.stubs.values():
                s.sample(n)
            if dut.start.value:
                self.start_edge = n
            done = int(dut.done.value)
            if done and not self.prev_done:
                self.done_edge = n
            self.prev_done = done

    @property
    def run_cycles(self):
        """Cycles from the start pulse's rising edge to END's (what the CP's ``cycles`` counter counts)."""
        return self.done_edge - self.start_edge - 1


# ---------------------------------------------------------------------------------------------
def random_payload(rng, op, marker=None):
    if op in (SocOp.VLOAD, SocOp.VSTORE):
        fields = dict(mem_addr=rng.getrandbits(32), mem_stride=rng.getrandbits(24), rows=rng.getrandbits(16),
                      cols=rng.getrandbits(16), spm_addr=rng.getrandbits(24), spm_pitch=rng.getrandbits(24))
        if marker is not None:
            fields["mem_addr"] = marker
        elif fields["mem_addr"] & 0xFF == ERR_MARK:
            fields["mem_addr"] ^= 1
        return encode(op, **fields)
    word = rng.getrandbits(PAYLOAD_BITS[op])
    if marker is not None:
        word = (word & ~0xFFFFFF) | marker
    elif word & 0xFF == ERR_MARK:
        word ^= 1
    return encode(op, word=word)


def marker(code, latency=2):
    return ERR_MARK | (code << 8) | (latency << 16)


def unit_view(op, value):
    """What the unit's stream carries for instruction ``value``."""
    if op in (SocOp.VECTOR, SocOp.VLOAD, SocOp.VSTORE):
        return value
    return (value >> 32) & ((1 << PAYLOAD_BITS[op]) - 1)


def random_program(rng, n, fence_prob=0.12):
    prog = []
    ops = [SocOp.MATRIX, SocOp.VECTOR, SocOp.VLOAD, SocOp.VSTORE, SocOp.PIM]
    for _ in range(n):
        if rng.random() < fence_prob:
            prog.append(encode(SocOp.FENCE, units=rng.randrange(8)))
        else:
            prog.append(random_payload(rng, rng.choice(ops)))
    prog.append(encode(SocOp.END))
    return prog


class Harness:
    def __init__(self, dut, units, cfg):
        self.dut = dut
        self.units = units
        self.cfg = cfg
        self.image = {}

    async def cycles(self, n=1):
        for _ in range(n):
            await FallingEdge(self.dut.clk)

    async def load(self, addr, program):
        """Write ``program`` (ints) at byte ``addr`` of the memory model through its back door."""
        assert addr % INSTR_BYTES == 0
        lines = [f"@{addr // INSTR_BYTES:x}"] + [f"{int(w):064x}" for w in program]
        Path("mem_load.hex").write_text("\n".join(lines) + "\n")
        self.dut.mem_load.value = 1
        await self.cycles()
        self.dut.mem_load.value = 0
        await self.cycles()

    async def start(self, addr, length):
        dut = self.dut
        self.units.reset()
        dut.prog_addr.value = addr
        dut.prog_len.value = length
        dut.start.value = 1
        await self.cycles()
        dut.start.value = 0

    async def wait_idle(self, limit=100_000):
        await self.cycles(2)
        for _ in range(limit):
            if not self.dut.busy.value:
                await self.cycles()          # the unit stubs' monitor has seen this edge too
                return
            await self.cycles()
        raise AssertionError(f"the CP is still busy after {limit} cycles")

    async def clear(self):
        for s in self.units.stubs.values():
            s.clear_error()
        self.dut.clear.value = 1
        await self.cycles()
        self.dut.clear.value = 0
        await self.cycles()

    def counters(self):
        raw = int(self.dut.counters.value)
        return {name: (raw >> (32 * i)) & 0xFFFFFFFF for i, name in enumerate(COUNTER_NAMES)}

    def check_dispatch(self, program, upto=None):
        """Every unit received exactly the dispatch instructions of ``program[:upto]``, in order, each
        once; dispatch was in program order; FENCE and END semantics held. Returns the dispatch edges."""
        upto = len(program) if upto is None else upto
        expected = {u: [] for u in UNITS}
        for i, value in enumerate(program[:upto]):
            op = SocOp(value & 0xF)
            if op in OP_UNIT:
                expected[OP_UNIT[op]].append((i, unit_view(op, value)))
        edge_of = {}
        end_of = {}
        for u in UNITS:
            got = self.units.stubs[u].accepted
            assert len(got) == len(expected[u]), (
                f"unit {u}: {len(got)} instructions dispatched, {len(expected[u])} expected")
            for (i, want), (edge, word, end) in zip(expected[u], got, strict=True):
                assert word == want, f"unit {u}: instruction {i} payload {word:#x}, expected {want:#x}"
                edge_of[i] = edge
                end_of[i] = (u, end)
        order = sorted(edge_of)
        edges = [edge_of[i] for i in order]
        assert edges == sorted(edges) and len(set(edges)) == len(edges), "dispatch out of program order"
        for f, value in enumerate(program[:upto]):
            op = SocOp(value & 0xF)
            if op not in (SocOp.FENCE, SocOp.END):
                continue
            mask = 7 if op == SocOp.END else (value >> 8) & 7
            ends = [end for i, (u, end) in end_of.items() if i < f and mask & UNIT_BIT[u]]
            if not ends:
                continue
            bound = max(ends)
            for i, edge in edge_of.items():
                if i > f:
                    assert edge > bound, (f"instruction {i} dispatched at edge {edge} before the FENCE at {f} "
                                          f"was satisfied (fenced units busy until edge {bound})")
            if op == SocOp.END and self.units.done_edge is not None:
                assert self.units.done_edge > bound, "done before every unit was idle"
        return edge_of


async def bring_up(dut, seed=1):
    cfg = _cfg()
    await start(dut, zero_inputs=["start", "clear", "reset_counters", "mem_load", "mem_bp", "mem_hold",
                                  "prog_addr", "prog_len"])
    units = Units(dut, seed)
    await FallingEdge(dut.clk)
    cocotb.start_soon(units.run())
    return Harness(dut, units, cfg)


# ---------------------------------------------------------------------------------------------
@tb_test()
async def dispatch_random(dut):
    """Random programs (all ops, random FENCE masks) under random unit back-pressure, busy times and
    memory back-pressure: exact payloads and order, FENCE/END semantics, counters."""
    seed = env_int("SEED", 1)
    h = await bring_up(dut, seed)
    rng = random.Random(seed)
    dut.mem_bp.value = 1
    total = 0
    for trial in range(env_int("TRIALS", 4)):
        prog = random_program(rng, env_int("N_INSTR", 150))
        addr = 32 * rng.randrange(0, 200)
        await h.load(addr, prog)
        h.units.set(ready_prob=rng.choice((0.3, 0.7, 1.0)), busy_max=rng.choice((0, 1, 3, 12, 30)),
                    busy_lag=trial % 2)
        dut.reset_counters.value = 1
        await h.cycles()
        dut.reset_counters.value = 0
        await h.start(addr, len(prog))
        await h.wait_idle()
        assert int(dut.error.value) == 0, f"trial {trial}: error {int(dut.error.value):#x}"
        assert dut.done.value == 1, "END retired but done is low"
        h.check_dispatch(prog)
        c = h.counters()
        assert c["instructions"] == len(prog), c
        assert c["cycles"] == h.units.run_cycles, (c, h.units.run_cycles)
        total += c["cycles"]
        dut._log.info("trial %d: %d instructions in %d cycles; counters %s", trial, len(prog), c["cycles"], c)
    write_metrics(name="cp_dispatch_random", cycles=total)


@tb_test()
async def fetch_throughput(dut):
    """Back-to-back dispatch at one instruction per cycle; dispatch continues from the prefetch FIFO while
    memory is blocked; clear aborts and a new program starts at once (stale fetches dropped)."""
    h = await bring_up(dut, 3)
    rng = random.Random(3)
    depth = env_int("FETCH_DEPTH", 32)
    n = 256
    ops = (SocOp.MATRIX, SocOp.VECTOR, SocOp.PIM, SocOp.VLOAD)
    prog = [random_payload(rng, ops[i % 4]) for i in range(n)] + [encode(SocOp.END)]
    await h.load(0, prog)
    h.units.set(ready_prob=1.0, busy_max=0)
    await h.start(0, len(prog))
    await h.wait_idle()
    assert int(dut.error.value) == 0 and dut.done.value, (int(dut.error.value), int(dut.error_pc.value))
    h.check_dispatch(prog)
    cycles = h.units.run_cycles
    edges = sorted(e for s in h.units.stubs.values() for e, _, _ in s.accepted)
    first = edges[0] - h.units.start_edge
    gaps = sum(1 for a, b in zip(edges, edges[1:], strict=False) if b != a + 1)
    dut._log.info("%d instructions: first dispatch after %d cycles, done after %d cycles, %d gaps", n, first,
                  cycles, gaps)
    full_rate = env_int("FULL_RATE", 1)
    if full_rate:
        assert gaps == 0, f"{gaps} bubbles in back-to-back dispatch"
        assert cycles <= n + first + 4, cycles
    fences = [encode(SocOp.FENCE, units=0)] * n + [encode(SocOp.END)]
    await h.load(0x3000, fences)
    await h.start(0x3000, len(fences))
    await h.wait_idle()
    c_fence = h.units.run_cycles
    if full_rate:
        assert c_fence <= n + first + 4, c_fence
    # Memory back-pressure on: the fetch still keeps up with a 1/4-stalled memory most of the time.
    dut.mem_bp.value = 1
    await h.start(0, len(prog))
    await h.wait_idle()
    h.check_dispatch(prog)
    c_bp = h.units.run_cycles
    dut.mem_bp.value = 0

    # Prefetch: units stalled, the FIFO fills; memory blocked; then the units drain exactly fetch_depth.
    h.units.set(ready_prob=0.0)
    await h.start(0, len(prog))
    await h.cycles(depth + 40)
    dut.mem_hold.value = 1
    h.units.set(ready_prob=1.0)
    await h.cycles(depth + 40)
    got = sum(len(s.accepted) for s in h.units.stubs.values())
    assert got == depth, f"{got} instructions dispatched while memory was blocked, expected {depth}"
    stall0 = h.counters()["fetch_stall"]
    await h.cycles(10)
    assert h.counters()["fetch_stall"] == stall0 + 10, "fetch_stall does not count the blocked cycles"
    dut.mem_hold.value = 0
    await h.wait_idle()
    h.check_dispatch(prog)

    # Clear aborts; the next program starts at once and sees none of the old program's fetches.
    h.units.set(ready_prob=0.0)
    await h.start(0, len(prog))
    await h.cycles(20)
    await h.clear()
    prog2 = [random_payload(rng, ops[i % 4]) for i in range(40)] + [encode(SocOp.END)]
    await h.load(0x7000, prog2)
    h.units.set(ready_prob=0.8, busy_max=3)
    await h.start(0x7000, len(prog2))
    await h.wait_idle()
    assert int(dut.error.value) == 0 and dut.done.value == 1
    h.check_dispatch(prog2)
    write_metrics(name="cp_fetch", instructions=n, cycles=cycles, first_dispatch=first, fence_cycles=c_fence,
                  bp_cycles=c_bp)
    dut._log.info("FENCE(0) x %d: %d cycles; with memory back-pressure %d cycles", n, c_fence, c_bp)


@tb_test()
async def errors(dut):
    """Every error code with its error_pc; nothing dispatched after the error; busy drops; start ignored
    until clear; a good program runs after clear."""
    h = await bring_up(dut, 5)
    rng = random.Random(5)
    cfg = h.cfg
    h.units.set(ready_prob=0.8, busy_max=4)
    good = [random_payload(rng, op) for op in (SocOp.MATRIX, SocOp.VECTOR, SocOp.PIM, SocOp.VSTORE)]
    good += [encode(SocOp.FENCE, units=7), encode(SocOp.END)]
    await h.load(0x6000, good)

    async def expect(code, pc, program=None, upto=None, unit_code=0):
        await h.wait_idle()
        got = int(dut.error.value)
        want = int(code) | (unit_code << 8)
        assert got == want, f"error {got:#x}, expected {want:#x}"
        assert int(dut.error_pc.value) == pc, f"error_pc {int(dut.error_pc.value)}, expected {pc}"
        assert not dut.done.value
        if program is not None:
            h.check_dispatch(program, upto)
        # start is ignored until clear
        await h.start(0x6000, len(good))
        await h.cycles(5)
        assert not dut.busy.value and int(dut.error.value) == want, "start not ignored while in error"
        await h.clear()
        assert int(dut.error.value) == 0 and int(dut.error_pc.value) == 0
        await h.start(0x6000, len(good))
        await h.wait_idle()
        assert int(dut.error.value) == 0 and dut.done.value, "good program failed after clear"
        h.check_dispatch(good)

    # BAD_PROGRAM
    for addr, length in ((16, 4), (0x6000, 0), (cfg.pim.total_bytes - 32, 2), (cfg.pim.total_bytes, 1),
                         (0xFFFFFFE0, 4)):
        await h.start(addr, length)
        await h.cycles(2)
        assert not dut.busy.value
        await expect(CpError.BAD_PROGRAM, 0)

    # ILLEGAL: reserved op codes, reserved header bits, payload bits beyond the op's width
    base = [random_payload(rng, op) for op in (SocOp.MATRIX, SocOp.VECTOR, SocOp.PIM)]
    bad_words = [0, 8, 15, encode(SocOp.END) | (1 << 8), encode(SocOp.FENCE, units=1) | (1 << 12),
                 good[0] | (1 << 5), good[0] | (1 << 255), good[2] | (1 << 160), good[1] | (1 << 252),
                 encode(SocOp.END) | (1 << 40), encode(SocOp.END) | (1 << 200),
                 random_payload(rng, SocOp.VLOAD) | (1 << (32 + 136))]
    for bw in bad_words:
        try:
            decode(bw)
        except IsaError:
            pass
        else:
            raise AssertionError(f"firmware.isa.decode accepts {bw:#x}")
        prog = base + [bw] + base + [encode(SocOp.END)]
        await h.load(0x1000, prog)
        await h.start(0x1000, len(prog))
        await expect(CpError.ILLEGAL, 3, prog, upto=3)

    # Running past prog_len without END
    prog = base + [encode(SocOp.FENCE, units=3)]
    await h.load(0x1000, prog + [encode(SocOp.END)])
    await h.start(0x1000, len(prog))
    await expect(CpError.ILLEGAL, len(prog), prog)

    # FETCH: the program runs off the end of the memory model (in range of the device)
    words = 1 << env_int("MEM_WORDS_LOG2", 10)
    prog = base + [encode(SocOp.FENCE, units=7)]
    await h.load(32 * (words - len(prog)), prog)
    await h.start(32 * (words - len(prog)), len(prog) + 5)
    await expect(CpError.FETCH, len(prog), prog + [0] * 5, upto=len(prog))

    # Unit errors raised at decode (2 cycles after the handshake) and late (a DMA error)
    for op, cp_code in ((SocOp.MATRIX, CpError.MU), (SocOp.VECTOR, CpError.VQ), (SocOp.VSTORE, CpError.VQ),
                        (SocOp.PIM, CpError.PCU)):
        for latency in (2, 3, 20):
            code = rng.randrange(1, 16 if op == SocOp.MATRIX else 256)
            bad = random_payload(rng, op, marker(code, latency))
            after = [random_payload(rng, o) for o in (SocOp.MATRIX, SocOp.VECTOR, SocOp.PIM) if OP_UNIT[o] !=
                     OP_UNIT[op]] * 3
            fence = [] if latency == 2 else [encode(SocOp.FENCE, units=UNIT_BIT[OP_UNIT[op]])]
            prog = base + [bad] + after + fence + [random_payload(rng, op)] * 4 + [encode(SocOp.END)]
            await h.load(0x1000, prog)
            await h.start(0x1000, len(prog))
            await h.wait_idle()
            stub = h.units.stubs[OP_UNIT[op]]
            seen = stub.err_seen_at
            assert seen is not None
            for s in h.units.stubs.values():
                late = [e for e, _, _ in s.accepted if e >= seen]
                assert not late, f"unit {s.name} got instructions at edges {late} after the error at {seen}"
            dispatched = sum(len(s.accepted) for s in h.units.stubs.values())
            upto = next(i for i in range(len(prog) + 1)
                        if sum(1 for v in prog[:i] if SocOp(v & 0xF) in OP_UNIT) == dispatched)
            await expect(cp_code, 3, prog, upto=upto, unit_code=code)

    # A unit error while the CP waits at END
    prog = base + [random_payload(rng, SocOp.PIM, marker(9, 30)), encode(SocOp.END)]
    await h.load(0x1000, prog)
    await h.start(0x1000, len(prog))
    await expect(CpError.PCU, 3, prog, unit_code=9)
    dut._log.info("all error codes raised with their error_pc; recovered after clear each time")
