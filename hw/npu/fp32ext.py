"""FP32 extensions for the NPU vector unit.

Adds to :mod:`hw.arith` (whose numerics contract applies unchanged: flush
subnormals to zero on input and output keeping the sign, round to nearest
even, canonical NaN ``0x7FC00000``, overflow to infinity):

* :func:`fp32_mul_product` / :func:`fp32_mul_round` and :class:`FP32Multiplier`:
  FP32 x FP32 -> FP32. The 48-bit product is rounded to 24 bits with an
  unbounded exponent; a result whose biased exponent is then 0 or less is a
  signed zero (tininess after rounding), 255 or more is infinity.
* :func:`bf16_load`, :func:`f32_load`, :func:`bf16_store`: BF16 -> FP32
  widening and FP32 canonicalisation (FTZ, canonical NaN) on load; FP32 ->
  BF16 rounding to nearest even on store.
* :func:`max_key`: an unsigned key whose order is the FP32 order with
  ``-0 < +0`` and the canonical NaN above ``+inf`` (so ``max`` propagates NaN).
* :class:`FuncUnit`: ``exp2``, reciprocal, reciprocal square root and GELU by
  range reduction + piecewise quadratic from a ROM (method and table in
  :mod:`hw.npu.vector_tables`).

``sim/golden/fp32ext.py`` is the independent numpy model.
"""

from amaranth.hdl import Cat, Const, Module, Mux, Signal, signed
from amaranth.lib import enum, memory, wiring
from amaranth.lib.wiring import In, Out

from ..arith import QNAN, fp32_add_align, fp32_add_pipe, fp32_add_round, fp_mul_unpack
from . import vector_tables as T

__all__ = [
    "Func", "fp32_mul_product", "fp32_mul_round", "bf16_load", "f32_load", "bf16_store", "max_key",
    "fix_to_float", "delay", "FP32Multiplier", "FuncUnit", "FuncTestTop",
]

POS_INF = 0x7F800000


class Func(enum.Enum, shape=2):
    """Function selected in :class:`FuncUnit`."""
    EXP2 = 0
    RECIP = 1
    RSQRT = 2
    GELU = 3


def delay(m: Module, sig, cycles: int, name: str):
    """``sig`` delayed by ``cycles`` sync registers (``cycles == 0`` returns ``sig``)."""
    for k in range(cycles):
        nxt = Signal(sig.shape(), name=f"{name}_d{k + 1}")
        m.d.sync += nxt.eq(sig)
        sig = nxt
    return sig


def fp32_mul_product(m: Module, dom, a, b, prefix="fmul"):
    """First half of the FP32 multiplier: significand product and exponent.

    Assigns its outputs in ``dom`` and returns them as a dict for :func:`fp32_mul_round`.
    """
    op = fp_mul_unpack(a, b, 23)
    ea, eb, fa, fb = op["ea"], op["eb"], op["fa"], op["fb"]
    prod = Signal(48, name=f"{prefix}_prod")
    m.d.comb += prod.eq(Cat(fa, 1) * Cat(fb, 1))     # 1.fa x 1.fb in [1, 4)
    hi = prod[47]
    st = dict(
        sig=Signal(24, name=f"{prefix}_sig"),
        guard=Signal(name=f"{prefix}_guard"),
        sticky=Signal(name=f"{prefix}_sticky"),
        exp=Signal(signed(11), name=f"{prefix}_exp"),
        sign=Signal(name=f"{prefix}_sign"),
        nan=Signal(name=f"{prefix}_nan"),
        inf=Signal(name=f"{prefix}_inf"),
        zero=Signal(name=f"{prefix}_zero"),
    )
    dom += [
        st["sig"].eq(Mux(hi, prod[24:48], prod[23:47])),
        st["guard"].eq(Mux(hi, prod[23], prod[22])),
        st["sticky"].eq(Mux(hi, prod[0:23] != 0, prod[0:22] != 0)),
        st["exp"].eq(ea + eb - 127 + hi),
        st["sign"].eq(op["sign"]),
        st["nan"].eq(op["nan"]),
        st["inf"].eq(op["inf"]),
        st["zero"].eq(op["zero"]),
    ]
    return st


