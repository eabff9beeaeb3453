"""One PIM bank: DRAM storage, open-row state and timing, and its processing unit.

The channel (:mod:`hw.pim.channel`) decodes commands, checks every rule, and
drives this bank with ``do_*`` strobes only for commands that are legal; the
bank reports the per-bank timing state the channel needs to decide.

Processing unit: a :class:`hw.mac_unit.MacUnit` (``lanes`` BF16 multipliers,
FP32 adder tree, FP32 accumulator with bias preload) and an activation-function
unit that evaluates a piecewise-linear function from a lookup table held in a
reserved DRAM row of this bank (as AiM keeps its AF tables in DRAM).

With 4-bit weights (``PimGeometry.weight_format`` ``int4`` / ``fp4``, issue 19) the processing unit is a
:class:`hw.pim.lowprec_unit.LowPrecMacUnit` (64 codes per column, fused dequantization, ``acc_slots``
accumulators) and the bank has a scale register (16 group scales, loaded by LDSCAB: ``do_lds``) and a
selector register (16 2-bit grid selectors, the low 32 bits of a column, loaded by LDSLAB: ``do_ldsel``).
A MAC's column enters the unit one cycle after its command (the storage read) with the scale and selector
of slot ``row[0:4]`` of the registers as they are then (so a LDSCAB / LDSLAB right after a MAC does not
reach it, one right before it does) and the accumulator slot ``row[4]``; WRBIAS loads slot ``row[4]``.
``gb_data`` is one MAC's 64 activations (``act_ratio`` global-buffer columns). MAC depth: storage read +
``LowPrecMacUnit.latency`` (18 with BF16 activations, 8 with FP8).

Pipelines (cycle 0 = the command's cycle):

MAC  0: storage read of column ``col`` of the open row (and, in the channel,
        global-buffer column ``col mod gb_columns``);
     1: weights and inputs enter the MacUnit;
     1 + MacUnit.latency (= 11 for 16 lanes): the accumulator holds the sum.
     Hence ``tMAC >= MAC_DEPTH`` (11): WRBIAS/RDMAC/AF wait that long.

Pipelined processing unit (issue 15; ``PimGeometry.mul_stages`` / ``tree_stages`` / ``acc_stages``): the
MacUnit is built with those depths. With ``acc_stages = P > 1`` its accumulator is ``P`` interleaved partial
sums (:class:`hw.mac_unit.MacUnit`), and **the command sequence, not the timing, decides when they are
combined**: a MACSB / MACAB whose ``row`` bit :data:`~hw.pim.commands.COMBINE_ROW_BIT` (bit 0; the BF16
unit has no other use for a MAC's row field) is set is a *combining MAC*, the last column before a read.
Its column is summed as any other, and ``MacUnit.latency`` cycles after it entered the unit (when its
partial holds it) the unit's ``combine`` fires: the partials are added pairwise into ``p0``, which
``acc`` (RDMAC, AF) shows. So a refresh, a stall or any gap between commands changes no bit: the
partials a run of MACs fills and the point where they are combined depend on the commands only.

MAC (combining)  0: storage read;  1: the column enters the MacUnit;
     1 + latency: its partial holds it, ``combine`` (23 for 16 lanes with 2 / 4 / 4 stages: latency 22);
     1 + latency + combine_latency: ``acc`` holds the total (32; combine_latency 9).
     Hence ``tMAC >= pu_mac_depth`` = 1 + latency + combine_latency (32): WRBIAS, RDMAC, AF **and any
     MAC** wait ``tMAC`` after a combining MAC (a column that reached the accumulator while it combines
     would be lost); after a plain MAC, WRBIAS / RDMAC / AF wait ``tMAC`` as before. RDMAC of a group with
     a bank whose last MAC since its preload was not a combining MAC, or AF while any bank is in that state,
     is ``PU_BUSY`` (the accumulator holds uncombined partials; :class:`hw.pim.channel.PimChannel` keeps
     one bit per bank). The golden order is :func:`hw.spec.fp.accumulate` with ``stages=P`` per run of MACs
     from a preload (or the previous combine) to a combining MAC; the combine leaves ``p0`` = the total and
     the other partials ``-0``, the state a preload of the total gives, so partial sums kept in the
     accumulators between input chunks and partial sums read out and preloaded again give the same bits.
AF   0: segment index from the accumulator ``x``; storage read of the LUT
        column; ``x`` rounded to BF16;
     1: (slope, intercept) selected; BF16 product ``x * slope`` (registered);
     2: adder alignment (registered);  3: rounding, result registered;
     4: ``af_out`` holds ``f(x) = x * slope + intercept``. ``tAF >= AF_DEPTH`` (3,
        since RDAF samples one cycle after its command).

AF lookup table (one reserved row): ``af_segments`` (slope, intercept) pairs of
FP32 words covering [-8, 8) evenly; pair ``i`` at words ``2i`` (slope, a BF16
value stored as FP32) and ``2i+1`` (intercept). Segment index =
``clamp(floor(x * 2**af_scale_log2) + af_segments/2, 0, af_segments-1)``;
inputs beyond the range use the end segments' lines.
"""

