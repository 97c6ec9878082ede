"""Calibration: the layer-by-layer runner (hooks, Hessians, activation statistics), where each family keeps its
decoder blocks, resume state, SmoothQuant scales and the MLP channel permutation. Text -> token windows is
slim_trt.data.windows."""
