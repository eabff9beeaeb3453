"""BF16/FP32 arithmetic units shared by the PIM processing units and the NPU.

Numerics (the contract of ARCHITECTURE.md section 4, decided here once):

* BF16 x BF16 products are exact in FP32 (8-bit x 8-bit significands).
* FP32 additions round to nearest, ties to even.
* **Subnormals are flushed to zero** on every input and every output; the
  flushed zero keeps the sign of the value it replaces. (Accelerator practice:
  the PIM processing units and most NPUs do the same; it keeps the adder
  small.) A product or sum whose exponent underflows becomes a signed zero.
* **Overflow** gives infinity of the right sign.
* **NaN**: any NaN input, ``Inf - Inf`` or ``0 x Inf`` gives the canonical
  quiet NaN ``0x7FC00000``.
* **Exact cancellation** ``x + (-x)`` gives ``+0``; ``(-0) + (-0)`` gives ``-0``.

``hw/spec/fp.py`` is the independent numpy model of the same rules. The PIM processing unit's datapath built
from these pieces (multipliers, adder tree, accumulator) is :class:`hw.mac_unit.MacUnit`.

Every block exposes its ``latency`` in cycles; data enters on one cycle and the
result is on the output ``latency`` cycles later. The blocks have no stall:
the surrounding control carries a valid bit alongside.
"""


from pathlib import Path

from amaranth.hdl import Cat, Const, Instance, Module, Mux, Signal
from amaranth.lib import data, wiring
from amaranth.lib.wiring import In, Out

from .spec.pipeline import combine_schedule

__all__ = [
    "QNAN",
    "FP_IMPLS",
    "FP_DPI_SOURCES",
    "check_fp_impl",
    "bf16_mul",
    "fp32_add_align",
    "fp32_add_round",
    "fp32_to_bf16",
    "fp32_add_pipe",
    "fp32_pack",
    "fp_unpack",
    "fp_mul_unpack",
    "stage_reg",
    "bf16_mul_pipe",
    "combine_schedule",
    "leading_zeros",
    "BF16Multiplier",
    "FP32Adder",
    "AdderTree",
    "ArithArray",
]

QNAN = 0x7FC00000

# How the FP adder and multiplier cells are built (see :func:`check_fp_impl`).
FP_IMPLS = ("rtl", "dpi")
_VERILOG = Path(__file__).resolve().parent / "verilog"
#: Sources a Verilator build needs when any block was built with ``fp_impl="dpi"``.
FP_DPI_SOURCES = (_VERILOG / "fp_dpi.v", _VERILOG / "fp_dpi.cpp")


def check_fp_impl(fp_impl) -> str:
    """Validate ``fp_impl``: ``"rtl"`` (gates, the default, synthesisable) or ``"dpi"``.

    ``"dpi"`` replaces the combinational logic of every FP32 adder and BF16
    multiplier cell by a call into ``hw/verilog/fp_dpi.cpp`` (the host's IEEE
    arithmetic with the same flush-to-zero and NaN rules), for long Verilator
    runs: every pipeline register stays where it is, so latencies, cycle
    counts and results are the same bit for bit (tests/test_arith.py and the
    SoC tests hold them equal). Verilator only (Icarus has no DPI-C), never
    for synthesis. Why: the bit-level adders of the 256 processing elements
    and 32 PIM units were about 60 % of the SoC simulation's time.
    """
    if fp_impl not in FP_IMPLS:
        raise ValueError(f"FP implementation must be one of {', '.join(FP_IMPLS)}, not {fp_impl!r}")
    return fp_impl


def _dpi_cell(m: Module, cell: str, a, b, width: int, prefix: str):
    y = Signal(width, name=f"{prefix}_dpi")
    m.submodules[f"{prefix}_dpi"] = Instance(cell, i_a=a, i_b=b, o_y=y)
    return y


def _check_int(name, value, minimum):
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise ValueError(f"{name} must be an integer of at least {minimum}, not {value!r}")


def fp_unpack(x, frac_bits: int = 23):
    """Fields and class of an FP32 (``frac_bits = 23``) or BF16 (``frac_bits = 7``) value, as expressions:
    ``(sign, exp, frac, zero, inf, nan)``; a zero exponent is a zero (subnormals flush, DAZ)."""
    e, f, s = x[frac_bits:frac_bits + 8], x[0:frac_bits], x[frac_bits + 8]
    return s, e, f, e == 0, (e == 0xFF) & (f == 0), (e == 0xFF) & (f != 0)


