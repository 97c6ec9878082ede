"""ONNX Runtime vs PyTorch: the exported graph against the model it was exported from.

Both run the same real text windows. PyTorch runs each window in one pass (its logits at position t depend only
on tokens <= t); ONNX Runtime runs a prefill of the first `len - decode_steps` tokens and then `decode_steps`
single-token steps through the KV cache (`present.*` fed back as `past_key_values.*`), so the cache path is
checked too. Reported: max/mean |logit error|, cosine similarity (mean and worst position), top-1 agreement and
the perplexity of both on the window's next tokens.

ONNX Runtime runs through Polygraphy's OnnxrtRunner; with save_inputs/save_outputs the feeds and ORT outputs are
written in Polygraphy's JSON format, so a GPU machine can replay them against TensorRT:
    polygraphy run model.onnx --trt --load-inputs inputs.json --load-outputs outputs.json
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from ..errors import MissingDependencyError, SlimError
from ..runtime.export_folder import SIDECAR, read_sidecar
from .compare import Thresholds, compare_logits, int8_activations, perplexity_of, reference_logits, run_onnx



@dataclass
class VerifyReport:
    metrics: dict
    thresholds: Thresholds
    settings: dict = field(default_factory=dict)
    engine: dict | None = None
    plain: dict | None = None  # the same metrics with ONNX Runtime's Q/DQ fusion off (informational)
    w8a8: dict | None = None  # W8A8 exports: structure, float-activation comparison, sensitivity floor (verify_w8a8)

    @property
    def checks(self) -> dict[str, bool]:
        m, t = self.metrics, self.thresholds
        return {"max_abs": m["max_abs"] <= t.max_abs, "mean_abs": m["mean_abs"] <= t.mean_abs,
                "cosine_min": m["cosine_min"] >= t.cosine_min, "top1": m["top1"] >= t.top1_min,
                "ppl_rel": m["ppl_rel"] <= t.ppl_rel_max}

    @property
    def ok(self) -> bool:
        engine_ok = self.engine is None or bool(self.engine.get("ok", False))
        w8a8_ok = self.w8a8 is None or bool(self.w8a8.get("ok", False))
        return all(self.checks.values()) and engine_ok and w8a8_ok

    def to_dict(self) -> dict:
        return {"ok": self.ok, "metrics": self.metrics, "thresholds": dataclasses.asdict(self.thresholds),
                "checks": self.checks, "settings": self.settings, "engine": self.engine, "plain": self.plain,
                "w8a8": self.w8a8}


def _save_polygraphy(feeds: list[dict], outputs: list[dict], save_inputs, save_outputs, runner_name: str):
    from polygraphy.comparator import IterationResult, RunResults
    from polygraphy.json import save_json

    if save_inputs:
        save_json(feeds, str(save_inputs), description="slim-trt verify inputs")
    if save_outputs:
        results = RunResults()
        results.append((runner_name, [IterationResult(outputs=o, runner_name=runner_name) for o in outputs]))
        results.save(str(save_outputs))


# ---------------------------------------------------------------------------------------------------------
# public API
# ---------------------------------------------------------------------------------------------------------



def _graph_dtype(path: Path) -> str:
    """fp16, bf16 or fp32: the element type of the graph's logits output (the first output)."""
    import onnx

    outputs = onnx.load(str(path), load_external_data=False).graph.output
    logits = next((o for o in outputs if o.name == "logits"), outputs[0] if outputs else None)
    elem = logits.type.tensor_type.elem_type if logits is not None else onnx.TensorProto.FLOAT
    return {onnx.TensorProto.FLOAT16: "fp16", onnx.TensorProto.BFLOAT16: "bf16"}.get(elem, "fp32")


def _check_onnx_path(onnx_path: str | Path, export_gate: bool = False) -> Path:
    """export_gate: the user's export gets the gate generate and deploy use (verify's entry); verify_model also
    runs on verify's own stripped copies in a temporary folder, which hold no tokenizer."""
    from ..runtime.export_folder import check_onnx_file, load_onnx_graph

    path = Path(onnx_path)
    if export_gate:
        check_onnx_file(path)  # the export gate (as generate and deploy): it parses the file once
        return path
    if not path.is_file():
        raise SlimError(f"{path} does not exist: give the model.onnx written by `slim-trt export`")
    load_onnx_graph(path)  # parses, with a graph: one line otherwise
    return path


