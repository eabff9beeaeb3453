"""``ianus`` on bad input (issue 21's table): one line naming the value and the limit, exit 2 for input rejected
before anything runs, 1 for a run failure, no traceback unless --debug; output paths checked before the run;
NaN/Inf rejected (or let through and reported with --allow-nonfinite); the size limits.

Every case runs ``sim.cli.main`` in-process. Builds and simulations are replaced by a function that fails the
test, so a case that is not rejected up front shows up as a failure instead of a long run. The few cases that
must run use the functional model (``--backend model``, tiny configuration, about a second each).
"""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from firmware.gpt2 import GptShape, random_weights, save_npz
from sim import cli

TINY = ["run", "--config", "tiny"]


@pytest.fixture(autouse=True)
def no_builds(monkeypatch):
    """Any RTL build or simulation during these tests is a failure: validation must come first."""
    import sim.build
    import sim.run

    def forbidden(*a, **k):
        raise AssertionError("a build or simulation started: the input should have been rejected before")

    monkeypatch.setattr(sim.run, "run_rtl_jobs", forbidden)
    monkeypatch.setattr(sim.build, "build", forbidden)
    monkeypatch.setattr(cli, "run_pim_gemvs", forbidden)
    monkeypatch.setattr(cli, "run_proto_layer", forbidden)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("inputs")
    w = random_weights(GptShape(32, 2, 1), 0)
    save_npz(d / "good.npz", w)
    w[0].qkv_w[1, 2] = np.nan
    save_npz(d / "nan.npz", w)
    w[0].qkv_w[1, 2] = np.inf
    save_npz(d / "inf.npz", w)
    good = dict(np.load(d / "good.npz"))
    np.savez(d / "int.npz", **{k: v.astype(np.int32) for k, v in good.items()})
    np.savez(d / "bool.npz", **{k: v > 0 for k, v in good.items()})
    np.savez(d / "complex.npz", **{k: v.astype(np.complex64) for k, v in good.items()})
    np.savez(d / "missing.npz", **{k: v for k, v in good.items() if not k.endswith("ln_2.bias")})
    np.savez(d / "shape.npz", **{k: (v[:-1] if k.endswith("c_fc.bias") else v) for k, v in good.items()})
    (d / "empty.safetensors").write_bytes(b"")
    (d / "corrupt.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all}")
    (d / "garbage.npz").write_bytes(b"\x80\x04garbage")
    (d / "weights.txt").write_text("no")
    x = np.random.default_rng(0).standard_normal((10, 32)).astype(np.float32)
    np.save(d / "x.npy", x)
    for name, arr in {"x_nan": np.where(np.arange(32) == 5, np.nan, x), "x_inf": np.where(np.arange(32) == 5, np.inf, x),
                      "x_int8": x.astype(np.int8), "x_int32": x.astype(np.int32), "x_bool": x > 0,
                      "x_complex": x.astype(np.complex64), "x_1d": x[0], "x_wide": np.zeros((10, 48), np.float32),
                      "x_empty": np.zeros((0, 32), np.float32), "x_f64_overflow": np.full((10, 32), 1e300)}.items():
        np.save(d / f"{name}.npy", arr)
    x_big = x.copy()
    x_big[3, 5] = 1e30
    np.save(d / "x_1e30.npy", x_big)
    (d / "x_garbage.npy").write_bytes(b"not an array")
    (d / "a_file").write_text("")
    return d


def ianus(argv, capsys):
    """(exit code, stdout, stderr) of ``ianus argv`` in-process."""
    code = cli.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def check_error(argv, capsys, code, *needles):
    got, out, err = ianus(argv, capsys)
    assert got == code, (argv, got, out, err)
    assert "Traceback" not in out + err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    for n in needles:
        assert n in lines[0], (n, lines[0])
    return lines[0]


# -- usage errors: rejected before anything is built or run (exit 2) ---------------------------------------------

