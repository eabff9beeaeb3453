"""A helper for ``elaborate`` methods written in parts (issue 16): the parts of one component's logic share their
signals through a :class:`Shared` namespace instead of one long function's locals."""

from __future__ import annotations

from types import SimpleNamespace

__all__ = ["Shared"]


class Shared(SimpleNamespace):
    """Signals and constants that the parts of one ``elaborate`` hand to each other."""

    def update(self, **names) -> None:
        self.__dict__.update(names)
