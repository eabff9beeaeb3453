"""Verilog generation: cached conversion of Amaranth components, and the lint wrapper.

:func:`verilog_for` converts a component to ``build/verilog/<name>-<hash>.v``,
cached by the name, a key describing its parameters and the source of every
``hw/`` file. ``make verilog`` (``python -m hw.blocks``) writes the Verilog of
the major blocks for the tiny and default configurations (:mod:`hw.blocks`).
This module imports nothing else of the project, so every block can use it.
"""

import functools
import hashlib
import os
import re
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


@functools.cache
def _hw_source_hash() -> str:
    """Hash of every generator source file: a change to any of them invalidates cached Verilog.

    The RTL imports nothing outside ``hw/`` (``tests/test_architecture.py`` checks it; the tables it shares
    with the firmware are in ``hw/spec/``), so ``hw/`` is every source the Verilog depends on.
    """
    h = hashlib.sha256()
    for path in sorted((ROOT / "hw").rglob("*.py")) + sorted((ROOT / "hw").rglob("*.v")):
        h.update(path.relative_to(ROOT).as_posix().encode())
        h.update(path.read_bytes())
    return h.hexdigest()


_INIT_WORD = re.compile(r"^(\s*)(\\\S+ |[A-Za-z_][\w$]*)\[(\d+)\] = (\d+)'[hdbo]([0-9a-fA-FxzXZ_]+);$")


def compact_memory_init(text: str, min_words: int = 8) -> str:
    """Rewrite all-zero memory initialisations as loops.

    Yosys writes a memory's initial contents as one assignment per word
    (``mem[0] = 512'h0; mem[1] = ...``). For the default SoC's scratchpads that
    is some 300,000 lines of ``initial`` code: Verilator turns it into a 20 MB
    C++ function that alone took minutes to compile. A block that sets words
    ``0 .. n-1`` of one memory to zero becomes the same assignment in a
    ``for`` loop (Verilator and Icarus run it identically); any other
    initialisation (ROM contents, say) is left as written.
    """
    lines = text.split("\n")
    out = []
    i = 0
    n_blocks = 0
    while i < len(lines):
        line = lines[i]
        if line.strip() == "initial begin":
            j = i + 1
            name = width = indent = None
            ok = True
            while j < len(lines) and lines[j].strip() != "end":
                m = _INIT_WORD.match(lines[j])
                if (m is None or int(m.group(3)) != j - i - 1 or m.group(5).strip("0_") != ""
                        or (name is not None and (m.group(2), m.group(4)) != (name, width))):
                    ok = False
                    break
                indent, name, width = m.group(1), m.group(2), m.group(4)
                j += 1
            words = j - i - 1
            if ok and j < len(lines) and words >= min_words:
                n_blocks += 1
                label = f"zero_init_{n_blocks}"
                out += [f"{line[:len(line) - len(line.lstrip())]}initial begin : {label}",
                        f"{indent}integer i;",
                        f"{indent}for (i = 0; i < {words}; i = i + 1)",
                        f"{indent}  {name}[i] = {width}'h0;",
                        lines[j]]
                i = j + 1
                continue
        out.append(line)
        i += 1
    return "\n".join(out)


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
            text = compact_memory_init(verilog.convert(component, name=name, emit_src=False))
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