from amaranth.hdl import Cat, ClockSignal, Const, Instance, Module, Mux, Signal
from amaranth.lib import wiring
from amaranth.lib.wiring import In, Out

from ..arith import bf16_mul, check_fp_impl, fp32_add_align, fp32_add_round, fp32_to_bf16
from ..config import SystemConfig
from ..mac_unit import MacUnit
from ..spec.pipeline import mac_depth
from .commands import COMBINE_ROW_BIT
from .timing import countdown

__all__ = ["PimBank", "AF_DEPTH", "check_pu_timing", "mac_depth", "pu_mac_depth", "lowprec_unit", "countdown", "af_segment_index"]

AF_DEPTH = 3


def lowprec_unit(p, fp_impl: str = "rtl"):
    """The low-precision processing unit of a bank with 4-bit weights (``p``: a PimGeometry)."""
    from .lowprec_unit import LowPrecMacUnit

    return LowPrecMacUnit(p.weight_format, p.act_format, p.quant_group, p.scale_format, p.grid_choice,
                          fp_impl=fp_impl, slots=p.acc_slots)


def pu_mac_depth(p) -> int:
    """The processing unit's MAC depth for geometry ``p``: :func:`mac_depth`, or with 4-bit weights the storage
    read + :attr:`LowPrecMacUnit.latency`."""
    from .lowprec_unit import LowPrecMacUnit

    if p.lowprec:
        return 1 + LowPrecMacUnit.latency_for(p.weight_format, p.act_format)
    return mac_depth(p.lanes, p.mul_stages, p.tree_stages, p.acc_stages)


def af_segment_index(m: Module, x, segments: int, scale_log2: int, prefix="af"):
    """Combinational LUT segment index of FP32 ``x``: clamp(floor(x * 2**k) + segments/2)."""
    half = segments // 2
    e = x[23:31]
    sign = x[31]
    mant = Cat(x[0:23], Const(1, 1))                    # 1.f, 24 bits
    # x * 2**k = 1.f * 2**E with E = e - 127 + k. |x * 2**k| < half needs E < log2(half).
    E = Signal(range(-160, 160), name=f"{prefix}_E")
    m.d.comb += E.eq(e - 127 + scale_log2)
    hb = (half - 1).bit_length()                         # bits of the integer part
    ipart = Signal(hb + 1, name=f"{prefix}_ipart")
    frac_nz = Signal(name=f"{prefix}_frac_nz")
    shift = Signal(range(24), name=f"{prefix}_shift")
    big = Signal(name=f"{prefix}_big")                  # |x * 2**k| >= half (or Inf/NaN)
    m.d.comb += [
        big.eq(E >= hb),
        shift.eq(Mux(E < 0, 23, 23 - E)),
        ipart.eq(Mux(E < 0, 0, mant >> shift)),
        frac_nz.eq(Mux(E < 0, e != 0, (mant & ((Const(1, 24) << shift) - 1)) != 0)),
    ]
    zero = e == 0
    idx = Signal(range(segments), name=f"{prefix}_idx")
    with m.If(zero):
        m.d.comb += idx.eq(half)
    with m.Elif(big):
        m.d.comb += idx.eq(Mux(sign, 0, segments - 1))
    with m.Elif(~sign):
        m.d.comb += idx.eq(half + ipart)
    with m.Else():
        # floor(-v) = -ipart - (1 if fraction else 0)
        low = Signal(range(-segments, segments), name=f"{prefix}_low")
        m.d.comb += low.eq(half - ipart - frac_nz)
        m.d.comb += idx.eq(Mux(low < 0, 0, low))
    return idx


def check_pu_timing(cfg: SystemConfig):
    """The configuration's tMAC/tAF must cover the processing unit's pipeline depths."""
    t = cfg.timing
    depth = pu_mac_depth(cfg.pim)
    if t.tMAC < depth:
        p = cfg.pim
        how = "" if p.lowprec or not p.pipelined and (p.mul_stages, p.tree_stages) == (1, 2) else \
            f" (mul_stages={p.mul_stages}, tree_stages={p.tree_stages}, acc_stages={p.acc_stages})"
        raise ValueError(f"DramTiming.tMAC must be at least the PIM MAC pipeline depth {depth}{how}, not {t.tMAC}")
    if t.tAF < AF_DEPTH:
        raise ValueError(f"DramTiming.tAF must be at least the AF pipeline depth {AF_DEPTH}, not {t.tAF}")


