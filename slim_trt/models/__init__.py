"""Source models: resolve a MODEL argument (a folder, a GGUF file, the embedded Gemma 3 270M), load it, and
refuse broken ones (weights that do not match their config, NaN/Inf, pickled weights).

source.py   resolve, load_model, the source-weight checks
shards.py   where each tensor is stored (safetensors shards, tied aliases) and the finite-weights check

May import: checkpoint (to refuse a checkpoint given as a source) and the root helpers.
"""
