"""Instruction-level golden model of the NPU matrix unit (scratchpads + LOAD / COMPUTE / STORE).

Written from the instruction semantics documented in :mod:`hw.spec.matrix_isa` and
:mod:`hw.npu.dma` (layouts, zero lanes, byte-masked stores) and the
accumulation order of :mod:`sim.golden.gemm`, not from the RTL. Instructions
run one at a time in program order: a program whose dependency tokens are
right gives the same memory contents on the RTL, whose three queues overlap.

Memory is any object with ``read(addr, n) -> bytes`` and ``write(addr, bytes)``
(:class:`firmware.memimage.MemoryImage`).
"""

from __future__ import annotations

import numpy as np

from hw.spec.matrix_isa import ErrorCode, Opcode, Target, decode
from sim.golden.gemm import gemm, to_bf16

__all__ = ["MatrixModel"]

COLUMN = 32


class MatrixModel:
    def __init__(self, cfg, mem):
        n = cfg.npu
        self.R, self.C = n.array_rows, n.array_cols
        self.act = np.zeros((n.act_spm_words, self.R), dtype=np.uint16)
        self.wgt = np.zeros((n.wgt_spm_words, self.C), dtype=np.uint16)
        self.acc = np.zeros((n.acc_spm_words, self.C), dtype=np.uint32)
        self.mem = mem
        self.macs = 0

    # -- checks (the unit's error codes) ---------------------------------------------------
    def check(self, f: dict) -> ErrorCode:
        op = f["opcode"]
        if op == Opcode.NOP:
            return ErrorCode.NONE
        if op in (Opcode.LOAD, Opcode.STORE):
            if f["rows"] == 0 or f["cols"] == 0:
                return ErrorCode.BAD_SIZE
            if f["mem_addr"] % COLUMN or f["mem_stride"] % COLUMN:
                return ErrorCode.MISALIGNED
            if op == Opcode.LOAD:
                W = self.R if f["target"] == Target.ACT.value else self.C
                spm = self.act if f["target"] == Target.ACT.value else self.wgt
                if f["transpose"]:
                    last = f["spm_addr"] + (-(-f["rows"] // W) - 1) * f["spm_stride"] + f["cols"]
                else:
                    last = f["spm_addr"] + (-(-f["cols"] // W) - 1) * f["spm_stride"] + f["rows"]
                if last > spm.shape[0]:
                    return ErrorCode.ACT_OVERRUN if f["target"] == Target.ACT.value else ErrorCode.WGT_OVERRUN
            else:
                last = f["spm_addr"] + (-(-f["cols"] // self.C) - 1) * f["spm_stride"] + f["rows"]
                if last > self.acc.shape[0]:
                    return ErrorCode.ACC_OVERRUN
            return ErrorCode.NONE
        if op == Opcode.COMPUTE:
            M, K, N = f["m"], f["k"], f["n"]
            if 0 in (M, K, N):
                return ErrorCode.BAD_SIZE
            KB, NB = -(-K // self.R), -(-N // self.C)
            if f["act_addr"] + (KB - 1) * f["act_stride"] + M > self.act.shape[0]:
                return ErrorCode.ACT_OVERRUN
            if f["wgt_addr"] + (NB - 1) * f["wgt_stride"] + K > self.wgt.shape[0]:
                return ErrorCode.WGT_OVERRUN
            if f["acc_addr"] + (NB - 1) * f["acc_stride"] + M > self.acc.shape[0]:
                return ErrorCode.ACC_OVERRUN
            return ErrorCode.NONE
        return ErrorCode.BAD_OPCODE

    def run(self, word: int) -> ErrorCode:
        try:
            f = decode(word)
        except ValueError:
            return ErrorCode.BAD_OPCODE
        err = self.check(f)
        if err != ErrorCode.NONE:
            return err
        op = f["opcode"]
        if op == Opcode.LOAD:
            self._load(f)
        elif op == Opcode.STORE:
            self._store(f)
        elif op == Opcode.COMPUTE:
            self._compute(f)
        return ErrorCode.NONE

    # -- semantics -------------------------------------------------------------------------
    def _tile(self, f, esize):
        rows, cols = f["rows"], f["cols"]
        out = np.empty((rows, cols), dtype=np.uint16 if esize == 2 else np.uint32)
        for r in range(rows):
            raw = self.mem.read(f["mem_addr"] + r * f["mem_stride"], cols * esize)
            out[r] = np.frombuffer(raw, dtype="<u2" if esize == 2 else "<u4")
        return out

    def _load(self, f):
        t = self._tile(f, 2)
        rows, cols = t.shape
        act = f["target"] == Target.ACT.value
        W = self.R if act else self.C
        spm = self.act if act else self.wgt
        base, stride = f["spm_addr"], f["spm_stride"]
        if f["transpose"]:
            nb = -(-rows // W)
            pad = np.zeros((nb * W, cols), dtype=np.uint16)
            pad[:rows] = t
            for b in range(nb):
                spm[base + b * stride:base + b * stride + cols] = pad[b * W:(b + 1) * W].T
        else:
            nc = -(-cols // W)
            pad = np.zeros((rows, nc * W), dtype=np.uint16)
            pad[:, :cols] = t
            for c in range(nc):
                spm[base + c * stride:base + c * stride + rows] = pad[:, c * W:(c + 1) * W]

    def _compute(self, f):
        M, K, N = f["m"], f["k"], f["n"]
        R, C = self.R, self.C
        KB, NB = -(-K // R), -(-N // C)
        a = np.zeros((M, KB * R), dtype=np.uint16)
        for kb in range(KB):
            a[:, kb * R:(kb + 1) * R] = self.act[f["act_addr"] + kb * f["act_stride"]:][:M]
        w = np.zeros((K, NB * C), dtype=np.uint16)
        acc = np.zeros((M, NB * C), dtype=np.uint32)
        for nb in range(NB):
            w[:, nb * C:(nb + 1) * C] = self.wgt[f["wgt_addr"] + nb * f["wgt_stride"]:][:K]
            acc[:, nb * C:(nb + 1) * C] = self.acc[f["acc_addr"] + nb * f["acc_stride"]:][:M]
        res = gemm(a[:, :K], w, R, acc if f["accumulate"] else None)
        for nb in range(NB):
            lo = f["acc_addr"] + nb * f["acc_stride"]
            self.acc[lo:lo + M] = res[:, nb * C:(nb + 1) * C]
        self.macs += M * K * N

    def _store(self, f):
        rows, cols, C = f["rows"], f["cols"], self.C
        nb = -(-cols // C)
        vals = np.zeros((rows, nb * C), dtype=np.uint32)
        for b in range(nb):
            lo = f["spm_addr"] + b * f["spm_stride"]
            vals[:, b * C:(b + 1) * C] = self.acc[lo:lo + rows]
        vals = vals[:, :cols]
        data = to_bf16(vals).astype("<u2") if f["bf16"] else vals.astype("<u4")
        for r in range(rows):
            self.mem.write(f["mem_addr"] + r * f["mem_stride"], data[r].tobytes())

