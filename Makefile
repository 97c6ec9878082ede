# Two entry points for a fresh machine: `make demo` and `make test`.
PY      ?= python3
VENV    := .venv
VPY     := $(VENV)/bin/python
STAMP   := $(VENV)/.installed
# The CPU build of torch lies on this disk; an unpinned torch would pull a multi-GB CUDA build.
TORCH   ?= torch==2.13.0
DEMO_OUT ?= out/demo

.PHONY: venv demo test bench-accuracy bench-peers clean

$(STAMP): pyproject.toml
	$(PY) -m venv $(VENV)
	$(VPY) -m pip install -q --upgrade pip
	$(VPY) -m pip install -q "$(TORCH)"
	$(VPY) -m pip install -q -e ".[dev]"
	touch $(STAMP)

venv: $(STAMP)

# The main job on the embedded default (Gemma 3 270M): compress -> export -> verify.
demo: $(STAMP)
	$(VENV)/bin/slim-trt demo --out $(DEMO_OUT)

test: $(STAMP)
	$(VPY) -m pytest -q tests

# The committed run used 32 calibration windows (see bench/README.md); rows already in the JSON are skipped.
bench-accuracy: $(STAMP)
	$(VPY) bench/accuracy.py --nsamples 32 --windows 32 --out bench/results/

# The peer libraries pin their own transformers, so each gets its own venv (never .venv).
bench-peers:
	$(PY) -m venv bench/.venv-modelopt && bench/.venv-modelopt/bin/pip install -q -r bench/peers/requirements-modelopt.txt
	$(PY) -m venv bench/.venv-llmcompressor && bench/.venv-llmcompressor/bin/pip install -q -r bench/peers/requirements-llmcompressor.txt

clean:
	rm -rf $(VENV) out
