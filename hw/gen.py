"""Verilog generation: cached conversion of Amaranth components, and ``make verilog``.

:func:`verilog_for` converts a component to ``build/verilog/<name>-<hash>.v``,
cached by the name, a key describing its parameters and the source of every
``hw/`` file. ``python -m hw.gen`` writes the Verilog of the major blocks for
the tiny and default configurations.
"""

import functools
import hashlib
import os
import sys
from pathlib import Path

from filelock import FileLock

__all__ = ["ROOT", "BUILD_ROOT", "verilog_for", "sha"]

ROOT = Path(__file__).resolve().parent.parent
BUILD_ROOT = Path(os.environ.get("IANUS_BUILD_DIR", ROOT / "build"))


def sha(*parts) -> str:
    h = hashlib.sha256()
    for part in parts:
        h.update(part if isinstance(part, bytes) else str(part).encode())
        h.update(b"\0")
    return h.hexdigest()[:16]


# Tables outside hw/ that the RTL reads (the SoC instruction set, the SoC register map).
FIRMWARE_TABLES = ("firmware/isa.py", "firmware/soc_regs.py")


@functools.cache
def _hw_source_hash() -> str:
    """Hash of every generator source file: a change to any of them invalidates cached Verilog."""
    h = hashlib.sha256()
    tables = [ROOT / f for f in FIRMWARE_TABLES if (ROOT / f).exists()]
    for path in sorted((ROOT / "hw").rglob("*.py")) + sorted((ROOT / "hw").rglob("*.v")) + tables:
        h.update(path.relative_to(ROOT).as_posix().encode())
        h.update(path.read_bytes())
    return h.hexdigest()


def verilog_for(factory, name: str, key: str = "") -> Path:
    """Verilog for the component ``factory()`` as ``build/verilog/<name>-<hash>.v``.

    Cached by ``name``, ``key`` (describe every parameter of the component in
    it) and the source of every ``hw/`` file, so unchanged designs are not
    converted again.
    """
    from amaranth.back import verilog

    out_dir = BUILD_ROOT / "verilog"
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{name}-{sha(name, key, _hw_source_hash())}.v"
    with FileLock(str(path) + ".lock"):
        if not path.exists():
            component = factory() if callable(factory) and not hasattr(factory, "elaborate") else factory
            text = verilog.convert(component, name=name, emit_src=False)
            tmp = path.with_suffix(".tmp")
            tmp.write_text(text)
            tmp.replace(path)
    return path




LINT_WAIVERS = ROOT / "hw" / "verilog" / "lint_waivers.vlt"


def lint(path: Path, top: str) -> list[str]:
    """``verilator --lint-only -Wall`` with the project's waivers (:data:`LINT_WAIVERS`); the warnings left."""
    import subprocess

    proc = subprocess.run(["verilator", "--lint-only", "-Wall", str(LINT_WAIVERS), str(path), "--top-module", top],
                          capture_output=True, text=True)
    return [line for line in proc.stderr.splitlines() if line.startswith("%")]


def write_block(name: str) -> Path:
    from hw.blocks import BLOCKS

    factory, sources = BLOCKS[name]
    out = BUILD_ROOT / "verilog" / "blocks"
    out.mkdir(parents=True, exist_ok=True)
    path = verilog_for(factory, name, key=name)
    files = [path] + [Path(s) for s in sources()]
    target = out / f"{name}.v"
    target.write_text("\n".join(f.read_text() for f in files))
    return target


def main(argv=None) -> int:
    import argparse

    from hw.blocks import BLOCKS

    parser = argparse.ArgumentParser(description="Write every major block as Verilog under build/verilog/blocks "
                                                 "and lint it (verilator --lint-only -Wall + hw/verilog/lint_waivers.vlt)")
    parser.add_argument("blocks", nargs="*", help=f"blocks (default all: {', '.join(BLOCKS)})")
    parser.add_argument("--no-lint", action="store_true")
    args = parser.parse_args(argv)
    failed = 0
    for name in args.blocks or BLOCKS:
        target = write_block(name)
        msg = f"{target.relative_to(ROOT)}  ({sum(1 for _ in target.open())} lines)"
        if not args.no_lint:
            warnings = lint(target, name)
            msg += "  lint clean" if not warnings else f"  {len(warnings)} lint warnings"
            if warnings:
                failed += 1
                print("\n".join(warnings[:20]), file=sys.stderr)
        print(msg, flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
