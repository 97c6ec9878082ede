# Two entry points for a fresh machine: `make demo` and `make test`.
PY      ?= python3
VENV    := .venv
VPY     := $(VENV)/bin/python
STAMP   := $(VENV)/.installed
# The CPU build of torch lies on this disk; an unpinned torch would pull a multi-GB CUDA build.
TORCH   ?= torch==2.13.0
DEMO_OUT ?= out/demo

.PHONY: venv demo test test-fast bench-accuracy clean

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

bench-accuracy: $(STAMP)
	$(VPY) bench/accuracy.py --out bench/results/

clean:
	rm -rf $(VENV) out
