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


def _vector(name):
    from .npu.vector import VectorUnit

    return lambda: VectorUnit.from_config(preset(name))


def _matrix(name):
    from .npu.matrix_unit import MatrixUnit

    return lambda: MatrixUnit(preset(name))


def _soc(name):
    def factory():
        from .pim import device_factory
        from .soc import SocTop

        cfg = preset(name)
        return SocTop(cfg, device_factory(cfg))

    def sources():
        from .gen import verilog_for
        from .npu.systolic import PE_MODULE, ProcessingElement
        from .npu.vector import LANE_MODULE, VectorLane
        from .pim import device_sources

        return [*device_sources(preset(name)), verilog_for(lambda: ProcessingElement(), name=PE_MODULE, key="pe"),
                verilog_for(lambda: VectorLane(), name=LANE_MODULE, key="lane")]

    return factory, sources


BLOCKS = {
    "mac16": (_mac16, lambda: []),
    "pim_device_tiny": _pim_device("tiny"),
    "pim_device_default": _pim_device("default"),
    "vector_unit_tiny": (_vector("tiny"), lambda: []),
    "vector_unit_default": (_vector("default"), lambda: []),
    "matrix_unit_tiny": (_matrix("tiny"), lambda: []),
    "matrix_unit_default": (_matrix("default"), lambda: []),
    "soc_tiny": _soc("tiny"),
    "soc_default": _soc("default"),
}
