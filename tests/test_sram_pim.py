# amaranth: UnusedElaboratable=no
"""SRAM-PIM attention unit (hw/npu/sram_pim.py) on the Amaranth simulator, against sim/golden/sram_pim.py.

Random K / V / q / p (normal values plus zeros, infinities, NaNs and subnormals), scores and outputs
compared bit for bit; random idle cycles on the input streams and random back-pressure on the
output; writes into other rows while a command runs; the cycle formula the performance model uses
(``command_cycles``) against the RTL's cycles; parameter, command and capacity errors; the golden
model against float64 within the error bound of its summation order.
"""

import numpy as np
import pytest
from amaranth.sim import Simulator

from hw.npu.sram_pim import SramPimOp, SramPimUnit
from sim.golden import fp as G
from sim.golden.sram_pim import SramPimCommandError, SramPimModel, check_command, dot_error_bound

CONFIGS = {
    "m2_w8_l4": dict(macros=2, rows=16, word_lanes=8, mac_lanes=4, read_latency=1),
    "m4_w8_l8_rl2": dict(macros=4, rows=12, word_lanes=8, mac_lanes=8, read_latency=2),   # 48 lines: not 2^k
    "m1_w4_l2_rl3": dict(macros=1, rows=20, word_lanes=4, mac_lanes=2, read_latency=3),
}


# ---------------------------------------------------------------------------------------------
# Data
# ---------------------------------------------------------------------------------------------

def rand_bf16(rng, shape, specials=0.05, scale=1.0):
    """BF16 bits: normal values of varied magnitude, a fraction of zeros, infinities, NaNs, subnormals."""
    x = rng.standard_normal(shape) * scale * np.exp2(rng.integers(-4, 5, shape))
    bits = G.bf16_bits(x)
    special = np.array([0x0000, 0x8000, 0x7F80, 0xFF80, 0x7FC1, 0x0001, 0x8040, 0x7F7F], dtype=np.uint16)
    pick = rng.random(shape) < specials
    bits[pick] = special[rng.integers(0, len(special), int(pick.sum()))]
    return bits


def pack(lanes, bits_per_lane):
    v = 0
    for k, x in enumerate(lanes):
        v |= int(x) << (bits_per_lane * k)
    return v


def unpack(v, n, bits_per_lane):
    mask = (1 << bits_per_lane) - 1
    return [(v >> (bits_per_lane * k)) & mask for k in range(n)]


# ---------------------------------------------------------------------------------------------
# Harness: one driver (commands then their operands), one writer, one sink; per-cycle loops so that
# every process counts the same cycles
# ---------------------------------------------------------------------------------------------

