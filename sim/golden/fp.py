"""Golden model of the project's floating-point arithmetic: moved to :mod:`hw.spec.fp`.

This module re-exports it under its documented path, ``sim.golden.fp``.
"""

from hw.spec.fp import *  # noqa: F401,F403
from hw.spec.fp import __all__  # noqa: F401
