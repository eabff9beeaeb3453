"""Low-precision PIM processing unit (P3-LLM, issue 19): 4-bit weights, fused dequantization.

One 256-bit DRAM column of weights per cycle against the global buffer's activations, like the BF16 unit
(:class:`hw.mac_unit.MacUnit`), with the weight format a parameter. The numerics are defined by the golden model
:mod:`sim.golden.lowprec_unit` (this unit matches it bit for bit; ``tests/test_lowprec_unit.py``).

Datapaths (one per instance, chosen by the parameters):

* ``weights="bf16"``: today's unit, a :class:`hw.mac_unit.MacUnit` of 16 lanes (lane ``k`` = bits ``16k..16k+15``
  of the column).
* ``weights="int4" | "fp4"``, ``acts="fp8_e4m3"``: **integer** datapath. Lane ``k`` takes nibble ``k`` (bits
  ``4k..4k+3``, 64 per column) and FP8 activation ``k``. The weight becomes a signed integer (``int4``: the
  two's complement nibble; ``fp4``: the E2M1 value, or the group's extra value for code ``0b1000``, in units
  of 1/2), the activation a sign and an 18-bit fixed-point magnitude in units of ``2^-9`` (E4M3: ``m`` or
  ``(8 + m) << (e - 1)``); their product is exact; the 64 products go through an integer adder tree and the
  group's column sums into an integer partial sum: exact. Stages: products | tree levels 1-3 | levels 4-6 |
  group partial sum | scale multiply | round | accumulator.
* ``weights="int4" | "fp4"``, ``acts="bf16"``: **FP32** datapath. The nibble becomes its BF16 value, 64
  BF16 multipliers (exact products) feed a 64-input FP32 :class:`hw.arith.AdderTree`; the group's column sums
  are added in order by an FP32 adder into the group partial sum.

In both 4-bit datapaths the group partial sum is multiplied once by the group scale (``scale_format`` FP16 or
BF16, exact product, one rounding to FP32: fused dequantization), and that term is added to the FP32
accumulator (the same adder as the BF16 unit's). The scale and the grid selector come in with every column
(``scale``, ``sel``); the selector applies to the column's codes, the scale of a group's **last** column is
the one used. The surrounding bank keeps the group's scale and selector in a register loaded from their
DRAM column (16 FP16 scales, 128 selectors per column; :func:`firmware.quant.pack`).

Column counting: the first column after ``acc_load`` starts a group; a group is ``group / 64`` columns. The
caller must not load the accumulator while columns are in flight (as for the BF16 unit).

Accumulator slots (``slots = 2``, the PIM bank's ``acc_slots``): two FP32 accumulators. Every column carries
its slot (``slot``), which travels with it through the pipeline; its group's term is added to that slot's
accumulator (one shared adder: a term per cycle at most). ``acc_load`` loads the slot ``acc_slot``, and may
load one slot while the other slot's columns are in flight, provided it comes between whole groups (the
column count restarts at every ``acc_load``). ``acc`` is slot 0, ``acc1`` slot 1.

Members
-------
valid : In(1)
    A column is present.
w : In(256)
    The DRAM column of weights.
x : In(ArrayLayout(act_bits, lanes))
    The activations for the column's lanes (BF16 or FP8-E4M3 patterns).
scale : In(16)
    The group's scale (FP16 or BF16 pattern).
sel : In(2)
    The group's grid selector (``fp4`` with grid choice: index into (+5, -5, +8, -8)).
acc_load, acc_value : In(1), In(32)
    Load the accumulator (clear or bias).
acc : Out(32)
    The FP32 accumulator; holds a group's term ``latency`` cycles after the group's last column came in.
slot, acc_slot, acc1 : In(1), In(1), Out(32)
    ``slots = 2`` only: the column's accumulator slot, the slot ``acc_load`` loads, slot 1's accumulator.
"""

from amaranth.hdl import Array, Cat, Const, Module, Mux, Signal, signed
from amaranth.lib import data, wiring
from amaranth.lib.wiring import In, Out

from ..arith import (
    QNAN,
    AdderTree,
    BF16Multiplier,
    bf16_mul,
    check_fp_impl,
    fp32_add_align,
    fp32_add_round,
    leading_zeros,
)
from ..mac_unit import MacUnit

