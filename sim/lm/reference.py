"""numpy forward passes of the language model: float64, and the SoC's numerics with a low-precision format.

:func:`forward_f64`: every layer by :func:`firmware.gpt2.reference_block`
(float64), the host's final layernorm and LM head in float64.

:func:`forward_fmt` takes a :class:`firmware.quant.Format` and follows where the
SoC rounds (the compiled layers' buffers): the residual stream in FP32;
layernorm in float32, its output rounded to BF16; the four FCs (QKV,
attention projection, FC1, FC2) with the format's weights and activations:

* ``bf16`` weights: BF16 inputs times BF16 weights, float32 accumulation
  (numpy's matmul order, not the hardware's; the error of the order is
  ~1e-7 relative, far below the formats' effects);
* ``int4`` / ``fp4`` weights: the low-precision PIM GEMV's golden model
  (:func:`sim.golden.lowprec.gemv`, the exact order the unit is to follow),
  on BF16 activations, or on FP8-E4M3 activations with a per-token scale
  (``acts = fp8_e4m3``);

bias added in FP32; Q, K, V rounded to BF16; with ``kv = int4`` the K and V
rows are quantized per token (groups of ``kv_group`` channels across heads,
:func:`firmware.quant.quantize_kv`) when appended and dequantized to BF16
where attention reads them (the current token too); scores BF16 x BF16 in
float32 divided by sqrt(head_dim), causal softmax in float32, probabilities
rounded to BF16, times V (BF16) in float32, the head outputs rounded to BF16;
GELU (tanh) in float32 on the FP32 FC1 output, rounded to BF16. The query and
the probabilities stay BF16 (P3-LLM's FP8 query / 10-bit probabilities are not
modelled).
"""

from __future__ import annotations

import math

import ml_dtypes
import numpy as np

from firmware.gpt2 import LayerWeights, reference_block
from firmware.quant import Format, quantize_fp8, quantize_kv, quantize_weights
from sim.golden import lowprec

__all__ = ["forward_f64", "forward_fmt", "QuantizedModel", "bf16"]


def bf16(x) -> np.ndarray:
    """Round to BF16 (RNE), as float32."""
    return np.asarray(x, dtype=np.float32).astype(ml_dtypes.bfloat16).astype(np.float32)


def forward_f64(lm, tokens) -> np.ndarray:
    """float64 logits ``[T, vocab]``."""
    h = lm.host.embed(tokens).astype(np.float64)
    for w in lm.layers:
        h = reference_block(h, w, lm.cfg.shape)
    return lm.host.logits(h)


class QuantizedModel:
    """The decoder layers' FC weights in ``fmt`` (quantized once)."""

    FCS = (("qkv", "qkv_w", "qkv_b"), ("proj", "proj_w", "proj_b"), ("fc1", "fc1_w", "fc1_b"),
           ("fc2", "fc2_w", "fc2_b"))

    def __init__(self, lm, fmt: Format):
        self.lm, self.fmt = lm, fmt
        self.layers = []
        for w in lm.layers:
            fcs = {}
            for name, wn, bn in self.FCS:
                W = getattr(w, wn)
                if fmt.weights == "bf16":
                    fcs[name] = (bf16(W), np.asarray(getattr(w, bn), dtype=np.float32))
                else:
                    fcs[name] = (quantize_weights(W, fmt.weights, fmt.group, fmt.scale_format, fmt.grid_choice),
                                 np.asarray(getattr(w, bn), dtype=np.float32))
            self.layers.append(fcs)

    def fc(self, a: np.ndarray, fc) -> np.ndarray:
        """FP32 ``a @ W + b`` for BF16-valued activations ``a`` ``[T, K]`` in the format."""
        W, b = fc
        if self.fmt.acts == "fp8_e4m3":
            act = quantize_fp8(a)
        else:
            act = bf16(a)
        if self.fmt.weights == "bf16":
            x = act.dequantize().astype(np.float32) if self.fmt.acts == "fp8_e4m3" else act
            return (x @ W + b).astype(np.float32)
        if self.fmt.acts != "fp8_e4m3":
            from hw.spec import fp as G
            act = G.bf16_bits(act)
        return lowprec.gemv_f32(W, act, b)


def _ln(x, g, b, eps):
    x = np.asarray(x, dtype=np.float32)
    mu = x.mean(-1, keepdims=True)
    var = ((x - mu) ** 2).mean(-1, keepdims=True)
    return ((x - mu) / np.sqrt(var + np.float32(eps)) * g + b).astype(np.float32)


def _gelu(x):
    x = np.asarray(x, dtype=np.float32)
    c = np.float32(math.sqrt(2.0 / math.pi))
    return (np.float32(0.5) * x * (np.float32(1) + np.tanh(c * (x + np.float32(0.044715) * x ** 3)))).astype(np.float32)


def _block(qm: QuantizedModel, i: int, x: np.ndarray) -> np.ndarray:
    w: LayerWeights = qm.lm.layers[i]
    fcs = qm.layers[i]
    shape = qm.lm.cfg.shape
    T, d = x.shape
    H, hd = shape.heads, shape.head_dim
    h = bf16(_ln(x, w.ln1_g, w.ln1_b, shape.eps))
    qkv = qm.fc(h, fcs["qkv"])
    q, k, v = bf16(qkv[:, :d]), bf16(qkv[:, d:2 * d]), bf16(qkv[:, 2 * d:])
    if qm.fmt.kv == "int4":
        k = bf16(quantize_kv(k, qm.fmt.kv_group).dequantize())
        v = bf16(quantize_kv(v, qm.fmt.kv_group).dequantize())
    o = np.empty((T, d), dtype=np.float32)
    mask = np.tril(np.ones((T, T), dtype=bool))
    inv = np.float32(1.0 / math.sqrt(hd))
    for j in range(H):
        sl = slice(j * hd, (j + 1) * hd)
        s = (q[:, sl] @ k[:, sl].T) * inv
        s = np.where(mask, s, -np.inf).astype(np.float32)
        p = np.exp(s - s.max(-1, keepdims=True))
        p = bf16(p / p.sum(-1, keepdims=True))
        o[:, sl] = bf16(p @ v[:, sl])
    x2 = (x + qm.fc(o, fcs["proj"])).astype(np.float32)
    h2 = bf16(_ln(x2, w.ln2_g, w.ln2_b, shape.eps))
    g = bf16(_gelu(qm.fc(h2, fcs["fc1"])))
    return (x2 + qm.fc(g, fcs["fc2"])).astype(np.float32)


def forward_fmt(qm: QuantizedModel, tokens) -> np.ndarray:
    """float64 logits ``[T, vocab]`` with the SoC's roundings and ``qm``'s format (see the module)."""
    x = qm.lm.host.embed(tokens)
    for i in range(len(qm.lm.layers)):
        x = _block(qm, i, x)
    return qm.lm.host.logits(x)
