"""Decoding the SoC's 256-bit instruction words into :class:`Ins` records, and the breakdown tags of a stage."""

from __future__ import annotations

from amaranth.lib import data as _adata

from hw.spec import macro as mcmod
from hw.spec import matrix_isa as mu_isa
from hw.spec import soc_isa as isa
from hw.spec import vector_isa as vu
from hw.spec.soc_isa import SocOp

_VLAYOUT = _adata.Layout.cast(vu.VectorInstr)
_VFIELDS = [(name, f.offset, f.width) for name, f in _VLAYOUT]
_VOPS = {op.code: op.name for op in vu.ISA_TABLE}


class Ins:
    __slots__ = ("op", "f", "idx")

    def __init__(self, op, f, idx):
        self.op = op
        self.f = f
        self.idx = idx

    def __repr__(self):
        return f"Ins({self.op!r}, {self.f})"


def _decode_vec(word):
    f = {name: (word >> lo) & ((1 << w) - 1) for name, lo, w in _VFIELDS}
    f["op"] = _VOPS.get(f["op"], f["op"])
    return f


def decode_program(words, spu: bool = False) -> list[Ins]:
    """Decode a program (list of 256-bit ints) into :class:`Ins` (op + fields); ``spu``: the system has the
    SRAM-PIM queue (SPIM / SLOAD legal, :func:`hw.spec.soc_isa.decode`)."""
    out = []
    for i, w in enumerate(words):
        d = isa.decode(w, i, spu=spu)
        op = d["op"]
        if op == SocOp.MATRIX:
            f = mu_isa.decode(d["word"])
            f["opcode"] = f["opcode"].name
        elif op == SocOp.VECTOR:
            f = _decode_vec(d["word"])
        elif op == SocOp.PIM:
            m = mcmod.decode([(d["word"] >> (32 * k)) & 0xFFFFFFFF for k in range(4)])
            f = {"op": int(m.op), "flags": int(m.flags), "n": m.n, "m": m.m, "row": m.row, "addr0": m.addr0,
                 "addr1": m.addr1}
        elif op in isa.FIELDS:
            f = {k: d[k] for k, _, _ in isa.FIELDS[op]}
        elif op == SocOp.FENCE:
            f = {"units": d["units"]}
        else:
            f = {}
        out.append(Ins(op, f, i))
    return out


_FC_TAG = {"qkv_attn": "qkv", "proj": "proj", "fc1": "ffn", "fc2": "ffn"}


def stage_tags(name: str, ins: list[Ins]) -> list[str]:
    """Operation of every instruction of a compiled stage (:data:`firmware.compiler.STAGES`), for the
    breakdown: ``qkv`` / ``proj`` / ``ffn`` (the FC: PIM macros or the matrix unit's GEMM with the
    weights; in ``qkv_attn`` also the scatter of Q, K, V), ``attention`` (QK^T and S.V on the matrix
    unit, scale and softmax on the vector unit) and ``vector`` (layernorm, bias, GELU, residual)."""
    if name in ("ln1", "ln2"):
        return ["vector"] * len(ins)
    fc = _FC_TAG.get(name, "vector")
    has_pim = any(x.op == SocOp.PIM for x in ins)
    # vector-queue runs (between FENCEs): a run with SOFTMAX is attention
    run_of = {}
    runs = [[]]
    for i, x in enumerate(ins):
        if x.op == SocOp.FENCE and x.f["units"] & 2:
            runs.append([])
        elif x.op in (SocOp.VECTOR, SocOp.VLOAD, SocOp.VSTORE):
            runs[-1].append(i)
    for r in runs:
        soft = any(ins[i].op == SocOp.VECTOR and ins[i].f["op"] in ("SOFTMAX", "SCALE") for i in r)
        for i in r:
            run_of[i] = soft
    out = []
    mu_fenced = False
    for i, x in enumerate(ins):
        if x.op == SocOp.PIM:
            out.append(fc)
        elif x.op == SocOp.MATRIX:
            if name == "qkv_attn":
                out.append("qkv" if (not has_pim and not mu_fenced) else "attention")
            else:
                out.append(fc)
        elif x.op in (SocOp.VECTOR, SocOp.VLOAD, SocOp.VSTORE):
            out.append(("attention" if run_of.get(i) else "qkv") if name == "qkv_attn" else "vector")
        else:
            out.append("-")
        if x.op == SocOp.FENCE and x.f["units"] & 1:
            mu_fenced = True
    return out
