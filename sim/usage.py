"""Checks of command-line input, shared by the ``ianus`` subcommands.

Every check raises :class:`UsageError` with one line that names the option, the value and the
limit ("--prefill must be an integer >= 1, not -3"). ``ianus`` prints it without a traceback and
exits with status 2 (:func:`sim.cli.main`). The checks run before anything is built, simulated or
written; output paths are checked by creating (and removing) a file beside them, so a run does not
fail at its end on a path it could have rejected at its start.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

__all__ = ["UsageError", "check_int", "parse_int_list", "parse_names", "check_output_path", "check_input_path",
           "check_output_dir", "write_atomic"]


class UsageError(ValueError):
    """Bad command-line input: ``ianus`` prints the message on one line and exits with status 2."""


def check_int(option: str, value, lo: int | None = None, hi: int | None = None) -> int:
    """``value`` as an int in ``[lo, hi]`` (either bound may be None)."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise UsageError(f"{option} must be an integer, not {value!r}")
    if lo is not None and value < lo or hi is not None and value > hi:
        rng = (f"in {lo}..{hi:,}" if lo is not None and hi is not None
               else f">= {lo}" if lo is not None else f"<= {hi:,}")
        raise UsageError(f"{option} must be an integer {rng}, not {value:,}")
    return value


def parse_int_list(option: str, text: str, lo: int | None = None, hi: int | None = None,
                   allow_empty: bool = False) -> list[int]:
    """A comma-separated list of integers in ``[lo, hi]``."""
    items = [s.strip() for s in str(text).split(",") if s.strip()]
    if not items and not allow_empty:
        raise UsageError(f"{option} needs at least one integer, not {text!r}")
    out = []
    for s in items:
        try:
            v = int(s, 10)
        except ValueError:
            raise UsageError(f"{option}: {s!r} is not an integer (in {text!r})") from None
        out.append(check_int(option, v, lo, hi))
    return out


def parse_names(option: str, text: str, allowed) -> list[str]:
    """A comma-separated list of names, each one of ``allowed``."""
    allowed = list(allowed)
    names = [s.strip() for s in str(text).split(",") if s.strip()]
    if not names:
        raise UsageError(f"{option} needs at least one of {', '.join(allowed)}, not {text!r}")
    for n in names:
        if n not in allowed:
            raise UsageError(f"{option}: unknown name {n!r} (choose from {', '.join(allowed)})")
    return names


def check_input_path(option: str, path) -> Path:
    """An existing, readable regular file."""
    p = Path(path)
    if not p.exists():
        raise UsageError(f"{option} {path} does not exist")
    if p.is_dir():
        raise UsageError(f"{option} {path} is a directory, not a file")
    if not os.access(p, os.R_OK):
        raise UsageError(f"{option} {path} is not readable")
    return p


def check_output_path(option: str, path, suffix: str | None = None, parents_ok: bool = False) -> Path:
    """A path a file can be written to: not a directory, its parent an existing writable directory
    (with ``parents_ok``, missing parents are allowed when the nearest existing one is a writable
    directory: the writer creates them). ``suffix`` (".npy") is appended when missing, as numpy does,
    so the path returned is the one that will be written. Writability is tested by creating and
    removing a temporary file; nothing else is created."""
    p = Path(path)
    if str(path).endswith(os.sep) or p.is_dir():
        raise UsageError(f"{option} {path} is a directory; give a file name")
    if suffix and p.suffix != suffix:
        p = p.with_name(p.name + suffix)
        if p.is_dir():
            raise UsageError(f"{option} {path}: {p} (the name with {suffix}) is a directory")
    parent = p.parent
    if parents_ok:
        while not parent.exists() and not parent.is_symlink() and parent != parent.parent:
            parent = parent.parent
    if not parent.exists():
        raise UsageError(f"{option} {path}: directory {parent} does not exist")
    if not parent.is_dir():
        raise UsageError(f"{option} {path}: {parent} is not a directory")
    if p.exists() and not os.access(p, os.W_OK):
        raise UsageError(f"{option} {path}: the file exists and is not writable")
    _probe_writable(option, path, parent)
    return p


def _probe_writable(option: str, path, directory: Path) -> None:
    """:class:`UsageError` unless a file can be created in ``directory`` (one is, and removed again)."""
    try:
        fd, probe = tempfile.mkstemp(dir=directory, prefix=".ianus-probe-")
    except OSError as e:
        raise UsageError(f"{option} {path}: directory {directory} is not writable ({e.strerror})") from None
    os.close(fd)
    os.unlink(probe)


def check_output_dir(option: str, path) -> Path:
    """A directory outputs can be written into: an existing writable directory, or a path whose nearest
    existing parent is one (the writer creates the rest)."""
    p = Path(path)
    if p.exists() and not p.is_dir():
        raise UsageError(f"{option} {path} is a file, not a directory")
    base = p
    while not base.exists() and base != base.parent:
        base = base.parent
    if not base.is_dir():
        raise UsageError(f"{option} {path}: {base} is not a directory")
    _probe_writable(option, path, base)
    return p


def write_atomic(path, write) -> None:
    """Call ``write(file object)`` on a temporary file beside ``path``, then rename it to ``path``:
    a failure leaves no partial file behind."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            write(fh)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)       # mkstemp's 0600 -> what open() would have given
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