BAD_ARGS = [
    (["--prefill", "-3"], "--prefill must be an integer in 1..65,535, not -3"),
    (["--prefill", "0"], "--prefill must be an integer in 1..65,535, not 0"),
    (["--generate", "-1"], "--generate must be an integer in 0..65,535, not -1"),
    (["--generate", str(10**12)], "--generate must be an integer in 0..65,535, not 1,000,000,000,000"),
    (["--prefill", "40000", "--generate", "40000"], "at most 65,535 tokens, not 80,000"),
    (["--seed", "-1"], "--seed must be an integer in 0..9,223,372,036,854,775,807, not -1"),
    (["--layers", "0"], "--layers must be an integer in 1..1,024, not 0"),
    (["--layers", "100000"], "--layers must be an integer in 1..1,024, not 100,000"),
    (["--heads", "0"], "--heads must be an integer >= 1, not 0"),
    (["--heads", "3"], "d_model (32) must be a positive multiple of heads (3)"),
    (["--heads", "4"], "d_model (32) and head_dim (8) must be multiples of 16"),
    (["--baseline-steps", "0"], "--baseline-steps must be an integer >= 1, not 0"),
    (["--generate", "5000"], "5,008 tokens (prefill + generated) do not fit the device memory of configuration "
                             "'tiny': at most {limit} with 1 layer(s) of d_model 32 under policy ianus"),
    (["--layers", "3", "--generate", "300"], "308 tokens (prefill + generated) do not fit the device memory of "
                                             "configuration 'tiny': at most {limit} with 3 layer(s)"),
    (["--layers", "3", "--policy", "npu-mem", "--generate", "300"], "at most {limit} with 3 layer(s) of d_model 32 "
                                                                     "under policy npu-mem"),
    (["--policy", "hpim"], "--policy hpim runs attention on the SRAM-PIM unit, which only --config tiny-hpim / "
                           "default-hpim have, not tiny"),
    (["--config", "bogus"], "argument --config: invalid choice: 'bogus'"),
    (["--prefill", "x"], "argument --prefill: invalid int value: 'x'"),
    (["--frobnicate"], "unrecognized arguments: --frobnicate"),
]


def limit_of(config, args):
    """The token limit of a run, found here independently of sim.run.token_limit: the largest token count whose
    memory plan the compiler accepts."""
    from firmware.compiler import CompileError, plan_memory
    from sim.run import DEFAULT_SHAPE, TINY_SHAPE, soc_config

    base = TINY_SHAPE if config == "tiny" else DEFAULT_SHAPE
    layers = int(args[args.index("--layers") + 1]) if "--layers" in args else 1
    policy = args[args.index("--policy") + 1] if "--policy" in args else "ianus"
    cfg, shape = soc_config(config), GptShape(base.d_model, base.heads, layers)
    t = 1
    while True:                       # linear scan: slow but obviously right
        try:
            plan_memory(cfg, shape, t + 1, pim_layout=(policy != "npu-mem"))
        except CompileError:
            return t
        t += 1


@pytest.mark.parametrize("args, message", BAD_ARGS, ids=[" ".join(a) for a, _ in BAD_ARGS])
def test_run_argument_errors(args, message, capsys):
    if "{limit}" in message:
        message = message.format(limit=f"{limit_of('tiny', args):,}")
    check_error(TINY + args, capsys, 2, "ianus run: error:", message)


def test_default_config_limits(capsys):
    limit = limit_of("default", [])
    check_error(["run", "--generate", str(limit - 31)], capsys, 2, f"{limit + 1:,} tokens",
                f"configuration 'default': at most {limit:,} with 1 layer(s) of d_model 768 under policy ianus")
    check_error(["run", "--layers", "1024"], capsys, 2, "1024 layer(s) of d_model 768 do not fit the")


WEIGHT_ERRORS = [
    ("nonexistent.npz", "--weights {f} does not exist"),
    ("nan.npz", "{f}: tensor h.0.attn.c_attn.weight has 1 NaN/Inf value(s), the first at [1, 2] (--allow-nonfinite"),
    ("inf.npz", "{f}: tensor h.0.attn.c_attn.weight has 1 NaN/Inf value(s)"),
    ("int.npz", "{f}: tensor transformer.h.0.ln_1.weight has dtype int32; expected one of float16, bfloat16, "
                "float32, float64"),
    ("bool.npz", "{f}: tensor transformer.h.0.ln_1.weight has dtype bool"),
    ("complex.npz", "{f}: tensor transformer.h.0.ln_1.weight has dtype complex64"),
    ("missing.npz", "{f} layer 0: missing tensor ln_2.bias"),
    ("shape.npz", "{f} layer 0: mlp.c_fc.bias has shape (127,), expected (128,)"),
    ("empty.safetensors", "weights file {f} is not a safetensors file"),
    ("corrupt.safetensors", "weights file {f} is not a safetensors file"),
    ("garbage.npz", "weights file {f} is not an .npz archive"),
    ("weights.txt", "weights file {f} must be .safetensors or .npz, not '.txt'"),
]


