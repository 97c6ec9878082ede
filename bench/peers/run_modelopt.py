"""NVIDIA ModelOpt peer: its SparseGPT 2:4 sparsification, then its INT4 AWQ (W4A16, block 128), through its API.

Runs in bench/.venv-modelopt (bench/peers/requirements-modelopt.txt); see _common.py for the protocol.
"""
from __future__ import annotations

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common


def main(args) -> dict:
    import modelopt.torch.quantization as mtq
    import modelopt.torch.sparsity as mts
    import torch

    model = _common.load_dense(args.model)
    windows = _common.load_calib(args.calib)
    loop = _common.forward_loop_over(windows, args.batch_size)
    t0 = time.time()
    # SparseGPT 2:4 (ModelOpt's default pattern; lm_head excluded by its default rules).
    model = mts.sparsify(model, mode="sparsegpt", config={"forward_loop": loop})
    model = mts.export(model)  # make the masked weights plain weights again
    t_sparse = time.time() - t0
    model = mtq.quantize(model, mtq.INT4_AWQ_CFG, loop)
    seconds = time.time() - t0
    linears = _common.decoder_linears(model)
    weights = _common.effective_weights(model, linears)
    # AWQ multiplies the inputs by a per-channel pre-quant scale; W_eff = Q(W') diag(pqs), so keep pqs to let
    # the harness count the levels of Q(W') itself.
    prescale = {}
    for name, lin in linears.items():
        iq = getattr(lin, "input_quantizer", None)
        pqs = getattr(iq, "pre_quant_scale", None) if iq is not None else None
        if pqs is not None and getattr(iq, "_enable_pre_quant_scale", True):
            prescale[f"{name}.weight"] = pqs.detach().float().reshape(-1).cpu()
    probe = windows[:1]
    with torch.no_grad():
        ref = model(input_ids=probe, use_cache=False).logits
    check = _common.save_dense_folder(args.model, weights, Path(args.out), prescale, probe, ref)
    return {"seconds": seconds, "sparsify_seconds": round(t_sparse, 1), "quantized_layers": len(linears),
            "layers_with_prescale": len(prescale), "export_check": check,
            "calib_windows": list(windows.shape)}


if __name__ == "__main__":
    _common.run(main, ("nvidia-modelopt",))
