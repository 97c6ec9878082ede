"""The documentation against the code: every `slim-trt ...` line in README.md and docs/*.md goes through the CLI's
own parser (nothing is executed), so a documented flag cannot drift from the code unnoticed; and every relative
link in them points at a file (and heading) that exists.

Commands are read from fenced code blocks (line continuations joined, `$ ` prompts, env assignments, comments,
pipes, `&&` and `;` handled) and from inline code spans that start with `slim-trt ` and are not synopses (no
`[...]` or `a|b` alternatives). Placeholders (MODEL, CKPT, OUT, ...) are fine where any string is; `...` is dropped.
A placeholder given to an option that only takes certain values (`--target TARGET`) is not a drifted flag.
For `compress` lines the flags also go through the CLI's recipe step (config_from_args), which refuses flag
combinations the docs must not show as working.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import re
import shlex
from dataclasses import dataclass
from pathlib import Path

import pytest

from slim_trt.cli import build_parser
from slim_trt.errors import SlimError

REPO = Path(__file__).resolve().parents[1]

PLACEHOLDER = re.compile(r"^[A-Z][A-Z0-9_]*(\.[a-z]+)?$")  # MODEL, EXPORT_DIR, FILE.json
INVALID_VALUE = re.compile(r"invalid (?:choice|\w+ value): '([^']*)'")
ENV_ASSIGNMENT = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*=")
SEPARATORS = {"|", "||", "&&", ";", "&"}


@dataclass(frozen=True)
class DocCommand:
    path: str  # relative to the repository
    line: int  # 1-based line where the command starts
    argv: tuple[str, ...]  # the arguments after `slim-trt`
    kind: str = "block"  # "block" (a code block), "inline" (a code span in prose), "synopsis" (options listed)

    def where(self) -> str:
        return f"{self.path}:{self.line}: slim-trt {shlex.join(self.argv)}"


def doc_files() -> list[Path]:
    return [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]


def _segments(command: str) -> list[list[str]]:
    """The simple commands of one shell line: split at pipes, `&&`, `||`, `;`; comments dropped."""
    lexer = shlex.shlex(command, posix=True, punctuation_chars=True)
    lexer.whitespace_split = True
    lexer.commenters = "#"
    segments, current = [], []
    for token in lexer:
        if token in SEPARATORS:
            segments.append(current)
            current = []
        else:
            current.append(token)
    segments.append(current)
    return [s for s in segments if s]


def _slim_trt_argv(tokens: list[str]) -> tuple[str, ...] | None:
    """The arguments of a `slim-trt` call in one simple command, or None when it is another program."""
    tokens = list(tokens)
    while tokens and (tokens[0] == "$" or ENV_ASSIGNMENT.match(tokens[0])):
        tokens.pop(0)
    if not tokens or Path(tokens[0]).name != "slim-trt":
        return None
    return tuple(t for t in tokens[1:] if t not in ("...", "\u2026"))


def commands_in_text(text: str, path: str) -> list[DocCommand]:
    found: list[DocCommand] = []
    lines = text.splitlines()
    in_block, shell_block = False, False
    pending, start = "", 0
    prose: list[tuple[int, str]] = []
    for number, line in enumerate(lines, 1):
        fence = line.lstrip().startswith("```")
        if fence:
            if not in_block:
                lang = line.strip()[3:].strip().lower()
                shell_block = lang in ("", "bash", "sh", "shell", "console", "text")
            in_block = not in_block
            pending = ""
            continue
        if not in_block:
            prose.append((number, line))
            continue
        if not shell_block:
            continue
        if not pending:
            start = number
        if line.rstrip().endswith("\\"):
            pending += line.rstrip()[:-1] + " "
            continue
        command, pending = pending + line, ""
        if "slim-trt" not in command:
            continue
        try:
            segments = _segments(command)
        except ValueError:  # unbalanced quotes: not a shell line (a JSON body spread over lines)
            continue
        for tokens in segments:
            argv = _slim_trt_argv(tokens)
            if argv is not None:
                found.append(DocCommand(path, start, argv))
    # Inline code spans in prose (they may wrap onto the next line).
    joined = "\n".join(line for _, line in prose)
    offsets = [n for n, _ in prose]
    for match in re.finditer(r"`(slim-trt\s[^`]+)`", joined):
        span = " ".join(match.group(1).split())
        line = offsets[joined.count("\n", 0, match.start())]
        if re.search(r"[\[\]|]|\.\.\.|\u2026", span):
            # A synopsis (`slim-trt compress MODEL -o OUT [--preset a|b] [--[no-]stream]`): its words up to the
            # first option name the subcommand, and every option it lists must exist.
            words = tuple(w for w in span.split()[1:] if re.fullmatch(r"[a-z][a-z0-9-]*", w))
            head = words[:2]
            flags = []
            for negatable, name in re.findall(r"(?<![\w-])--(\[no-\])?([a-z][a-z0-9-]*)", span):
                flags += [f"--{name}", f"--no-{name}"] if negatable else [f"--{name}"]
            found.append(DocCommand(path, line, (*head, *flags), kind="synopsis"))
            continue
        argv = _slim_trt_argv(shlex.split(span))
        if argv:
            found.append(DocCommand(path, line, argv, kind="inline"))
    return found


def documented_commands() -> list[DocCommand]:
    return [c for p in doc_files() for c in commands_in_text(p.read_text(), str(p.relative_to(REPO)))]


def _subparser(parser, words: tuple[str, ...]):
    """The (sub)parser `words` lead to (`deploy jetson` -> the jetson parser) and the words it did not consume."""
    while words:
        choices = next((a.choices for a in parser._actions if isinstance(a, argparse._SubParsersAction)), None)
        if not choices or words[0] not in choices:
            break
        parser, words = choices[words[0]], words[1:]
    return parser, words


def flag_error(parser, argv: tuple[str, ...]) -> str | None:
    """For a command named in prose (`slim-trt lint --target TARGET`, arguments left out): its subcommand and every
    flag it names exist."""
    if not argv or PLACEHOLDER.match(argv[0].rstrip(":")):
        return None  # `slim-trt COMMAND: interrupted`: a message, not a command
    sub, _ = _subparser(parser, argv)
    if sub is parser:
        return f"no subcommand {argv[0]!r}"
    unknown = [t.split("=")[0] for t in argv if t.startswith("-") and t.split("=")[0] not in sub._option_string_actions]
    return f"{sub.prog}: no such option: {', '.join(unknown)}" if unknown else None


def check(parser, command: DocCommand) -> str | None:
    """Code blocks hold whole commands: they must parse. Prose may name a command with its arguments left out
    (`slim-trt lint --target TARGET`): a whole one must parse, a partial one must name options that exist."""
    if command.kind == "synopsis" or (command.argv and PLACEHOLDER.match(command.argv[0].rstrip(":"))):
        return flag_error(parser, command.argv)
    error = parse_error(parser, command.argv)
    if error and command.kind == "inline" and re.search(r"arguments are required|expected one argument", error):
        return flag_error(parser, command.argv)
    return error


def parse_error(parser, argv: tuple[str, ...]) -> str | None:
    """None when the CLI accepts argv (as `slim-trt` would before running anything), else the parser's message."""
    out, err = io.StringIO(), io.StringIO()
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            args = parser.parse_args(list(argv))
    except SystemExit as e:
        if e.code in (0, None):  # --help, --version
            return None
        message = err.getvalue().strip().splitlines()[-1] if err.getvalue().strip() else f"exit {e.code}"
        bad = INVALID_VALUE.search(message)
        if bad and PLACEHOLDER.match(bad.group(1)):
            return None  # a placeholder where only certain values go: the flag itself exists
        return message
    if getattr(args, "command", None) == "compress":
        from slim_trt.cli.compress import config_from_args

        try:
            config_from_args(args)
        except SlimError as e:
            return f"compress refuses these flags: {e}"
    return None


