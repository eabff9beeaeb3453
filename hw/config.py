"""The system configuration: :mod:`hw.spec.config` (the parameter classes and their checks) and
:mod:`hw.spec.presets` (the preset configurations), re-exported here under the name every part of the project
has imported since the start. Both live in the spec layer (issue 16), which imports nothing else of the
project, so the firmware and the models read the configuration without the RTL."""

from .spec.config import (
    COMBINE_ROW_BIT,
    TIMING_NS_IANUS,
    Clocks,
    ConfigError,
    DramTiming,
    NpuConfig,
    PimGeometry,
    SramPimConfig,
    SystemConfig,
    timing_from_ns,
)
from .spec.presets import PRESETS, preset

__all__ = ["ConfigError", "COMBINE_ROW_BIT", "PimGeometry", "DramTiming", "NpuConfig", "Clocks", "SramPimConfig",
           "SystemConfig", "TIMING_NS_IANUS", "timing_from_ns", "preset", "PRESETS"]