class Run:
    def __init__(self, unit: SramPimUnit, seed=0, idle_p=0.0, stall_p=0.0):
        self.u = unit
        self.rng = np.random.default_rng(seed)
        self.idle_p, self.stall_p = idle_p, stall_p
        self.pre_writes = []      # (line, row bits) before the first command
        self.bg_writes = []       # (line, row bits) while the commands run
        self.commands = []        # (fields, operand beats)
        self.expected_beats = 0
        self.beats = []
        self.cmd_cycles = []
        self.out_cycles = []
        self.error_seen = []
        self.started = False
        self.bg_done = False

    def command(self, op, base, count, heads=1, stride=0, operands=(), beats_out=0, after_writes=False):
        """Queue a command and its operand beats; ``after_writes``: not before the background writes are done."""
        fields = dict(op=op, base=base, count=count, heads=heads, stride=stride)
        self.commands.append((fields, [pack(o, 16) for o in operands], after_writes))
        self.expected_beats += beats_out

    def _idle(self):
        return self.idle_p and self.rng.random() < self.idle_p

    async def _put(self, ctx, port, payload, counter):
        while True:
            v = not self._idle()
            ctx.set(port.valid, v)
            if v:
                ctx.set(port.payload.as_value(), payload)
            _, _, ready = await ctx.tick().sample(port.ready)
            counter[0] += 1
            assert counter[0] < self.max_cycles, f"no handshake on {port} within {self.max_cycles} cycles"
            if v and ready:
                ctx.set(port.valid, 0)
                return counter[0] - 1

    async def driver(self, ctx):
        u, cyc = self.u, [0]
        for line, row in self.pre_writes:
            await self._put(ctx, u.wr, pack(row, 16) << len(u.wr.payload.line) | line, cyc)
        self.started = True
        for fields, ops, after_writes in self.commands:
            while after_writes and not self.bg_done:
                await ctx.tick()
                cyc[0] += 1
            c = u.command_layout.const(fields)
            self.cmd_cycles.append(await self._put(ctx, u.cmd, c.as_value().value, cyc))
            for op in ops:
                await self._put(ctx, u.i, op, cyc)

    async def writer(self, ctx):
        u, cyc = self.u, [0]
        while not self.started:                 # the driver's own writes first (same port)
            await ctx.tick()
            cyc[0] += 1
        for line, row in self.bg_writes:
            await self._put(ctx, u.wr, pack(row, 16) << len(u.wr.payload.line) | line, cyc)
        self.bg_done = True

    async def sink(self, ctx):
        u, cyc = self.u, 0
        while len(self.beats) < self.expected_beats:
            ready = not (self.stall_p and self.rng.random() < self.stall_p)
            ctx.set(u.o.ready, ready)
            _, _, valid, payload, err = await ctx.tick().sample(u.o.valid, u.o.payload.as_value(), u.error)
            if err:
                self.error_seen.append(cyc)
            if valid and ready:
                self.beats.append(payload)
                self.out_cycles.append(cyc)
            cyc += 1
            assert cyc < self.max_cycles, f"{len(self.beats)} of {self.expected_beats} result beats"
        ctx.set(u.o.ready, 0)
        for _ in range(8):          # a few more cycles: nothing else may come out
            _, _, valid, err = await ctx.tick().sample(u.o.valid, u.error)
            assert not valid, "unexpected extra result beat"
            if err:
                self.error_seen.append(cyc)
            cyc += 1

    def run(self, max_cycles=20_000):
        self.max_cycles = max_cycles
        sim = Simulator(self.u)
        sim.add_clock(1e-8)
        sim.add_testbench(self.driver)
        sim.add_testbench(self.writer, background=True)
        sim.add_testbench(self.sink)
        sim.run()
        assert len(self.beats) == self.expected_beats, f"{len(self.beats)} of {self.expected_beats} result beats"
        return self

    def decoded(self):
        L = self.u.mac_lanes
        nbits = len(self.u.o.payload.n)
        out = []
        for v in self.beats:
            data = unpack(v, L, 32)
            n = (v >> (32 * L)) & ((1 << nbits) - 1)
            last = (v >> (32 * L + nbits)) & 1
            out.append((data, n, last))
        return out


