"""`slim-trt`: a thin command line over the public Python API.

Each subcommand lives in its own module with a `register(subparsers)` function; modules import heavy
libraries only inside the function that runs the command, so a missing optional backend (TensorRT,
tritonserver) breaks only its own subcommand and `--help` stays fast.

The top floor: may import every room below it.
"""
from __future__ import annotations

import argparse
import importlib
import sys

from ..errors import SlimError

# Order is the order shown by `slim-trt --help`.
COMMANDS = ("compress", "info", "eval", "finetune", "demo", "export", "verify", "generate", "lint", "build", "bench",
            "deploy", "serve")


def build_parser() -> argparse.ArgumentParser:
    from ..config import DEFAULT_PRESET, recipe_label
    from .recipes import default_recipe

    parser = argparse.ArgumentParser(
        prog="slim-trt",
        description=(
            "Compress a Hugging Face causal LM one-shot (quantize, prune along K, fit low-rank adapters: SLiM and "
            f"beyond; by default --preset {DEFAULT_PRESET}, {recipe_label(default_recipe())}), export it to ONNX with Q/DQ nodes, verify it in ONNX Runtime, "
            "lint it for TensorRT, build TensorRT engines on sparse tensor cores and deploy them behind Triton."
        ),
        epilog="Typical flow: slim-trt compress MODEL -o ckpt/ ; slim-trt export ckpt/ -o export/NAME/ ; "
        "slim-trt verify export/NAME/model.onnx --reference ckpt/ ; slim-trt lint export/NAME/model.onnx",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMANDS:
        try:
            module = importlib.import_module(f"{__name__}.{name}")
        except ModuleNotFoundError as e:
            if e.name == f"{__name__}.{name}":
                continue  # subcommand not part of this build
            raise
        module.register(sub)
    return parser


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("slim-trt")
    except PackageNotFoundError:
        return "unknown"


def _quiet_libraries() -> None:
    # Our own progress bars and messages are the interface; transformers' per-file bars and advisories are noise.
    import os

    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    if "transformers" in sys.modules:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()


def main(argv: list[str] | None = None) -> int:
    watch = _InterruptWatch()
    try:
        try:
            rc = _run(argv)
        finally:
            sys.stdout.flush()  # a reader that went away shows up here at the latest (also after --help)
    except BrokenPipeError:
        # The reader of our output stopped early (`slim-trt lint ... | head`): end quietly, as cat does.
        _discard_stdout()
        return 141  # 128 + SIGPIPE, what a shell reports for a writer whose reader went away
    except KeyboardInterrupt:  # Ctrl-C outside a command's own run (while modules import, while parsing)
        rc = _interrupted(argv)
    finally:
        watch.restore()
    if watch.seen and rc == 0:
        # A Ctrl-C that raised inside a finalizer is printed as "Exception ignored" and lost: the run went on,
        # but the user asked it to stop, so it does not end as a success.
        rc = _interrupted(argv)
    return rc


class _InterruptWatch:
    """Remembers that SIGINT arrived (and still raises KeyboardInterrupt as Python's own handler does)."""

    def __init__(self):
        import signal
        import threading

        self.seen = False
        self._previous = None
        if threading.current_thread() is threading.main_thread() and \
                signal.getsignal(signal.SIGINT) is signal.default_int_handler:  # not where Ctrl-C is ignored
            self._previous = signal.signal(signal.SIGINT, self._handle)

    def _handle(self, signum, frame):
        self.seen = True
        raise KeyboardInterrupt

    def restore(self) -> None:
        import signal

        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)
            self._previous = None


def _interrupted(argv) -> int:
    words = sys.argv[1:] if argv is None else argv
    command = next((w for w in words if w in COMMANDS), None)
    print(f"slim-trt{' ' + command if command else ''}: interrupted", file=sys.stderr)
    return 130


def _run(argv: list[str] | None) -> int:
    _quiet_libraries()
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        rc = args.func(args)
    except SlimError as e:
        print(f"slim-trt {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return _interrupted([args.command])
    return int(rc or 0)


def _discard_stdout() -> None:
    """Point stdout at /dev/null, so that the interpreter's final flush of what is still buffered does not raise
    BrokenPipeError again on the way out."""
    import os

    try:
        fd = sys.stdout.fileno()
    except (AttributeError, OSError, ValueError):
        return  # not a real file (captured in a test)
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, fd)
    os.close(devnull)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