def fp_mul_unpack(a, b, frac_bits: int):
    """Both operands of a product ``a x b`` unpacked (:func:`fp_unpack`) and the product's special cases: a dict
    of ``ea``, ``eb``, ``fa``, ``fb`` and the expressions ``sign``, ``nan`` (a NaN operand, or infinity times
    zero), ``inf`` (an infinite operand) and ``zero`` (a zero operand)."""
    sa, ea, fa, za, ia, na = fp_unpack(a, frac_bits)
    sb, eb, fb, zb, ib, nb = fp_unpack(b, frac_bits)
    return dict(ea=ea, eb=eb, fa=fa, fb=fb, sign=sa ^ sb, nan=na | nb | (ia & zb) | (ib & za), inf=ia | ib,
                zero=za | zb)


def bf16_mul(m: Module, dom, a, b, prefix="mul", fp_impl="rtl", reg_clock=None):
    """Build a BF16 x BF16 -> FP32 multiplier; the result is assigned in domain ``dom``.

    Returns the 32-bit result signal (registered when ``dom`` is a sync domain).
    ``fp_impl="dpi"``: a behavioural cell instead of gates (:func:`check_fp_impl`); with ``reg_clock``
    (the clock of ``dom``, a reset-less domain) the cell is a register that calls the model only on that
    clock's edges, not whenever its operands change.
    """
    if check_fp_impl(fp_impl) == "dpi":
        result = Signal(32, name=f"{prefix}_p")
        if reg_clock is not None:
            m.submodules[f"{prefix}_dpi"] = Instance("ianus_bf16_mul_dpi_reg", i_clk=reg_clock, i_a=a, i_b=b,
                                                     o_y=result)
        else:
            dom += result.eq(_dpi_cell(m, "ianus_bf16_mul_dpi", a, b, 32, prefix))
        return result
    op = fp_mul_unpack(a, b, 7)
    ea, eb, fa, fb, sign = op["ea"], op["eb"], op["fa"], op["fb"], op["sign"]

    prod = Signal(16, name=f"{prefix}_prod")
    m.d.comb += prod.eq(Cat(fa, 1) * Cat(fb, 1))    # 1.fa x 1.fb in [1, 4)
    # Biased exponent of the product before normalisation, as a signed number.
    exp = Signal(range(-256, 512), name=f"{prefix}_exp")
    m.d.comb += exp.eq(ea + eb - 127 + prod[15])
    frac = Signal(23, name=f"{prefix}_frac")
    m.d.comb += frac.eq(Mux(prod[15], Cat(Const(0, 8), prod[0:15]), Cat(Const(0, 9), prod[0:14])))

    result = Signal(32, name=f"{prefix}_p")
    with m.If(op["nan"]):
        dom += result.eq(QNAN)
    with m.Elif(op["inf"] | (exp >= 255)):
        dom += result.eq(Cat(Const(0, 23), Const(0xFF, 8), sign))
    with m.Elif(op["zero"] | (exp <= 0)):
        dom += result.eq(Cat(Const(0, 31), sign))
    with m.Else():
        dom += result.eq(Cat(frac, exp[0:8], sign))
    return result


def fp32_add_align(m: Module, dom, a, b, prefix="add", fp_impl="rtl"):
    """First half of the FP32 adder: special cases, swap, align, add/subtract.

    Assigns its outputs in ``dom`` (a pipeline register when it is a sync
    domain) and returns them as a dict for :func:`fp32_add_round`. With
    ``fp_impl="dpi"`` the whole sum is computed here by a behavioural cell and
    carried through the same register (:func:`check_fp_impl`).
    """
    if check_fp_impl(fp_impl) == "dpi":
        total = Signal(32, name=f"{prefix}_dpi_sum")
        dom += total.eq(_dpi_cell(m, "ianus_fp32_add_dpi", a, b, 32, prefix))
        return dict(dpi_sum=total)
    sa, ea, fa, za, ia, na = fp_unpack(a)
    sb, eb, fb, zb, ib, nb = fp_unpack(b)
    mag_a = Mux(za, 0, a[0:31])
    mag_b = Mux(zb, 0, b[0:31])
    swap = Signal(name=f"{prefix}_swap")
    m.d.comb += swap.eq(mag_b > mag_a)

    sx, ex, fx, zx = Mux(swap, sb, sa), Mux(swap, eb, ea), Mux(swap, fb, fa), Mux(swap, zb, za)
    sy, ey, fy, zy = Mux(swap, sa, sb), Mux(swap, ea, eb), Mux(swap, fa, fb), Mux(swap, za, zb)

    # Significands with three extra low bits (guard, round, sticky): 27 bits.
    mx = Signal(27, name=f"{prefix}_mx")
    my = Signal(27, name=f"{prefix}_my")
    m.d.comb += [
        mx.eq(Mux(zx, 0, Cat(Const(0, 3), fx, 1))),
        my.eq(Mux(zy, 0, Cat(Const(0, 3), fy, 1))),
    ]
    d = Signal(8, name=f"{prefix}_d")
    m.d.comb += d.eq(ex - ey)
    dc = Signal(5, name=f"{prefix}_dc")      # shift distance, clamped: 27 or more leaves only sticky
    m.d.comb += dc.eq(Mux(d > 27, 27, d))
    shifted = Signal(27, name=f"{prefix}_shifted")
    m.d.comb += shifted.eq(my >> dc)
    lost = Signal(name=f"{prefix}_lost")
    m.d.comb += lost.eq((shifted << dc)[0:27] != my)
    my_al = Cat(shifted[0] | lost, shifted[1:27])

    sub = sx ^ sy
    total = Signal(28, name=f"{prefix}_sum")
    exp = Signal(8, name=f"{prefix}_ex")
    sign = Signal(name=f"{prefix}_sx")
    nan = Signal(name=f"{prefix}_nan")
    inf = Signal(name=f"{prefix}_inf")
    inf_sign = Signal(name=f"{prefix}_inf_sign")
    zero_sign = Signal(name=f"{prefix}_zero_sign")
    dom += [
        total.eq(Mux(sub, mx - my_al, mx + my_al)),
        exp.eq(ex),
        sign.eq(sx),
        nan.eq(na | nb | (ia & ib & (sa != sb))),
        inf.eq(ia | ib),
        inf_sign.eq(Mux(ia, sa, sb)),
        # Sign of a zero result: -0 only for (-0) + (-0); exact cancellation gives +0.
        zero_sign.eq(zx & zy & sa & sb),
    ]
    return dict(total=total, exp=exp, sign=sign, nan=nan, inf=inf, inf_sign=inf_sign,
                zero_sign=zero_sign)