def fp32_mul_round(m: Module, dom, st: dict, prefix="fmul"):
    """Second half of the FP32 multiplier: round to nearest even, flush, pack."""
    sig = st["sig"]
    up = st["guard"] & (st["sticky"] | sig[0])
    rounded = Signal(25, name=f"{prefix}_rounded")
    m.d.comb += rounded.eq(sig + up)
    rexp = Signal(signed(12), name=f"{prefix}_rexp")
    m.d.comb += rexp.eq(st["exp"] + rounded[24])
    frac = Mux(rounded[24], 0, rounded[0:23])
    result = Signal(32, name=f"{prefix}_p")
    with m.If(st["nan"]):
        dom += result.eq(QNAN)
    with m.Elif(st["inf"]):
        dom += result.eq(Cat(Const(0, 23), Const(0xFF, 8), st["sign"]))
    with m.Elif(st["zero"] | (rexp <= 0)):
        dom += result.eq(Cat(Const(0, 31), st["sign"]))
    with m.Elif(rexp >= 255):
        dom += result.eq(Cat(Const(0, 23), Const(0xFF, 8), st["sign"]))
    with m.Else():
        dom += result.eq(Cat(frac, rexp[0:8], st["sign"]))
    return result


def fp32_mul(m: Module, a, b, prefix="fmul"):
    """Two-stage FP32 multiplier (``latency == 2``); returns the registered product."""
    return fp32_mul_round(m, m.d.sync, fp32_mul_product(m, m.d.sync, a, b, prefix), prefix)


def fp32_add(m: Module, a, b, prefix="fadd", stages: int = 2):
    """Two-stage FP32 adder of :mod:`hw.arith` (``latency == 2``); returns the registered sum. ``stages`` 3 or
    4: the re-timed :func:`hw.arith.fp32_add_pipe` of that depth (same bits)."""
    if stages != 2:
        return fp32_add_pipe(m, a, b, stages, prefix=prefix)
    return fp32_add_round(m, m.d.sync, fp32_add_align(m, m.d.sync, a, b, prefix), prefix)


def f32_load(x):
    """Canonical FP32 of an FP32 word: subnormals to signed zero, NaN to ``0x7FC00000`` (combinational)."""
    e, f = x[23:31], x[0:23]
    return Mux((e == 0xFF) & (f != 0), QNAN, Mux(e == 0, Cat(Const(0, 31), x[31]), x))


def bf16_load(h):
    """Canonical FP32 of a BF16 value (combinational)."""
    return f32_load(Cat(Const(0, 16), h))


def bf16_store(x):
    """BF16 of a canonical FP32 value, round to nearest even (overflow gives infinity)."""
    e, f = x[23:31], x[0:23]
    up = x[15] & ((x[0:15] != 0) | x[16])
    mag = (x[16:31] + up)[0:15]
    return Mux((e == 0xFF) & (f != 0), 0x7FC0, Mux(e == 0, Cat(Const(0, 15), x[31]), Cat(mag, x[31])))


def max_key(x):
    """Unsigned 32-bit key ordered like the FP32 value (``-0 < +0``, canonical NaN highest)."""
    return Mux(x[31], ~x, x | 0x80000000)


def fix_to_float(m: Module, v, shift, prefix="fix"):
    """FP32 (combinational) of ``v * 2**shift``: ``v`` unsigned (up to 24 bits), ``shift`` signed.

    Exact. The caller guarantees ``127 + msb(v) + shift`` lies in 1..254.
    """
    width = len(v)
    assert width <= 24
    msb = Signal(range(width), name=f"{prefix}_msb")
    for i in range(width):
        with m.If(v[i]):
            m.d.comb += msb.eq(i)
    shamt = Signal(range(24), name=f"{prefix}_shamt")
    m.d.comb += shamt.eq(23 - msb)
    norm = Signal(24, name=f"{prefix}_norm")
    m.d.comb += norm.eq((v << shamt)[0:24])
    exp = Signal(signed(10), name=f"{prefix}_exp")
    m.d.comb += exp.eq(127 + msb + shift)
    return Mux(v == 0, 0, Cat(norm[0:23], exp[0:8], 0))


class FP32Multiplier(wiring.Component):
    """FP32 x FP32 -> FP32 multiplier, round to nearest even, two pipeline stages.

    Members
    -------
    a, b : In(32)
    p : Out(32)
        Product, ``latency`` cycles after the operands.
    """

    latency = 2
    a: In(32)
    b: In(32)
    p: Out(32)

    def elaborate(self, platform):
        m = Module()
        m.d.comb += self.p.eq(fp32_mul(m, self.a, self.b))
        return m


