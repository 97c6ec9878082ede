"""The accuracy benchmark's report: what the results JSON's rows add up to (the gap SLiM-LoRA closes, issue 13's
W8A8 goals, the best row of each class), rendered as Markdown and a PNG, and the results file that holds them.
Everything here reads the JSON only: re-rendering a report runs nothing.
"""
from __future__ import annotations

import json
from pathlib import Path

import harness
from accuracy_rows import OUR_METHOD, PEERS, ROWS, Row, same_config
from harness import fmt as _fmt

def gap_closed(rows: dict) -> dict:
    """(ppl_sparsegpt_gptq - ppl_slim) / (ppl_sparsegpt_gptq - ppl_dense), for each SLiM-LoRA 2:4 4-bit row."""
    def ppl(key):
        r = rows.get(key)
        return r["perplexity"] if r and r.get("status") == "ok" else None

    dense, sgpt = ppl("1-dense"), ppl("4-sparsegpt-gptq")
    out = {"formula": "(ppl_sparsegpt_gptq - ppl_slim) / (ppl_sparsegpt_gptq - ppl_dense)",
           "dense_perplexity": dense, "sparsegpt_gptq_perplexity": sgpt}
    for key in ("7-slim-lora", "8-slim-lora-q4-adapters"):
        p = ppl(key)
        out[key] = (None if None in (dense, sgpt, p) or sgpt == dense else round((sgpt - p) / (sgpt - dense), 4))
    slim = ppl("7-slim-lora")
    out["slim_lora_beats"] = {k: (None if slim is None or ppl(k) is None else slim < ppl(k))
                              for k in ("4-sparsegpt-gptq", "11-modelopt", "12-llmcompressor")}
    return out


# Issue 13's goals are judged on the trt-int8-sparse preset's recipe, which smooths (row 31; row 59 is the same
# without 2:4 at the LRC paper's rank 0.1); rows 30 and 37 are those recipes without SmoothQuant.
W8A8_GOAL_ROWS = (1, 27, 31, 38, 59)


def w8a8_analysis(rows: dict) -> dict:
    """Issue 13's goals and the LRC paper's claim, from the W8A8 rows (None where a row is missing).

    *_over_*: perplexity ratios; *_smooth: the same recipe with SmoothQuant alpha 0.5. lrc_gap_closed_*: the
    fraction of the W8A8-without-correction-to-reference gap that LRC adapters close (the paper: > 50% at rank
    0.1), hlora_*: the same for weight-only adapters. The goals use the smoothed rows (the preset's recipe)."""
    def ppl(number):
        key = next((k for k in rows if k.split("-", 1)[0] == str(number)), None)
        r = rows.get(key)
        return r["perplexity"] if r and r.get("status") == "ok" else None

    def ratio(a, b):
        return None if a is None or b is None else round(a / b, 4)

    def closed(none, corrected, ref):
        if None in (none, corrected, ref) or none == ref:
            return None
        return round((none - corrected) / (none - ref), 4)

    dense, w8a16, d_w8 = ppl(1), ppl(27), ppl(32)
    out = {"dense_w8a16_over_dense": ratio(d_w8, dense)}
    # (suffix, 2:4 none / weight-only / LRC rows, dense none / weight-only / LRC rows)
    for sfx, (s_none, s_hl, s_lrc), (d_none, d_hl, d_lrc) in (("", (28, 29, 30), (33, 36, 37)),
                                                              ("_smooth", (61, 62, 31), (38, 60, 59))):
        out.update({
            f"sparse_none_over_w8a16{sfx}": ratio(ppl(s_none), w8a16),
            f"sparse_hlora_over_w8a16{sfx}": ratio(ppl(s_hl), w8a16),
            f"sparse_lrc_over_w8a16{sfx}": ratio(ppl(s_lrc), w8a16),
            f"sparse_lrc_over_dense{sfx}": ratio(ppl(s_lrc), dense),
            f"sparse_lrc_gap_closed_vs_w8a16{sfx}": closed(ppl(s_none), ppl(s_lrc), w8a16),
            f"dense_none_over_dense{sfx}": ratio(ppl(d_none), dense),
            f"dense_hlora_over_dense{sfx}": ratio(ppl(d_hl), dense),
            f"dense_lrc_over_dense{sfx}": ratio(ppl(d_lrc), dense),
            # the paper's claim at rank 0.1: gap to the float model, and to the W8A16 model (the activation part)
            f"lrc_gap_closed_vs_dense{sfx}": closed(ppl(d_none), ppl(d_lrc), dense),
            f"lrc_gap_closed_vs_w8a16{sfx}": closed(ppl(d_none), ppl(d_lrc), d_w8),
            f"hlora_gap_closed_vs_dense{sfx}": closed(ppl(d_none), ppl(d_hl), dense),
        })

    def judged(a, b, ok):  # on the unrounded ratio (row 31 is 4.998% over row 27: 1.0500 once rounded)
        return None if a is None or b is None else ok(a / b)

    goals = {"sparse_lrc_within_5pct_of_w8a16": judged(ppl(31), w8a16, lambda v: v <= 1.05),
             "sparse_lrc_at_most_1.35x_dense": judged(ppl(31), dense, lambda v: v <= 1.35),
             "dense_lrc_within_3pct_of_dense": judged(ppl(59), dense, lambda v: v <= 1.03),
             "lrc_closes_over_half_at_rank_0.1": (None if out["lrc_gap_closed_vs_dense_smooth"] is None
                                                  else out["lrc_gap_closed_vs_dense_smooth"] > 0.5)}
    return {**out, "goals": goals}


