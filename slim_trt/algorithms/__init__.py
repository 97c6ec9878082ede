"""Pure tensor algorithms: no I/O, no hooks, no model objects (quantizers, SparseGPT/OBS, low-rank adapters, LRC,
SpQR outliers, SliM-LLM groups, refit rounds, the N:M permutation).

May import only config, timing and errors: the calibration loops that feed these functions live in
slim_trt.compression.
"""
