"""The finished blocks of an interrupted `compress`, kept in OUT.partial so that a re-run continues from them.

Each block is two files: block_NNNN.safetensors (its compressed layers) and block_NNNN.json (their manifest
entries, the report's per-layer record, the safetensors file's sha256 and the JSON's own content checksum). A block
whose other tensors changed too (norms that absorbed SmoothQuant scales) keeps its whole state in a third file,
block_NNNN.dense.safetensors, whose sha256 the JSON also holds.
A block that fails any check (a flipped byte, a truncated file, a half-written pair, a record without its own
checksum) is dropped with a warning and compressed again: blocks are computed deterministically from the blocks
before them, so the recomputed block is the one that was lost and the blocks after it stay valid.

open_partial is the gate of the folder as a whole: one run at a time (a lock file naming the run's PID, held with
flock, so a run that died leaves no lock behind), and its state.json (which run the blocks belong to) checked.
"""
from __future__ import annotations

import json
import os
import re
import warnings
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from ...checkpoint.format import (DIGEST_KEY, check_layer_tensors, digest_ok, file_sha256, load_layers, save_layers,
                          with_digest)
from ...checkpoint.compressed_linear import CompressedLinear
from ...errors import SlimError


class BlockStore:
    def __init__(self, folder: Path):
        self.folder = Path(folder)

    def _files(self, index: int) -> tuple[Path, Path]:
        return self.folder / f"block_{index:04d}.safetensors", self.folder / f"block_{index:04d}.json"

    def _dense_file(self, index: int) -> Path:
        return self.folder / f"block_{index:04d}.dense.safetensors"

    def save(self, index: int, layers: dict[str, CompressedLinear], record: dict,
             dense: dict[str, torch.Tensor] | None = None) -> None:
        """Write block `index` (tensors first, then the JSON that vouches for them; each renamed into place).
        `dense`: the block's whole state dict, when tensors outside its compressed layers changed."""
        tensors, meta = self._files(index)
        tmp = tensors.with_name(tensors.name + ".tmp")
        metas = save_layers(tmp, layers)
        tmp.replace(tensors)
        extra = {}
        if dense is not None:
            dense_file = self._dense_file(index)
            tmp = dense_file.with_name(dense_file.name + ".tmp")
            save_file({k: v.detach().contiguous() for k, v in dense.items()}, str(tmp))
            tmp.replace(dense_file)
            extra["dense_sha256"] = file_sha256(dense_file)
        body = with_digest({**record, **extra, "layers": metas, "file_sha256": file_sha256(tensors)})
        tmp = meta.with_name(meta.name + ".tmp")
        tmp.write_text(json.dumps(body))
        tmp.replace(meta)

    def has(self, index: int) -> bool:
        """Whether block `index` was saved (load may still find it corrupt)."""
        return all(f.is_file() for f in self._files(index))

    def load(self, index: int) -> tuple[dict[str, CompressedLinear], dict] | None:
        """Block `index`'s layers and record (with the block's whole state under "dense" when it was saved), or None when it was never saved or failed its checks (then its files
        are deleted, with a warning, so that it is compressed again)."""
        tensors, meta = self._files(index)
        if not tensors.exists() and not meta.exists():
            return None
        try:
            record = self._checked_record(index)
            if "dense_sha256" in record:
                record = {**record, "dense": load_file(str(self._dense_file(index)))}
            return load_layers(tensors, record["layers"]), record
        except (SlimError, SafetensorError, OSError, KeyError) as e:
            warnings.warn(f"{self.folder}: block {index} is corrupt ({e}); deleted it, compressing it again",
                          stacklevel=2)
            for f in (tensors, meta, self._dense_file(index)):
                f.unlink(missing_ok=True)
            return None

    def _checked_record(self, index: int) -> dict:
        """Block `index`'s record after checking it and the checksums of its files (SlimError when not)."""
        tensors, meta = self._files(index)
        if not (tensors.exists() and meta.exists()):
            raise SlimError("one of its two files is missing")
        try:
            record = json.loads(meta.read_text(encoding="utf-8"))
        except (ValueError, UnicodeDecodeError) as e:
            raise SlimError(f"{meta.name} is not valid JSON ({e})") from None
        if not isinstance(record, dict) or not isinstance(record.get("layers"), dict):
            raise SlimError(f"{meta.name} is not a block record")
        # Every record this slim-trt writes carries its own checksum: one without it was edited (its group sizes,
        # infos or skipped layers could be anything), so it is damaged like any other.
        if not digest_ok(record):
            raise SlimError(f"{meta.name} has no {DIGEST_KEY} or does not match it")
        if file_sha256(tensors) != record.get("file_sha256"):
            raise SlimError(f"{tensors.name} does not match its checksum")
        if "dense_sha256" in record:
            dense_file = self._dense_file(index)
            if not dense_file.exists() or file_sha256(dense_file) != record["dense_sha256"]:
                raise SlimError(f"{dense_file.name} is missing or does not match its checksum")
        return record

    def load_tensors(self, index: int) -> tuple[dict[str, torch.Tensor], dict]:
        """Block `index`'s compressed layers in their stored form (what the checkpoint's slim_layers file holds)
        and its record, checked. A streamed compression assembles its checkpoint from these, right after
        writing them: a missing or damaged block is an error here, not a block to compute again."""
        tensors, _ = self._files(index)
        try:
            record = self._checked_record(index)
            t = load_file(str(tensors))
            check_layer_tensors(t, record["layers"])
        except (SafetensorError, OSError, KeyError, SlimError) as e:
            raise SlimError(f"{self.folder}: block {index} cannot be read back ({e}): the disk changed under the "
                            f"run; re-run the same command to compute it again") from None
        return t, record

    def save_residual(self, perm: torch.Tensor) -> None:
        """The residual-stream permutation the blocks were compressed in (renamed into place)."""
        f = self.folder / "residual_permutation.safetensors"
        tmp = f.with_name(f.name + ".tmp")
        save_file({"perm": perm.detach().to(torch.int64).contiguous()}, str(tmp))
        tmp.replace(f)

    def load_residual(self) -> torch.Tensor | None:
        """The saved residual permutation, or None (none saved, or unreadable: it is chosen again, from the same
        windows)."""
        f = self.folder / "residual_permutation.safetensors"
        try:
            perm = load_file(str(f))["perm"] if f.is_file() else None
        except (SafetensorError, OSError, KeyError) as e:
            warnings.warn(f"{f} is unreadable ({e}): choosing the residual permutation again")
            return None
        if perm is not None and not torch.equal(perm.sort().values, torch.arange(perm.numel())):
            warnings.warn(f"{f} is not a permutation: choosing the residual permutation again")
            return None
        return perm

    def count(self, blocks: int | None = None) -> int:
        """Blocks with both files saved (of the first `blocks`, when given: stray files do not count)."""
        found = {int(m.group(1)) for f in self.folder.glob("block_*.json")
                 if (m := re.fullmatch(r"block_(\d{4})\.json", f.name))}
        return sum(1 for i in found if (blocks is None or i < blocks) and self._files(i)[0].is_file())