@pytest.fixture(scope="module")
def parser():
    return build_parser()


def test_the_docs_show_slim_trt_commands_from_every_page():
    commands = documented_commands()
    pages = {c.path for c in commands}
    # Each of these pages documents commands; if the extractor stopped finding them, the test below would pass empty.
    for page in ("README.md", "docs/compression.md", "docs/export-verify-lint.md", "docs/gpu.md", "docs/jetson.md",
                 "docs/triton.md", "docs/recipes.md"):
        assert page in pages, page
    assert len(commands) >= 40, len(commands)
    subcommands = {c.argv[0] for c in commands if c.argv}
    assert {"compress", "export", "verify", "lint", "build", "deploy", "serve", "finetune", "info", "eval"} <= subcommands


def test_every_documented_slim_trt_line_parses(parser):
    drifted = [f"{c.where()}\n    -> {error}" for c in documented_commands()
               if (error := check(parser, c)) is not None]
    assert not drifted, "documented commands the CLI refuses:\n" + "\n".join(drifted)


def test_the_check_fails_on_a_made_up_flag(parser, tmp_path):
    """The extractor and the parser together catch a drifted flag, with the file and line named."""
    page = (
        "Intro.\n\n```bash\n$ OMP_NUM_THREADS=1 slim-trt compress MODEL -o OUT \\\n    --no-such-flag 3   # comment\n"
        "slim-trt lint export/x/model.onnx --target trt10 | head && slim-trt info CKPT ...\n```\n\n"
        "Prose with `slim-trt export CKPT --no-such-inline-flag` inline, `slim-trt lint --target`, a message `slim-trt\n"
        "COMMAND: interrupted`, a synopsis `slim-trt compress MODEL -o OUT [--bits 8|4] [--[no-]stream]\n"
        "[--[no-]frobnicate]`.\n"
    )
    commands = commands_in_text(page, "docs/made-up.md")
    assert [(c.line, c.argv) for c in commands] == [
        (4, ("compress", "MODEL", "-o", "OUT", "--no-such-flag", "3")),
        (6, ("lint", "export/x/model.onnx", "--target", "trt10")),
        (6, ("info", "CKPT")),
        (9, ("export", "CKPT", "--no-such-inline-flag")),
        (9, ("lint", "--target")),
        (9, ("COMMAND:", "interrupted")),
        (10, ("compress", "--bits", "--stream", "--no-stream", "--frobnicate", "--no-frobnicate")),
    ]
    errors = [check(parser, c) for c in commands]
    assert "unrecognized arguments: --no-such-flag 3" in errors[0]
    assert errors[1] is None and errors[2] is None
    assert "unrecognized arguments: --no-such-inline-flag" in errors[3]
    assert errors[4] is None and errors[5] is None  # a reference with its arguments left out; a message
    assert errors[6] == "slim-trt compress: no such option: --frobnicate, --no-frobnicate"
    assert flag_error(parser, ("deploy", "jetson", "--memory-gb", "64")) is None
    assert flag_error(parser, ("deploy", "jetson", "--memory-gigabytes")) is not None
    assert flag_error(parser, ("depoly",)) == "no subcommand 'depoly'"
    assert parse_error(parser, ("compress", "--help")) is None
    assert parse_error(parser, ("lint", "m.onnx", "--target", "TARGET")) is None  # placeholder value
    assert parse_error(parser, ("no-such-command",)) is not None
    # compress lines also go through the recipe step: a combination the CLI refuses is reported.
    refused = parse_error(parser, ("compress", "MODEL", "-o", "OUT", "--preset", "int4-dense", "--act-bits", "8"))
    assert refused is not None and refused.startswith("compress refuses these flags:")


