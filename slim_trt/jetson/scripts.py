"""build.sh and run.sh of a Jetson bundle: bash that prints every command exactly (shell-quoted) before it runs
it, and only prints with --dry-run.

Everything the bundle decided (paths, shapes, the target, the workspace) is written into the scripts as literal,
quoted arguments; only what the board decides stays a variable: the trtexec and nvcc paths, the TensorRT version
(TensorRT 10 needs --stronglyTyped, 11 is always strongly typed) and the iteration count of run.sh.
"""
from __future__ import annotations

import shlex
from dataclasses import dataclass

ENGINE = "engines/model.plan"
BUILD_LOG = "engines/model.build.log"
LAYER_INFO = "engines/model.layers.json"
TIMING_CACHE = "engines/timing.cache"
ONNX = "model/model.onnx"
PLUGIN_SOURCE = "plugins/lowrank_add"
PLUGIN_BUILD = "plugins/build"
PLUGIN_LIBRARY = f"{PLUGIN_BUILD}/liblowrank_add_plugin.so"
CHECKSUMS = "SHA256SUMS"


@dataclass(frozen=True)
class ScriptPlan:
    """What the scripts need, all decided at bundle time."""

    target: str  # profile name, for messages
    target_file: str  # the profile JSON inside the bundle (for `slim-trt build --target`)
    tensorrt_min: str
    tensorrt_max_major: int
    tensorrt_assumed: str  # the version a dry run assumes when the board's cannot be read
    cuda_architectures: str  # CMAKE_CUDA_ARCHITECTURES, e.g. "87"
    plugin: bool
    shapes: dict  # {input: (min, opt, max) shape tuples}
    ranges: dict  # {"batch": [min, opt, max], "sequence": [...], "past_sequence": [...]}
    workspace_mib: int
    phases: dict  # {"prefill": {"shapes": {input: shape}, "inputs": {input: file}, "batch", "seq", "past"}, ...}


def _q(args: list[str]) -> str:
    return " ".join(shlex.quote(a) for a in args)


def _shape_list(shapes: dict, which: int) -> str:
    return ",".join(f"{name}:{'x'.join(str(d) for d in dims[which])}" for name, dims in shapes.items())


def trtexec_build_args(plan: ScriptPlan) -> list[str]:
    """trtexec's arguments after the executable and the strongly-typed flag."""
    args = [f"--onnx={ONNX}", f"--saveEngine={ENGINE}", "--sparsity=enable",
            f"--minShapes={_shape_list(plan.shapes, 0)}", f"--optShapes={_shape_list(plan.shapes, 1)}",
            f"--maxShapes={_shape_list(plan.shapes, 2)}", f"--memPoolSize=workspace:{plan.workspace_mib}M",
            "--profilingVerbosity=detailed", f"--exportLayerInfo={LAYER_INFO}", f"--timingCacheFile={TIMING_CACHE}"]
    if plan.plugin:
        args.append(f"--staticPlugins={PLUGIN_LIBRARY}")
    return args + ["--verbose"]


def slim_trt_build_args(plan: ScriptPlan) -> list[str]:
    r = plan.ranges
    args = ["slim-trt", "build", ONNX, "-o", ENGINE, "--target", plan.target_file,
            "--batch", ",".join(map(str, r["batch"])), "--seq", ",".join(map(str, r["sequence"])),
            "--past", ",".join(map(str, r["past_sequence"])), "--workspace-gb", f"{plan.workspace_mib / 1024:g}",
            "--timing-cache", TIMING_CACHE]
    if plan.plugin:
        args += ["--plugins", PLUGIN_LIBRARY]
    return args


def plugin_build_args(plan: ScriptPlan) -> tuple[list[str], list[str]]:
    """(configure args after `cmake`, build args after `cmake`); the nvcc path is appended by the script."""
    return (["-S", PLUGIN_SOURCE, "-B", PLUGIN_BUILD, "-DCMAKE_BUILD_TYPE=Release",
             f"-DCMAKE_CUDA_ARCHITECTURES={plan.cuda_architectures}"], ["--build", PLUGIN_BUILD, "-j"])


def trtexec_run_args(plan: ScriptPlan, phase: str) -> list[str]:
    p = plan.phases[phase]
    args = [f"--loadEngine={ENGINE}", "--shapes=" + ",".join(f"{n}:{'x'.join(map(str, s))}"
                                                               for n, s in p["shapes"].items()),
            "--loadInputs=" + ",".join(f"{n}:{f}" for n, f in p["inputs"].items())]
    if plan.plugin:
        args.append(f"--staticPlugins={PLUGIN_LIBRARY}")
    return args


