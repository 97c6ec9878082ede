# Two entry points for a fresh machine: `make demo` and `make test`.
PY      ?= python3
VENV    := .venv
VPY     := $(VENV)/bin/python
STAMP   := $(VENV)/.installed
# The CPU build of torch lies on this disk; an unpinned torch would pull a multi-GB CUDA build.
TORCH   ?= torch==2.13.0
DEMO_OUT ?= out/demo

.PHONY: venv demo test bench-accuracy bench-peers bench-speed bench-speed-default bench-cost bench-peers-speed bench-scaling clean

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

# The speed benchmark's peers, each in its own venv (never .venv): onnxruntime-genai (its model builder and
# generator), and llama.cpp through llama-cpp-python built here from its sdist (cmake, CPU backend, AVX-512 and
# VNNI but no AMX: ggml's AMX kernels die with SIGILL on `tilezero` where the kernel does not hand out AMX state,
# as in this VM. GGML_NATIVE=OFF because -march=native turns AMX back on whatever CFLAGS say (the build of session
# 5 had 622 AMX instructions and died with SIGILL). --no-cache-dir: pip otherwise re-installs the wheel it built
# from the same sdist before, whatever CMAKE_ARGS now say. The multimodal library is left out. About 30-60 minutes
# on 2 busy cores.
LLAMA_CMAKE := -DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_AVX512=ON \
	-DGGML_AVX512_VBMI=ON -DGGML_AVX512_VNNI=ON -DGGML_AVX512_BF16=ON -DGGML_AVX_VNNI=ON \
	-DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF -DLLAVA_BUILD=OFF
bench-peers-speed:
	$(PY) -m venv bench/.venv-ortgenai && bench/.venv-ortgenai/bin/pip install -q -r bench/peers/requirements-ortgenai.txt
	$(PY) -m venv bench/.venv-llamacpp && CMAKE_ARGS="$(LLAMA_CMAKE)" CMAKE_BUILD_PARALLEL_LEVEL=$$(nproc) \
		bench/.venv-llamacpp/bin/pip install -q --no-cache-dir --no-binary llama-cpp-python \
		-r bench/peers/requirements-llamacpp.txt
	@! objdump -d bench/.venv-llamacpp/lib/python3*/site-packages/llama_cpp/lib/libggml-cpu.so | grep -q tilezero \
		|| { echo "llama.cpp was built with AMX instructions: it dies with SIGILL here" >&2; exit 1; }

# Speed of the dense and compressed exports beside the peers. The checkpoint is dense INT4 (`--preset int4-dense`,
# the defaults of issues 14-22, which the stored rows measured; 32 calibration windows x 512 tokens); rows already
# in the JSON are skipped. Run it on a quiet machine: the figures are medians
# of interleaved repeats, but other jobs on the same cores still slow every row.
SPEED_CKPT ?= out/gemma-ckpt
$(SPEED_CKPT)/slim_manifest.json: | $(STAMP)
	$(VENV)/bin/slim-trt compress gemma3-270m -o $(SPEED_CKPT) --preset int4-dense --nsamples 32 --seqlen 512

bench-speed: $(STAMP) $(SPEED_CKPT)/slim_manifest.json
	$(VPY) bench/speed.py --checkpoint $(SPEED_CKPT) --out bench/results/

# The same on a checkpoint of the defaults (W8A8 2:4 + LRC, the demo's settings), into speed_gemma3-270m_trt-int8-sparse.*:
# the dense exports, the W8A8 export in fp32 (float head, int8 head, the export defaults) and `slim-trt export`
# with no option (the fp16 file TensorRT builds). The peers' rows are the dense INT4 run's.
DEFAULT_CKPT ?= out/gemma-default
$(DEFAULT_CKPT)/slim_manifest.json: | $(STAMP)
	$(VENV)/bin/slim-trt compress gemma3-270m -o $(DEFAULT_CKPT) --nsamples 32 --seqlen 512

bench-speed-default: $(STAMP) $(DEFAULT_CKPT)/slim_manifest.json
	$(VPY) bench/speed.py --checkpoint $(DEFAULT_CKPT) --tag trt-int8-sparse --rows 1,2,4,6,11,12 --out bench/results/

# What the main job costs: `slim-trt demo` (the defaults) beside SparseGPT 2:4 + GPTQ alone, on an idle machine.
bench-cost: $(STAMP)
	$(VPY) bench/cost.py --out bench/results/

# Compression cost vs hidden size (issue 15): one synthetic LLaMA-style block per size, 2 threads, niced, one row
# at a time; rows already in the JSON are skipped. Hidden 4096 (rows 10-12) is left out: on 2 shared cores its
# 2:4 row would take hours by the fit; the projection for LLaMA-2-7B uses the fitted exponent instead.
bench-scaling: $(STAMP)
	OMP_NUM_THREADS=2 nice -n 10 $(VPY) bench/scaling.py --rows 1,2,3,4,5,6,7,8,9 --out bench/results/

clean:
	rm -rf $(VENV) out