def _slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = heading.strip().lower()
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def _anchors(path: Path) -> set[str]:
    anchors, in_block = set(), False
    for line in path.read_text().splitlines():
        if line.lstrip().startswith("```"):
            in_block = not in_block
        elif not in_block and (m := re.match(r"^#{1,6} (.+)$", line)):
            anchors.add(_slug(m.group(1)))
    return anchors


def test_slug_follows_github():
    assert _slug("Which GEMMs TensorRT can run sparse (`lint`)") == "which-gemms-tensorrt-can-run-sparse-lint"
    assert _slug("W8A8 for sparse INT8 tensor cores (the defaults, `--preset trt-int8-sparse`)") == \
        "w8a8-for-sparse-int8-tensor-cores-the-defaults---preset-trt-int8-sparse"


def test_relative_links_point_at_files_and_headings_that_exist():
    broken = []
    for page in doc_files():
        text = re.sub(r"```.*?```", "", page.read_text(), flags=re.S)
        for target in re.findall(r"\]\(([^)\s]+)\)", text):
            if re.match(r"^[a-z]+://|^mailto:", target):
                continue
            file_part, _, anchor = target.partition("#")
            resolved = (page.parent / file_part).resolve() if file_part else page
            if not resolved.exists():
                broken.append(f"{page.relative_to(REPO)}: {target} (no such file)")
                continue
            if anchor and resolved.suffix == ".md" and anchor not in _anchors(resolved):
                broken.append(f"{page.relative_to(REPO)}: {target} (no such heading)")
    assert not broken, "\n".join(broken)


def recipe_table_flags(text: str) -> list[tuple[int, str, tuple[str, ...]]]:
    """(line, recipe, flags) for each code span of the `flags` column of README's "Which recipe for which GPU"."""
    rows, in_section, column = [], False, None
    for number, line in enumerate(text.splitlines(), 1):
        if line.startswith("## "):
            in_section = line.strip() == "## Which recipe for which GPU"
            continue
        if not in_section or not line.startswith("|"):
            continue
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if column is None:
            column = cells.index("flags")
            continue
        if set(cells[0]) <= set("-: "):
            continue  # the header's rule
        for span in re.findall(r"`([^`]+)`", cells[column]):
            if span.startswith("--"):
                rows.append((number, cells[0], tuple(shlex.split(span))))
    return rows


def test_the_recipe_table_flags_are_accepted_by_compress(parser):
    """Each recipe's flags in README's table, given to `slim-trt compress`, parse and make a config."""
    rows = recipe_table_flags((REPO / "README.md").read_text())
    assert len(rows) >= 8 and any(flags == ("--preset", "int4-dense") for _, _, flags in rows)
    refused = [f"README.md:{line}: {recipe}: {shlex.join(flags)} -> {error}" for line, recipe, flags in rows
               if (error := parse_error(parser, ("compress", "MODEL", "-o", "OUT", *flags))) is not None]
    assert not refused, "\n".join(refused)
    made_up = "| recipe | flags |\n|---|---|\n| x | `--bits 5` |\n"
    (line, _, flags), = recipe_table_flags("## Which recipe for which GPU\n\n" + made_up)
    assert line == 5 and parse_error(parser, ("compress", "MODEL", "-o", "OUT", *flags)) is not None