@pytest.mark.parametrize("name, message", WEIGHT_ERRORS, ids=[w[0] for w in WEIGHT_ERRORS])
def test_weights_errors(name, message, files, capsys):
    check_error(TINY + ["--weights", files / name, "--heads", "2"], capsys, 2, message.format(f=files / name))


def test_weights_need_heads_when_d_model_is_not_64_heads(files, capsys):
    check_error(TINY + ["--weights", files / "good.npz"], capsys, 2, "d_model 32 is not a multiple of 64",
                "--heads", "good.npz")
    check_error(TINY + ["--weights", files / "good.npz", "--heads", "2", "--layers", "2"], capsys, 2,
                "holds 1 layers, 2 requested")


INPUT_ERRORS = [
    ("missing.npy", "--input {f} does not exist"),
    ("x_nan.npy", "--input {f} has 10 NaN/Inf value(s) as float32, the first at [0, 5] (--allow-nonfinite"),
    ("x_inf.npy", "--input {f} has 10 NaN/Inf value(s) as float32, the first at [0, 5]"),
    ("x_f64_overflow.npy", "--input {f} has 320 NaN/Inf value(s) as float32"),
    ("x_int8.npy", "--input {f} has dtype int8; expected one of float16, bfloat16, float32, float64"),
    ("x_int32.npy", "--input {f} has dtype int32"),
    ("x_bool.npy", "--input {f} has dtype bool"),
    ("x_complex.npy", "--input {f} has dtype complex64"),
    ("x_1d.npy", "--input must hold [tokens, 32] hidden states (tokens >= 1), not shape (32,)"),
    ("x_wide.npy", "--input must hold [tokens, 32] hidden states (tokens >= 1), not shape (10, 48)"),
    ("x_empty.npy", "--input must hold [tokens, 32] hidden states (tokens >= 1), not shape (0, 32)"),
    ("x_garbage.npy", "--input {f} is not a .npy array"),
    ("good.npz", "--input {f} is an .npz archive; give one [tokens, d_model] array as .npy"),
]


@pytest.mark.parametrize("name, message", INPUT_ERRORS, ids=[i[0] for i in INPUT_ERRORS])
def test_input_errors(name, message, files, capsys):
    check_error(TINY + ["--input", files / name], capsys, 2, message.format(f=files / name))


def test_input_token_counts(files, capsys):
    x = files / "x.npy"
    check_error(TINY + ["--input", x, "--generate", "3"], capsys, 2,
                "--prefill 8 + --generate 3 = 11 tokens, but --input", "holds 10")
    check_error(TINY + ["--input", x, "--prefill", "11"], capsys, 2, "--prefill 11 exceeds the 10 token(s) of --input")


OUTPUT_ERRORS = [
    ("--output", "{d}/no/such/dir/out.npy", "directory {d}/no/such/dir does not exist"),
    ("--output", "{d}", "is a directory; give a file name"),
    ("--output", "{d}/", "is a directory; give a file name"),
    ("--output", "{d}/a_file/out.npy", "{d}/a_file is not a directory"),
    ("--trace", "{d}", "is a directory; give a file name"),
    ("--trace", "{d}/a_file/t.json", "{d}/a_file is not a directory"),
    ("--trace", "/proc/ianus_trace.json", "directory /proc is not writable"),
    ("--output", "/proc/ianus_out.npy", "directory /proc is not writable"),
]


@pytest.mark.parametrize("option, path, message", OUTPUT_ERRORS, ids=[f"{o} {p}" for o, p, _ in OUTPUT_ERRORS])
def test_output_paths_checked_first(option, path, message, files, capsys):
    before = sorted(os.listdir(files))
    check_error(TINY + ["--backend", "model", option, path.format(d=files)], capsys, 2,
                message.format(d=files))
    assert sorted(os.listdir(files)) == before, "nothing is written"


def test_output_named_like_an_existing_directory(files, tmp_path, capsys):
    """numpy adds .npy: --output DIR (where DIR.npy is a directory) is refused, not written elsewhere."""
    (tmp_path / "out.npy").mkdir()
    check_error(TINY + ["--output", tmp_path / "out"], capsys, 2, "out.npy (the name with .npy) is a directory")


