"""The system configuration: :mod:`hw.spec.config` (the parameter classes and their checks) and
:mod:`hw.spec.presets` (the preset configurations), re-exported here under the name every part of the project
has imported since the start. Both live in the spec layer (issue 16), which imports nothing else of the
project, so the firmware and the models read the configuration without the RTL."""

from .spec.config import *  # noqa: F403  (the classes and constants, hw.spec.config.__all__)
from .spec.config import __all__ as _config_all
from .spec.presets import PRESETS, preset

__all__ = [*_config_all, "preset", "PRESETS"]
