"""Assembler / disassembler / ISA on random input (issue 21).

Properties (hypothesis, settings in tests/fuzz_profiles.py; a bounded run in ``make test``, >= 10,000 examples per
property under ``make test-long``):

* every random *valid* program (each op, random fields within their widths) survives
  ``assemble(disassemble(words)) == words`` and the binary round trip;
* every random 256-bit word either disassembles and assembles back to itself, or raises :class:`AsmError`
  naming the instruction index (never another exception type, never a lossy round trip);
* random assembly text either assembles (and then round-trips) or raises :class:`AsmError` naming the line.

The expectations here are written from the tables (field widths, which fields each MATRIX opcode has), not from
the assembler's code.
"""

import re

import pytest
from fuzz_profiles import FAST, LONG, SEED, SEED_NOTE
from hypothesis import given, note, seed
from hypothesis import strategies as st

from firmware import isa
from firmware.asm import AsmError, assemble, disassemble
from firmware.isa import SocOp
from hw.npu import isa as mu

# -- strategies: valid instructions built from the table's field widths ---------------------------------------


def _bits(width):
    return st.integers(0, (1 << width) - 1)


def _fields(layout, names):
    return st.fixed_dictionaries({n: _bits(layout[n].width) for n in names})


@st.composite
def matrix_words(draw):
    """A well-formed matrix-unit instruction: a defined opcode, its own fields random, every other bit 0."""
    opc = draw(st.sampled_from(list(mu.Opcode)))
    f = {"wait": draw(_bits(16)), "signal": draw(_bits(16))}
    if opc in (mu.Opcode.LOAD, mu.Opcode.STORE):
        f.update(target=draw(st.sampled_from(list(mu.Target))), transpose=draw(_bits(1)), bf16=draw(_bits(1)))
        f.update(draw(_fields(mu.DMA_BODY, [n for n, _ in mu.DMA_BODY if not n.startswith("_")])))
    elif opc == mu.Opcode.COMPUTE:
        f.update(accumulate=draw(_bits(1)))
        f.update(draw(_fields(mu.COMPUTE_BODY, [n for n, _ in mu.COMPUTE_BODY])))
    return mu.encode(opc, **f)


VDMA = {n: w for n, _, w in isa.VDMA_FIELDS}
instructions = st.one_of(
    st.just(isa.encode(SocOp.END)),
    _bits(3).map(lambda u: isa.encode(SocOp.FENCE, units=u)),
    matrix_words().map(lambda w: isa.encode(SocOp.MATRIX, word=w)),
    _bits(isa.PAYLOAD_WIDTH[SocOp.VECTOR]).map(lambda w: isa.encode(SocOp.VECTOR, word=w)),
    _bits(isa.PAYLOAD_WIDTH[SocOp.PIM]).map(lambda w: isa.encode(SocOp.PIM, word=w)),
    st.tuples(st.sampled_from([SocOp.VLOAD, SocOp.VSTORE]),
              st.fixed_dictionaries({n: _bits(w) for n, w in VDMA.items()})).map(lambda t: isa.encode(t[0], **t[1])),
)
programs = st.lists(instructions, min_size=1, max_size=24)


@st.composite
def raw_words(draw):
    """256-bit words, biased towards almost-valid ones: a random op code (legal or not), a payload that is random,
    random within the op's width, or a valid payload with a few stray bits; header bits occasionally set."""
    op = draw(st.integers(0, 15))
    kind = draw(st.sampled_from(["random", "in_width", "valid_plus_bits", "valid"]))
    if kind == "random":
        payload = draw(_bits(isa.PAYLOAD_BITS))
    else:
        width = isa.PAYLOAD_WIDTH.get(op, isa.PAYLOAD_BITS if op > 7 else 0)
        payload = draw(matrix_words()) if op == SocOp.MATRIX and kind != "in_width" else draw(_bits(width))
        if kind == "valid_plus_bits":
            for b in draw(st.lists(st.integers(0, isa.PAYLOAD_BITS - 1), max_size=3)):
                payload |= 1 << b
    header = op
    if op == SocOp.FENCE:
        header |= draw(_bits(3)) << 8
    if draw(st.integers(0, 9)) == 0:
        header |= 1 << draw(st.integers(4, 31))
    return header | payload << isa.PAYLOAD_LO


# -- properties -----------------------------------------------------------------------------------------------

def check_program_round_trip(words):
    text = disassemble(words)
    assert assemble(text) == words
    assert isa.from_bytes(isa.to_bytes(words)) == words
    assert len(text.splitlines()) == len(words)


def check_binary(words):
    """Disassemble a program with random words in it: lossless, or AsmError naming the first bad index."""
    try:
        text = disassemble(words)
    except AsmError as e:
        m = re.match(r"instruction (\d+): ", str(e))
        assert m, str(e)
        i = int(m.group(1))
        assert 0 <= i < len(words)
        disassemble(words[:i])                      # the ones before it are accepted
        with pytest.raises(AsmError):
            disassemble([words[i]])
        return
    assert assemble(text) == words, "disassembly accepted a word it does not reproduce"


TOKENS = ["end", "fence", "matrix", "vector", "vload", "vstore", "pim", "LOAD", "STORE", "COMPUTE", "NOP", "ADD",
          "GEMV", "FOO", "mu,vq", "none", "gpu", "target=ACT", "target=2", "rows=8", "rows=70000", "rows=-1",
          "cols=0x20", "wait=1", "accumulate=1", "transpose=1", "n=", "=5", "a_fmt=BF16", "a_fmt=FP64", "op=3",
          "mem_addr=0x1000", "mem_stride=32", "spm_addr=0", "spm_pitch=1", "13", "99", "0x1f", "x", "#", "#c",
          "k=1", "m=1", "flags=7", "addr1=1", "imm0=0xffffffff", "imm0=0x100000000", "b_mode=3", "mask=7",
          "opcode=1", "units=1", "word=5"]