def slim_trt_bench_args(plan: ScriptPlan) -> list[str]:
    prefill = plan.phases["prefill"]
    args = ["slim-trt", "bench", ENGINE, "--batch", str(prefill["batch"]), "--prompt-len", str(prefill["seq"])]
    if "decode" in plan.phases:
        args += ["--context-len", str(plan.phases["decode"]["past"])]
    if plan.plugin:
        args += ["--plugins", PLUGIN_LIBRARY]
    return args


_COMMON = r'''set -euo pipefail
cd "$(dirname "$0")"

DRY_RUN=0
TOOL=trtexec

die() { echo "$(basename "$0"): $*" >&2; exit 2; }

# Words as a shell reads them back: plain when safe, else in single quotes (the rule of Python's shlex.quote).
quote() {
  local word words=()
  for word in "$@"; do
    if [[ $word =~ ^[A-Za-z0-9_@%+=:,./-]+$ ]]; then words+=("$word")
    else words+=("'${word//\'/\'\"\'\"\'}'")
    fi
  done
  echo "${words[*]}"
}

# Print a command exactly, then run it unless --dry-run.
run() {
  quote "$@"
  if [ "$DRY_RUN" = 0 ]; then "$@"; fi
}

# The same, with the command's output also written to a log file.
run_logged() {
  local log=$1
  shift
  echo "$(quote "$@") 2>&1 | tee $(quote "$log")"
  if [ "$DRY_RUN" = 0 ]; then "$@" 2>&1 | tee "$log"; fi
}

find_trtexec() {
  if [ -n "${TRTEXEC:-}" ]; then echo "$TRTEXEC"
  elif command -v trtexec >/dev/null 2>&1; then command -v trtexec
  else echo /usr/src/tensorrt/bin/trtexec  # where JetPack installs it
  fi
}
'''

_TENSORRT = r'''
# The board's TensorRT: $TENSORRT_VERSION, else JetPack's libnvinfer-bin package, else the Python bindings.
tensorrt_version() {
  local v=${TENSORRT_VERSION:-}
  if [ -z "$v" ]; then v=$(dpkg-query -W -f='${Version}' libnvinfer-bin 2>/dev/null || true); fi
  if [ -z "$v" ]; then v=$(python3 -c 'import tensorrt; print(tensorrt.__version__)' 2>/dev/null || true); fi
  echo "${v%%[-+]*}"
}

version_at_least() { [ "$(printf '%s\n%s\n' "$2" "$1" | sort -V | head -n 1)" = "$2" ]; }

TRT_VERSION=$(tensorrt_version)
if [ -z "$TRT_VERSION" ]; then
  if [ "$DRY_RUN" = 0 ]; then
    die "cannot find TensorRT (no libnvinfer-bin package, no python3 tensorrt): install JetPack's" \
      "TensorRT (sudo apt install nvidia-jetpack) or set TENSORRT_VERSION"
  fi
  TRT_VERSION=@TRT_ASSUMED@
  echo "# dry run: TensorRT not found here, assuming $TRT_VERSION" >&2
fi
TRT_MAJOR=${TRT_VERSION%%.*}
if ! version_at_least "$TRT_VERSION" @TRT_MIN@ || [ "$TRT_MAJOR" -gt @TRT_MAX_MAJOR@ ]; then
  die "TensorRT $TRT_VERSION cannot build this bundle: @TARGET@ needs TensorRT @TRT_MIN@ to" \
    "@TRT_MAX_MAJOR@.x (see README.md for the JetPack releases)"
fi
STRONGLY_TYPED=()
if [ "$TRT_MAJOR" = 10 ]; then STRONGLY_TYPED=(--stronglyTyped); fi  # TensorRT 11 is always strongly typed
'''


def _options(defaults: str, cases: str, help_lines: int) -> str:
    """The option loop both scripts share (--tool, --dry-run, --help), with each script's own `cases`."""
    return f'''
{defaults}
while [ $# -gt 0 ]; do
  case "$1" in
    --tool) [ $# -ge 2 ] || die "--tool needs trtexec or slim-trt"; TOOL=$2; shift ;;
    --tool=*) TOOL=${{1#--tool=}} ;;
{cases}
    --dry-run) DRY_RUN=1 ;;
    -h|--help) sed -n '2,{help_lines}s/^# \\{{0,1\\}}//p' "$0"; exit 0 ;;
    *) die "unknown option $1 (see --help)" ;;
  esac
  shift
done
case "$TOOL" in trtexec|slim-trt) ;; *) die "--tool must be trtexec or slim-trt, not $TOOL" ;; esac
'''


def _fill(template: str, values: dict) -> str:
    for key, value in values.items():
        template = template.replace(f"@{key}@", value)
    return template


