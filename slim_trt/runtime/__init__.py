"""ONNX Runtime: run an export, and read an export folder.

decoder.py        sessions (the CPU's W8A8 form), DecoderSpec, the decode loop with its KV cache, sampling
ort_rewrite.py    the in-memory rewrite ONNX Runtime runs (the file on disk stays TensorRT's)
export_folder.py  the export gate: read and check model.onnx, slim_export.json and the tokenizer
export_session.py a session for an exported model.onnx with the config its sidecar declares
generation.py     Generator / generate(): text from an export folder

decoder.py and ort_rewrite.py import nothing from slim_trt (numpy, onnx, onnxruntime): `deploy triton` copies them
beside the Triton models. The rest may import only the root helpers.
"""