LOCK = "lock"
STATE = "state.json"


class PartialLock:
    """The lock of one OUT.partial folder, held until release() or the process ends."""

    def __init__(self, folder: Path):
        import fcntl

        self.folder = Path(folder)
        if self.folder.exists() and not self.folder.is_dir():
            raise SlimError(f"{folder} (where compress keeps finished blocks) is a file: remove it or choose another "
                            f"-o")
        self._fd = None
        self.created = not self.folder.exists() or not any(f.name != LOCK for f in self.folder.iterdir())
        self.folder.mkdir(parents=True, exist_ok=True)
        path = self.folder / LOCK
        try:
            self._fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            raise SlimError(f"cannot create the lock {path} ({e.strerror}): remove it, or choose another -o") from None
        try:
            fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            holder = os.pread(self._fd, 32, 0).decode(errors="replace").strip() or "unknown"
            os.close(self._fd)
            raise SlimError(f"{self.folder} is in use by another compress run (pid {holder}) writing the same -o: wait "
                            f"for it to finish or stop it, or choose another -o") from None
        # The lock is ours (a PID left by a run that died is stale: flock died with it): name this run.
        os.ftruncate(self._fd, 0)
        os.pwrite(self._fd, f"{os.getpid()}\n".encode(), 0)

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing the descriptor releases the flock
            self._fd = None


def check_partial_state(folder: Path, state: dict) -> bool:
    """Check that the blocks in the (locked) OUT.partial belong to `state` (the run's fingerprint, source and
    config), writing it when the folder holds no run yet. True when an interrupted run is resumed. SlimError when
    the folder belongs to another run or its state.json is damaged (not a file, not JSON, missing beside blocks)."""
    folder = Path(folder)
    state_f = folder / STATE
    if not state_f.exists() and not any(folder.glob("block_*")):  # new, or stopped before its state was written
        tmp = state_f.with_name(STATE + ".tmp")
        tmp.write_text(json.dumps(state))
        tmp.replace(state_f)
        return False
    try:
        found = json.loads(state_f.read_text(encoding="utf-8")) if state_f.is_file() else None
    except (OSError, ValueError, UnicodeDecodeError):
        found = None
    if not isinstance(found, dict) or found.get("fingerprint") != state.get("fingerprint"):
        raise SlimError(f"{folder} holds an interrupted run with a different model, config or calibration data "
                        f"(or its {STATE} is missing or damaged): re-run that exact command to resume it, or "
                        f"delete {folder} to start over")
    return True
