"""Held-out perplexity of the language model: float64, the formats' golden numerics, the SoC's functional model.

The held-out text (:func:`sim.lm.data.heldout`) is cut into ``windows``
windows of ``n_ctx`` bytes, evenly spaced; each window is one forward pass
from position 0, and every byte after the first is predicted from the bytes
before it in its window (``n_ctx - 1`` predictions per window). Perplexity is
``exp(mean negative log-likelihood)`` over all predictions, in nats per byte
before the exponential (bits per byte = nats / ln 2).

Numerics (``numerics``):

* ``float64``: :func:`sim.lm.reference.forward_f64`;
* ``golden``: :func:`sim.lm.reference.forward_fmt` with a format of
  :data:`firmware.quant.FORMATS` (``bf16``, ``w4-int``, ``w4-fp4``, ``w4a8``,
  ``w4a8kv4``);
* ``soc-model``: the decoder layers compiled for the SoC (``ianus`` policy,
  ``default`` configuration) and run as one prefill per window on the
  functional model (BF16 numerics of the RTL, bit-exact with it); the host's
  final layernorm and LM head in float64.
"""

from __future__ import annotations

import math
import time

import numpy as np

from firmware.quant import FORMATS
from sim.lm.model import Lm, nll
from sim.lm.reference import QuantizedModel, forward_f64, forward_fmt

__all__ = ["windows", "soc_logits", "evaluate", "NUMERICS"]

NUMERICS = ("float64", "golden", "soc-model")


def windows(tokens: np.ndarray, n: int, length: int) -> list[np.ndarray]:
    """``n`` windows of ``length`` tokens, evenly spaced over ``tokens`` (non-overlapping when it is long enough)."""
    if n < 1:
        raise ValueError(f"windows must be at least 1, not {n}")
    if len(tokens) < length:
        raise ValueError(f"held-out text of {len(tokens)} bytes is shorter than one window of {length}")
    starts = np.linspace(0, len(tokens) - length, n).astype(np.int64)
    return [np.asarray(tokens[s:s + length], dtype=np.int64) for s in starts]


def soc_logits(lm: Lm, tokens, config: str = "default", policy: str = "ianus") -> np.ndarray:
    """float64 logits ``[T, vocab]`` with the decoder layers prefilled on the SoC's functional model."""
    from firmware.compiler import compile_model
    from firmware.runtime import build_job, read_outputs
    from sim.run import soc_config
    from sim.soc_model import run_job

    T = len(tokens)
    cm = compile_model(soc_config(config), lm.cfg.shape, policy, T, T)
    job = build_job(cm, lm.layers, lm.host.embed(tokens))
    m = run_job(job)
    return lm.host.logits(read_outputs(cm, m.read))


def evaluate(lm: Lm, wins: list, fmt: str = "bf16", numerics: str = "golden", qm: QuantizedModel | None = None,
             config: str = "default") -> dict:
    """Perplexity over ``wins``; returns ``{"perplexity", "nll", "bits_per_byte", "tokens", "wall_s"}``."""
    if numerics not in NUMERICS:
        raise ValueError(f"numerics must be one of {', '.join(NUMERICS)}, not {numerics!r}")
    if numerics == "golden" and fmt not in FORMATS:
        raise ValueError(f"format must be one of {', '.join(FORMATS)}, not {fmt!r}")
    t0 = time.perf_counter()
    if numerics == "golden" and qm is None:
        qm = QuantizedModel(lm, FORMATS[fmt])
    nlls = []
    for w in wins:
        if numerics == "float64":
            logits = forward_f64(lm, w)
        elif numerics == "golden":
            logits = forward_fmt(qm, w)
        else:
            logits = soc_logits(lm, w, config)
        nlls.append(nll(logits[:-1], w[1:]))
    v = np.concatenate(nlls)
    m = float(v.mean())
    return {"perplexity": math.exp(m), "nll": m, "bits_per_byte": m / math.log(2), "tokens": int(v.size),
            "wall_s": time.perf_counter() - t0}
