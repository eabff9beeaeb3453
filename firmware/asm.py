"""Assembler and disassembler for SoC programs (text <-> 256-bit instructions).

One instruction per line, ``#`` starts a comment::

    fence mu,vq
    matrix LOAD target=ACT transpose=0 mem_addr=0x1000 mem_stride=64 rows=8 cols=32 spm_addr=0 spm_stride=8 signal=0x1
    matrix COMPUTE wait=0x1 act_addr=0 act_stride=8 wgt_addr=0 wgt_stride=32 acc_addr=0 acc_stride=8 m=8 k=32 n=16
    vector ADD a=0 b=64 d=0 n=32 rows=2 a_fmt=FP32 b_fmt=FP32 d_fmt=BF16 b_mode=VEC
    vload mem_addr=0x2000 mem_stride=128 rows=2 cols=4 spm_addr=0 spm_pitch=4
    pim GEMV n=768 m=2304 row=0 addr0=0x400 flags=1
    end

The field names are those of the instruction tables (:mod:`hw.spec.soc_isa`,
:mod:`hw.spec.matrix_isa`, :class:`hw.spec.vector_isa.VectorInstr`, :mod:`hw.spec.macro`);
enumerated fields take their names (``target=ACT``, ``a_fmt=BF16``) or numbers.
Fields not given are 0.

Round trip: :func:`disassemble` accepts exactly the well-formed instructions
and prints every bit of them, so ``assemble(disassemble(words)) == words`` for
every program it accepts. Well-formed means what :func:`hw.spec.soc_isa.decode`
accepts (what the command processor executes rather than flags ILLEGAL) and,
for MATRIX, what ``hw.spec.matrix_isa.decode(strict=True)`` accepts: a defined opcode
and target, and zero in every field the opcode does not use (the matrix unit
ignores those bits; the disassembler would drop them); a FENCE's payload bits
(ignored by the command processor) must be zero too. SPIM, SLOAD and the FENCE
unit ``spu`` exist on systems with an SRAM-PIM unit only: :func:`disassemble`
takes them with ``spu=True``; :func:`assemble` always does (it knows no system). Their fields are
those of :data:`hw.spec.soc_isa.SPIM_FIELDS` / :data:`~hw.spec.soc_isa.SLOAD_FIELDS`, all required, e.g.
``sload mem_addr=0x3000 pos_stride=32 positions=8 region_stride=0x400 regions=2 cols=1 line=0
line_stride=16``, ``spim mode=0 base=0 count=8 heads=2 stride=4 spm_in=0 in_pitch=1 spm_out=8
out_pitch=1``, ``fence vq,spu``. VECTOR and PIM
payloads are printed field by field, undefined opcodes as numbers.

Errors are :class:`AsmError` (a :class:`hw.spec.soc_isa.IsaError`): ``line N: ...``
from :func:`assemble`, ``instruction N: ...`` (the index in the program) from
:func:`disassemble`.
"""

from __future__ import annotations

import numbers

from amaranth.lib import data

from hw.spec import macro as mc
from hw.spec import matrix_isa as mu_isa
from hw.spec import soc_isa as isa
from hw.spec import vector_isa as vu
from hw.spec.soc_isa import SocOp, Unit

__all__ = ["assemble", "disassemble", "AsmError", "disassemble_word"]


class AsmError(isa.IsaError):
    """Malformed assembly text (naming the line) or an instruction word the disassembler does not accept
    (naming its index in the program and the field)."""


_VEC_LAYOUT = data.Layout.cast(vu.VectorInstr)
_VEC_ENUMS = {"op": vu.Opcode, "a_fmt": vu.Fmt, "b_fmt": vu.Fmt, "d_fmt": vu.Fmt, "b_mode": vu.BMode,
              "mask": vu.MaskMode}
_MACRO_FIELDS = [name for name, _, _ in mc.FIELDS]
_UNIT_NAMES = {"mu": Unit.MU, "vq": Unit.VQ, "pcu": Unit.PCU, "spu": Unit.SPU}


def _int(text: str, line: int, name: str) -> int:
    try:
        return int(text, 0)
    except ValueError:
        raise AsmError(f"line {line}: field {name} needs an integer, not {text!r}") from None


