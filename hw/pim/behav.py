"""A behavioural PIM channel for long Verilator runs: a Verilog shell around a C++ model.

The PIM device is the test environment's memory (in the paper's prototype it is
real GDDR6-AiM chips), so behind its command bus a behavioural model is
legitimate wherever the channel's own RTL is not what is being tested. This
module writes, for a configuration, a Verilog module with exactly the ports of
the generated :class:`hw.pim.channel.PimChannel` module (by default under the
same name, so :class:`hw.pim.channel.PimDevice` instantiates it unchanged) that
calls the cycle-exact, bit-exact C++ model ``hw/verilog/pim_behav.cpp`` through
DPI-C. The shell calls the model only on edges where something can change (a
command, ``clear``, ``rst``, a rising ``bd_load``, or the next edge the model
asked for); otherwise it only counts the cycle. The file header of
``pim_behav.cpp`` states the semantics it reproduces, rule by rule.

Every number the model needs (geometry, timings, the AF lookup-table layout,
the processing unit's pipeline depths, with 4-bit weights the formats, the
group size and the accumulator slots) is passed from the configuration as one
parameter vector (:data:`PARAM_NAMES`, :func:`behav_params`); nothing is
hard-coded in the C++. Verilator only: Icarus has no DPI-C.

Processing units: the BF16 unit (``acc_stages = 1``; interleaved partial sums
are refused) and, with ``PimGeometry.weight_format`` ``int4`` / ``fp4`` (issue
19), the low-precision unit of :class:`hw.pim.lowprec_unit.LowPrecMacUnit` with
the banks' scale and selector registers (LDSCAB / LDSLAB), per-slot
accumulators and PU_BUSY; its arithmetic follows the golden model
:mod:`sim.golden.lowprec_unit`, not the RTL's code.

``tests/test_pim_behav.py`` holds it equal to the RTL channel on every cycle
and every output (lockstep), and runs the device testbenches and a SoC layer
on it.
"""

from __future__ import annotations

from pathlib import Path

from filelock import FileLock

from ..config import SystemConfig
from ..gen import BUILD_ROOT, ROOT, sha

__all__ = ["BEHAV_CPP", "channel_ports", "PARAM_NAMES", "PIM_IMPLS", "check_pim_impl", "behav_params", "behav_channel_sources",
           "WEIGHT_CODES", "ACT_CODES", "SCALE_CODES", "MUTATIONS"]

BEHAV_CPP = ROOT / "hw" / "verilog" / "pim_behav.cpp"

PIM_IMPLS = ("rtl", "behav")

#: The model's parameter vector, in order (``kParam`` in ``pim_behav.cpp``).
PARAM_NAMES = (
    "magic", "banks", "rows", "columns", "lanes", "column_addr_bits", "gb_columns", "acc_groups",
    "banks_per_word", "data_rows", "af_rows", "af_segments", "af_scale_log2", "pairs_per_col",
    "pair_bits", "row_buffers", "mac_depth", "af_edge",
    "tRCDRD", "tRCDWR", "tRP", "tRAS", "tCCD", "tRRD", "tFAW", "tWR", "tRTP", "tRFC",
    "tREFI", "tRL", "tMAC", "tAF", "refresh_postpone", "mutation",
    # 4-bit weights (issue 19), appended: formats as codes (WEIGHT_CODES ...), columns per quantization group,
    # the unit's accumulator slots, global-buffer columns per MAC and MAC-wide slots
    "weight_format", "act_format", "group_columns", "scale_format", "grid_choice", "acc_slots", "act_ratio",
    "gb_slots",
)
MAGIC = 0x50494D42

#: Codes of the formats in the parameter vector (``WeightFormat`` ... in ``pim_behav.cpp``).
WEIGHT_CODES = {"bf16": 0, "int4": 1, "fp4": 2}
ACT_CODES = {"bf16": 0, "fp8_e4m3": 1}
SCALE_CODES = {"fp16": 0, "bf16": 1}

#: ``mutation`` test hooks (each must be caught by the lockstep harness): 1 the BF16 unit's lanes added left
#: to right; 2 the 4-bit unit's scale applied to every product (rounded) before an FP32 sum; 3 the 4-bit
#: unit's nibbles taken in the wrong order within each byte.
MUTATIONS = {0: "none", 1: "bf16_lane_order", 2: "w4_scale_per_product", 3: "w4_nibble_order"}

# The AF pipeline of hw/pim/bank.py: af_out is written at the third edge after the AF command
# (x and the segment registered; product and intercept registered; aligned sum registered; rounded
# result into af_out).
AF_RESULT_EDGE = 3

STATUS_WORDS = ("violation", "vcode", "vop", "vcycle", "nviol", "owed")