class PimBank(wiring.Component):
    """A DRAM bank with a processing unit.

    Parameters
    ----------
    cfg : SystemConfig

    Members
    -------
    do_act, do_pre, do_rd, do_wr, do_mac, do_af : In(1)
        Execute a (validated) command this cycle.
    row, col, wdata, wmask : In
        Command fields (``row`` for ACT, ``col`` for RD/WR/MAC).
    gb_data : In(column_bits)
        Global-buffer column for a MAC, one cycle after ``do_mac``.
    pim_row : In(row_addr_bits)
        With two row buffers (``row_buffers = 2``): the row open in the PIM
        row buffer, which MAC and AF read (the channel keeps that buffer's
        state: every PIM-buffer command is all-bank). Unused with one.
    bias_load, bias_value : In
        Preload the accumulator (WRBIAS).
    is_open, open_row : Out
        Row state.
    rcdrd_ok, rcdwr_ok, ras_ok, rp_ok, wr_ok, rtp_ok : Out(1)
        Per-bank timing constraints of the (normal) row buffer satisfied this
        cycle; with two row buffers MAC and AF do not start ``tRTP`` here.
    rdata : Out(column_bits)
        Storage read data, one cycle after ``do_rd``.
    acc, af_out : Out(32)
        Accumulator and activation-function result.

    ``fp_impl``: ``"rtl"`` or ``"dpi"`` FP cells in the processing unit (:func:`hw.arith.check_fp_impl`).
    """

    def __init__(self, cfg: SystemConfig, fp_impl: str = "rtl"):
        if not isinstance(cfg, SystemConfig):
            raise TypeError(f"Configuration must be a SystemConfig, not {cfg!r}")
        p = cfg.pim
        self.cfg = cfg
        self._fp_impl = check_fp_impl(fp_impl)
        check_pu_timing(cfg)
        members = {
            "chan_id": In(8), "bank_id": In(8), "bd_load": In(1),
            "do_act": In(1), "do_pre": In(1), "do_rd": In(1), "do_wr": In(1), "do_mac": In(1), "do_af": In(1),
            "row": In(p.row_addr_bits), "col": In(p.column_addr_bits),
            "wdata": In(p.column_bits), "wmask": In(p.column_bytes),
            "gb_data": In(p.column_bits), "pim_row": In(p.row_addr_bits),
            "bias_load": In(1), "bias_value": In(32),
            "is_open": Out(1), "open_row": Out(p.row_addr_bits),
            "rcdrd_ok": Out(1), "rcdwr_ok": Out(1), "ras_ok": Out(1), "rp_ok": Out(1),
            "wr_ok": Out(1), "rtp_ok": Out(1),
            "rdata": Out(p.column_bits),
            "acc": Out(32), "af_out": Out(32),
        }
        if p.lowprec:
            members.update({"do_lds": In(1), "do_ldsel": In(1), "gb_data": In(p.column_bits * p.act_ratio)})
            if p.acc_slots == 2:
                members["acc1"] = Out(32)
        super().__init__(members)

    def elaborate(self, platform):
        m = Module()
        p, t = self.cfg.pim, self.cfg.timing

        # Row state and per-bank timing ---------------------------------
        with m.If(self.do_act):
            m.d.sync += [self.is_open.eq(1), self.open_row.eq(self.row)]
        with m.Elif(self.do_pre):
            m.d.sync += self.is_open.eq(0)
        dual = p.row_buffers == 2
        pim_rd = self.do_mac | self.do_af
        if p.lowprec:
            pim_rd = pim_rd | self.do_lds | self.do_ldsel
        rd_type = self.do_rd if dual else self.do_rd | pim_rd
        m.d.comb += [
            self.rcdrd_ok.eq(countdown(m, "rcdrd", t.tRCDRD, self.do_act)),
            self.rcdwr_ok.eq(countdown(m, "rcdwr", t.tRCDWR, self.do_act)),
            self.ras_ok.eq(countdown(m, "ras", t.tRAS, self.do_act)),
            self.rp_ok.eq(countdown(m, "rp", t.tRP, self.do_pre)),
            self.wr_ok.eq(countdown(m, "wr", t.tWR, self.do_wr)),
            self.rtp_ok.eq(countdown(m, "rtp", t.tRTP, rd_type)),
        ]

        # Activation-function segment (combinational from the accumulator).
        pairs_per_col = p.column_bits // 64
        seg = af_segment_index(m, self.acc, p.af_segments, p.af_scale_log2) if p.af_rows else Const(0, 1)
        pair_bits = (pairs_per_col - 1).bit_length()
        af_col = seg >> pair_bits if pair_bits else seg

        # Storage --------------------------------------------------------
        abits = p.row_addr_bits + p.column_addr_bits
        raddr = Signal(abits)
        rd_row = Mux(pim_rd, self.pim_row, self.open_row) if dual else self.open_row
        m.d.comb += raddr.eq(Cat(Mux(self.do_af, af_col, self.col)[:p.column_addr_bits], rd_row))
        m.submodules.storage = Instance(
            "pim_storage",
            p_WIDTH=p.column_bits, p_DEPTH=p.rows * p.columns, p_ABITS=abits,
            i_clk=ClockSignal(), i_chan_id=self.chan_id, i_bank_id=self.bank_id,
            i_re=self.do_rd | pim_rd, i_raddr=raddr, o_rdata=self.rdata,
            i_we=self.do_wr, i_waddr=Cat(self.col, self.open_row), i_wdata=self.wdata, i_wmask=self.wmask,
            i_bd_load=self.bd_load,
        )

        # MAC ------------------------------------------------------------
        if p.lowprec:
            self._lowprec_mac(m)
        else:
            m.submodules.mac = mac = MacUnit(p.lanes, clock_gate=True, fp_impl=self._fp_impl,
                                             mul_stages=p.mul_stages, tree_stages=p.tree_stages,
                                             acc_stages=p.acc_stages)
            mac_v = Signal()
            m.d.sync += mac_v.eq(self.do_mac)
            if p.pipelined:
                # The combining MAC's flag travels beside its column: combine fires when its partial holds it.
                flag = self.do_mac & self.row[COMBINE_ROW_BIT]
                for k in range(1 + mac.latency):
                    nxt = Signal(name=f"combine_s{k + 1}")
                    m.d.sync += nxt.eq(flag)
                    flag = nxt
                m.d.comb += mac.combine.eq(flag)
            m.d.comb += [
                mac.valid.eq(mac_v),
                mac.w.eq(self.rdata),
                mac.x.eq(self.gb_data),
                mac.acc_load.eq(self.bias_load),
                mac.acc_value.eq(self.bias_value),
                self.acc.eq(mac.acc),
            ]

        # Activation function -------------------------------------------
        if p.af_rows:
            x_bf16 = Signal(16)
            sel = Signal(max(pair_bits, 1))
            v1, v2, v3 = Signal(), Signal(), Signal()
            m.d.sync += [
                x_bf16.eq(fp32_to_bf16(self.acc)),
                sel.eq(seg[:pair_bits] if pair_bits else 0),
                v1.eq(self.do_af), v2.eq(v1), v3.eq(v2),
            ]
            words = [self.rdata[32 * k:32 * (k + 1)] for k in range(p.column_bits // 32)]
            slope = Signal(32)
            icpt = Signal(32)
            with m.Switch(sel):
                for k in range(pairs_per_col):
                    with m.Case(k):
                        m.d.comb += [slope.eq(words[2 * k]), icpt.eq(words[2 * k + 1])]
            prod = bf16_mul(m, m.d.sync, x_bf16, slope[16:32], prefix="af_mul", fp_impl=self._fp_impl)
            icpt_d = Signal(32)
            m.d.sync += icpt_d.eq(icpt)
            st = fp32_add_align(m, m.d.sync, prod, icpt_d, prefix="af_add", fp_impl=self._fp_impl)
            y = fp32_add_round(m, m.d.comb, st, prefix="af_add")
            with m.If(v3):
                m.d.sync += self.af_out.eq(y)
        return m

    def _lowprec_mac(self, m):
        """4-bit weights: scale / selector registers and the LowPrecMacUnit (see the module docstring)."""
        p = self.cfg.pim
        m.submodules.mac = unit = lowprec_unit(p, self._fp_impl)
        mac_v, lds_v, ldsel_v = Signal(), Signal(name="lds_v"), Signal(name="ldsel_v")
        mac_row = Signal(p.row_addr_bits, name="mac_row")
        m.d.sync += [mac_v.eq(self.do_mac), lds_v.eq(self.do_lds), ldsel_v.eq(self.do_ldsel),
                     mac_row.eq(self.row)]
        scales = Signal(256, name="scale_reg")
        sels = Signal(32, name="sel_reg")
        with m.If(lds_v):
            m.d.sync += scales.eq(self.rdata)
        with m.If(ldsel_v):
            m.d.sync += sels.eq(self.rdata[:32])
        slot = mac_row[0:4]
        m.d.comb += [
            unit.valid.eq(mac_v),
            unit.w.eq(self.rdata),
            unit.x.eq(self.gb_data),
            unit.scale.eq(scales.word_select(slot, 16)),
            unit.sel.eq(sels.word_select(slot, 2)),
            unit.acc_load.eq(self.bias_load),
            unit.acc_value.eq(self.bias_value),
            self.acc.eq(unit.acc),
        ]
        if p.acc_slots == 2:
            m.d.comb += [unit.slot.eq(mac_row[4]), unit.acc_slot.eq(self.row[4]), self.acc1.eq(unit.acc1)]
