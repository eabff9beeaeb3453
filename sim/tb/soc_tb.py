"""cocotb testbenches for the SoC top (``hw.soc.SocTop``): programs run from device memory, results
checked bit for bit against the golden models, with the DRAM protocol checker on every channel.

The host side is what a driver would do over PCIe: the AXI4 window (cocotbext-axi) writes the
program and its data into device memory, the AXI4-Lite registers (:mod:`firmware.soc_regs`) start
it, the testbench waits for the ``busy`` / ``done`` edges (no register polling), then reads the
results back through the window and the counters through the registers.

Golden models: :func:`sim.golden.gemm.gemm` (matrix unit), :class:`sim.golden.vector.VectorModel`
with a byte-copy VDMA (vector queue), :class:`sim.pim_model.FunctionalDevice` (PCU + PIM banks).
"""

from __future__ import annotations

import cocotb
import numpy as np
from cocotb.triggers import FallingEdge, with_timeout

from firmware.pim import GemvLayout, af_lut_row
from firmware.soc_regs import CSR, SOC_ID, Ctrl, Status, read_counters, register_table, summary
from hw.config import preset
from hw.memif import AddressMap
from hw.spec import fp as G
from hw.spec import soc_isa as isa
from hw.spec.macro import Macro, MacroError, MacroFlag, MacroOp
from hw.spec.macro import encode as macro_encode
from hw.spec.matrix_isa import ErrorCode, Opcode, Target
from hw.spec.matrix_isa import encode as mu_encode
from hw.spec.soc_isa import CpError, SocOp, Unit, VqError
from sim.golden.gemm import gemm, to_bf16
from sim.golden.vector import VectorModel
from sim.pim_checker import BusMonitor
from sim.pim_model import FunctionalDevice
from sim.tb.common import env_int, env_str, start, tb_test, write_metrics
from sim.tb.matrix_kernels import GemmSpec, Matrix, gemm_program
from sim.transports import AxiResponseError, AxiTransport

COL = 32


def _cfg():
    return preset(env_str("IANUS_CONFIG", "tiny"))


def vector_fields(word: int) -> dict:
    from amaranth.lib import data

    from hw.spec.vector_isa import VectorInstr

    return {name: (word >> f.offset) & ((1 << f.width) - 1) for name, f in data.Layout.cast(VectorInstr)}


def vector_word(**fields) -> int:
    from hw.spec.vector_isa import encode

    return encode(**fields)


def pim(macro: Macro) -> int:
    return isa.encode(SocOp.PIM, word=sum(w << (32 * i) for i, w in enumerate(macro_encode(macro))))


def vdma(op, **fields) -> int:
    return isa.encode(op, **fields)


class Golden:
    """Device memory and scratchpads of the golden models, driven instruction by instruction."""

    def __init__(self, cfg):
        self.cfg = cfg
        self.dev = FunctionalDevice(cfg)
        n = cfg.npu
        self.vm = VectorModel(n.vector_lanes, n.vector_spm_words, acc_stages=n.vec_acc_stages)
        self.spm = self.vm.mem.view(np.uint8).reshape(-1)

    def write(self, addr, data):
        self.dev.mem.write(addr, bytes(data))

    def read(self, addr, n):
        return self.dev.mem.read(addr, n)

    def vload(self, f):
        for r in range(f["rows"]):
            s = COL * (f["spm_addr"] + r * f["spm_pitch"])
            a = f["mem_addr"] + r * f["mem_stride"]
            self.spm[s:s + COL * f["cols"]] = np.frombuffer(self.read(a, COL * f["cols"]), np.uint8)

    def vstore(self, f):
        for r in range(f["rows"]):
            s = COL * (f["spm_addr"] + r * f["spm_pitch"])
            self.write(f["mem_addr"] + r * f["mem_stride"], self.spm[s:s + COL * f["cols"]].tobytes())

    def vector(self, word):
        err = self.vm.run(vector_fields(word))
        assert err == 0, f"golden vector model error {err}"

    def macro(self, mc: Macro):
        err = self.dev.execute(mc)
        assert err == MacroError.NONE, f"golden PIM model error {err!r}"


