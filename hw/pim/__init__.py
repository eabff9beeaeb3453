"""AiM-style PIM device: command table, banks with processing units, channels, device."""

from pathlib import Path

from ..config import SystemConfig
from ..gen import ROOT, verilog_for

__all__ = ["device_sources", "device_factory", "STORAGE_V"]

STORAGE_V = ROOT / "hw" / "verilog" / "pim_storage.v"


def device_sources(cfg: SystemConfig) -> list[Path]:
    """Verilog files the device top instantiates: storage, bank and channel modules (cached)."""
    from .bank import PimBank
    from .channel import PimChannel, pim_module_names

    names = pim_module_names(cfg)
    bank = verilog_for(lambda: PimBank(cfg), names["bank"], key=repr(cfg))
    chan = verilog_for(lambda: PimChannel(cfg, bank_module=names["bank"]), names["channel"], key=repr(cfg))
    return [STORAGE_V, bank, chan]


def device_factory(cfg: SystemConfig):
    """Zero-argument factory of the :class:`~hw.pim.channel.PimDevice` top that uses :func:`device_sources`."""
    from .channel import PimDevice, pim_module_names

    return lambda: PimDevice(cfg, channel_module=pim_module_names(cfg)["channel"])
