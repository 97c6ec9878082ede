"""The compressed checkpoint: the numerical reference every export is checked against.

format.py             the folder on disk (slim_manifest.json, layers.safetensors, checksums): save, load, read
compressed_linear.py  CompressedLinear, the module a checkpoint reloads into: y = W_c x + L(R x)

May import: algorithms, config and the root helpers; nothing above (no model loading, no ONNX).
"""
