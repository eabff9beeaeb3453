"""``make bench``: run every benchmark module in ``sim/benchmarks`` and print one JSON object per line.

Usage: ``python -m sim.bench [--quick] [--only NAME[,NAME...]] [--jobs N]``

Modules run as child processes (``python -m sim.bench --child NAME``), ``--jobs`` of them at once (default:
the machine's cores, at most 2), so a 2-core machine runs two modules' simulations side by side. A module
whose figures are wall-clock speeds (simulated cycles per second, points per second, wall seconds) sets
``EXCLUSIVE = True`` and runs alone, after the others, so no other module's work is on the machine while it
measures. The others start longest first (``EXPECTED_S``). Each line a child prints is passed on as it comes (lines of different modules interleave; every
line names its ``module``); ``# NAME: S s`` on stderr gives each module's wall time, and the last line is
``bench_wall_s``, the whole run's wall time against the 30-minute budget.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import pkgutil
import subprocess
import sys
import threading
import time
import traceback

import sim.benchmarks

BUDGET_S = 30 * 60


def discover():
    for info in sorted(pkgutil.iter_modules(sim.benchmarks.__path__), key=lambda i: i.name):
        yield info.name, importlib.import_module(f"sim.benchmarks.{info.name}")


def _run_here(name, module, quick, out) -> bool:
    """Run one module in this process; its rows go to ``out``. Returns False when it raised."""
    try:
        for result in module.run(quick=quick):
            result.setdefault("module", name)
            print(json.dumps(result), file=out, flush=True)
        return True
    except Exception as exc:  # report and go on with the other benchmarks
        traceback.print_exc(file=sys.stderr)
        print(json.dumps({"name": f"{name}_error", "value": 1, "unit": "error", "module": name,
                          "error": f"{type(exc).__name__}: {exc}"}), file=out, flush=True)
        return False


class _Child:
    """One module in a child process; a thread copies its JSON lines to ``out`` as they come."""

    def __init__(self, name, quick, out, lock):
        cmd = [sys.executable, "-m", "sim.bench", "--child", name] + (["--quick"] if quick else [])
        self.name, self.t0 = name, time.perf_counter()
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
        self.errors = 0

        def pump():
            for line in self.proc.stdout:
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except ValueError:          # not a row: keep stdout for rows, show it on stderr
                    print(line, end="", file=sys.stderr)
                    continue
                if row.get("unit") == "error":
                    self.errors += 1
                with lock:
                    print(json.dumps(row), file=out, flush=True)

        self.thread = threading.Thread(target=pump, daemon=True)
        self.thread.start()

    def finished(self) -> bool:
        return self.proc.poll() is not None

    def close(self) -> bool:
        """Wait for the copy thread; True when the module ran without error."""
        self.thread.join()
        print(f"# {self.name}: {time.perf_counter() - self.t0:.1f} s", file=sys.stderr, flush=True)
        return self.proc.returncode == 0 and self.errors == 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="smaller problem sizes")
    parser.add_argument("--only", default="", help="comma-separated benchmark module names")
    parser.add_argument("--jobs", type=int, default=min(2, os.cpu_count() or 1),
                        help="modules run at once (EXCLUSIVE modules always run alone)")
    parser.add_argument("--child", default="", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.jobs < 1:
        parser.error(f"--jobs must be at least 1, not {args.jobs}")
    # Simulators and builds print to stdout; keep stdout for the JSON lines only.
    out = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)
    if args.child:
        module = importlib.import_module(f"sim.benchmarks.{args.child}")
        return 0 if _run_here(args.child, module, args.quick, out) else 1

    only = {s for s in args.only.split(",") if s}
    modules = [(n, m) for n, m in discover() if not only or n in only]
    unknown = only - {n for n, _ in modules}
    if unknown:
        parser.error(f"unknown benchmark module(s): {', '.join(sorted(unknown))}")
    # Longest first (``EXPECTED_S``, a module's wall time measured on this machine), so the long ones overlap
    # the many short ones instead of running last with a core idle.
    shared = [n for n, m in sorted(modules, key=lambda nm: -getattr(nm[1], "EXPECTED_S", 60))
              if not getattr(m, "EXCLUSIVE", False)]
    alone = [n for n, m in modules if getattr(m, "EXCLUSIVE", False)]
    t_start = time.perf_counter()
    lock = threading.Lock()
    failed = 0
    running: list[_Child] = []
    pending = list(shared)
    while pending or running:
        while pending and len(running) < args.jobs:
            running.append(_Child(pending.pop(0), args.quick, out, lock))
        time.sleep(0.2)
        for child in [c for c in running if c.finished()]:
            running.remove(child)
            failed += not child.close()
    for name in alone:
        child = _Child(name, args.quick, out, lock)
        child.proc.wait()
        failed += not child.close()
    wall = time.perf_counter() - t_start
    print(f"# total: {wall:.1f} s", file=sys.stderr)
    print(json.dumps({"name": "bench_wall_s", "value": round(wall, 1), "unit": "s", "jobs": args.jobs,
                      "modules": len(modules), "quick": args.quick, "budget_s": BUDGET_S,
                      "within_budget": wall <= BUDGET_S, "module": "bench"}), file=out, flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