def _run_windows(sess, windows: torch.Tensor, decode_steps: int, batch_size: int, keep: bool = True):
    """Logits of every window; and every feed and output dict when `keep` (only to save them: they are large)."""
    logits, feeds, outputs = [], [], []
    for i in range(0, windows.shape[0], batch_size):
        lg, f, o = run_onnx(sess, windows[i:i + batch_size], decode_steps)
        logits.append(lg)
        if keep:
            feeds += f
            outputs += o
    return torch.cat(logits), feeds, outputs


def _open(path: Path, providers, **kw):
    from ..runtime.export_session import session

    try:
        return session(path, providers, **kw)
    except SlimError:
        raise
    except Exception as e:  # onnxruntime raises its own Fail/InvalidGraph types on broken files
        raise SlimError(f"ONNX Runtime cannot load {path}: {str(e).splitlines()[0][:300]}") from e


@torch.no_grad()
def verify_model(onnx_path: str | Path, model: nn.Module, windows: torch.Tensor, *, decode_steps: int = 4,
                 thresholds: Thresholds | None = None, providers: list[str] | None = None,
                 save_inputs: str | Path | None = None, save_outputs: str | Path | None = None,
                 batch_size: int = 4, plain: bool = False, ref: torch.Tensor | None = None,
                 w8a8_form: str | None = None) -> VerifyReport:
    """Compare the ONNX model (ONNX Runtime, with the session config its export declares) with `model` (PyTorch)
    on token windows [n, L]. plain: also run the graph's plain arithmetic (Q/DQ fusion off) and report it.
    ref: `model`'s logits when the caller already has them (reference_logits). w8a8_form: force the integer GEMM
    form of W8A8 linears (runtime.cpu_choice; default: from this CPU)."""
    import tempfile

    from ..runtime.export_session import export_spec
    from ..runtime.decoder import cpu_choice, kernel_counts

    path = _check_onnx_path(onnx_path)
    meta = read_sidecar(path) or {}
    dtype = meta.get("dtype", "fp32")
    if dtype == "bf16":
        raise SlimError("a bf16 export cannot run in ONNX Runtime on the CPU: verify an fp32 or fp16 export of the "
                        "same checkpoint, or the TensorRT engine with --engine on a GPU")
    spec = export_spec(path)
    with tempfile.TemporaryDirectory(prefix="slim_trt_verify_") as tmp:
        sess = _open(path, providers, optimized_model_path=Path(tmp) / "optimized.onnx", w8a8_form=w8a8_form)
        kernels = kernel_counts(Path(tmp) / "optimized.onnx")
    t0 = time.perf_counter()
    onnx_logits, feeds, outputs = _run_windows(sess, windows, decode_steps, batch_size,
                                               keep=bool(save_inputs or save_outputs))
    t_onnx = time.perf_counter() - t0
    t0 = time.perf_counter()
    ref = reference_logits(model, windows, batch_size) if ref is None else ref
    t_torch = time.perf_counter() - t0
    with_cache = any(x.name.startswith("past_key_values.") for x in sess.get_inputs())
    metrics = compare_logits(onnx_logits, ref, windows)
    _save_polygraphy(feeds, outputs, save_inputs, save_outputs, runner_name="onnxrt-runner-slim-trt")
    settings = {"onnx": str(path), "dtype": dtype, "providers": sess.get_providers(), "windows": int(windows.shape[0]),
                "seqlen": int(windows.shape[1]), "decode_steps": decode_steps if with_cache else 0,
                "with_cache": with_cache, "onnx_seconds": round(t_onnx, 3), "torch_seconds": round(t_torch, 3),
                "session_config": dict(spec.session_config) if spec is not None else {}, "kernels": kernels,
                "int8_activations": int8_activations(meta), "cpu": cpu_choice(w8a8_form).to_dict()}
    report = VerifyReport(metrics=metrics, thresholds=thresholds or Thresholds.for_export(dtype, meta),
                          settings=settings)
    if plain:
        plain_logits, _, _ = _run_windows(_open(path, providers, fuse=False), windows, decode_steps, batch_size,
                                          keep=False)
        report.plain = compare_logits(plain_logits, ref, windows)
        report.plain["max_abs_vs_fused"] = float((plain_logits - onnx_logits).abs().max())
    return report


