"""The ``--device`` option of the scripts that run a model. (Bad input ending in one line, which
every command shares with train.py, is training/errors.py.)"""

import argparse

from training.errors import UsageError


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
