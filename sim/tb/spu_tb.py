"""cocotb testbenches for the SRAM-PIM queue on the SoC (``hw.soc.SocTop`` with ``cfg.spu``, ``tiny-hpim``).

Hand-assembled programs: VLOAD q, SLOAD K and V from device memory into the unit, SPIM QK, VECTOR
SOFTMAX, SPIM PV, VSTORE; every byte the programs store is compared with the functional model
(:class:`sim.soc_model.SocModel`, whose SPIM runs the independent golden model
:mod:`sim.golden.sram_pim`), with the DRAM protocol checker on every channel. Errors (bad commands,
lines past the end, bad scratchpad ranges, misaligned or out-of-memory SLOADs): ``ERROR`` and
``ERROR_PC`` equal the functional model's, then CLEAR and the attention program runs again, bit-exact.
FENCE on the SPU. The cycles of a lone SPIM: the unit's ``command_cycles`` + :data:`hw.npu.spu.SPIM_OVERHEAD`.
"""

from __future__ import annotations

import numpy as np

from firmware.soc_regs import CSR, Ctrl, read_counters
from hw.npu.spu import SPIM_OVERHEAD
from hw.npu.sram_pim import SramPimOp
from hw.spec import fp as G
from hw.spec import soc_isa as isa
from hw.spec import vector_isa as vu
from hw.spec.soc_isa import CpError, SocOp, SpuError, Unit
from sim.soc_model import SocModel
from sim.tb.common import env_int, tb_test
from sim.tb.soc_tb import bring_up

COL = 32


def spim(mode, base, count, heads, stride, spm_in, in_pitch, spm_out, out_pitch):
    return isa.encode(SocOp.SPIM, mode=mode, base=base, count=count, heads=heads, stride=stride, spm_in=spm_in,
                      in_pitch=in_pitch, spm_out=spm_out, out_pitch=out_pitch)


def sload(mem_addr, pos_stride, positions, region_stride, regions, cols, line, line_stride):
    return isa.encode(SocOp.SLOAD, mem_addr=mem_addr, pos_stride=pos_stride, positions=positions,
                      region_stride=region_stride, regions=regions, cols=cols, line=line, line_stride=line_stride)


def vdma(op, mem_addr, mem_stride, rows, cols, spm_addr, spm_pitch):
    return isa.encode(op, mem_addr=mem_addr, mem_stride=mem_stride, rows=rows, cols=cols, spm_addr=spm_addr,
                      spm_pitch=spm_pitch)


END = isa.encode(SocOp.END)


def fence(units):
    return isa.encode(SocOp.FENCE, units=units)


