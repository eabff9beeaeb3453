"""The vector unit's parts alone on the Amaranth simulator (issue 16): the instruction check, the sequencer's
walk and its waits between passes, operand B's delays and decoding, the lanes, the row reductions and the
write-back packing. Expected values come from the golden model (:mod:`sim.golden.vector`,
:mod:`sim.golden.fp32ext`, :mod:`hw.spec.fp`) and the ISA's closed-form timing, never from the RTL.
Fast: four lanes, no Verilator build."""

import numpy as np
from amaranth.sim import Simulator

from hw.npu.vector_issue import VectorBeat, VectorDecode, VectorSequencer
from hw.npu.vector_lanes import VectorLanes, VectorOperandB
from hw.npu.vector_parts import EXIT, LOAD, Phase, VectorLane
from hw.npu.vector_reduce import VectorReduce, VectorWriteBack
from hw.spec import fp as G
from hw.spec.vector_isa import EXIT_LATENCY, Fmt, MaskMode, Opcode, encode, vector_cycles
from sim.golden import fp32ext as X
from sim.golden.operands import SPECIAL_F32
from sim.golden.vector import BF16, COL, FP32, IMM, ROW, VEC, VectorModel, row_max, row_sum

L = 4
LG = 2
R = 2 * LG                       # reduction tree latency (2 log2 L)
DRAIN = EXIT_LATENCY + R + 3     # the unit's drain: vector_cycles' C = E + R + 6 with check, route and done
SIGN = np.uint32(0x80000000)
LOG2E = np.uint32(0x3FB8AA3B)


def _run(dut, bench, clock=True):
    sim = Simulator(dut)
    if clock:
        sim.add_clock(1e-8)
    sim.add_testbench(bench)
    sim.run()


def _word(values, width=32):
    return sum(int(v) << (width * k) for k, v in enumerate(values))


def _lanes_of(word, width=32, count=L):
    return np.array([(word >> (width * k)) & ((1 << width) - 1) for k in range(count)], dtype=np.uint32)


def _canon(rng, count):
    """Canonical FP32 values (as the lanes produce them): normal numbers and the special values."""
    x = G.f32_bits((rng.standard_normal(count) * 2.0 ** rng.integers(-8, 9, count)).astype(np.float32))
    special = rng.random(count) < 0.2
    x[special] = rng.choice(SPECIAL_F32, int(special.sum()))
    return X.load_f32(x)


# =====================================================================================================
# VectorDecode: sizes and the error check
# =====================================================================================================

