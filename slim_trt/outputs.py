"""Output folders are built under a temporary name beside the target and renamed into place when complete,
so an interrupted command never leaves a half-written checkpoint, export or repository behind.

check_outputs is the one check every writing command runs before any work starts: each output folder (-o) and
file (--json, --save-inputs, ...) can be written, and none of them is, contains or lies inside one of the
command's inputs (with --force, replacing such an output would delete the input)."""
from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterable, Mapping
from pathlib import Path

from .errors import SlimError


def _named(path, flag: str) -> Path:
    """The path, refused when it names no file or folder of its own ('', '.', '..', a trailing '/..'): the
    temporary folder beside it and the final rename need a name."""
    text = os.fspath(path)
    if not text.strip() or Path(text).name in ("", ".", ".."):
        raise SlimError(f"{flag} {text!r} names no file or folder of its own: give a new name, e.g. {flag} out/model")
    return Path(text)


def check_output(path: Path, force: bool, flag: str = "-o") -> None:
    """The rules of prepare_output, checked without writing anything, so that a long job can check its output
    before it starts: a name of its own, not a file (even with --force), not an existing non-empty folder unless
    forced, and a parent folder that can be written to (tried, not guessed from the mode bits: root, ACLs,
    read-only mounts)."""
    path = _named(path, flag)
    try:
        if path.exists() and not path.is_dir():
            raise SlimError(f"output {path} exists and is not a folder: choose another -o (--force replaces only "
                            f"a folder)")
        if path.exists() and any(path.iterdir()) and not force:
            raise SlimError(f"output {path} already exists: pass --force to replace it, or choose another -o")
    except OSError as e:
        raise SlimError(f"cannot read the output {path} ({e.strerror}): choose another -o") from None
    ancestor = path.parent
    while not ancestor.exists() and ancestor != ancestor.parent:
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise SlimError(f"cannot create {path}: {ancestor} is a file; choose another -o")
    try:
        tempfile.TemporaryDirectory(prefix=f".{path.name}.probe-", dir=ancestor).cleanup()
    except OSError as e:
        raise SlimError(f"cannot write the output {path}: {ancestor} is not writable ({e.strerror}); choose "
                        f"another -o") from None


def check_output_file(path, flag: str) -> None:
    """An output file (--json, --save-inputs, ...) that can be written: a name of its own, not a folder, an
    existing parent folder that is writable (tried). '-' (stdout) is always fine."""
    if os.fspath(path) == "-":
        return
    path = _named(path, flag)
    if path.is_dir():
        raise SlimError(f"{flag} {path} is a folder: give a file name, e.g. {flag} {path / 'out.json'}")
    parent = path.parent
    if not parent.is_dir():
        what = "does not exist" if not parent.exists() else "is not a folder"
        raise SlimError(f"{flag} {path}: the folder {parent} {what}; create it or choose another path")
    try:
        tempfile.NamedTemporaryFile(prefix=f".{path.name}.probe-", dir=parent).close()
    except OSError as e:
        raise SlimError(f"{flag} {path}: {parent} is not writable ({e.strerror}); choose another path") from None
    if path.exists() and not os.access(path, os.W_OK):
        raise SlimError(f"{flag} {path} exists and is not writable: choose another path")


def _inside(a: Path, b: Path) -> bool:
    return a == b or b in a.parents


def check_outputs(*, folders: Mapping[str, object] | None = None, files: Mapping[str, object] | None = None,
                  inputs: Iterable[object] = (), force: bool = False) -> None:
    """The one check of a writing command's outputs, before any work starts. folders: flag -> output folder
    (-o; replaced with --force), files: flag -> output file ('-' = stdout), inputs: every file or folder the
    command reads (None entries and names that are not local paths, such as hub ids, are ignored).

    Each output must be writable (check_output, check_output_file), must not be, contain or lie inside one of
    the inputs (replacing it would delete or change the input), and must not be, contain or lie inside another
    output (one would overwrite the other)."""
    folders = {flag: p for flag, p in (folders or {}).items() if p is not None}
    files = {flag: p for flag, p in (files or {}).items() if p is not None and os.fspath(p) != "-"}
    # The most specific refusal first: a path without a name, then an output onto an input (even where it
    # "already exists" too), then whether each can be written.
    outputs = [(flag, _named(p, flag).resolve()) for flag, p in {**folders, **files}.items()]
    for p in inputs:
        if p is None or not Path(p).exists():
            continue
        src = Path(p).resolve()
        for flag, out in outputs:
            if _inside(out, src) or _inside(src, out):
                how = "is" if out == src else ("lies inside" if _inside(out, src) else "contains")
                raise SlimError(f"{flag} {out} {how} the input {src}: writing it would destroy or change the input; "
                                f"choose an output outside the input")
    for i, (flag, out) in enumerate(outputs):
        for other_flag, other in outputs[i + 1:]:
            if _inside(out, other) or _inside(other, out):
                raise SlimError(f"{flag} {out} and {other_flag} {other} overlap: one would overwrite the other; "
                                f"give them separate paths")
    for flag, p in folders.items():
        check_output(p, force, flag)
    for flag, p in files.items():
        check_output_file(p, flag)


def prepare_output(path: Path, force: bool) -> Path:
    """Refuse an existing output (an empty folder is fine) unless forced; return a new temporary folder beside it."""
    path = Path(path)
    check_output(path, force)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        return Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    except OSError as e:
        raise SlimError(f"cannot write the output {path} ({e.strerror}): choose another -o") from None


def _apply_umask(folder: Path) -> None:
    # mkdtemp (and safetensors) create private 0700/0600 entries; a finished output gets the usual modes.
    umask = os.umask(0)
    os.umask(umask)
    folder.chmod(0o777 & ~umask)
    for p in folder.rglob("*"):
        if not p.is_symlink():  # directories and executables (scripts) keep their x bits
            executable = p.is_dir() or p.stat().st_mode & 0o100
            p.chmod((0o777 if executable else 0o666) & ~umask)


def commit_output(tmp: Path, path: Path) -> None:
    """Move a finished temporary folder into place, replacing an old output (already allowed by prepare_output)."""
    _apply_umask(tmp)
    old = None
    try:
        if path.exists():
            old = path.with_name(f".{path.name}.old-{os.getpid()}")
            os.replace(path, old)
        os.replace(tmp, path)
    except OSError as e:
        if old is not None and not path.exists():
            os.replace(old, path)  # put the previous output back
        raise SlimError(f"cannot move the finished output into {path} ({e.strerror}): choose another -o") from None
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