class Host:
    """The host side: window, registers, program start and completion by edges."""

    def __init__(self, dut, tr, cfg, ports):
        self.dut = dut
        self.tr = tr
        self.cfg = cfg
        self.busy, self.done, self.error, self.clk = (ports[n] for n in ("busy", "done", "error", "clk"))

    async def write(self, addr, data):
        await self.tr.write_mem(addr, bytes(data))

    async def read(self, addr, n):
        return await self.tr.read_mem(addr, n)

    async def run(self, addr, program, timeout_cycles=400_000, length=None):
        """Write ``program`` at ``addr``, start it, wait until the command processor stops.
        Returns (error, error_pc)."""
        if program:
            await self.write(addr, isa.to_bytes(program))
        await self.tr.write_csr(CSR.PROG_ADDR, addr)
        await self.tr.write_csr(CSR.PROG_LEN, len(program) if length is None else length)
        await self.tr.write_csr(CSR.CTRL, Ctrl.START)
        return await self.wait(timeout_cycles)

    async def wait(self, timeout_cycles=400_000):
        """Wait until the command processor has taken START and stopped; (ERROR, ERROR_PC)."""
        async def finish():
            for _ in range(256):             # START waits for idle units, then the CP takes it
                if self.busy.value or int(self.error.value):
                    break
                await FallingEdge(self.clk)
            while self.busy.value:
                await FallingEdge(self.busy)
            await FallingEdge(self.clk)

        await with_timeout(finish(), timeout_cycles * 10, "ns")
        error = await self.tr.read_csr(CSR.ERROR)
        error_pc = await self.tr.read_csr(CSR.ERROR_PC)
        status = await self.tr.read_csr(CSR.STATUS)
        assert error == int(self.error.value)
        assert bool(status & Status.DONE) == (error == 0), f"STATUS {status:#x} with ERROR {error:#x}"
        return error, error_pc

    async def clear(self):
        await self.tr.write_csr(CSR.CTRL, Ctrl.CLEAR)
        assert await self.tr.read_csr(CSR.ERROR) == 0

    async def counters(self):
        return await read_counters(self.tr, self.cfg.pim.channels)


async def bring_up(dut):
    cfg = _cfg()
    await start(dut, zero_inputs=["bd_load"])
    await FallingEdge(dut.clk)
    mon = BusMonitor(dut, cfg)
    cocotb.start_soon(mon.run())
    # Keep the status ports' handles from before cocotb-bus inspects the DUT: its discovery re-files
    # handles under their last name component, and Amaranth's struct fields (``counters.busy``) would
    # then shadow the top-level ``busy``.
    ports = {name: getattr(dut, name) for name in ("busy", "done", "error", "clk")}
    tr = AxiTransport(dut, pause_seed=env_int("SEED", 1), pause_prob=env_int("PAUSE_PCT", 0) / 100)
    assert await tr.read_csr(CSR.ID) == SOC_ID
    return mon, Host(dut, tr, cfg, ports)


