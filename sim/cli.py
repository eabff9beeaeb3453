"""The ``ianus`` command line.

``ianus run``      GPT-2 decoder layers on the SoC: prefill + generation, policies ianus / npu-mem / naive
``ianus demo``     the FPGA-prototype demo (``make demo-proto``): a GPT-2-small layer's generation-step
                   FCs through driver, AXI, PCU, controllers and PIM device RTL (``make demo`` is ``ianus run``)
``ianus gemv``     PIM GEMVs of chosen shapes on the PIM device RTL alone, against the lower bound
``ianus project``  paper-scale projection (ianus preset) from the RTL-calibrated performance model
``ianus config``   print a configuration and its derived figures
``ianus generate`` text from the trained Shakespeare model, decoder layers on the SoC (functional model / RTL)
``ianus synth``    FPGA synthesis (same as ``make synth``; its options pass through: ``ianus synth --help``)
``ianus bench``    benchmarks as JSON lines (same as ``make bench``; ``--quick``, ``--only NAME``)

Errors: bad input gives one line naming the value and the limit and exit status 2 (usage: anything
rejected before a build or simulation starts); a failure during a run exits with 1; ``--debug`` shows
the traceback. README "Errors and limits".
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import tempfile
import time

from sim.console import Quiet as _Quiet
from sim.console import console as _console

# (name, K, N, GELU in PIM)
GPT2_SMALL_FC = [("QKV (c_attn)", 768, 2304, False), ("attn proj (c_proj)", 768, 768, False),
                 ("FC1 + GELU (mlp.c_fc)", 768, 3072, True), ("FC2 (mlp.c_proj)", 3072, 768, False)]


def run_pim_gemvs(config: str, shapes, sim: str = "verilator", waves: bool = False, quiet: bool = True) -> dict:
    """Run GEMV shapes on the RTL PIM device; returns the testbench's metrics."""
    from hw.config import preset
    from hw.pim import device_factory, device_sources
    from sim.build import BUILD_ROOT, build

    cfg = preset(config)
    log = str(BUILD_ROOT / "logs" / f"gemv_{config}_{sim}.log")
    with tempfile.TemporaryDirectory() as tmp, (_Quiet(log) if quiet else contextlib.nullcontext()):
        b = build(device_factory(cfg), name=f"pim_device_{config}", key=repr(cfg), sim=sim, waves=waves,
                  extra_sources=tuple(device_sources(cfg)), no_inline=("pim_bank_*",))
        metrics = os.path.join(tmp, "metrics.jsonl")
        env = {"IANUS_CONFIG": config,
               "GEMV_SHAPES": ",".join(f"{s[0]}x{s[1]}" + ("g" if len(s) > 2 and s[2] else "") for s in shapes),
               "IANUS_METRICS": metrics, "MIN_EFFICIENCY": "0"}
        t0 = time.perf_counter()
        b.run("sim.tb.pim_tb", "gemv", env=env, test_name=f"cli_gemv_{config}_{sim}")
        wall = time.perf_counter() - t0
        result = [json.loads(line) for line in open(metrics)][-1]
    result["wall_s"] = wall
    result["build_dir"] = str(b.build_dir)
    return result


def run_proto_layer(config: str, sim: str = "verilator", waves: bool = False, quiet: bool = True) -> dict:
    """The generation-step FC GEMVs of a GPT-2-small layer through the host driver over AXI on the RTL prototype."""
    from hw.config import preset
    from hw.pim import device_factory, device_sources
    from hw.proto import ProtoTop
    from sim.build import BUILD_ROOT, build

    cfg = preset(config)
    d_model, head_dim = (768, 64) if config == "default" else (16, 4)
    log = str(BUILD_ROOT / "logs" / f"demo_{config}_{sim}.log")
    with tempfile.TemporaryDirectory() as tmp, (_Quiet(log) if quiet else contextlib.nullcontext()):
        b = build(lambda: ProtoTop(cfg, device_factory(cfg)), name=f"proto_{config}", key=repr(cfg), sim=sim,
                  waves=waves, extra_sources=tuple(device_sources(cfg)), no_inline=("pim_bank_*",))
        out = os.path.join(tmp, "demo.json")
        env = {"IANUS_CONFIG": config, "D_MODEL": d_model, "HEAD_DIM": head_dim, "IANUS_DEMO_OUT": out}
        t0 = time.perf_counter()
        b.run("sim.tb.proto_tb", "layer_fc", env=env, test_name=f"demo_{config}_{sim}")
        wall = time.perf_counter() - t0
        result = json.load(open(out))
    result["wall_s"] = wall
    return result