__all__ = ["LowPrecMacUnit", "WEIGHT_FORMATS", "ACT_FORMATS", "SCALE_FORMATS"]

WEIGHT_FORMATS = ("bf16", "int4", "fp4")
ACT_FORMATS = ("bf16", "fp8_e4m3")
SCALE_FORMATS = ("fp16", "bf16")
COLUMN_BITS = 256

# FP4 code 0b1000's extra values per selector, in units of 1/2: +5, -5, +8, -8.
_FP4_EXTRA_HALVES = (10, -10, 16, -16)
# E2M1 magnitudes in units of 1/2, by the code's low three bits: 0, 0.5, 1, 1.5, 2, 3, 4, 6.
_FP4_HALVES = (0, 1, 2, 3, 4, 6, 8, 12)


def _signed(v):
    """An unsigned value as a signed one of one more bit (so subtractions from it can go negative)."""
    return Cat(v, Const(0, 1)).as_signed()


def _bf16_of_int(v: int) -> int:
    """BF16 pattern of a small integer times 2^-1 given as ``v`` halves (exact; no rounding needed)."""
    if v == 0:
        return 0
    sign = 0x8000 if v < 0 else 0
    mag = abs(v)
    e = mag.bit_length() - 1                  # mag = 1.f * 2^e, in halves: value = mag * 2^-1
    frac = (mag << 7 >> e) & 0x7F
    if (frac << e) >> 7 != mag - (1 << e):
        raise ValueError(f"{v} halves is not exact in BF16")
    return sign | ((127 + e - 1) << 7) | frac


