"""The PCU's 4-bit GEMV (hw/pcu_w4.py, issue 19) without a Verilator build: the macro decoder's error codes and
layout against the functional model (Amaranth simulator), the row walker of scale / selector columns and the
global-buffer writes against :class:`firmware.pim_lowprec.W4GemvLayout` on every 4-bit preset (the tiny ones
also run on the RTL: tests/test_pcu.py)."""

import random

import numpy as np
import pytest
from amaranth.sim import Simulator

from firmware.pim_lowprec import W4GemvLayout, _wrgbs, act_words
from hw.config import preset
from hw.pcu_w4 import W4Decoder, w4_units
from hw.spec.macro import MACRO_LIMITS, Macro, MacroError, MacroFlag, MacroOp
from sim.pim_model import FunctionalDevice

W4_PRESETS = ["tiny-w4", "tiny-w4a8", "default-w4", "default-w4a8"]
# Groups of 64 with grid selectors: a full chunk of 2048 FP8 inputs has 32 groups, selectors in two columns, which
# the PCU does not issue (UNSUPPORTED from K = 1088 on; on every preset a full chunk is issued).
WIDE_GB = ("default-w4a8", {"pim.quant_group": 64})


def _cfg(config):
    if isinstance(config, tuple):
        return preset(config[0]).replace(**config[1])
    return preset(config)


def _max_chunk(p):
    return p.gb_slots * 64 // p.quant_group * p.quant_group


