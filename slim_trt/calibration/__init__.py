"""Calibration: text -> token windows, where the decoder blocks are, and the layer-by-layer runner."""