BUDGET_BITS = 4.5  # issue 7: bits per parameter with adapters, averaged over the compressed linears
# Issue 23: the reference a user who does not need 2:4 would pick (dense INT4 GPTQ g128, and with adapters within
# 4.5 bits: `--preset int4-dense`), printed beside best_one_shot.
DENSE_INT4_REFERENCE_ROWS = (41, 42)
# Issue 23: Model Optimizer on the defaults' recipe (SparseGPT 2:4 + INT8 SmoothQuant, W8A8), which best_one_shot
# must be ahead of.
W8A8_PEER_ROWS = (71,)
# Issue 24: Model Optimizer on the FP8 2:4 recipe (SparseGPT 2:4 + FP8_DEFAULT_CFG), printed beside best_one_shot_fp8.
FP8_PEER_ROWS = (72,)


def best_rows(rows: dict) -> dict:
    """The best row of each class, None when no row qualifies (our one-shot rows, no outlier tables):

    best_one_shot / best_finetuned (issue 23): the lowest perplexity among the 2:4 rows whose GEMMs TensorRT's
    sparse INT8 tensor cores run (INT8 weights x INT8 activations, the defaults' class), without / with adapter
    fine-tuning. INT8 2:4 stores 5 bits/param, so no bits budget applies.
    best_one_shot_2to4 / best_finetuned_2to4: the same among the 2:4 INT4 weight-only rows within BUDGET_BITS
    (adapters counted; what `--preset slim-2to4` follows).
    dense_int4_reference: rows 41 and 42 (dense INT4, `--preset int4-dense` is row 42), the reference a user would
    otherwise pick, printed beside best_one_shot.
    best_one_shot_fp8 (issue 24): the same among the FP8 E4M3 2:4 rows (Hopper, Ada, Jetson Thor), kept apart
    from best_one_shot because the INT8 GPUs (Ampere, Orin) cannot run them.
    w8a8_peer: row 71, Model Optimizer's W8A8 2:4 on the same recipe; best_one_shot_ahead_of_w8a8_peer: whether
    best_one_shot's perplexity is lower (None until both are measured).
    SpQR rows are never candidates: their fp16 outlier tables cost 1.2-12.9x a layer's time at run time
    (bench/results/spqr_outliers.md)."""
    def kind(c: dict) -> str | None:
        if c.get("sparsity") != "2:4" or c.get("quantizer") == "spqr":
            return None
        if c.get("bits") == 8 and c.get("act_bits") == 8:  # FP8 x FP8 runs on other tensor cores (issue 24)
            return "fp8-2to4" if c.get("weight_format") == "fp8" else "w8a8-2to4"
        if c.get("bits") == 4 and not c.get("act_bits"):
            return "w4a16-2to4"
        return None

    def qualifies(r: dict, tuned: bool, cls: str) -> bool:
        c = r.get("config") or {}
        return (r.get("status") == "ok" and c.get("method") == OUR_METHOD and kind(c) == cls
                and ("finetune" in c) == tuned
                and (cls != "w4a16-2to4" or r["bits_per_param_with_adapters"] <= BUDGET_BITS))

    out = {"best_rule": "best_one_shot: lowest perplexity among slim-trt one-shot 2:4 rows that TensorRT's sparse "
                        "INT8 tensor cores run (INT8 weights x INT8 activations: the defaults' class), no outlier "
                        "table; best_finetuned: the same with adapter fine-tuning; *_2to4: among 2:4 INT4 "
                        f"weight-only rows at <= {BUDGET_BITS} bits/param with adapters; best_one_shot_fp8: among "
                        f"the FP8 2:4 rows (Hopper, Ada, Thor); dense_int4_reference: "
                        f"rows {', '.join(map(str, DENSE_INT4_REFERENCE_ROWS))}, the dense INT4 recipes a user "
                        f"would otherwise pick"}
    for name, tuned, cls in (("best_one_shot", False, "w8a8-2to4"), ("best_finetuned", True, "w8a8-2to4"),
                             ("best_one_shot_2to4", False, "w4a16-2to4"), ("best_finetuned_2to4", True, "w4a16-2to4"),
                             ("best_one_shot_fp8", False, "fp8-2to4")):
        cands = [(r["perplexity"], k) for k, r in rows.items() if qualifies(r, tuned, cls)]
        out[name] = min(cands)[1] if cands else None
    out["dense_int4_reference"] = [k for k in rows if k.split("-", 1)[0] in map(str, DENSE_INT4_REFERENCE_ROWS)
                                   and rows[k].get("status") == "ok"]
    for cls, best, peer_rows in (("w8a8", "best_one_shot", W8A8_PEER_ROWS), ("fp8", "best_one_shot_fp8", FP8_PEER_ROWS)):
        peers = out[f"{cls}_peer"] = [k for k in rows if k.split("-", 1)[0] in map(str, peer_rows)
                                      and rows[k].get("status") == "ok"]
        out[f"{best}_ahead_of_{cls}_peer"] = (None if out[best] is None or not peers else
                                              all(rows[out[best]]["perplexity"] < rows[k]["perplexity"] for k in peers))
    return out


