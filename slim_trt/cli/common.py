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
        if "[default" in text or action.default in (None, False) or action.default is argparse.SUPPRESS:
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


def eprint(*args) -> None:
    print(*args, file=sys.stderr, flush=True)
