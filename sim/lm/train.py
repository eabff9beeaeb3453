"""Train the Shakespeare model with jax + optax; ``make model`` runs ``python -m sim.lm.train``.

Deterministic: the initial weights and the batches come from ``--seed`` (XLA
on CPU gives the same floats for the same program and thread count). The
training text is :func:`sim.lm.data.split`'s train part (the held-out last
5 % is never trained on); every step draws ``--batch`` windows of
``n_ctx + 1`` bytes at random offsets. AdamW (beta2 0.99, weight decay 0.1 on
the matrices), linear warm-up then cosine decay, gradients clipped to norm 1.
Writes ``build/lm/shakespeare.safetensors`` (:func:`sim.lm.model.save`), the
held-out text (``heldout.txt``) and the loss curve (``train_log.json``: the
training loss averaged over each logging interval and the held-out loss on
fixed windows, in nats per byte).

Needs the optional dependencies: ``pip install -e ".[train]"`` (``make model``
does it, and installs the texts).
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import numpy as np

from sim.lm.model import DEFAULT_WEIGHTS, HostModel, Lm, LmConfig, save

__all__ = ["init_params", "loss_fn", "train", "main"]


def init_params(cfg: LmConfig, seed: int) -> dict:
    """GPT-2's initialisation: N(0, 0.02) matrices, residual projections scaled by 1/sqrt(2 layers),
    position embeddings N(0, 0.01), zero biases, unit layernorm gains. Keys are the HF names."""
    rng = np.random.default_rng(seed)
    d, f = cfg.d_model, 4 * cfg.d_model
    sp = 0.02 / math.sqrt(2 * cfg.layers)
    p = {"wte.weight": 0.02 * rng.standard_normal((cfg.vocab, d)),
         "wpe.weight": 0.01 * rng.standard_normal((cfg.n_ctx, d)),
         "ln_f.weight": np.ones(d), "ln_f.bias": np.zeros(d)}
    for i in range(cfg.layers):
        p.update({f"h.{i}.ln_1.weight": np.ones(d), f"h.{i}.ln_1.bias": np.zeros(d),
                  f"h.{i}.attn.c_attn.weight": 0.02 * rng.standard_normal((d, 3 * d)),
                  f"h.{i}.attn.c_attn.bias": np.zeros(3 * d),
                  f"h.{i}.attn.c_proj.weight": sp * rng.standard_normal((d, d)),
                  f"h.{i}.attn.c_proj.bias": np.zeros(d),
                  f"h.{i}.ln_2.weight": np.ones(d), f"h.{i}.ln_2.bias": np.zeros(d),
                  f"h.{i}.mlp.c_fc.weight": 0.02 * rng.standard_normal((d, f)),
                  f"h.{i}.mlp.c_fc.bias": np.zeros(f),
                  f"h.{i}.mlp.c_proj.weight": sp * rng.standard_normal((f, d)),
                  f"h.{i}.mlp.c_proj.bias": np.zeros(d)})
    return {k: np.asarray(v, dtype=np.float32) for k, v in p.items()}


def _forward(p, tokens, cfg: LmConfig):
    """Logits ``[B, T, vocab]`` (jax)."""
    import jax
    import jax.numpy as jnp

    B, T = tokens.shape
    d, H = cfg.d_model, cfg.heads
    hd = d // H

    def ln(x, g, b):
        mu = x.mean(-1, keepdims=True)
        var = ((x - mu) ** 2).mean(-1, keepdims=True)
        return (x - mu) * jax.lax.rsqrt(var + cfg.eps) * g + b

    x = p["wte.weight"][tokens] + p["wpe.weight"][:T][None]
    mask = jnp.tril(jnp.ones((T, T), dtype=bool))
    for i in range(cfg.layers):
        q = f"h.{i}."
        h = ln(x, p[q + "ln_1.weight"], p[q + "ln_1.bias"])
        qkv = h @ p[q + "attn.c_attn.weight"] + p[q + "attn.c_attn.bias"]
        qq, kk, vv = (qkv[..., j * d:(j + 1) * d].reshape(B, T, H, hd) for j in range(3))
        s = jnp.einsum("bqhd,bkhd->bhqk", qq, kk) / math.sqrt(hd)
        s = jnp.where(mask, s, -jnp.inf)
        o = jnp.einsum("bhqk,bkhd->bqhd", jax.nn.softmax(s, axis=-1), vv).reshape(B, T, d)
        x = x + o @ p[q + "attn.c_proj.weight"] + p[q + "attn.c_proj.bias"]
        h = ln(x, p[q + "ln_2.weight"], p[q + "ln_2.bias"])
        g = jax.nn.gelu(h @ p[q + "mlp.c_fc.weight"] + p[q + "mlp.c_fc.bias"], approximate=True)
        x = x + g @ p[q + "mlp.c_proj.weight"] + p[q + "mlp.c_proj.bias"]
    x = ln(x, p["ln_f.weight"], p["ln_f.bias"])
    return x @ p["wte.weight"].T


def loss_fn(p, batch, cfg: LmConfig):
    """Mean cross-entropy (nats) of ``batch[:, 1:]`` given ``batch[:, :-1]``."""
    import jax
    import jax.numpy as jnp

    logits = _forward(p, batch[:, :-1], cfg)
    lp = jax.nn.log_softmax(logits, axis=-1)
    return -jnp.take_along_axis(lp, batch[:, 1:, None], axis=-1).mean()


def _windows(tokens: np.ndarray, n: int, length: int) -> np.ndarray:
    """``n`` windows of ``length`` evenly spaced over ``tokens``."""
    if len(tokens) < length:
        raise ValueError(f"text of {len(tokens)} bytes is shorter than one window of {length}")
    starts = np.linspace(0, len(tokens) - length, n).astype(np.int64)
    return np.stack([tokens[s:s + length] for s in starts]).astype(np.int32)


def train(cfg: LmConfig, train_tokens: np.ndarray, heldout_tokens: np.ndarray, steps: int, batch: int = 32,
          lr: float = 2e-3, warmup: int = 100, seed: int = 0, log_every: int = 50, eval_every: int = 250,
          eval_windows: int = 64, log=print) -> tuple[Lm, dict]:
    """Train; returns the model and the log ``{"steps": [...], "train_loss": [...], "heldout": [...]}``."""
    import jax
    import jax.numpy as jnp
    import optax

    if steps < 1:
        raise ValueError(f"steps must be at least 1, not {steps}")
    L = cfg.n_ctx + 1
    if len(train_tokens) < L:
        raise ValueError(f"training text of {len(train_tokens)} bytes is shorter than one window of {L}")
    params = jax.tree_util.tree_map(jnp.asarray, init_params(cfg, seed))
    sched = optax.warmup_cosine_decay_schedule(0.0, lr, min(warmup, max(1, steps // 2)), steps, lr / 10)
    decay = jax.tree_util.tree_map(lambda a: a.ndim == 2, params)
    opt = optax.chain(optax.clip_by_global_norm(1.0),
                      optax.adamw(sched, b1=0.9, b2=0.99, weight_decay=0.1, mask=decay))
    state = opt.init(params)

    @jax.jit
    def step(params, state, batch_):
        loss, grads = jax.value_and_grad(loss_fn)(params, batch_, cfg)
        updates, state = opt.update(grads, state, params)
        return optax.apply_updates(params, updates), state, loss

    eval_batch = jnp.asarray(_windows(heldout_tokens, eval_windows, L))
    eval_loss = jax.jit(lambda p: loss_fn(p, eval_batch, cfg))
    rng = np.random.default_rng(seed + 1)
    hist = {"steps": [], "train_loss": [], "heldout_steps": [], "heldout_loss": [], "wall_s": []}
    t0 = time.perf_counter()
    acc, n_acc = 0.0, 0
    for it in range(1, steps + 1):
        starts = rng.integers(0, len(train_tokens) - L + 1, size=batch)
        b = np.stack([train_tokens[s:s + L] for s in starts]).astype(np.int32)
        params, state, loss = step(params, state, jnp.asarray(b))
        acc += float(loss)
        n_acc += 1
        if it % log_every == 0 or it == steps:
            hist["steps"].append(it)
            hist["train_loss"].append(acc / n_acc)
            hist["wall_s"].append(time.perf_counter() - t0)
            msg = f"step {it:5d}  train loss {acc / n_acc:.4f}"
            acc, n_acc = 0.0, 0
            if it % eval_every == 0 or it == steps:
                ev = float(eval_loss(params))
                hist["heldout_steps"].append(it)
                hist["heldout_loss"].append(ev)
                msg += f"  held-out loss {ev:.4f} (perplexity {math.exp(ev):.3f})"
            log(msg + f"  [{time.perf_counter() - t0:.0f} s]")
    p = {k: np.asarray(v, dtype=np.float32) for k, v in params.items()}
    from firmware.gpt2 import LayerWeights
    layers = [LayerWeights.from_params({n[len(f"h.{i}."):]: v for n, v in p.items() if n.startswith(f"h.{i}.")},
                                       cfg.d_model, f"layer {i}") for i in range(cfg.layers)]
    host = HostModel(p["wte.weight"], p["wpe.weight"], p["ln_f.weight"], p["ln_f.bias"], cfg.eps)
    return Lm(cfg, host, layers), hist


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=str(DEFAULT_WEIGHTS))
    ap.add_argument("--steps", type=int, default=1000)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--warmup", type=int, default=50)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--n-ctx", type=int, default=128)
    ap.add_argument("--d-model", type=int, default=256)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--log-every", type=int, default=25)
    ap.add_argument("--eval-every", type=int, default=100)
    args = ap.parse_args(argv)
    from sim.lm import data

    cfg = LmConfig(n_ctx=args.n_ctx, d_model=args.d_model, heads=args.heads, layers=args.layers)
    tr, ho = data.split(data.corpus())
    print(f"corpus: {len(data.text_files())} files, {len(tr) + len(ho):,} bytes; train {len(tr):,}, "
          f"held out {len(ho):,} (last {data.HELDOUT_FRACTION:.0%})")
    print(f"model: {cfg}; {args.steps} steps of {args.batch} x {cfg.n_ctx} tokens, seed {args.seed}", flush=True)
    t0 = time.perf_counter()
    lm, hist = train(cfg, tr, ho, args.steps, args.batch, args.lr, args.warmup, args.seed, args.log_every,
                     args.eval_every, log=lambda m: print(m, flush=True))
    out = Path(args.out)
    save(out, lm)
    (out.parent / data.HELDOUT_FILE).write_bytes(ho.tobytes())
    hist.update({"config": cfg.metadata(), "steps_total": args.steps, "batch": args.batch, "lr": args.lr,
                 "seed": args.seed, "train_wall_s": time.perf_counter() - t0})
    (out.parent / "train_log.json").write_text(json.dumps(hist, indent=1))
    print(f"wrote {out} ({out.stat().st_size / 2**20:.1f} MiB), {out.parent / data.HELDOUT_FILE}, "
          f"{out.parent / 'train_log.json'}; {time.perf_counter() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
