"""Merging two independent instruction streams into one program (batched generation's ``neupims`` policy,
:mod:`firmware.batch`): :func:`merge_streams` interleaves them in order of the cost model's time per
instruction (:func:`instruction_costs`), so the command processor feeds both streams' units as they drain.
"""

from __future__ import annotations

from hw.spec import soc_isa as isa
from hw.spec.config import SystemConfig
from hw.spec.soc_isa import SocOp

__all__ = ["instruction_costs", "merge_streams"]

_VQ_OPS = (SocOp.VECTOR, SocOp.VLOAD, SocOp.VSTORE)


def instruction_costs(cfg: SystemConfig, words: list[int]) -> list[float]:
    """Cost-model cycles of every instruction of a program (FENCE and END 0): matrix-unit LOAD / STORE by
    their bytes at the DMA's rate, COMPUTE by the array's slots, each run of MATRIX instructions scaled to
    ``max(loads, computes) + stores`` (the unit's queues overlap); PIM macros by
    :func:`firmware.pim.gemv_lower_bound` x :data:`firmware.costmodel.PCU_OVERHEAD` (GEMV) and their
    transfers; vector instructions by :func:`hw.spec.vector_isa.vector_cycles`, vector DMA by its columns."""
    from amaranth.lib import data as _data

    from firmware import costmodel
    from firmware.pim import gemv_lower_bound
    from hw.spec import macro as mac
    from hw.spec import matrix_isa as mu_isa
    from hw.spec import vector_isa as vu

    npu = cfg.npu
    R, C = npu.array_rows, npu.array_cols
    rate = costmodel._mem_rate(cfg)
    vlay = _data.Layout.cast(vu.VectorInstr)

    def vfield(w, name):
        f = vlay[name]
        return (w >> f.offset) & ((1 << f.width) - 1)

    out, kinds = [], []
    for w in words:
        op = SocOp(w & 0xF)
        c, kind = 0.0, None
        if op == SocOp.MATRIX:
            f = mu_isa.decode(w >> isa.PAYLOAD_LO)
            o = f["opcode"]
            if o == mu_isa.Opcode.LOAD:
                r = min(32 * C / max(C, 16), rate) if f.get("transpose") else min(32.0, rate)
                c, kind = f["rows"] * f["cols"] * 2 / r, "L"
            elif o == mu_isa.Opcode.STORE:
                c, kind = f["rows"] * f["cols"] * (2 if f.get("bf16") else 4) / min(32.0, rate), "S"
            elif o == mu_isa.Opcode.COMPUTE:
                c, kind = max(f["m"], R, 4) * -(-f["k"] // R) * -(-f["n"] // C), "C"
        elif op == SocOp.PIM:
            payload = w >> isa.PAYLOAD_LO
            m = mac.decode([(payload >> (32 * i)) & 0xFFFFFFFF for i in range(4)])
            if m.op == mac.MacroOp.GEMV:
                c = costmodel.PCU_OVERHEAD * gemv_lower_bound(cfg, m.n, m.m)["cycles"]
            elif m.op == mac.MacroOp.WRITE_VEC:
                c = m.n * 2 / 32 + costmodel.MEM_LATENCY
            elif m.op == mac.MacroOp.READ_RES:
                c = m.n * 4 / 32 + costmodel.MEM_LATENCY
        elif op == SocOp.VECTOR:
            word = w >> isa.PAYLOAD_LO
            c = vu.vector_cycles(vu.Opcode(vfield(word, "op")).name, vfield(word, "n"), vfield(word, "rows"),
                                 npu.vector_lanes, acc_stages=npu.vec_acc_stages)
        elif op in (SocOp.VLOAD, SocOp.VSTORE):
            f = isa.decode(w)
            c = costmodel.vdma_cycles(cfg, f["rows"], 32 * f["cols"])
        out.append(float(c))
        kinds.append(kind)
    i = 0                                   # runs of MATRIX instructions: the queues overlap
    while i < len(words):
        if kinds[i] is None:
            i += 1
            continue
        j = i
        while j < len(words) and kinds[j] is not None:
            j += 1
        tot = {k: sum(out[x] for x in range(i, j) if kinds[x] == k) for k in "LCS"}
        raw = sum(tot.values())
        if raw:
            scale = (max(tot["L"], tot["C"]) + tot["S"]) / raw
            for x in range(i, j):
                out[x] *= scale
        i = j
    return out


def _atoms(words: list[int], costs: list[float]) -> list[tuple[list[int], float]]:
    """A stream cut where the other stream's instructions may go: every run of vector-queue instructions is
    one atom (its scratchpad regions are reused from one run to the next, so another stream's vector
    instructions must not land inside it), every other instruction an atom of its own."""
    out, i = [], 0
    while i < len(words):
        j = i + 1
        if SocOp(words[i] & 0xF) in _VQ_OPS:
            while j < len(words) and SocOp(words[j] & 0xF) in _VQ_OPS:
                j += 1
        out.append((words[i:j], sum(costs[i:j])))
        i = j
    return out


def merge_streams(cfg: SystemConfig, first: list[int], second: list[int]) -> tuple[list[int], tuple[float, float]]:
    """One program of two independent instruction streams (no END; no data shared between them): their
    atoms (:func:`_atoms`) interleaved in order of the cost model's time (:func:`instruction_costs`): next
    comes the atom of the stream whose emitted work is smaller (``first`` on ties). The command processor
    dispatches in program order into shallow unit queues (matrix unit 4, macros 8, vector 8 instructions),
    so each unit is fed as it drains while the other runs; each stream's FENCEs stay in place and keep its
    own dependences (a FENCE may also wait for the other stream's work on that unit: never too early).
    Returns the words and the two streams' estimated cycles."""
    end = isa.encode(SocOp.END)
    streams = []
    for ws in (first, second):
        ws = [w for w in ws if w != end]
        streams.append(_atoms(ws, instruction_costs(cfg, ws)))
    pos, t, out = [0, 0], [0.0, 0.0], []
    while pos[0] < len(streams[0]) or pos[1] < len(streams[1]):
        if pos[1] >= len(streams[1]) or (pos[0] < len(streams[0]) and t[0] <= t[1]):
            s = 0
        else:
            s = 1
        words, c = streams[s][pos[s]]
        out += words
        t[s] += c
        pos[s] += 1
    return out, (t[0], t[1])
