"""AiM-style PIM device: command table, banks with processing units, channels, device."""

from pathlib import Path

from ..config import SystemConfig
from ..gen import ROOT, verilog_for

__all__ = ["device_sources", "device_factory", "STORAGE_V"]

STORAGE_V = ROOT / "hw" / "verilog" / "pim_storage.v"


def device_sources(cfg: SystemConfig, fp_impl: str = "rtl") -> list[Path]:
    """Verilog files the device top instantiates: storage, bank and channel modules (cached).

    ``fp_impl="dpi"``: the banks' processing units use the behavioural FP cells
    (:func:`hw.arith.check_fp_impl`); their sources are included (Verilator only).
    """
    from ..arith import FP_DPI_SOURCES, check_fp_impl
    from .bank import PimBank
    from .channel import PimChannel, pim_module_names

    check_fp_impl(fp_impl)
    names = pim_module_names(cfg)
    bank = verilog_for(lambda: PimBank(cfg, fp_impl=fp_impl), names["bank"], key=f"{cfg!r} fp={fp_impl}")
    chan = verilog_for(lambda: PimChannel(cfg, bank_module=names["bank"]), names["channel"], key=repr(cfg))
    extra = list(FP_DPI_SOURCES) if fp_impl == "dpi" else []
    return [STORAGE_V, bank, chan, *extra]


def device_factory(cfg: SystemConfig):
    """Zero-argument factory of the :class:`~hw.pim.channel.PimDevice` top that uses :func:`device_sources`."""
    from .channel import PimDevice, pim_module_names

    return lambda: PimDevice(cfg, channel_module=pim_module_names(cfg)["channel"])
