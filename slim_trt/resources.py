"""The machine a compression runs on: which device, how many threads, how much memory it took."""
from __future__ import annotations

import itertools
import os
import resource
from contextlib import contextmanager

import torch

from .errors import SlimError

DEVICE_CHOICES = "auto, cpu, cuda or cuda:N"
# What the product does with several GPUs (the CLI help and the README say the same).
ONE_DEVICE = ("slim-trt compresses on one device, one decoder block at a time: the block's weights, Hessians and "
              "calibration activations must fit that device; it does not split blocks or spread them across GPUs")


def resolve_device(text: str | torch.device | None) -> torch.device:
    """'auto' (or None): the first CUDA GPU when torch sees one, else the CPU; 'cpu'; 'cuda' or 'cuda:N'."""
    t = "auto" if text is None else str(text).strip().lower()
    if t == "auto":
        return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    if t == "cpu":
        return torch.device("cpu")
    if t == "cuda" or (t.startswith("cuda:") and t[5:].isdigit()):
        if not torch.cuda.is_available():
            why = ("this torch is a CPU-only build" if torch.version.cuda is None
                   else "torch sees no CUDA GPU (no driver, no device, or CUDA_VISIBLE_DEVICES hides them)")
            raise SlimError(f"--device {t}: no usable CUDA GPU here ({why}): use --device cpu (or auto)")
        index = int(t[5:]) if ":" in t else 0
        if index >= torch.cuda.device_count():
            raise SlimError(f"--device {t}: this machine has {torch.cuda.device_count()} CUDA GPU(s) (cuda:0 .. "
                            f"cuda:{torch.cuda.device_count() - 1}): choose one of them, or --device cpu")
        return torch.device("cuda", index)
    if "," in t or t.count("cuda") > 1:
        raise SlimError(f"--device {text!r}: {ONE_DEVICE}: choose one of them, e.g. --device cuda:0 (or run one "
                        f"compression per GPU)")
    raise SlimError(f"bad --device {text!r}: choose {DEVICE_CHOICES}")


def proc_kib_field(path: str, key: str) -> int | None:
    """Bytes of a "Key:  N kB" line of a Linux /proc file (None where the file or the line is missing)."""
    try:
        with open(path) as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def available_memory_bytes() -> int | None:
    """Memory the system can give this process without swapping (Linux MemAvailable; None where unknown)."""
    return proc_kib_field("/proc/meminfo", "MemAvailable")


def available_cores() -> int:
    """The CPU cores this process may run on (its affinity mask: what a container or taskset gives it)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


@contextmanager
def all_cores():
    """Run torch on every core this process is given, then restore the previous thread count.

    torch starts with one thread per physical core, which can be fewer than the cores given (hyper-threads,
    a library that lowered it). An explicit OMP_NUM_THREADS is the user's choice and is kept as it is."""
    before = torch.get_num_threads()
    want = available_cores()
    raise_it = "OMP_NUM_THREADS" not in os.environ and before < want
    if raise_it:
        torch.set_num_threads(want)
    try:
        yield torch.get_num_threads()
    finally:
        if raise_it:
            torch.set_num_threads(before)


def peak_rss_gb() -> float:
    """The process's peak resident memory so far (ru_maxrss is in KiB on Linux)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def reset_device_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def device_peak_gb(device: torch.device) -> float | None:
    """Peak memory torch allocated on a CUDA device since reset_device_peak (None on the CPU)."""
    if device.type != "cuda":
        return None
    return torch.cuda.max_memory_allocated(device) / 2**30


def device_sync(device: torch.device):
    """What PhaseTimer needs to charge asynchronous GPU work to the right phase (None on the CPU)."""
    if device.type != "cuda":
        return None
    return lambda: torch.cuda.synchronize(device)


def block_bytes(block: torch.nn.Module, hidden: list[torch.Tensor], in_features: list[int],
                dense_stream: bool = False, kept_inputs: bool = False) -> dict[str, int]:
    """What compressing one block holds on its device, in bytes: the block's weights; the calibration
    activations three times (the inputs, the dense outputs kept to measure the block's error, the new outputs),
    five times with a dense stream (dense_target > 0: the dense model's inputs and outputs too);
    per distinct layer input size K, the fp32 H with its fp32 factor and the fp64 copies factorising it
    (4 x K^2 x 4 bytes, one H per input shared by the layers that read it); with kept_inputs (a W8A8 block's
    error moments read the layer inputs an earlier pass kept: runner.KeptInputs) every layer's input over the
    calibration tokens in float32 (an upper bound: layers that share an input keep it once)."""
    weights = sum(t.numel() * t.element_size() for t in itertools.chain(block.parameters(), block.buffers()))
    acts = (5 if dense_stream else 3) * sum(h.numel() * h.element_size() for h in hidden)
    hessians = sum(16 * k * k for k in set(in_features))
    need = {"weights": weights, "activations": acts, "hessians": hessians}
    if kept_inputs:
        need["inputs"] = 4 * sum(h.numel() // max(h.shape[-1], 1) for h in hidden) * sum(in_features)
    return need


def fits(need: dict[str, int], device: torch.device) -> bool:
    """Whether `need` fits the CUDA device's free memory now (check_fits without the refusal); True off CUDA,
    where what the run may hold beyond its calibration data is decided once, before it starts
    (compression.compressor.keeps_inputs)."""
    return device.type != "cuda" or sum(need.values()) <= _cuda_free(device)


def _cuda_free(device: torch.device) -> int:
    """The CUDA device's free bytes, torch's own cache (reserved but unallocated) counted as free."""
    free, _ = torch.cuda.mem_get_info(device)
    return free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)


def check_fits(need: dict[str, int], device: torch.device, what: str) -> None:
    """Refuse, before anything moves, a block that cannot fit the CUDA device's free memory."""
    if device.type != "cuda":
        return
    refuse_unfit(need, _cuda_free(device), str(device), what)


def refuse_unfit(need: dict[str, int], free: int, device: str, what: str) -> None:
    """The device check as a function of the byte counts: a SlimError naming the bytes needed (by part) and
    free when they do not fit."""
    total = sum(need.values())
    if total > free:
        parts = ", ".join(f"{k} {v / 2**30:.2f}" for k, v in need.items())
        raise SlimError(f"{what} needs about {total / 2**30:.2f} GB on {device} ({parts} GB) but {free / 2**30:.2f} "
                        f"GB are free: use a GPU with more memory, fewer --nsamples or a shorter --seqlen, or "
                        f"--device cpu ({ONE_DEVICE})")