def leading_zeros(bits):
    """Leading-zero count of ``bits`` (width a power of two) as a log-depth mux tree.

    Returns ``(all_zero, count)``; ``count`` is meaningful when ``all_zero`` is 0.
    """
    n = len(bits)
    if n & (n - 1) or n < 2:
        raise ValueError(f"leading_zeros width must be a power of two of at least 2, not {n}")
    if n == 2:
        return ~(bits[1] | bits[0]), ~bits[1]
    zh, ch = leading_zeros(bits[n // 2:])
    zl, cl = leading_zeros(bits[:n // 2])
    return zh & zl, Mux(zh, Cat(cl, 1), Cat(ch, 0))


def fp32_add_round(m: Module, dom, st: dict, prefix="add"):
    """Second half of the FP32 adder: normalise, round to nearest even, pack."""
    if "dpi_sum" in st:                  # fp_impl="dpi": the sum is complete, keep the register
        result = Signal(32, name=f"{prefix}_s")
        dom += result.eq(st["dpi_sum"])
        return result
    total, exp = st["total"], st["exp"]
    # Leading-zero count of the low 27 bits (bit 26 is the hidden-one position),
    # padded at the bottom to 32 bits for a log-depth count. An all-zero sum is
    # handled separately below, so the count's value for it does not matter.
    lz = Signal(5, name=f"{prefix}_lz")
    m.d.comb += lz.eq(leading_zeros(Cat(Const(0, 5), total[0:27]))[1])

    norm = Signal(27, name=f"{prefix}_norm")
    nexp = Signal(range(-32, 512), name=f"{prefix}_nexp")
    with m.If(total[27]):
        m.d.comb += [norm.eq(Cat(total[1] | total[0], total[2:28])), nexp.eq(exp + 1)]
    with m.Else():
        m.d.comb += [norm.eq((total[0:27] << lz)[0:27]), nexp.eq(exp - lz)]

    lsb, guard, rest = norm[3], norm[2], norm[1] | norm[0]
    round_up = guard & (rest | lsb)
    rounded = Signal(25, name=f"{prefix}_rounded")
    m.d.comb += rounded.eq(norm[3:27] + round_up)
    rexp = Signal(range(-32, 512), name=f"{prefix}_rexp")
    m.d.comb += rexp.eq(nexp + rounded[24])
    frac = Mux(rounded[24], 0, rounded[0:23])

    result = Signal(32, name=f"{prefix}_s")
    return fp32_pack(m, result, dict(st, is_zero=total == 0), rexp >= 255, rexp <= 0, frac, rexp[0:8], dom=dom)


def fp32_to_bf16(x):
    """Combinational FP32 -> BF16 rounding (nearest even), with the module's FTZ/NaN rules.

    Overflow rounds to infinity; a NaN becomes the canonical ``0x7FC0``; a
    zero or subnormal input gives a signed zero.
    """
    e = x[23:31]
    nan = (e == 0xFF) & (x[0:23] != 0)
    rounded = (x + 0x7FFF + x[16])[16:32]
    return Mux(nan, 0x7FC0, Mux(e == 0, Cat(Const(0, 15), x[31]), rounded))


# -- pipelined units (issue 15: timing closure) ------------------------------------------
#
# The FP32 addition in four parts, each a few logic levels deep on an FPGA (balanced for the ECP5, issue 15;
# each part's function says what it holds):
#   0 "align-a": unpack, special cases, magnitude compare, exponent differences, both operands aligned
#                (alignment shift with sticky bit, each as if it were the smaller one);
#   1 "align-b": swap (the larger significand and the aligned smaller one), significand add/subtract;
#   2 "norm":    leading-zero count, normalising shift by its multiple of 8, rounding (round bit, increment,
#                carry out) of the sums that round (a normalising shift of at most one place);
#   3 "round":   the rest of the normalising shift, exponent increment, overflow / underflow, pack.
# A pipeline of depth ``stages`` registers the result of part 3 and, in between, the parts listed here
# (register after part k). Every depth computes the same bits as fp32_add_align + fp32_add_round.
ADD_CUTS = {1: (), 2: (1,), 3: (0, 1), 4: (0, 1, 2)}
ADD_PART_NAMES = ("align_a", "align_b", "norm", "round")
MAX_ADD_STAGES = 4


def _check_stages(what, value, allowed):
    if not isinstance(value, int) or isinstance(value, bool) or value not in allowed:
        raise ValueError(f"{what} must be one of {', '.join(map(str, allowed))}, not {value!r}")
    return value


def stage_reg(m: Module, registered: bool, values: dict, prefix: str) -> dict:
    """Carry ``values`` across a pipeline boundary: a register each when ``registered``, else wires."""
    if not registered:
        return values
    out = {}
    for key, v in values.items():
        r = Signal(v.shape(), name=f"{prefix}_{key}")
        m.d.sync += r.eq(v)
        out[key] = r
    return out


def fp32_add_pipe(m: Module, a, b, stages: int, prefix="add", fp_impl="rtl", out_reg=True):
    """FP32 adder of pipeline depth ``stages`` (1..4, :data:`ADD_CUTS`); returns the 32-bit sum.

    ``latency == stages``: the sum is on the returned signal ``stages`` cycles after ``a``, ``b``.
    ``out_reg=False`` leaves the last register out (the sum is combinational from the last internal
    register, ``stages - 1`` cycles after the operands) so that the caller can make its own register
    the last stage (:class:`MacUnit`'s partial sums). The bits are those of :func:`fp32_add_align` +
    :func:`fp32_add_round` at every depth. ``fp_impl="dpi"``: the behavioural cell computes the sum in
    part 0 and the same registers carry it (:func:`check_fp_impl`).
    """
    _check_stages("FP32 adder pipeline depth", stages, tuple(range(1, MAX_ADD_STAGES + 1)))
    cuts = ADD_CUTS[stages]

    def boundary(k, values):
        return stage_reg(m, k in cuts, values, f"{prefix}_{ADD_PART_NAMES[k]}")

    def result(value):
        s = Signal(32, name=f"{prefix}_s")
        dom = m.d.sync if out_reg else m.d.comb
        dom += s.eq(value)
        return s

    if check_fp_impl(fp_impl) == "dpi":
        st = {"sum": _dpi_cell(m, "ianus_fp32_add_dpi", a, b, 32, prefix)}
        for k in range(3):
            st = boundary(k, st)
        return result(st["sum"])

    st = boundary(0, _add_part0(m, a, b, prefix))
    st = boundary(1, _add_part1(m, st, prefix))
    st = boundary(2, _add_part2(m, st, prefix))
    return result(_add_part3(m, st, prefix))


def _add_part0(m: Module, a, b, prefix):
    """Part 0 of :func:`fp32_add_pipe`: unpack, special cases, magnitude compare (swap so that |x| >= |y|),
    exponent differences, both operands aligned."""
    swap = Signal(name=f"{prefix}_swap")
    m.d.comb += swap.eq(b[0:31] > a[0:31])
    sa, ea, fa, za, ia, na = fp_unpack(a)
    sb, eb, fb, zb, ib, nb = fp_unpack(b)
    # swap: |b| > |a|, on the raw bits. A flushed (zero-exponent) operand compares as zero against a
    # normal one either way; when both are flushed the order does not matter (the sum is a zero, signed by
    # zero_sign, and nothing else depends on it). Only the significands and the sign wait for this compare:
    # the larger exponent is chosen by the exponents alone (equal exponents give the same either way), the
    # operation by the signs.
    ma = Signal(24, name=f"{prefix}_ma")
    mb = Signal(24, name=f"{prefix}_mb")
    m.d.comb += [ma.eq(Mux(za, 0, Cat(fa, 1))), mb.eq(Mux(zb, 0, Cat(fb, 1)))]
    # Both exponent differences, beside the magnitude compare rather than after it.
    d_ab, d_ba = Signal(9, name=f"{prefix}_d_ab"), Signal(9, name=f"{prefix}_d_ba")
    m.d.comb += [d_ab.eq(ea - eb), d_ba.eq(eb - ea)]
    b_exp_larger = d_ab[8]                         # ea - eb borrows
    # Both operands aligned, each by the distance it would have as the smaller one (when |b| > |a| the
    # exponents give eb >= ea, so the distance chosen by the exponents is eb - ea, and the other way round),
    # beside the compare: the swap is applied in part 1, by a register. Significands with three extra low
    # bits (guard, round, sticky: 27 bits); the shift in two steps (by the multiple of 8 of the distance,
    # then the rest), each keeping the ones it shifts out as a sticky bit (the union is what one shift by the
    # whole distance loses). A distance of 27 to 31 shifts every bit out (only the sticky bit is left), as
    # does one of 32 or more (``big``), chosen after the shift rather than clamping the distance before it.
    def align(mag, d, name):
        m27 = Cat(Const(0, 3), mag)
        coarse = Signal(27, name=f"{prefix}_{name}_c")
        lost_c = Mux(d[4], Mux(d[3], mag[0:21].any(), mag[0:13].any()), Mux(d[3], mag[0:5].any(), 0))
        m.d.comb += coarse.eq(m27 >> Cat(Const(0, 3), d[3:5]))
        shifted = Signal(27, name=f"{prefix}_{name}_shifted")
        m.d.comb += shifted.eq(coarse >> d[0:3])
        lost = Signal(name=f"{prefix}_{name}_lost")
        m.d.comb += lost.eq(lost_c | (coarse[0:7] & ~(Const(0x7F, 7) << d[0:3])[0:7]).any())
        big = d[5:8].any()
        return Mux(big, Cat(mag.any(), Const(0, 26)), Cat(shifted[0] | lost, shifted[1:27]))
    p0 = {
        "ma": Signal(24, name=f"{prefix}_ma24"), "mb": Signal(24, name=f"{prefix}_mb24"),
        "a_al": Signal(27, name=f"{prefix}_a_al"), "b_al": Signal(27, name=f"{prefix}_b_al"),
        "swap": Signal(name=f"{prefix}_swap_r"), "sub": Signal(name=f"{prefix}_sub"),
        "exp": Signal(8, name=f"{prefix}_ex"), "sign": Signal(name=f"{prefix}_sx"),
        "nan": Signal(name=f"{prefix}_nan"), "inf": Signal(name=f"{prefix}_inf"),
        "inf_sign": Signal(name=f"{prefix}_inf_sign"), "zero_sign": Signal(name=f"{prefix}_zero_sign"),
    }
    m.d.comb += [
        p0["ma"].eq(ma),
        p0["mb"].eq(mb),
        p0["a_al"].eq(align(ma, d_ba, "a")),
        p0["b_al"].eq(align(mb, d_ab, "b")),
        p0["swap"].eq(swap),
        p0["sub"].eq(sa ^ sb),
        p0["exp"].eq(Mux(b_exp_larger, eb, ea)),
        p0["sign"].eq(Mux(swap, sb, sa)),
        p0["nan"].eq(na | nb | (ia & ib & (sa != sb))),
        p0["inf"].eq(ia | ib),
        p0["inf_sign"].eq(Mux(ia, sa, sb)),
        # -0 only for (-0) + (-0); exact cancellation gives +0.
        p0["zero_sign"].eq(za & zb & sa & sb),
    ]
    return p0


def _add_part1(m: Module, st: dict, prefix):
    """Part 1: the larger significand and the aligned smaller one (part 0's swap), add or subtract."""
    swap = st["swap"]
    mx27 = Cat(Const(0, 3), Mux(swap, st["mb"], st["ma"]))
    my_al = Signal(27, name=f"{prefix}_my_al")
    m.d.comb += my_al.eq(Mux(swap, st["a_al"], st["b_al"]))
    total = Signal(28, name=f"{prefix}_sum")
    m.d.comb += total.eq(Mux(st["sub"], mx27 - my_al, mx27 + my_al))
    return {"total": total, **{k: st[k] for k in ("exp", "sign", "nan", "inf", "inf_sign", "zero_sign")}}


def _add_part2(m: Module, st: dict, prefix):
    """Part 2: normalise (leading-zero count of the low 27 bits, padded to 32; a zero sum is handled in part 3),
    the shift by the count's multiple of 8 here, the rest of it in part 3; round to nearest even."""
    total = st["total"]
    lz = Signal(5, name=f"{prefix}_lz")
    m.d.comb += lz.eq(leading_zeros(Cat(Const(0, 5), total[0:27]))[1])
    norm = Signal(27, name=f"{prefix}_norm_c")
    fine = Signal(3, name=f"{prefix}_lz_fine")
    nexp = Signal(range(-32, 512), name=f"{prefix}_nexp")
    with m.If(total[27]):
        m.d.comb += [norm.eq(Cat(total[1] | total[0], total[2:28])), nexp.eq(st["exp"] + 1)]
    with m.Else():
        m.d.comb += [norm.eq((total[0:27] << Cat(Const(0, 3), lz[3:5]))[0:27]), fine.eq(lz[0:3]),
                     nexp.eq(st["exp"] - lz)]
    is_zero = Signal(name=f"{prefix}_is_zero")
    m.d.comb += is_zero.eq(total == 0)
    # Rounding, here beside the leading-zero count, from the sum's bits: only a normalising shift of at
    # most one place (``small``: a carry out, or the top one at bit 26 or 25) may round; a shift of two or
    # more places comes from a cancellation of operands at most one place apart, exact with zero low bits.
    # The 24 kept bits, the guard bit and the bits below it of the normalised value, for each such shift:
    small = Signal(name=f"{prefix}_small_shift")
    m.d.comb += small.eq(total[25:28].any())
    kept = Signal(24, name=f"{prefix}_kept")
    guard, rest = Signal(name=f"{prefix}_guard"), Signal(name=f"{prefix}_rest")
    with m.If(total[27]):
        m.d.comb += [kept.eq(total[4:28]), guard.eq(total[3]), rest.eq(total[0:3].any())]
    with m.Elif(total[26]):
        m.d.comb += [kept.eq(total[3:27]), guard.eq(total[2]), rest.eq(total[0:2].any())]
    with m.Else():
        m.d.comb += [kept.eq(total[2:26]), guard.eq(total[1]), rest.eq(total[0])]
    round_up = Signal(name=f"{prefix}_round_up")
    m.d.comb += round_up.eq(small & guard & (rest | kept[0]))
    # The carry out of the increment (all 24 kept bits ones) by an AND tree; the 23 low bits of the
    # increment are the fraction either way (all zeros when it carries out).
    carry = Signal(name=f"{prefix}_rcarry")
    m.d.comb += carry.eq(round_up & kept.all())
    frac_r = Signal(23, name=f"{prefix}_rfrac")
    m.d.comb += frac_r.eq(kept[0:23] + round_up)
    return {"norm": norm, "fine": fine, "small": small, "frac_r": frac_r, "carry": carry, "nexp": nexp,
            "is_zero": is_zero, **{k: st[k] for k in ("sign", "nan", "inf", "inf_sign", "zero_sign")}}


def _add_part3(m: Module, st: dict, prefix):
    """Part 3: the rest of the normalising shift (a fraction that was not rounded), the rounded exponent
    and pack. The exponent's overflow / underflow tests and its increment are made on ``nexp`` for both
    values of the rounding carry (from part 2), which then only selects."""
    nexp, small, carry = st["nexp"], st["small"], st["carry"]
    norm = Signal(27, name=f"{prefix}_norm")
    m.d.comb += norm.eq((st["norm"] << st["fine"])[0:27])
    frac = Mux(small, st["frac_r"], norm[3:26])       # no rounding after a longer shift
    exp_inc = Signal(8, name=f"{prefix}_rexp_inc")
    m.d.comb += exp_inc.eq(nexp[0:8] + 1)
    # nexp (10 bits, two's complement) >= 254 / >= 255 / <= -1 / <= 0, as gates on its bits.
    neg, hi = nexp[9], nexp[8]
    ovf = Mux(carry, ~neg & (hi | nexp[1:8].all()), ~neg & (hi | nexp[0:8].all()))
    unf = Mux(carry, neg, neg | ~nexp[0:9].any())
    packed = Signal(32, name=f"{prefix}_packed")
    return fp32_pack(m, packed, st, ovf, unf, frac, Mux(carry, exp_inc, nexp[0:8]))


def fp32_pack(m: Module, packed, st: dict, ovf, unf, frac, exp, dom=None):
    """Drive ``packed`` (in ``dom``, by default ``m.d.comb``) with an FP32 adder's result: NaN, infinity
    (``st["inf_sign"]``), an exact zero (``st["zero_sign"]``), overflow to infinity, underflow flushed to zero
    (both with ``st["sign"]``), else ``sign | exp | frac``; shared by :func:`fp32_add_round`,
    :func:`fp32_add_pipe` and :func:`hw.npu.pe_adder.pe_fp32_add`. Returns ``packed``."""
    if dom is None:
        dom = m.d.comb
    with m.If(st["nan"]):
        dom += packed.eq(QNAN)
    with m.Elif(st["inf"]):
        dom += packed.eq(Cat(Const(0, 23), Const(0xFF, 8), st["inf_sign"]))
    with m.Elif(st["is_zero"]):
        dom += packed.eq(Cat(Const(0, 31), st["zero_sign"]))
    with m.Elif(ovf):
        dom += packed.eq(Cat(Const(0, 23), Const(0xFF, 8), st["sign"]))
    with m.Elif(unf):
        dom += packed.eq(Cat(Const(0, 31), st["sign"]))      # flush to zero
    with m.Else():
        dom += packed.eq(Cat(frac, exp, st["sign"]))
    return packed


def bf16_mul_pipe(m: Module, a, b, stages: int, prefix="mul", fp_impl="rtl", domain="sync"):
    """BF16 x BF16 -> FP32 multiplier of pipeline depth ``stages`` (1 or 2); returns the registered product.

    ``stages=1`` is :func:`bf16_mul` in ``sync``. ``stages=2`` registers the 8 x 8 significand product
    (a DSP block's output register on an FPGA), the exponent sum and the special-case flags, then
    normalises and packs in the second stage; the bits are the same. The registers are in ``domain``.
    """
    _check_stages("BF16 multiplier pipeline depth", stages, (1, 2))
    dom = m.d[domain]
    if stages == 1:
        return bf16_mul(m, dom, a, b, prefix=prefix, fp_impl=fp_impl)
    if check_fp_impl(fp_impl) == "dpi":
        p1 = Signal(32, name=f"{prefix}_p1")
        dom += p1.eq(_dpi_cell(m, "ianus_bf16_mul_dpi", a, b, 32, prefix))
        result = Signal(32, name=f"{prefix}_p")
        dom += result.eq(p1)
        return result
    op = fp_mul_unpack(a, b, 7)
    s1 = {
        "prod": Signal(16, name=f"{prefix}_prod"), "exp": Signal(range(-256, 512), name=f"{prefix}_exp0"),
        "sign": Signal(name=f"{prefix}_sign"), "nan": Signal(name=f"{prefix}_nan"),
        "inf": Signal(name=f"{prefix}_inf"), "zero": Signal(name=f"{prefix}_zero"),
    }
    dom += [
        s1["prod"].eq(Cat(op["fa"], 1) * Cat(op["fb"], 1)),
        s1["exp"].eq(op["ea"] + op["eb"] - 127),
        s1["sign"].eq(op["sign"]),
        s1["nan"].eq(op["nan"]),
        s1["inf"].eq(op["inf"]),
        s1["zero"].eq(op["zero"]),
    ]
    prod = s1["prod"]
    exp = Signal(range(-256, 512), name=f"{prefix}_exp")
    m.d.comb += exp.eq(s1["exp"] + prod[15])
    frac = Mux(prod[15], Cat(Const(0, 8), prod[0:15]), Cat(Const(0, 9), prod[0:14]))
    result = Signal(32, name=f"{prefix}_p")
    with m.If(s1["nan"]):
        dom += result.eq(QNAN)
    with m.Elif(s1["inf"] | (exp >= 255)):
        dom += result.eq(Cat(Const(0, 23), Const(0xFF, 8), s1["sign"]))
    with m.Elif(s1["zero"] | (exp <= 0)):
        dom += result.eq(Cat(Const(0, 31), s1["sign"]))
    with m.Else():
        dom += result.eq(Cat(frac, exp[0:8], s1["sign"]))
    return result


class BF16Multiplier(wiring.Component):
    """BF16 x BF16 -> FP32 multiplier, one registered stage.

    Members
    -------
    a, b : In(16)
        BF16 operands.
    p : Out(32)
        FP32 product, ``latency`` cycles later.
    """

    latency = 1
    a: In(16)
    b: In(16)
    p: Out(32)

    def __init__(self, fp_impl: str = "rtl"):
        self._fp_impl = check_fp_impl(fp_impl)
        super().__init__()

    def elaborate(self, platform):
        m = Module()
        m.d.comb += self.p.eq(bf16_mul(m, m.d.sync, self.a, self.b, fp_impl=self._fp_impl))
        return m


class FP32Adder(wiring.Component):
    """FP32 adder, round to nearest even.

    Parameters
    ----------
    stages : int
        0: combinational; 1: registered output; 2: a pipeline register
        between alignment and normalisation as well; 3 and 4: the pipeline
        of :func:`fp32_add_pipe` (registers after the parts listed in
        :data:`ADD_CUTS`). ``latency == stages``; the bits are the same at
        every depth. (Depths 0 to 2 keep the netlist they have always had.)
    out_reg : bool
        False (``stages`` >= 1): the last register is left out, the sum is combinational from the
        previous one, ``stages - 1`` cycles after the operands (the caller's register is the last stage).
    """

    a: In(32)
    b: In(32)
    s: Out(32)

    def __init__(self, stages: int = 2, fp_impl: str = "rtl", out_reg: bool = True):
        if stages not in range(MAX_ADD_STAGES + 1) or isinstance(stages, bool):
            raise ValueError(f"FP32Adder stages must be 0 to {MAX_ADD_STAGES}, not {stages!r}")
        self._stages = stages
        self._fp_impl = check_fp_impl(fp_impl)
        self._out_reg = bool(out_reg) or stages == 0
        super().__init__()

    @property
    def latency(self) -> int:
        return self._stages

    def elaborate(self, platform):
        m = Module()
        if self._stages > 2:
            m.d.comb += self.s.eq(fp32_add_pipe(m, self.a, self.b, self._stages, fp_impl=self._fp_impl,
                                                out_reg=self._out_reg))
            return m
        st = fp32_add_align(m, m.d.sync if self._stages == 2 else m.d.comb, self.a, self.b,
                            fp_impl=self._fp_impl)
        m.d.comb += self.s.eq(fp32_add_round(m, m.d.sync if self._stages >= 1 and self._out_reg else m.d.comb,
                                             st))
        return m


class AdderTree(wiring.Component):
    """N-input pipelined FP32 adder tree with a fixed addition order.

    Level 1 adds neighbours ``(x0+x1), (x2+x3), ...``; each further level adds
    neighbouring partial sums, so 16 inputs are summed as
    ``((((x0+x1)+(x2+x3))+((x4+x5)+(x6+x7))) + (((x8+x9)+...)))``.
    Each level is an :class:`FP32Adder` of ``stages_per_level`` stages (0 to 4,
    default 2): ``latency = stages_per_level * log2(n)``. ``out_reg=False`` leaves the last register of
    the last level out (``o`` is then combinational, ``latency - 1`` cycles after the inputs; the caller's
    register is the last stage).

    Members
    -------
    i : In(ArrayLayout(32, n))
    o : Out(32)
    """

    def __init__(self, n: int, stages_per_level: int = 2, fp_impl: str = "rtl", out_reg: bool = True):
        if not isinstance(n, int) or n < 2 or n & (n - 1):
            raise ValueError(f"Adder tree width must be a power of two of at least 2, not {n!r}")
        if stages_per_level not in range(MAX_ADD_STAGES + 1) or isinstance(stages_per_level, bool):
            raise ValueError(f"Adder tree stages per level must be 0 to {MAX_ADD_STAGES}, "
                             f"not {stages_per_level!r}")
        self._n = n
        self._stages = stages_per_level
        self._fp_impl = check_fp_impl(fp_impl)
        self._out_reg = bool(out_reg)
        super().__init__({"i": In(data.ArrayLayout(32, n)), "o": Out(32)})

    @property
    def n(self) -> int:
        return self._n

    @property
    def latency(self) -> int:
        return self._stages * (self._n.bit_length() - 1)

    def elaborate(self, platform):
        m = Module()
        level = [self.i[k] for k in range(self._n)]
        depth = 0
        while len(level) > 1:
            nxt = []
            for k in range(0, len(level), 2):
                add = FP32Adder(self._stages, fp_impl=self._fp_impl, out_reg=self._out_reg or len(level) > 2)
                m.submodules[f"l{depth}_{k // 2}"] = add
                m.d.comb += [add.a.eq(level[k]), add.b.eq(level[k + 1])]
                nxt.append(add.s)
            level = nxt
            depth += 1
        m.d.comb += self.o.eq(level[0])
        return m


class ArithArray(wiring.Component):
    """Test and benchmark harness: ``k`` multipliers and ``k`` 2-stage adders side by side.

    Lets a testbench push ``k`` independent operand sets per cycle through the
    same units the processing elements use.

    Members
    -------
    ma, mb : In(ArrayLayout(16, k))     multiplier operands
    aa, ab : In(ArrayLayout(32, k))     adder operands
    mp : Out(ArrayLayout(32, k))        products, ``mul_latency`` cycles later
    as_ : Out(ArrayLayout(32, k))       sums, ``add_latency`` cycles later
    """

    mul_latency = BF16Multiplier.latency
    add_latency = 2

    def __init__(self, k: int = 32, fp_impl: str = "rtl"):
        _check_int("ArithArray k", k, 1)
        self._k = k
        self._fp_impl = check_fp_impl(fp_impl)
        super().__init__({
            "ma": In(data.ArrayLayout(16, k)), "mb": In(data.ArrayLayout(16, k)),
            "aa": In(data.ArrayLayout(32, k)), "ab": In(data.ArrayLayout(32, k)),
            "mp": Out(data.ArrayLayout(32, k)), "sum": Out(data.ArrayLayout(32, k)),
        })

    @property
    def k(self) -> int:
        return self._k

    def elaborate(self, platform):
        m = Module()
        for j in range(self._k):
            mul = m.submodules[f"mul{j}"] = BF16Multiplier(fp_impl=self._fp_impl)
            add = m.submodules[f"add{j}"] = FP32Adder(2, fp_impl=self._fp_impl)
            m.d.comb += [
                mul.a.eq(self.ma[j]), mul.b.eq(self.mb[j]), self.mp[j].eq(mul.p),
                add.a.eq(self.aa[j]), add.b.eq(self.ab[j]), self.sum[j].eq(add.s),
            ]
        return m
