"""What every command here (train.py and the scripts) shares: one ``--device`` option, and bad input
ending in one line, ``error: ...``, and exit status 1 instead of a traceback.

A script's ``main(argv)`` raises ``ValueError`` (``UsageError``, ``CheckpointError``,
``DataSourceError`` ... are ones) or ``FileNotFoundError`` with a message that says what was wrong
and how to fix it; ``sys.exit(exit_code(main))`` turns that into the line. ``MINIGPT_TRACEBACK=1``
shows the traceback instead, for bug reports.
"""

import argparse
import os
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
