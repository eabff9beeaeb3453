"""Low-precision formats of the PIM units (P3-LLM) and the quantization flow.

Formats (:class:`Format`, presets in :data:`FORMATS`):

* **Weights** ``bf16 | int4 | fp4``, quantized in groups of ``group`` (default
  128) consecutive values along the *input* dimension ``K`` of a ``[K, N]``
  matrix (Hugging Face Conv1D layout, ``y = x @ W``), one scale per group and
  output, stored in ``scale_format`` (default FP16). The scale is rounded to
  its format *before* the codes are chosen, so the codes fit the stored scale.

  - ``int4``: symmetric, ``scale = max|w| / 7``, code ``= clip(rne(w / scale), -8, 7)``
    (two's complement nibble), value ``= code``.
  - ``fp4``: FP4-E2M1 codes (sign, 2 exponent bits with bias 1, 1 mantissa bit:
    magnitudes 0, 0.5, 1, 1.5, 2, 3, 4, 6). With ``grid_choice`` (BitMoD, as in
    P3-LLM's ``awq/quantize/auto_dtype.py``) the redundant code ``0b1000``
    (negative zero) takes one extra value per group, chosen from
    :data:`BITMOD_EXTRA` = (+5, -5, +8, -8) (P3-LLM's ``fp4_er_pos``,
    ``fp4_er_neg``, ``fp4_ea_pos``, ``fp4_ea_neg`` grids, which are these
    values times 2), each group taking the grid with the least squared error
    (ties: the first). ``scale = max|w| / max|grid|`` (6 or 8); each value
    goes to the nearest grid value (ties: the smaller). The 2-bit grid
    selector is stored per group beside the scale. Without ``grid_choice``:
    plain E2M1, ``scale = max|w| / 6``.
* **Activations** ``bf16 | fp8_e4m3``: FP8-E4M3 (``float8_e4m3fn``, max 448)
  with one FP32 scale per token ``max|x| / 448`` (:func:`quantize_fp8`).
* **KV cache** ``bf16 | int4``: asymmetric INT4 in per-token groups of
  ``kv_group`` (default 128) channels, FP16 scale ``(max - min) / 15`` and an
  FP16 zero point ``clip(rne(-min / scale), 0, 15)`` (an integer, as in
  P3-LLM's ``k_quant_per_token``); value ``= (code - zero) * scale``
  (:func:`quantize_kv`).

A shape that does not divide into groups is an error naming the dimension, its
size and the group size (:class:`QuantError`).

Packed layout (:func:`pack`, :func:`unpack`): a 32-byte DRAM column holds 64
4-bit codes (a BF16 column holds 16 values): for output ``n``, code ``k`` is in
column ``k // 64``, byte ``(k % 64) // 2``, low nibble for even ``k``. The group
scales follow as FP16 bit patterns, 16 per column, and (``fp4`` with grid
choice) the 2-bit selectors, 128 per column (4 per byte, lowest bits first).
:class:`PimLowPrecLayout` places these columns in the PIM banks with the
output mapping of :class:`firmware.pim.GemvLayout` (output ``n`` in tile
``n // (banks * channels)``, channel ``(n // banks) % channels``, bank
``n % banks``); a tile's outputs use the same columns of the same rows in
their banks, codes first, then scales, then selectors, filling rows in order.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import ml_dtypes
import numpy as np

from firmware.pim import OutputTiles

__all__ = ["QuantError", "Format", "FORMATS", "FP4_MAGNITUDES", "BITMOD_EXTRA", "QuantWeights", "Fp8Acts",
           "KvQuant", "quantize_weights", "code_values", "quantize_fp8", "quantize_kv", "round_scale",
           "pack_nibbles", "unpack_nibbles", "PackedWeights", "pack", "unpack", "PimLowPrecLayout",
           "CODES_PER_COLUMN", "FP8_MAX"]

FP4_MAGNITUDES = np.array([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0], dtype=np.float32)
BITMOD_EXTRA = (5.0, -5.0, 8.0, -8.0)
EXTRA_CODE = 0b1000                 # FP4 negative zero: the group's extra value
FP8_MAX = 448.0
COLUMN_BYTES = 32
CODES_PER_COLUMN = 2 * COLUMN_BYTES
SCALE_FORMATS = {"fp16": np.float16, "bf16": ml_dtypes.bfloat16, "fp32": np.float32}
WEIGHT_FORMATS = ("bf16", "int4", "fp4")
ACT_FORMATS = ("bf16", "fp8_e4m3")
KV_FORMATS = ("bf16", "int4")


class QuantError(ValueError):
    pass


@dataclass(frozen=True)
class Format:
    """A PIM unit's formats: weights, activations, KV cache, group sizes and scale format."""
    weights: str = "bf16"
    acts: str = "bf16"
    kv: str = "bf16"
    group: int = 128
    kv_group: int = 128
    scale_format: str = "fp16"
    grid_choice: bool = True

    def __post_init__(self):
        for name, allowed in (("weights", WEIGHT_FORMATS), ("acts", ACT_FORMATS), ("kv", KV_FORMATS),
                              ("scale_format", tuple(SCALE_FORMATS))):
            if getattr(self, name) not in allowed:
                raise QuantError(f"Format.{name} must be one of {', '.join(allowed)}, not {getattr(self, name)!r}")
        for name in ("group", "kv_group"):
            v = getattr(self, name)
            if not isinstance(v, int) or v < 2 or v & (v - 1):
                raise QuantError(f"Format.{name} must be a power of two of at least 2, not {v!r}")

    def replace(self, **kw) -> "Format":
        return replace(self, **kw)


