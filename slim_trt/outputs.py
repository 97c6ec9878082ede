"""Output folders are built under a temporary name beside the target and renamed into place when complete,
so an interrupted command never leaves a half-written checkpoint, export or repository behind."""
from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

from .errors import SlimError


def prepare_output(path: Path, force: bool) -> Path:
    """Refuse an existing output (an empty folder is fine) unless forced; return a new temporary folder beside it."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise SlimError(f"output {path} exists and is not a folder: choose another -o")
    if path.exists() and any(path.iterdir()) and not force:
        raise SlimError(f"output {path} already exists: pass --force to replace it, or choose another -o")
    path.parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))


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
    if path.exists():
        old = path.with_name(f".{path.name}.old-{os.getpid()}")
        os.replace(path, old)
    os.replace(tmp, path)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
