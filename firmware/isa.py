"""The SoC instruction set: moved to :mod:`hw.spec.soc_isa` (the hardware and the firmware read one table).

This module re-exports it under its documented path, ``firmware.isa``.
"""

from hw.spec.soc_isa import *  # noqa: F401,F403
from hw.spec.soc_isa import __all__  # noqa: F401