def _kv(tokens, line):
    out = {}
    for t in tokens:
        if "=" not in t:
            raise AsmError(f"line {line}: expected name=value, got {t!r}")
        k, v = t.split("=", 1)
        if k in out:
            raise AsmError(f"line {line}: field {k} given twice")
        out[k] = v
    return out


def disassemble_word(word: int, index: int | None = None, spu: bool = False) -> str:
    """One instruction as text; raises :class:`AsmError` naming ``index`` and the field for a word that
    is not well-formed (see the module docstring). ``spu``: the system has the SRAM-PIM queue."""
    where = "" if index is None else f"instruction {index}: "
    try:
        return _disassemble(word, where, spu)
    except AsmError:
        raise
    except (ValueError, TypeError) as e:
        raise AsmError(f"{where}{e}") from None


def _disassemble(word, where, spu=False) -> str:
    if isinstance(word, bool) or not isinstance(word, numbers.Integral):
        raise AsmError(f"{where}an instruction is an integer, not {type(word).__name__}")
    f = isa.decode(int(word), spu=spu)
    op = f["op"]
    if op == SocOp.END:
        return "end"
    if op == SocOp.FENCE:
        if int(word) >> isa.PAYLOAD_LO:        # the command processor ignores them; the text could not keep them
            raise AsmError(f"{where}FENCE has payload bits set ({int(word) >> isa.PAYLOAD_LO:#x}); must be 0")
        names = [n for n, u in _UNIT_NAMES.items() if f["units"] & u]
        return "fence " + (",".join(names) if names else "none")
    if op in isa.FIELDS:
        return op.name.lower() + " " + " ".join(f"{n}={f[n]:#x}" for n, _, _ in isa.FIELDS[op])
    if op == SocOp.MATRIX:
        try:
            d = mu_isa.decode(f["word"], strict=True)
        except mu_isa.InstructionError as e:
            raise AsmError(f"{where}MATRIX payload: {e}") from None
        opc = d.pop("opcode")

        def show(k):
            return mu_isa.Target(d[k]).name if k == "target" else f"{d[k]:#x}"
        return f"matrix {opc.name} " + " ".join(f"{k}={show(k)}" for k in mu_isa.USED_FIELDS[opc])
    if op == SocOp.VECTOR:
        w = f["word"]
        parts = []
        for name, fld in _VEC_LAYOUT:
            v = (w >> fld.offset) & ((1 << fld.width) - 1)
            if name in _VEC_ENUMS:
                try:
                    v = _VEC_ENUMS[name](v).name
                except ValueError:
                    v = str(v)
            else:
                v = f"{v:#x}"
            parts.append(f"{name}={v}")
        head, rest = parts[0].split("=", 1)[1], parts[1:]
        return "vector " + head + " " + " ".join(rest)
    m = mc.decode([(f["word"] >> (32 * i)) & 0xFFFFFFFF for i in range(4)])
    try:
        name = mc.MacroOp(m.op).name
    except ValueError:
        name = str(m.op)
    return f"pim {name} " + " ".join(f"{n}={getattr(m, n):#x}" for n in _MACRO_FIELDS[1:])


def disassemble(words, spu: bool = False) -> str:
    """A program as text, one line per instruction (see :func:`disassemble_word`)."""
    return "\n".join(disassemble_word(w, i, spu) for i, w in enumerate(words)) + "\n"


