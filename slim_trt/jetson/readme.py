"""README.md of a Jetson bundle: what to install on the board, the commands, and the checks made here."""
from __future__ import annotations

import shlex

from ..trt.memory import GB, MemoryEstimate
from . import scripts


def _gib(n: int) -> str:
    return f"{n / GB:.2f} GiB"


def _jetpack_rows(profile) -> list[str]:
    if not profile.jetpack:
        return [f"| (not listed in the profile) | {profile.tensorrt_min_version} to {profile.tensorrt_max_major}.x | |"]
    return [f"| {j['version']} | {j['tensorrt']} | {j.get('cuda', '')} |" for j in profile.jetpack]


def bundle_readme(*, profile, meta: dict, plan: scripts.ScriptPlan, memory: MemoryEstimate, lint_report,
                  plugin: bool, budget_gb: float) -> str:
    sparse = lint_report.summary["sparse_tensor_cores"]
    r = plan.ranges
    build_cmd = shlex.join(["$TRTEXEC", "--stronglyTyped"] + scripts.trtexec_build_args(plan))
    verdict = "fits" if memory.fits else "DOES NOT FIT"
    budget_source = ("the profile default: its smallest module" if budget_gb == profile.memory_budget_gb
                     else "--memory-gb")
    plugin_text = (
        "This export has `LowRankAdd` nodes (`slim-trt export --lowrank plugin`), so the bundle carries the plugin "
        f"sources (`{scripts.PLUGIN_SOURCE}/`) and `build.sh` compiles them first with CMake (>= 3.24) and the "
        f"board's CUDA toolkit for compute capability {', '.join(profile.compute_capabilities)} "
        f"(`-DCMAKE_CUDA_ARCHITECTURES={plan.cuda_architectures}`), then loads `{scripts.PLUGIN_LIBRARY}` into "
        "trtexec (`--staticPlugins`) or `slim-trt build` (`--plugins`)."
        if plugin else
        "This export computes the low-rank adapters with plain MatMuls (`--lowrank decomposed`), so no plugin is "
        "needed and none is included: nothing to compile on the board, no CUDA toolkit or CMake required.")
    lines = [
        f"# slim-trt Jetson bundle: {meta.get('architecture')} for {profile.name}",
        "",
        f"Written by `slim-trt deploy jetson` for **{profile.description}** (compute capability "
        f"{', '.join(profile.compute_capabilities)}). Copy this whole folder to the board, then build and time the "
        "engine there: a TensorRT engine only runs on the GPU and TensorRT version that built it.",
        "",
        "```bash",
        "rsync -a BUNDLE/ user@jetson:~/bundle/      # or scp -r",
        "cd ~/bundle",
        "./build.sh            # checks SHA256SUMS, builds engines/model.plan with the board's trtexec",
        "./run.sh              # prefill and decode timing runs with trtexec",
        "./build.sh --dry-run  # prints the exact commands without running them (so does ./run.sh --dry-run)",
        "```",
        "",
        "`--tool slim-trt` runs `slim-trt build` / `slim-trt bench` instead (`pip install slim-trt[trt]` on the "
        "board, with JetPack's TensorRT Python bindings); `slim-trt build` also writes `engines/model.build.json`, "
        "which sets TensorRT's sparse-kernel choices beside lint's prediction below.",
        "",
        "## Board software",
        "",
        f"TensorRT {profile.tensorrt_min_version} to {profile.tensorrt_max_major}.x. `build.sh` reads the installed "
        "version (`dpkg-query -W libnvinfer-bin`, else the Python bindings) and refuses others; with TensorRT 10 "
        "it passes `--stronglyTyped` (precision comes from the graph's Q/DQ nodes), TensorRT 11 is always strongly "
        "typed.",
        "",
        "| JetPack | TensorRT | CUDA |",
        "|---|---|---|",
        *_jetpack_rows(profile),
        "",
        f"Profile notes: {profile.notes}" if profile.notes else "",
        "",
        "## Memory budget",
        "",
        f"Shapes: batch {r['batch']}, new tokens {r['sequence']}, cached tokens {r['past_sequence']} "
        "(min, opt, max; the engine's optimization profile).",
        "",
        "| | bytes |",
        "|---|---|",
        f"| weights (model.onnx + external data) | {_gib(memory.weights_bytes)} |",
        f"| KV cache at the max shapes (batch {r['batch'][2]}, {r['sequence'][2]} + {r['past_sequence'][2]} "
        f"tokens) | {_gib(memory.kv_cache_bytes)} |",
        f"| builder workspace | {_gib(memory.workspace_bytes)} |",
        f"| **total** | **{_gib(memory.total_bytes)}** |",
        f"| budget ({budget_gb:g} GiB, {budget_source}) | {_gib(memory.budget_bytes)} |",
        "",
        f"Verdict: **{verdict}**. Jetson memory is shared by the CPU, the GPU and the OS, so keep a margin; "
        "activations and TensorRT's own buffers come on top and show in `trtexec`'s memory report.",
        "",
        "## Sparse tensor cores (lint's prediction)",
        "",
        f"    {sparse['line']}",
        "",
        f"`lint.json` has the full `slim-trt lint` report for this target (TensorRT table {lint_report.target}, "
        f"GPU {lint_report.gpu}): per GEMM whether TensorRT can run it on 2:4 sparse tensor cores and why not. "
        "INT4 weights run through weight-only kernels, never sparse ones; the W8A8 (INT8 2:4) recipe is the one "
        "whose GEMMs are eligible on Orin. TensorRT still picks a sparse kernel only where its timing finds it "
        "faster: after the build, `grep '(Sparsity)' engines/model.build.log` lists the eligible layers and the ones "
        "that run sparse.",
        "",
        "## Plugin",
        "",
        plugin_text,
        "",
        "## Commands (TensorRT 10)",
        "",
        "```bash",
        build_cmd,
        "```",
        "",
        "`slim_bundle.json` records every decision (target, shapes, memory estimate, commands, sha256 of each file).",
        "",
    ]
    return "\n".join(lines)
