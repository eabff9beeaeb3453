"""The major blocks written by ``make verilog`` (``python -m hw.gen``): name -> (factory, extra sources).

Each block is written as one self-contained Verilog file under
``build/verilog/blocks/``: the block's own module followed by the modules it
instantiates by name (PIM banks, storage).
"""

from .config import preset


def _mac16():
    from .arith import MacUnit

    return MacUnit(16)


def _pim_device(name):
    from .pim import device_factory, device_sources

    cfg = preset(name)
    return device_factory(cfg), lambda: device_sources(cfg)


BLOCKS = {
    "mac16": (_mac16, lambda: []),
    "pim_device_tiny": _pim_device("tiny"),
    "pim_device_default": _pim_device("default"),
}
