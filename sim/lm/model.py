"""The Shakespeare model's shape, its host-side parts and its weights file.

The model is GPT-2's architecture (pre-LN blocks, tanh GELU, learned position
embeddings, final layernorm ``ln_f``, LM head tied to the token embedding) with
a byte vocabulary. The weights file is safetensors in the Hugging Face
``GPT2Model`` naming: ``wte.weight`` ``[vocab, d]``, ``wpe.weight``
``[n_ctx, d]``, ``h.{i}.ln_1.weight`` ... ``h.{i}.mlp.c_proj.bias`` (Conv1D
layout ``[in, out]``, read by :func:`firmware.gpt2.load_weights`),
``ln_f.weight`` / ``ln_f.bias``; no ``lm_head.weight`` (tied, as in GPT-2's
own checkpoints). The hyperparameters are also in the file's metadata.

On the SoC only the decoder layers run; the embedding (``wte[token] +
wpe[position]``) and the final layernorm + LM head run on the host
(:class:`HostModel`, numpy).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from firmware.gpt2 import PARAMS, GptShape, load_weights, random_weights

__all__ = ["LmConfig", "HostModel", "Lm", "load", "save", "random_lm", "DEFAULT_WEIGHTS", "ModelError"]

DEFAULT_WEIGHTS = Path("build/lm/shakespeare.safetensors")


class ModelError(ValueError):
    pass


@dataclass(frozen=True)
class LmConfig:
    vocab: int = 256
    n_ctx: int = 128
    d_model: int = 256
    heads: int = 4
    layers: int = 4
    eps: float = 1e-5

    def __post_init__(self):
        for name in ("vocab", "n_ctx", "d_model", "heads", "layers"):
            v = getattr(self, name)
            if not isinstance(v, int) or v < 1:
                raise ModelError(f"LmConfig.{name} must be a positive integer, not {v!r}")
        if self.d_model % self.heads:
            raise ModelError(f"LmConfig.d_model ({self.d_model}) must be a multiple of heads ({self.heads})")

    @property
    def shape(self) -> GptShape:
        return GptShape(self.d_model, self.heads, self.layers, self.eps)

    def metadata(self) -> dict:
        return {k: str(v) for k, v in asdict(self).items()}


@dataclass
class HostModel:
    """Embedding and final layernorm (the LM head is ``wte`` transposed), float32 arrays."""
    wte: np.ndarray
    wpe: np.ndarray
    lnf_g: np.ndarray
    lnf_b: np.ndarray
    eps: float = 1e-5

    def embed(self, tokens, start: int = 0) -> np.ndarray:
        """Hidden states entering layer 0 for ``tokens`` at positions ``start...``, float32 ``[T, d]``."""
        tokens = np.asarray(tokens, dtype=np.int64)
        n_ctx, vocab = self.wpe.shape[0], self.wte.shape[0]
        if tokens.size and (tokens.min() < 0 or tokens.max() >= vocab):
            raise ModelError(f"token ids must be in 0..{vocab - 1}, not {int(tokens.min())}..{int(tokens.max())}")
        if start + len(tokens) > n_ctx:
            raise ModelError(f"positions {start}..{start + len(tokens) - 1} exceed the context of {n_ctx}")
        return (self.wte[tokens] + self.wpe[start:start + len(tokens)]).astype(np.float32)

    def logits(self, h) -> np.ndarray:
        """float64 logits ``[T, vocab]`` of the last layer's outputs ``h`` ``[T, d]``."""
        h = np.asarray(h, dtype=np.float64)
        mu = h.mean(-1, keepdims=True)
        var = ((h - mu) ** 2).mean(-1, keepdims=True)
        y = (h - mu) / np.sqrt(var + self.eps) * self.lnf_g + self.lnf_b
        return y @ self.wte.astype(np.float64).T


@dataclass
class Lm:
    cfg: LmConfig
    host: HostModel
    layers: list          # of firmware.gpt2.LayerWeights


def _layer_tensors(layers) -> dict:
    out = {}
    for i, w in enumerate(layers):
        for name, arr in zip(PARAMS, vars(w).values(), strict=True):
            out[f"h.{i}.{name}"] = np.ascontiguousarray(arr, dtype=np.float32)
    return out


def save(path, lm: Lm):
    """Write ``lm`` as safetensors (float32, Hugging Face GPT-2 names, hyperparameters as metadata)."""
    from safetensors.numpy import save_file

    h = lm.host
    tensors = {"wte.weight": h.wte, "wpe.weight": h.wpe, "ln_f.weight": h.lnf_g, "ln_f.bias": h.lnf_b}
    tensors = {k: np.ascontiguousarray(v, dtype=np.float32) for k, v in tensors.items()}
    tensors.update(_layer_tensors(lm.layers))
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path), metadata=lm.cfg.metadata())


def load(path) -> Lm:
    """Read a model written by :func:`save` (or any HF GPT-2 safetensors with ``wte``/``wpe``/``ln_f``)."""
    from safetensors import safe_open

    path = Path(path)
    if not path.exists():
        raise ModelError(f"weights file {path} does not exist: run `make model` to train it")
    with safe_open(str(path), "np") as f:
        meta = f.metadata() or {}
        keys = set(f.keys())

        def get(name):
            for k in (name, f"transformer.{name}"):
                if k in keys:
                    return f.get_tensor(k).astype(np.float32)
            raise ModelError(f"{path}: missing tensor {name}")

        host = HostModel(get("wte.weight"), get("wpe.weight"), get("ln_f.weight"), get("ln_f.bias"))
    vocab, d = host.wte.shape
    heads = int(meta.get("heads", 0)) or None
    shape, layers = load_weights(path, heads=heads)
    cfg = LmConfig(vocab=vocab, n_ctx=host.wpe.shape[0], d_model=d, heads=shape.heads, layers=shape.layers,
                   eps=float(meta.get("eps", 1e-5)))
    host.eps = cfg.eps
    if host.wpe.shape[1] != d or shape.d_model != d:
        raise ModelError(f"{path}: wpe / layers have width {host.wpe.shape[1]} / {shape.d_model}, wte has {d}")
    return Lm(cfg, host, layers)


def random_lm(cfg: LmConfig, seed: int = 0) -> Lm:
    """A randomly initialised model (GPT-2's initialisation scale) for tests."""
    rng = np.random.default_rng(seed)
    layers = random_weights(cfg.shape, seed)
    host = HostModel(wte=(0.02 * rng.standard_normal((cfg.vocab, cfg.d_model))).astype(np.float32),
                     wpe=(0.01 * rng.standard_normal((cfg.n_ctx, cfg.d_model))).astype(np.float32),
                     lnf_g=np.ones(cfg.d_model, np.float32), lnf_b=np.zeros(cfg.d_model, np.float32), eps=cfg.eps)
    return Lm(cfg, host, layers)


def log_softmax(logits: np.ndarray) -> np.ndarray:
    z = np.asarray(logits, dtype=np.float64)
    z = z - z.max(-1, keepdims=True)
    return z - np.log(np.exp(z).sum(-1, keepdims=True))


def nll(logits: np.ndarray, targets) -> np.ndarray:
    """Negative log-likelihood (nats) of ``targets`` under ``logits`` ``[T, vocab]``."""
    lp = log_softmax(logits)
    t = np.asarray(targets, dtype=np.int64)
    return -lp[np.arange(len(t)), t]


def perplexity_from_nll(nlls) -> float:
    return float(math.exp(float(np.mean(nlls))))
