"""Macro PIM commands and the prototype's register map: moved to :mod:`hw.spec.macro` (one table for the PCU
RTL, the prototype top, the driver and the functional model).

This module re-exports it under its documented path, ``firmware.macro``.
"""

from hw.spec.macro import *  # noqa: F401,F403
from hw.spec.macro import __all__  # noqa: F401
