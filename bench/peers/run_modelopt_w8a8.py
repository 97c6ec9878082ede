"""NVIDIA ModelOpt peer on the W8A8 2:4 recipe: its SparseGPT 2:4 sparsification, then its INT8 SmoothQuant
(INT8 per-channel weights, static per-tensor INT8 activations, SmoothQuant smoothing), through its API.

Runs in bench/.venv-modelopt (bench/peers/requirements-modelopt.txt); see _common.py for the protocol. The
activations are fake-quantized by ModelOpt's own input quantizers, which a folder of weights cannot carry, so this
peer evaluates in its venv (--eval): the dense model first (the harness compares that number with its own, so both
sides compute the same thing), then the quantized model. The saved folder holds the effective weights
Q(W / s) diag(s) (s: ModelOpt's smoothing factor, its input quantizer's pre_quant_scale, saved as the prescale),
read with the input quantization switched off, for the harness's 2:4 and INT8 pattern check.
"""
from __future__ import annotations

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common


def main(args, config: str = "INT8_SMOOTHQUANT_CFG") -> dict:
    """config: the ModelOpt quantization config by name (run_modelopt_fp8.py passes FP8_DEFAULT_CFG)."""
    import modelopt.torch.quantization as mtq
    import modelopt.torch.sparsity as mts
    import torch

    if not args.eval:
        raise ValueError("this peer quantizes the activations, so it must evaluate in its venv: pass --eval")
    model = _common.load_dense(args.model)
    windows = _common.load_calib(args.calib)
    eval_windows = _common.load_calib(args.eval)
    loop = _common.forward_loop_over(windows, args.batch_size)
    t_eval = time.time()
    dense = _common.score_windows(model, eval_windows, args.eval_batch_size)
    t_eval = time.time() - t_eval
    t0 = time.time()
    # SparseGPT 2:4 (ModelOpt's default pattern; lm_head excluded by its default rules).
    model = mts.sparsify(model, mode="sparsegpt", config={"forward_loop": loop})
    model = mts.export(model)  # make the masked weights plain weights again
    t_sparse = time.time() - t0
    model = mtq.quantize(model, getattr(mtq, config), loop)
    seconds = time.time() - t0
    t1 = time.time()
    w8a8 = _common.score_windows(model, eval_windows, args.eval_batch_size)
    t_eval += time.time() - t1
    linears = _common.decoder_linears(model)
    quantized = {n: lin for n, lin in linears.items()
                 if getattr(lin, "input_quantizer", None) is not None and lin.input_quantizer.is_enabled}
    act = {n: float(lin.input_quantizer.amax) for n, lin in quantized.items()}
    # Weight-only view: keep the smoothing (pre_quant_scale) but stop quantizing the inputs, so feeding the
    # identity reads W_eff = Q(W / s) diag(s) off each linear.
    for lin in quantized.values():
        lin.input_quantizer.disable_quant()
    weights = _common.effective_weights(model, linears)
    prescale = {f"{n}.weight": lin.input_quantizer.pre_quant_scale.detach().float().reshape(-1).cpu()
                for n, lin in quantized.items() if lin.input_quantizer.pre_quant_scale is not None}
    probe = windows[:1]
    with torch.no_grad():
        ref = model(input_ids=probe, use_cache=False).logits
    out = Path(args.out)
    check = _common.save_dense_folder(args.model, weights, out, prescale, probe, ref)
    torch.save(w8a8.pop("top1"), out / "eval_top1.pt")
    dense.pop("top1")
    return {"seconds": seconds, "sparsify_seconds": round(t_sparse, 1), "eval_seconds": round(t_eval, 1),
            "quantized_layers": len(linears), "layers_with_act_quant": len(quantized),
            "layers_with_prescale": len(prescale), "export_check": check, "calib_windows": list(windows.shape),
            "act_amax_min": min(act.values()) if act else None, "act_amax_max": max(act.values()) if act else None,
            "evaluation": {"windows": list(eval_windows.shape), "dense": dense, "quantized": w8a8}}


if __name__ == "__main__":
    _common.run(main, ("nvidia-modelopt",))
