"""Serve an export behind Triton Inference Server.

    deploy(export_dir, repo, **options) -> DeployResult     write a Triton model repository (DeployConfig fields)
    TritonServer(repo, http_port=0, grpc_port=0)            a real tritonserver on loopback (context manager)
    find_tritonserver()                                     where the binary is, or MissingDependencyError
    local_generate(export_dir, prompt, max_new_tokens)      the same decode loop, in this process (the reference)

Client helpers for the generated models are in slim_trt.triton.client (needs tritonclient).

May import: runtime (the decode loop the models run, the export gate) and the root helpers.
"""
from __future__ import annotations

from pathlib import Path

from ..runtime.export_folder import ExportInfo, read_export
from .repository import DeployConfig, DeployResult, deploy, read_repository
from ..runtime.decoder import RequestError, Sampling
from .server import ServerError, TritonInstall, TritonServer, find_tritonserver

__all__ = ["DeployConfig", "DeployResult", "ExportInfo", "RequestError", "Sampling", "ServerError",
           "TritonInstall", "TritonServer", "deploy", "find_tritonserver", "local_generate", "read_export",
           "read_repository"]


def local_generate(export_dir: str | Path, prompt: str, max_new_tokens: int = 32,
                   sampling: Sampling | None = None, threads: int = 0) -> tuple[str, list[int]]:
    """Generate with ONNX Runtime in this process, exactly as the NAME_generate model does in the server."""
    from ..runtime import decoder as runtime

    info = read_export(export_dir)
    if info.tokenizer_dir is None:
        from ..errors import SlimError

        raise SlimError(f"{export_dir} has no tokenizer folder: re-export with the tokenizer")
    decoder = runtime.OnnxDecoder(info.model_path, info.spec, threads)
    text, gen = runtime.generate_text(decoder, runtime.load_tokenizer(info.tokenizer_dir), prompt,
                                      max_new_tokens, sampling or Sampling())
    return text, gen.token_ids
