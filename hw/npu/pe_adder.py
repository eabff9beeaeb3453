"""The FP32 adder of a deeply pipelined systolic PE (issue 15): :func:`hw.arith.fp32_add_pipe`'s four parts cut
finer, for 5 to 8 stages.

:func:`hw.arith.fp32_add_pipe` registers at most between its four parts (align-a, align-b, norm, round); on ECP5
the 4 x 4 array of 4-stage PEs closes at 82 MHz, its critical path in align-a (magnitude compare, exponent
differences, then the swap and the clamped shift distance: 12.2 ns, three quarters of it routing). Here the
addition is eight parts, each a few logic levels or one carry chain deep:

  0 "in":     unpack, special cases;
  1 "cmp":    magnitude compare, both exponent differences (carry chains side by side);
  2 "sel":    swap the operands, clamp the shift distance;
  3 "shift":  alignment shift of the smaller significand with its sticky bit;
  4 "add":    significand add / subtract;
  5 "lzc":    leading-zero count, zero test;
  6 "nshift": normalising shift and exponent;
  7 "round":  round to nearest even, overflow / underflow, pack (the carry out of the increment from an AND
              tree, the exponent's tests made for both values of that carry beside the increment).

A pipeline of depth ``stages`` registers after the parts in :data:`PE_ADD_CUTS`. The bits are those of
:func:`hw.arith.fp32_add_align` + :func:`hw.arith.fp32_add_round` (and :func:`hw.arith.fp32_add_pipe`) at every
depth: the same operations in the same order, only cut differently (``tests/test_matrix.py`` holds the array to
the golden GEMM at depths 5 to 8, special operands included).
"""

from amaranth.hdl import Cat, Const, Module, Mux, Signal

from ..arith import (
    QNAN,
    bf16_mul_pipe,
    check_fp_impl,
    fp32_add_pipe,
    fp32_pack,
    fp_mul_unpack,
    fp_unpack,
    leading_zeros,
    stage_reg,
)

__all__ = ["PE_ADD_CUTS", "pe_bf16_mul", "pe_fp32_add"]

PE_ADD_PARTS = ("in", "cmp", "sel", "shift", "add", "lzc", "nshift", "round")
PE_ADD_CUTS = {5: (1, 3, 4, 6), 6: (1, 2, 3, 4, 6), 7: (1, 2, 3, 4, 5, 6), 8: (0, 1, 2, 3, 4, 5, 6)}
"""Parts after which a pipeline of depth 5 to 8 has a register (the last register, after part 7, is the
caller's). Depth 8 registers the operands after part "in" (unpacking only, a few levels), so that the hop from
the PE above (whose partial sum may come from across the die: the PEs sit by their DSP blocks) ends in a
register rather than in the magnitude compare."""