def test_decode_matches_the_golden_check():
    """Random instructions near every limit: the error code is the golden model's, the sizes its pitches."""
    depth, max_n = 200, 90
    rng = np.random.default_rng(160)
    model = VectorModel(L, depth, max_n)
    cases = []
    for _ in range(400):
        op = int(rng.integers(14)) if rng.random() < 0.9 else int(rng.choice([14, 20, 31]))
        f = dict(op=op, n=int(rng.choice([0, 1, 5, 31, max_n, max_n + 1, int(rng.integers(1, max_n))])),
                 rows=int(rng.integers(0, 12)), a_fmt=int(rng.integers(2)), b_fmt=int(rng.integers(2)),
                 d_fmt=int(rng.integers(2)), b_mode=int(rng.integers(4)),
                 mask=int(rng.choice([0, 0, 0, 1, 2, 3])), pos=int(rng.integers(0, 6)),
                 imm0=int(rng.integers(0, 12)))
        for k in ("a", "b", "d", "aux"):
            f[k] = int(rng.choice([0, int(rng.integers(depth)), depth - int(rng.integers(1, 40)),
                                   (1 << 24) - 1]))
        cases.append(f)
    dut = VectorDecode(L, depth, max_n)
    got = []

    async def bench(ctx):
        for f in cases:
            ctx.set(dut.ins.as_value(), encode(**f))
            got.append((ctx.get(dut.error.as_value()), ctx.get(dut.nb), ctx.get(dut.pitch_a), ctx.get(dut.pitch_b),
                        ctx.get(dut.pitch_d), ctx.get(dut.mpitch), ctx.get(dut.b_mem)))

    _run(dut, bench, clock=False)
    errors = {e for e, *_ in got}
    assert len(errors) == 6, errors                  # every error code and NONE occur
    for f, (err, nb, pa, pb, pd, mp, b_mem) in zip(cases, got, strict=True):
        n = f["n"]
        assert err == model.check(f), f
        assert (nb, mp) == (-(-n // L), -(-n // (32 * L))), f
        assert (pa, pb, pd) == (model.pitch(n, f["a_fmt"]), model.pitch(n, f["b_fmt"]), model.pitch(n, f["d_fmt"]))
        assert b_mem == (f["op"] in (Opcode.ADD.value, Opcode.MUL.value) and f["b_mode"] != IMM)


# =====================================================================================================
# VectorSequencer: the walk over rows and beats, the waits between passes, the cycle count
# =====================================================================================================

async def _drive_sequencer(ctx, dut, fields, result_value=None, limit=5000):
    """Issue one instruction; answer reduced beats after E + R + 1 and scalar beats after E cycles (the
    pipeline's latencies) with ``result_value(tag)``. Returns the issued beats' tags and reads, the error
    and the cycle count at ``done``."""
    ctx.set(dut.instr.payload.as_value(), encode(**fields))
    ctx.set(dut.instr.valid, 1)
    await ctx.tick().until(dut.instr.ready)
    ctx.set(dut.instr.valid, 0)
    pending, beats = {}, []
    for cycle in range(limit):
        for port in ("reduced", "scalar"):
            ctx.set(getattr(dut, port), pending.pop((cycle, port), {"valid": 0}))
        if ctx.get(dut.done):
            return beats, ctx.get(dut.error.as_value()), ctx.get(dut.cycles)
        tag = ctx.get(dut.beat)
        if tag.valid:
            beats.append(dict(tag=tag, rd_a=ctx.get(dut.rd_a.addr) if ctx.get(dut.rd_a.en) else None,
                              breq=ctx.get(dut.breq), cycle=cycle))
            res = {"valid": 1, "phase": tag.phase, "ri": tag.ri, "glast": tag.glast}
            if tag.red and tag.last:
                pending[(cycle + EXIT + R + 1, "reduced")] = {**res, "value": result_value(tag)}
            if tag.scalar:
                pending[(cycle + EXIT, "scalar")] = {**res, "value": result_value(tag)}
        await ctx.tick()
    raise AssertionError("no done")


def test_sequencer_walks_rows_and_beats():
    """COPY (BF16 -> FP32) and SUM: one beat per cycle, the A reads, write addresses and enables of the
    golden layout, partial last beats, and the closed-form cycle count."""
    depth = 1024
    dut = VectorSequencer(L, depth, 4096, 16, DRAIN)
    model = VectorModel(L, depth)
    copy = dict(op=Opcode.COPY.value, a=100, d=300, n=10, rows=3, a_fmt=BF16, d_fmt=FP32)
    total = dict(op=Opcode.SUM.value, a=40, d=500, n=6, rows=5, d_fmt=BF16)
    out = {}

    async def bench(ctx):
        for name, f in (("copy", copy), ("sum", total)):
            out[name] = await _drive_sequencer(ctx, dut, f, result_value=lambda tag: 0)

    _run(dut, bench)
    beats, err, cycles = out["copy"]
    n, rows = copy["n"], copy["rows"]
    nb = -(-n // L)
    assert err == 0 and cycles == vector_cycles("COPY", n, rows, L)
    assert [b["cycle"] for b in beats] == list(range(beats[0]["cycle"], beats[0]["cycle"] + rows * nb))
    pa, pd = model.pitch(n, BF16), model.pitch(n, FP32)
    for i, b in enumerate(beats):
        r, k = divmod(i, nb)
        elems = [k * L + j < n for j in range(L)]
        assert b["rd_a"] == copy["a"] + r * pa + k // 2 and b["tag"].ahalf == k % 2
        assert b["tag"].wr and not b["tag"].red and (b["tag"].first, b["tag"].last) == (k == 0, k == nb - 1)
        assert b["tag"].wr_addr == copy["d"] + r * pd + k
        assert b["tag"].lane_valid == _word(elems, 1)
        assert b["tag"].wr_en == sum(3 << (2 * j) for j in range(L) if elems[j])

    beats, err, cycles = out["sum"]
    n, rows = total["n"], total["rows"]
    nb = -(-n // L)
    assert err == 0 and cycles == vector_cycles("SUM", n, rows, L)
    assert len(beats) == rows * nb
    for i, b in enumerate(beats):
        r, k = divmod(i, nb)
        assert b["tag"].red and not b["tag"].wr and b["tag"].fin == (k == nb - 1)
        # One BF16 element per row: word d + r // 2L, half-word slot r % 2L.
        assert b["tag"].wr_addr == total["d"] + r // (2 * L) and b["tag"].wr_en == 1 << (r % (2 * L))


def test_sequencer_softmax_groups_and_waits():
    """SOFTMAX over two row groups (G = 3, 5 rows): the passes MAIN, PASS2, FIN2, PASS3 per group, each
    over the group's rows, the next pass only after the group's last result; every PASS2 / PASS3 beat
    carries its own row's max and 1 / sum as they came back; the cycle count is the closed form."""
    G_, depth = 3, 1024
    dut = VectorSequencer(L, depth, 4096, G_, DRAIN)
    f = dict(op=Opcode.SOFTMAX.value, a=0, d=200, n=7, rows=5, mask=MaskMode.CAUSAL.value, pos=1)
    n, rows = f["n"], f["rows"]
    nb = -(-n // L)
    rows_of = {}

    def value(tag):          # a distinct value per (row of the group, pass)
        return 0x1000 * (int(tag.ri) + 1) + int(tag.phase.value if hasattr(tag.phase, "value") else tag.phase)

    out = {}

    async def bench(ctx):
        out["r"] = await _drive_sequencer(ctx, dut, f, result_value=value)

    _run(dut, bench)
    beats, err, cycles = out["r"]
    assert err == 0 and cycles == vector_cycles("SOFTMAX", n, rows, L, row_group=G_)
    # The sequence of (phase, row in group) per group.
    want = []
    for g0 in range(0, rows, G_):
        gs = min(G_, rows - g0)
        for ph, per_row in ((Phase.MAIN, nb), (Phase.PASS2, nb), (Phase.FIN2, 1), (Phase.PASS3, nb)):
            want += [(ph, ri, g0 + ri) for ri in range(gs) for _ in range(per_row)]
    got = [(Phase(b["tag"].phase), int(b["tag"].ri), None) for b in beats]
    assert [(p, r) for p, r, _ in got] == [(p, r) for p, r, _ in want]
    for b, (ph, ri, row) in zip(beats, want, strict=True):
        tag = b["tag"]
        rows_of.setdefault(row, []).append(b)
        if ph in (Phase.PASS2, Phase.PASS3):
            assert tag.s0 == 0x1000 * (ri + 1) + Phase.MAIN.value       # the row's max
        if ph == Phase.PASS3:
            assert tag.s1 == 0x1000 * (ri + 1) + Phase.FIN2.value       # the row's 1 / sum
        if ph != Phase.FIN2:
            k = [x for x in rows_of[row] if Phase(x["tag"].phase) == ph].index(b)
            assert tag.causal == _word([k * L + j <= row + f["pos"] for j in range(L)], 1)
            assert tag.glast == (ri == min(G_, rows - (row - ri)) - 1)


def test_beat_b_requests_and_stats_read():
    """The B request of a beat at a given position, against where the golden model places the operand: a
    ``COL`` element per row (word ``b + row / slots``, its slot), a ``ROW`` / ``VEC`` BF16 element (word
    ``b_row + beat / 2`` or ``b + beat / 2``, the half), gamma / beta (``b + beat``), the bitmap word of a
    beat (``x_row + beat / 32``, its ``L``-bit group); none for a scalar beat or an ``IMM`` operand;
    LN_APPLY's statistics word of a row (``aux + 2 row / L``)."""
    dut = VectorBeat(L, 1024, 16)
    pos = dict(row=13, beat=37, a_row=300, b_row=500, d_row=700, x_row=900)
    cases = [   # (instruction, phase, issue, stats_rd, want (addr, en, sel) of breq, or of the A read)
        (dict(op=Opcode.ADD.value, b=40, b_mode=COL, b_fmt=BF16), Phase.MAIN, 1, 0, (40 + 13 // (2 * L), 1, 13 % 8)),
        (dict(op=Opcode.MUL.value, b=40, b_mode=COL, b_fmt=FP32), Phase.MAIN, 1, 0, (40 + 13 // L, 1, 13 % L)),
        (dict(op=Opcode.ADD.value, b=40, b_mode=ROW, b_fmt=BF16), Phase.MAIN, 1, 0, (500 + 37 // 2, 1, 1)),
        (dict(op=Opcode.ADD.value, b=40, b_mode=VEC, b_fmt=FP32), Phase.MAIN, 1, 0, (40 + 37, 1, 1)),
        (dict(op=Opcode.ADD.value, b=40, b_mode=IMM), Phase.MAIN, 1, 0, (0, 0, 0)),
        (dict(op=Opcode.LN_APPLY.value, b=40), Phase.MAIN, 1, 0, (40 + 37, 1, 0)),
        (dict(op=Opcode.SOFTMAX.value, mask=MaskMode.BITMAP.value), Phase.PASS2, 1, 0, (900 + 1, 1, 37 % 32)),
        (dict(op=Opcode.SOFTMAX.value, mask=MaskMode.CAUSAL.value), Phase.PASS2, 1, 0, (0, 0, 0)),
        (dict(op=Opcode.SOFTMAX.value, mask=MaskMode.BITMAP.value), Phase.FIN2, 1, 0, (0, 0, 0)),
        (dict(op=Opcode.ADD.value, b=40, b_mode=ROW), Phase.MAIN, 0, 0, (0, 0, 0)),
    ]
    got, stats = [], []

    async def bench(ctx):
        ctx.set(dut.nb, 40)
        for ins, phase, issue, stats_rd, _ in cases:
            ctx.set(dut.ins.as_value(), encode(**ins))
            ctx.set(dut.b_mem, ins["op"] in (Opcode.ADD.value, Opcode.MUL.value) and ins.get("b_mode") != IMM)
            ctx.set(dut.pos, {**pos, "phase": phase})
            ctx.set(dut.issue, issue)
            ctx.set(dut.stats_rd, stats_rd)
            breq = ctx.get(dut.breq)
            got.append((breq.addr, breq.en, breq.sel))
        ctx.set(dut.ins.as_value(), encode(op=Opcode.LN_APPLY.value, aux=80))
        ctx.set(dut.issue, 0)
        ctx.set(dut.stats_rd, 1)
        stats.append((ctx.get(dut.a_addr), ctx.get(dut.a_en)))

    _run(dut, bench, clock=False)
    assert got == [want for *_, want in cases]
    assert stats == [(80 + 2 * pos["row"] // L, 1)]


def test_sequencer_rejects_without_issuing():
    """An instruction with an error finishes at once (``done`` right after the one cycle of ``Check``, so the
    cycle counter reads 1) with the golden error code, and issues nothing."""
    dut = VectorSequencer(L, 64, 100, 16, DRAIN)
    model = VectorModel(L, 64, 100)
    bad = [dict(op=20, n=4, rows=1), dict(op=Opcode.COPY.value, n=101, rows=1),
           dict(op=Opcode.COPY.value, a=60, n=40, rows=2), dict(op=Opcode.ADD.value, n=4, rows=1, mask=2)]
    out = []

    async def bench(ctx):
        for f in bad:
            out.append(await _drive_sequencer(ctx, dut, f, result_value=lambda tag: 0))

    _run(dut, bench)
    for f, (beats, err, cycles) in zip(bad, out, strict=True):
        assert err == model.check(f) != 0 and beats == [] and cycles == 1, (f, err, cycles)


# =====================================================================================================
# VectorOperandB: the read delayed to its stage, decoded per lane
# =====================================================================================================

def test_operand_b_delays_and_decoding():
    """ROW / VEC / COL / IMM operands of ADD (consumed at S1) and MUL (S2), gamma / beta of LN_APPLY (S5,
    S6) and bitmap mask bits: each registered exactly when its stage samples it, values as the golden
    model loads them."""
    rng = np.random.default_rng(161)
    aw = 5
    mem = [int.from_bytes(rng.bytes(4 * L), "little") for _ in range(1 << aw)]
    for slot in (0, 3):                               # special values in some slots of word 7
        mem[7] = (mem[7] & ~(0xFFFFFFFF << (32 * slot))) | (int(SPECIAL_F32[slot + 2]) << (32 * slot))
    off = VectorLane.OFFSETS
    imm = int(G.f32_bits(np.float32(-1.75)))
    cases = []          # (ins fields, request, cycle the operand is valid, checker(outputs) -> bool)
    for op, stage in ((Opcode.ADD, "s1"), (Opcode.MUL, "s2")):
        for mode, fmt, sel in ((ROW, FP32, 0), (ROW, BF16, 1), (VEC, BF16, 0), (COL, FP32, 2), (COL, BF16, 5),
                               (IMM, FP32, 0)):
            addr = int(rng.choice([7, 7, *range(11)]))           # word 7: special values; 11, 13: below
            word = mem[addr]
            if mode == IMM:
                want = np.full(L, X.load_f32(np.uint32(imm)), dtype=np.uint32)
            elif mode == COL:
                width = 16 if fmt == BF16 else 32
                e = np.uint32((word >> (width * sel)) & ((1 << width) - 1))
                want = np.full(L, X.load_bf16(np.uint16(e)) if fmt == BF16 else X.load_f32(e), dtype=np.uint32)
            elif fmt == BF16:
                want = X.load_bf16(_lanes_of(word >> (16 * L * sel), 16).astype(np.uint16))
            else:
                want = X.load_f32(_lanes_of(word))
            cases.append((dict(op=op.value, b_mode=mode, b_fmt=fmt, imm0=imm), dict(addr=addr, en=int(mode != IMM),
                          sel=sel), LOAD + off[stage], "b", want))
    word = mem[11]
    gamma = X.load_bf16(np.array([(word >> (32 * j)) & 0xFFFF for j in range(L)], dtype=np.uint16))
    beta = X.load_bf16(np.array([(word >> (32 * j + 16)) & 0xFFFF for j in range(L)], dtype=np.uint16))
    ln = dict(op=Opcode.LN_APPLY.value)
    cases.append((ln, dict(addr=11, en=1, sel=0), LOAD + off["s5"], "gamma", gamma))
    cases.append((ln, dict(addr=11, en=1, sel=0), LOAD + off["s6"], "beta", beta))
    vis = rng.random((1, 32 * L)) < 0.5
    bitmap = VectorModel.bitmap_words(vis, L)[0]
    mem[13] = _word(bitmap)
    for beat in (0, 9, 31):
        cases.append((dict(op=Opcode.SOFTMAX.value, mask=MaskMode.BITMAP.value), dict(addr=13, en=1, sel=beat),
                      LOAD + off["s1"], "mask", _word(vis[0, beat * L:(beat + 1) * L], 1)))
    dut = VectorOperandB(L, aw)
    got = []

    async def bench(ctx):
        for ins, req, at, what, _ in cases:
            ctx.set(dut.ins.as_value(), encode(**ins))
            ctx.set(dut.req, req)
            data = 0
            for cycle in range(at + 1):
                ctx.set(dut.rd_b.data, data)             # the synchronous read's data, one cycle after en
                if cycle == at:
                    v = ctx.get(getattr(dut, what))
                    got.append(int(v) if what == "mask" else np.array([int(v[j]) for j in range(L)], np.uint32))
                data = mem[ctx.get(dut.rd_b.addr)] if ctx.get(dut.rd_b.en) else 0
                await ctx.tick()
                ctx.set(dut.req, {"en": 0})
            for _ in range(at + 3):                      # drain
                await ctx.tick()

    _run(dut, bench)
    for (ins, req, _, what, want), g in zip(cases, got, strict=True):
        if what == "mask":
            assert g == want, (req, g, want)
        else:
            np.testing.assert_array_equal(g, want, err_msg=f"{ins} {req} {what}")


# =====================================================================================================
# VectorLanes: load / convert, the micro-program, masks and zeroing at the exit
# =====================================================================================================

def _lanes_run(programs):
    """Instructions one after the other into :class:`VectorLanes`, each a list of beats issued back to back
    (tag at issue, A word one cycle later, B operands when their stage samples them: ``stage_inputs``
    maps a port to its offset after issue); returns per instruction and beat the exit tag, ``y`` and
    ``scalar`` ``EXIT`` cycles after the beat's issue."""
    dut = VectorLanes(L, 10, 16)
    results = []

    async def bench(ctx):
        for ins, beats, stage_inputs in programs:
            out = []
            ctx.set(dut.ins.as_value(), encode(**ins))
            for cycle in range(len(beats) + EXIT + 1):
                ctx.set(dut.beat, beats[cycle]["tag"] if cycle < len(beats) else {"valid": 0})
                if 0 <= cycle - 1 < len(beats):
                    ctx.set(dut.a_data, beats[cycle - 1]["a"])
                    ctx.set(dut.sval, beats[cycle - 1].get("sval", 0))
                for port, offset in (stage_inputs or {}).items():
                    j = cycle - offset
                    if 0 <= j < len(beats) and port in beats[j]:
                        ctx.set(getattr(dut, port), beats[j][port])
                j = cycle - EXIT
                if 0 <= j < len(beats):
                    out.append((ctx.get(dut.exit), np.array([ctx.get(dut.y[i]) for i in range(L)], np.uint32),
                                ctx.get(dut.scalar)))
                await ctx.tick()
            results.append(out)

    _run(dut, bench)
    return results


def _golden_op(op, x, b, imm0, imm1):
    if op == Opcode.ADD:
        return G.add_f32(x, b)
    if op == Opcode.MUL:
        return X.mul_f32(x, b)
    if op == Opcode.SCALE:
        return G.add_f32(X.mul_f32(x, np.uint32(imm0)), np.uint32(imm1))
    if op == Opcode.COPY:
        return x
    return {Opcode.EXP: X.exp, Opcode.GELU: X.gelu, Opcode.RECIP: X.recip}[op](x)


def test_lanes_elementwise_ops():
    """ADD (B at S1), MUL (B at S2), SCALE, EXP, GELU, RECIP and COPY of BF16 halves: each beat's lane results
    ``EXIT`` cycles after its issue, with its tag, equal to the golden model's."""
    rng = np.random.default_rng(162)
    off = VectorLane.OFFSETS
    imm0, imm1 = int(G.f32_bits(np.float32(0.375))), int(G.f32_bits(np.float32(-2.5)))
    programs, wants = [], []
    for op in (Opcode.ADD, Opcode.MUL, Opcode.SCALE, Opcode.EXP, Opcode.GELU, Opcode.RECIP, Opcode.COPY):
        a_fmt = BF16 if op == Opcode.COPY else FP32
        beats, want = [], []
        for k in range(5):
            raw = G.f32_bits((rng.standard_normal(2 * L) * 4).astype(np.float32))
            raw[k % (2 * L)] = SPECIAL_F32[k]
            if a_fmt == BF16:
                halves = (raw >> 16).astype(np.uint16)
                word, half = _word(halves, 16), k % 2
                x = X.load_bf16(halves[half * L:(half + 1) * L])
            else:
                word, half = _word(raw[:L]), 0
                x = X.load_f32(raw[:L])
            b = X.load_f32(G.f32_bits((rng.standard_normal(L) * 3).astype(np.float32)))
            beats.append(dict(tag={"valid": 1, "phase": Phase.MAIN, "wr": 1, "ahalf": half, "lane_valid": 0xF,
                                   "wr_addr": k}, a=word, b=[int(v) for v in b]))
            want.append(_golden_op(op, x, b, imm0, imm1))
        stage = {Opcode.ADD: "s1", Opcode.MUL: "s2"}.get(op)
        programs.append((dict(op=op.value, a_fmt=a_fmt, imm0=imm0, imm1=imm1), beats,
                         {"b": LOAD + off[stage]} if stage else None))
        wants.append(want)
    for (ins, *_), out, want in zip(programs, _lanes_run(programs), wants, strict=True):
        op = Opcode(ins["op"])
        for k, (tag, y, sc) in enumerate(out):
            assert tag.valid and tag.wr_addr == k and not sc.valid
            np.testing.assert_array_equal(y, want[k], err_msg=f"{op} beat {k}")


def test_lanes_softmax_masks_and_scalar_beat():
    """SOFTMAX's last pass: ``exp(x - max) * (1 / sum)`` per lane, 0 where the causal mask hides a lane, past
    the row's end, or in a row whose max is -inf; a scalar beat (LN_STATS FIN2): lane 0 computes
    ``rsqrt(sval * imm0 + imm1)`` from ``sval`` and comes out as the row result."""
    rng = np.random.default_rng(163)
    beats, want = [], []
    for k in range(4):
        x = X.load_f32(G.f32_bits((rng.standard_normal(L) * 3).astype(np.float32)))
        mx = X.load_f32(G.f32_bits(np.float32(2.0 + k))) if k != 2 else X.NEG_INF
        inv = X.load_f32(G.f32_bits(np.float32(0.25 / (k + 1))))
        causal = [j <= k for j in range(L)]
        valid = [j < 3 for j in range(L)] if k == 3 else [True] * L
        e = X.exp2(X.mul_f32(G.add_f32(x, mx ^ SIGN), LOG2E))
        y = X.mul_f32(e, inv)
        keep = np.array(causal) & np.array(valid) & (mx != X.NEG_INF)
        want.append(np.where(keep, y, np.uint32(0)))
        beats.append(dict(tag={"valid": 1, "phase": Phase.PASS3, "wr": 1, "lane_valid": _word(valid, 1),
                               "causal": _word(causal, 1), "s0": int(mx), "s1": int(inv), "ri": k},
                          a=_word(x)))
    softmax = (dict(op=Opcode.SOFTMAX.value, mask=MaskMode.CAUSAL.value), beats, None)
    imm0, imm1 = int(G.f32_bits(np.float32(1 / 24))), int(G.f32_bits(np.float32(1e-5)))
    sv = G.f32_bits(np.float32([37.5, 0.0]))
    beats = [dict(tag={"valid": 1, "phase": Phase.FIN2, "scalar": 1, "wr": 1, "ri": k, "glast": k}, a=0,
                  sval=int(v)) for k, v in enumerate(sv)]
    out, out_scalar = _lanes_run([softmax, (dict(op=Opcode.LN_STATS.value, imm0=imm0, imm1=imm1), beats, None)])
    for k, (tag, y, sc) in enumerate(out):
        assert tag.ri == k and not sc.valid
        np.testing.assert_array_equal(y, want[k], err_msg=f"beat {k}")

    for k, (_, y, sc) in enumerate(out_scalar):
        want0 = X.rsqrt(G.add_f32(X.mul_f32(sv[k:k + 1], np.uint32(imm0)), np.uint32(imm1)))[0]
        assert y[0] == want0 and sc.valid and sc.value == want0
        assert (sc.ri, sc.glast, Phase(sc.phase)) == (k, k, Phase.FIN2)


# =====================================================================================================
# VectorReduce: lane tree and max tree, the row accumulator
# =====================================================================================================

def _reduce_run(op, rows, vis=None, phase=Phase.MAIN, gap=0):
    """Rows of canonical FP32 values as reduced beats (``gap`` idle cycles between rows); returns the
    result and fin outputs of every cycle."""
    dut = VectorReduce(L, 10, 16)
    beats = []
    for r, x in enumerate(rows):
        nb = -(-len(x) // L)
        pad = np.concatenate([x, np.full(nb * L - len(x), 0x7FC00000, np.uint32)])   # garbage beyond the row
        v = np.ones(nb * L, bool) if vis is None else np.concatenate([vis[r], np.zeros(nb * L - len(x), bool)])
        for k in range(nb):
            lanes_ok = [k * L + j < len(x) for j in range(L)]
            fin = op in (Opcode.MAX, Opcode.SUM) and k == nb - 1           # as the sequencer marks it
            beats.append(dict(tag={"valid": 1, "red": 1, "fin": int(fin), "first": int(k == 0),
                                   "last": int(k == nb - 1), "phase": phase, "ri": r, "glast": int(r == len(rows) - 1),
                                   "lane_valid": _word(lanes_ok, 1), "wr_addr": 100 + r, "wr_en": 1 << r},
                              y=[int(t) for t in pad[k * L:(k + 1) * L]], vis=_word(v[k * L:(k + 1) * L], 1)))
        beats += [dict(tag={"valid": 0}, y=[0] * L, vis=0)] * gap
    out = []

    async def bench(ctx):
        ctx.set(dut.ins.as_value(), encode(op=op.value))
        for cycle in range(len(beats) + R + 3):
            b = beats[cycle] if cycle < len(beats) else dict(tag={"valid": 0}, y=[0] * L, vis=0)
            ctx.set(dut.beat, b["tag"])
            ctx.set(dut.vis, b["vis"])
            for j in range(L):
                ctx.set(dut.y[j], b["y"][j])
            res, fin = ctx.get(dut.result), ctx.get(dut.fin)
            out.append((cycle, res, fin))
            await ctx.tick()

    _run(dut, bench)
    last = [i for i, b in enumerate(beats) if b["tag"].get("last")]
    return out, last, dut.latency


def test_reduce_sum_and_max_rows():
    """SUM and MAX of rows of 1 to 3 beats (partial last beats, special values, back to back and with gaps):
    one result per row ``latency`` cycles after its last beat, the golden row sum (lane tree, then beats in
    order) or row max, with the row's tag fields and the write request."""
    rng = np.random.default_rng(164)
    for op, model in ((Opcode.SUM, lambda x: row_sum(x, L)), (Opcode.MAX, row_max)):
        for gap in (0, 2):
            rows = [_canon(rng, n) for n in (9, 4, 1, 12, 7)]
            out, last, lat = _reduce_run(op, rows, gap=gap)
            assert lat == R + 1
            results = [(c, res, fin) for c, res, fin in out if res.valid]
            assert [c for c, *_ in results] == [c + lat for c in last]
            for r, (_, res, fin) in enumerate(results):
                assert res.value == model(rows[r][None, :])[0], (op, gap, r)
                assert (res.ri, res.glast, Phase(res.phase)) == (r, r == len(rows) - 1, Phase.MAIN)
                assert fin.valid and (fin.addr, fin.en) == (100 + r, 1 << r)
            assert sum(1 for _, _, fin in out if fin.valid) == len(rows)


def test_reduce_softmax_masked_max_and_sum():
    """SOFTMAX: the first pass takes the max over visible elements only (a fully masked row gives -inf), the
    second the sum over visible elements (masked ones add nothing); no write request (``fin`` clear)."""
    rng = np.random.default_rng(165)
    rows = [_canon(rng, n) for n in (10, 5, 3)]
    vis = [rng.random(len(x)) < 0.6 for x in rows]
    vis[1][:] = False
    out, _, _ = _reduce_run(Opcode.SOFTMAX, rows, vis=vis, phase=Phase.MAIN)
    got = [res.value for _, res, _ in out if res.valid]
    want = [row_max(np.where(v, x, X.NEG_INF)[None, :])[0] for x, v in zip(rows, vis, strict=True)]
    assert got == [int(w) for w in want] and want[1] == X.NEG_INF
    assert not any(fin.valid for *_, fin in out)
    out, _, _ = _reduce_run(Opcode.SOFTMAX, rows, vis=vis, phase=Phase.PASS2)
    got = [res.value for _, res, _ in out if res.valid]
    want = [row_sum(np.where(v, x, SIGN)[None, :], L)[0] for x, v in zip(rows, vis, strict=True)]
    assert got == [int(w) for w in want] and not any(fin.valid for *_, fin in out)


# =====================================================================================================
# VectorWriteBack: packing in the destination format, reduction writes first
# =====================================================================================================

def test_write_back_packing():
    """Lane results in FP32 and BF16 (rounded to nearest even, both halves of the word), a scalar beat's lane 0
    replicated, a reduction replicated and preferred over a lane write in the same cycle; nothing without
    a write."""
    rng = np.random.default_rng(166)
    dut = VectorWriteBack(L, 10, 16)
    y = _canon(rng, L)
    y[1] = 0x3F808000                                  # a tie: rounds to even
    acc = int(_canon(rng, 1)[0])
    cases = [
        (FP32, {"valid": 0}, {"valid": 1, "wr": 1, "wr_addr": 5, "wr_en": 0xFF}, (5, 0xFF, _word(y))),
        (BF16, {"valid": 0}, {"valid": 1, "wr": 1, "wr_addr": 6, "wr_en": 0x0F},
         (6, 0x0F, _word(np.tile(X.store_bf16(y), 2), 16))),
        (FP32, {"valid": 0}, {"valid": 1, "wr": 1, "scalar": 1, "wr_addr": 7, "wr_en": 0x30}, (7, 0x30, _word([y[0]] * L))),
        (BF16, {"valid": 1, "addr": 9, "en": 0x04}, {"valid": 1, "wr": 1, "wr_addr": 8, "wr_en": 0xFF},
         (9, 0x04, _word(np.tile(X.store_bf16(np.full(L, acc, np.uint32)), 2), 16))),
        (FP32, {"valid": 0}, {"valid": 1, "wr": 0, "red": 1, "wr_addr": 8, "wr_en": 0xFF}, (0, 0, 0)),
    ]
    got = []

    async def bench(ctx):
        for j in range(L):
            ctx.set(dut.y[j], int(y[j]))
        ctx.set(dut.acc, acc)
        for d_fmt, fin, beat, _ in cases:
            ctx.set(dut.d_fmt, Fmt(d_fmt))
            ctx.set(dut.fin, fin)
            ctx.set(dut.beat, beat)
            got.append((ctx.get(dut.wr.addr), ctx.get(dut.wr.en), ctx.get(dut.wr.data)))

    _run(dut, bench, clock=False)
    for (*_, want), g in zip(cases, got, strict=True):
        assert g == want