# -- runs that go through (functional model, ~1 s each) ------------------------------------------------------------

def model_run(extra, tmp_path, capsys):
    trace = tmp_path / "t.json"
    code, out, err = ianus(TINY + ["--backend", "model", "--baseline", "none", "--trace", trace] + extra, capsys)
    assert code == 0, err
    assert "Traceback" not in out + err
    return out


def test_generate_with_input_is_honoured(files, tmp_path, capsys):
    out_npy = tmp_path / "y"                   # numpy's .npy is added, and the printed path is the written one
    out = model_run(["--input", files / "x.npy", "--prefill", "6", "--generate", "2", "--output", out_npy],
                    tmp_path, capsys)
    y = np.load(tmp_path / "y.npy")
    assert y.shape == (8, 32) and y.dtype == np.float32
    assert f"-> {tmp_path / 'y.npy'}" in out
    assert "prefill 6, generate 2" in out
    # Without --generate: every token of --input after the prefilled ones is generated.
    out = model_run(["--input", files / "x.npy", "--prefill", "6"], tmp_path, capsys)
    assert "prefill 6, generate 4" in out
    assert not [f for f in os.listdir(tmp_path) if f.endswith(".tmp")], "no temporary files left"


def test_allow_nonfinite_propagates_and_reports(files, tmp_path, capsys):
    out = model_run(["--input", files / "x_nan.npy", "--allow-nonfinite", "--output", tmp_path / "y.npy"],
                    tmp_path, capsys)
    y = np.load(tmp_path / "y.npy")
    assert np.isnan(y).any()
    assert f"warning: {int((~np.isfinite(y)).sum()):,} of 320 outputs are NaN/Inf" in out
    out = model_run(["--weights", files / "nan.npz", "--heads", "2", "--allow-nonfinite"], tmp_path, capsys)
    assert "outputs are NaN/Inf" in out


def test_large_input_warns_about_the_error_bound(files, tmp_path, capsys):
    out = model_run(["--input", files / "x_1e30.npy"], tmp_path, capsys)
    assert "warning: max |err| vs float64 is" in out and "above the 10% bound stated for policy ianus" in out
    out = model_run(["--input", files / "x.npy"], tmp_path, capsys)
    assert "warning" not in out


# -- other subcommands ---------------------------------------------------------------------------------------------

GEMV_ERRORS = [
    (["--shapes", "768x"], "--shapes: '768x' is not KxN or KxNg with positive integers K and N"),
    (["--shapes", "0x16"], "--shapes: '0x16' is not KxN"),
    (["--shapes", "16x-3"], "'16x-3' is not KxN"),
    (["--shapes", "axb"], "'axb' is not KxN"),
    (["--shapes", "64x32,"], "'' is not KxN"),
    (["--config", "tiny"], "--shapes 768x2304: does not fit configuration 'tiny': GEMV 768x2304 needs rows"),
    (["--config", "tiny", "--shapes", "64x32,768x768"], "768x768: does not fit configuration 'tiny'"),
]


@pytest.mark.parametrize("args, message", GEMV_ERRORS, ids=[" ".join(a) for a, _ in GEMV_ERRORS])
def test_gemv_errors(args, message, capsys):
    check_error(["gemv"] + args, capsys, 2, "ianus gemv: error:", message)
    check_error(["gemv", "--json"] + args, capsys, 2, message)


PROJECT_ERRORS = [
    (["--models", "nonexistent"], "--models: unknown name 'nonexistent' (choose from small, medium"),
    (["--models", ""], "--models needs at least one of"),
    (["--policies", "bogus"], "--policies: unknown name 'bogus' (choose from ianus, npu-mem, hpim)"),
    (["--samples", "0"], "--samples must be an integer in 2..4,096, not 0"),
    (["--samples", "1"], "--samples must be an integer in 2..4,096, not 1"),
    (["--devices", "0"], "--devices must be an integer in 1..1,024, not 0"),
    (["--devices", "2,x"], "--devices: 'x' is not an integer"),
    (["--inputs", "-5"], "--inputs must be an integer in 1..65,536, not -5"),
    (["--outputs", "0"], "--outputs must be an integer in 1..65,536, not 0"),
    (["--scaling-input", "0"], "--scaling-input must be an integer in 1..65,536, not 0"),
    (["--models", "xl", "--inputs", "60000", "--outputs", "1"],
     "model xl with 60,001 tokens (input + output) under policy ianus does not fit one layer"),
    (["--out", "README.md"], "--out README.md is a file, not a directory"),
]


