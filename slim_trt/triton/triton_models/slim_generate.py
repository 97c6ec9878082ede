"""Triton python-backend model: prompt string in, generated text out.

The tokenizer and a greedy/sampling decode loop with the KV cache run here. The decoder is either the exported
ONNX in ONNX Runtime inside this process (config parameter decoder_model empty) or another model of the
repository called through business-logic scripting (decoder_model = its name, e.g. the TensorRT engine model).
"""
from __future__ import annotations

import json
import os

import numpy as np
import slim_runtime as rt
import triton_python_backend_utils as pb_utils


def _param(config: dict, key: str, default: str = "") -> str:
    return config.get("parameters", {}).get(key, {}).get("string_value") or default


class TritonDecoder:
    """A decoder that is another model of this Triton server, called in-process (BLS)."""

    def __init__(self, model_name: str, spec: rt.DecoderSpec):
        self.model_name = model_name
        self.spec = spec

    def run(self, feeds):
        inputs = [pb_utils.Tensor(n, np.ascontiguousarray(a)) for n, a in feeds.items()]
        kwargs = {"model_name": self.model_name, "requested_output_names": self.spec.output_names, "inputs": inputs}
        try:  # outputs of a GPU model must come back in CPU memory to be read as numpy
            request = pb_utils.InferenceRequest(
                **kwargs, preferred_memory=pb_utils.PreferredMemory(pb_utils.TRITONSERVER_MEMORY_CPU, 0))
        except (AttributeError, TypeError):
            request = pb_utils.InferenceRequest(**kwargs)
        response = request.exec()
        if response.has_error():
            raise RuntimeError(f"{self.model_name}: {response.error().message()}")
        return {n: pb_utils.get_output_tensor_by_name(response, n).as_numpy() for n in self.spec.output_names}


def _inputs(request) -> dict:
    """Every generate input the request sent, as numpy (absent ones are None; GenerateRequest checks them)."""
    tensors = {name: pb_utils.get_input_tensor_by_name(request, name) for name in rt.GENERATE_INPUTS}
    return {name: None if t is None else t.as_numpy() for name, t in tensors.items()}


class TritonPythonModel:
    def initialize(self, args):
        folder = os.path.join(args["model_repository"], args["model_version"])
        config = json.loads(args["model_config"])
        spec, _ = rt.read_manifest(folder)
        decoder_model = _param(config, "decoder_model")
        if decoder_model:
            self.decoder = TritonDecoder(decoder_model, spec)
        else:
            threads = int(_param(config, "intra_op_threads", "0"))
            self.decoder = rt.OnnxDecoder(os.path.join(folder, spec.model_file), spec, threads)
        self.tokenizer = rt.load_tokenizer(os.path.join(folder, "tokenizer"))
        self.default_max_new_tokens = int(_param(config, "default_max_new_tokens", "32"))

    def _generate(self, request):
        req = rt.GenerateRequest.parse(_inputs(request), self.default_max_new_tokens)
        text, gen = rt.generate_text(self.decoder, self.tokenizer, req.prompt, req.max_new_tokens, req.sampling)
        return pb_utils.InferenceResponse(output_tensors=[
            pb_utils.Tensor("text", np.array([text.encode("utf-8")], dtype=np.object_)),
            pb_utils.Tensor("token_ids", np.array(gen.token_ids, dtype=np.int64)),
            pb_utils.Tensor("prompt_tokens", np.array([len(gen.prompt_ids)], dtype=np.int32)),
        ])

    def execute(self, requests):
        responses = []
        for request in requests:
            try:
                responses.append(self._generate(request))
            except rt.RequestError as e:
                responses.append(pb_utils.InferenceResponse(
                    error=pb_utils.TritonError(str(e), pb_utils.TritonError.INVALID_ARG)))
            except Exception as e:  # noqa: BLE001 - reported to this request only; the model keeps serving
                responses.append(pb_utils.InferenceResponse(
                    error=pb_utils.TritonError(f"generation failed: {type(e).__name__}: {e}",
                                               pb_utils.TritonError.INTERNAL)))
        return responses

    def finalize(self):
        self.decoder = None