class FuncUnit(wiring.Component):
    """One lane of special functions: ``exp2``, reciprocal, rsqrt, GELU.

    Pipeline (one result per cycle, ``latency == 11``):

    1. range reduction: special cases, segment index, residual as an integer
       and its power-of-two weight, result scaling;
    2. residual to FP32 (exact); ROM read of ``(c0, c1, c2)``;
    3. ``c2 * r`` (2), ``+ c1`` (2), ``* r`` (2), ``+ c0`` (2);
    4. scaling by ``2**k`` with flush to zero / overflow, special results.

    Special cases: ``exp2``: NaN -> NaN, ``x >= 128`` -> ``+inf``,
    ``x <= -128`` -> ``+0``; results below ``2**-126`` flush to ``+0``.
    ``recip``: ``+-0`` -> ``+-inf``, ``+-inf`` -> ``+-0``. ``rsqrt``: ``+0`` ->
    ``+inf``, ``-0`` -> ``-inf``, negative -> NaN, ``+inf`` -> ``+0``. ``gelu``:
    ``x >= 8`` -> ``x``, ``x <= -8`` -> ``-0``.

    The coefficient ROM is outside (one ROM, one read port per lane): drive
    ``rom_data`` with the word at ``rom_addr`` one cycle after it (a
    synchronous read port with ``en = 1``).

    Members
    -------
    x : In(32)
        Canonical FP32 argument.
    func : In(Func)
        Function, with ``x``.
    y : Out(32)
        Result, ``latency`` cycles later.
    rom_addr : Out(range(ROM_DEPTH))
    rom_data : In(96)
    """

    latency = 11
    rom_latency_stage = 1

    @staticmethod
    def latency_for(add_stages: int = 2) -> int:
        """``latency`` with Horner adders of ``add_stages`` stages: ``7 + 2 add_stages``."""
        return 7 + 2 * add_stages

    def __init__(self, add_stages: int = 2):
        if add_stages not in (2, 3, 4) or isinstance(add_stages, bool):
            raise ValueError(f"Function unit adder stages must be 2, 3 or 4, not {add_stages!r}")
        self.add_stages = add_stages
        self.latency = self.latency_for(add_stages)
        super().__init__({
            "x": In(32), "func": In(Func), "y": Out(32),
            "rom_addr": Out(range(T.ROM_DEPTH)), "rom_data": In(96),
        })

    def elaborate(self, platform):
        m = Module()
        x = self.x
        s, e, f = x[31], x[23:31], x[0:23]
        E = Signal(signed(10))
        m.d.comb += E.eq(e - 127)
        is_nan = (e == 0xFF) & (f != 0)
        is_inf = (e == 0xFF) & (f == 0)
        is_zero = e == 0

        # -- stage 1: range reduction -> registers ------------------------------------
        idx = Signal(range(T.ROM_DEPTH), name="f1_idx")
        rint = Signal(23, name="f1_rint")           # residual = rint * 2**rshift
        rshift = Signal(signed(10), name="f1_rshift")
        rdirect = Signal(name="f1_rdirect")         # residual = x itself (GELU small segment)
        scale = Signal(signed(10), name="f1_scale")  # result = p * 2**scale
        osign = Signal(name="f1_osign")             # flip the result's sign
        special = Signal(name="f1_special")
        sval = Signal(32, name="f1_sval")
        xr = Signal(32, name="f1_x")

        c_idx = Signal.like(idx)
        c_rint = Signal.like(rint)
        c_rshift = Signal.like(rshift)
        c_rdirect = Signal()
        c_scale = Signal.like(scale)
        c_osign = Signal()
        c_special = Signal()
        c_sval = Signal(32)
        m.d.comb += c_rshift.eq(-23)

        # exp2: T = floor(x * 2**23) as a signed fixed-point number, |x| < 128.
        sig24 = Mux(is_zero, 0, Cat(f, 1))
        mag = Signal(31, name="exp_mag")
        sticky = Signal(name="exp_sticky")
        rsh = Signal(range(32), name="exp_rsh")
        m.d.comb += rsh.eq(Mux(E < -31, 31, -E))
        with m.If(E >= 0):
            m.d.comb += mag.eq(sig24 << E[0:3])
        with m.Else():
            m.d.comb += [mag.eq(sig24 >> rsh), sticky.eq(((sig24 >> rsh) << rsh)[0:24] != sig24)]
        tfix = Signal(signed(33), name="exp_t")
        m.d.comb += tfix.eq(Mux(s, -(mag + sticky), mag))
        exp_n = tfix[23:33].as_signed()
        exp_frac = tfix[0:23]

        gelu_bin = Signal(range(T.GELU_BINADES), name="gelu_bin")
        m.d.comb += gelu_bin.eq(E - T.GELU_EMIN)
        fb = 23 - T.GELU_BITS

        with m.Switch(self.func):
            with m.Case(Func.EXP2):
                m.d.comb += [
                    c_idx.eq(T.EXP2_BASE + exp_frac[23 - T.EXP2_BITS:23]),
                    c_rint.eq(exp_frac[0:23 - T.EXP2_BITS]),
                    c_scale.eq(exp_n),
                ]
                with m.If(is_nan):
                    m.d.comb += [c_special.eq(1), c_sval.eq(QNAN)]
                with m.Elif(E >= 7):
                    m.d.comb += [c_special.eq(1), c_sval.eq(Mux(s, 0, POS_INF))]
            with m.Case(Func.RECIP):
                m.d.comb += [
                    c_idx.eq(T.RECIP_BASE + f[23 - T.RECIP_BITS:23]),
                    c_rint.eq(f[0:23 - T.RECIP_BITS]),
                    c_scale.eq(127 - e),
                    c_osign.eq(s),
                ]
                with m.If(is_nan):
                    m.d.comb += [c_special.eq(1), c_sval.eq(QNAN)]
                with m.Elif(is_zero):
                    m.d.comb += [c_special.eq(1), c_sval.eq(Cat(Const(POS_INF, 31), s))]
                with m.Elif(is_inf):
                    m.d.comb += [c_special.eq(1), c_sval.eq(Cat(Const(0, 31), s))]
            with m.Case(Func.RSQRT):
                odd = E[0]
                m.d.comb += [
                    c_idx.eq(T.RSQRT_BASE + Cat(f[23 - T.RSQRT_BITS:23], odd)),
                    c_rint.eq(f[0:23 - T.RSQRT_BITS]),
                    c_scale.eq(-((E - odd) >> 1)),
                ]
                with m.If(is_nan | (s & ~is_zero)):
                    m.d.comb += [c_special.eq(1), c_sval.eq(QNAN)]
                with m.Elif(is_zero):
                    m.d.comb += [c_special.eq(1), c_sval.eq(Cat(Const(POS_INF, 31), s))]
                with m.Elif(is_inf):
                    m.d.comb += [c_special.eq(1), c_sval.eq(0)]
            with m.Case(Func.GELU):
                m.d.comb += [
                    # index = base + (sign * binades + binade) * 2**bits + leading mantissa bits
                    c_idx.eq(T.GELU_BASE + ((s * T.GELU_BINADES + gelu_bin) << T.GELU_BITS) + f[fb:23]),
                    c_rint.eq(f[0:fb]),
                    c_rshift.eq(E - 23),
                ]
                with m.If(is_nan):
                    m.d.comb += [c_special.eq(1), c_sval.eq(QNAN)]
                with m.Elif(E > T.GELU_EMAX):
                    m.d.comb += [c_special.eq(1), c_sval.eq(Mux(s, 0x80000000, x))]
                with m.Elif(E < T.GELU_EMIN):
                    m.d.comb += [c_idx.eq(T.GELU_SMALL), c_rdirect.eq(1)]

        m.d.sync += [
            idx.eq(c_idx), rint.eq(c_rint), rshift.eq(c_rshift), rdirect.eq(c_rdirect),
            scale.eq(c_scale), osign.eq(c_osign), special.eq(c_special), sval.eq(c_sval), xr.eq(x),
        ]
        m.d.comb += self.rom_addr.eq(idx)

        # -- stage 2: residual to FP32; ROM word arrives ---------------------------------
        r = Signal(32, name="f2_r")
        m.d.sync += r.eq(Mux(rdirect, xr, fix_to_float(m, rint, rshift, prefix="f2")))
        # The ROM's read port registers the address of stage 1: its data is the stage-2 register.
        c0, c1, c2 = self.rom_data[0:32], self.rom_data[32:64], self.rom_data[64:96]
        scale2 = delay(m, scale, 1, "scale")
        osign2 = delay(m, osign, 1, "osign")
        special2 = delay(m, special, 1, "special")
        sval2 = delay(m, sval, 1, "sval")

        # -- stage 3: Horner, 8 cycles (4 + 2 add_stages) ----------------------------------
        A = self.add_stages
        p = fp32_mul(m, c2, r, prefix="h_m1")
        p = fp32_add(m, p, delay(m, c1, 2, "c1"), prefix="h_a1", stages=A)
        p = fp32_mul(m, p, delay(m, r, 2 + A, "r"), prefix="h_m2")
        p = fp32_add(m, p, delay(m, c0, 4 + A, "c0"), prefix="h_a2", stages=A)
        scale3 = delay(m, scale2, 4 + 2 * A, "scale")
        osign3 = delay(m, osign2, 4 + 2 * A, "osign")
        special3 = delay(m, special2, 4 + 2 * A, "special")
        sval3 = delay(m, sval2, 4 + 2 * A, "sval")

        # -- stage 4: p * 2**scale ---------------------------------------------------------
        pe = p[23:31]
        nexp = Signal(signed(12), name="f4_exp")
        m.d.comb += nexp.eq(pe + scale3)
        sign = p[31] ^ osign3
        y = Signal(32, name="f4_y")
        with m.If(special3):
            m.d.sync += y.eq(sval3)
        with m.Elif((pe == 0) | (nexp <= 0)):
            m.d.sync += y.eq(Cat(Const(0, 31), sign))
        with m.Elif(nexp >= 255):
            m.d.sync += y.eq(Cat(Const(0, 23), Const(0xFF, 8), sign))
        with m.Else():
            m.d.sync += y.eq(Cat(p[0:23], nexp[0:8], sign))
        m.d.comb += self.y.eq(y)
        return m


