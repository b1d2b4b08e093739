"""What a train.py command asks for, read from its arguments before the CLI is built: the model
kind (which picks the classes the CLI is built for) and the subcommand (whose parser alone is
built: each of Lightning's takes a good part of a second to build, and a command runs one)."""

from dataclasses import dataclass
from pathlib import Path

import lightning as L
import yaml
from lightning.pytorch.cli import LightningCLI

from .errors import UsageError


@dataclass(frozen=True)
class ModelKind:
    """What a model kind trains with: its LightningModule (with a ``kind`` name, a key of
    ``model.checkpoint.MODELS``, and a ``shape`` for run names) and data module, and what ``auto``
    attention needs to know: the data option that is also the model's longest sequence (linked to
    the model option of the same name), and whether the model masks padded keys."""

    module: type[L.LightningModule]
    data: type[L.LightningDataModule]
    seq_len_option: str
    masks_padded_keys: bool

    @property
    def name(self) -> str:  # the module's kind: "gpt" or "seq2seq"
        return self.module.kind


def model_kind(args: list[str], kinds: dict[str, ModelKind]) -> str:
    """The ``kind`` the command line asks for, read before the CLI is built (the kind picks its
    classes): ``--kind K``, else the last ``--config`` file that sets one, else ``gpt``."""
    kind = "gpt"
    for i, arg in enumerate(args):
        flag, equals, value = arg.partition("=")
        if not equals:  # "--config FILE" rather than "--config=FILE"
            value = args[i + 1] if i + 1 < len(args) else ""
        if flag == "--config" and Path(value).is_file():
            with open(value) as f:
                try:
                    config = yaml.safe_load(f)
                except yaml.YAMLError as e:
                    mark = getattr(e, "problem_mark", None)
                    where = f", line {mark.line + 1}" if mark else ""
                    problem = getattr(e, "problem", None) or str(e)
                    raise UsageError(f"--config {value}{where}: not valid YAML ({problem})") \
                        from None
            kind = config.get("kind", kind) if isinstance(config, dict) else kind
        elif flag == "--kind" and value:
            kind = value
    if kind not in kinds:
        raise UsageError(f"unknown kind {kind!r}; choose one of {', '.join(kinds)}")
    return kind


def subcommands(args: list[str]) -> dict[str, set[str]]:
    """The subcommands to build parsers for, as ``LightningCLI.subcommands`` gives them (name:
    the Trainer method's arguments the CLI fills itself): the subcommand when it is the first
    argument (``train.py fit ...``), else all of them: ``train.py --help`` lists them, a mistyped
    one is refused with the choices, and top-level options before it (``-c FILE fit``) work."""
    every = LightningCLI.subcommands()
    if args and args[0] in every:
        return {args[0]: every[args[0]]}
    return every