FORMATS = {
    "bf16": Format(),
    "w4-int": Format(weights="int4"),
    "w4-fp4": Format(weights="fp4"),
    "w4a8": Format(weights="fp4", acts="fp8_e4m3"),
    "w4a8kv4": Format(weights="fp4", acts="fp8_e4m3", kv="int4"),
}


def round_scale(s, scale_format: str = "fp16") -> np.ndarray:
    """``s`` rounded (RNE) to ``scale_format``, as float32 values. An overflow is an error."""
    if scale_format not in SCALE_FORMATS:
        raise QuantError(f"scale format must be one of {', '.join(SCALE_FORMATS)}, not {scale_format!r}")
    s = np.asarray(s, dtype=np.float32)
    with np.errstate(over="ignore"):
        r = s.astype(SCALE_FORMATS[scale_format]).astype(np.float32)
    bad = ~np.isfinite(r) & np.isfinite(s)
    if bad.any():
        raise QuantError(f"a group scale of {float(s[bad].flat[0]):.6g} exceeds the {scale_format} range "
                         f"(max {float(np.finfo(SCALE_FORMATS[scale_format]).max):.6g})")
    return r


def _groups(n: int, group: int, what: str) -> int:
    if not isinstance(group, int) or group < 1:
        raise QuantError(f"group size must be a positive integer, not {group!r}")
    if n % group:
        raise QuantError(f"{what} = {n} is not a multiple of the group size {group}")
    return n // group


@dataclass
class QuantWeights:
    """A ``[K, N]`` weight matrix in a 4-bit format.

    ``codes``: uint8 ``[K, N]`` nibbles (0..15); ``scales``: float32 ``[K / group, N]`` (values of the scale
    format); ``selectors``: uint8 ``[K / group, N]`` (``fp4`` grid choice: index into :data:`BITMOD_EXTRA`).
    """
    fmt: str
    group: int
    codes: np.ndarray
    scales: np.ndarray
    selectors: np.ndarray
    scale_format: str = "fp16"
    grid_choice: bool = True

    @property
    def shape(self) -> tuple[int, int]:
        return self.codes.shape

    def values(self) -> np.ndarray:
        """The code values (before the group scale), float32 ``[K, N]``."""
        sel = np.repeat(self.selectors, self.group, axis=0)
        return code_values(self.fmt, self.codes, sel, self.grid_choice)

    def dequantize(self) -> np.ndarray:
        """``value * scale`` in float64 (exact), ``[K, N]``."""
        return self.values().astype(np.float64) * np.repeat(self.scales, self.group, axis=0).astype(np.float64)


