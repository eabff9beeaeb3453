"""Stale documentation (issue 16): every repository path (``hw/...py``, ``sim/...json``, ...) and every dotted
project name (``hw.npu.spu.Spu``, ``firmware.pim.gemv_lower_bound``, ...) that a module docstring, a comment
or the README names must exist. Checked on the source with ``ast`` (nothing imported): a dotted name resolves
to its longest module prefix, and the next part must be a top-level name of that module (star re-exports
followed) or a submodule."""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SCANNED = ("hw", "firmware", "sim", "tests")
PATH_RE = re.compile(r"(?<![\w/.-])((?:hw|firmware|sim|tests)/[\w/.-]*\.(?:py|json|v|cpp|csv|md))")
NAME_RE = re.compile(r"(?<![\w./-])((?:hw|firmware|sim)\.[A-Za-z_][\w.]*)")
IGNORED_NAMES = re.compile(r"^sim\.(add_clock|add_testbench|add_process|run|run_until|reset)\b|\.__\w+__")
"""``sim.add_clock`` and the like are Amaranth ``Simulator`` objects called ``sim`` in the tests; dunder
attributes are Python's."""
EXAMPLES = {"tests/test_architecture.py", "tests/test_doc_refs.py"}
"""Files whose paths and names are made-up examples (the layering test's synthetic graphs, this file)."""
GENERATED = ("hw/verilog/lint_waivers.v",)
"""Paths written by a build step (``make verilog``), not stored in the repository."""


def _sources():
    for d in SCANNED:
        yield from sorted((ROOT / d).rglob("*.py"))
    yield ROOT / "README.md"
    yield ROOT / "Makefile"


_NAMES: dict[Path, set[str]] = {}


def _module_file(parts) -> Path | None:
    p = ROOT.joinpath(*parts)
    if p.with_suffix(".py").is_file():
        return p.with_suffix(".py")
    if (p / "__init__.py").is_file():
        return p / "__init__.py"
    return None


def _top_names(path: Path) -> set[str]:
    if path in _NAMES:
        return _NAMES[path]
    _NAMES[path] = names = set()
    tree = ast.parse(path.read_text())
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, (ast.Assign, ast.AnnAssign)):
            for target in node.targets if isinstance(node, ast.Assign) else [node.target]:
                names |= {x.id for x in ast.walk(target) if isinstance(x, ast.Name)}
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            for alias in node.names:
                if alias.name != "*":
                    names.add((alias.asname or alias.name).split(".")[0])
                    continue
                pkg = path.relative_to(ROOT).with_suffix("").parts
                base = pkg[:len(pkg) - node.level] if node.level else ()
                f = _module_file(base + tuple((node.module or "").split(".")))
                if f is not None:
                    names |= _top_names(f)
    return names


def _resolves(name: str) -> bool:
    parts = name.split(".")
    for k in range(len(parts), 0, -1):
        f = _module_file(parts[:k])
        if f is None:
            continue
        if k == len(parts):
            return True
        nxt = parts[k]
        return nxt in _top_names(f) or _module_file(parts[:k + 1]) is not None
    return False


def test_named_paths_and_modules_exist():
    stale = []
    for f in _sources():
        rel = str(f.relative_to(ROOT))
        if rel in EXAMPLES:
            continue
        text = f.read_text()
        for m in PATH_RE.finditer(text):
            p = m.group(1).rstrip(".")
            if p not in GENERATED and not (ROOT / p).exists():
                stale.append(f"{rel}: {p}")
        for m in NAME_RE.finditer(text):
            name = m.group(1).rstrip(".")
            if not IGNORED_NAMES.search(name) and not _resolves(name):
                stale.append(f"{rel}: {name}")
    assert not stale, "names that do not exist:\n" + "\n".join(sorted(set(stale)))


def test_the_check_sees_a_stale_name(tmp_path):
    """The resolver itself: a real name resolves, a misspelt one or a moved one does not."""
    assert _resolves("hw.npu.spu.Spu") and _resolves("hw.config.preset") and _resolves("firmware.isa.decode")
    assert not _resolves("hw.npu.spu.Spuu") and not _resolves("hw.arith.MacUnit") and not _resolves("sim.nothing")
