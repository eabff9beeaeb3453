"""GPT-2 decoder layers: shapes, weights (Hugging Face naming) and a float64 reference block.

Weights follow the Hugging Face ``GPT2Model`` state dict: ``h.{i}.ln_1.weight``,
``h.{i}.attn.c_attn.weight`` of shape ``[d, 3d]`` used as ``x @ W`` (Conv1D),
``h.{i}.attn.c_proj``, ``h.{i}.ln_2``, ``h.{i}.mlp.c_fc`` ``[d, 4d]``,
``h.{i}.mlp.c_proj`` ``[4d, d]``, each with a ``.bias``; with or without the
``transformer.`` prefix; float32, float16 or bfloat16 tensors; from
``.safetensors`` or ``.npz``. Without a file, :func:`random_weights` draws
seeded weights with GPT-2's shapes and initialisation scale.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

__all__ = ["GptShape", "SHAPES", "LayerWeights", "load_weights", "random_weights", "reference_block",
           "WeightsError", "FLOAT_DTYPES", "check_float_dtype", "first_nonfinite"]

PARAMS = ("ln_1.weight", "ln_1.bias", "attn.c_attn.weight", "attn.c_attn.bias", "attn.c_proj.weight",
          "attn.c_proj.bias", "ln_2.weight", "ln_2.bias", "mlp.c_fc.weight", "mlp.c_fc.bias",
          "mlp.c_proj.weight", "mlp.c_proj.bias")


class WeightsError(ValueError):
    pass


@dataclass(frozen=True)
class GptShape:
    d_model: int
    heads: int
    layers: int = 1
    eps: float = 1e-5

    def __post_init__(self):
        if self.d_model < 1 or self.heads < 1 or self.d_model % self.heads:
            raise WeightsError(f"d_model ({self.d_model}) must be a positive multiple of heads ({self.heads})")
        if self.layers < 1:
            raise WeightsError(f"layers must be at least 1, not {self.layers}")

    @property
    def head_dim(self) -> int:
        return self.d_model // self.heads

    @property
    def ffn(self) -> int:
        return 4 * self.d_model


SHAPES = {
    "small": GptShape(768, 12, 12), "medium": GptShape(1024, 16, 24), "large": GptShape(1280, 20, 36),
    "xl": GptShape(1536, 24, 48), "2.5b": GptShape(1920, 20, 54),
    "tiny": GptShape(32, 2, 2),
}


@dataclass
class LayerWeights:
    """One block's parameters as float32 arrays, HF shapes (``W`` is ``[in, out]``)."""
    ln1_g: np.ndarray
    ln1_b: np.ndarray
    qkv_w: np.ndarray
    qkv_b: np.ndarray
    proj_w: np.ndarray
    proj_b: np.ndarray
    ln2_g: np.ndarray
    ln2_b: np.ndarray
    fc1_w: np.ndarray
    fc1_b: np.ndarray
    fc2_w: np.ndarray
    fc2_b: np.ndarray

    @classmethod
    def from_params(cls, p: dict, d: int, where: str) -> "LayerWeights":
        shapes = {"ln_1.weight": (d,), "ln_1.bias": (d,), "attn.c_attn.weight": (d, 3 * d),
                  "attn.c_attn.bias": (3 * d,), "attn.c_proj.weight": (d, d), "attn.c_proj.bias": (d,),
                  "ln_2.weight": (d,), "ln_2.bias": (d,), "mlp.c_fc.weight": (d, 4 * d), "mlp.c_fc.bias": (4 * d,),
                  "mlp.c_proj.weight": (4 * d, d), "mlp.c_proj.bias": (d,)}
        for name, shape in shapes.items():
            if name not in p:
                raise WeightsError(f"{where}: missing tensor {name}")
            if tuple(p[name].shape) != shape:
                raise WeightsError(f"{where}: {name} has shape {tuple(p[name].shape)}, expected {shape}")
        return cls(*(np.asarray(p[n], dtype=np.float32) for n in PARAMS))


FLOAT_DTYPES = ("float16", "bfloat16", "float32", "float64")
"""Tensor types accepted for weights (and for ``ianus run --input``); anything else is rejected, not cast."""