def row_load(r: dict) -> str:
    """The 1-minute load average at the row's start and end ('-' for rows measured before it was recorded): the
    compression seconds of rows measured beside other jobs are not comparable with rows run alone."""
    a, b = r.get("loadavg_start"), r.get("loadavg_end")
    return "-" if a is None or b is None else f"{a[0]:.1f}-{b[0]:.1f}"


def derive(results: dict) -> None:
    """Fill the fields computed from several rows, in place: each row's ratio to dense, gap_closed, w8a8 and the
    best rows."""
    rows = results["rows"]
    dense = rows.get("1-dense", {}).get("perplexity")
    for r in rows.values():  # the dense row may finish after others on a partial re-run
        if r.get("status") == "ok" and dense:
            r["ratio_to_dense"] = round(r["perplexity"] / dense, 4)
    results["gap_closed"] = gap_closed(rows)
    results["w8a8"] = w8a8_analysis(rows)
    results.update(best_rows(rows))


def markdown(results: dict) -> str:
    s = results["settings"]
    lines = [f"# Accuracy: {results['model']}", "",
             (f"WikiText-2 test perplexity over {results.get('eval_windows', '?')} windows x {s['seqlen']} tokens "
             f"({results.get('eval_tokens', '?')} predicted tokens); calibration {s['nsamples']} x {s['seqlen']} "
             f"tokens of WikiText-2 valid, seed {s['seed']}. Top-1 = next-token agreement with the dense model. "
             f"Bits per parameter count the compressed linear layers only (weights + 2:4 index + 16-bit scales; "
             f"'+ad.' adds the adapters). Peak RSS: the benchmark process during that row's compression (peers: "
             f"the peer's own process)."), "",
             "| # | method | PPL | PPL / dense | top-1 | bits/param | + ad. | compress s | load | peak RSS GB | status |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for row in ROWS:
        r = results["rows"].get(row.key)
        if r is None:
            continue
        status = r["status"] if r["status"] == "ok" else f"{r['status']}: {r.get('error', '')[:120]}"
        if r.get("pattern_check") and r["status"] == "ok":
            pc = r["pattern_check"]
            shape = "2:4" if pc["is_2_4"] else f"NOT 2:4: {pc['nm_violations']} groups of 4 with > 2 non-zeros"
            gs = PEERS.get(row.peer, {}).get("group_size", 128)
            status += f" ({shape}; max levels per {'output channel' if gs == -1 else f'{gs}-group'} " \
                      f"{pc['max_levels_per_group']})"
        lines.append(f"| {row.number} | {row.label} | {_fmt(r.get('perplexity'))} | {_fmt(r.get('ratio_to_dense'), 3)} "
                     f"| {_fmt(r.get('top1_agreement'), 3)} | {_fmt(r.get('bits_per_param'), 3)} "
                     f"| {_fmt(r.get('bits_per_param_with_adapters'), 3)} | {_fmt(r.get('compress_seconds'), 0)} "
                     f"| {row_load(r)} | {_fmt(r.get('peak_rss_gb'), 2)} | {status.replace('|', '/')} |")
    g = results.get("gap_closed", {})
    if g.get("7-slim-lora") is not None:
        lines += ["", f"Gap closed by SLiM-LoRA between SparseGPT+GPTQ and dense: {g['7-slim-lora']:.1%}"
                      + (f" (4-bit adapters: {g['8-slim-lora-q4-adapters']:.1%})"
                         if g.get("8-slim-lora-q4-adapters") is not None else "") + "."]
    w = results.get("w8a8", {})
    if any(v is not None for k, v in w.items() if k != "goals"):
        shown = {k: v for k, v in w.items() if k != "goals" and v is not None}
        judged = {k: v for k, v in w["goals"].items() if v is not None}
        lines += ["", "W8A8 (issue 13): " + ", ".join(f"{k} {v}" for k, v in shown.items()) + "; goals: "
                  + (", ".join(f"{k} {'met' if v else 'missed'}" for k, v in judged.items()) if judged else
                     "none judged yet (their rows: " + ", ".join(str(n) for n in W8A8_GOAL_ROWS) + ")")
                  + "."]
    def described(key: str) -> str:
        r = results["rows"][key]
        return (f"row {key}, perplexity {r['perplexity']:.2f} (x{r['ratio_to_dense']:.3f} dense) at "
                f"{r['bits_per_param_with_adapters']:.3f} bits/param with adapters")

    if results.get("best_rule"):
        lines += ["", f"Best rows ({results['best_rule']}):"]
    for name in ("best_one_shot", "best_finetuned", "best_one_shot_2to4", "best_finetuned_2to4", "best_one_shot_fp8"):
        key = results.get(name)
        if key and key in results["rows"]:
            lines += ["", f"{name}: {described(key)}."]
        if name == "best_one_shot":
            refs = [k for k in results.get("dense_int4_reference") or [] if k in results["rows"]]
            if refs:
                lines += ["", "beside it, the dense INT4 reference a user would otherwise pick (no 2:4, weight-only "
                              "INT4 in TensorRT; `--preset int4-dense` is row 42): "
                              + "; ".join(described(k) for k in refs) + "."]
        peer = {"best_one_shot": ("w8a8", "SparseGPT 2:4 + INT8 SmoothQuant, W8A8"),
                "best_one_shot_fp8": ("fp8", "SparseGPT 2:4 + FP8_DEFAULT_CFG, FP8 E4M3")}.get(name)
        peers = [k for k in results.get(f"{peer[0]}_peer") or [] if k in results["rows"]] if peer else []
        if peers and key in results["rows"]:
            ahead = results.get(f"{name}_ahead_of_{peer[0]}_peer")
            lines += ["", f"beside it, Model Optimizer on the same recipe ({peer[1]}, scored in its venv with its "
                          f"activations quantized): " + "; ".join(described(k) for k in peers)
                          + f"; {name} is {'ahead of' if ahead else 'behind'} it."]
    lines += ["", f"Versions: {json.dumps(results.get('versions', {}))}", ""]
    return "\n".join(lines)


def plot_png(results: dict) -> bytes | None:
    plt = harness.pyplot()
    pts = [(row, results["rows"][row.key]) for row in ROWS if row.key in results["rows"]
           and results["rows"][row.key]["status"] == "ok"]
    if not pts:
        return None
    fig, ax = plt.subplots(figsize=(10, 5), dpi=120)
    for row, r in pts:
        x, y = r["bits_per_param_with_adapters"], r["ratio_to_dense"]
        color = "tab:gray" if row.compress is None and row.peer is None else ("tab:red" if row.peer else "tab:blue")
        ax.scatter([x], [y], color=color, zorder=3)
        # numbers only beside the points (names collide where rows share a storage cost); the key is on the right
        ax.annotate(str(row.number), (x, y), textcoords="offset points", xytext=(5, 3), fontsize=8)
    key = "\n".join(f"{row.number:>2}  {row.label}" for row, _ in pts)
    fig.text(0.70, 0.5, key, fontsize=7, va="center", family="monospace")
    fig.subplots_adjust(right=0.68)
    ax.set_yscale("log")
    ax.set_xlabel("bits per parameter of the linear layers (with adapters)")
    ax.set_ylabel("perplexity / dense perplexity (log)")
    ax.set_title(f"{results['model']}: WikiText-2 perplexity ratio vs storage (blue: slim-trt, red: peers)",
                 fontsize=9)
    ax.grid(True, which="both", alpha=0.3)
    return harness.figure_png(fig)


class Results(harness.ResultsFile):
    """accuracy_<tag>.json/.md/.png; a row is done when it is stored as ok with the same recipe."""

    def __init__(self, out_dir: Path, tag: str, settings: dict, redo: bool):
        super().__init__(out_dir, "accuracy", tag, settings, redo)

    def done(self, row: Row) -> bool:
        r = self.rows.get(row.key)
        return bool(r) and r.get("status") == "ok" and same_config(r.get("config") or {}, row)

    def order(self) -> list[str]:
        return [row.key for row in ROWS]

    def derive(self) -> None:
        derive(self.data)

    def markdown(self) -> str:
        return markdown(self.data)

    def plot(self) -> bytes | None:
        return plot_png(self.data)