def verify(onnx_path: str | Path, reference: str | Path, *, text: str | None = None, windows: int = 2,
           seqlen: int = 64, decode_steps: int = 4, thresholds: dict | None = None,
           providers: list[str] | None = None, save_inputs: str | Path | None = None,
           save_outputs: str | Path | None = None, engine: str | Path | None = None,
           plugins: list[str] | None = None, ignore_manifest: bool = False, plain: bool = False,
           w8a8_form: str | None = None) -> VerifyReport:
    """Verify an export against the model it came from (`reference`: the `slim-trt compress` folder, or for a dense
    export the MODEL it was exported from), with the export's `--head` quantization applied to the reference.

    text: a text file (default: the shipped WikiText-2 test excerpt); thresholds: overrides by field name.
    engine: also compare a TensorRT engine (needs TensorRT + GPU) through slim_trt.verification.engine.verify_engine.
    plain: also report the graph's plain arithmetic (ONNX Runtime's Q/DQ fusion off).
    w8a8_form: force the integer GEMM form of W8A8 linears (u8u8 | u8s8; default: from this CPU, runtime.cpu_choice).
    """
    from ..data.windows import SHIPPED_EVAL, eval_windows, load_text

    path = _check_onnx_path(onnx_path, export_gate=True)
    if decode_steps < 0 or windows < 1 or seqlen < 2:
        raise SlimError("--windows must be >= 1, --seqlen >= 2 and --decode-steps >= 0")
    meta = read_sidecar(path) or {}
    model, tok, actual = _reference_model(path, reference, meta, ignore_manifest)
    ids = eval_windows(tok, load_text(text, default=SHIPPED_EVAL), seqlen, limit=windows)
    from ..models.source import check_seqlen

    check_seqlen(model.config, seqlen + decode_steps, "--seqlen + --decode-steps")
    head = (meta.get("head") or {}).get("quantization", "none")
    ppl_unquantized_head = None
    if head != "none":
        from ..exporter.head import apply_head_quantization

        with torch.no_grad():
            ppl_unquantized_head = perplexity_of(model(input_ids=ids, use_cache=False).logits.float(), ids)
        apply_head_quantization(model, head)
    # Without its sidecar the export's precision is read from the graph (its logits' type): an fp16 export is
    # held to the fp16 limits, not failed against the fp32 ones.
    dtype = meta.get("dtype") or _graph_dtype(path)
    th = Thresholds.for_export(dtype, meta).replace(**(thresholds or {}))
    w8a8 = ref = None
    from .w8a8 import act_scales

    scales = act_scales(model)
    if scales:  # static INT8 activations: token-level limits come from the reference's own sensitivity
        ref = reference_logits(model, ids)
        w8a8, th = _w8a8_checks(path, model, ids, ref, scales, dtype, th, thresholds, decode_steps, providers)
    report = verify_model(path, model, ids, decode_steps=decode_steps, thresholds=th, providers=providers,
                          save_inputs=save_inputs, save_outputs=save_outputs, plain=plain, ref=ref,
                          w8a8_form=w8a8_form)
    report.w8a8 = w8a8
    if ppl_unquantized_head is not None:
        # The reference runs the export's quantized head; this is what the quantization costs the reference.
        report.metrics["ppl_reference_unquantized_head"] = ppl_unquantized_head
    report.settings.update(reference=str(reference), manifest_sha256=actual, text=text or SHIPPED_EVAL,
                           head=head)
    if engine is not None:
        try:
            from .engine import verify_engine
        except ImportError as e:
            raise MissingDependencyError("verifying a TensorRT engine needs slim_trt.trt with TensorRT and a GPU "
                                         "(pip install 'slim-trt[trt]' on a GPU machine)") from e
        report.engine = verify_engine(path, engine, plugins=tuple(plugins or ()), input_ids=ids,
                                      decode_steps=decode_steps, providers=providers)
    return report


def _w8a8_checks(path: Path, model: nn.Module, ids: torch.Tensor, ref: torch.Tensor, scales: dict, dtype: str,
                 th: Thresholds, overrides: dict | None, decode_steps: int, providers) -> tuple[dict, Thresholds]:
    """verify_w8a8's structure and float-activation checks, and the whole-model limits from the sensitivity floor."""
    import shutil
    import tempfile

    import onnx

    from .w8a8 import FLOOR_EPS, FloorLimits, act_formats, check_structure, float_activations, sensitivity_floor, \
        strip_act_qdq

    proto = onnx.load(str(path))
    structure = check_structure(strip_act_qdq(proto), scales, act_formats(model))
    with tempfile.TemporaryDirectory(prefix="slim_trt_verify_w8a8_") as d:
        stripped = Path(d) / path.name
        onnx.save_model(proto, str(stripped), save_as_external_data=True, location=f"{path.name}.data")
        del proto
        # The graph's own arithmetic without activation quantization: ONNX Runtime's MatMulNBits (the adapters)
        # get fp32 activations too, whatever level the export declares for serving (4 rounds them to int8).
        sidecar = read_sidecar(path) or {}
        sidecar.setdefault("onnxruntime", {}).setdefault("session_config", {})[
            "session.qdq_matmulnbits_accuracy_level"] = "1"
        (Path(d) / SIDECAR).write_text(json.dumps(sidecar))
        with float_activations(model):
            fl = verify_model(stripped, model, ids, decode_steps=decode_steps, thresholds=th, providers=providers)
    floor = sensitivity_floor(model, ids, ref, FLOOR_EPS.get(dtype, 1e-3))
    whole = FloorLimits().apply(th, floor).replace(**(overrides or {}))
    result = {"ok": structure["ok"] and fl.ok, "structure": structure,
              "float_activations": {"ok": fl.ok, "metrics": fl.metrics, "thresholds": dataclasses.asdict(fl.thresholds),
                                    "checks": fl.checks},
              "floor": floor}
    return result, whole


