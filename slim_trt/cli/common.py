"""Small helpers shared by the subcommands."""
from __future__ import annotations

import argparse
import json
import sys


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Show defaults and keep the examples in descriptions as written. A help text that states its own default
    ("[default: ...]", used where the parsed default is None so that presets can tell "not given" apart) or
    whose default is None/False says nothing more."""

    def _get_help_string(self, action):
        text = action.help or ""
        # `is`, not `in (None, False)`: a default of 0 equals False and would be left out.
        if "[default" in text or action.default is None or action.default is False or \
                action.default is argparse.SUPPRESS:
            return text
        return super()._get_help_string(action)


def add_parser(sub, name: str, help: str, description: str, examples: str = ""):
    epilog = f"examples:\n{examples}" if examples else None
    return sub.add_parser(name, help=help, description=description, epilog=epilog, formatter_class=HelpFormatter)


def print_json(obj, path: str | None = None) -> None:
    text = json.dumps(obj, indent=2, default=str)
    if path and path != "-":
        with open(path, "w") as f:
            f.write(text + "\n")
    else:
        print(text)


def onnx_inputs(onnx_path) -> list:
    """An ONNX model's files as inputs of check_outputs: the model, its external data and the export sidecar
    beside it (an output may sit in the same folder, as the README's examples write --save-inputs there)."""
    from pathlib import Path

    p = Path(onnx_path)
    return [p, p.with_name(p.name + ".data"), p.with_name("slim_export.json")]


def eprint(*args) -> None:
    print(*args, file=sys.stderr, flush=True)


def range_type(flag: str, floor: int):
    """argparse type for MIN,OPT,MAX shape ranges (--batch/--seq/--past of build and deploy jetson)."""

    def parse(text: str):
        from ..errors import SlimError
        from ..trt.shapes import Range

        try:
            return Range.parse(text, flag=flag, floor=floor)
        except SlimError as e:
            raise argparse.ArgumentTypeError(str(e)) from None

    return parse


def add_shape_args(p) -> None:
    """--batch/--seq/--past (the engine's optimization profile) and --workspace-gb, as build and deploy jetson
    take them; defaults come from the target profile, fitted into the model's context."""
    p.add_argument("--batch", type=range_type("--batch", 1), metavar="MIN,OPT,MAX",
                   help="batch range (one number = fixed); default from the target profile")
    p.add_argument("--seq", type=range_type("--seq", 1), metavar="MIN,OPT,MAX",
                   help="new tokens per call (prompt length for prefill, 1 for decode)")
    p.add_argument("--past", type=range_type("--past", 0), metavar="MIN,OPT,MAX",
                   help="KV-cache length before the call; seq max + past max must fit the model's context")
    p.add_argument("--workspace-gb", type=float, default=None, metavar="GB",
                   help="builder workspace limit in GiB; default from the target profile")