def build_script(plan: ScriptPlan) -> str:
    configure, compile_ = plugin_build_args(plan)
    plugin_steps = ""
    if plan.plugin:
        plugin_steps = f'''
# The LowRankAdd plugin, for the GPU of this board ({plan.target}).
NVCC=${{NVCC:-$(command -v nvcc || echo /usr/local/cuda/bin/nvcc)}}
run cmake {_q(configure)} "-DCMAKE_CUDA_COMPILER=$NVCC"
run cmake {_q(compile_)}
'''
    head = f'''#!/usr/bin/env bash
# Build the TensorRT engine of this bundle on the {plan.target} (written by `slim-trt deploy jetson`).
#
#   ./build.sh [--tool trtexec|slim-trt] [--force] [--dry-run]
#
# --tool     trtexec (JetPack's, the default) or slim-trt (`pip install slim-trt[trt]` on the board)
# --force    rebuild when {ENGINE} exists
# --dry-run  print the exact commands without running them
# Environment: TRTEXEC, NVCC (paths), TENSORRT_VERSION (default: read from the installed packages).
'''
    parse = _options("FORCE=0", "    --force) FORCE=1 ;;", 10)
    body = f'''
if [ -e {ENGINE} ] && [ "$FORCE" = 0 ] && [ "$DRY_RUN" = 0 ]; then
  die "{ENGINE} exists: pass --force to rebuild it"
fi
echo "# {plan.target}: TensorRT $TRT_VERSION, building with $TOOL" >&2

# The copy on the board is the bundle that was written (sizes and sha256 of every file).
run sha256sum --quiet --strict -c {CHECKSUMS}
run mkdir -p engines
{plugin_steps}
if [ "$TOOL" = trtexec ]; then
  TRTEXEC=$(find_trtexec)
  run_logged {BUILD_LOG} "$TRTEXEC" "${{STRONGLY_TYPED[@]}}" {_q(trtexec_build_args(plan))}
  echo "# the (Sparsity) lines of {BUILD_LOG} say which layers were eligible and which run sparse kernels;" >&2
  echo "# lint.json holds slim-trt lint's prediction for the same layers" >&2
else
  FORCE_ARG=()
  if [ "$FORCE" = 1 ]; then FORCE_ARG=(--force); fi
  run {_q(slim_trt_build_args(plan))} "${{FORCE_ARG[@]}}"
fi
'''
    values = {"TRT_ASSUMED": shlex.quote(plan.tensorrt_assumed), "TRT_MIN": shlex.quote(plan.tensorrt_min),
              "TRT_MAX_MAJOR": str(plan.tensorrt_max_major), "TARGET": plan.target}
    return head + _COMMON + parse + _fill(_TENSORRT, values) + body


def run_script(plan: ScriptPlan) -> str:
    phases = list(plan.phases)
    described = "; ".join(f"{p}: batch {plan.phases[p]['batch']}, {plan.phases[p]['seq']} new tokens after "
                          f"{plan.phases[p]['past']} cached" for p in phases)
    head = f'''#!/usr/bin/env bash
# Time the engine built by ./build.sh on the {plan.target} (written by `slim-trt deploy jetson`).
#
#   ./run.sh [--tool trtexec|slim-trt] [--iterations N] [--dry-run]
#
# Phases at the engine's opt shapes ({described}).
# trtexec reads the token ids, attention mask and positions from inputs/ (the KV cache is random: timing only);
# `slim-trt bench` makes its own. --dry-run prints the exact commands without running them.
'''
    parse = _options("ITERATIONS=20", "    --iterations) [ $# -ge 2 ] || die \"--iterations needs a number\"; "
                     "ITERATIONS=$2; shift ;;\n    --iterations=*) ITERATIONS=${1#--iterations=} ;;", 9) + (
        "case \"$ITERATIONS\" in ''|*[!0-9]*|0) die \"--iterations must be a positive integer, not "
        "$ITERATIONS\" ;; esac\n")
    trtexec_lines = "\n".join(f'  run "$TRTEXEC" {_q(trtexec_run_args(plan, p))} "--iterations=$ITERATIONS"'
                              for p in phases)
    body = f'''
if [ ! -e {ENGINE} ] && [ "$DRY_RUN" = 0 ]; then
  die "{ENGINE} is missing: run ./build.sh first"
fi
if [ "$TOOL" = trtexec ]; then
  TRTEXEC=$(find_trtexec)
{trtexec_lines}
else
  run {_q(slim_trt_bench_args(plan))} --iterations "$ITERATIONS"
fi
'''
    return head + _COMMON + parse + body
