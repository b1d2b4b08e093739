"""Big CPU tensors kept for reuse between training steps, not paged in afresh at every step.

PyTorch takes CPU tensors from malloc and does not cache them (its CUDA tensors it does). glibc
serves a request above its mmap threshold (32 MiB at most) with fresh pages from the kernel and
unmaps them when the tensor is freed, so a tensor that size made at every step, like a translation
batch's (1,500 tokens, 8,000) logits (48 MB) and their gradients, is paged in again at every step,
the kernel zeroing it 4 KiB at a time (docs/speed.md says what that costs a step).
"""

import ctypes
import os
import platform

# glibc's mallopt parameters (malloc.h)
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3


def keep_freed_memory() -> bool:
    """Have glibc's malloc keep large freed blocks for reuse rather than hand them back to the OS;
    True where it now does (Linux with glibc, where the user has not set these thresholds). The
    cost: the process keeps its peak memory until it exits."""
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    tunables = os.environ.get("GLIBC_TUNABLES", "")
    if any(k in os.environ for k in ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_")) \
            or "mmap_threshold" in tunables or "trim_threshold" in tunables:
        return False  # the user's own settings win
    libc = ctypes.CDLL("libc.so.6")
    # blocks up to 1 GiB come from the heap, and up to 1 GiB of free heap top stays mapped
    return bool(libc.mallopt(M_MMAP_THRESHOLD, 1 << 30) and libc.mallopt(M_TRIM_THRESHOLD, 1 << 30))
