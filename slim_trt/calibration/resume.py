"""The finished blocks of an interrupted `compress`, kept in OUT.partial so that a re-run continues from them.

Each block is two files: block_NNNN.safetensors (its compressed layers) and block_NNNN.json (their manifest
entries, the report's per-layer record, the safetensors file's sha256 and the JSON's own content checksum).
A block that fails any check (a flipped byte, a truncated file, a half-written pair) is dropped with a warning
and compressed again: blocks are computed deterministically from the blocks before them, so the recomputed block
is the one that was lost and the blocks after it stay valid.
"""
from __future__ import annotations

import json
import warnings
from pathlib import Path

from safetensors import SafetensorError

from ..checkpoint import DIGEST_KEY, digest_ok, file_sha256, load_layers, save_layers, with_digest
from ..compressed_linear import CompressedLinear
from ..errors import SlimError


class BlockStore:
    def __init__(self, folder: Path):
        self.folder = Path(folder)

    def _files(self, index: int) -> tuple[Path, Path]:
        return self.folder / f"block_{index:04d}.safetensors", self.folder / f"block_{index:04d}.json"

    def save(self, index: int, layers: dict[str, CompressedLinear], record: dict) -> None:
        """Write block `index` (tensors first, then the JSON that vouches for them; each renamed into place)."""
        tensors, meta = self._files(index)
        tmp = tensors.with_name(tensors.name + ".tmp")
        metas = save_layers(tmp, layers)
        tmp.replace(tensors)
        body = with_digest({**record, "layers": metas, "file_sha256": file_sha256(tensors)})
        tmp = meta.with_name(meta.name + ".tmp")
        tmp.write_text(json.dumps(body))
        tmp.replace(meta)

    def load(self, index: int) -> tuple[dict[str, CompressedLinear], dict] | None:
        """Block `index`'s layers and record, or None when it was never saved or failed its checks (then its files
        are deleted, with a warning, so that it is compressed again)."""
        tensors, meta = self._files(index)
        if not tensors.exists() and not meta.exists():
            return None
        try:
            if not (tensors.exists() and meta.exists()):
                raise SlimError("one of its two files is missing")
            try:
                record = json.loads(meta.read_text(encoding="utf-8"))
            except (ValueError, UnicodeDecodeError) as e:
                raise SlimError(f"{meta.name} is not valid JSON ({e})") from None
            if not isinstance(record, dict) or not isinstance(record.get("layers"), dict):
                raise SlimError(f"{meta.name} is not a block record")
            # A record of an earlier slim-trt has no checksums of its own; its tensors' still hold (load_layers).
            if DIGEST_KEY in record and not digest_ok(record):
                raise SlimError(f"{meta.name} does not match its checksum")
            if DIGEST_KEY in record and file_sha256(tensors) != record.get("file_sha256"):
                raise SlimError(f"{tensors.name} does not match its checksum")
            return load_layers(tensors, record["layers"]), record
        except (SlimError, SafetensorError, OSError, KeyError) as e:
            warnings.warn(f"{self.folder}: block {index} is corrupt ({e}); deleted it, compressing it again",
                          stacklevel=2)
            tensors.unlink(missing_ok=True)
            meta.unlink(missing_ok=True)
            return None

    def count(self) -> int:
        return len(list(self.folder.glob("block_*.json")))