def _results_table(title: str, columns):
    """A rich table of per-operation results: ``operation`` left-aligned, the numbers right-aligned."""
    from rich.table import Table

    table = Table(title=title)
    for col in columns:
        table.add_column(col, justify="left" if col == "operation" else "right")
    return table


def _pim_device(args):
    """``(console, configuration, geometry)`` for a command that runs ``args.config``'s PIM device; ``geometry``
    names the configuration with its channels and banks, as the commands' headers print it."""
    from hw.config import preset

    cfg = preset(args.config)
    return _console(), cfg, f"{args.config}: {cfg.pim.channels} channels x {cfg.pim.banks} banks"


def cmd_demo(args) -> int:
    con, cfg, geometry = _pim_device(args)
    p = cfg.pim
    con.print(f"[bold]IANUS-RTL demo[/]: one generated token's FC GEMVs of a GPT-2-small decoder layer through "
              f"the host driver -> AXI4 -> registers -> PCU -> memory controllers -> PIM device RTL "
              f"({geometry}, {cfg.clocks.pim_mhz:.0f} MHz), "
              f"simulated with {args.sim}; bit-exact against the functional model, protocol checker on every "
              f"channel.")
    con.print("building and simulating (the first run builds the Verilator model, several minutes; "
              "log in build/logs/) ...")
    t0 = time.perf_counter()
    res = run_proto_layer(args.config, sim=args.sim, waves=args.waves)
    table = _results_table("through the prototype (driver, AXI, PCU, controllers, device)",
                           ("operation", "K x N", "cycles", "time (us)", "internal GB/s", "of peak",
                            "max |err| vs fp64", "bound"))
    for r in res["ops"]:
        table.add_row(r["name"], r["shape"], f"{r['cycles']:,}", f"{r['cycles'] / cfg.clocks.pim_mhz:.2f}",
                      f"{r['internal_gbps']:.0f}", f"{r['internal_gbps'] / r['peak_gbps']:.1%}",
                      f"{r['max_abs_err']:.2e}", f"{r['max_bound']:.1e}")
    con.print(table)
    k = res["counters"]
    refs = [k[f"ch{c}_refreshes"] for c in range(p.channels)]
    con.print(f"cycles per operation include writing x over AXI, the macro commands and reading y back; "
              f"refreshes per channel {refs}; total {res['total_cycles']:,} cycles simulated "
              f"(weights entered through the simulation back door: {res['backdoor_bytes'] / 2**20:.1f} MiB)")
    con.print(f"simulation wall time {res['wall_s']:.1f} s, total {time.perf_counter() - t0:.1f} s")
    con.print("PIM device alone with an optimal command schedule: `ianus gemv --shapes 768x3072g` "
              "(cycles against the analytical lower bound)")
    return 0


def parse_shapes(text: str, config: str) -> list[tuple[int, int, bool]]:
    """``--shapes``: ``KxN`` / ``KxNg`` entries, each a GEMV that fits the configuration's PIM rows."""
    from firmware.pim import GemvLayout
    from hw.config import preset
    from sim.usage import UsageError

    cfg = preset(config)
    out = []
    for item in (s.strip() for s in str(text).split(",")):
        k, sep, n = item.lower().partition("x")
        act = n.endswith("g")
        n = n[:-1] if act else n
        if not (sep and k.isdigit() and n.isdigit()) or int(k) < 1 or int(n) < 1:
            raise UsageError(f"--shapes: {item!r} is not KxN or KxNg with positive integers K and N "
                             f"(e.g. 768x3072g)")
        K, N = int(k), int(n)
        try:
            GemvLayout(cfg, K, N, base_row=0)
        except ValueError as e:
            raise UsageError(f"--shapes {item}: does not fit configuration {config!r}: {e}") from None
        out.append((K, N, act))
    return out


