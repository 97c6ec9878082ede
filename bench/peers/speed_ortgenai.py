"""bench/speed.py worker for the onnxruntime-genai peer: its INT4 model (made by its own model builder) decoded by
its own generator; perplexity through its ONNX model with plain onnxruntime (the generator does not hand out the
logits of every prompt position).

Runs in bench/.venv-ortgenai (bench/peers/requirements-ortgenai.txt). Protocol: bench/peers/_speed.py.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _speed  # noqa: E402


class OrtGenai(_speed.Engine):
    max_batch = 64

    def __init__(self, req: dict):
        import onnxruntime_genai as og

        self.og = og
        self.folder = Path(req["model"])
        self.threads = int(req["threads"])
        config = og.Config(str(self.folder))
        # The thread count of every row is the same; the generator reads it from the config's session options.
        config.overlay(json.dumps({"model": {"decoder": {"session_options": {"intra_op_num_threads": self.threads}}}}))
        self.model = og.Model(config)
        self.session = None

    def generate(self, ids: np.ndarray, new_tokens: int) -> dict:
        timer = _speed.StepTimer()
        batch, n = ids.shape
        params = self.og.GeneratorParams(self.model)
        # Greedy; min_length = max_length keeps the end-of-sequence token from stopping a sequence early (the
        # other rows never stop either), so every row decodes the same number of tokens.
        total = n + new_tokens + 1
        params.set_search_options(do_sample=False, batch_size=batch, max_length=total, min_length=total)
        generator = self.og.Generator(self.model, params)
        generator.append_tokens(ids.astype(np.int32))  # the prefill
        generator.generate_next_token()  # picks the first token from the prefill's logits
        out = [np.asarray(generator.get_next_tokens()).reshape(-1)]
        timer.first()
        for _ in range(new_tokens):  # each: one forward of the previous tokens, then the pick
            generator.generate_next_token()
            out.append(np.asarray(generator.get_next_tokens()).reshape(-1))
        timer.done()
        return timer.result(np.stack(out, 1).tolist())

    def window_logits(self, ids: np.ndarray) -> np.ndarray:
        import onnxruntime as ort

        if self.session is None:
            cfg = json.loads((self.folder / "genai_config.json").read_text())["model"]["decoder"]
            self.kv_shape = (1, int(cfg["num_key_value_heads"]), 0, int(cfg["head_size"]))
            opts = ort.SessionOptions()
            opts.intra_op_num_threads = self.threads
            opts.log_severity_level = 3
            self.session = ort.InferenceSession(str(self.folder / cfg["filename"]), opts,
                                                providers=["CPUExecutionProvider"])
        feeds = {}
        for i in self.session.get_inputs():
            if i.name == "input_ids":
                feeds[i.name] = ids[None].astype(np.int64)
            elif i.name == "attention_mask":
                feeds[i.name] = np.ones((1, len(ids)), dtype=np.int64)
            elif i.name == "position_ids":
                feeds[i.name] = np.arange(len(ids), dtype=np.int64)[None]
            elif i.name.startswith("past_key_values"):
                dtype = np.float16 if "float16" in i.type else np.float32
                feeds[i.name] = np.zeros(self.kv_shape, dtype=dtype)  # [batch, kv heads, past = 0, head size]
            else:
                raise ValueError(f"unexpected input {i.name} {i.type} {i.shape} in the onnxruntime-genai model")
        logits = self.session.run(["logits"], feeds)[0]
        return logits[0].astype(np.float32)

    def versions(self) -> dict:
        import importlib.metadata as md

        return {p: md.version(p) for p in ("onnxruntime-genai", "onnxruntime", "transformers")} | {
            "intra_op_threads": self.threads}


if __name__ == "__main__":
    _speed.main(OrtGenai)
