"""The major blocks written by ``make verilog`` (``python -m hw.blocks``): name -> (factory, extra sources).

Each block is written as one self-contained Verilog file under
``build/verilog/blocks/``: the block's own module followed by the modules it
instantiates by name (PIM banks, storage), and linted (:func:`hw.gen.lint`).
"""

import sys
from pathlib import Path

from .config import preset
from .gen import BUILD_ROOT, ROOT, lint, verilog_for


def _mac16():
    from .mac_unit import MacUnit

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
        from .npu.systolic import pe_for
        from .npu.vector import LANE_MODULE, VectorLane
        from .pim import device_sources

        pe_name, pe_factory, pe_key = pe_for(preset(name).npu)
        return [*device_sources(preset(name)), verilog_for(pe_factory, name=pe_name, key="pe" + pe_key),
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


def write_block(name: str) -> Path:
    factory, sources = BLOCKS[name]
    out = BUILD_ROOT / "verilog" / "blocks"
    out.mkdir(parents=True, exist_ok=True)
    path = verilog_for(factory, name, key=name)
    files = [path] + [Path(s) for s in sources()]
    target = out / f"{name}.v"
    target.write_text("\n".join(f.read_text() for f in files))
    return target


def main(argv=None) -> int:
    import argparse

    parser = argparse.ArgumentParser(description="Write every major block as Verilog under build/verilog/blocks "
                                                 "and lint it (verilator --lint-only -Wall + hw/verilog/lint_waivers.vlt)")
    parser.add_argument("blocks", nargs="*", help=f"blocks (default all: {', '.join(BLOCKS)})")
    parser.add_argument("--no-lint", action="store_true")
    args = parser.parse_args(argv)
    failed = 0
    for name in args.blocks or BLOCKS:
        target = write_block(name)
        msg = f"{target.relative_to(ROOT)}  ({sum(1 for _ in target.open())} lines)"
        if not args.no_lint:
            warnings = lint(target, name)
            msg += "  lint clean" if not warnings else f"  {len(warnings)} lint warnings"
            if warnings:
                failed += 1
                print("\n".join(warnings[:20]), file=sys.stderr)
        print(msg, flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