def cmd_gemv_table(args) -> int:
    con, cfg, geometry = _pim_device(args)
    p = cfg.pim
    con.print(f"[bold]PIM GEMV[/] on the PIM device RTL alone ({geometry}, {p.gb_bytes} B global buffer, "
              f"{cfg.clocks.pim_mhz:.0f} MHz command clock), commands placed at their earliest legal cycle by the "
              f"test sequencer, simulated with {args.sim}, protocol checker on every channel.")
    t0 = time.perf_counter()
    shapes = parse_shapes(args.shapes, args.config)
    names = {(k, n, act): name for name, k, n, act in GPT2_SMALL_FC}
    res = run_pim_gemvs(args.config, shapes, sim=args.sim, waves=args.waves)
    table = _results_table("PIM GEMV, bit-exact against the golden model",
                           ("operation", "K x N", "cycles", "time (us)", "REFs", "bound*", "efficiency*",
                            "internal GB/s", "of peak", "max |err| vs fp64"))
    tot_cycles = 0
    tot_bytes = 0
    for shape, r in zip(shapes, res["shapes"], strict=True):
        name = names.get(shape, "GEMV" + (" + GELU" if shape[2] else ""))
        tot_cycles += r["cycles"]
        tot_bytes += r["weight_bytes"]
        table.add_row(name, r["shape"], f"{r['cycles']:,}", f"{r['cycles'] / cfg.clocks.pim_mhz:.2f}",
                      str(r["refreshes"]), f"{r['amortized_bound']:,.0f}", f"{r['efficiency']:.3f}",
                      f"{r['internal_gbps']:.0f}", f"{r['internal_gbps'] / r['peak_gbps']:.1%}",
                      f"{r['max_abs_err']:.2e}")
    con.print(table)
    con.print("* bound: analytical lower bound from the timing parameters (firmware.pim.gemv_lower_bound); "
              "efficiency = bound / measured, both with refresh charged at tRFC per tREFI")
    gbps = tot_bytes / (tot_cycles / (cfg.clocks.pim_mhz * 1e6)) / 1e9
    con.print(f"all: {tot_cycles:,} cycles = {tot_cycles / cfg.clocks.pim_mhz:.2f} us at "
              f"{cfg.clocks.pim_mhz:.0f} MHz; weights streamed {tot_bytes / 2**20:.1f} MiB at {gbps:.0f} GB/s "
              f"internal ({gbps / cfg.pim_peak_internal_gbps:.1%} of the {cfg.pim_peak_internal_gbps:.0f} GB/s "
              f"peak); device refreshes so far {res['n_ref']}, MAC column operations {res['n_mac']:,}")
    con.print(f"simulation wall time {res['wall_s']:.1f} s, total {time.perf_counter() - t0:.1f} s")
    if args.waves:
        con.print(f"waves: build/tests/cli_gemv_{args.config}_{args.sim}-{args.sim}/dump.fst")
    return 0


def cmd_gemv(args) -> int:
    shapes = parse_shapes(args.shapes, args.config)        # before the build: bad shapes fail at once
    if not args.json:
        return cmd_gemv_table(args)
    res = run_pim_gemvs(args.config, shapes, sim=args.sim, waves=args.waves)
    print(json.dumps(res, indent=2))
    return 0


def cmd_config(args) -> int:
    from hw.config import preset

    if args.config == "ianus":
        summary = preset(args.config).summary()
    else:       # what `ianus run` simulates (sim.run.soc_config: the tiny SoC has more rows than the preset)
        from sim.run import soc_config

        summary = soc_config(args.config).summary()
        if soc_config(args.config) != preset(args.config):
            summary["note"] = (f"the SoC configuration of `ianus run`; the {args.config!r} preset of the PIM "
                               f"unit tests has {preset(args.config).pim.rows} rows per bank")
        summary["run_token_limits"] = _token_limits(args.config)
    print(json.dumps(summary, indent=2))
    return 0


