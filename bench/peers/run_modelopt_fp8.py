"""NVIDIA ModelOpt peer on the FP8 2:4 recipe (issue 24): its SparseGPT 2:4 sparsification, then its FP8_DEFAULT_CFG
(FP8 E4M3 weights and static FP8 E4M3 activations, one scale per tensor each, no smoothing), through its API.

The same protocol as the W8A8 peer (run_modelopt_w8a8.py, which this reuses): scored in its venv with its
activations quantized, its dense score checked against ours, the effective weights saved for the pattern check.
"""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common
import run_modelopt_w8a8


def main(args) -> dict:
    return run_modelopt_w8a8.main(args, "FP8_DEFAULT_CFG")


if __name__ == "__main__":
    _common.run(main, ("nvidia-modelopt",))
