"""Public API: export_model (in-memory model) and export (checkpoint folder) -> model.onnx + slim_export.json."""
from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import onnx
import torch
from torch import nn

from ..errors import SlimError
from ..outputs import commit_output, prepare_output
from .decoder import BuildContext, architecture, build, kv_layout
from .graph import NUMPY_NAME, GraphBuilder
from .linear import LOWRANK_PLUGIN
from .options import DEFAULT_HEAD, DEFAULT_OUTLIER_FORM, EXTERNAL_DATA_THRESHOLD, IR_VERSION, OPSET, ExportOptions

SIDECAR = "slim_export.json"
MODEL_FILE = "model.onnx"
DATA_FILE = "model.onnx.data"
SCHEMA_VERSION = 1
TOKENIZER_DIR = "tokenizer"


def build_onnx(model: nn.Module, options: ExportOptions, *, act_scales: dict[str, float] | None = None,
               progress: bool = False) -> tuple[onnx.ModelProto, list]:
    """The ONNX graph of `model` (in memory) and the records of its compressed layers."""
    b = GraphBuilder(options.dtype)
    ctx = BuildContext(b=b, lowrank=options.lowrank, with_cache=options.with_cache, act_scales=act_scales,
                       records=[], progress=progress, head=options.head, outliers=options.outliers,
                       zero_points=options.zero_points)
    with torch.no_grad():
        build(ctx, model)
    doc = (f"slim-trt export: {architecture(model)}, dtype={options.dtype}, lowrank={options.lowrank}, "
           f"head={options.head}")
    proto = b.make_model("slim_trt_" + architecture(model), OPSET, IR_VERSION, doc)
    return proto, ctx.records, ctx.head_record


def _io_entries(values) -> list[dict]:
    out = []
    for vi in values:
        tt = vi.type.tensor_type
        shape = [d.dim_param if d.dim_param else int(d.dim_value) for d in tt.shape.dim]
        out.append({"name": vi.name, "dtype": NUMPY_NAME[tt.elem_type], "shape": shape})
    return out


def sidecar(model: nn.Module, proto: onnx.ModelProto, records: list, options: ExportOptions, *,
            checkpoint_path: str | None, manifest_sha256: str | None, tokenizer: str | None,
            head: dict | None = None, source_model: str | None = None) -> dict:
    """The slim_export.json content (the contract read by the TensorRT builder and the Triton deployer)."""
    cfg = model.config
    L, Hkv, D = kv_layout(model)
    inputs, outputs = _io_entries(proto.graph.input), _io_entries(proto.graph.output)
    dynamic = {}
    for e in inputs + outputs:
        axes = {str(i): d for i, d in enumerate(e["shape"]) if isinstance(d, str)}
        if axes:
            dynamic[e["name"]] = axes
    custom = []
    if any(n.domain == LOWRANK_PLUGIN["domain"] for n in proto.graph.node):
        custom.append(dict(LOWRANK_PLUGIN))
    return {
        "schema_version": SCHEMA_VERSION,
        "model_file": MODEL_FILE,
        "opset": OPSET,
        "ir_version": int(proto.ir_version),
        "dtype": options.dtype,
        "with_cache": options.with_cache,
        "lowrank": options.lowrank,
        "act_quant": options.act_quant,
        "architecture": architecture(model),
        "num_layers": L,
        "num_attention_heads": int(cfg.num_attention_heads),
        "num_kv_heads": Hkv,
        "head_dim": D,
        "hidden_size": int(cfg.hidden_size),
        "vocab_size": int(cfg.vocab_size),
        "max_position_embeddings": int(cfg.max_position_embeddings),
        "sliding_window": getattr(cfg, "sliding_window", None) if architecture(model) == "gemma3_text" else None,
        "inputs": inputs,
        "outputs": outputs,
        "dynamic_axes": dynamic,
        "checkpoint": {"path": checkpoint_path, "manifest_sha256": manifest_sha256},
        "source_model": source_model,
        "tokenizer": tokenizer,
        "custom_ops": custom,
        "options": options.to_dict(),
        "head": head or {"quantization": "none"},
        # What every ONNX Runtime session on this export uses (verify, deploy, generate, the Python API).
        "onnxruntime": {"session_config": options.session_config()},
        "compressed_layers": [r.to_dict() for r in records],
    }


def _initializer_bytes(proto: onnx.ModelProto) -> int:
    return sum(len(t.raw_data) for t in proto.graph.initializer)


