"""AiM-style PIM device: command table, banks with processing units, channels, device."""

from pathlib import Path

from ..config import SystemConfig
from ..gen import ROOT, verilog_for
from .behav import PIM_IMPLS, check_pim_impl

__all__ = ["device_sources", "device_factory", "STORAGE_V", "PIM_IMPLS", "check_pim_impl"]

STORAGE_V = ROOT / "hw" / "verilog" / "pim_storage.v"


def device_sources(cfg: SystemConfig, fp_impl: str = "rtl", pim_impl: str = "rtl") -> list[Path]:
    """Verilog files the device top instantiates: storage, bank and channel modules (cached).

    ``fp_impl="dpi"``: the banks' processing units use the behavioural FP cells
    (:func:`hw.arith.check_fp_impl`); their sources are included (Verilator only).

    ``pim_impl="behav"``: instead of the channel RTL, the cycle- and bit-exact behavioural channel of
    :mod:`hw.pim.behav` under the channel module's name (a Verilog shell and its C++ model; Verilator
    only, for long runs); ``fp_impl`` does not apply to it.
    """
    from ..arith import FP_DPI_SOURCES, check_fp_impl
    from .bank import PimBank
    from .behav import behav_channel_sources
    from .channel import PimChannel, pim_module_names

    check_fp_impl(fp_impl)
    if check_pim_impl(pim_impl) == "behav":
        return behav_channel_sources(cfg)
    names = pim_module_names(cfg)
    bank = verilog_for(lambda: PimBank(cfg, fp_impl=fp_impl), names["bank"], key=f"{cfg!r} fp={fp_impl}")
    chan = verilog_for(lambda: PimChannel(cfg, bank_module=names["bank"]), names["channel"], key=repr(cfg))
    extra = list(FP_DPI_SOURCES) if fp_impl == "dpi" else []
    return [STORAGE_V, bank, chan, *extra]


def device_factory(cfg: SystemConfig):
    """Zero-argument factory of the :class:`~hw.pim.channel.PimDevice` top that uses :func:`device_sources`."""
    from .channel import PimDevice, pim_module_names

    return lambda: PimDevice(cfg, channel_module=pim_module_names(cfg)["channel"])
