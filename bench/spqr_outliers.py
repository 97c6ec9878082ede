"""How SpQR's fp16 outliers cost in ONNX Runtime: one compressed linear y = x W_q^T + x O^T exported in each outlier
form of slim_trt.exporter.linear.emit_outliers (scatter, columns, dense) and without outliers, on layer shapes of
Gemma 3 270M and a tiny model, timed in one ONNX Runtime session each (CPU, one thread, fp32 graph as the ORT
rewrite runs it, the export's session config: the UINT4 zero-point DequantizeLinear -> MatMul becomes
MatMulNBits). Decode (1 token) and prefill (512 tokens); median of `--repeats` runs of `--iters` calls; the
ratio to the no-outlier graph is what to read (the machine is shared: its load is recorded per row).

The weights: SpQR 4-bit (group 16, 1% outliers) of a random layer whose calibration inputs have heavy-tailed
per-channel scales (as LLM activations do), so the outliers cluster in input columns the way the Hessian weighting
makes them; `columns` reports how many input columns hold an outlier.

    python bench/spqr_outliers.py [--out bench/results] [--repeats 5] [--iters 20]
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness  # noqa: E402
from harness import BENCH  # noqa: E402

SHAPES = {  # name: (N, K)
    "tiny mlp.up (64 -> 128)": (128, 64),
    "gemma3-270m mlp.up (640 -> 2048)": (2048, 640),
    "gemma3-270m mlp.down (2048 -> 640)": (640, 2048),
}
FORMS = ("none", "scatter", "columns", "dense")


def spqr_layer(N: int, K: int, seed: int = 0):
    from slim_trt.algorithms.spqr import spqr_quantize

    g = torch.Generator().manual_seed(seed)
    W = torch.randn(N, K, generator=g) * 0.02
    channel = torch.distributions.StudentT(2.0).sample((K,)).abs() + 0.1  # heavy-tailed input channels
    X = torch.randn(2048, K, generator=g) * channel
    H = 2 * X.T @ X / X.shape[0]
    return spqr_quantize(W, H, 4, outlier_share=0.01)


def layer_graph(qt, form: str):
    from slim_trt.exporter.graph import GraphBuilder
    from slim_trt.exporter.linear import dequantized, emit_outliers
    from slim_trt.exporter.options import IR_VERSION, OPSET
    from onnx import TensorProto

    N, K = qt.shape
    b = GraphBuilder("fp32")
    x = b.add_input("x", TensorProto.FLOAT, ["T", K])
    w = dequantized(b, qt, "layer", transpose=True)
    y = b.op("MatMul", [x, w], name="layer")
    if form != "none":
        y = emit_outliers(b, x, y, qt.outliers, "layer", form)
    b.identity_to(y, "y", name="out")
    b.add_output("y", TensorProto.FLOAT, ["T", N])
    return b.make_model("spqr_layer", OPSET, IR_VERSION)


def session(model):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = so.inter_op_num_threads = 1
    so.add_session_config_entry("session.disable_quant_qdq", "0")
    so.add_session_config_entry("session.qdq_matmulnbits_accuracy_level", "1")
    return ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])


def time_calls(sess, x: np.ndarray, iters: int) -> float:
    sess.run(None, {"x": x})
    t = time.perf_counter()
    for _ in range(iters):
        sess.run(None, {"x": x})
    return (time.perf_counter() - t) / iters * 1e3


def main(argv=None) -> int:
    p = argparse.ArgumentParser("bench/spqr_outliers.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=str(BENCH / "results"))
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--iters", type=int, default=20)
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    rows = []
    for shape_name, (N, K) in SHAPES.items():
        qt = spqr_layer(N, K)
        ref = qt.dequantize().numpy()
        used = int(torch.unique(qt.outliers.col).numel())
        graphs = {f: layer_graph(qt, f) for f in FORMS}
        sessions = {f: session(g) for f, g in graphs.items()}
        # What each form stores for the outliers in the ONNX file (fp32 graph: fp16 exports store half the values).
        stored = {f: round(8 * sum(len(t.raw_data) for t in g.graph.initializer if ".outliers" in t.name) / (N * K), 3)
                  for f, g in graphs.items()}
        for tokens in (1, 512):
            x = np.random.default_rng(0).standard_normal((tokens, K)).astype(np.float32)
            for f, s in sessions.items():  # every form computes the same layer (the none form lacks O)
                err = float(np.abs(s.run(None, {"x": x})[0] - x @ (ref if f != "none" else qt.base_dequantize().numpy()).T).max())
                assert err < 1e-2 * max(1.0, float(np.abs(x @ ref.T).max())), (shape_name, f, err)
            load0 = harness.loadavg()
            times = {f: [] for f in FORMS}
            for _ in range(args.repeats):  # interleaved, so a load change hits every form alike
                for f, s in sessions.items():
                    times[f].append(time_calls(s, x, args.iters))
            med = {f: statistics.median(v) for f, v in times.items()}
            rows.append({"layer": shape_name, "N": N, "K": K, "tokens": tokens, "outliers": qt.outlier_count,
                         "outlier_share": round(qt.outlier_count / (N * K), 5), "outlier_columns": used,
                         "onnx_outlier_bits_per_param": stored, "ms": {f: round(v, 4) for f, v in med.items()},
                         "ratio_to_none": {f: round(med[f] / med["none"], 3) for f in FORMS},
                         "loadavg": [load0, harness.loadavg()]})
            print(json.dumps(rows[-1]), flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    data = {"machine": harness.machine(), "versions": harness.versions("onnxruntime"), "repeats": args.repeats,
            "iters": args.iters, "rows": rows}
    harness.atomic_write(out / "spqr_outliers.json", json.dumps(data, indent=1).encode())
    md = ["# SpQR outliers in ONNX Runtime (one layer, CPU, 1 thread; median ms per call, ratio to no outliers)", "",
          f"Machine: {data['machine'].get('cpu')}; load per row in the JSON.", "",
          "| layer | tokens | outliers (columns) | none ms | scatter | columns | dense | ONNX bits/param of the outliers "
          "(scatter / columns / dense, fp32 graph) |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        md.append(f"| {r['layer']} | {r['tokens']} | {r['outliers']} ({r['outlier_columns']}/{r['K']}) | "
                  f"{r['ms']['none']:.3f} | " + " | ".join(f"{r['ms'][f]:.3f} ({r['ratio_to_none'][f]:.2f}x)"
                                                       for f in FORMS[1:])
                  + " | " + " / ".join(f"{r['onnx_outlier_bits_per_param'][f]:g}" for f in FORMS[1:]) + " |")
    harness.atomic_write(out / "spqr_outliers.md", ("\n".join(md) + "\n").encode())
    print(f"wrote {out / 'spqr_outliers.json'} and .md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
