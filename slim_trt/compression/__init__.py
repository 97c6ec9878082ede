"""Compression: a Hugging Face causal LM in, a compressed checkpoint out (SLiM and the methods beside it).

compressor.py   compress() / compress_model(): the one-shot pipeline, block by block, resumable
calibration/    the calibration runner (hooks, Hessians, activation statistics), resume state, SmoothQuant,
                the MLP channel permutation, where each family keeps its decoder blocks
streaming.py    compression of a model larger than host memory (one block read at a time)
finetune.py     adapter fine-tuning (SLiM's recipe: only L and R train)

May import: algorithms, checkpoint, models, data, verification (perplexity), and the root helpers. The tensor
math lives in slim_trt.algorithms (pure functions); this room owns the hooks, loops and I/O around it.
"""