def check_float_dtype(a: np.ndarray, what: str, error=None) -> None:
    """Raise ``error`` (default :class:`WeightsError`) unless ``a`` holds one of :data:`FLOAT_DTYPES`."""
    if str(a.dtype) not in FLOAT_DTYPES:
        raise (error or WeightsError)(f"{what} has dtype {a.dtype}; expected one of {', '.join(FLOAT_DTYPES)} "
                                      f"(integer, bool and complex values are not converted)")


def first_nonfinite(a: np.ndarray) -> tuple[int, tuple] | None:
    """``(count, index of the first)`` of the NaN / Inf values of ``a``, or None when all are finite."""
    bad = ~np.isfinite(np.asarray(a, dtype=np.float32))
    if not bad.any():
        return None
    return int(bad.sum()), tuple(int(i) for i in np.argwhere(bad)[0])


def _to_f32(arr, what: str) -> np.ndarray:
    a = np.asarray(arr)
    if a.dtype.kind == "V" and a.dtype.itemsize == 2:     # bfloat16 stored as raw 2-byte records (.npz)
        import ml_dtypes
        a = a.view(ml_dtypes.bfloat16)
    check_float_dtype(a, what)
    return a.astype(np.float32)


def _read_tensors(path: Path) -> dict:
    if not path.exists():
        raise WeightsError(f"weights file {path} does not exist")
    if path.is_dir():
        raise WeightsError(f"weights file {path} is a directory")
    if path.suffix not in (".npz", ".safetensors"):
        raise WeightsError(f"weights file {path} must be .safetensors or .npz, not {path.suffix!r}")
    try:
        if path.suffix == ".npz":
            with np.load(path, allow_pickle=False) as z:
                return {k: _to_f32(z[k], f"{path}: tensor {k}") for k in z.files}
        from safetensors.numpy import load_file
        try:
            return {k: _to_f32(v, f"{path}: tensor {k}") for k, v in load_file(str(path)).items()}
        except TypeError:       # bfloat16 needs ml_dtypes-aware loading
            import ml_dtypes  # noqa: F401
            from safetensors import safe_open
            with safe_open(str(path), "np") as f:
                return {k: _to_f32(f.get_tensor(k), f"{path}: tensor {k}") for k in f.keys()}
    except WeightsError:
        raise
    except Exception as e:      # numpy, zipfile and safetensors each raise their own types for a bad file
        kind = "an .npz archive" if path.suffix == ".npz" else "a safetensors file"
        detail = " ".join(str(e).split()) or type(e).__name__
        raise WeightsError(f"weights file {path} is not {kind} ({detail})") from None


def load_weights(path, heads: int | None = None, layers: int | None = None,
                 allow_nonfinite: bool = False) -> tuple[GptShape, list[LayerWeights]]:
    """Layers ``0..layers-1`` of a GPT-2 checkpoint; ``heads`` defaults to ``d_model / 64``.

    Raises :class:`WeightsError` (naming the file and the tensor) for a file that cannot be read, a
    tensor that is not floating point (:data:`FLOAT_DTYPES`), a missing tensor or a wrong shape, and,
    unless ``allow_nonfinite``, a NaN or infinite value in a tensor of the loaded layers."""
    tensors = _read_tensors(Path(path))
    per_layer: dict[int, dict] = {}
    pat = re.compile(r"^(?:transformer\.)?h\.(\d+)\.(.+)$")
    for k, v in tensors.items():
        mt = pat.match(k)
        if mt and mt.group(2) in PARAMS:
            per_layer.setdefault(int(mt.group(1)), {})[mt.group(2)] = v
    if not per_layer:
        raise WeightsError(f"{path}: no tensors named h.<i>.<param> (with or without 'transformer.')")
    n_avail = max(per_layer) + 1
    n = n_avail if layers is None else layers
    if n > n_avail:
        raise WeightsError(f"{path} holds {n_avail} layers, {n} requested")
    d = per_layer[0]["ln_1.weight"].shape[0] if "ln_1.weight" in per_layer.get(0, {}) else None
    if d is None:
        raise WeightsError(f"{path}: layer 0 has no ln_1.weight")
    if heads is None:
        if d % 64:
            raise WeightsError(f"{path}: d_model {d} is not a multiple of 64: give the head count (--heads)")
        heads = d // 64
    if n < 1:
        raise WeightsError(f"layers must be at least 1, not {n}")
    shape = GptShape(d, heads, n)
    out = [LayerWeights.from_params(per_layer.get(i, {}), d, f"{path} layer {i}") for i in range(n)]
    if not allow_nonfinite:
        for i in range(n):
            for name in PARAMS:
                bad = first_nonfinite(per_layer[i][name])
                if bad:
                    raise WeightsError(f"{path}: tensor h.{i}.{name} has {bad[0]:,} NaN/Inf value(s), the first at "
                                       f"{list(bad[1])} (--allow-nonfinite lets them through)")
    return shape, out


