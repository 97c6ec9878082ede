"""Triton model configurations (config.pbtxt) for an export, built as Triton's own protobuf messages so that
every field name is checked by the schema rather than by hand-written text.

Pure functions: an ExportInfo and options in, ModelConfig messages out; `render` turns one into text.
"""
from __future__ import annotations

from dataclasses import dataclass

from ..errors import MissingDependencyError
from ..runtime.decoder import GENERATE_INPUTS as _REQUEST_FIELDS, DecoderSpec, TensorSpec

# numpy dtype names (slim_export.json) -> Triton data types.
TRITON_DTYPES = {
    "bool": "TYPE_BOOL", "uint8": "TYPE_UINT8", "int8": "TYPE_INT8", "int16": "TYPE_INT16",
    "int32": "TYPE_INT32", "int64": "TYPE_INT64", "float16": "TYPE_FP16", "float32": "TYPE_FP32",
    "float64": "TYPE_FP64", "bfloat16": "TYPE_BF16", "bf16": "TYPE_BF16",
}
# A short wait lets concurrent requests of the same shape meet in one batch without hurting a lone request.
QUEUE_DELAY_US = 500


def _pb():
    try:
        from tritonclient.grpc import model_config_pb2
    except ImportError:
        raise MissingDependencyError("writing Triton configs needs tritonclient: pip install 'slim-trt[triton]'") \
            from None
    return model_config_pb2


def render(config) -> str:
    from google.protobuf import text_format

    return text_format.MessageToString(config)


def parse(text: str):
    """config.pbtxt text -> ModelConfig message (used to read a repository back)."""
    from google.protobuf import text_format

    return text_format.Parse(text, _pb().ModelConfig())


@dataclass(frozen=True)
class ModelOptions:
    device: str = "cpu"  # instance group of the onnxruntime model: "cpu" or "gpu"
    instances: int = 1
    max_batch_size: int = 8  # for models whose axis 0 is a batch axis; 0 turns batching off
    trt_accelerator: bool = False  # the onnxruntime model compiles TensorRT subgraphs (GPU only)
    ort_op_library: str | None = None  # native ORT custom-op library (the `plugin` export on the onnxruntime backend)
    intra_op_threads: int = 0  # ONNX Runtime threads per python-backend instance (0 = ORT's default)
    default_max_new_tokens: int = 32
    generate_via: str = ""  # "" = ONNX Runtime inside slim_generate; else the repository model it calls


def batch_axis(spec: DecoderSpec) -> str | None:
    """The name of axis 0 if every input and output shares it (so rows are independent requests), else None."""
    firsts = {t.shape[0] if t.shape else None for t in spec.inputs + spec.outputs}
    if len(firsts) == 1:
        (axis,) = firsts
        if isinstance(axis, str):
            return axis
    return None


def _dims(shape: tuple, batched: bool) -> list[int]:
    dims = shape[1:] if batched else shape
    return [d if isinstance(d, int) else -1 for d in dims]


def _add_tensors(repeated, tensors: tuple[TensorSpec, ...], batched: bool) -> None:
    pb = _pb()
    for t in tensors:
        repeated.add(name=t.name, data_type=pb.DataType.Value(TRITON_DTYPES[t.dtype]), dims=_dims(t.shape, batched))


def _decoder_io(config, spec: DecoderSpec, max_batch_size: int) -> None:
    """Inputs and outputs exactly as in the ONNX model; axis 0 becomes Triton's batch axis when it is one."""
    batched = max_batch_size > 0 and batch_axis(spec) is not None
    config.max_batch_size = max_batch_size if batched else 0
    _add_tensors(config.input, spec.inputs, batched)
    _add_tensors(config.output, spec.outputs, batched)
    if batched:
        config.dynamic_batching.max_queue_delay_microseconds = QUEUE_DELAY_US


def _instances(config, kind: str, count: int) -> None:
    pb = _pb()
    group = config.instance_group.add(count=count)
    group.kind = pb.ModelInstanceGroup.KIND_GPU if kind == "gpu" else pb.ModelInstanceGroup.KIND_CPU


def onnxruntime_config(name: str, spec: DecoderSpec, dtype: str, options: ModelOptions):
    """The exported ONNX on Triton's onnxruntime backend."""
    config = _pb().ModelConfig(name=name, platform="onnxruntime_onnx", backend="onnxruntime",
                               default_model_filename="model.onnx")
    _decoder_io(config, spec, options.max_batch_size)
    _instances(config, options.device, options.instances)
    if options.trt_accelerator:
        trt = config.optimization.execution_accelerators.gpu_execution_accelerator.add(name="tensorrt")
        if dtype in ("fp16", "bf16"):
            trt.parameters["precision_mode"] = dtype.upper()
        trt.parameters["trt_sparsity_enable"] = "1"  # 2:4 weights: let TensorRT pick sparse tensor-core tactics
        trt.parameters["trt_engine_cache_enable"] = "1"  # build once, not at every model load
        trt.parameters["max_workspace_size_bytes"] = str(1 << 30)
    if options.ort_op_library:
        config.model_operations.op_library_filename.append(options.ort_op_library)
    if options.intra_op_threads:
        config.parameters["intra_op_thread_count"].string_value = str(options.intra_op_threads)
    return config


def tensorrt_config(name: str, spec: DecoderSpec, options: ModelOptions):
    """A TensorRT engine built from the export (inputs, outputs and dynamic axes from slim_export.json).
    Plugins are loaded server-wide (backend config or LD_PRELOAD), not by the model config."""
    config = _pb().ModelConfig(name=name, platform="tensorrt_plan", backend="tensorrt",
                               default_model_filename="model.plan")
    _decoder_io(config, spec, options.max_batch_size)
    _instances(config, "gpu", options.instances)
    return config


def python_onnx_config(name: str, spec: DecoderSpec, options: ModelOptions):
    """slim_onnx: the exported ONNX run by ONNX Runtime inside the python backend, same inputs and outputs."""
    config = _pb().ModelConfig(name=name, backend="python")
    _decoder_io(config, spec, options.max_batch_size)
    _instances(config, "cpu", options.instances)
    config.parameters["intra_op_threads"].string_value = str(options.intra_op_threads)
    return config


GENERATE_INPUTS = tuple((name, triton_type, not required)  # name, Triton type, optional
                        for name, (_, triton_type, required) in _REQUEST_FIELDS.items())
GENERATE_OUTPUTS = (("text", "TYPE_STRING", [1]), ("token_ids", "TYPE_INT64", [-1]),
                    ("prompt_tokens", "TYPE_INT32", [1]))


def python_generate_config(name: str, options: ModelOptions):
    """slim_generate: prompt string in, generated text out. One request is one decode loop, so there is no
    dynamic batching (prompts of different lengths would need padding); concurrency comes from instances."""
    pb = _pb()
    config = pb.ModelConfig(name=name, backend="python", max_batch_size=0)
    for input_name, dtype, optional in GENERATE_INPUTS:
        config.input.add(name=input_name, data_type=pb.DataType.Value(dtype), dims=[1], optional=optional)
    for output_name, dtype, dims in GENERATE_OUTPUTS:
        config.output.add(name=output_name, data_type=pb.DataType.Value(dtype), dims=dims)
    _instances(config, "cpu", options.instances)
    config.parameters["intra_op_threads"].string_value = str(options.intra_op_threads)
    config.parameters["default_max_new_tokens"].string_value = str(options.default_max_new_tokens)
    config.parameters["decoder_model"].string_value = options.generate_via
    return config
