"""Text sources and token windows for calibration and evaluation."""
from __future__ import annotations

from importlib.resources import files
from pathlib import Path

import torch

from ..errors import SlimError

SHIPPED_CALIB = "calib_sample.txt"  # WikiText-2 valid excerpt (calibration only)
SHIPPED_EVAL = "eval_sample.txt"  # WikiText-2 test excerpt (evaluation only)


def shipped_text(name: str) -> str:
    return files("slim_trt").joinpath("data", name).read_text(encoding="utf-8")


def load_text(source: str | None, *, default: str = SHIPPED_CALIB) -> str:
    """Read calibration/evaluation text: a local file, a HF dataset name (hub needed), or the shipped sample."""
    if source is None:
        return shipped_text(default)
    p = Path(source).expanduser()
    if p.is_file():
        text = read_text_file(p, source)
        if not text.strip():
            raise SlimError(f"text file {source} is empty: give a file with real text")
        return text
    if p.is_dir():
        raise SlimError(f"{source} is a folder: give a text file")
    looks_like_path = source.startswith((".", "/", "~")) or p.suffix in (".txt", ".md", ".json", ".jsonl")
    if looks_like_path:
        raise SlimError(f"no such text file: {source}")
    return _hub_dataset_text(source)


def read_text_file(path: Path, shown: str | None = None) -> str:
    """A UTF-8 text file (a leading BOM is dropped). Binary data (NUL bytes, bytes that are not UTF-8) is refused:
    decoded with replacement characters it would calibrate or evaluate on noise without a word of warning."""
    shown = shown or str(path)
    try:
        data = path.read_bytes()
    except OSError as e:
        raise SlimError(f"cannot read {shown} ({e.strerror})") from None
    nul = data.find(b"\0")
    if nul >= 0:
        raise SlimError(f"{shown} is not a text file (a NUL byte at offset {nul}: binary data, or UTF-16 text): "
                        f"give UTF-8 text (iconv -f UTF-16 -t UTF-8 converts UTF-16)")
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise SlimError(f"{shown} is not UTF-8 text (byte {data[e.start]:#04x} at offset {e.start}): give UTF-8 "
                        f"text (e.g. iconv -f latin1 -t utf-8 FILE converts Latin-1)") from None


def _hub_dataset_text(name: str) -> str:
    """NAME or NAME:CONFIG:SPLIT of a Hugging Face dataset with a 'text' column (needs the hub)."""
    try:
        import datasets  # noqa: F401
    except ImportError:
        raise SlimError(f"{name!r} is not a local file; reading Hugging Face datasets needs `pip install datasets` "
                        f"and hub access; or pass a local text file with --calib FILE")
    parts = name.split(":")
    ds_name, cfg, split = parts[0], (parts[1] if len(parts) > 1 else None), (parts[2] if len(parts) > 2 else "train")
    try:
        ds = datasets.load_dataset(ds_name, cfg, split=split)
    except Exception as e:  # the datasets library raises many kinds of errors when offline
        raise SlimError(f"could not download dataset {name!r} (the hub is unreachable from this machine, or the "
                        f"name is wrong: {type(e).__name__}); pass a local text file with --calib FILE")
    return "\n\n".join(ds["text"])


def tokenize(tokenizer, text: str) -> torch.Tensor:
    """The whole text as one 1-D token stream, without special tokens."""
    ids = tokenizer(text, add_special_tokens=False, return_attention_mask=False)["input_ids"]
    return torch.tensor(ids, dtype=torch.long)


def _bos(tokenizer) -> int | None:
    # Models such as Gemma and LLaMA are trained with BOS first; a window without it is out of distribution.
    return getattr(tokenizer, "bos_token_id", None)


def _with_bos(chunk: torch.Tensor, bos: int | None) -> torch.Tensor:
    if bos is None:
        return chunk
    return torch.cat([torch.tensor([bos], dtype=torch.long), chunk[:-1]])


def calibration_windows(tokenizer, text: str, nsamples: int, seqlen: int, seed: int = 0,
                        bytes_per_token: int = 0) -> torch.Tensor:
    """`nsamples` random windows of `seqlen` tokens (BOS first when the tokenizer has one), as GPTQ/SLiM sample.

    Refused up front: more windows than the text has start positions (they could only repeat), and, with
    bytes_per_token (what the run holds per calibration token), windows whose data would not fit the memory the
    machine has available."""
    ids = tokenize(tokenizer, text)
    if ids.numel() <= seqlen:
        raise SlimError(f"the calibration text has only {ids.numel()} tokens, fewer than --seqlen {seqlen}: "
                        f"use more text or a smaller --seqlen")
    starts = ids.numel() - seqlen
    if nsamples > starts:
        raise SlimError(f"--nsamples {nsamples} is more windows than the calibration text has ({ids.numel()} tokens "
                        f"give {starts} distinct windows of --seqlen {seqlen}): use --nsamples <= {starts}, or more "
                        f"text with --calib FILE")
    check_calibration_memory(nsamples, seqlen, bytes_per_token)
    g = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, ids.numel() - seqlen, (nsamples,), generator=g)
    bos = _bos(tokenizer)
    return torch.stack([_with_bos(ids[s:s + seqlen], bos) for s in starts.tolist()])


def check_calibration_memory(nsamples: int, seqlen: int, bytes_per_token: int) -> None:
    """Refuse calibration data larger than the memory available now (one line instead of a run that grows until
    the kernel kills it, or std::bad_alloc)."""
    from ..resources import available_memory_bytes

    need = nsamples * seqlen * bytes_per_token
    have = available_memory_bytes()
    if bytes_per_token and have is not None and need > have:
        most = max(1, have // (seqlen * bytes_per_token))
        raise SlimError(f"--nsamples {nsamples} x --seqlen {seqlen} needs {need / 2**30:.1f} GiB for the calibration "
                        f"activations alone, more than the {have / 2**30:.1f} GiB this machine has available: use "
                        f"--nsamples <= {most} (or a smaller --seqlen)")


def eval_windows(tokenizer, text: str, seqlen: int, limit: int | None = None) -> torch.Tensor:
    """Consecutive non-overlapping windows of `seqlen` tokens (the first `limit`, or all)."""
    ids = tokenize(tokenizer, text)
    n = ids.numel() // seqlen
    if n == 0:
        raise SlimError(f"the evaluation text has only {ids.numel()} tokens, fewer than one window of {seqlen}")
    if limit is not None:
        n = min(n, limit)
    bos = _bos(tokenizer)
    return torch.stack([_with_bos(ids[i * seqlen:(i + 1) * seqlen], bos) for i in range(n)])


def parse_window_count(text: str) -> int | None:
    """A --windows value: a positive count, or 'all' (None)."""
    if str(text).strip().lower() == "all":
        return None
    try:
        n = int(text)
    except ValueError:
        n = 0
    if n < 1:
        raise SlimError(f"bad --windows {text!r}: give a positive number or 'all'")
    return n
