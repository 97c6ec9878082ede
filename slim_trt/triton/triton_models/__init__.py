"""Python-backend model files that `deploy` copies into a Triton repository as `<model>/1/model.py`.

They run inside tritonserver's python backend stub (they import `triton_python_backend_utils`, which only exists
there) and import the runtime copied beside them as `slim_runtime`; nothing here is imported by slim_trt itself.
"""
