"""bench/speed.py worker for slim-trt exports: the product's ONNX Runtime session (the options the export declares,
the same code the Triton models run) and greedy decoding through its KV cache, batch 1 or more.

    python bench/speed_slim.py REQUEST.json RESULT.json      (protocol: bench/peers/_speed.py)

It imports only slim_trt.runtime.decoder (numpy + onnxruntime; onnx for the `plugin` form's rewrite), so the peak RSS is
the runtime's, not torch's.
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
        from slim_trt.runtime import decoder as runtime

        self.runtime = runtime
        # fuse=False: the graph's plain arithmetic (INT4 weights dequantized to float at load), for comparison
        self.fuse = bool(req.get("options", {}).get("fuse", True))
        self.decoder = runtime.OnnxDecoder.from_folder(req["model"], threads=int(req["threads"]), fuse=self.fuse)
        self.spec = self.decoder.spec
        if not self.spec.with_cache:
            raise ValueError(f"{req['model']} was exported without a KV cache (--no-cache): export it with one")

    def generate(self, ids: np.ndarray, new_tokens: int) -> dict:
        # The product's decode loop (what `slim-trt generate` and the Triton model run); no end-of-sequence ids, so
        # it never stops early. Its max_new_tokens counts the first token too.
        gens = self.runtime.generate_batch(self.decoder, ids.tolist(), new_tokens + 1, eos_token_ids=())
        t = gens[0].timing
        return {"tokens": [g.token_ids for g in gens], "ttft_s": t.first_token_seconds, "decode_s": t.decode_seconds}

    def window_logits(self, ids: np.ndarray) -> np.ndarray:
        spec = self.spec
        feeds = {"input_ids": ids[None].astype(np.int64), "attention_mask": np.ones((1, len(ids)), dtype=np.int64)}
        if spec.uses_position_ids:
            feeds["position_ids"] = np.arange(len(ids), dtype=np.int64)[None]
        feeds.update({n: np.zeros((1, spec.num_kv_heads, 0, spec.head_dim),
                                  dtype=self.runtime.numpy_dtype(spec.input(n).dtype)) for n in spec.past_names})
        return self.decoder.run(feeds)["logits"][0].astype(np.float32)

    def versions(self) -> dict:
        import onnxruntime

        config = dict(self.spec.session_config)  # as declared; what make_session changes for fuse=False:
        if not self.fuse:
            config["session.disable_quant_qdq"] = "1"
        return {"onnxruntime": onnxruntime.__version__,
                "intra_op_threads": self.decoder.session.get_session_options().intra_op_num_threads,
                "session_config": config}


if __name__ == "__main__":
    _speed.main(SlimOnnx)
