"""bench/speed.py worker for slim-trt exports: the product's ONNX Runtime session (the options the export declares,
the same code the Triton models run) and greedy decoding through its KV cache, batch 1 or more.

    python bench/speed_slim.py REQUEST.json RESULT.json      (protocol: bench/peers/_speed.py)

It imports only slim_trt.triton.runtime (numpy + onnxruntime; slim_trt.exporter for the `plugin` form), so the
peak RSS the caller reads is the runtime's, not torch's.
"""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent / "peers"))
import _speed  # noqa: E402


class SlimOnnx(_speed.Engine):
    max_batch = 64

    def __init__(self, req: dict):
        from slim_trt.triton import runtime

        self.runtime = runtime
        self.decoder = runtime.OnnxDecoder.from_folder(req["model"], threads=int(req["threads"]))
        self.spec = self.decoder.spec
        if not self.spec.with_cache:
            raise ValueError(f"{req['model']} was exported without a KV cache (--no-cache): export it with one")
        self.past: dict = {}
        self.length = 0

    def _forward(self, ids: np.ndarray) -> np.ndarray:
        """Feed ids [batch, T] after the cached tokens; keep the new cache; return logits [batch, T, vocab]."""
        batch, n = ids.shape
        feeds = {"input_ids": ids, "attention_mask": np.ones((batch, self.length + n), dtype=np.int64), **self.past}
        if self.spec.uses_position_ids:
            feeds["position_ids"] = np.broadcast_to(np.arange(self.length, self.length + n, dtype=np.int64),
                                                    (batch, n)).copy()
        out = self.decoder.run(feeds)
        self.past = {p: out[q] for p, q in zip(self.spec.past_names, self.spec.present_names, strict=True)}
        self.length += n
        return out["logits"]

    def _reset(self, batch: int) -> None:
        spec = self.spec
        self.past = {n: np.zeros((batch, spec.num_kv_heads, 0, spec.head_dim),
                                 dtype=self.runtime.numpy_dtype(spec.input(n).dtype)) for n in spec.past_names}
        self.length = 0

    def start(self, ids: np.ndarray) -> np.ndarray:
        self._reset(len(ids))
        return self._forward(ids)[:, -1].argmax(-1)

    def step(self, tokens: np.ndarray) -> np.ndarray:
        return self._forward(tokens.reshape(-1, 1))[:, -1].argmax(-1)

    def window_logits(self, ids: np.ndarray) -> np.ndarray:
        self._reset(1)
        return self._forward(ids[None])[0].astype(np.float32)

    def versions(self) -> dict:
        import onnxruntime

        opts = self.decoder.session.get_session_options()
        return {"onnxruntime": onnxruntime.__version__, "intra_op_threads": opts.intra_op_num_threads}


if __name__ == "__main__":
    _speed.main(SlimOnnx)
