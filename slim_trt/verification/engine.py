"""TensorRT against ONNX Runtime: `verify_engine` runs an engine on the inputs ONNX Runtime saw (prefill, then
decode steps through the KV cache) and compares the logits with verify's metrics and limits. Needs TensorRT and a
GPU (slim_trt.trt loads the engine); the metrics and checks themselves are pure.

The inputs are either built here (slim_trt.verification.compare.run_onnx) or saved on a CPU machine with `slim-trt
verify --save-inputs/--save-outputs` (Polygraphy JSON); Polygraphy's Comparator runs them through TensorRT.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from ..errors import SlimError
from ..trt.backend import import_tensorrt, require_gpu
from ..trt.runtime import _load_engine, engine_plugins
from ..runtime.export_folder import read_sidecar
from .compare import Thresholds, compare_logits, run_onnx


def _concat_logits(outputs: list[dict]) -> np.ndarray:
    return np.concatenate([np.asarray(o["logits"], dtype=np.float32) for o in outputs], axis=1)



def _concat_ids(feeds: list[dict]) -> np.ndarray:
    return np.concatenate([np.asarray(f["input_ids"], dtype=np.int64) for f in feeds], axis=1)



def engine_metrics(test_outputs: list[dict], ref_outputs: list[dict], feeds: list[dict]) -> dict:
    """The ONNX Runtime check's metrics, TensorRT (test) against ONNX Runtime (reference)."""
    import torch

    test, ref = _concat_logits(test_outputs), _concat_logits(ref_outputs)
    if test.shape != ref.shape:
        raise SlimError(f"TensorRT logits {test.shape} and reference logits {ref.shape} differ in shape")
    m = compare_logits(torch.from_numpy(test), torch.from_numpy(ref), torch.from_numpy(_concat_ids(feeds)))
    m["ppl_engine"], m["ppl_onnx"] = m.pop("ppl_onnx"), m.pop("ppl_torch")
    return m



def engine_checks(metrics: dict, thresholds) -> dict:
    return {"max_abs": metrics["max_abs"] <= thresholds.max_abs, "mean_abs": metrics["mean_abs"] <= thresholds.mean_abs,
            "cosine_min": metrics["cosine_min"] >= thresholds.cosine_min, "top1": metrics["top1"] >= thresholds.top1_min,
            "ppl_rel": metrics["ppl_rel"] <= thresholds.ppl_rel_max}



def verify_engine(onnx_path: str | Path, engine_path: str | Path, *, plugins=(), input_ids=None,
                  decode_steps: int = 4, load_inputs: str | Path | None = None,
                  load_outputs: str | Path | None = None, thresholds: dict | None = None,
                  max_abs: float | None = None, cosine_min: float | None = None, top1_min: float | None = None,
                  providers: list[str] | None = None, windows: int = 1, seqlen: int = 32, seed: int = 0) -> dict:
    """Compare a TensorRT engine with ONNX Runtime on the same inputs; returns the report as a dict.

    input_ids: token windows [n, L] (torch or numpy); default: `windows` random windows of `seqlen` tokens.
    load_inputs / load_outputs: Polygraphy JSON saved by `slim-trt verify --save-inputs/--save-outputs` on a
    CPU machine; with both, ONNX Runtime is not run here. Thresholds default to the ONNX Runtime check's
    for the export dtype; `thresholds` overrides by field name (max_abs, mean_abs, cosine_min, top1_min,
    ppl_rel_max).
    """
    from polygraphy.backend.onnxrt import OnnxrtRunner
    from polygraphy.backend.trt import TrtRunner
    from polygraphy.comparator import CompareFunc, Comparator, IterationResult, RunResults
    from polygraphy.json import load_json

    onnx = Path(onnx_path)
    engine_file = Path(engine_path)
    if not onnx.is_file():
        raise SlimError(f"{onnx} does not exist: give the model.onnx the engine was built from")
    if load_outputs and not load_inputs:
        raise SlimError("--load-outputs needs the matching --load-inputs")
    for p in (load_inputs, load_outputs):
        if p and not Path(p).is_file():
            raise SlimError(f"{p} does not exist")
    trt = import_tensorrt()
    gpu = require_gpu()
    meta = read_sidecar(onnx) or {}
    th = Thresholds.for_dtype(meta.get("dtype", "fp16"))
    overrides = dict(thresholds or {})
    overrides.update({k: v for k, v in (("max_abs", max_abs), ("cosine_min", cosine_min), ("top1_min", top1_min))
                      if v is not None})
    th = th.replace(**overrides)

    reference = "onnxruntime"
    if load_inputs:
        feeds = [dict(f) for f in load_json(str(load_inputs))]
        if load_outputs:
            saved = RunResults.load(str(load_outputs))
            runner_name, iterations = saved[0]
            ref_outputs = [dict(it) for it in iterations]
            reference = f"saved outputs of {runner_name} ({load_outputs})"
        else:
            from ..runtime.export_session import session

            with OnnxrtRunner(session(onnx, providers)) as ort_runner:
                ref_outputs = [dict(ort_runner.infer(f)) for f in feeds]
    else:
        import torch

        from ..runtime.export_session import session

        if input_ids is None:
            vocab = int(meta.get("vocab_size") or 256)
            g = torch.Generator().manual_seed(seed)
            input_ids = torch.randint(0, vocab, (windows, seqlen), generator=g)
        ids = torch.as_tensor(np.asarray(input_ids), dtype=torch.int64)
        _, feeds, ref_outputs = run_onnx(session(onnx, providers), ids, decode_steps)
    if len(ref_outputs) != len(feeds):
        raise SlimError(f"{len(feeds)} saved inputs but {len(ref_outputs)} saved outputs: save both from one run")

    libs, required = engine_plugins(engine_file, plugins, meta)
    engine = _load_engine(trt, engine_file, libs, required)
    results = Comparator.run([TrtRunner(engine, name="tensorrt")], data_loader=feeds)
    test_outputs = [dict(it) for it in results[0][1]]

    combined = RunResults()
    combined.append(("onnxruntime", [IterationResult(outputs=o, runner_name="onnxruntime") for o in ref_outputs]))
    combined.append(results[0])
    accuracy = Comparator.compare_accuracy(
        combined, compare_func=CompareFunc.simple(atol={"logits": th.max_abs, "": th.max_abs}, rtol=0.0))

    metrics = engine_metrics(test_outputs, ref_outputs, feeds)
    checks = engine_checks(metrics, th)
    return {"engine": str(engine_file), "onnx": str(onnx), "backend": "tensorrt", "tensorrt_version": trt.__version__,
            "gpu": gpu.to_dict(), "reference": reference, "iterations": len(feeds), "metrics": metrics,
            "thresholds": {k: getattr(th, k) for k in ("max_abs", "mean_abs", "cosine_min", "top1_min", "ppl_rel_max")},
            "checks": checks, "passed": all(checks.values()), "polygraphy_all_outputs_within_atol": bool(accuracy),
            "plugins": [str(p) for p in libs]}
