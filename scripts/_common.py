"""What every command here (train.py and the scripts) shares: one ``--device`` option, and bad input
ending in one line, ``error: ...``, and exit status 1 instead of a traceback.

A script's ``main(argv)`` raises ``ValueError`` (``UsageError``, ``CheckpointError``,
``DataSourceError`` ... are ones) or ``FileNotFoundError`` with a message that says what was wrong
and how to fix it; ``sys.exit(exit_code(main))`` turns that into the line. ``MINIGPT_TRACEBACK=1``
shows the traceback instead, for bug reports.
"""

import argparse
import ctypes
import os
import platform
import sys
from collections.abc import Callable


class UsageError(ValueError):
    """Bad input to a script, with a message that says what to do."""


def exit_code(main: Callable[[], object]) -> int:
    """The exit status of ``main()``: 0, or 1 after printing the message of a bad-input error."""
    try:
        main()
    except (ValueError, FileNotFoundError) as e:
        if os.environ.get("MINIGPT_TRACEBACK"):
            raise
        print(f"error: {e}\n(set MINIGPT_TRACEBACK=1 to see the traceback)", file=sys.stderr)
        return 1
    return 0


def add_device_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda", "mps"],
                        help="where to run; auto (the default) picks cuda, then mps, then cpu")


def pick_device(name: str) -> str:
    """The ``--device`` value as a torch device type; one this machine lacks is a UsageError."""
    import torch  # here, not at the top: compare_runs.py needs no torch

    from model.device import resolve_device

    device_type = resolve_device(name)
    available = {"cpu": True, "cuda": torch.cuda.is_available(),
                 "mps": torch.backends.mps.is_available()}
    if not available[device_type]:
        raise UsageError(f"--device {name}: there is no {device_type} device here; use --device "
                         "auto (or cpu)")
    return device_type


# glibc's mallopt parameters (malloc.h)
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3


def keep_freed_memory() -> bool:
    """Have glibc's malloc keep large freed blocks for reuse rather than hand them back to the OS;
    True where it now does (Linux with glibc, where the user has not set these thresholds).

    PyTorch takes CPU tensors from malloc and does not cache them (its CUDA tensors it does).
    glibc serves a request above its mmap threshold (32 MiB at most) with fresh pages from the
    kernel and unmaps them when the tensor is freed, so a tensor that size made at every step,
    like a translation batch's (1,500 tokens, 8,000) logits (48 MB) and their gradients, is
    paged in again at every step, the kernel zeroing it 4 KiB at a time. Measured on the 2-core
    Zen 5 EPYC with AVX2 kernels forced (fp32, as on a CPU without bf16): the label-smoothed
    cross-entropy of those logits, forward and backward, 64 ms -> 14 ms; a whole training step of
    configs/multi30k_de_en.yaml 586 -> 491 and 486 ms (docs/speed.md). The cost: the process
    keeps its peak memory until it exits.
    """
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    tunables = os.environ.get("GLIBC_TUNABLES", "")
    if any(k in os.environ for k in ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_")) \
            or "mmap_threshold" in tunables or "trim_threshold" in tunables:
        return False  # the user's own settings win
    libc = ctypes.CDLL("libc.so.6")
    # blocks up to 1 GiB come from the heap, and up to 1 GiB of free heap top stays mapped
    return bool(libc.mallopt(M_MMAP_THRESHOLD, 1 << 30) and libc.mallopt(M_TRIM_THRESHOLD, 1 << 30))
