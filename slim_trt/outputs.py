"""Output folders are built under a temporary name beside the target and renamed into place when complete,
so an interrupted command never leaves a half-written checkpoint, export or repository behind."""
from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

from .errors import SlimError


def check_output(path: Path, force: bool) -> None:
    """The rules of prepare_output, checked without writing anything, so that a long job can check its output
    before it starts: not a file (even with --force), not an existing non-empty folder unless forced, and a
    parent folder that can be written to (tried, not guessed from the mode bits: root, ACLs, read-only mounts)."""
    path = Path(path)
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