def code_values(fmt: str, codes, selectors=None, grid_choice: bool = True) -> np.ndarray:
    """Values of 4-bit ``codes`` (float32): int4 two's complement, or FP4-E2M1 with the extra value of code 8."""
    c = np.asarray(codes, dtype=np.uint8) & 0xF
    if fmt == "int4":
        return np.where(c >= 8, c.astype(np.float32) - 16, c.astype(np.float32)).astype(np.float32)
    if fmt != "fp4":
        raise QuantError(f"4-bit weight format must be int4 or fp4, not {fmt!r}")
    v = FP4_MAGNITUDES[c & 7] * np.where(c >> 3, -1.0, 1.0).astype(np.float32)
    if grid_choice:
        sel = np.zeros_like(c) if selectors is None else np.asarray(selectors, dtype=np.uint8)
        extra = np.asarray(BITMOD_EXTRA, dtype=np.float32)[sel]
        v = np.where(c == EXTRA_CODE, extra, v)
    return v.astype(np.float32)


def _fp4_grid(extra: float | None) -> tuple[np.ndarray, np.ndarray]:
    """(sorted values, their codes) of the E2M1 grid, plus ``extra`` on code 8."""
    vals, codes = [], []
    for c in range(16):
        if c == EXTRA_CODE:
            if extra is None:
                continue
            vals.append(extra)
        else:
            vals.append(float(FP4_MAGNITUDES[c & 7]) * (-1 if c >> 3 else 1))
        codes.append(c)
    order = np.argsort(np.array(vals), kind="stable")
    return np.array(vals, dtype=np.float64)[order], np.array(codes, dtype=np.uint8)[order]


def _nearest(x: np.ndarray, vals: np.ndarray, codes: np.ndarray) -> np.ndarray:
    """Code of the nearest grid value (ties go to the smaller value)."""
    mids = (vals[1:] + vals[:-1]) / 2
    idx = np.searchsorted(mids, x, side="left")      # x == mid -> the lower value
    return codes[idx]


def _finite_matrix(a, dtype, shape: str, what: str, values: str | None = None) -> np.ndarray:
    """``a`` as a 2-D ``dtype`` array; :class:`QuantError` unless it is one (``what`` must be ``shape``) and
    every value is finite (``values``, default ``what``, hold a NaN or infinity)."""
    a = np.asarray(a, dtype=dtype)
    if a.ndim != 2:
        raise QuantError(f"{what} must be {shape}, not shape {a.shape}")
    if not np.isfinite(a).all():
        raise QuantError(f"{values or what} hold a NaN or infinity")
    return a


def quantize_weights(w, fmt: str = "int4", group: int = 128, scale_format: str = "fp16",
                     grid_choice: bool = True) -> QuantWeights:
    """Quantize ``w`` ``[K, N]`` (groups of ``group`` along K) to ``int4`` or ``fp4``."""
    w = _finite_matrix(w, np.float64, "a [K, N] matrix", "weights")
    K, N = w.shape
    G = _groups(K, group, "input dimension K")
    wg = w.reshape(G, group, N)
    amax = np.abs(wg).max(axis=1)                                 # [G, N]
    if fmt == "int4":
        scales = round_scale(amax / 7.0, scale_format)
        safe = np.where(scales > 0, scales, 1.0).astype(np.float64)
        codes = np.clip(np.rint(wg / safe[:, None, :]), -8, 7)
        codes = np.where(scales[:, None, :] > 0, codes, 0).astype(np.int64) & 0xF
        sel = np.zeros((G, N), dtype=np.uint8)
        return QuantWeights("int4", group, codes.reshape(K, N).astype(np.uint8), scales, sel, scale_format,
                            grid_choice)
    if fmt != "fp4":
        raise QuantError(f"4-bit weight format must be int4 or fp4, not {fmt!r}")
    extras = list(BITMOD_EXTRA) if grid_choice else [None]
    best = None
    for s_i, extra in enumerate(extras):
        vals, cds = _fp4_grid(extra)
        qmax = float(np.abs(vals).max())
        scales = round_scale(amax / qmax, scale_format)
        safe = np.where(scales > 0, scales, 1.0).astype(np.float64)
        codes = _nearest(wg / safe[:, None, :], vals, cds)
        codes = np.where(scales[:, None, :] > 0, codes, 0).astype(np.uint8)
        deq = code_values("fp4", codes, np.full(codes.shape, s_i if extra is not None else 0, np.uint8),
                          extra is not None).astype(np.float64) * scales[:, None, :]
        err = ((deq - wg) ** 2).sum(axis=1)                        # [G, N]
        if best is None:
            best = [err, codes, scales, np.full((G, N), s_i, np.uint8)]
        else:
            better = err < best[0]
            best[0] = np.where(better, err, best[0])
            best[1] = np.where(better[:, None, :], codes, best[1])
            best[2] = np.where(better, scales, best[2])
            best[3] = np.where(better, np.uint8(s_i), best[3])
    return QuantWeights("fp4", group, best[1].reshape(K, N).astype(np.uint8), best[2].astype(np.float32),
                        best[3].astype(np.uint8), scale_format, grid_choice)


