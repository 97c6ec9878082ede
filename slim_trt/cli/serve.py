"""`slim-trt serve REPO`: run tritonserver on loopback until Ctrl-C."""
from __future__ import annotations

import argparse


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "serve", help="serve a Triton model repository on loopback",
        description="Start tritonserver on REPO bound to 127.0.0.1, wait until it is ready, print the endpoints and "
                    "serve until Ctrl-C. Uses an installed tritonserver, else the one in the nvidia-pytriton wheel "
                    "(python backend only: models of other backends are listed and not loaded).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("repo", metavar="REPO", help="model repository (from `slim-trt deploy triton`)")
    parser.add_argument("--http-port", type=int, default=8000, help="HTTP port (0 = pick a free one)")
    parser.add_argument("--grpc-port", type=int, default=8001, help="gRPC port (0 = pick a free one)")
    parser.add_argument("--models", help="comma-separated models to load (default: every model it can run)")
    parser.add_argument("--tritonserver", metavar="PATH", help="tritonserver binary to use")
    parser.add_argument("--log-file", metavar="PATH", help="server log (default: a temporary file)")
    parser.add_argument("--startup-timeout", type=float, default=180.0, help="seconds to wait for readiness")
    parser.set_defaults(func=run)


def run(args) -> int:
    import signal

    from ..triton import TritonServer
    from ..triton.server import ServerError

    from ..outputs import check_outputs

    check_outputs(files={"--log-file": args.log_file}, inputs=[args.repo])
    for port, flag in ((args.http_port, "--http-port"), (args.grpc_port, "--grpc-port")):
        if not 0 <= port < 65536:
            from ..errors import SlimError

            raise SlimError(f"bad {flag} {port}: use a port in 1..65535, or 0 to pick a free one")
    models = [m.strip() for m in args.models.split(",") if m.strip()] if args.models else None
    server = TritonServer(args.repo, http_port=args.http_port, grpc_port=args.grpc_port, models=models,
                          binary=args.tritonserver, startup_timeout=args.startup_timeout, log_path=args.log_file)

    def terminate(signum, frame):  # `kill` stops the server as cleanly as Ctrl-C
        raise KeyboardInterrupt

    # SIGINT explicitly too: a shell starts background jobs with SIGINT ignored.
    previous = {sig: signal.signal(sig, terminate) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        print(f"starting tritonserver ({server.install.source}: {server.install.binary}) on {server.repo}",
              flush=True)
        server.start()
        print(f"HTTP  http://{server.http_url}", flush=True)
        print(f"gRPC  {server.grpc_url}", flush=True)
        print(f"loaded: {', '.join(server.loaded)}", flush=True)
        for model, reason in server.skipped.items():
            print(f"not loaded: {model} ({reason})", flush=True)
        print(f"log: {server.log_path}", flush=True)
        print(f"ready (pid {server.pid}); Ctrl-C to stop", flush=True)
        code = server.wait()
        raise ServerError(f"tritonserver exited by itself with code {code}: {server.log_error()}")
    except KeyboardInterrupt:
        for sig in previous:  # a second Ctrl-C must not cut the shutdown short
            signal.signal(sig, signal.SIG_IGN)
        print("stopping tritonserver", flush=True)
        server.stop()
        print("stopped", flush=True)
        return 0
    finally:
        server.stop()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