class LowPrecMacUnit(wiring.Component):
    """PIM processing unit with 4-bit weights and fused dequantization; see the module docstring.

    Parameters
    ----------
    weights : str
        ``"bf16"`` (16 lanes), ``"int4"`` or ``"fp4"`` (64 lanes).
    acts : str
        ``"bf16"`` or ``"fp8_e4m3"`` (4-bit weights only).
    group : int
        Inputs per scale group: a multiple of 64, a power of two (4-bit weights).
    scale_format : str
        ``"fp16"`` or ``"bf16"``.
    grid_choice : bool
        ``fp4``: code ``0b1000`` takes the selector's extra value (else it is -0).
    fp_impl : str
        ``"rtl"`` or ``"dpi"`` for the FP32 adders / BF16 multipliers (:func:`hw.arith.check_fp_impl`).
    slots : int
        Accumulator slots: 1 or 2 (4-bit weights).

    Raises
    ------
    ValueError
        On a parameter outside the above.
    """

    def __init__(self, weights: str = "int4", acts: str = "fp8_e4m3", group: int = 128, scale_format: str = "fp16",
                 grid_choice: bool = True, fp_impl: str = "rtl", slots: int = 1):
        if weights not in WEIGHT_FORMATS:
            raise ValueError(f"Weight format must be one of {', '.join(WEIGHT_FORMATS)}, not {weights!r}")
        if acts not in ACT_FORMATS:
            raise ValueError(f"Activation format must be one of {', '.join(ACT_FORMATS)}, not {acts!r}")
        if weights == "bf16" and acts != "bf16":
            raise ValueError(f"BF16 weights take BF16 activations, not {acts!r}")
        if scale_format not in SCALE_FORMATS:
            raise ValueError(f"Scale format must be one of {', '.join(SCALE_FORMATS)}, not {scale_format!r}")
        lanes = 16 if weights == "bf16" else 64
        if weights != "bf16" and (not isinstance(group, int) or isinstance(group, bool) or group < lanes
                                  or group & (group - 1)):
            raise ValueError(f"Group size must be a power of two of at least {lanes}, not {group!r}")
        self.weights, self.acts, self.group = weights, acts, group
        self._scale_format, self._grid_choice = scale_format, bool(grid_choice)
        self._fp_impl = check_fp_impl(fp_impl)
        self.lanes = lanes
        if slots not in (1, 2) or isinstance(slots, bool) or (slots == 2 and weights == "bf16"):
            raise ValueError(f"Accumulator slots must be 1, or 2 with 4-bit weights, not {slots!r}")
        self.slots = slots
        act_bits = 16 if acts == "bf16" else 8
        members = {
            "valid": In(1),
            "w": In(COLUMN_BITS),
            "x": In(data.ArrayLayout(act_bits, lanes)),
            "scale": In(16),
            "sel": In(2),
            "acc_load": In(1),
            "acc_value": In(32),
            "acc": Out(32),
        }
        if slots == 2:
            members.update({"slot": In(1), "acc_slot": In(1), "acc1": Out(32)})
        super().__init__(members)

    @property
    def columns_per_group(self) -> int:
        return 1 if self.weights == "bf16" else self.group // self.lanes

    @property
    def latency(self) -> int:
        """Cycles from a group's last column entering (``valid``) to the accumulator holding its term."""
        return self.latency_for(self.weights, self.acts)

    @staticmethod
    def latency_for(weights: str, acts: str) -> int:
        """:attr:`latency` of a unit with these formats (without building one)."""
        if weights == "bf16":
            return MacUnit.latency_for(16)
        if acts == "fp8_e4m3":
            return 7            # products, tree x2, partial sum, scale multiply, round, accumulator
        # the 64-input AdderTree: 2 stages per level
        return BF16Multiplier.latency + 2 * (64).bit_length() - 2 + 4

    # -- elaboration -----------------------------------------------------------------------------

    def elaborate(self, platform):
        m = Module()
        if self.weights == "bf16":
            mac = m.submodules.mac = MacUnit(16, fp_impl=self._fp_impl)
            m.d.comb += [mac.valid.eq(self.valid), mac.acc_load.eq(self.acc_load), mac.acc_value.eq(self.acc_value),
                         self.acc.eq(mac.acc)]
            for k in range(16):
                m.d.comb += [mac.w[k].eq(self.w[16 * k:16 * k + 16]), mac.x[k].eq(self.x[k])]
            return m

        # Column position in its group, counted at the input.
        cpg = self.columns_per_group
        first, last = Signal(name="in_first"), Signal(name="in_last")
        if cpg == 1:
            m.d.comb += [first.eq(1), last.eq(1)]
        else:
            cnt = Signal(range(cpg), name="col_in_group")
            with m.If(self.acc_load):
                m.d.sync += cnt.eq(0)
            with m.Elif(self.valid):
                m.d.sync += cnt.eq(Mux(cnt == cpg - 1, 0, cnt + 1))
            m.d.comb += [first.eq(cnt == 0), last.eq(cnt == cpg - 1)]

        if self.acts == "fp8_e4m3":
            term = self._integer_path(m, first, last)
        else:
            term = self._float_path(m, first, last)

        # The accumulator: one FP32 addition per group term (the BF16 unit's adder).
        acc = Signal(32, name="acc_reg")
        if self.slots == 2:
            acc1 = Signal(32, name="acc1_reg")
            st = fp32_add_align(m, m.d.comb, Mux(term["slot"], acc1, acc), term["t"], prefix="acc",
                                fp_impl=self._fp_impl)
            total = fp32_add_round(m, m.d.comb, st, prefix="acc")
            for k, reg in enumerate((acc, acc1)):
                with m.If(self.acc_load & (self.acc_slot == k)):
                    m.d.sync += reg.eq(self.acc_value)
                with m.Elif(term["valid"] & (term["slot"] == k)):
                    m.d.sync += reg.eq(total)
            m.d.comb += [self.acc.eq(acc), self.acc1.eq(acc1)]
            return m
        st = fp32_add_align(m, m.d.comb, acc, term["t"], prefix="acc", fp_impl=self._fp_impl)
        total = fp32_add_round(m, m.d.comb, st, prefix="acc")
        with m.If(self.acc_load):
            m.d.sync += acc.eq(self.acc_value)
        with m.Elif(term["valid"]):
            m.d.sync += acc.eq(total)
        m.d.comb += self.acc.eq(acc)
        return m

    def _stage(self, m, name, *, valid, first, last, scale, slot=None):
        """Pipeline register of the control that travels beside the data: (valid, first, last, scale[, slot])."""
        regs = dict(valid=Signal(name=f"{name}_valid"), first=Signal(name=f"{name}_first"),
                    last=Signal(name=f"{name}_last"), scale=Signal(16, name=f"{name}_scale"))
        m.d.sync += [regs["valid"].eq(valid), regs["first"].eq(first), regs["last"].eq(last),
                     regs["scale"].eq(scale)]
        if self.slots == 2:
            regs["slot"] = Signal(name=f"{name}_slot")
            m.d.sync += regs["slot"].eq(slot)
        return regs

    # -- FP8 activations: exact integer partial sums -------------------------------------------------

    def _weight_int(self, m, k):
        """(sign, magnitude) of lane ``k``'s weight: int4 in units of 1, fp4 in units of 1/2."""
        c = self.w[4 * k:4 * k + 4]
        sign = Signal(name=f"wsign{k}")
        mag = Signal(5, name=f"wmag{k}")
        if self.weights == "int4":
            m.d.comb += [sign.eq(c[3]), mag.eq(Mux(c[3], (-c.as_signed())[0:5], c))]
        else:
            halves = Array(Const(v, 5) for v in _FP4_HALVES)
            m.d.comb += [sign.eq(c[3]), mag.eq(halves[c[0:3]])]
            if self._grid_choice:
                extra = Array(Const(abs(v), 5) for v in _FP4_EXTRA_HALVES)
                with m.If(c == 0b1000):
                    m.d.comb += [sign.eq(self.sel[0]), mag.eq(extra[self.sel])]
        return sign, mag

    def _fp8_fixed(self, m, k):
        """(sign, 18-bit magnitude in units of 2^-9, NaN) of lane ``k``'s E4M3 activation."""
        b = self.x[k]
        e, f = b[3:7], b[0:3]
        mag = Signal(18, name=f"amag{k}")
        m.d.comb += mag.eq(Mux(e == 0, f, Cat(f, 1) << (e - 1)[0:4]))
        return b[7], mag, (e == 0xF) & (f == 0x7)

    def _integer_path(self, m, first, last):
        lanes = self.lanes
        pw = 24                                   # 18-bit x 5-bit magnitude and a sign
        prods = []
        nans = []
        for k in range(lanes):
            ws, wm = self._weight_int(m, k)
            as_, am, an = self._fp8_fixed(m, k)
            p = Signal(signed(pw), name=f"prod{k}")
            mag = am * wm
            m.d.sync += p.eq(Mux(ws ^ as_, -mag, mag))
            prods.append(p)
            nans.append(an)
        s1 = self._stage(m, "s1", valid=self.valid, first=first, last=last, scale=self.scale, slot=self._slot_in())
        nan1 = Signal(name="s1_nan")
        m.d.sync += nan1.eq(Cat(*nans).any())

        def tree_levels(level, n, stage):
            for lv in range(n):
                nxt = []
                for j in range(0, len(level), 2):
                    s = Signal(signed(len(level[j]) + 1), name=f"t{stage}_{lv}_{j // 2}")
                    m.d.comb += s.eq(level[j] + level[j + 1])
                    nxt.append(s)
                level = nxt
            regs = []
            for j, v in enumerate(level):
                r = Signal(signed(len(v)), name=f"t{stage}_r{j}")
                m.d.sync += r.eq(v)
                regs.append(r)
            return regs

        half = (lanes.bit_length() - 1) // 2
        level = tree_levels(prods, half, 2)
        s2 = self._stage(m, "s2", **s1)
        nan2 = Signal(name="s2_nan")
        m.d.sync += nan2.eq(nan1)
        level = tree_levels(level, lanes.bit_length() - 1 - half, 3)
        s3 = self._stage(m, "s3", **s2)
        nan3 = Signal(name="s3_nan")
        m.d.sync += nan3.eq(nan2)
        colsum = level[0]

        # Group partial sum (exact): the first column's sum, then + each further column's.
        cpg = self.columns_per_group
        part = Signal(signed(len(colsum) + (cpg - 1).bit_length()), name="part")
        part_nan = Signal(name="part_nan")
        part_next = Mux(s3["first"], colsum, part + colsum)
        nan_next = Mux(s3["first"], nan3, part_nan | nan3)
        with m.If(s3["valid"]):
            m.d.sync += [part.eq(part_next), part_nan.eq(nan_next)]
        # The scaler's input register: the finished group's sum (sign, magnitude), its exponent, flags.
        width = len(part)
        sv = Signal(name="g_valid")
        gsign = Signal(name="g_sign")
        gmag = Signal(width, name="g_mag")
        gnan = Signal(name="g_nan")
        gscale = Signal(16, name="g_scale")
        total = Signal(signed(width), name="g_total")
        m.d.comb += total.eq(part_next)
        m.d.sync += [sv.eq(s3["valid"] & s3["last"]), gsign.eq(total < 0),
                     gmag.eq(Mux(total < 0, -total, total)), gnan.eq(nan_next), gscale.eq(s3["scale"])]
        gslot = self._slot_reg(m, s3)
        # Value = gmag * 2^exp: int4 (units 1) x E4M3 (2^-9), fp4 (units 1/2) x E4M3.
        exp = -9 if self.weights == "int4" else -10
        return self._scaler(m, sv, gsign, gmag, Const(exp, signed(10)), gnan, Const(0, 1), gscale, gslot)

    # -- BF16 activations: FP32 order ---------------------------------------------------------------

    def _weight_bf16(self, m, k):
        """Lane ``k``'s weight code as its BF16 value (exact)."""
        c = self.w[4 * k:4 * k + 4]
        if self.weights == "int4":
            table = [_bf16_of_int(2 * (v - 16 if v >= 8 else v)) for v in range(16)]
        else:
            table = [_bf16_of_int(_FP4_HALVES[v & 7]) | (0x8000 if v >> 3 else 0) for v in range(16)]
        bf = Signal(16, name=f"wbf{k}")
        m.d.comb += bf.eq(Array(Const(v, 16) for v in table)[c])
        if self.weights == "fp4" and self._grid_choice:
            extra = Array(Const(_bf16_of_int(v), 16) for v in _FP4_EXTRA_HALVES)
            with m.If(c == 0b1000):
                m.d.comb += bf.eq(extra[self.sel])
        return bf

    def _float_path(self, m, first, last):
        lanes = self.lanes
        tree = m.submodules.tree = AdderTree(lanes, fp_impl=self._fp_impl)
        for k in range(lanes):
            p = bf16_mul(m, m.d.sync, self._weight_bf16(m, k), self.x[k], prefix=f"mul{k}", fp_impl=self._fp_impl)
            m.d.comb += tree.i[k].eq(p)
        ctl = dict(valid=self.valid, first=first, last=last, scale=self.scale)
        if self.slots == 2:
            ctl["slot"] = self._slot_in()
        for stage in range(BF16Multiplier.latency + tree.latency):
            ctl = self._stage(m, f"p{stage + 1}", **ctl)
        colsum = tree.o

        # Group partial sum: the first column sum, then FP32 + each further column sum.
        part = Signal(32, name="part")
        st = fp32_add_align(m, m.d.comb, part, colsum, prefix="part", fp_impl=self._fp_impl)
        added = fp32_add_round(m, m.d.comb, st, prefix="part")
        part_next = Signal(32, name="part_next")
        m.d.comb += part_next.eq(Mux(ctl["first"], colsum, added))
        with m.If(ctl["valid"]):
            m.d.sync += part.eq(part_next)
        sv = Signal(name="g_valid")
        g = Signal(32, name="g_part")
        gscale = Signal(16, name="g_scale")
        m.d.sync += [sv.eq(ctl["valid"] & ctl["last"]), g.eq(part_next), gscale.eq(ctl["scale"])]
        e, f = g[23:31], g[0:23]
        gmag = Signal(24, name="g_mag")
        m.d.comb += gmag.eq(Mux(e == 0, 0, Cat(f, 1)))      # FP32 values here are never subnormal
        gexp = Signal(signed(10), name="g_exp")
        m.d.comb += gexp.eq(_signed(e) - 150)
        gslot = self._slot_reg(m, ctl)
        return self._scaler(m, sv, g[31], gmag, gexp, (e == 0xFF) & (f != 0), (e == 0xFF) & (f == 0), gscale,
                            gslot)

    def _slot_in(self):
        return self.slot if self.slots == 2 else None

    def _slot_reg(self, m, ctl):
        """The scaler's input register of the slot (``slots = 2``), beside ``g_valid``."""
        if self.slots != 2:
            return None
        gslot = Signal(name="g_slot")
        m.d.sync += gslot.eq(ctl["slot"])
        return gslot

    # -- fused dequantization: (sign, magnitude * 2^exp) x scale, rounded once to FP32 ----------------

    def _scaler(self, m, valid, sign, mag, exp, nan, inf, scale, slot=None):
        """Two stages: the exact product, then normalise and round. Returns {"valid", "t"[, "slot"]}."""
        if self._scale_format == "fp16":
            se, sf, ebits, fbits, bias = scale[10:15], scale[0:10], 5, 10, 15
            s_sig = Mux(se == 0, sf, Cat(sf, 1))               # FP16 subnormals are kept
            s_exp = Mux(se == 0, 1 - bias - fbits, _signed(se) - (bias + fbits))
            s_zero = (se == 0) & (sf == 0)
        else:
            se, sf, ebits, fbits, bias = scale[7:15], scale[0:7], 8, 7, 127
            s_sig = Cat(sf, 1)
            s_exp = _signed(se) - (bias + fbits)
            s_zero = se == 0                                   # BF16 subnormals are zeros
        s_max = (1 << ebits) - 1
        s_inf = (se == s_max) & (sf == 0)
        s_nan = (se == s_max) & (sf != 0)

        qw = len(mag) + fbits + 1
        pw = 1 << (qw - 1).bit_length()                        # padded to a power of two for leading_zeros
        q = Signal(pw, name="sc_q")
        qexp = Signal(signed(11), name="sc_exp")
        qsign = Signal(name="sc_sign")
        qzero, qnan, qinf, qvalid = (Signal(name=f"sc_{n}") for n in ("zero", "nan", "inf", "valid"))
        m.d.sync += [
            q.eq(mag * s_sig), qexp.eq(exp + s_exp), qsign.eq(sign ^ scale[15]),
            qnan.eq(nan | s_nan | (inf & s_zero) | (s_inf & (mag == 0) & ~inf)),
            qinf.eq(inf | s_inf), qzero.eq((mag == 0) | s_zero), qvalid.eq(valid),
        ]
        # Normalise: the leading one to the top bit; the value is 1.f * 2^(pw - 1 - lz + qexp).
        lz = Signal(range(pw + 1), name="sc_lz")
        m.d.comb += lz.eq(leading_zeros(q)[1])
        norm = Signal(pw, name="sc_norm")
        m.d.comb += norm.eq((q << lz)[0:pw])
        keep = norm[pw - 24:pw]
        guard = norm[pw - 25]
        sticky = norm[0:pw - 25].any() if pw > 25 else Const(0, 1)
        rounded = Signal(25, name="sc_rounded")
        m.d.comb += rounded.eq(keep + (guard & (sticky | keep[0])))
        rexp = Signal(signed(12), name="sc_rexp")
        m.d.comb += rexp.eq(qexp + (pw - 1) - lz + 127 + rounded[24])
        frac = Mux(rounded[24], 0, rounded[0:23])
        t = Signal(32, name="term")
        tvalid = Signal(name="term_valid")
        m.d.sync += tvalid.eq(qvalid)
        with m.If(qnan):
            m.d.sync += t.eq(QNAN)
        with m.Elif(qinf | (~qzero & (rexp >= 255))):
            m.d.sync += t.eq(Cat(Const(0, 23), Const(0xFF, 8), qsign))
        with m.Elif(qzero | (rexp <= 0)):
            m.d.sync += t.eq(Cat(Const(0, 31), qsign))
        with m.Else():
            m.d.sync += t.eq(Cat(frac, rexp[0:8], qsign))
        out = dict(valid=tvalid, t=t)
        if slot is not None:
            qslot, tslot = Signal(name="sc_slot"), Signal(name="term_slot")
            m.d.sync += [qslot.eq(slot), tslot.eq(qslot)]
            out["slot"] = tslot
        return out
