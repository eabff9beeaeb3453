"""Helpers for building components (issue 16): :class:`Shared`, for ``elaborate`` methods written in parts (the
parts of one component's logic share their signals through a namespace instead of one long function's locals),
and :func:`check_pow2` / :func:`log2` for their parameters."""

from __future__ import annotations

from types import SimpleNamespace

__all__ = ["Shared", "check_pow2", "log2"]


class Shared(SimpleNamespace):
    """Signals and constants that the parts of one ``elaborate`` hand to each other."""

    def update(self, **names) -> None:
        self.__dict__.update(names)


def check_pow2(what: str, value, minimum: int = 1) -> None:
    """Raise ``ValueError`` unless ``value`` is an integer power of two of at least ``minimum``."""
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum or value & (value - 1):
        raise ValueError(f"{what} must be a power of two of at least {minimum}, not {value!r}")


def log2(n: int) -> int:
    """The base-2 logarithm of a power of two ``n``."""
    return n.bit_length() - 1