def _reference_model(path: Path, reference: str | Path, meta: dict, ignore_manifest: bool):
    """(model, tokenizer, manifest sha256 or None) of the reference: the checkpoint the export came from, or the
    MODEL a dense export was made from."""
    from transformers import AutoTokenizer

    ckpt = Path(reference)
    if not (ckpt / "slim_manifest.json").is_file():
        if meta.get("source_model"):  # a dense export: the reference is any MODEL
            from ..models.source import load_model

            model, tok = load_model(str(reference))
            return model, tok, None
        if not ckpt.exists():
            raise SlimError(f"reference checkpoint {ckpt} does not exist: give the folder written by "
                            "`slim-trt compress`")
    from ..checkpoint.format import read_manifest

    manifest = read_manifest(ckpt)  # not a checkpoint, no manifest, an edited manifest: one line first
    expected = (meta.get("checkpoint") or {}).get("manifest_sha256")
    actual = manifest["content_sha256"]  # what exports record; older ones recorded the file's bytes
    same = expected in (actual, hashlib.sha256((ckpt / "slim_manifest.json").read_bytes()).hexdigest())
    if expected and not same and not ignore_manifest:
        raise SlimError(f"{path} was exported from another checkpoint (manifest sha256 {expected[:12]}..., "
                        f"{ckpt} has {actual[:12]}...): pass the checkpoint it was exported from, or "
                        f"--ignore-manifest")
    from ..checkpoint.format import load

    tok_dir = ckpt if (ckpt / "tokenizer_config.json").is_file() or (ckpt / "tokenizer.json").is_file() else None
    if tok_dir is None and meta.get("tokenizer"):
        tok_dir = path.parent / meta["tokenizer"]
    if tok_dir is None:
        raise SlimError(f"no tokenizer in {ckpt} or beside {path}: verify needs it to tokenize the text")
    return load(ckpt), AutoTokenizer.from_pretrained(str(tok_dir)), actual


