"""Where and how compute runs: the device, CPU threads and cores, autocast, loader workers."""

from __future__ import annotations

import ctypes
import os
import platform
from collections.abc import Iterator
from contextlib import contextmanager

import torch

DEVICES = ("auto", "cpu", "cuda")


class DeviceError(ValueError):
    """The `device` parameter names a device this machine does not have."""


def resolve_device(device: str) -> torch.device:
    """'auto' → CUDA when present, else CPU; asking for CUDA without one is an error."""
    if device not in DEVICES:
        raise DeviceError(f"device={device!r} must be one of {', '.join(DEVICES)}.")
    if device == "cuda" and not torch.cuda.is_available():
        raise DeviceError("device=cuda but PyTorch sees no CUDA GPU; use device=auto or cpu.")
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def usable_cores() -> int:
    """Cores this process may run on (its affinity mask, which containers often narrow)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()


def resolve_num_workers(num_workers: int | str, device: torch.device) -> int:
    if num_workers != "auto":
        return int(num_workers)
    cores = usable_cores()
    # On CPU the network needs the cores; one worker decodes while the forward pass runs.
    return min(8, cores) if device.type == "cuda" else 1


@contextmanager
def cpu_threads(count: int | None = None) -> Iterator[int]:
    """Run the block with `count` torch threads (default: every usable core), then restore.

    Yields the thread count; the caller's own setting is back when the block ends.
    """
    previous = torch.get_num_threads()
    count = usable_cores() if count is None else count
    torch.set_num_threads(count)
    try:
        yield count
    finally:
        torch.set_num_threads(previous)


# glibc's mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD, _M_MMAP_MAX = -1, -4
_HEAP_KEPT_BYTES = 1 << 30


def keep_freed_memory() -> bool:
    """Make glibc's malloc keep freed memory for reuse in this process (True where it could).

    By default each allocation over glibc's mmap threshold (at most 32 MB: one activation of a
    batch at 224 px) is a fresh mapping whose pages the kernel zeroes on first touch and unmaps
    on free, every training step. Fine-tuning EfficientNet-Lite0 at 224 px on a 2-core CPU spent
    a quarter of its time in the kernel that way (3 M page faults in 4 steps); served from the
    heap instead, 1.5x the images per second (docs/benchmarks.md, issue 29). The process keeps
    its peak memory, which every training step reaches anyway. A no-op off glibc (macOS, musl).
    """
    if platform.libc_ver()[0] != "glibc":
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    return bool(libc.mallopt(_M_MMAP_MAX, 0) and libc.mallopt(_M_TRIM_THRESHOLD, _HEAP_KEPT_BYTES))


def autocast_dtype(device: torch.device) -> torch.dtype | None:
    """bf16 (fp16 on older GPUs) under autocast on CUDA; None on CPU, where fp32 is fastest."""
    if device.type != "cuda":
        return None
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