class Attention:
    """One generation step's attention of ``heads`` heads over ``n`` cached positions (tiny-hpim: head
    dimension 16 = the unit's word), with its data and programs."""

    QB, KB, VB = 0x1000, 0x2000, 0x3000            # q, K cache, V cache (device memory)
    OUT_S, OUT_P, OUT_O, ZERO = 0x4000, 0x4400, 0x4800, 0x5000
    PROG = 0x8000
    Q0, S0, P0, O0 = 0, 8, 16, 24                   # scratchpad columns
    CAP = 16                                        # positions per head region of the caches

    def __init__(self, cfg, seed, n=13, heads=2):
        s = cfg.spu
        self.cfg, self.n, self.H = cfg, n, heads
        self.M, self.W = s.macros, s.word_lanes
        assert self.W == 16 and cfg.npu.vector_lanes == 4, "the layout below is tiny-hpim's"
        rng = np.random.default_rng(seed)
        d = self.W
        q = G.bf16_bits(rng.standard_normal((heads, d)) / np.sqrt(d))
        k = G.bf16_bits(rng.standard_normal((heads, self.CAP, d)))
        v = G.bf16_bits(rng.standard_normal((heads, self.CAP, d)))
        self.writes = [(self.QB, q.astype("<u2").tobytes()), (self.KB, k.astype("<u2").tobytes()),
                       (self.VB, v.astype("<u2").tobytes()), (self.ZERO, bytes(8 * COL))]
        for addr in (self.OUT_S, self.OUT_P, self.OUT_O):
            self.writes.append((addr, bytes(8 * COL)))
        self.rows_per_head = -(-n // self.M)          # unit rows of one head's keys
        self.s_pitch = -(-n // 8)                      # scratchpad columns of one head's FP32 scores
        self.p_pitch = -(-n // 16)                     # ... of its BF16 probabilities
        self.k_row, self.v_row = 0, heads * self.rows_per_head
        self.q, self.k, self.v = q, k, v

    def sload(self, kind):
        addr, row = (self.KB, self.k_row) if kind == "K" else (self.VB, self.v_row)
        return sload(addr, COL, self.n, self.CAP * COL, self.H, 1, row * self.M, self.rows_per_head * self.M)

    def qk(self):
        return spim(0, self.k_row, self.n, self.H, self.rows_per_head, self.Q0, 1, self.S0, self.s_pitch)

    def pv(self):
        return spim(1, self.v_row, self.n, self.H, self.rows_per_head, self.P0, self.p_pitch, self.O0, 2)

    def program(self):
        H, n = self.H, self.n
        # One SOFTMAX per head: a vector-unit row starts on a 16-byte word of tiny's 4 lanes, SPIM addresses are
        # 32-byte columns, so a multi-row SOFTMAX fits SPIM's pitches only for some n.
        softmax = [isa.encode(SocOp.VECTOR, word=vu.encode(op="SOFTMAX", a=2 * (self.S0 + h * self.s_pitch),
                                                           d=2 * (self.P0 + h * self.p_pitch), n=n, rows=1,
                                                           a_fmt="FP32", d_fmt="BF16", mask="NONE"))
                   for h in range(H)]
        return [
            vdma(SocOp.VLOAD, self.QB, COL, H, 1, self.Q0, 1),
            # vector-DMA traffic while the SLOADs run: the two queues share a fabric port (hw/soc.py)
            vdma(SocOp.VLOAD, self.ZERO, 0, 64, 2, 64, 2),
            self.sload("K"), self.sload("V"),
            fence(Unit.VQ),                                     # q in the scratchpad
            self.qk(),
            fence(Unit.SPU),                                    # scores in the scratchpad
            *softmax,
            fence(Unit.VQ),                                     # probabilities in the scratchpad
            self.pv(),
            fence(Unit.SPU),
            vdma(SocOp.VSTORE, self.OUT_S, 2 * COL, H, self.s_pitch, self.S0, self.s_pitch),
            vdma(SocOp.VSTORE, self.OUT_P, COL, H, self.p_pitch, self.P0, self.p_pitch),
            vdma(SocOp.VSTORE, self.OUT_O, 2 * COL, H, 2, self.O0, 2),
            END,
        ]

    def outputs(self):
        """(name, address, bytes) of what the program stores."""
        H = self.H
        return (("scores", self.OUT_S, H * 2 * COL), ("probabilities", self.OUT_P, H * COL),
                ("outputs", self.OUT_O, H * 2 * COL))

    def reference(self):
        """float64 attention of the BF16 data (a sanity bound; the bit-exact check is against the model)."""
        q = G.bf16_to_f32(self.q).astype(np.float64)
        out = []
        for h in range(self.H):
            k = G.bf16_to_f32(self.k[h, :self.n]).astype(np.float64)
            v = G.bf16_to_f32(self.v[h, :self.n]).astype(np.float64)
            s = k @ q[h]
            p = np.exp(s - s.max())
            out.append((p / p.sum()) @ v)
        return np.array(out)


class Pair:
    """The RTL (through the host) and the functional model, driven with the same writes and programs."""

    def __init__(self, host, cfg):
        self.host = host
        self.model = SocModel(cfg)

    async def write(self, addr, data):
        await self.host.write(addr, data)
        self.model.write(addr, bytes(data))

    async def load(self, att):
        """The operands of :class:`Attention` ``att`` into both."""
        for addr, data in att.writes:
            await self.write(addr, data)

    async def run(self, addr, program, what):
        self.model.write(addr, isa.to_bytes(program))
        want = self.model.run(addr, len(program))
        err, pc = await self.host.run(addr, program)
        assert err == want.error and (err == 0 or pc == want.error_pc), \
            f"{what}: RTL ERROR {err:#x} ERROR_PC {pc}, functional model {want.error:#x} at {want.error_pc}"
        return err, pc

    async def compare(self, regions, what):
        for name, addr, n in regions:
            got, want = await self.host.read(addr, n), self.model.read(addr, n)
            if got != want:
                gb, wb = np.frombuffer(got, "<u2"), np.frombuffer(want, "<u2")
                bad = np.flatnonzero(gb != wb)
                raise AssertionError(f"{what}: {name} differs from the functional model at 16-bit words {bad[:8]}: "
                                     f"{gb[bad[:4]]} vs {wb[bad[:4]]}")


async def start_attention(dut, seed, what=None):
    """The device up, a :class:`Pair`, :class:`Attention` of ``seed`` written into it and (``what``) run once,
    bit-exact: ``(mon, host, cfg, pair, att)``."""
    mon, host = await bring_up(dut)
    cfg = host.cfg
    pair = Pair(host, cfg)
    att = Attention(cfg, seed)
    await pair.load(att)
    if what:
        await run_attention(pair, att, what)
    return mon, host, cfg, pair, att


async def run_attention(pair, att, what):
    err, pc = await pair.run(att.PROG, att.program(), what)
    assert err == 0, f"{what}: error {err:#x} at {pc}"
    await pair.compare(att.outputs(), what)
    out = np.frombuffer(pair.model.read(att.OUT_O, att.H * 2 * COL), "<f4").reshape(att.H, -1)
    ref = att.reference()
    assert np.allclose(out, ref, rtol=0.03, atol=0.03), f"{what}: outputs {out} far from float64 {ref}"


@tb_test()
async def attention(dut):
    """SLOAD K/V, SPIM QK, softmax, SPIM PV on two heads of 13 keys (partial last group), bit-exact with the
    functional model; again with other data and 5 keys; the protocol checker clean."""
    mon, host = await bring_up(dut)
    cfg = host.cfg
    pair = Pair(host, cfg)
    for seed, n in ((env_int("SEED", 1), 13), (7, 5), (8, 16)):
        att = Attention(cfg, seed, n=n)
        await pair.load(att)
        await run_attention(pair, att, f"attention n={n} seed={seed}")
        dut._log.info("attention over %d keys: bit-exact", n)
    counters = await read_counters(host.tr, cfg.pim.channels, spu=True)
    assert counters["spu.instructions"] > 0 and counters["spu.load"] > 0 and counters["spu.compute"] > 0, counters
    mon.assert_clean()


@tb_test()
async def fence_and_timing(dut):
    """FENCE SPU holds a VSTORE until the SPIM's results are written (zeroed scores before); a lone SPIM keeps
    the queue busy command_cycles + SPIM_OVERHEAD cycles (QK and PV, several shapes)."""
    mon, host, cfg, pair, att = await start_attention(dut, 3, "setup")
    # Zero the scores in the scratchpad and in memory, recompute them, FENCE, store: the stored scores are the
    # recomputed ones only if the VSTORE waited for the SPIM.
    sp = att.s_pitch
    prog = [vdma(SocOp.VLOAD, att.ZERO, 2 * COL, att.H, sp, att.S0, sp),
            vdma(SocOp.VSTORE, att.OUT_S, 2 * COL, att.H, sp, att.S0, sp), fence(Unit.VQ),
            att.qk(), fence(Unit.SPU), vdma(SocOp.VSTORE, att.OUT_S, 2 * COL, att.H, sp, att.S0, sp), END]
    err, pc = await pair.run(att.PROG, prog, "fence")
    assert err == 0, f"fence program: {err:#x} at {pc}"
    await pair.compare(att.outputs()[:1], "FENCE SPU")
    assert any(await host.read(att.OUT_S, 2 * COL)), "scores all zero"

    from hw.npu.sram_pim import SramPimUnit
    s = cfg.spu
    unit = SramPimUnit(s.macros, s.rows, s.word_lanes, s.mac_lanes, s.read_latency)
    results = []
    for mode, count, heads in ((0, 13, 2), (0, 4, 1), (0, 1, 1), (1, 13, 2), (1, 5, 1), (1, 16, 2), (1, 1, 1)):
        row = att.k_row if mode == 0 else att.v_row
        word = spim(mode, row, count, heads, att.rows_per_head, att.Q0 if mode == 0 else att.P0, 1,
                    att.S0 if mode == 0 else att.O0, 2)
        await host.tr.write_csr(CSR.CTRL, Ctrl.RESET_COUNTERS)
        err, pc = await pair.run(att.PROG, [word, END], f"timing {mode} {count} {heads}")
        assert err == 0
        c = await read_counters(host.tr, cfg.pim.channels, spu=True)
        want = unit.command_cycles(SramPimOp(mode), count, heads) + SPIM_OVERHEAD
        results.append((mode, count, heads, c["spu.busy"], want))
        dut._log.info("SPIM %s count=%d heads=%d: queue busy %d cycles, command_cycles + %d = %d",
                      "PV" if mode else "QK", count, heads, c["spu.busy"], SPIM_OVERHEAD, want)
    await pair.compare(att.outputs(), "after the timing runs")
    bad = [r for r in results if r[3] != r[4]]
    assert not bad, f"SPIM busy cycles (mode, count, heads, measured, expected): {bad}"
    mon.assert_clean()


@tb_test()
async def errors(dut):
    """Refused SPIM / SLOAD: ERROR = CpError.SPU | SpuError << 8 and ERROR_PC the failing instruction, as the
    functional model says; CLEAR; the attention program runs again, bit-exact."""
    mon, host, cfg, pair, att = await start_attention(dut, 5, "before the errors")
    s = cfg.spu
    total = cfg.pim.total_bytes
    spm_cols = cfg.npu.vector_spm_words * cfg.npu.vector_lanes * 4 // COL
    ok_load = att.sload("K")
    cases = [
        ("keys beyond the last row", [ok_load, att.qk(), spim(0, s.rows - 2, 13, 1, 0, 0, 1, 8, 2), att.qk(),
                                      fence(Unit.SPU), END], SpuError.BAD_COMMAND, 2),
        ("count 0", [spim(1, 0, 0, 1, 0, 0, 1, 8, 2), END], SpuError.BAD_COMMAND, 0),
        ("stride >= rows", [att.qk(), spim(0, 0, 4, 2, s.rows, 0, 1, 8, 2), END], SpuError.BAD_COMMAND, 1),
        ("line past the end", [ok_load, sload(att.KB, COL, 13, 0, 1, 1, s.macros * s.rows - 12, 0), END],
         SpuError.SLOAD_LINE, 1),
        ("results past the scratchpad", [att.qk(), spim(0, 0, 13, 2, 4, 0, 1, spm_cols - 3, 2), END],
         SpuError.SPM, 1),
        ("operands past the scratchpad", [spim(1, 0, 20, 1, 0, spm_cols - 1, 1, 8, 2), END], SpuError.SPM, 0),
        ("misaligned SLOAD", [sload(att.KB + 16, COL, 4, 0, 1, 1, 0, 0), END], SpuError.SLOAD_ALIGN, 0),
        ("SLOAD cols wider than a line", [sload(att.KB, COL, 4, 0, 1, 2 * s.word_lanes // COL + 1, 0, 0), END],
         SpuError.SLOAD_SIZE, 0),
        ("SLOAD beyond memory", [ok_load, sload(total - COL, COL, 2, 0, 1, 1, 0, 0), END], SpuError.SLOAD_MEM, 1),
    ]
    for what, prog, code, want_pc in cases:
        err, pc = await pair.run(att.PROG + 1024, prog, what)
        assert (err, pc) == (CpError.SPU | (code << 8), want_pc), \
            f"{what}: ERROR {err:#x} ERROR_PC {pc}, expected {CpError.SPU | (code << 8):#x} {want_pc}"
        dut._log.info("%s: ERROR %#06x ERROR_PC %d", what, err, pc)
        await host.clear()
        await run_attention(pair, att, f"after {what}")
    # SPIM / SLOAD words with stray bits beyond their fields are ILLEGAL, as the functional model says.
    stray = att.qk() | (1 << (isa.PAYLOAD_LO + isa.SPIM_BITS))
    err, pc = await pair.run(att.PROG + 1024, [ok_load, stray, END], "stray bits")
    assert (err, pc) == (CpError.ILLEGAL, 1), f"stray bits: {err:#x} at {pc}"
    await host.clear()
    await run_attention(pair, att, "after the stray bits")
    mon.assert_clean()


@tb_test()
async def contention(dut):
    """SPIMs while the vector unit writes the scratchpad every cycle (a long SCALE, no FENCE between them): the
    result writer waits for the shared write port (spu.spm_stall counts it), every result bit-exact."""
    mon, host, cfg, pair, att = await start_attention(dut, 11, "setup")
    rng = np.random.default_rng(12)
    rows, X, XB, XOUT = 64, 200, 0x6000, 0x7000      # 64 rows of 16 FP32 at scratchpad column 200
    await pair.write(XB, rng.standard_normal(rows * 16).astype("<f4").tobytes())
    scale = isa.encode(SocOp.VECTOR, word=vu.encode(op="SCALE", a=2 * X, d=2 * X, n=16, rows=rows, a_fmt="FP32",
                                                    d_fmt="FP32", imm0=int(G.f32_bits(np.float32(0.5))),
                                                    imm1=0x80000000))
    sp = att.s_pitch
    prog = [vdma(SocOp.VLOAD, XB, 2 * COL, rows, 2, X, 2), fence(Unit.VQ), scale, att.qk(), att.pv(),
            fence(Unit.VQ | Unit.SPU),
            vdma(SocOp.VSTORE, XOUT, 2 * COL, rows, 2, X, 2),
            vdma(SocOp.VSTORE, att.OUT_S, 2 * COL, att.H, sp, att.S0, sp),
            vdma(SocOp.VSTORE, att.OUT_O, 2 * COL, att.H, 2, att.O0, 2), END]
    await pair.write(att.OUT_S, bytes(8 * COL))
    await pair.write(att.OUT_O, bytes(8 * COL))
    await host.tr.write_csr(CSR.CTRL, Ctrl.RESET_COUNTERS)
    err, pc = await pair.run(att.PROG, prog, "contention")
    assert err == 0, f"contention program: {err:#x} at {pc}"
    c = await read_counters(host.tr, cfg.pim.channels, spu=True)
    await pair.compare((("scaled rows", XOUT, rows * 2 * COL),) + att.outputs()[::2], "contention")
    dut._log.info("SPIMs beside a 64-row SCALE: the result writer waited %d cycles for the write port",
                  c["spu.spm_stall"])
    assert c["spu.spm_stall"] > 0, f"no write-port contention happened: {c}"
    mon.assert_clean()


@tb_test()
async def beside_pim(dut):
    """SLOADs issued while a PIM GEMV holds the channels (no FENCE between): their reads wait for the end of PIM
    mode like every normal request (the channels count pim_wait; the SLOAD engine is busy longer than without
    the GEMV), the attention and the GEMV bit-exact, the protocol checker clean."""
    from firmware.pim import GemvLayout
    from hw.memif import AddressMap
    from hw.spec.macro import Macro, MacroFlag, MacroOp
    from hw.spec.macro import encode as macro_encode

    def pim(mc):
        return isa.encode(SocOp.PIM, word=sum(w << (32 * i) for i, w in enumerate(macro_encode(mc))))

    mon, host, cfg, pair, att = await start_attention(dut, 21)
    p = cfg.pim
    rng = np.random.default_rng(22)
    K, N = 2 * p.gb_values, p.banks * p.channels
    lay = GemvLayout(cfg, K, N, base_row=10)                       # weights at 40 KiB, clear of the attention's data
    amap = AddressMap(p)
    w = G.bf16_bits(rng.standard_normal((K, N)) / np.sqrt(K))
    await pair.write(amap.encode(10, 0, 0, 0), amap.pack_rows(lay.pack(w).transpose(2, 0, 1, 3, 4)).tobytes())
    X0, BIAS, Y = 0x5800, 0x5C00, 0x5D00
    await pair.write(X0, G.bf16_bits(rng.standard_normal(K)).astype("<u2").tobytes())
    await pair.write(BIAS, (rng.standard_normal(N) * 0.1).astype("<f4").tobytes())
    await pair.write(Y, bytes(N * 4))
    macros = [Macro(MacroOp.WRITE_VEC, n=K, addr0=X0),
              Macro(MacroOp.GEMV, flags=MacroFlag.BIAS, n=K, m=N, row=10, addr0=BIAS),
              Macro(MacroOp.READ_RES, n=N, addr0=Y)]
    await host.tr.write_csr(CSR.CTRL, Ctrl.RESET_COUNTERS)
    await run_attention(pair, att, "without PIM")
    alone = (await read_counters(host.tr, p.channels, spu=True))["spu.load"]
    body = att.program()
    prog = [pim(mc) for mc in macros] + body[:-1] + [fence(Unit.PCU), END]
    await host.tr.write_csr(CSR.CTRL, Ctrl.RESET_COUNTERS)
    err, pc = await pair.run(att.PROG, prog, "beside PIM")
    assert err == 0, f"program beside PIM: {err:#x} at {pc}"
    c = await read_counters(host.tr, p.channels, spu=True)
    await pair.compare(att.outputs() + (("PIM GEMV", Y, N * 4),), "beside PIM")
    waits = [c[f"ch{k}.pim_wait"] for k in range(p.channels)]
    dut._log.info("SLOAD beside a PIM GEMV: normal requests waited for PIM mode %s cycles per channel; SLOAD engine "
                  "busy %d cycles (%d without the GEMV)", waits, c["spu.load"], alone)
    assert sum(waits) > 0, f"no request waited for PIM mode: {c}"
    assert c["spu.load"] > alone, f"the SLOADs did not wait for the GEMV: busy {c['spu.load']} vs {alone} alone"
    mon.assert_clean()