def _copy_tokenizer(tokenizer_dir: Path, dest: Path) -> None:
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    except Exception as e:  # noqa: BLE001 - any failure here means "no usable tokenizer in that folder"
        raise SlimError(f"cannot load the tokenizer in {tokenizer_dir} ({type(e).__name__}): "
                        "pass a folder with tokenizer files or none") from e
    tok.save_pretrained(str(dest))


def save_onnx(proto: onnx.ModelProto, folder: Path, external_data: bool | None) -> bool:
    """Write folder/model.onnx (and model.onnx.data when large or asked); check it; return whether external."""
    path = folder / MODEL_FILE
    external = external_data if external_data is not None else _initializer_bytes(proto) > EXTERNAL_DATA_THRESHOLD
    if external:
        onnx.save_model(proto, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                        location=DATA_FILE, size_threshold=1024)
        onnx.checker.check_model(str(path))
    else:
        onnx.checker.check_model(proto)
        onnx.save_model(proto, str(path))
    return external


def export_model(model: nn.Module, out_dir: str | Path, *, options: ExportOptions | None = None,
                 tokenizer_dir: str | Path | None = None, checkpoint_path: str | None = None,
                 manifest_sha256: str | None = None, act_scales: dict[str, float] | None = None,
                 calib_windows: torch.Tensor | None = None, force: bool = False, progress: bool = False,
                 source_model: str | None = None) -> dict:
    """Export an in-memory (compressed) causal LM to out_dir/model.onnx + out_dir/slim_export.json.

    With options.act_quant == "int8", activation scales come from `act_scales` or are measured on `calib_windows`
    (token ids [n, seqlen]). Returns the sidecar dict. Nothing is written in place: the folder is built under a
    temporary name and renamed at the end.
    """
    options = options or ExportOptions()
    out_dir = Path(out_dir)
    architecture(model)  # refuse unsupported models before touching the disk
    from ..checkpoint.compressed_linear import compressed_layers

    if options.dtype == "bf16" and any(m.act_format == "fp8" or (m.qweight is not None and m.qweight.is_fp8)
                                       for _, m in compressed_layers(model)):
        raise SlimError("FP8 exports take --dtype fp16 or fp32: ONNX Runtime has no bf16 DequantizeLinear for FP8, "
                        "so `verify` could not run a bf16 FP8 export; export with --dtype fp16")
    stored = stored_act_scales(model)
    if stored:
        # A W8A8 checkpoint carries its calibrated scales: the export quantizes exactly as the reference does.
        if act_scales is not None or calib_windows is not None:
            raise SlimError("this model carries its own activation scales (compressed with --act-bits 8): do not "
                            "pass act_scales or calib_windows")
        act_scales = stored
        options = dataclasses.replace(options, act_quant="int8")
    if options.act_quant == "int8" and act_scales is None:
        if calib_windows is None:
            raise SlimError("--act-quant int8 needs calibration text: give calib_windows (token ids) or act_scales")
        from .calibrate import activation_scales

        act_scales = activation_scales(model, calib_windows)
    tmp = prepare_output(out_dir, force)
    try:
        proto, records, head = build_onnx(model, options, act_scales=act_scales, progress=progress)
        external = save_onnx(proto, tmp, options.external_data)
        tokenizer = None
        if tokenizer_dir is not None:
            _copy_tokenizer(Path(tokenizer_dir), tmp / TOKENIZER_DIR)
            tokenizer = TOKENIZER_DIR
        meta = sidecar(model, proto, records, options, checkpoint_path=checkpoint_path,
                       manifest_sha256=manifest_sha256, tokenizer=tokenizer, head=head, source_model=source_model)
        meta["external_data"] = DATA_FILE if external else None
        if any(m.act_format == "fp8" for _, m in compressed_layers(model)):
            meta["act_format"] = "fp8"  # FP8 E4M3 activation Q/DQ (issue 24); INT8 exports carry no such key
        (tmp / SIDECAR).write_text(json.dumps(meta, indent=1) + "\n")
        commit_output(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return meta


def stored_act_scales(model: nn.Module) -> dict[str, float]:
    """{layer name: activation scale} of the compressed layers that quantize their input (W8A8 checkpoints)."""
    from ..checkpoint.compressed_linear import compressed_layers

    return {n: m.act_scale for n, m in compressed_layers(model) if m.act_scale is not None}


def manifest_sha256(ckpt: Path) -> str:
    """The checkpoint's identity: its manifest's content digest (content_sha256), which re-indenting the manifest
    does not change (exports before issue 25 recorded the file's bytes; verify accepts both)."""
    from ..checkpoint.format import DIGEST_KEY, read_manifest

    return read_manifest(ckpt)[DIGEST_KEY]


def has_tokenizer(folder: Path) -> bool:
    return any((folder / f).exists() for f in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model"))


def _calibration_windows(tokenizer_dir: Path | None, n: int = 8, seqlen: int = 128) -> torch.Tensor:
    """Token windows from the shipped calibration sample, tokenized with the checkpoint's tokenizer."""
    if tokenizer_dir is None:
        raise SlimError("--act-quant int8 calibrates on text and needs the checkpoint's tokenizer files: "
                        "save the checkpoint with its tokenizer")
    from transformers import AutoTokenizer

    from ..data.windows import calibration_windows, load_text

    tok = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    return calibration_windows(tok, load_text(None), nsamples=n, seqlen=seqlen)


def export(source: str | Path, out_dir: str | Path, *, dtype: str = "fp16", with_cache: bool = True,
           lowrank: str = "decomposed", act_quant: str | None = None, external_data: bool | None = None,
           head: str = DEFAULT_HEAD, ort_accuracy_level: int | None = None, force: bool = False,
           progress: bool = True, outliers: str = DEFAULT_OUTLIER_FORM, zero_points: str = "dq") -> dict:
    """Export a slim-trt checkpoint folder, or a plain model (any MODEL `slim-trt compress` accepts: a Hugging Face
    folder, a .gguf file, `gemma3-270m`, a hub id) as the dense baseline, with the same exporter. See export_model.
    Returns the sidecar dict.

    act_quant: None follows the checkpoint (INT8 Q/DQ on the activations with its stored scales when it was
    compressed with --act-bits 8, none otherwise); "int8" on a weight-only checkpoint calibrates scales on the
    shipped text sample; "none" asks for float activations, which a W8A8 checkpoint refuses."""
    explicit_none = act_quant == "none"
    options = ExportOptions(dtype=dtype, with_cache=with_cache, lowrank=lowrank,
                            act_quant=None if explicit_none else act_quant, external_data=external_data, head=head,
                            outliers=outliers, zero_points=zero_points,
                            **({} if ort_accuracy_level is None else {"ort_accuracy_level": ort_accuracy_level}))
    ckpt = Path(source)
    from ..checkpoint.format import load, looks_like_checkpoint, read_manifest
    from ..outputs import check_outputs

    check_outputs(folders={"-o": out_dir}, inputs=[source], force=force)

    if (ckpt / "slim_manifest.json").is_file() or looks_like_checkpoint(ckpt):
        read_manifest(ckpt)  # a folder without its manifest, an edited manifest: one line before anything else

        model = load(ckpt)
        tok = ckpt if has_tokenizer(ckpt) else None
        provenance = dict(checkpoint_path=str(ckpt.resolve()), manifest_sha256=manifest_sha256(ckpt))
    else:
        from ..models.source import load_model, model_folder, resolve

        if ckpt.is_dir() and not (ckpt / "config.json").is_file():
            raise SlimError(f"{ckpt} is not a slim-trt checkpoint (no slim_manifest.json) nor a Hugging Face model "
                            "(no config.json): give the folder written by `slim-trt compress`, or a MODEL")
        if not ckpt.exists():
            try:
                resolve(str(source))
            except SlimError:
                raise SlimError(f"{source} does not exist: give a folder written by `slim-trt compress`, or a MODEL "
                                "(a Hugging Face folder, a .gguf file, gemma3-270m, a hub id)") from None

        model, _ = load_model(str(source))
        folder = model_folder(str(source))
        tok = Path(folder) if not isinstance(folder, str) and has_tokenizer(Path(folder)) else None
        provenance = dict(source_model=str(source))
    calib = None
    if stored_act_scales(model):
        if explicit_none:
            raise SlimError(f"{ckpt} quantizes activations to INT8 (compressed with --act-bits 8), so --act-quant "
                            f"none would export a different model than the checkpoint: drop --act-quant (the "
                            f"export uses the checkpoint's scales)")
    elif act_quant == "int8":
        calib = _calibration_windows(tok)
    return export_model(model, out_dir, options=options, tokenizer_dir=tok, calib_windows=calib, force=force,
                        progress=progress, **provenance)
