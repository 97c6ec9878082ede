"""bench/speed.py worker for the llama.cpp peer: the Q4_K_M GGUF through llama-cpp-python's low-level API (the
C API of the llama.cpp it vendors: llama_batch + llama_decode, as llama.cpp's own batched example drives it), so
batch 4 runs as 4 sequences of one context, and every prompt position's logits are available for perplexity.

Runs in bench/.venv-llamacpp (bench/peers/requirements-llamacpp.txt; llama-cpp-python built from its sdist here).
Protocol: bench/peers/_speed.py.
"""
from __future__ import annotations

import ctypes
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _speed  # noqa: E402

BATCH_SEQ_CTX = 512  # KV cells per sequence of the batched context (prompt 16 + 129 new tokens fit)


class LlamaCpp(_speed.Engine):
    max_batch = 4

    def __init__(self, req: dict):
        import llama_cpp as lc

        self.lc = lc
        self.threads = int(req["threads"])
        lc.llama_backend_init()
        mparams = lc.llama_model_default_params()
        self.model = lc.llama_model_load_from_file(str(req["model"]).encode(), mparams)
        if not self.model:
            raise RuntimeError(f"llama.cpp could not load {req['model']}")
        self.vocab = lc.llama_model_get_vocab(self.model)
        self.n_vocab = lc.llama_vocab_n_tokens(self.vocab)
        self.contexts: dict[tuple[int, int], object] = {}
        longest = max(len(req["prompt"]), max(len(p) for p in req["decode_prompts"])) + int(req["new_tokens"]) + 2
        self.seq_ctx = max(BATCH_SEQ_CTX, longest)

    def _context(self, n_seq: int, n_batch: int):
        """One context per (sequences, batch) shape, made before any timing starts and reused."""
        key = (n_seq, n_batch)
        if key not in self.contexts:
            lc = self.lc
            p = lc.llama_context_default_params()
            p.n_ctx = self.seq_ctx * n_seq
            p.n_batch = p.n_ubatch = n_batch
            p.n_seq_max = n_seq
            p.n_threads = p.n_threads_batch = self.threads
            ctx = lc.llama_init_from_model(self.model, p)
            if not ctx:
                raise RuntimeError(f"llama.cpp could not make a context for {n_seq} sequences")
            self.contexts[key] = ctx
        return self.contexts[key]

    def _clear(self, ctx) -> None:
        self.lc.llama_memory_clear(self.lc.llama_get_memory(ctx), True)

    def _decode(self, ctx, seqs: list[list[int]], start: list[int], all_logits: bool) -> None:
        """One llama_decode of several sequences' tokens; logits for each sequence's last token (or every one)."""
        lc = self.lc
        n = sum(len(s) for s in seqs)
        batch = lc.llama_batch_init(n, 0, len(seqs))
        try:
            i = 0
            for sid, (toks, pos0) in enumerate(zip(seqs, start)):
                for j, t in enumerate(toks):
                    batch.token[i] = int(t)
                    batch.pos[i] = pos0 + j
                    batch.n_seq_id[i] = 1
                    batch.seq_id[i][0] = sid
                    batch.logits[i] = 1 if all_logits or j == len(toks) - 1 else 0
                    i += 1
            batch.n_tokens = n
            rc = lc.llama_decode(ctx, batch)
            if rc != 0:
                raise RuntimeError(f"llama_decode returned {rc}")
        finally:
            lc.llama_batch_free(batch)

    def _logits(self, ctx, i: int) -> np.ndarray:
        ptr = self.lc.llama_get_logits_ith(ctx, i)
        return np.ctypeslib.as_array(ctypes.cast(ptr, ctypes.POINTER(ctypes.c_float)), shape=(self.n_vocab,))

    def generate(self, ids: np.ndarray, new_tokens: int) -> dict:
        batch, n = ids.shape
        ctx = self._context(batch, max(n * batch, 512))
        self._clear(ctx)
        timer = _speed.StepTimer()
        self._decode(ctx, [list(r) for r in ids], [0] * batch, all_logits=False)
        # each sequence's logits row is its last token's, in batch order
        tok = [int(self._logits(ctx, (k + 1) * n - 1).argmax()) for k in range(batch)]
        out = [tok]
        timer.first()
        for step in range(new_tokens):
            self._decode(ctx, [[t] for t in tok], [n + step] * batch, all_logits=True)
            tok = [int(self._logits(ctx, k).argmax()) for k in range(batch)]
            out.append(tok)
        timer.done()
        return timer.result(np.asarray(out).T.tolist())

    def window_logits(self, ids: np.ndarray) -> np.ndarray:
        ctx = self._context(1, max(len(ids), 512))
        self._clear(ctx)
        self._decode(ctx, [list(ids)], [0], all_logits=True)
        ptr = self.lc.llama_get_logits(ctx)
        arr = np.ctypeslib.as_array(ctypes.cast(ptr, ctypes.POINTER(ctypes.c_float)), shape=(len(ids), self.n_vocab))
        return arr.copy()

    def versions(self) -> dict:
        import importlib.metadata as md

        return {"llama-cpp-python": md.version("llama-cpp-python"), "intra_op_threads": self.threads,
                "system_info": self.lc.llama_print_system_info().decode(errors="replace").strip()}


if __name__ == "__main__":
    _speed.main(LlamaCpp)