def format_report(report: VerifyReport) -> str:
    m, t, c = report.metrics, report.thresholds, report.checks
    s = report.settings
    rows = [("max |logit error|", f"{m['max_abs']:.4g}", f"<= {t.max_abs:g}", c["max_abs"]),
            ("mean |logit error|", f"{m['mean_abs']:.4g}", f"<= {t.mean_abs:g}", c["mean_abs"]),
            ("cosine (mean / min)", f"{m['cosine_mean']:.6f} / {m['cosine_min']:.6f}", f">= {t.cosine_min:g}",
             c["cosine_min"]),
            ("top-1 agreement", f"{100 * m['top1']:.2f}%", f">= {100 * t.top1_min:g}%", c["top1"]),
            ("perplexity onnx / torch", f"{m['ppl_onnx']:.4f} / {m['ppl_torch']:.4f}",
             f"rel <= {t.ppl_rel_max:g}", c["ppl_rel"])]
    lines = [f"slim-trt verify: {s.get('onnx')} ({s.get('dtype')}) vs PyTorch, {s.get('windows')} window(s) x "
             f"{s.get('seqlen')} tokens, {s.get('decode_steps')} decode step(s) through the KV cache, "
             f"providers {', '.join(s.get('providers', []))}"]
    config = s.get("session_config") or {}
    lines.append("ONNX Runtime session config (from slim_export.json): "
                 + (", ".join(f"{k}={v}" for k, v in config.items()) or "ONNX Runtime defaults"))
    if s.get("int8_activations"):
        lines.append("ONNX Runtime quantizes activations to int8 on the fly (MatMulNBits accuracy level 4 or an 8-bit "
                     "head): the default limits allow for that rounding")
    k = s.get("kernels")
    if k and s.get("dtype") == "fp16" and k.get("compute_dtype") == "fp32":
        lines.append("ONNX Runtime computes this fp16 export in fp32: the graph is widened in memory (fp16 weights "
                     "and scales are exact in fp32; inputs and outputs stay fp16), as its CPU kernels are fp32")
    cpu = s.get("cpu")
    if cpu:
        line = f"CPU: {' '.join(cpu['cpu_features'])}"
        if k and k.get("matmul_integer_to_float"):
            line += (f"; W8A8 GEMMs: {k['matmul_integer_to_float']} MatMulIntegerToFloat as {cpu['w8a8_form']} "
                     f"({cpu['reason']})")
        lines.append(line)
    if k:
        unfused = k["unfused_dequantize"]
        lines.append(f"kernels: {k['matmul_nbits']} MatMulNBits, {k['gather_block_quantized']} GatherBlockQuantized "
                     f"(packed integer weights); {len(unfused)} DequantizeLinear left unfused"
                     + (f" (e.g. {next(iter(unfused))} -> {', '.join(next(iter(unfused.values())))})"
                        if unfused else ""))
    if "ppl_reference_unquantized_head" in m:
        lines.append(f"--head {s.get('head')}: the reference runs the same quantized embedding/head; its perplexity "
                     f"with the checkpoint's own head is {m['ppl_reference_unquantized_head']:.4f} "
                     f"(the quantized head costs {100 * (m['ppl_torch'] / m['ppl_reference_unquantized_head'] - 1):+.2f}%)")
    w = max(len(r[0]) for r in rows)
    lines.append(f"{'METRIC':{w}}  {'VALUE':>25}  {'THRESHOLD':>14}  RESULT")
    for name, val, thr, ok in rows:
        lines.append(f"{name:{w}}  {val:>25}  {thr:>14}  {'ok' if ok else 'FAIL'}")
    if report.plain is not None:
        p = report.plain
        lines.append(f"plain arithmetic (Q/DQ fusion off): max |logit error| {p['max_abs']:.4g}, mean "
                     f"{p['mean_abs']:.4g}, top-1 {100 * p['top1']:.2f}%, perplexity {p['ppl_onnx']:.4f}; "
                     f"max |fused - plain| {p['max_abs_vs_fused']:.4g} (not a check)")
    if report.w8a8 is not None:
        lines += _format_w8a8(report.w8a8)
    if report.engine is not None:
        lines.append(f"TensorRT engine vs ONNX Runtime: {'ok' if report.engine.get('ok') else 'FAIL'} "
                     f"(see the JSON report's 'engine')")
    lines.append("PASSED" if report.ok else "FAILED")
    return "\n".join(lines)


def _format_w8a8(w: dict) -> list[str]:
    st, fl, f = w["structure"], w["float_activations"], w["floor"]
    m, t = fl["metrics"], fl["thresholds"]
    lines = [f"W8A8 structure: {st['layers']} activation Q/DQ pairs with the checkpoint's scales and int8 zero point "
             f"0: {'ok' if st['ok'] else 'FAIL'}"] + [f"  {p}" for p in st["problems"][:10]]
    lines.append(f"W8A8 with float activations (Q/DQ pairs out, act_scale off): max |logit error| {m['max_abs']:.4g} "
                 f"(<= {t['max_abs']:g}), mean {m['mean_abs']:.4g} (<= {t['mean_abs']:g}), cosine min "
                 f"{m['cosine_min']:.6f} (>= {t['cosine_min']:g}), top-1 {100 * m['top1']:.2f}% (>= "
                 f"{100 * t['top1_min']:g}%), perplexity rel {m['ppl_rel']:.2g} (<= {t['ppl_rel_max']:g}): "
                 f"{'ok' if fl['ok'] else 'FAIL'}")
    lines.append(f"W8A8 sensitivity floor (PyTorch against itself, embeddings x (1 + {f['eps']:g} N(0,1)), worst of "
                 f"{f['draws']}): max {f['max_abs']:.4g}, mean {f['mean_abs']:.4g}, cosine min {f['cosine_min']:.4f}, "
                 f"top-1 {100 * f['top1']:.2f}%, perplexity rel {f['ppl_rel']:.2g}; the limits above are 2x it "
                 f"(static INT8 rounding amplifies any difference: slim_trt/verification/w8a8.py)")
    return lines
