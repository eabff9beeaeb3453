"""``make bench``: run every benchmark module in ``sim/benchmarks`` and print one JSON object per line.

Usage: ``python -m sim.bench [--quick] [--only NAME[,NAME...]]``
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import pkgutil
import sys
import time
import traceback

import sim.benchmarks


def discover():
    for info in sorted(pkgutil.iter_modules(sim.benchmarks.__path__), key=lambda i: i.name):
        yield info.name, importlib.import_module(f"sim.benchmarks.{info.name}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="smaller problem sizes")
    parser.add_argument("--only", default="", help="comma-separated benchmark module names")
    args = parser.parse_args(argv)
    only = {s for s in args.only.split(",") if s}
    # Simulators and builds print to stdout; keep stdout for the JSON lines only.
    out = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)
    failed = 0
    for name, module in discover():
        if only and name not in only:
            continue
        t0 = time.perf_counter()
        try:
            for result in module.run(quick=args.quick):
                result.setdefault("module", name)
                print(json.dumps(result), file=out, flush=True)
        except Exception as exc:  # report and go on with the other benchmarks
            failed += 1
            traceback.print_exc(file=sys.stderr)
            print(json.dumps({"name": f"{name}_error", "value": 1, "unit": "error", "module": name,
                              "error": f"{type(exc).__name__}: {exc}"}), file=out, flush=True)
        print(f"# {name}: {time.perf_counter() - t0:.1f} s", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