@pytest.mark.parametrize("args, message", PROJECT_ERRORS, ids=[" ".join(a) for a, _ in PROJECT_ERRORS])
def test_project_errors(args, message, capsys, monkeypatch):
    import sim.project

    monkeypatch.setattr(sim.project, "project", lambda *a, **k: pytest.fail("projection started"))
    check_error(["project"] + args, capsys, 2, "ianus project: error:", message)


def test_usage_errors_are_one_line(capsys):
    check_error([], capsys, 2, "ianus: error: the following arguments are required: cmd")
    check_error(["frob"], capsys, 2, "ianus: error: argument cmd: invalid choice: 'frob'")
    check_error(["config", "--config", "huge"], capsys, 2, "ianus config: error: argument --config: invalid choice")


def test_run_failure_is_one_line_exit_1_and_debug_shows_the_traceback(capsys, monkeypatch):
    import sim.run

    def broken(*a, **k):
        raise KeyError((0, 0, 0))

    monkeypatch.setattr(sim.run, "compile_model", broken)
    line = check_error(TINY + ["--backend", "model"], capsys, 1, "ianus run: error: KeyError: (0, 0, 0)", "--debug")
    assert line.endswith("(--debug shows the traceback)")
    with pytest.raises(KeyError):
        cli.main(TINY + ["--backend", "model", "--debug"])
    with pytest.raises(KeyError):
        cli.main(["--debug"] + TINY + ["--backend", "model"])


def test_help_shows_defaults(capsys):
    code, out, _ = ianus(["run", "--help"], capsys)
    assert code == 0
    text = " ".join(out.split())
    for opt in ("--config {tiny,default,tiny-dualrb,default-dualrb,tiny-il,default-il,default-4ch,tiny-p4,"
                "default-p4,tiny-hpim,default-hpim,tiny-w4,default-w4} (default: default)",
                "--policy {ianus,npu-mem,naive,hpim} (default: ianus)",
                "--seed SEED (default: 0)", "--baseline-steps BASELINE_STEPS generation steps of the baseline "
                "(gen mode) (default: 1)"):
        assert opt in text, opt
    code, out, _ = ianus(["project", "--help"], capsys)
    assert "--samples SAMPLES generation positions simulated (interpolated between) (default: 12)" in " ".join(
        out.split())


def test_bench_and_synth_options_pass_through(capsys, monkeypatch):
    import hw.synth
    import sim.bench

    seen = {}
    monkeypatch.setattr(sim.bench, "main", lambda argv: seen.setdefault("bench", argv) and 0)
    monkeypatch.setattr(hw.synth, "main", lambda argv: seen.setdefault("synth", argv) and 0)
    assert ianus(["bench", "--quick", "--only", "soc"], capsys)[0] == 0
    assert ianus(["synth", "--no-pnr", "proto_fpga", "--pnr-timeout", "5"], capsys)[0] == 0
    assert seen == {"bench": ["--quick", "--only", "soc"], "synth": ["--no-pnr", "proto_fpga", "--pnr-timeout", "5"]}


def test_config_shows_what_run_uses(capsys):
    code, out, _ = ianus(["config", "--config", "tiny"], capsys)
    s = json.loads(out)
    assert code == 0 and s["pim"]["rows"] == 64 and "16 rows per bank" in s["note"]
    lim = s["run_token_limits"]
    assert lim["1 layer(s) of d_model 32"] == {"ianus/naive": limit_of("tiny", []),
                                               "npu-mem": limit_of("tiny", ["--policy", "npu-mem"])}
    assert lim["3 layer(s) of d_model 32"]["ianus/naive"] == limit_of("tiny", ["--layers", "3"])


def test_config_into_a_closed_pipe():
    """``ianus config | head -1``: no BrokenPipeError, no traceback."""
    p = subprocess.run(f"{sys.executable} -m sim.cli config --config ianus | head -c 1", shell=True,
                       capture_output=True, text=True, cwd=os.path.dirname(os.path.dirname(__file__)),
                       executable="/bin/bash")
    assert p.stdout == "{"
    assert "Traceback" not in p.stderr and "BrokenPipe" not in p.stderr, p.stderr
