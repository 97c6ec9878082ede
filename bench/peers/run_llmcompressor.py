"""llm-compressor peer: SparseGPT 2:4 followed by GPTQ W4A16 (INT4 symmetric, group 128), through `oneshot`.

Runs in bench/.venv-llmcompressor (bench/peers/requirements-llmcompressor.txt); see _common.py for the protocol.
"""
from __future__ import annotations

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common


def main(args) -> dict:
    import torch
    from datasets import Dataset
    from llmcompressor import oneshot
    from llmcompressor.modifiers.pruning import SparseGPTModifier
    from llmcompressor.modifiers.quantization import GPTQModifier

    model = _common.load_dense(args.model)
    windows = _common.load_calib(args.calib)
    n, seqlen = windows.shape
    # Already tokenized (the harness's windows, BOS first), so oneshot skips its own tokenization.
    ds = Dataset.from_dict({"input_ids": windows.tolist(), "attention_mask": torch.ones_like(windows).tolist()})
    recipe = [
        SparseGPTModifier(sparsity=0.5, mask_structure="2:4", targets=["Linear"], ignore=["re:.*lm_head"]),
        GPTQModifier(targets=["Linear"], scheme="W4A16", ignore=["re:.*lm_head"]),
    ]
    t0 = time.time()
    oneshot(model=model, dataset=ds, recipe=recipe, max_seq_length=seqlen, num_calibration_samples=n,
            shuffle_calibration_samples=False, batch_size=1)
    seconds = time.time() - t0
    linears = _common.decoder_linears(model)
    weights = _common.effective_weights(model, linears)
    probe = windows[:1]
    with torch.no_grad():
        ref = model(input_ids=probe, use_cache=False).logits
    check = _common.save_dense_folder(args.model, weights, Path(args.out), None, probe, ref)
    return {"seconds": seconds, "quantized_layers": len(linears), "export_check": check,
            "calib_windows": [n, seqlen]}


if __name__ == "__main__":
    _common.run(main, ("llmcompressor", "compressed-tensors"))
