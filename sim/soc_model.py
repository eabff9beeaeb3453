"""Functional model of the SoC: runs compiled programs (:mod:`hw.spec.soc_isa`) bit-exactly, fast.

The command processor's program is executed in order, one instruction at a
time, over one byte image of device memory shared by

* the matrix unit (:class:`sim.golden.matrix.MatrixModel`),
* the vector queue: the vector unit's golden model
  (:class:`sim.golden.vector.VectorModel`) and a byte-copy model of VLOAD /
  VSTORE,
* the PCU and the PIM banks (:class:`sim.pim_model.FunctionalDevice`),
* with ``cfg.spu``, the SRAM-PIM queue: the unit's golden model
  (:class:`sim.golden.sram_pim.SramPimModel`) for SPIM (operands from and results to the vector
  scratchpad's bytes) and a line-copy model of SLOAD, with the queue's checks (:mod:`hw.npu.spu`).

FENCEs are no-ops here (execution is sequential); a program whose
dependencies (FENCEs, matrix-unit tokens) are right gives the same memory on
the RTL, where the units overlap. Errors stop the program with the same codes
as the RTL command processor (:class:`hw.spec.soc_isa.CpError` plus the unit's
own code). Timing is not modelled here (see ``firmware/costmodel.py``).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from firmware.runtime import Job, run_model
from hw.config import SystemConfig
from hw.spec import soc_isa as isa
from hw.spec.macro import MacroError
from hw.spec.macro import decode as macro_decode
from hw.spec.matrix_isa import ErrorCode
from hw.spec.soc_isa import CpError, SocOp, SpuError, VqError
from sim.golden.matrix import MatrixModel
from sim.golden.sram_pim import SramPimCommandError, SramPimModel, check_command
from sim.golden.vector import VectorModel
from sim.pim_model import FunctionalDevice

__all__ = ["SocModel", "RunResult", "vector_fields", "run_job"]


def vector_fields(word: int) -> dict:
    """The fields of a VectorInstr word as the golden model wants them (ints)."""
    from amaranth.lib import data

    from hw.spec.vector_isa import VectorInstr

    layout = data.Layout.cast(VectorInstr)
    out = {}
    for name, fld in layout:
        out[name] = (word >> fld.offset) & ((1 << fld.width) - 1)
    return out


@dataclass
class RunResult:
    error: int = 0              # CpError | unit code << 8
    error_pc: int = 0
    instructions: int = 0
    counts: dict = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return self.error == 0


class SocModel:
    def __init__(self, cfg: SystemConfig):
        self.cfg = cfg
        self.dev = FunctionalDevice(cfg)
        self.mem = self.dev.mem
        self.mu = MatrixModel(cfg, self.mem)
        n = cfg.npu
        self.vu = VectorModel(n.vector_lanes, n.vector_spm_words, acc_stages=n.vec_acc_stages)
        self.spm_bytes = self.vu.mem.view(np.uint8).reshape(-1)
        self.spu = None
        if cfg.spu is not None:
            s = cfg.spu
            self.spu = SramPimModel(s.macros, s.rows, s.word_lanes, s.mac_lanes)

    # -- host side ---------------------------------------------------------------------------
    def write(self, addr: int, data: bytes):
        self.mem.write(addr, data)

    def read(self, addr: int, n: int) -> bytes:
        return self.mem.read(addr, n)

    # -- vector DMA ----------------------------------------------------------------------------
    def _vdma(self, f: dict, load: bool) -> VqError:
        rows, cols = f["rows"], f["cols"]
        if rows == 0 or cols == 0:
            return VqError.DMA_SIZE
        if f["mem_addr"] % 32 or f["mem_stride"] % 32:
            return VqError.DMA_ALIGN
        if 32 * (f["spm_addr"] + (rows - 1) * f["spm_pitch"] + cols) > self.spm_bytes.size:
            return VqError.DMA_SPM
        for r in range(rows):
            a = f["mem_addr"] + r * f["mem_stride"]
            if a + 32 * cols > self.mem.size:
                return VqError.DMA_MEM
        for r in range(rows):
            a = f["mem_addr"] + r * f["mem_stride"]
            s = 32 * (f["spm_addr"] + r * f["spm_pitch"])
            if load:
                self.spm_bytes[s:s + 32 * cols] = np.frombuffer(self.mem.read(a, 32 * cols), dtype=np.uint8)
            else:
                self.mem.write(a, self.spm_bytes[s:s + 32 * cols].tobytes())
        return VqError.NONE

    # -- SRAM-PIM queue (hw.npu.spu) ----------------------------------------------------------------
    def _spim(self, f: dict) -> SpuError:
        u = self.spu
        M, R, W = u.M, u.R, u.W
        pv = f["mode"] == 1
        heads, count = f["heads"], f["count"]
        try:
            groups = check_command(M, R, "PV" if pv else "QK", f["base"], count, heads, f["stride"])
        except SramPimCommandError:
            return SpuError.BAD_COMMAND
        cols = self.spm_bytes.size // 32
        in_end = 16 * (f["spm_in"] + (heads - 1) * f["in_pitch"]) + (groups * M if pv else W)
        out_end = 8 * (f["spm_out"] + (heads - 1) * f["out_pitch"]) + (W if pv else count)
        if in_end > 16 * cols or out_end > 8 * cols:
            return SpuError.SPM
        n_in = count if pv else W
        ops = np.empty((heads, n_in), dtype=np.uint16)
        for h in range(heads):
            a = 32 * (f["spm_in"] + h * f["in_pitch"])
            ops[h] = self.spm_bytes[a:a + 2 * n_in].view("<u2")
        if pv:
            res = u.pv(f["base"], count, ops, heads, f["stride"])
        else:
            res = u.qk(f["base"], count, ops, heads, f["stride"])
        for h in range(heads):
            a = 32 * (f["spm_out"] + h * f["out_pitch"])
            self.spm_bytes[a:a + 4 * res.shape[1]] = res[h].astype("<u4").view(np.uint8)
        return SpuError.NONE

    def _sload(self, f: dict) -> SpuError:
        u = self.spu
        regions, positions, cols = f["regions"], f["positions"], f["cols"]
        if regions == 0 or positions == 0 or cols == 0 or 32 * cols > 2 * u.W:
            return SpuError.SLOAD_SIZE
        if f["mem_addr"] % 32 or f["pos_stride"] % 32 or f["region_stride"] % 32:
            return SpuError.SLOAD_ALIGN
        if f["line"] + (regions - 1) * f["line_stride"] + positions - 1 >= u.M * u.R:
            return SpuError.SLOAD_LINE
        if f["mem_addr"] + (regions - 1) * f["region_stride"] + (positions - 1) * f["pos_stride"] + 32 * cols \
                > self.mem.size:
            return SpuError.SLOAD_MEM
        for r in range(regions):
            for p in range(positions):
                a = f["mem_addr"] + r * f["region_stride"] + p * f["pos_stride"]
                row = np.zeros(u.W, dtype=np.uint16)
                row[:16 * cols] = np.frombuffer(self.mem.read(a, 32 * cols), dtype="<u2")
                u.write(f["line"] + r * f["line_stride"] + p, row)
        return SpuError.NONE

    # -- program ----------------------------------------------------------------------------------
    def run(self, prog_addr: int, prog_len: int, max_instructions: int = 10_000_000) -> RunResult:
        res = RunResult(counts={op.name: 0 for op in SocOp})
        if prog_addr % 32 or prog_len == 0 or prog_addr + 32 * prog_len > self.mem.size:
            res.error = CpError.BAD_PROGRAM
            return res
        for pc in range(min(prog_len, max_instructions)):
            word = int.from_bytes(self.mem.read(prog_addr + 32 * pc, 32), "little")
            try:
                f = isa.decode(word, spu=self.spu is not None)
            except isa.IsaError:
                res.error, res.error_pc = CpError.ILLEGAL, pc
                return res
            op = f["op"]
            res.counts[op.name] += 1
            res.instructions += 1
            code = 0
            if op == SocOp.END:
                return res
            if op == SocOp.FENCE:
                continue
            if op == SocOp.MATRIX:
                e = self.mu.run(f["word"])
                code = (CpError.MU | (e.value << 8)) if e != ErrorCode.NONE else 0
            elif op == SocOp.VECTOR:
                e = self.vu.run(vector_fields(f["word"]))
                code = (CpError.VQ | (int(e) << 8)) if e else 0
            elif op in (SocOp.VLOAD, SocOp.VSTORE):
                e = self._vdma(f, op == SocOp.VLOAD)
                code = (CpError.VQ | (int(e) << 8)) if e else 0
            elif op == SocOp.PIM:
                words = [(f["word"] >> (32 * i)) & 0xFFFFFFFF for i in range(4)]
                e = self.dev.execute(macro_decode(words))
                code = (CpError.PCU | (int(e) << 8)) if e != MacroError.NONE else 0
            elif op in (SocOp.SPIM, SocOp.SLOAD):
                e = self._spim(f) if op == SocOp.SPIM else self._sload(f)
                code = (CpError.SPU | (int(e) << 8)) if e else 0
            if code:
                res.error, res.error_pc = code, pc
                return res
        res.error, res.error_pc = CpError.ILLEGAL, prog_len
        return res


def run_job(job: Job, progress=None) -> SocModel:
    """Run every program of a runtime job (:func:`firmware.runtime.build_job`) on a new :class:`SocModel`;
    returns the model (its memory holds the results)."""
    return run_model(job, SocModel(job.compiled.cfg), progress)
