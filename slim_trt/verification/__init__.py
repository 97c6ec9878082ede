"""Checking: an export against its checkpoint, a TensorRT engine against ONNX Runtime, perplexity.

compare.py      thresholds, logit metrics, reference logits, an ONNX Runtime run over token windows
ort_vs_torch.py verify(): ONNX Runtime vs the PyTorch checkpoint, with the report
w8a8.py         the W8A8 checks (graph structure, float activations, the sensitivity floor)
engine.py       verify_engine(): TensorRT vs ONNX Runtime (needs TensorRT and a GPU)
perplexity.py   perplexity and logit comparison of PyTorch models (eval, fine-tuning, benchmarks)

May import: trt (engine loading), runtime, exporter, models, checkpoint, data and the root helpers.
"""