texts = st.lists(st.lists(st.sampled_from(TOKENS), min_size=1, max_size=8).map(" ".join), min_size=1,
                 max_size=6).map("\n".join)


def check_text(text):
    try:
        words = assemble(text)
    except AsmError as e:
        assert re.match(r"line \d+: (?!line)", str(e)), str(e)
        return
    assert assemble(disassemble(words)) == words


@FAST
@given(programs)
def test_valid_programs_round_trip(words):
    check_program_round_trip(words)


@FAST
@given(st.lists(raw_words(), min_size=1, max_size=4))
def test_random_binaries_decode_losslessly_or_raise_asm_error(words):
    check_binary(words)


@FAST
@given(texts)
def test_random_text_assembles_or_raises_asm_error(text):
    check_text(text)


@pytest.mark.long
@LONG
@seed(SEED)
@given(programs)
def test_valid_programs_round_trip_long(words):
    note(SEED_NOTE)
    check_program_round_trip(words)


@pytest.mark.long
@LONG
@seed(SEED)
@given(st.lists(raw_words(), min_size=1, max_size=4))
def test_random_binaries_long(words):
    note(SEED_NOTE)
    check_binary(words)


@pytest.mark.long
@LONG
@seed(SEED)
@given(texts)
def test_random_text_long(text):
    note(SEED_NOTE)
    check_text(text)


# -- the cases of the issue, by hand -------------------------------------------------------------------------

def test_module_docstring_example_assembles():
    import firmware.asm

    example = firmware.asm.__doc__.split("::")[1].split("\n\n")[1]
    words = assemble(example)
    assert len(words) == 7 and words[-1] == isa.encode(SocOp.END)
    assert assemble(disassemble(words)) == words


def test_invalid_matrix_opcode_names_index_and_field():
    good = isa.encode(SocOp.END)
    bad = isa.encode(SocOp.MATRIX, word=13)
    with pytest.raises(AsmError, match=r"^instruction 2: MATRIX payload: field opcode is 13, not one of NOP=0, "
                                       r"LOAD=1, STORE=2, COMPUTE=3$"):
        disassemble([good, good, bad])


@pytest.mark.parametrize("fields, message", [
    ({"target": 1}, "COMPUTE does not use field target, but it is 0x1"),
    ({"transpose": 1}, "COMPUTE does not use field transpose"),
    ({"bf16": 1}, "COMPUTE does not use field bf16"),
])
def test_fields_compute_does_not_use_are_rejected(fields, message):
    word = mu.encode(mu.Opcode.COMPUTE, m=1, k=1, n=1, **fields)
    with pytest.raises(AsmError, match=f"instruction 0: MATRIX payload: {message}"):
        disassemble([isa.encode(SocOp.MATRIX, word=word)])
    text = "matrix COMPUTE m=1 k=1 n=1 " + " ".join(f"{k}={v}" for k, v in fields.items())
    with pytest.raises(AsmError, match=f"line 1: {message}"):
        assemble(text)


def test_reserved_and_foreign_bits_are_rejected():
    load = mu.encode(mu.Opcode.LOAD, rows=1, cols=16)
    cases = {
        load | 1 << 5 + 4: "reserved header bits",                          # header _reserved
        load | 1 << (48 + 120): "reserved body bits",                      # DMA body _reserved
        load | 1 << 7: "LOAD does not use field accumulate",
        mu.encode(mu.Opcode.NOP) | 1 << 60: "NOP does not use field mem_addr",
        mu.encode(mu.Opcode.LOAD, target=0) | 2 << 4: "field target is 2, not one of ACT=0, WGT=1",
    }
    for word, message in cases.items():
        with pytest.raises(AsmError, match=message):
            disassemble([isa.encode(SocOp.MATRIX, word=word)])
        # the matrix unit's own (non-strict) decode still reads the word: the RTL ignores those bits
        mu.decode(word)
    with pytest.raises(mu.InstructionError, match="field opcode is 13"):
        mu.decode(13)


def test_binary_errors_name_the_instruction():
    words = isa.from_bytes(isa.to_bytes([isa.encode(SocOp.END)] * 3) + bytes(32))
    with pytest.raises(AsmError, match="^instruction 3: illegal op code 0$"):
        disassemble(words)
    with pytest.raises(AsmError, match="^instruction 1: reserved header bits set: 0x100000$"):
        disassemble([isa.encode(SocOp.END), isa.encode(SocOp.END) | 1 << 20])
    with pytest.raises(AsmError, match="^instruction 0: an instruction is an integer, not float$"):
        disassemble([1.0])
    assert issubclass(AsmError, isa.IsaError)


@pytest.mark.parametrize("text, message", [
    ("vector ADD op=3", "line 1: the vector operation is the first operand ('ADD'), not a field op="),
    ("matrix LOAD opcode=1", "line 1: the matrix operation is the first operand ('LOAD'), not a field opcode="),
    ("pim GEMV op=3", "^line 1: unknown PIM fields"),
    ("vload op=3", "^line 1: unknown vload fields ['op']"),           # seed 777
    ("vstore units=1", "^line 1: unknown vstore fields ['units']"),
])
def test_operation_given_twice(text, message):
    """Found by the long fuzzing runs (seeds 12345, 777): these raised TypeError or doubled the line prefix."""
    with pytest.raises(AsmError, match=message.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[")):
        assemble(text)


def test_target_names_and_numbers_assemble_alike():
    a = assemble("matrix LOAD target=WGT rows=1 cols=16")
    b = assemble("matrix LOAD target=1 rows=1 cols=16")
    assert a == b
    assert "target=WGT" in disassemble(a)
