"""Deploy an export to a Jetson: a self-contained bundle folder that builds and times the engine on the board.

    bundle_jetson(export_dir, bundle_dir, JetsonConfig(target="jetson-orin")) -> JetsonBundle

See slim_trt/jetson/bundle.py for the layout; nothing here imports TensorRT.

May import: trt (build settings, no TensorRT), linter, runtime, targets, checkpoint and the root helpers.
"""
from __future__ import annotations

from .bundle import MANIFEST, JetsonBundle, JetsonConfig, LintRefused, bundle_jetson

__all__ = ["MANIFEST", "JetsonBundle", "JetsonConfig", "LintRefused", "bundle_jetson"]