def _random_gemv(rng, cfg):
    p = cfg.pim
    q, mx = p.quant_group, _max_chunk(p)
    total = p.total_bytes
    K = rng.choice([0, 64, q // 2, q, q + 64, 2 * q, mx, mx - q, mx + q, 3 * mx, MACRO_LIMITS["input_values"],
                    MACRO_LIMITS["input_values"] + 1, q * rng.randrange(1, mx // q + 1),
                    q * rng.randrange(1, MACRO_LIMITS["input_values"] // q + 1)])
    N = rng.choice([0, 1, 16, 17, 200, MACRO_LIMITS["result_values"], MACRO_LIMITS["result_values"] + 1,
                    rng.randrange(1, 4097)])
    per_tile = p.banks * p.channels
    row = rng.choice([0, 1, p.data_rows - 1, p.data_rows, rng.randrange(0, p.data_rows),
                      max(0, p.data_rows - -(-N // per_tile) // 2)])
    flags = rng.choice([0, 0, MacroFlag.BIAS, MacroFlag.BIAS, MacroFlag.GELU, MacroFlag.BIAS | MacroFlag.GELU, 0x80])
    addr0 = rng.choice([0, 4, total - 32, total, rng.randrange(0, total // 32) * 32])
    KG = mx // q        # addr1[7:0]: groups per chunk (0: KG)
    addr1 = rng.choice([0] * 8 + [1, 2, KG, KG + 1, 255, 1 << 8, 1 << 16, rng.randrange(1, KG + 1)])
    return Macro(op=int(MacroOp.GEMV), flags=int(flags), n=K, m=N, row=row, addr0=addr0, addr1=addr1)


@pytest.mark.parametrize("config", W4_PRESETS + [WIDE_GB])
def test_w4_decoder_matches_the_functional_model(config):
    """Error code (the model's check order) and the layout (chunks, code / scale columns of the first and the last
    chunk, period, units per row, first free columns) of random 4-bit GEMV macros near the edges of every check."""
    cfg = _cfg(config)
    p = cfg.pim
    dut = W4Decoder(cfg)
    rng = random.Random(19)
    cases = []
    for _ in range(400):
        mc = _random_gemv(rng, cfg)
        input_n = rng.choice([0, p.quant_group, _max_chunk(p), MACRO_LIMITS["input_values"]])
        dev = FunctionalDevice(cfg)
        dev.input = np.zeros(input_n, dtype=np.uint16)
        code, layout = dev.w4_check(mc)
        cases.append((mc, input_n, code, layout))
    codes = {code for _, _, code, _ in cases}
    assert codes >= {MacroError.NONE, MacroError.BAD_FLAGS, MacroError.BAD_LENGTH, MacroError.NO_INPUT,
                     MacroError.BAD_PACKING, MacroError.BAD_REGION, MacroError.BAD_ADDRESS,
                     MacroError.RESERVED_NONZERO} | ({MacroError.UNSUPPORTED} if config == WIDE_GB else set()), codes

    async def bench(ctx):
        for mc, input_n, code, layout in cases:
            for name in ("op", "flags", "n", "m", "row", "addr0", "addr1"):
                ctx.set(getattr(dut.macro, name), getattr(mc, name))
            ctx.set(dut.input_n, input_n)
            ctx.set(dut.tiles, -(-mc.m // (p.banks * p.channels)))
            assert ctx.get(dut.code) == code, (mc, input_n, ctx.get(dut.code))
            if layout is not None:
                last = layout.chunks - 1
                assert ctx.get(dut.chunks) == layout.chunks, mc
                assert ctx.get(dut.cg) * p.quant_group == layout.chunk, mc
                assert (ctx.get(dut.ncols), ctx.get(dut.sc)) == (layout.chunk_cols(0), layout.scale_cols(0)), mc
                assert (ctx.get(dut.nlast), ctx.get(dut.sclast)) == (layout.chunk_cols(last),
                                                                     layout.scale_cols(last)), mc
                assert 1 << ctx.get(dut.plog) == layout.period, mc
                assert ctx.get(dut.per_row) == layout.per_row, mc
                for c, port in ((0, dut.first_free), (last, dut.ff_last)):
                    _, sc, sl = layout.unit_columns_at(0, c)
                    assert ctx.get(port) == (sc + sl)[0], mc

    sim = Simulator(dut)
    sim.add_testbench(bench)
    sim.run()


def _walk(n, period, nsc, per_row, columns):
    """The PCU's scale / selector column walker (hw/pcu_w4.py) over one row of a chunk whose units have ``n`` code
    columns and ``nsc`` scale and selector columns: per unit its columns in order."""
    def is_code(c):
        return c % period < n and c // period < per_row

    fc = n if n < period else per_row * period
    out = []
    for _ in range(per_row):
        unit = []
        for _ in range(nsc):
            unit.append(fc)
            fc = fc + 1 + n if is_code(fc + 1) else fc + 1
        out.append(unit)
    assert all(c < columns for unit in out for c in unit)
    return out


def _gb_writes(n, period, p):
    """The PCU's global-buffer writes of a chunk (hw/pcu_w4.py ``W4-Gb``): ``(gb column, the chunk's input word)``
    in order."""
    ar = p.act_ratio
    out, gcol = [], 0
    while True:
        out.append((gcol, gcol % (period * ar)))
        slot = (gcol + 1) // ar
        gcol = gcol + 1 if slot % period < n else (slot // period + 1) * period * ar
        if gcol >= p.gb_columns:
            return out


@pytest.mark.parametrize("config", W4_PRESETS)
def test_w4_walker_and_gb_writes_match_the_layout(config):
    """K of one chunk and of several (the last one shorter), tile counts around the units per row: the walker's
    scale / selector columns are ``W4GemvLayout.unit_columns_at``'s in every chunk, the units per row and the code
    columns' period are the layout's, the global-buffer writes are the program's (``w4_gemv_program``) with the
    input words of ``act_words``."""
    cfg = preset(config)
    p = cfg.pim
    table = w4_units(cfg)
    mx = _max_chunk(p)
    assert len(table) - 1 == mx // p.quant_group
    assert all(u is not None for u in table[1:]), "a preset's chunk does not fit a row"
    q = p.quant_group
    cases = [(K, mx) for K in sorted({q * k for k in range(1, mx // q + 1)} | {mx + q, 3 * mx - q})]
    cases += [(K, cs) for cs in range(q, mx, q) for K in (cs + q, 3 * cs)]      # chunks of addr1[7:0] groups
    for K, cs in cases:
        u = table[min(K, cs) // q]
        for tiles in sorted({1, 2, u["per_row"], u["per_row"] + 1, 3 * u["per_row"] + 1}):
            lay = W4GemvLayout(cfg, K, tiles * p.banks * p.channels, chunk_size=cs)
            per_row = min(u["per_row"], tiles)
            assert (lay.per_row, lay.period, lay.chunk_cols(0)) == (per_row, 1 << u["plog"], u["n"]), (K, tiles)
            for c in range(lay.chunks):
                uc = table[lay.chunk_groups(c)]
                walk = _walk(uc["n"], lay.period, uc["sc"] + uc["sl"], per_row, p.columns)
                for j in range(per_row):
                    _, sc, sl = lay.unit_columns_at(j, c)
                    assert walk[j] == sc + sl, (K, tiles, c, j)
        x = np.arange(K, dtype=np.uint16) if p.act_format == "bf16" else (np.arange(K) % 120).astype(np.uint8)
        words = act_words(lay, x)
        raw = (x.astype("<u2") if p.act_format == "bf16" else x).tobytes()
        chunk_words = cs // 64 * p.act_ratio
        for c in range(lay.chunks):
            writes = _gb_writes(lay.chunk_cols(c), lay.period, p)
            assert [g for g, _ in writes] == _wrgbs(lay, c), (K, c)
            for g, w in writes:
                w += c * chunk_words
                assert words[(c, g)] == int.from_bytes(raw[w * p.column_bytes:(w + 1) * p.column_bytes], "little"), \
                    (K, c, g)


def test_perfmodel_takes_the_macro_chunk():
    """The performance model's 4-bit GEMV (sim/perfmodel/pcu.py) cuts K as the macro's ``addr1[7:0]`` says; 0 keeps
    the chunk ``W4GemvLayout`` chooses (the compiler's timing-only programs), which explicit firmware passes."""
    from firmware.compiler import ProgramBuilder
    from hw.spec.soc_isa import Unit
    from sim.perfmodel import PerfModel, decode_program

    cfg = preset("default-w4")
    K, N = 3072, 768

    def cycles(addr1):
        pb = ProgramBuilder(cfg)
        pb.pim(op=MacroOp.GEMV, n=K, m=N, row=0, addr0=0, addr1=addr1)
        pb.fence(Unit.PCU)
        pb.end()
        return PerfModel(cfg).run_program(None, ins=decode_program(pb.words)).cycles

    chosen = W4GemvLayout(cfg, K, N).chunk // cfg.pim.quant_group
    assert cycles(chosen) == cycles(0)
    assert cycles(1) > cycles(chosen)          # chunks of one group: more rows, more WRGBs and preloads