def _run_or_batch(a) -> int:
    """``ianus run``; with ``--batch B`` batched generation (:func:`sim.batch_run.main_batch`, issue 18)."""
    from sim import run as run_mod
    if getattr(a, "batch", None):
        from sim.batch_run import main_batch
        return main_batch(run_mod.validate_args(a))
    return run_mod.main_run(run_mod.fill_defaults(a))


def _token_limits(config: str, max_layers: int = 16) -> dict:
    """``ianus run``'s limits: per layer count of the built-in GPT-2 shape, the most tokens (prefill +
    generated) that fit the device memory under each kind of weight layout (0: the layers do not fit)."""
    from firmware.gpt2 import GptShape
    from sim.run import base_shape, soc_config, token_limit

    cfg = soc_config(config)
    base = base_shape(config)
    out = {}
    for layers in range(1, max_layers + 1):
        shape = GptShape(base.d_model, base.heads, layers)
        lim = {"ianus/naive": token_limit(cfg, shape, "ianus"), "npu-mem": token_limit(cfg, shape, "npu-mem")}
        if not any(lim.values()):
            break
        out[f"{layers} layer(s) of d_model {base.d_model}"] = lim
    return out


def cmd_synth(args) -> int:
    from hw import synth

    return synth.main(args.rest)


def cmd_bench(args) -> int:
    from sim import bench

    return bench.main(args.rest)


class _HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Descriptions as written; every option's default in its help (as ArgumentDefaultsHelpFormatter, but also
    for options without help text, and not for flags or unset options, whose help says what they do)."""

    def _get_help_string(self, action):
        text = action.help or ""
        default = action.default
        if (action.option_strings and not any(default is v for v in (None, False, argparse.SUPPRESS))
                and action.nargs != 0 and "%(default)" not in text):
            text += " (default: %(default)s)"
        return text


class _Usage(Exception):
    """An argparse error, raised instead of printing usage and exiting (main prints one line)."""

    def __init__(self, prog, message):
        super().__init__(message)
        self.prog = prog


class IanusParser(argparse.ArgumentParser):
    """``ianus``'s parsers: defaults shown in ``--help``; an error is one line (main prints it, exit 2);
    every subcommand takes ``--debug`` too."""

    def __init__(self, *a, **kw):
        kw.setdefault("formatter_class", _HelpFormatter)
        super().__init__(*a, **kw)
        if self.prog != "ianus":
            self.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                              help="show the Python traceback of an error")

    def add_argument(self, *args, **kw):
        # argparse prints no help line at all (so no default) for an option without help text
        if kw.get("help") is None and args and args[0].startswith("-") and not any(
                kw.get("default") is v for v in (None, False, argparse.SUPPRESS)):
            kw["help"] = "(default: %(default)s)"
        return super().add_argument(*args, **kw)

    def error(self, message):
        raise _Usage(self.prog, message)


# Exceptions that mean "the input was rejected before anything ran" (exit 2); any other is a run failure.
def _usage_errors() -> tuple:
    from firmware.asm import AsmError
    from firmware.compiler import CompileError
    from firmware.gpt2 import WeightsError
    from hw.config import ConfigError
    from hw.spec.soc_isa import IsaError
    from sim.usage import UsageError

    return (UsageError, WeightsError, CompileError, ConfigError, AsmError, IsaError)


def _one_line(e: BaseException) -> str:
    text = " ".join(str(e).split())
    return text if isinstance(e, _usage_errors()) else f"{type(e).__name__}: {text}" if text else type(e).__name__


def _stdout_gone():
    """stdout's reader went away (``ianus config | head``): drop further output quietly."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    os.close(devnull)
    return 141          # 128 + SIGPIPE, what a shell reports for a command its pipe's reader closed