def random_weights(shape: GptShape, seed: int = 0) -> list[LayerWeights]:
    """GPT-2-shaped weights: normal(0, 0.02) matrices (c_proj scaled by 1/sqrt(2 layers) as in GPT-2),
    small random biases, layernorm gains around 1."""
    rng = np.random.default_rng(seed)
    d, f = shape.d_model, shape.ffn
    out = []
    for _ in range(shape.layers):
        s = 0.02
        sp = s / math.sqrt(2 * max(shape.layers, 1))
        out.append(LayerWeights(
            ln1_g=1 + 0.1 * rng.standard_normal(d), ln1_b=0.02 * rng.standard_normal(d),
            qkv_w=s * rng.standard_normal((d, 3 * d)), qkv_b=0.02 * rng.standard_normal(3 * d),
            proj_w=sp * rng.standard_normal((d, d)), proj_b=0.02 * rng.standard_normal(d),
            ln2_g=1 + 0.1 * rng.standard_normal(d), ln2_b=0.02 * rng.standard_normal(d),
            fc1_w=s * rng.standard_normal((d, f)), fc1_b=0.02 * rng.standard_normal(f),
            fc2_w=sp * rng.standard_normal((f, d)), fc2_b=0.02 * rng.standard_normal(d),
        ))
        out[-1] = LayerWeights(*(np.asarray(a, dtype=np.float32) for a in vars(out[-1]).values()))
    return out


def save_npz(path, weights: list[LayerWeights], prefix: str = "transformer."):
    arrays = {}
    for i, w in enumerate(weights):
        for name, arr in zip(PARAMS, vars(w).values(), strict=True):
            arrays[f"{prefix}h.{i}.{name}"] = arr
    np.savez(path, **arrays)


def _gelu(x):
    return 0.5 * x * (1.0 + np.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x ** 3)))


def _ln(x, g, b, eps):
    mu = x.mean(-1, keepdims=True)
    var = ((x - mu) ** 2).mean(-1, keepdims=True)
    return (x - mu) / np.sqrt(var + eps) * g + b


def reference_block(x: np.ndarray, w: LayerWeights, shape: GptShape) -> np.ndarray:
    """float64 GPT-2 block (pre-LN, causal self-attention, tanh GELU) over all rows of ``x`` [T, d]."""
    x = np.asarray(x, dtype=np.float64)
    T, d = x.shape
    H, hd = shape.heads, shape.head_dim
    f = {k: np.asarray(v, dtype=np.float64) for k, v in vars(w).items()}
    h = _ln(x, f["ln1_g"], f["ln1_b"], shape.eps)
    qkv = h @ f["qkv_w"] + f["qkv_b"]
    q, k, v = qkv[:, :d], qkv[:, d:2 * d], qkv[:, 2 * d:]
    out = np.empty((T, d))
    mask = np.tril(np.ones((T, T), dtype=bool))
    for i in range(H):
        sl = slice(i * hd, (i + 1) * hd)
        s = q[:, sl] @ k[:, sl].T / math.sqrt(hd)
        s = np.where(mask, s, -np.inf)
        p = np.exp(s - s.max(-1, keepdims=True))
        p /= p.sum(-1, keepdims=True)
        out[:, sl] = p @ v[:, sl]
    x2 = x + out @ f["proj_w"] + f["proj_b"]
    h2 = _ln(x2, f["ln2_g"], f["ln2_b"], shape.eps)
    return x2 + _gelu(h2 @ f["fc1_w"] + f["fc1_b"]) @ f["fc2_w"] + f["fc2_b"]