# -- activations -------------------------------------------------------------------------------

@dataclass
class Fp8Acts:
    """Activations ``[T, K]`` as FP8-E4M3 bit patterns (uint8) with one FP32 scale per token ``[T]``."""
    codes: np.ndarray
    scales: np.ndarray

    def values(self) -> np.ndarray:
        """Code values (before the token scale), float32 (exact)."""
        return self.codes.view(ml_dtypes.float8_e4m3fn).astype(np.float32)

    def dequantize(self) -> np.ndarray:
        return self.values().astype(np.float64) * self.scales.astype(np.float64)[..., None]


def quantize_fp8(x) -> Fp8Acts:
    """Per-token FP8-E4M3: ``scale = max|x| / 448`` (FP32; 1 for an all-zero token), codes ``rne(x / scale)``."""
    x = np.asarray(x, dtype=np.float32)
    if x.ndim == 1:
        x = x[None]
    x = _finite_matrix(x, np.float32, "[tokens, K]", "activations")
    amax = np.abs(x).max(axis=1)
    scales = np.where(amax > 0, amax / np.float32(FP8_MAX), np.float32(1)).astype(np.float32)
    y = np.clip(x / scales[:, None], -FP8_MAX, FP8_MAX)
    codes = y.astype(ml_dtypes.float8_e4m3fn).view(np.uint8)
    return Fp8Acts(codes, scales)


# -- KV cache ------------------------------------------------------------------------------------

@dataclass
class KvQuant:
    """KV rows ``[T, C]``: INT4 codes (0..15), FP16 scale and zero point per token group ``[T, C / group]``."""
    group: int
    codes: np.ndarray
    scales: np.ndarray
    zeros: np.ndarray

    def dequantize(self) -> np.ndarray:
        """``(code - zero) * scale``, float32 (exact: a small integer times an FP16 value)."""
        z = np.repeat(self.zeros, self.group, axis=1)
        s = np.repeat(self.scales, self.group, axis=1)
        return ((self.codes.astype(np.float32) - z) * s).astype(np.float32)


FP16_MIN_NORMAL = 2.0 ** -14


def quantize_kv(x, group: int = 128, scale_format: str = "fp16") -> KvQuant:
    """Asymmetric INT4 per token and group of ``group`` channels (see the module docstring).

    The scale is at least the FP16 minimum normal (2^-14), so a constant group stays exact up to that step.
    """
    x = _finite_matrix(x, np.float32, "[tokens, channels]", "KV rows", "KV values")
    T, C = x.shape
    G = _groups(C, group, "KV channels")
    xg = x.reshape(T, G, group).astype(np.float64)
    lo, hi = xg.min(axis=2), xg.max(axis=2)
    scales = round_scale(np.maximum((hi - lo) / 15.0, FP16_MIN_NORMAL), scale_format)
    zeros = np.clip(np.rint(-lo / scales), 0, 15).astype(np.float32)
    codes = np.clip(np.rint(xg / scales[..., None]) + zeros[..., None], 0, 15).astype(np.uint8)
    return KvQuant(group, codes.reshape(T, C), scales.astype(np.float32), zeros)