# ---------------------------------------------------------------------------------------------
class Plan:
    """The main test program and its data (tiny configuration addresses)."""

    def __init__(self, cfg, seed):
        p = cfg.pim
        self.cfg = cfg
        rng = np.random.default_rng(seed)
        amap = AddressMap(p)
        row = p.channels * p.banks * p.row_bytes            # bytes of one row index over all banks
        # PIM weights in rows 0.., the GELU table in the reserved row, data and the program above.
        self.K, self.N = 2 * p.gb_values, p.banks * p.channels
        self.lay = GemvLayout(cfg, self.K, self.N, base_row=0)
        w_pim = G.bf16_bits(rng.standard_normal((self.K, self.N)) / np.sqrt(self.K))
        packed = self.lay.pack(w_pim)
        self.writes = [(amap.encode(0, 0, 0, 0), amap.pack_rows(packed.transpose(2, 0, 1, 3, 4)).tobytes())]
        lut = np.ascontiguousarray(np.broadcast_to(af_lut_row(cfg), (p.channels, p.banks, p.columns, p.lanes)))
        self.writes.append((amap.encode(p.data_rows, 0, 0, 0), amap.pack_rows(lut[None]).tobytes()))
        base = self.lay.rows_used * row
        R = cfg.npu.array_rows
        self.M, self.Kg, self.Ng = 2 * R, 4 * R, self.K // (2 * R)      # GEMM shape; C has K BF16 values
        a = G.bf16_bits(rng.standard_normal((self.M, self.Kg)))
        w = G.bf16_bits(rng.standard_normal((self.Kg, self.Ng)) / 4)
        A = Matrix(base, self.M, self.Kg, _pad(self.Kg * 2), 2)
        W = Matrix(A.addr + A.rows * A.stride, self.Kg, self.Ng, _pad(self.Ng * 2), 2)
        Cm = Matrix(_align(W.addr + W.rows * W.stride, 256), self.M, self.Ng, _pad(self.Ng * 2), 2)
        self.C = Cm
        self.X = Cm.addr + Cm.rows * Cm.stride                         # GELU(C) as the PIM input
        self.x0 = self.X + self.K * 2
        self.bias = self.x0 + self.K * 2
        self.Y0 = _align(self.bias + self.N * 4, 256)
        self.Y1 = self.Y0 + self.N * 4
        self.prog_addr = _align(self.Y1 + self.N * 4, 1024)
        for mat, bits in ((A, a), (W, w)):
            img = np.zeros((mat.rows, mat.stride), np.uint8)
            img[:, :mat.cols * 2] = bits.astype("<u2").view(np.uint8).reshape(mat.rows, -1)
            self.writes.append((mat.addr, img.tobytes()))
        x0 = G.bf16_bits(rng.standard_normal(self.K))
        self.writes.append((self.x0, x0.astype("<u2").tobytes()))
        bias = (rng.standard_normal(self.N) * 0.1).astype(np.float32)
        self.writes.append((self.bias, bias.astype("<f4").tobytes()))

        gemm_words, info = gemm_program(GemmSpec(A, W, Cm, out_bf16=True), R, cfg.npu.act_spm_words,
                                        cfg.npu.wgt_spm_words, cfg.npu.acc_spm_words)
        self.gemm_golden = to_bf16(gemm(a, w, R))
        # Vector: the GEMM result (BF16 rows of Ng) into the scratchpad, GELU, back out as the PIM input.
        cols = Cm.stride // COL
        spm_out = (self.M * Cm.stride) // COL
        lanes = cfg.npu.vector_lanes
        words_per_col = max(1, 8 // lanes)
        self.vload = dict(mem_addr=Cm.addr, mem_stride=Cm.stride, rows=self.M, cols=cols, spm_addr=0, spm_pitch=cols)
        self.vstore = dict(mem_addr=self.X, mem_stride=Cm.stride, rows=self.M, cols=cols, spm_addr=spm_out,
                           spm_pitch=cols)
        self.gelu = vector_word(op="GELU", a=0, d=spm_out * words_per_col, n=self.Ng, rows=self.M,
                                a_fmt="BF16", d_fmt="BF16")
        self.macros0 = [Macro(MacroOp.WRITE_VEC, n=self.K, addr0=self.x0),
                        Macro(MacroOp.GEMV, flags=MacroFlag.BIAS, n=self.K, m=self.N, row=0, addr0=self.bias),
                        Macro(MacroOp.READ_RES, n=self.N, addr0=self.Y0)]
        self.macros1 = [Macro(MacroOp.WRITE_VEC, n=self.K, addr0=self.X),
                        Macro(MacroOp.GEMV, flags=MacroFlag.BIAS | MacroFlag.GELU, n=self.K, m=self.N, row=0,
                              addr0=self.bias),
                        Macro(MacroOp.READ_RES, n=self.N, addr0=self.Y1)]
        prog = [pim(mc) for mc in self.macros0]                        # PIM runs while the MU computes
        prog += [isa.encode(SocOp.MATRIX, word=wd) for wd in gemm_words]
        prog += [isa.encode(SocOp.FENCE, units=Unit.MU)]              # C is in memory
        prog += [vdma(SocOp.VLOAD, **self.vload), isa.encode(SocOp.VECTOR, word=self.gelu),
                 vdma(SocOp.VSTORE, **self.vstore)]
        prog += [isa.encode(SocOp.FENCE, units=Unit.VQ)]              # X is in memory
        prog += [pim(mc) for mc in self.macros1]
        prog += [isa.encode(SocOp.END)]
        self.program = prog
        self.info = info
        assert self.prog_addr + 32 * len(prog) <= p.data_rows * row

    def golden(self):
        g = Golden(self.cfg)
        for addr, data in self.writes:
            g.write(addr, data)
        for mc in self.macros0:
            g.macro(mc)
        C = self.C
        img = np.zeros((C.rows, C.stride), np.uint8)
        img[:, :C.cols * 2] = self.gemm_golden.astype("<u2").view(np.uint8).reshape(C.rows, -1)
        g.write(C.addr, img.tobytes())
        g.vload(self.vload)
        g.vector(self.gelu)
        g.vstore(self.vstore)
        for mc in self.macros1:
            g.macro(mc)
        return g


def _pad(nbytes):
    return -(-nbytes // COL) * COL


def _align(addr, a):
    return -(-addr // a) * a


async def check_results(host, plan, g, what):
    for name, addr, n in (("GEMM C", plan.C.addr, plan.C.rows * plan.C.stride), ("GELU(C)", plan.X, plan.K * 2),
                          ("PIM y0", plan.Y0, plan.N * 4), ("PIM y1 (GELU(C) in, GELU out)", plan.Y1, plan.N * 4)):
        got = await host.read(addr, n)
        want = g.read(addr, n)
        if got != want:
            gb, wb = np.frombuffer(got, "<u2"), np.frombuffer(want, "<u2")
            bad = np.flatnonzero(gb != wb)
            raise AssertionError(f"{what}: {name} differs from the golden model at 16-bit words {bad[:8]}: "
                                 f"{gb[bad[:4]]} vs {wb[bad[:4]]}")


@tb_test()
async def programs(dut):
    """GEMM on the matrix unit, VLOAD/GELU/VSTORE on the vector queue and PIM GEMVs (one overlapping the
    GEMM, one on the vector unit's output, with GELU) from one program; bit-exact against the golden
    models; run twice; counters; the protocol checker clean throughout."""
    mon, host = await bring_up(dut)
    cfg = host.cfg
    plan = Plan(cfg, seed=env_int("SEED", 1))
    for addr, data in plan.writes:
        await host.write(addr, data)
    g = plan.golden()
    await host.tr.write_csr(CSR.CTRL, Ctrl.RESET_COUNTERS)
    t0 = mon.cycle
    err, pc = await host.run(plan.prog_addr, plan.program)
    t1 = mon.cycle
    assert err == 0, f"program stopped with error {err:#x} at instruction {pc}"
    await check_results(host, plan, g, "first run")
    counters = await host.counters()
    assert counters["cp.instructions"] == len(plan.program), counters
    assert counters["pcu.completed"] == 6 and counters["vq.instructions"] == 3, counters
    assert counters["mu.compute"] > 0 and counters["mu.load"] > 0 and counters["mu.store"] > 0, counters
    assert all(counters[f"ch{c}.commands"] > 0 for c in range(cfg.pim.channels)), counters
    rep = summary(counters, cfg.pim.channels)
    dut._log.info("program of %d instructions: %d cycles (CP busy %d); per unit %s", len(plan.program), t1 - t0,
                  counters["cp.cycles"], rep)
    # Again, from a clean memory for the outputs: the same bits (the units' state carries nothing over).
    for addr, n in ((plan.C.addr, plan.C.rows * plan.C.stride), (plan.X, plan.K * 2), (plan.Y0, 2 * plan.N * 4)):
        await host.write(addr, bytes(n))
    err, pc = await host.run(plan.prog_addr, None, length=len(plan.program))
    assert err == 0, f"second run: error {err:#x} at {pc}"
    await check_results(host, plan, g, "second run")
    # Fetch and dispatch rate through the fabric and the controllers: FENCE(0)s, then PIM NOPs.
    rates = {}
    for what, word in (("FENCE(0)", isa.encode(SocOp.FENCE)), ("PIM NOP", pim(Macro(MacroOp.NOP)))):
        n = 128
        await host.tr.write_csr(CSR.CTRL, Ctrl.RESET_COUNTERS)
        err, pc = await host.run(plan.prog_addr + 1024, [word] * n + [isa.encode(SocOp.END)])
        assert err == 0, f"{what} program: error {err:#x} at {pc}"
        c = await host.counters()
        rates[what] = {"instructions": n + 1, "cp_cycles": c["cp.cycles"], "fetch_stall": c["cp.fetch_stall"],
                       "dispatch_stall": c["cp.dispatch_stall"]}
        dut._log.info("%d x %s + END: %d cycles (fetch stall %d, dispatch stall %d)", n, what, c["cp.cycles"],
                      c["cp.fetch_stall"], c["cp.dispatch_stall"])
    assert rates["FENCE(0)"]["cp_cycles"] < 2 * (n + 1) + 60, rates
    mon.assert_clean()
    write_metrics(name="soc_programs", config=cfg.name, cycles=t1 - t0, instructions=len(plan.program),
                  counters=counters, dispatch=rates)


@tb_test()
async def errors(dut):
    """Illegal instruction, misaligned MATRIX address, bad PIM opcode, bad VDMA, out-of-range program:
    error code and ERROR_PC; CLEAR; a good program runs each time. Window and register SLVERRs."""
    mon, host = await bring_up(dut)
    cfg = host.cfg
    p = cfg.pim
    tr = host.tr
    plan = Plan(cfg, seed=3)
    for addr, data in plan.writes:
        await host.write(addr, data)
    g = plan.golden()
    at = plan.prog_addr
    nop = pim(Macro(MacroOp.NOP))
    vec_ok = isa.encode(SocOp.VECTOR, word=plan.gelu)
    load_ok = vdma(SocOp.VLOAD, **plan.vload)

    async def good():
        await host.clear()
        err, pc = await host.run(at + 1024, plan.program)
        assert err == 0, f"good program after CLEAR: error {err:#x} at {pc}"
        await check_results(host, plan, g, "after CLEAR")

    cases = [
        ("illegal op", [isa.encode(SocOp.FENCE), nop, 9, isa.encode(SocOp.END)], CpError.ILLEGAL, 2),
        ("reserved header bit", [nop, isa.encode(SocOp.END) | (1 << 20)], CpError.ILLEGAL, 1),
        ("no END", [nop, isa.encode(SocOp.FENCE, units=7)], CpError.ILLEGAL, 2),
        ("misaligned MATRIX", [nop, isa.encode(SocOp.MATRIX, word=mu_encode(
            Opcode.LOAD, target=Target.ACT, mem_addr=plan.C.addr + 16, mem_stride=64, rows=2, cols=4, spm_addr=0,
            spm_stride=2)), isa.encode(SocOp.FENCE, units=Unit.MU), isa.encode(SocOp.END)],
         CpError.MU | (ErrorCode.MISALIGNED.value << 8), 1),
        # A rejected instruction gives none of its tokens: the NOP waiting on it stays queued until CLEAR
        # drops it (then good() must run: START waits for the matrix unit to be idle).
        ("rejected MATRIX with a waiter", [nop, isa.encode(SocOp.MATRIX, word=mu_encode(
            Opcode.LOAD, signal=1, target=Target.ACT, mem_addr=plan.C.addr + 16, mem_stride=64, rows=2, cols=4,
            spm_addr=0, spm_stride=2)), isa.encode(SocOp.MATRIX, word=mu_encode(Opcode.NOP, wait=1)),
            isa.encode(SocOp.FENCE, units=Unit.MU), isa.encode(SocOp.END)],
         CpError.MU | (ErrorCode.MISALIGNED.value << 8), 1),
        ("bad PIM opcode", [nop, nop, pim(Macro(13)), nop, isa.encode(SocOp.FENCE, units=Unit.PCU),
                            isa.encode(SocOp.END)], CpError.PCU | (MacroError.BAD_OPCODE << 8), 2),
        ("misaligned VLOAD", [vec_ok, load_ok, vdma(SocOp.VLOAD, **{**plan.vload, "mem_addr": plan.C.addr + 8}),
                              vec_ok, isa.encode(SocOp.FENCE, units=Unit.VQ), isa.encode(SocOp.END)],
         CpError.VQ | (VqError.DMA_ALIGN << 8), 2),
    ]
    for what, prog, code, want_pc in cases:
        err, pc = await host.run(at, prog)
        assert (err, pc) == (int(code), want_pc), f"{what}: ERROR {err:#x} ERROR_PC {pc}, expected {int(code):#x} {want_pc}"
        dut._log.info("%s: ERROR %#06x ERROR_PC %d", what, err, pc)
        await good()

    for addr, length in ((p.total_bytes, 4), (p.total_bytes - 64, 4), (at + 16, 4), (at, 0)):
        err, pc = await host.run(addr, None, length=length)
        assert (err, pc) == (CpError.BAD_PROGRAM, 0), f"program at {addr:#x} x {length}: {err:#x} {pc}"
        await good()

    # START while running is ignored; CLEAR aborts a running program; the next one runs.
    long = [nop] * 40 + [isa.encode(SocOp.END)]
    await host.write(at, isa.to_bytes(long))
    await tr.write_csr(CSR.PROG_ADDR, at)
    await tr.write_csr(CSR.PROG_LEN, len(long))
    await tr.write_csr(CSR.CTRL, Ctrl.START)
    await tr.write_csr(CSR.CTRL, Ctrl.START)
    await tr.write_csr(CSR.CTRL, Ctrl.CLEAR | Ctrl.START)
    err, pc = await host.wait()
    assert err == 0, f"the program restarted by CLEAR | START stopped with {err:#x} at {pc}"
    await good()

    # Window: outside or misaligned bursts SLVERR and write nothing; registers: unmapped / read-only SLVERR.
    size = p.total_bytes
    spare = at + 4096
    before = await host.read(spare, 64)
    for coro in (tr.read_mem(size, 32), tr.write_mem(size, bytes([0xAB]) * 32), tr.read_mem(size - 32, 64),
                 tr.write_mem(spare + 16, bytes([0xAB]) * 32), tr.read_mem(spare + 8, 32),
                 tr.read_csr(0xFFC), tr.write_csr(CSR.ID, 1), tr.write_csr(CSR.STATUS, 1), tr.read_csr(CSR.CTRL)):
        try:
            await coro
        except AxiResponseError:
            pass
        else:
            raise AssertionError("an access outside the window or to an unmapped register was not SLVERR")
    assert await host.read(spare, 64) == before, "a refused burst wrote memory"
    # RESET_COUNTERS zeroes every counter register (read right after: only a few cycles counted).
    await tr.write_csr(CSR.CTRL, Ctrl.RESET_COUNTERS)
    counters = await host.counters()
    big = {k: v for k, v in counters.items() if v > 2000}
    assert not big, f"counters not reset: {big}"
    assert len(counters) == sum(1 for r in register_table(p.channels) if r.source)
    mon.assert_clean()