def coefficient_rom() -> memory.Memory:
    """The coefficient ROM (:func:`hw.npu.vector_tables.rom_words`); add one read port per lane."""
    return memory.Memory(shape=96, depth=T.ROM_DEPTH, init=T.rom_words())


class FuncTestTop(wiring.Component):
    """Test harness: ``k`` FP32 multipliers, ``k`` function units and load/store converters side by side.

    Members
    -------
    a, b : In(ArrayLayout(32, k))
        Multiplier operands; ``a`` is also the function units' argument (canonicalised first).
    func : In(Func)
    p : Out(ArrayLayout(32, k))
        Products, ``mul_latency`` cycles later.
    y : Out(ArrayLayout(32, k))
        Function results, ``func_latency`` cycles later.
    bf : Out(ArrayLayout(16, k))
        ``bf16_store(f32_load(a))`` (combinational).
    wide : Out(ArrayLayout(32, k))
        ``bf16_load(a[0:16])`` (combinational).
    """

    mul_latency = FP32Multiplier.latency
    func_latency = FuncUnit.latency

    def __init__(self, k: int = 8):
        if not isinstance(k, int) or isinstance(k, bool) or k < 1:
            raise ValueError(f"Harness width must be a positive integer, not {k!r}")
        from amaranth.lib import data
        self._k = k
        super().__init__({
            "a": In(data.ArrayLayout(32, k)), "b": In(data.ArrayLayout(32, k)), "func": In(Func),
            "p": Out(data.ArrayLayout(32, k)), "y": Out(data.ArrayLayout(32, k)),
            "bf": Out(data.ArrayLayout(16, k)), "wide": Out(data.ArrayLayout(32, k)),
        })

    def elaborate(self, platform):
        m = Module()
        m.submodules.rom = rom = coefficient_rom()
        for j in range(self._k):
            mul = m.submodules[f"mul{j}"] = FP32Multiplier()
            fu = m.submodules[f"fu{j}"] = FuncUnit()
            port = rom.read_port()
            m.d.comb += [
                mul.a.eq(self.a[j]), mul.b.eq(self.b[j]), self.p[j].eq(mul.p),
                fu.x.eq(f32_load(self.a[j])), fu.func.eq(self.func), self.y[j].eq(fu.y),
                port.addr.eq(fu.rom_addr), fu.rom_data.eq(port.data),
                self.bf[j].eq(bf16_store(f32_load(self.a[j]))),
                self.wide[j].eq(bf16_load(self.a[j][0:16])),
            ]
        return m