# -- packed layout --------------------------------------------------------------------------------

def pack_nibbles(codes) -> np.ndarray:
    """``[..., 2m]`` 4-bit codes -> ``[..., m]`` bytes, even index in the low nibble."""
    c = np.asarray(codes, dtype=np.uint8)
    if c.shape[-1] % 2:
        raise QuantError(f"an even number of codes packs into bytes, not {c.shape[-1]}")
    if (c > 15).any():
        raise QuantError(f"codes must be 4-bit (0..15), not {int(c.max())}")
    return (c[..., 0::2] | (c[..., 1::2] << 4)).astype(np.uint8)


def unpack_nibbles(b) -> np.ndarray:
    b = np.asarray(b, dtype=np.uint8)
    out = np.empty(b.shape[:-1] + (2 * b.shape[-1],), dtype=np.uint8)
    out[..., 0::2] = b & 0xF
    out[..., 1::2] = b >> 4
    return out


def _cols(n_items: int, per_col: int) -> int:
    return -(-n_items // per_col)


@dataclass
class PackedWeights:
    """Per output ``n``: ``codes`` ``[N, K / 64, 32]``, ``scales`` ``[N, ceil(G / 16), 32]`` (FP16 bits,
    little-endian), ``selectors`` ``[N, ceil(G / 128), 32]`` (fp4 with grid choice, else ``[N, 0, 32]``)."""
    fmt: str
    K: int
    N: int
    group: int
    codes: np.ndarray
    scales: np.ndarray
    selectors: np.ndarray
    grid_choice: bool = True
    extra: dict = field(default_factory=dict)

    @property
    def columns_per_output(self) -> int:
        return self.codes.shape[1] + self.scales.shape[1] + self.selectors.shape[1]

    def columns(self) -> np.ndarray:
        """All columns of each output in storage order: ``[N, columns_per_output, 32]``."""
        return np.concatenate([self.codes, self.scales, self.selectors], axis=1)


def pack(q: QuantWeights) -> PackedWeights:
    """The column image of ``q`` (FP16 scales only: the packed layout stores 16-bit scales)."""
    if q.scale_format != "fp16":
        raise QuantError(f"the packed layout stores FP16 scales, not {q.scale_format}")
    K, N = q.shape
    if K % CODES_PER_COLUMN:
        raise QuantError(f"input dimension K = {K} is not a multiple of {CODES_PER_COLUMN} codes per column")
    G = K // q.group
    codes = pack_nibbles(q.codes.T).reshape(N, K // CODES_PER_COLUMN, COLUMN_BYTES)
    sbits = q.scales.astype(np.float16).view(np.uint16).T               # [N, G]
    sc = np.zeros((N, _cols(G, 16) * 16), dtype=np.uint16)
    sc[:, :G] = sbits
    scales = sc.astype("<u2").view(np.uint8).reshape(N, -1, COLUMN_BYTES)
    if q.fmt == "fp4" and q.grid_choice:
        sel = np.zeros((N, _cols(G, 128) * 128), dtype=np.uint8)
        sel[:, :G] = q.selectors.T
        s4 = sel.reshape(N, -1, 4)
        sb = (s4[..., 0] | (s4[..., 1] << 2) | (s4[..., 2] << 4) | (s4[..., 3] << 6)).astype(np.uint8)
        selectors = sb.reshape(N, -1, COLUMN_BYTES)
    else:
        selectors = np.zeros((N, 0, COLUMN_BYTES), dtype=np.uint8)
    return PackedWeights(q.fmt, K, N, q.group, codes, scales, selectors, q.grid_choice)


def unpack(p: PackedWeights) -> QuantWeights:
    """Inverse of :func:`pack`."""
    K, N, G = p.K, p.N, p.K // p.group
    codes = unpack_nibbles(p.codes.reshape(N, K // 2)).T.copy()
    sbits = p.scales.reshape(N, -1).view("<u2")[:, :G]
    scales = sbits.astype(np.uint16).view(np.float16).astype(np.float32).T.copy()
    if p.selectors.shape[1]:
        sb = p.selectors.reshape(N, -1)
        sel = np.stack([(sb >> s) & 3 for s in (0, 2, 4, 6)], axis=-1).reshape(N, -1)[:, :G].T.copy()
    else:
        sel = np.zeros((G, N), dtype=np.uint8)
    return QuantWeights(p.fmt, p.group, codes, scales, sel.astype(np.uint8), "fp16", p.grid_choice)


@dataclass(frozen=True)
class PimLowPrecLayout(OutputTiles):
    """Where a packed ``[K, N]`` 4-bit matrix lives in the PIM banks (see the module docstring).

    ``cfg``: a :class:`hw.spec.config.SystemConfig` (only ``cfg.pim`` is read: channels, banks, columns, lanes,
    data_rows). DRAM contents are ``[channels, banks, rows_used, columns, 32]`` bytes.
    """
    fmt: str = "int4"
    group: int = 128
    grid_choice: bool = True
    base_row: int = 0

    def __post_init__(self):
        p = self.cfg.pim
        if p.column_bytes != COLUMN_BYTES:
            raise QuantError(f"the packed layout needs {COLUMN_BYTES}-byte columns, not {p.column_bytes}")
        if self.K % CODES_PER_COLUMN:
            raise QuantError(f"input dimension K = {self.K} is not a multiple of {CODES_PER_COLUMN}")
        _groups(self.K, self.group, "input dimension K")
        self._check_rows(f"{self.fmt} GEMV", QuantError)

    @property
    def columns_per_output(self) -> int:
        G = self.K // self.group
        sel = _cols(G, 128) if (self.fmt == "fp4" and self.grid_choice) else 0
        return self.K // CODES_PER_COLUMN + _cols(G, 16) + sel

    @property
    def rows_per_tile(self) -> int:
        return _cols(self.columns_per_output, self.cfg.pim.columns)

    @property
    def rows_used(self) -> int:
        return self.tiles * self.rows_per_tile

    def place(self, packed: PackedWeights) -> np.ndarray:
        """Packed columns -> DRAM contents ``[channels, banks, rows_used, columns, 32]`` (unused bytes zero)."""
        p = self.cfg.pim
        if (packed.K, packed.N, packed.fmt) != (self.K, self.N, self.fmt):
            raise QuantError(f"packed {packed.fmt} {packed.K}x{packed.N} does not match the layout's "
                             f"{self.fmt} {self.K}x{self.N}")
        cols = packed.columns()                                      # [N, cpo, 32]
        cpo = cols.shape[1]
        npad = self.tiles * self.per_tile
        full = np.zeros((npad, self.rows_per_tile * p.columns, COLUMN_BYTES), dtype=np.uint8)
        full[:self.N, :cpo] = cols
        v = full.reshape(self.tiles, p.channels, p.banks, self.rows_per_tile, p.columns, COLUMN_BYTES)
        v = v.transpose(1, 2, 0, 3, 4, 5)                              # ch, bank, tile, row, col, bytes
        return np.ascontiguousarray(v.reshape(p.channels, p.banks, self.rows_used, p.columns, COLUMN_BYTES))

    def gather(self, dram: np.ndarray) -> PackedWeights:
        """Inverse of :meth:`place`: read the packed columns back from DRAM contents."""
        p = self.cfg.pim
        v = np.asarray(dram, dtype=np.uint8).reshape(p.channels, p.banks, self.tiles, self.rows_per_tile,
                                                     p.columns, COLUMN_BYTES)
        full = v.transpose(2, 0, 1, 3, 4, 5).reshape(self.tiles * self.per_tile, -1, COLUMN_BYTES)[:self.N]
        G = self.K // self.group
        nc, ns = self.K // CODES_PER_COLUMN, _cols(G, 16)
        nsel = self.columns_per_output - nc - ns
        return PackedWeights(self.fmt, self.K, self.N, self.group, full[:, :nc].copy(),
                             full[:, nc:nc + ns].copy(), full[:, nc + ns:nc + ns + nsel].copy(), self.grid_choice)