def check_pim_impl(pim_impl, sim: str | None = None) -> str:
    """Validate ``pim_impl``: ``"rtl"`` (the channel RTL, the default) or ``"behav"`` (this module's model,
    Verilator only)."""
    if pim_impl not in PIM_IMPLS:
        raise ValueError(f"PIM implementation must be one of {', '.join(PIM_IMPLS)}, not {pim_impl!r}")
    if pim_impl == "behav" and sim is not None and sim != "verilator":
        raise ValueError(f"The behavioural PIM channel (pim_impl='behav') needs Verilator (DPI-C), not {sim!r}")
    return pim_impl


def behav_params(cfg: SystemConfig, mutation: int = 0) -> list[int]:
    """The model's parameter vector for ``cfg`` (:data:`PARAM_NAMES` order). ``mutation`` is a test hook
    (:data:`MUTATIONS`), 0 otherwise."""
    from .bank import mac_depth, pu_mac_depth

    if not isinstance(cfg, SystemConfig):
        raise TypeError(f"Configuration must be a SystemConfig, not {cfg!r}")
    p, t = cfg.pim, cfg.timing
    if mutation not in MUTATIONS:
        raise ValueError(f"mutation must be one of {sorted(MUTATIONS)}, not {mutation!r}")
    if p.lowprec and (p.gb_slots & (p.gb_slots - 1) or p.gb_columns & (p.gb_columns - 1)):
        raise ValueError(f"The behavioural PIM channel needs a power-of-two number of global-buffer columns and "
                         f"slots, not {p.gb_columns} / {p.gb_slots} ({cfg.name}): use pim_impl='rtl'")
    if p.acc_stages > 1:
        raise ValueError(f"The behavioural PIM channel models one accumulator per bank, not acc_stages="
                         f"{p.acc_stages} interleaved partial sums ({cfg.name}): use pim_impl='rtl'")
    pairs = p.column_bits // 64
    values = {
        "magic": MAGIC, "banks": p.banks, "rows": p.rows, "columns": p.columns, "lanes": p.lanes,
        "column_addr_bits": p.column_addr_bits, "gb_columns": p.gb_columns, "acc_groups": p.acc_groups,
        "banks_per_word": p.banks_per_word, "data_rows": p.data_rows, "af_rows": p.af_rows,
        "af_segments": p.af_segments, "af_scale_log2": max(p.af_scale_log2, 0), "pairs_per_col": pairs,
        "pair_bits": (pairs - 1).bit_length(), "row_buffers": p.row_buffers,
        "mac_depth": pu_mac_depth(p) if p.lowprec else mac_depth(p.lanes, p.mul_stages, p.tree_stages),
        "af_edge": AF_RESULT_EDGE,
        **{name: getattr(t, name) for name in ("tRCDRD", "tRCDWR", "tRP", "tRAS", "tCCD", "tRRD", "tFAW", "tWR",
                                               "tRTP", "tRFC", "tREFI", "tRL", "tMAC", "tAF", "refresh_postpone")},
        "mutation": mutation,
        "weight_format": WEIGHT_CODES[p.weight_format], "act_format": ACT_CODES[p.act_format],
        "group_columns": max(p.quant_group // 64, 1) if p.lowprec else 1,
        "scale_format": SCALE_CODES[p.scale_format], "grid_choice": int(p.grid_choice), "acc_slots": p.acc_slots,
        "act_ratio": p.act_ratio, "gb_slots": p.gb_slots,
    }
    out = [int(values[name]) for name in PARAM_NAMES]
    if any(not 0 <= v < 2**32 for v in out):
        raise ValueError(f"behavioural PIM parameters out of 32-bit range: {dict(zip(PARAM_NAMES, out, strict=True))}")
    return out


def channel_ports(cfg: SystemConfig) -> list[tuple[str, str, int]]:
    """(direction, name, width) of the channel module's ports: :class:`PimChannel`'s flattened signature
    (``bus`` is the controller's signature flipped, ``status`` the device's)."""
    from amaranth.hdl import Shape
    from amaranth.lib.wiring import In, Out

    from .channel import PimBusSignature, PimStatusSignature

    ports = [("input", "clk", 1), ("input", "rst", 1)]
    for prefix, sig, inward in (("bus", PimBusSignature(cfg), Out), ("status", PimStatusSignature(), In)):
        for name, member in sig.members.items():
            width = Shape.cast(member.shape).width
            if width == 0:
                raise ValueError(f"The behavioural PIM channel needs every bus field to have a width; "
                                 f"{prefix}__{name} has none for this configuration")
            ports.append(("input" if member.flow == inward else "output", f"{prefix}__{name}", width))
    return ports + [("input", "chan_id", 8), ("input", "bd_load", 1)]


def _shell(cfg: SystemConfig, module: str, mutation: int) -> str:
    p = cfg.pim
    W = p.column_bits
    params = behav_params(cfg, mutation)
    ports = channel_ports(cfg)
    widths = {name: w for _, name, w in ports}

    def decl(direction, name, width):
        kind = "wire"
        rng = f"[{width - 1}:0] " if width > 1 else ""
        return f"    {direction} {kind} {rng}{name}"

    from .channel import STATUS_COUNTERS

    status_names = [f"status__{n}" for n in STATUS_WORDS + STATUS_COUNTERS]    # the model's st[] order
    lines = [
        f"// Generated by hw/pim/behav.py for configuration {cfg.name!r}: the behavioural PIM channel",
        "// (hw/verilog/pim_behav.cpp through DPI-C) with the ports of the RTL channel module.",
        f"module {module} (",
        ",\n".join(decl(*port) for port in ports),
        ");",
        "    import \"DPI-C\" function chandle ianus_pimb_new(input bit [32*%d-1:0] params);" % len(params),
        "    import \"DPI-C\" function longint ianus_pimb_step(input chandle h, input longint cyc, input bit rst,",
        "        input int op, input int bank, input int row, input int col,",
        f"        input bit [{W - 1}:0] data, input bit [{W // 8 - 1}:0] mask, input bit clear,",
        f"        output bit rvalid, output bit [{W - 1}:0] rdata, output bit [32*16-1:0] st);",
        "    import \"DPI-C\" function int ianus_pimb_backdoor(input chandle h, input string dir, input int chan_id);",
        "    // " + ", ".join(f"{n}={v}" for n, v in zip(PARAM_NAMES, params, strict=True)),
        f"    localparam bit [32*{len(params)}-1:0] PARAMS = {{"
        + ", ".join(f"32'd{v}" for v in reversed(params)) + "};",
        "    chandle h;",
        "    reg [63:0] cyc = 64'd0;",
        "    reg [63:0] wake = 64'd0;",
        "    reg bd_q = 1'b0;",
        "    reg rv_q = 1'b0;",
        f"    reg [{W - 1}:0] rd_q = {W}'d0;",
        "    reg [32*16-1:0] st_q = 512'd0;",
        "    bit rv_t;",
        f"    bit [{W - 1}:0] rd_t;",
        "    bit [32*16-1:0] st_t;",
        "    longint w_t;",
        "    string dir;",
        "    initial h = ianus_pimb_new(PARAMS);",
        "    // The model runs only on edges where something can change (see pim_behav.cpp).",
        "    always @(posedge clk) begin",
        "        if (rst || bus__op != 5'd0 || status__clear || (bd_load && !bd_q) || cyc >= wake) begin",
        "            w_t = ianus_pimb_step(h, cyc, rst, 32'(bus__op), 32'(bus__bank), 32'(bus__row), 32'(bus__col),",
        "                                  bus__data, bus__mask, status__clear, rv_t, rd_t, st_t);",
        "            wake <= w_t;",
        "            rv_q <= rv_t;",
        "            rd_q <= rd_t;",
        "            st_q <= st_t;",
        "            if (bd_load && !bd_q && $value$plusargs(\"PIM_BACKDOOR=%s\", dir))",
        "                if (ianus_pimb_backdoor(h, dir, 32'(chan_id)) != 0) $finish;",
        "        end",
        "        bd_q <= bd_load;",
        "        cyc <= rst ? 64'd0 : cyc + 64'd1;",
        "    end",
        "    assign bus__rvalid = rv_q;",
        "    assign bus__rdata = rd_q;",
        "    assign status__cycle = cyc[31:0];",
    ]
    for i, name in enumerate(status_names):
        lines.append(f"    assign {name} = st_q[{32 * i + widths[name] - 1}:{32 * i}];")
    lines.append("endmodule")
    return "\n".join(lines) + "\n"


def behav_channel_sources(cfg: SystemConfig, module: str | None = None, mutation: int = 0) -> list[Path]:
    """The Verilog shell (module ``module``, default the RTL channel's name for ``cfg``) and the C++ model.

    The shell is written once per configuration, module name and model source under ``build/verilog``.
    """
    from .channel import pim_module_names

    module = module or pim_module_names(cfg)["channel"]
    text = _shell(cfg, module, mutation)
    out_dir = BUILD_ROOT / "verilog"
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{module}-behav-{sha(text, BEHAV_CPP.read_bytes())}.v"
    with FileLock(str(path) + ".lock"):
        if not path.exists():
            tmp = path.with_suffix(".tmp")
            tmp.write_text(text)
            tmp.replace(path)
    return [path, BEHAV_CPP]
