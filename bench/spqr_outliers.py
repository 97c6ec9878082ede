"""What SpQR costs in ONNX Runtime: one compressed linear y = x W_q^T + x O^T exported in each zero-point and outlier
form, on layer shapes of
Gemma 3 270M and a tiny model, timed in one ONNX Runtime session each (CPU, one thread, fp32 graph as the ORT
rewrite runs it, the export's session config: the UINT4 zero-point DequantizeLinear -> MatMul becomes
MatMulNBits). Decode (1 token) and prefill (512 tokens); median of `--repeats` runs of `--iters` calls; the
ratio to the no-outlier graph is what to read (the machine is shared: its load is recorded per row).

Forms: dq = DequantizeLinear with UINT4 zero points (ORT's MatMulNBits), fold = signed INT4 codes + the offset term
(TensorRT-parsable); outliers none / columns / scatter / dense (slim_trt.exporter.linear.emit_outliers).

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
# (zero points, outliers): the base alone in both zero-point forms, then every outlier form on the dq base, and the
# TensorRT-parsable combination (fold + columns).
FORMS = (("dq", "none"), ("fold", "none"), ("dq", "columns"), ("dq", "scatter"), ("dq", "dense"), ("fold", "columns"))


def label(form) -> str:
    return "+".join(form)


def spqr_layer(N: int, K: int, seed: int = 0):
    from slim_trt.algorithms.spqr import spqr_quantize

    g = torch.Generator().manual_seed(seed)
    W = torch.randn(N, K, generator=g) * 0.02
    channel = torch.distributions.StudentT(2.0).sample((K,)).abs() + 0.1  # heavy-tailed input channels
    X = torch.randn(2048, K, generator=g) * channel
    H = 2 * X.T @ X / X.shape[0]
    return spqr_quantize(W, H, 4, outlier_share=0.01)


def layer_graph(qt, form):
    from onnx import TensorProto

    from slim_trt.exporter.graph import GraphBuilder
    from slim_trt.exporter.linear import dequantized, emit_outliers, symmetric_codes, zero_point_offset
    from slim_trt.exporter.options import IR_VERSION, OPSET

    zero_points, outliers = form
    N, K = qt.shape
    b = GraphBuilder("fp32")
    x = b.add_input("x", TensorProto.FLOAT, ["T", K])
    w = dequantized(b, symmetric_codes(qt) if zero_points == "fold" else qt, "layer", transpose=True)
    y = b.op("MatMul", [x, w], name="layer")
    if zero_points == "fold":
        y = b.op("Add", [y, zero_point_offset(b, x, qt, "layer")], name="layer")
    if outliers != "none":
        y = emit_outliers(b, x, y, qt.outliers, "layer", outliers)
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
        # (The zero points' DQ zero_point tensor, or the fold's offset matrix, count as extra too.)
        stored = {label(f): round(8 * sum(len(t.raw_data) for t in g.graph.initializer
                                          if ".outliers" in t.name or "zero" in t.name) / (N * K), 3)
                  for f, g in graphs.items()}
        for tokens in (1, 512):
            x = np.random.default_rng(0).standard_normal((tokens, K)).astype(np.float32)
            for f, s in sessions.items():  # every form computes the same layer (the "none" forms lack O)
                want = x @ (ref if f[1] != "none" else qt.base_dequantize().numpy()).T
                err = float(np.abs(s.run(None, {"x": x})[0] - want).max())
                assert err < 1e-3 * max(1.0, float(np.abs(want).max())), (shape_name, f, err)
            load0 = harness.loadavg()
            times = {f: [] for f in FORMS}
            for _ in range(args.repeats):  # interleaved, so a load change hits every form alike
                for f, s in sessions.items():
                    times[f].append(time_calls(s, x, args.iters))
            med = {label(f): statistics.median(v) for f, v in times.items()}
            base = med["dq+none"]
            rows.append({"layer": shape_name, "N": N, "K": K, "tokens": tokens, "outliers": qt.outlier_count,
                         "outlier_share": round(qt.outlier_count / (N * K), 5), "outlier_columns": used,
                         "onnx_extra_bits_per_param": stored, "ms": {f: round(v, 4) for f, v in med.items()},
                         "ratio_to_dq_none": {f: round(v / base, 3) for f, v in med.items()},
                         "loadavg": [load0, harness.loadavg()]})
            print(json.dumps(rows[-1]), flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    data = {"machine": harness.machine(), "versions": harness.versions("onnxruntime"), "repeats": args.repeats,
            "iters": args.iters, "rows": rows}
    harness.atomic_write(out / "spqr_outliers.json", json.dumps(data, indent=1).encode())
    names = [label(f) for f in FORMS]
    md = ["# SpQR in ONNX Runtime: zero-point and outlier forms of one layer", "",
          "CPU, 1 thread, fp32 graph (the export's ORT session config); median ms per call and the ratio to the "
          "zero-point DequantizeLinear base without outliers (dq+none). Extra bits/param: what the zero points and "
          f"outliers add to the ONNX file in each form (fp32 values here; an fp16 export halves the values). Machine: "
          f"{data['machine'].get('cpu')}, load per row in the JSON.", "",
          "| layer | tokens | outliers (columns) | " + " | ".join(names) + " |",
          "|---|---|---|" + "---|" * len(names)]
    for r in rows:
        md.append(f"| {r['layer']} | {r['tokens']} | {r['outliers']} ({r['outlier_columns']}/{r['K']}) | "
                  + " | ".join(f"{r['ms'][n]:.3f} ({r['ratio_to_dq_none'][n]:.2f}x)" for n in names) + " |")
    r = rows[-1]
    md += ["", "Extra bits/param in the file (last layer): "
           + ", ".join(f"{n} {r['onnx_extra_bits_per_param'][n]:g}" for n in names)]
    harness.atomic_write(out / "spqr_outliers.md", ("\n".join(md) + "\n").encode())
    print(f"wrote {out / 'spqr_outliers.json'} and .md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