def _scores_from_beats(beats, unit, count, heads):
    """Per head, the scores of its groups in order; checks n and last."""
    M = unit.macros
    groups = -(-count // M)
    it = iter(beats)
    out = []
    for _h in range(heads):
        s = []
        for g in range(groups):
            data, n, last = next(it)
            want_n = min(M, count - g * M)
            assert n == want_n, f"group {g}: n = {n}, expected {want_n}"
            assert last == (g == groups - 1)
            assert all(x == 0 for x in data[n:]), "lanes past n must be zero"
            s += data[:n]
        out.append(s)
    return np.array(out, dtype=np.uint32)


def _outputs_from_beats(beats, unit, heads):
    B = unit.beats
    it = iter(beats)
    out = []
    for _h in range(heads):
        row = []
        for k in range(B):
            data, n, last = next(it)
            assert n == unit.mac_lanes and last == (k == B - 1)
            row += data
        out.append(row)
    return np.array(out, dtype=np.uint32)


def _setup(cfg, seed):
    u = SramPimUnit(**cfg)
    g = SramPimModel(cfg["macros"], cfg["rows"], cfg["word_lanes"], cfg["mac_lanes"])
    return u, g, np.random.default_rng(seed)


# ---------------------------------------------------------------------------------------------
# Bit-exact random tests
# ---------------------------------------------------------------------------------------------

WIDE = dict(macros=4, rows=8, word_lanes=64, mac_lanes=16, read_latency=2)    # head_dim 64, as projected


@pytest.mark.parametrize("name,idle_p,stall_p", [(n, i, s) for n in CONFIGS for i, s in ((0.0, 0.0), (0.3, 0.5))]
                         + [("wide", 0.2, 0.3)])
def test_qk_then_pv_random(name, idle_p, stall_p):
    """Two heads' K and V written through ``wr``; QK of both heads in one command, PV of both in one
    command; scores and outputs bit for bit; random idle inputs and output back-pressure."""
    cfg = CONFIGS.get(name, WIDE)
    u, gold, rng = _setup(cfg, hash(name) % 1000 + int(idle_p * 10))
    M, R, W = cfg["macros"], cfg["rows"], cfg["word_lanes"]
    heads = 2
    count = M * (R // 4) - 1 if M > 1 else R // 4          # a partial last group when M > 1
    groups = -(-count // M)
    stride = groups
    kbase, vbase = 0, heads * stride
    assert vbase + heads * stride <= R
    run = Run(u, seed=7, idle_p=idle_p, stall_p=stall_p)
    for h in range(heads):
        K = rand_bf16(rng, (count, W))
        V = rand_bf16(rng, (count, W))
        for j in range(count):
            run.pre_writes.append(((kbase + h * stride) * M + j, K[j]))
            run.pre_writes.append(((vbase + h * stride) * M + j, V[j]))
        gold.store(kbase + h * stride, K)
        gold.store(vbase + h * stride, V)
    q = rand_bf16(rng, (heads, W))
    p = rand_bf16(rng, (heads, count), specials=0.1)
    L = cfg["mac_lanes"]
    q_ops = [q[h, b * L:(b + 1) * L] for h in range(heads) for b in range(u.beats)]
    p_ops = []
    for h in range(heads):
        for gi in range(groups):
            lanes = np.zeros(L, dtype=np.uint16)
            chunk = p[h, gi * M:(gi + 1) * M]
            lanes[:len(chunk)] = chunk
            if len(chunk) < M:                      # padding lanes of a last group carry garbage: ignored
                lanes[len(chunk):M] = rand_bf16(rng, (M - len(chunk),))
            p_ops.append(lanes)
    run.command(SramPimOp.QK, kbase, count, heads, stride, q_ops, beats_out=heads * groups)
    run.command(SramPimOp.PV, vbase, count, heads, stride, p_ops, beats_out=heads * u.beats)
    run.run()
    beats = run.decoded()
    scores = _scores_from_beats(beats[:heads * groups], u, count, heads)
    outs = _outputs_from_beats(beats[heads * groups:], u, heads)
    want_s = gold.qk(kbase, count, q, heads, stride)
    want_o = gold.pv(vbase, count, p, heads, stride)
    np.testing.assert_array_equal(scores, want_s)
    np.testing.assert_array_equal(outs, want_o)
    assert not run.error_seen


@pytest.mark.parametrize("name", ["m2_w8_l4", "m4_w8_l8_rl2"])
def test_writes_while_computing(name):
    """Lines of another region written through ``wr`` while QK and PV run on the first: results
    unchanged, and the new lines hold what was written (read back by a second QK)."""
    cfg = CONFIGS[name]
    u, gold, rng = _setup(cfg, 11)
    M, W, L = cfg["macros"], cfg["word_lanes"], cfg["mac_lanes"]
    count = 2 * M
    K = rand_bf16(rng, (count, W), specials=0.0)
    K2 = rand_bf16(rng, (count, W), specials=0.0)
    gold.store(0, K)
    run = Run(u, seed=3, idle_p=0.2, stall_p=0.2)
    run.pre_writes = [(j, K[j]) for j in range(count)]
    run.bg_writes = [(2 * M + j, K2[j]) for j in range(count)]          # rows 2, 3
    q = rand_bf16(rng, (2, W), specials=0.0)
    qops = [q[0, b * L:(b + 1) * L] for b in range(u.beats)]
    # first QK on rows 0-1 (three times, so the background writes overlap it), then QK on rows 2-3
    for _ in range(3):
        run.command(SramPimOp.QK, 0, count, 1, 0, qops, beats_out=2)
    run.command(SramPimOp.QK, 2, count, 1, 0, [q[1, b * L:(b + 1) * L] for b in range(u.beats)], beats_out=2,
                after_writes=True)
    run.run()
    gold.store(2, K2)
    beats = run.decoded()
    for r in range(3):
        np.testing.assert_array_equal(_scores_from_beats(beats[2 * r:2 * r + 2], u, count, 1),
                                      gold.qk(0, count, q[:1]))
    np.testing.assert_array_equal(_scores_from_beats(beats[6:8], u, count, 1), gold.qk(2, count, q[1:]))


def test_shared_keys_stride_zero():
    """stride 0: several queries against the same keys (multi-query attention)."""
    cfg = CONFIGS["m2_w8_l4"]
    u, gold, rng = _setup(cfg, 5)
    M, W, L = 2, 8, 4
    count, heads = 7, 3
    K = rand_bf16(rng, (count, W))
    gold.store(1, K)
    run = Run(u, seed=1, stall_p=0.3)
    run.pre_writes = [(M + j, K[j]) for j in range(count)]
    q = rand_bf16(rng, (heads, W))
    run.command(SramPimOp.QK, 1, count, heads, 0, [q[h, b * L:(b + 1) * L] for h in range(heads) for b in range(2)],
                beats_out=heads * 4)
    run.run()
    np.testing.assert_array_equal(_scores_from_beats(run.decoded(), u, count, heads), gold.qk(1, count, q, heads, 0))


# ---------------------------------------------------------------------------------------------
# Timing: the formula of the performance model, on the RTL
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", list(CONFIGS))
@pytest.mark.parametrize("op", [SramPimOp.QK, SramPimOp.PV])
@pytest.mark.parametrize("count,heads", [(1, 1), (5, 2), (9, 3)])
def test_command_cycles(name, op, count, heads):
    """Operands always valid, output always ready: cycles from the command's handshake to its last result
    beat equal ``SramPimUnit.command_cycles`` (no bubble between groups or heads)."""
    cfg = CONFIGS[name]
    u, gold, rng = _setup(cfg, 2)
    M, R, L = cfg["macros"], cfg["rows"], cfg["mac_lanes"]
    count = min(count, M * R // heads)
    groups = -(-count // M)
    if groups * heads > R:
        pytest.skip("does not fit this configuration")
    run = Run(u)
    if op == SramPimOp.QK:
        ops = [rand_bf16(rng, (L,)) for _ in range(heads * u.beats)]
        out = heads * groups
    else:
        ops = [rand_bf16(rng, (L,)) for _ in range(heads * groups)]
        out = heads * u.beats
    run.command(op, 0, count, heads, groups, ops, beats_out=out)
    run.run()
    assert run.out_cycles[-1] - run.cmd_cycles[0] == u.command_cycles(op, count, heads)


# ---------------------------------------------------------------------------------------------
# Errors
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("kwargs,field", [
    (dict(macros=3), "macros"), (dict(macros=0), "macros"), (dict(macros=32, mac_lanes=16), "macros"),
    (dict(rows=1), "rows"), (dict(rows=70000), "rows"), (dict(rows=8.0), "rows"),
    (dict(word_lanes=48), "word_lanes"), (dict(word_lanes=1), "word_lanes"),
    (dict(mac_lanes=12), "mac_lanes"), (dict(word_lanes=8, mac_lanes=16, macros=4), "mac_lanes"),
    (dict(read_latency=0), "read_latency"), (dict(read_latency=9), "read_latency"),
    (dict(read_latency=True), "read_latency"),
])
def test_parameter_errors(kwargs, field):
    with pytest.raises(ValueError, match=field) as e:
        SramPimUnit(**kwargs)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("fields,match", [
    (dict(count=0), "count must be in 1..16, not 0"),
    (dict(heads=0), "heads must be in 1..255"),
    (dict(count=13), "reach row 4, beyond the 4 rows"),            # 4 groups from row 1
    (dict(heads=3, stride=2, count=4), "reach row 5, beyond the 4 rows"),
])
def test_capacity_errors_golden(fields, match):
    f = dict(op="QK", base=1, count=4, heads=1, stride=0) | fields
    with pytest.raises(SramPimCommandError, match=match) as e:
        check_command(4, 4, **f)
    assert "\n" not in str(e.value)
    g = SramPimModel(4, 12, 8, 8)
    with pytest.raises(SramPimCommandError, match="line must be in 0..47, not 48"):
        g.write(48, np.zeros(8, np.uint16))


def test_capacity_errors_rtl():
    """Refused commands set ``error``, produce nothing and consume no operand; the unit then runs the next
    good command; writes past the last line (48 lines, 6-bit address) set ``error`` and change nothing."""
    cfg = CONFIGS["m4_w8_l8_rl2"]            # 4 macros x 12 rows
    u, gold, rng = _setup(cfg, 9)
    W = 8
    K = rand_bf16(rng, (4, W), specials=0.0)
    gold.store(11, K)
    run = Run(u)
    run.pre_writes = [(44 + j, K[j]) for j in range(4)] + [(48, np.full(W, 0x3F80, np.uint16)),
                                                            (63, np.full(W, 0x3F80, np.uint16))]
    q = rand_bf16(rng, (1, W), specials=0.0)
    for bad in (dict(count=0), dict(heads=0), dict(count=5), dict(base=12), dict(heads=2, stride=1)):
        f = dict(base=11, count=4, heads=1, stride=0) | bad
        with pytest.raises(SramPimCommandError):
            check_command(4, 12, "QK", **f)
        run.command(SramPimOp.QK, f["base"], f["count"], f["heads"], f["stride"], [], beats_out=0)
    run.command(SramPimOp.QK, 11, 4, 1, 0, [q[0]], beats_out=1)
    run.run()
    assert run.error_seen, "error flag never rose"
    np.testing.assert_array_equal(_scores_from_beats(run.decoded(), u, 4, 1), gold.qk(11, 4, q))


# ---------------------------------------------------------------------------------------------
# Golden model vs float64
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("M,W,L", [(4, 64, 16), (16, 64, 16), (1, 32, 2)])
def test_golden_float64_bound(M, W, L):
    """Scores and outputs of finite normal data within gamma_k sum|terms| of the float64 result, k the
    additions a term passes through (log2(L) + beats for QK; log2(M) + groups for PV). The measured worst
    ratio err / bound is printed."""
    rng = np.random.default_rng(M * W + L)
    n, heads = 300, 2
    rows = -(-n // M) * heads
    gold = SramPimModel(M, rows, W, L)
    K = rand_bf16(rng, (heads, n, W), specials=0.0)
    V = rand_bf16(rng, (heads, n, W), specials=0.0)
    q = rand_bf16(rng, (heads, W), specials=0.0)
    p = G.bf16_bits(rng.random((heads, n)))
    groups = -(-n // M)
    for h in range(heads):
        gold.store(h * groups, K[h])
    s = G.bits_to_f32(gold.qk(0, n, q, heads, groups)).astype(np.float64)
    k64, q64 = G.bf16_to_f32(K).astype(np.float64), G.bf16_to_f32(q).astype(np.float64)
    exact = np.einsum("hnw,hw->hn", k64, q64)
    bound = dot_error_bound(np.einsum("hnw,hw->hn", np.abs(k64), np.abs(q64)), int(np.log2(L)) + W // L)
    assert np.all(np.abs(s - exact) <= bound)
    r_qk = float(np.max(np.abs(s - exact) / np.maximum(bound, 1e-300)))
    for h in range(heads):
        gold.store(h * groups, V[h])
    o = G.bits_to_f32(gold.pv(0, n, p, heads, groups)).astype(np.float64)
    v64, p64 = G.bf16_to_f32(V).astype(np.float64), G.bf16_to_f32(p).astype(np.float64)
    exact = np.einsum("hnw,hn->hw", v64, p64)
    bound = dot_error_bound(np.einsum("hnw,hn->hw", np.abs(v64), np.abs(p64)), int(np.log2(M)) + groups)
    assert np.all(np.abs(o - exact) <= bound)
    r_pv = float(np.max(np.abs(o - exact) / np.maximum(bound, 1e-300)))
    print(f"M={M} W={W} L={L}: worst err/bound QK {r_qk:.3f}, PV {r_pv:.3f}")


def test_verilog_lint_clean(tmp_path):
    """The generated Verilog passes ``verilator --lint-only -Wall`` with the project's waivers (hw.gen.lint)."""
    from amaranth.back import verilog

    from hw.gen import lint

    path = tmp_path / "sram_pim_small.v"
    path.write_text(verilog.convert(SramPimUnit(**CONFIGS["m2_w8_l4"]), name="sram_pim_small", emit_src=False))
    assert lint(path, "sram_pim_small") == []
