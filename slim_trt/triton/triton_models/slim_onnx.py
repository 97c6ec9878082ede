"""Triton python-backend model: the exported ONNX run by ONNX Runtime, with the ONNX model's inputs and outputs.

This is how an export is served where Triton has no onnxruntime backend. With dynamic batching on, Triton hands
`execute` several requests at once; requests of the same shapes are stacked along the batch axis and run as one.
"""
from __future__ import annotations

import json
import os

import numpy as np
import slim_runtime as rt
import triton_python_backend_utils as pb_utils


def _error(message: str, code):
    return pb_utils.InferenceResponse(error=pb_utils.TritonError(message, code))


class TritonPythonModel:
    def initialize(self, args):
        folder = os.path.join(args["model_repository"], args["model_version"])
        config = json.loads(args["model_config"])
        threads = int(config.get("parameters", {}).get("intra_op_threads", {}).get("string_value") or 0)
        self.decoder = rt.OnnxDecoder.from_folder(folder, threads)
        self.spec = self.decoder.spec

    def _feeds(self, request) -> dict:
        feeds = {}
        for name in self.spec.input_names:
            tensor = pb_utils.get_input_tensor_by_name(request, name)
            if tensor is not None:
                feeds[name] = tensor.as_numpy()
        rt.check_feeds(self.spec, feeds)
        return feeds

    def execute(self, requests):
        responses = [None] * len(requests)
        groups: dict[tuple, list] = {}
        for i, request in enumerate(requests):
            try:
                feeds = self._feeds(request)
            except rt.RequestError as e:
                responses[i] = _error(str(e), pb_utils.TritonError.INVALID_ARG)
                continue
            wanted = tuple(request.requested_output_names()) or tuple(self.spec.output_names)
            key = (tuple((n, a.shape[1:]) for n, a in sorted(feeds.items())), tuple(sorted(wanted)))
            groups.setdefault(key, []).append((i, feeds, wanted))
        for members in groups.values():
            self._run_group(members, responses)
        return responses

    def _run_group(self, members, responses) -> None:
        """Stack same-shape requests on axis 0, run once, and split the outputs back."""
        names = sorted(members[0][2])
        try:
            feeds = {n: np.concatenate([m[1][n] for m in members], axis=0) for n in self.spec.input_names}
            outputs = dict(zip(names, self.decoder.session.run(names, feeds), strict=True))
        except Exception as e:  # noqa: BLE001 - an ORT failure is reported to each request; the server keeps serving
            for i, _, _ in members:
                responses[i] = _error(f"ONNX Runtime failed: {e}", pb_utils.TritonError.INTERNAL)
            return
        start = 0
        for i, request_feeds, wanted in members:
            rows = request_feeds["input_ids"].shape[0]
            tensors = [pb_utils.Tensor(n, np.ascontiguousarray(outputs[n][start:start + rows])) for n in wanted]
            responses[i] = pb_utils.InferenceResponse(output_tensors=tensors)
            start += rows

    def finalize(self):
        self.decoder = None