def pe_fp32_add(m: Module, a, b, stages: int, prefix="add", fp_impl="rtl"):
    """FP32 sum ``a + b`` through ``stages - 1`` internal registers (5 to 8 stages with the caller's register
    after the returned value: the sum is combinational from the last internal register, as
    ``fp32_add_pipe(..., out_reg=False)``). ``fp_impl="dpi"``: the behavioural cell of
    :func:`hw.arith.fp32_add_pipe` and the same number of registers."""
    if stages not in PE_ADD_CUTS:
        raise ValueError(f"PE adder pipeline depth must be one of {', '.join(map(str, PE_ADD_CUTS))}, not {stages!r}")
    if check_fp_impl(fp_impl) == "dpi":
        s = fp32_add_pipe(m, a, b, 4, prefix=prefix, fp_impl="dpi", out_reg=False)
        for d in range(stages - 4):
            r = Signal(32, name=f"{prefix}_dpi_d{d}")
            m.d.sync += r.eq(s)
            s = r
        return s
    cuts = PE_ADD_CUTS[stages]

    def boundary(k, values):
        return stage_reg(m, k in cuts, values, f"{prefix}_{PE_ADD_PARTS[k]}")

    def sig(shape, name):
        return Signal(shape, name=f"{prefix}_{name}")

    # Part 0 "in": unpack, special cases.
    sa, ea, fa, za, ia, na = fp_unpack(a)
    sb, eb, fb, zb, ib, nb = fp_unpack(b)
    p = {"a": sig(32, "a"), "b": sig(32, "b"), "za": sig(1, "za"), "zb": sig(1, "zb"), "nan": sig(1, "nan"),
         "inf": sig(1, "inf"), "inf_sign": sig(1, "inf_sign"), "zero_sign": sig(1, "zero_sign")}
    m.d.comb += [
        p["a"].eq(a), p["b"].eq(b), p["za"].eq(za), p["zb"].eq(zb),
        p["nan"].eq(na | nb | (ia & ib & (sa != sb))),
        p["inf"].eq(ia | ib),
        p["inf_sign"].eq(Mux(ia, sa, sb)),
        # -0 only for (-0) + (-0); exact cancellation gives +0.
        p["zero_sign"].eq(za & zb & sa & sb),
    ]
    flags = ("nan", "inf", "inf_sign", "zero_sign")
    st = boundary(0, p)

    # Part 1 "cmp": magnitude compare, both exponent differences.
    a, b, za, zb = st["a"], st["b"], st["za"], st["zb"]
    p = {"swap": sig(1, "swap"), "d_ab": sig(8, "d_ab"), "d_ba": sig(8, "d_ba")}
    m.d.comb += [
        p["swap"].eq(Mux(zb, 0, b[0:31]) > Mux(za, 0, a[0:31])),
        p["d_ab"].eq(a[23:31] - b[23:31]), p["d_ba"].eq(b[23:31] - a[23:31]),
    ]
    st = boundary(1, {**p, **{k: st[k] for k in ("a", "b", "za", "zb", *flags)}})

    # Part 2 "sel": swap so that |x| >= |y|, clamp the shift distance (27 or more leaves only the sticky bit).
    a, b, swap = st["a"], st["b"], st["swap"]
    sa, ea, fa, sb, eb, fb = a[31], a[23:31], a[0:23], b[31], b[23:31], b[0:23]
    sx, ex, fx, zx = Mux(swap, sb, sa), Mux(swap, eb, ea), Mux(swap, fb, fa), Mux(swap, st["zb"], st["za"])
    sy, fy, zy = Mux(swap, sa, sb), Mux(swap, fa, fb), Mux(swap, st["za"], st["zb"])
    d_ab, d_ba = st["d_ab"], st["d_ba"]
    dc_ab, dc_ba = Mux(d_ab > 27, 27, d_ab), Mux(d_ba > 27, 27, d_ba)
    p = {"mx": sig(24, "mx24"), "my": sig(24, "my24"), "dc": sig(5, "dc"), "sub": sig(1, "sub"),
         "exp": sig(8, "ex"), "sign": sig(1, "sx")}
    m.d.comb += [
        p["mx"].eq(Mux(zx, 0, Cat(fx, 1))),
        p["my"].eq(Mux(zy, 0, Cat(fy, 1))),
        p["dc"].eq(Mux(swap, dc_ba, dc_ab)),
        p["sub"].eq(sx ^ sy),
        p["exp"].eq(ex),
        p["sign"].eq(sx),
    ]
    st = boundary(2, {**p, **{k: st[k] for k in flags}})

    # Part 3 "shift": align the smaller significand (guard, round, sticky: 27 bits).
    my27 = Cat(Const(0, 3), st["my"])
    shifted = sig(27, "shifted")
    m.d.comb += shifted.eq(my27 >> st["dc"])
    lost = sig(1, "lost")             # a one shifted out below the sticky position
    m.d.comb += lost.eq((my27 & ~(Const(0x7FFFFFF, 27) << st["dc"])[0:27]).any())
    my_al = sig(27, "my_al")
    m.d.comb += my_al.eq(Cat(shifted[0] | lost, shifted[1:27]))
    st = boundary(3, {"my_al": my_al, **{k: st[k] for k in ("mx", "sub", "exp", "sign", *flags)}})

    # Part 4 "add": add or subtract the significands.
    mx27 = Cat(Const(0, 3), st["mx"])
    total = sig(28, "sum")
    m.d.comb += total.eq(Mux(st["sub"], mx27 - st["my_al"], mx27 + st["my_al"]))
    st = boundary(4, {"total": total, **{k: st[k] for k in ("exp", "sign", *flags)}})

    # Part 5 "lzc": leading-zero count of the low 27 bits (padded to 32), zero test.
    total = st["total"]
    lz = sig(5, "lz")
    m.d.comb += lz.eq(leading_zeros(Cat(Const(0, 5), total[0:27]))[1])
    is_zero = sig(1, "is_zero")
    m.d.comb += is_zero.eq(total == 0)
    st = boundary(5, {"total": total, "lz": lz, "is_zero": is_zero, **{k: st[k] for k in ("exp", "sign", *flags)}})

    # Part 6 "nshift": normalise.
    total, lz = st["total"], st["lz"]
    norm = sig(27, "norm")
    nexp = sig(range(-32, 512), "nexp")
    with m.If(total[27]):
        m.d.comb += [norm.eq(Cat(total[1] | total[0], total[2:28])), nexp.eq(st["exp"] + 1)]
    with m.Else():
        m.d.comb += [norm.eq((total[0:27] << lz)[0:27]), nexp.eq(st["exp"] - lz)]
    st = boundary(6, {"norm": norm, "nexp": nexp, **{k: st[k] for k in ("is_zero", "sign", *flags)}})

    # Part 7 "round": round to nearest even and pack. The increment carries out of the 24 kept bits only when
    # they are all ones and it rounds up (then the 23 fraction bits wrap to zero, as the packed fraction must
    # be, and the exponent is one more): the exponent's tests are made for both values of that carry.
    norm, nexp = st["norm"], st["nexp"]
    round_up = norm[2] & (norm[1] | norm[0] | norm[3])
    carry = sig(1, "rcarry")
    m.d.comb += carry.eq(round_up & norm[3:27].all())
    frac = sig(23, "rfrac")
    m.d.comb += frac.eq(norm[3:26] + round_up)
    exp_inc = sig(8, "rexp_inc")
    m.d.comb += exp_inc.eq(nexp[0:8] + 1)
    ovf = Mux(carry, nexp >= 254, nexp >= 255)
    unf = Mux(carry, nexp <= -1, nexp <= 0)
    packed = sig(32, "packed")
    return fp32_pack(m, packed, st, ovf, unf, frac, Mux(carry, exp_inc, nexp[0:8]))


