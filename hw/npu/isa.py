"""The NPU matrix unit's instruction set: moved to :mod:`hw.spec.matrix_isa` (read by the RTL and the firmware).

This module re-exports it for the matrix unit's RTL (``from .isa import ...``) and existing users.
"""

from ..spec.matrix_isa import *  # noqa: F401,F403
from ..spec.matrix_isa import __all__  # noqa: F401
