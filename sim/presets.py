"""The configurations the SoC RTL is built for, and which of them are tiny (shared by :mod:`sim.run` and the
RTL runner :mod:`sim.tb.soc_run`, which must not import each other)."""

__all__ = ["RTL_CONFIGS", "is_tiny"]

RTL_CONFIGS = ["tiny", "default", "tiny-dualrb", "default-dualrb", "tiny-il", "default-il", "default-4ch",
               "tiny-p4", "default-p4", "tiny-hpim", "default-hpim", "tiny-w4", "default-w4"]
"""Configurations the SoC RTL is built for (``ianus run --config``). ``default-w4``'s PIM units (64 BF16
multipliers and a 64-input FP32 tree per bank) make a very large Verilator model: use it with ``--backend model``."""


def is_tiny(name: str) -> bool:
    """``tiny`` or one of its variants (``tiny-dualrb``): the tiny GPT shape and the SoC's 64 rows."""
    return name == "tiny" or name.startswith("tiny-")
