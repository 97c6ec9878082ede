"""`slim-trt deploy triton EXPORT_DIR -o REPO`: a Triton model repository (`deploy jetson`: deploy_jetson.py)."""
from __future__ import annotations

import argparse
import shlex


def register(subparsers) -> None:
    parser = subparsers.add_parser("deploy", help="write a serving bundle for an export (Triton model repository, "
                                                         "Jetson bundle)",
                                   description="Write a serving bundle for an export.")
    targets = parser.add_subparsers(dest="target", metavar="TARGET", required=True)
    triton = targets.add_parser(
        "triton", help="Triton Inference Server model repository",
        description="Write a Triton model repository for EXPORT_DIR: NAME_onnx and NAME_generate (python backend, "
                    "run anywhere), NAME_ort (onnxruntime backend) and, with --engine, NAME_trt (tensorrt backend).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    triton.add_argument("export_dir", metavar="EXPORT_DIR", help="folder written by `slim-trt export`")
    triton.add_argument("-o", "--output", metavar="REPO", required=True, help="repository folder to create")
    triton.add_argument("--engine", metavar="NAME.plan", help="TensorRT engine built from this export")
    triton.add_argument("--name", default="slim", help="model name prefix: NAME_onnx, NAME_generate, NAME_ort, "
                                                       "NAME_trt")
    triton.add_argument("--device", choices=("cpu", "gpu"), default="cpu",
                        help="instance group of the onnxruntime model")
    triton.add_argument("--instances", type=int, default=1, help="instances of each model")
    triton.add_argument("--max-batch-size", type=int, default=8,
                        help="dynamic batching of the decoder models (0 = off)")
    triton.add_argument("--trt-accelerator", action="store_true",
                        help="TensorRT execution accelerator in the onnxruntime model (needs --device gpu)")
    triton.add_argument("--ort-op-library", metavar="SO", help="native ONNX Runtime library with LowRankAdd "
                                                              "(for a plugin export on the onnxruntime backend)")
    triton.add_argument("--trt-plugin-library", metavar="SO", help="TensorRT plugin library with LowRankAdd "
                                                                  "(for an engine of a plugin export)")
    triton.add_argument("--generate-via", choices=("local", "onnx", "ort", "trt"), default="local",
                        help="decoder of NAME_generate: ONNX Runtime in its own process, or the NAME_onnx / "
                             "NAME_ort / NAME_trt model")
    triton.add_argument("--intra-op-threads", type=int, default=0,
                        help="ONNX Runtime threads per python-backend instance (0 = ORT's default)")
    triton.add_argument("--max-new-tokens", type=int, default=32,
                        help="NAME_generate's default when a request does not say")
    triton.add_argument("--force", action="store_true", help="replace REPO if it exists")
    triton.set_defaults(func=run)
    from . import deploy_jetson

    deploy_jetson.register(targets)


def run(args) -> int:
    from ..outputs import check_outputs
    from ..triton import DeployConfig, deploy

    check_outputs(folders={"-o": args.output}, inputs=[args.export_dir, args.engine, args.ort_op_library,
                                                       args.trt_plugin_library], force=args.force)
    config = DeployConfig(name=args.name, engine=args.engine, device=args.device, instances=args.instances,
                          max_batch_size=args.max_batch_size, trt_accelerator=args.trt_accelerator,
                          ort_op_library=args.ort_op_library, trt_plugin_library=args.trt_plugin_library,
                          generate_via=args.generate_via, intra_op_threads=args.intra_op_threads,
                          default_max_new_tokens=args.max_new_tokens, overwrite=args.force)
    result = deploy(args.export_dir, args.output, config)
    print(f"wrote Triton model repository {result.repo}")
    width = max(map(len, list(result.models) + list(result.skipped)))
    for model, backend in result.models.items():
        print(f"  {model:<{width}}  {backend}")
    for model, reason in result.skipped.items():
        print(f"  {model:<{width}}  not generated: {reason}")
    # Quoted for the shell, so that the line can be pasted as it is even when the path has a space.
    print(f"serve it: slim-trt serve {shlex.quote(str(result.repo))}   (commands for clients: "
          f"{shlex.quote(str(result.repo / 'README.md'))})")
    return 0
