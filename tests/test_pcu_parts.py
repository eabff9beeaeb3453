"""The PCU's parts alone on the Amaranth simulator (hw/pcu_parts.py, issue 16): the macro decoder's error codes
against the functional model, the row-access sequence of a memory transfer against the address map (one ACT per
bank row touched, the words in order, PREAB per row group; with back-pressure), the response router's word
indices. Fast: no Verilator build."""

import random

import numpy as np
import pytest
from amaranth.sim import Simulator

from hw.config import preset
from hw.memif import AddressMap
from hw.pcu_parts import MacroDecoder, Phase, ResponseRouter, RowAccessSequencer, StepKind
from hw.spec.macro import MACRO_LIMITS, Macro, MacroError, MacroFlag, MacroOp
from sim.pim_model import FunctionalDevice


def _run(dut, bench, clock=True):
    sim = Simulator(dut)
    if clock:
        sim.add_clock(1e-8)
    sim.add_testbench(bench)
    sim.run()


# ---------------------------------------------------------------- MacroDecoder

def _random_macro(rng, cfg):
    """A macro command near the edges of its checks."""
    lim_in, lim_out = MACRO_LIMITS["input_values"], MACRO_LIMITS["result_values"]
    total = cfg.pim.total_bytes

    def length(limit):
        return rng.choice([0, 1, 2, 17, 64, 100, limit - 1, limit, limit + 1, rng.randrange(1, limit + 1)])

    op = rng.choice([MacroOp.NOP, MacroOp.WRITE_VEC, MacroOp.GEMV, MacroOp.READ_RES, MacroOp.READ_RES, 7])
    # Undefined flag bits (0x08, 0x80) included: the functional model once let them through (``~`` on an IntFlag
    # keeps only the other defined flags) where the RTL rejects them.
    flags = rng.choice([0, 0, MacroFlag.BIAS, MacroFlag.GELU, MacroFlag.BIAS | MacroFlag.GELU, MacroFlag.BF16,
                        MacroFlag.BIAS | MacroFlag.BF16, 0x08, 0x80, MacroFlag.BIAS | 0x80])
    addr0 = rng.choice([0, 32, 64 * 1024, total - 32, total - 4096, total, 16, rng.randrange(0, total // 32) * 32])
    row = rng.choice([0, 1, cfg.pim.data_rows - 1, cfg.pim.data_rows, rng.randrange(0, cfg.pim.data_rows)])
    m = length(lim_out) if op == MacroOp.GEMV else rng.choice([0, 5])
    if op == MacroOp.GEMV and m > 256 and rng.random() < 0.8:
        m = rng.randrange(1, 257)         # keep the functional model's GEMVs small
    return Macro(op=int(op), flags=int(flags), n=length(lim_in if op != MacroOp.READ_RES else lim_out), m=m,
                 row=row, addr0=addr0, addr1=rng.choice([0] * 9 + [1] + _packings(rng, cfg)))


def _packings(rng, cfg):
    """``addr1`` values of packed GEMVs (hw/spec/macro.py) near the edges of their checks: pitch up to one past
    the global buffer, slot0 up to one past the row, reserved bits 16..31."""
    lg = cfg.pim.gb_columns.bit_length()
    out = []
    for _ in range(6):
        pack = rng.choice([1, 2, lg, lg + 1, rng.randrange(1, lg + 2), 255])
        per_row = cfg.pim.columns >> max(0, min(pack, lg) - 1)
        out.append(pack | rng.choice([0, 0, 1, per_row - 1, per_row, 255]) << 8)
    return out + [1 << 8, 1 << 16]


@pytest.mark.parametrize("config", ["tiny", "tiny-il"])
def test_macro_decoder_matches_the_functional_model_amaranth_sim(config):
    """Error code (the model's check order), GEMV tiles and chunks, transfer words, on random commands near
    the limits of every check."""
    cfg = preset(config)
    dut = MacroDecoder(cfg)
    rng = random.Random(16)
    p = cfg.pim
    cases = []
    for _ in range(300):
        mc = _random_macro(rng, cfg)
        input_n, result_n = rng.choice([0, 64, 300, MACRO_LIMITS["input_values"]]), rng.choice([0, 40, 1000])
        dev = FunctionalDevice(cfg)
        dev.input = np.zeros(input_n, dtype=np.uint16)
        dev.result = np.zeros(result_n, dtype=np.uint32)
        cases.append((mc, input_n, result_n, dev.execute(mc)))
    assert {code for *_, code in cases} >= {MacroError.NONE, MacroError.BAD_OPCODE, MacroError.BAD_FLAGS,
                                            MacroError.BAD_LENGTH, MacroError.BAD_ADDRESS, MacroError.BAD_REGION,
                                            MacroError.NO_INPUT, MacroError.NO_RESULT,
                                            MacroError.RESERVED_NONZERO, MacroError.BAD_PACKING}

    async def bench(ctx):
        for mc, input_n, result_n, code in cases:
            for name in ("op", "flags", "n", "m", "row", "addr0", "addr1"):
                ctx.set(getattr(dut.macro, name), getattr(mc, name))
            ctx.set(dut.input_n, input_n)
            ctx.set(dut.result_n, result_n)
            assert ctx.get(dut.code) == code, mc
            if mc.op == MacroOp.GEMV:
                assert ctx.get(dut.tiles) == -(-mc.m // (p.banks * p.channels))
                assert ctx.get(dut.chunks) == -(-mc.n // p.gb_values)
            if code == MacroError.NONE and mc.op != MacroOp.NOP:
                nbytes = {MacroOp.WRITE_VEC: 2 * mc.n, MacroOp.GEMV: 4 * mc.m,
                          MacroOp.READ_RES: (2 if mc.flags & MacroFlag.BF16 else 4) * mc.n}[MacroOp(mc.op)]
                assert ctx.get(dut.words) == -(-nbytes // p.column_bytes)

    _run(dut, bench, clock=False)


def test_macro_decoder_rejects_undefined_flag_bits_amaranth_sim():
    """Any flag bit outside an op's flags is BAD_FLAGS (hw/spec/macro.py), undefined bits included."""
    dut = MacroDecoder(preset("tiny"))

    async def bench(ctx):
        for op in (MacroOp.WRITE_VEC, MacroOp.GEMV, MacroOp.READ_RES):
            for flags in (0x08, 0x80, 0xF0):
                ctx.set(dut.macro.op, op)
                ctx.set(dut.macro.flags, flags)
                ctx.set(dut.macro.n, 64)
                ctx.set(dut.macro.m, 64)
                assert ctx.get(dut.code) == MacroError.BAD_FLAGS, (op, flags)

    _run(dut, bench, clock=False)


# ---------------------------------------------------------------- RowAccessSequencer

def expected_steps(cfg, addr, n):
    """The transfer's steps from the address map alone: per row group segment, one ACT per bank row it
    touches (on the channels it touches there: every bank row is its own ACT in the Row-Channel-Bank-Column
    map, one ACT per bank across the channels in the interleaved map), in order of first touch; the words in
    order; PREAB."""
    p = cfg.pim
    amap = AddressMap(p)
    rg = p.columns * p.banks * p.channels
    w0 = addr // p.column_bytes
    steps, j = [], 0
    while j < n:
        end = min(n, (w0 + j) // rg * rg + rg - w0)
        acts = {}
        words = []
        for k in range(j, end):
            row, ch, bank, col = amap.decode(addr + k * p.column_bytes)
            key = (bank, row) if amap.interleave else (ch, bank, row)
            acts.setdefault(key, [bank, row, 0])[2] |= 1 << ch
            words.append((StepKind.COLUMN, 1 << ch, bank, col, k, int(k == n - 1)))
        steps += [(StepKind.ACT, mask, bank, row) for bank, row, mask in acts.values()]
        steps += words
        steps.append((StepKind.PRE, (1 << p.channels) - 1, int(end == n)))
        j = end
    return steps


def _run_sequencer(cfg, transfers, ready_pattern):
    dut = RowAccessSequencer(cfg)
    got = []

    async def bench(ctx):
        for addr, n in transfers:
            ctx.set(dut.start, 1)
            ctx.set(dut.addr, addr)
            ctx.set(dut.count, n)
            assert not ctx.get(dut.step.valid)
            await ctx.tick()
            ctx.set(dut.start, 0)
            ctx.set(dut.addr, 0x1234)           # sampled with start: later values do not matter
            steps, cyc = [], 0
            while True:
                assert ctx.get(dut.step.valid), "the steps follow one another until the last PRE"
                ready = ready_pattern[cyc % len(ready_pattern)] == "-"
                ctx.set(dut.step.ready, ready)
                st = ctx.get(dut.step.payload)
                if ready:
                    kind = StepKind(st.kind)
                    if kind == StepKind.ACT:
                        steps.append((kind, st.channels, st.bank, st.row))
                    elif kind == StepKind.COLUMN:
                        steps.append((kind, st.channels, st.bank, st.col, st.index, st.last))
                    else:
                        steps.append((kind, st.channels, st.last))
                await ctx.tick()
                cyc += 1
                if ready and steps[-1][0] == StepKind.PRE and steps[-1][-1]:
                    break
            ctx.set(dut.step.ready, 0)
            assert not ctx.get(dut.step.valid)
            assert ctx.get(dut.words) == n
            got.append(steps)

    _run(dut, bench)
    return got


@pytest.mark.parametrize("config", ["tiny", "tiny-il", "default-4ch"])
@pytest.mark.parametrize("ready_pattern", ["-", "--_-__"])
def test_row_access_sequence_follows_the_address_map_amaranth_sim(config, ready_pattern):
    """Transfers starting inside a row group and crossing one or two, short ones, one word; with and without
    back-pressure on the step stream."""
    cfg = preset(config)
    p = cfg.pim
    rg = p.columns * p.banks * p.channels
    rng = random.Random(config)
    transfers = [(0, 1), (0, 40), (p.column_bytes * (rg - 3), 7), (p.column_bytes * rng.randrange(rg), rg + 5),
                 (p.column_bytes * (2 * rg - 1), 1), (p.column_bytes * rng.randrange(rg), rng.randrange(1, 80))]
    if ready_pattern == "-":
        transfers.append((p.column_bytes * rng.randrange(4 * rg), 2 * rg + rng.randrange(rg)))
    got = _run_sequencer(cfg, transfers, ready_pattern)
    for (addr, n), steps in zip(transfers, got, strict=True):
        assert steps == expected_steps(cfg, addr, n), (addr, n)


# ---------------------------------------------------------------- ResponseRouter

@pytest.mark.parametrize("config", ["tiny", "tiny-il"])
def test_response_router_gives_each_word_its_index_amaranth_sim(config):
    """WRITE_VEC: responses of the words of a transfer, returned in order per channel with the channels
    interleaved at random, land in the input buffer at the word's index; ``total`` and ``recv`` count them
    and ``clear`` zeroes the counts."""
    cfg = preset(config)
    p = cfg.pim
    x_words = MACRO_LIMITS["input_values"] // p.lanes          # as hw.pcu.Pcu sizes its buffers
    r_words = -(-MACRO_LIMITS["result_values"] // (p.banks * p.channels)) * p.acc_groups
    dut = ResponseRouter(cfg, x_words, r_words, p.acc_groups)
    amap = AddressMap(p)
    rng = random.Random(7)
    n = x_words
    addr = p.column_bytes * rng.randrange(64)
    per_ch = {c: [] for c in range(p.channels)}
    for k in range(n):
        per_ch[amap.decode(addr + k * p.column_bytes)[1]].append(k)

    async def bench(ctx):
        ctx.set(dut.phase, Phase.INPUT)
        ctx.set(dut.addr, addr)
        ctx.set(dut.start, 1)
        ctx.set(dut.clear, 1)
        await ctx.tick()
        ctx.set(dut.start, 0)
        ctx.set(dut.clear, 0)
        pending = {c: list(v) for c, v in per_ch.items()}
        written = {}
        while any(pending.values()):
            offered = {}
            for c in range(p.channels):
                valid = bool(pending[c]) and rng.random() < 0.6
                ctx.set(dut.pr[c].valid, valid)
                if valid:
                    offered[c] = pending[c][0]
                    ctx.set(dut.pr[c].payload.data, 1000 + pending[c][0])
            taken = [c for c in range(p.channels) if ctx.get(dut.pr[c].ready)]
            assert taken == ([min(offered)] if offered else [])
            if ctx.get(dut.xw.en):
                written[ctx.get(dut.xw.addr)] = ctx.get(dut.xw.data)
            for c in taken:
                pending[c].pop(0)
            await ctx.tick()
        for c in range(p.channels):
            ctx.set(dut.pr[c].valid, 0)
        assert written == {k: 1000 + k for k in range(n)}
        assert ctx.get(dut.total) == n
        assert [ctx.get(dut.recv[c]) for c in range(p.channels)] == [len(per_ch[c]) for c in range(p.channels)]
        ctx.set(dut.clear, 1)
        await ctx.tick()
        assert ctx.get(dut.total) == 0 and ctx.get(dut.recv[0]) == 0

    _run(dut, bench)