def _dispatch(parser, argv) -> int:
    """Parse and run; errors become one line on stderr (exit 2 for usage errors, 1 for run failures,
    130 on Ctrl-C), the traceback only with --debug."""
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    try:
        args, extra = parser.parse_known_args(argv)
        if getattr(args, "passthrough", False):
            args.rest = extra + list(getattr(args, "rest", []))
        elif extra:
            raise _Usage(f"ianus {args.cmd}", f"unrecognized arguments: {' '.join(extra)}")
    except _Usage as e:
        print(f"{e.prog}: error: {e} (see {e.prog} --help)", file=sys.stderr)
        return 2
    except SystemExit as e:         # --help, --version
        return e.code if isinstance(e.code, int) else 0
    name = f"ianus {args.cmd}"
    try:
        code = args.func(args)
        sys.stdout.flush()
        return code
    except BrokenPipeError:
        return _stdout_gone()
    except KeyboardInterrupt:
        print(f"{name}: interrupted", file=sys.stderr)
        return 130
    except SystemExit as e:
        if isinstance(e.code, int) or e.code is None:
            return e.code or 0
        print(f"{name}: error: {e.code}", file=sys.stderr)
        return 1
    except Exception as e:
        if debug:
            raise
        usage = isinstance(e, _usage_errors())
        try:
            sys.stdout.flush()
        except BrokenPipeError:
            _stdout_gone()
        print(f"{name}: error: {_one_line(e)}" + ("" if usage else " (--debug shows the traceback)"),
              file=sys.stderr)
        return 2 if usage else 1


def main(argv=None) -> int:
    from sim.run import RTL_CONFIGS

    parser = IanusParser(prog="ianus", description=__doc__)
    parser.add_argument("--debug", action="store_true", help="show the Python traceback of an error")
    sub = parser.add_subparsers(dest="cmd", required=True, parser_class=IanusParser)
    d = sub.add_parser("demo", help="the FPGA-prototype demo (make demo-proto; make demo is `ianus run`)")
    d.add_argument("--config", default="default", choices=["tiny", "default"])
    d.add_argument("--sim", default="verilator", choices=["verilator", "icarus"])
    d.add_argument("--waves", action="store_true", help="write an FST of the run")
    d.set_defaults(func=cmd_demo)
    g = sub.add_parser("gemv", help="PIM GEMVs of given shapes (KxN or KxNg for GELU, comma-separated)")
    g.add_argument("--shapes", default="768x2304,768x768,768x3072g,3072x768",
                   help="KxN or KxNg (GELU in the AF units), comma-separated; default: the GPT-2-small FCs")
    g.add_argument("--json", action="store_true", help="print the raw metrics as JSON")
    g.add_argument("--config", default="default", choices=RTL_CONFIGS)
    g.add_argument("--sim", default="verilator", choices=["verilator", "icarus"])
    g.add_argument("--waves", action="store_true")
    g.set_defaults(func=cmd_gemv)
    from sim import run as run_mod

    r = run_mod.add_parser(sub)
    r.set_defaults(func=_run_or_batch)
    c = sub.add_parser("config", help="print a configuration")
    c.add_argument("--config", default="default", choices=["tiny", "default", "ianus"])
    c.set_defaults(func=cmd_config)
    # synth and bench: every argument goes to python -m hw.synth / sim.bench (`ianus bench --quick`).
    s = sub.add_parser("synth", help="FPGA synthesis (options of python -m hw.synth)", add_help=False)
    s.add_argument("rest", nargs=argparse.REMAINDER)
    s.set_defaults(func=cmd_synth, passthrough=True)
    b = sub.add_parser("bench", help="benchmarks (options of python -m sim.bench: --quick, --only)", add_help=False)
    b.add_argument("rest", nargs=argparse.REMAINDER)
    b.set_defaults(func=cmd_bench, passthrough=True)
    from sim import project as project_mod

    p = project_mod.add_parser(sub)
    p.set_defaults(func=project_mod.main_project)
    from sim import sweep as sweep_mod

    sweep_mod.add_parser(sub)
    from sim.lm import generate as generate_mod

    gen = generate_mod.add_parser(sub)
    gen.set_defaults(func=generate_mod.main_generate)
    return _dispatch(parser, argv)


if __name__ == "__main__":
    sys.exit(main())
