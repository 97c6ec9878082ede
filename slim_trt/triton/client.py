"""Small tritonclient helpers for the models `deploy` writes (used by the tests, the benchmark and users).

`url` is "host:port" of the HTTP or the gRPC endpoint, matching `protocol`.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..errors import MissingDependencyError


def _module(protocol: str):
    try:
        if protocol == "http":
            import tritonclient.http as module
        elif protocol == "grpc":
            import tritonclient.grpc as module
        else:
            raise ValueError(f"protocol must be http or grpc, got {protocol!r}")
    except ImportError:
        raise MissingDependencyError("talking to Triton needs tritonclient: pip install 'slim-trt[triton]'") from None
    return module


def connect(url: str, protocol: str = "http", **kwargs):
    return _module(protocol).InferenceServerClient(url, **kwargs)


def _input(module, name: str, array: np.ndarray):
    from tritonclient.utils import np_to_triton_dtype

    tensor = module.InferInput(name, list(array.shape), np_to_triton_dtype(array.dtype))
    tensor.set_data_from_numpy(array)
    return tensor


@dataclass(frozen=True)
class GenerateResult:
    text: str
    token_ids: list[int]
    prompt_tokens: int


def generate(client, prompt: str, max_new_tokens: int | None = None, *, model: str = "slim_generate",
             temperature: float | None = None, top_k: int | None = None, top_p: float | None = None,
             seed: int | None = None) -> GenerateResult:
    """One call of the generate model; raises tritonclient's InferenceServerException on a rejected request."""
    module = _module("grpc" if type(client).__module__.startswith("tritonclient.grpc") else "http")
    inputs = [_input(module, "prompt", np.array([prompt.encode("utf-8")], dtype=np.object_))]
    for name, value, dtype in (("max_new_tokens", max_new_tokens, np.int32), ("temperature", temperature, np.float32),
                               ("top_k", top_k, np.int32), ("top_p", top_p, np.float32), ("seed", seed, np.int64)):
        if value is not None:
            inputs.append(_input(module, name, np.array([value], dtype=dtype)))
    result = client.infer(model, inputs)
    return GenerateResult(text=result.as_numpy("text")[0].decode("utf-8"),
                          token_ids=[int(t) for t in result.as_numpy("token_ids")],
                          prompt_tokens=int(result.as_numpy("prompt_tokens")[0]))


def infer_decoder(client, feeds: dict[str, np.ndarray], *, model: str = "slim_onnx",
                  outputs: list[str] | None = None) -> dict[str, np.ndarray]:
    """Run a decoder model (NAME_onnx / NAME_ort / NAME_trt) on numpy inputs named as in the ONNX model."""
    module = _module("grpc" if type(client).__module__.startswith("tritonclient.grpc") else "http")
    inputs = [_input(module, name, np.ascontiguousarray(array)) for name, array in feeds.items()]
    requested = [module.InferRequestedOutput(name) for name in outputs] if outputs else None
    result = client.infer(model, inputs, outputs=requested)
    names = outputs or [o["name"] for o in _outputs(result)]
    return {name: result.as_numpy(name) for name in names}


def _outputs(result) -> list[dict]:
    response = result.get_response()
    if isinstance(response, dict):  # http
        return response["outputs"]
    return [{"name": o.name} for o in response.outputs]  # grpc
