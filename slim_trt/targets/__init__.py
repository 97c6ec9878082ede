"""Target profiles: what each deployment GPU supports (precisions, 2:4 sparsity, TensorRT versions, memory,
shapes), as JSON data in profiles/, and the names of the linter's TensorRT tables.

profile.py   TargetProfile, load_target, list_targets, target_for_gpu, GpuInfo

Low in the house: read by the linter, the builder, the Jetson bundle and the CLI alike. May import only the root
helpers.
"""