def _assemble_line(tokens, line) -> int:
    mnem = tokens[0].lower()
    try:
        if mnem == "end":
            if len(tokens) > 1:
                raise AsmError(f"line {line}: end takes no operands")
            return isa.encode(SocOp.END)
        if mnem == "fence":
            if len(tokens) != 2:
                raise AsmError(f"line {line}: fence takes one operand (units, e.g. mu,vq,pcu,spu or none)")
            units = 0
            if tokens[1] != "none":
                for u in tokens[1].split(","):
                    if u not in _UNIT_NAMES:
                        raise AsmError(f"line {line}: unknown unit {u!r} (mu, vq, pcu, spu)")
                    units |= _UNIT_NAMES[u]
            return isa.encode(SocOp.FENCE, units=units)
        if mnem in ("vload", "vstore", "spim", "sload"):
            fields = isa.FIELDS[SocOp[mnem.upper()]]
            kv = _kv(tokens[1:], line)
            bad = sorted(set(kv) - {name for name, _, _ in fields})
            if bad:
                raise AsmError(f"line {line}: unknown {mnem} fields {bad} "
                               f"({', '.join(name for name, _, _ in fields)})")
            return isa.encode(SocOp[mnem.upper()], **{k: _int(v, line, k) for k, v in kv.items()})
        if len(tokens) < 2:
            raise AsmError(f"line {line}: {mnem} needs an operation name")
        if mnem == "matrix":
            try:
                opc = mu_isa.Opcode[tokens[1].upper()]
            except KeyError:
                raise AsmError(f"line {line}: unknown matrix operation {tokens[1]!r}") from None
            kv = {}
            for k, v in _kv(tokens[2:], line).items():
                if k == "opcode":
                    raise AsmError(f"line {line}: the matrix operation is the first operand ({tokens[1]!r}), "
                                   f"not a field opcode=")
                if k == "target" and v.upper() in mu_isa.Target.__members__:
                    kv[k] = mu_isa.Target[v.upper()].value
                else:
                    kv[k] = _int(v, line, k)
            try:
                word = mu_isa.encode(opc, **kv)
                mu_isa.decode(word, strict=True)        # only what the disassembler gives back
            except KeyError as e:
                raise AsmError(f"line {line}: {e.args[0]}") from None
            except ValueError as e:
                raise AsmError(f"line {line}: {e}") from None
            return isa.encode(SocOp.MATRIX, word=word)
        if mnem == "vector":
            kv = _kv(tokens[2:], line)
            fields = {"op": tokens[1].upper()}
            for k, v in kv.items():
                if k == "op":
                    raise AsmError(f"line {line}: the vector operation is the first operand ({tokens[1]!r}), "
                                   f"not a field op=")
                if k not in dict(_VEC_LAYOUT):
                    raise AsmError(f"line {line}: unknown vector field {k!r}")
                if k in _VEC_ENUMS and not v[:1].isdigit():
                    if v not in _VEC_ENUMS[k].__members__:
                        raise AsmError(f"line {line}: {k} must be one of {', '.join(_VEC_ENUMS[k].__members__)}")
                    fields[k] = v
                else:
                    fields[k] = _int(v, line, k)
            if not fields["op"][:1].isdigit() and fields["op"] not in vu.Opcode.__members__:
                raise AsmError(f"line {line}: unknown vector operation {tokens[1]!r}")
            if fields["op"][:1].isdigit():
                fields["op"] = int(fields["op"], 0)
            for k, fld in _VEC_LAYOUT:
                if isinstance(fields.get(k), int) and not 0 <= fields[k] < (1 << fld.width):
                    raise AsmError(f"line {line}: field {k} must fit in {fld.width} bits")
            return isa.encode(SocOp.VECTOR, word=vu.encode(**fields))
        if mnem == "pim":
            name = tokens[1].upper()
            op = int(name, 0) if name[:1].isdigit() else None
            if op is None:
                if name not in mc.MacroOp.__members__:
                    raise AsmError(f"line {line}: unknown PIM operation {tokens[1]!r}")
                op = mc.MacroOp[name]
            kv = {k: _int(v, line, k) for k, v in _kv(tokens[2:], line).items()}
            bad = set(kv) - set(_MACRO_FIELDS[1:])
            if bad:
                raise AsmError(f"line {line}: unknown PIM fields {sorted(bad)}")
            words = mc.encode(mc.Macro(op=op, **kv))
            return isa.encode(SocOp.PIM, word=sum(w << (32 * i) for i, w in enumerate(words)))
    except AsmError:
        raise
    except (ValueError, TypeError) as e:    # IsaError and the tables' own range / argument errors
        raise AsmError(f"line {line}: {e}") from None
    raise AsmError(f"line {line}: unknown mnemonic {tokens[0]!r} (end, fence, matrix, vector, vload, vstore, pim, "
                   f"spim, sload)")


def assemble(text: str) -> list[int]:
    out = []
    for n, raw in enumerate(text.splitlines(), 1):
        body = raw.split("#", 1)[0].strip()
        if body:
            out.append(_assemble_line(body.split(), n))
    return out