def pe_bf16_mul(m: Module, a, b, prefix="mul", fp_impl="rtl"):
    """BF16 x BF16 -> FP32 product in 3 stages without a DSP block: the 8 x 8 significand product as a sum of
    partial products in LUT adders (pairs in stage 1, the rest in stage 2, beside the exponent's range tests),
    normalise, select and pack in stage 3; the bits of :func:`hw.arith.bf16_mul_pipe`. Returns the registered product (``latency == 3``).

    On ECP5 the DSP blocks sit in a few rows of the die, so PEs built around them are pulled apart and the
    partial sums cross the die between two rows of the array (``array4x4_p8``: 9 of 11 ns routing); without them
    the array can be placed as one block. ``fp_impl="dpi"``: :func:`hw.arith.bf16_mul_pipe`'s cell and one more
    register."""
    if check_fp_impl(fp_impl) == "dpi":
        p = bf16_mul_pipe(m, a, b, 2, prefix=prefix, fp_impl="dpi")
        r = Signal(32, name=f"{prefix}_p3")
        m.d.sync += r.eq(p)
        return r
    op = fp_mul_unpack(a, b, 7)
    x, y = Cat(op["fa"], 1), Cat(op["fb"], 1)
    pp = [Mux(y[k], x, 0) for k in range(8)]
    flags = {"exp": Signal(range(-256, 512), name=f"{prefix}_exp0"), "sign": Signal(name=f"{prefix}_sign"),
             "nan": Signal(name=f"{prefix}_nan"), "inf": Signal(name=f"{prefix}_inf"),
             "zero": Signal(name=f"{prefix}_zero")}
    m.d.sync += [
        flags["exp"].eq(op["ea"] + op["eb"] - 127),
        *(flags[k].eq(op[k]) for k in ("sign", "nan", "inf", "zero")),
    ]
    # Stage 1: pairs of partial products (x * y[2k : 2k + 2]), 10 bits each.
    s1 = [Signal(10, name=f"{prefix}_pp{k}") for k in range(4)]
    m.d.sync += [s1[k].eq(pp[2 * k] + (pp[2 * k + 1] << 1)) for k in range(4)]
    # Stage 2: the rest of the sum, 1.fa x 1.fb in [1, 4); beside it, the exponent's overflow / underflow tests
    # for both values of the normalising carry (prod[15]), which stage 3 then only selects.
    f2 = {k: Signal.like(flags[k], name=f"{prefix}_{k}2") for k in ("sign", "nan", "inf", "zero")}
    m.d.sync += [f2[k].eq(flags[k]) for k in f2]
    e0 = flags["exp"]
    ex = {"exp": Signal(8, name=f"{prefix}_exp_0"), "exp_inc": Signal(8, name=f"{prefix}_exp_1"),
          "ovf0": Signal(name=f"{prefix}_ovf0"), "ovf1": Signal(name=f"{prefix}_ovf1"),
          "unf0": Signal(name=f"{prefix}_unf0"), "unf1": Signal(name=f"{prefix}_unf1")}
    m.d.sync += [ex["exp"].eq(e0[0:8]), ex["exp_inc"].eq(e0[0:8] + 1),
                 ex["ovf0"].eq(e0 >= 255), ex["ovf1"].eq(e0 >= 254),
                 ex["unf0"].eq(e0 <= 0), ex["unf1"].eq(e0 <= -1)]
    prod = Signal(16, name=f"{prefix}_prod")
    t0, t1 = s1[0] + (s1[1] << 2), s1[2] + (s1[3] << 2)
    m.d.sync += prod.eq(t0 + (t1 << 4))
    # Stage 3: normalise and pack (the bits of bf16_mul_pipe's second stage, exponent exp0 + prod[15]).
    c = prod[15]
    frac = Mux(c, Cat(Const(0, 8), prod[0:15]), Cat(Const(0, 9), prod[0:14]))
    result = Signal(32, name=f"{prefix}_p")
    with m.If(f2["nan"]):
        m.d.sync += result.eq(QNAN)
    with m.Elif(f2["inf"] | Mux(c, ex["ovf1"], ex["ovf0"])):
        m.d.sync += result.eq(Cat(Const(0, 23), Const(0xFF, 8), f2["sign"]))
    with m.Elif(f2["zero"] | Mux(c, ex["unf1"], ex["unf0"])):
        m.d.sync += result.eq(Cat(Const(0, 31), f2["sign"]))
    with m.Else():
        m.d.sync += result.eq(Cat(frac, Mux(c, ex["exp_inc"], ex["exp"]), f2["sign"]))
    return result
