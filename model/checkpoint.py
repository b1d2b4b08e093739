"""Loading the checkpoints that train.py writes, with torch alone: no Lightning, no training code.

A checkpoint is one file written by ``torch.save`` (Lightning's ``Trainer.save_checkpoint``, with
what ``train.TrainModule.on_save_checkpoint`` adds). Inference reads these entries and nothing else:

* ``model_kind``: ``"gpt"`` or ``"seq2seq"`` (missing in early checkpoints: ``"gpt"``), the key of
  ``MODELS`` below;
* ``hyper_parameters["config"]``: the model's config as a plain dict (``GPTConfig`` or
  ``Seq2SeqConfig`` fields), so that loading needs no pickled classes of ours;
* ``state_dict``: the model's weights, each key prefixed with ``model.`` (the LightningModule's
  attribute). With the EMA callback these are the averaged weights;
* ``tokenizer``: ``to_dict()`` of the tokenizer the model was trained with (``data.tokenizers``).

Training also finds there what it needs to resume a run, which inference ignores: Lightning's own
``global_step``, ``epoch``, ``optimizer_states``, ``lr_schedulers``, ``loops`` and ``callbacks``;
the other ``hyper_parameters`` (learning rate, ...); and ours: ``wall_time_s`` (seconds of training
so far), ``val_time_s`` (of which validating), ``lr_decay_began_s`` (where a time budget's decay
began, on Lightning's Timer), ``rng_states`` (torch, CUDA and Python random states) and ``run``
(the run's id, name and folder).

    from model.checkpoint import load_checkpoint
    model, tokenizer, kind = load_checkpoint("runs/mini-gpt/<run>/checkpoints/last.ckpt")
"""

from pathlib import Path

import torch
from torch import nn

from data.tokenizers import tokenizer_from_dict

from .gpt import GPT, GPTConfig
from .seq2seq import Seq2SeqConfig, Seq2SeqTransformer

# model_kind -> (model class, config class): the one place a kind names its model
MODELS = {"gpt": (GPT, GPTConfig), "seq2seq": (Seq2SeqTransformer, Seq2SeqConfig)}


class CheckpointError(ValueError):
    """A checkpoint path that is missing, unreadable, not of this project, or of another model
    kind."""


def read_checkpoint(path: str | Path, device: str = "cpu", kind: str | None = None) -> dict:
    """The checkpoint at ``path`` as a dict, after checking that it is one of ours (and of ``kind``,
    when given). ``mmap``: tensors are read from the file as they are used, not all at once."""
    if not Path(path).is_file():
        raise CheckpointError(f"no checkpoint at {path}")
    try:
        ckpt = torch.load(path, map_location=device, weights_only=True, mmap=True)
    except Exception as e:  # truncated, not a torch file, or holding objects weights_only refuses
        raise CheckpointError(f"{path} is not a readable checkpoint ({type(e).__name__}); is the "
                              "file complete, and was it written by train.py?") from None
    config = ckpt.get("hyper_parameters", {}).get("config") if isinstance(ckpt, dict) else None
    if config is None or "tokenizer" not in ckpt or "state_dict" not in ckpt:
        raise CheckpointError(f"{path} is not a checkpoint of this project (it has no model config "
                              f"or tokenizer)")
    if kind is not None and ckpt.get("model_kind", "gpt") != kind:
        raise CheckpointError(f"{path} holds a {ckpt['model_kind']} model, not a {kind} one")
    return ckpt


def load_checkpoint(path: str | Path, device: str = "cpu", kind: str | None = None):
    """The model (in eval mode, on ``device``), tokenizer and kind of a checkpoint, GPT or seq2seq
    (or only ``kind``). Raises CheckpointError, saying why, for a missing, unreadable or foreign
    file."""
    ckpt = read_checkpoint(path, device, kind)
    kind = ckpt.get("model_kind", "gpt")
    model_class, config_class = MODELS[kind]
    model: nn.Module = model_class(config_class(**ckpt["hyper_parameters"]["config"]))
    model.load_state_dict({k.removeprefix("model."): v for k, v in ckpt["state_dict"].items()})
    return model.to(device).eval(), tokenizer_from_dict(ckpt["tokenizer"]), kind


def load_gpt_checkpoint(path: str | Path, device: str = "cpu"):
    """The GPT (in eval mode) and tokenizer of a checkpoint; see ``load_checkpoint``."""
    return load_checkpoint(path, device, "gpt")[:2]


def load_seq2seq_checkpoint(path: str | Path, device: str = "cpu"):
    """The Seq2SeqTransformer (in eval mode) and tokenizer of a checkpoint; see
    ``load_checkpoint``."""
    return load_checkpoint(path, device, "seq2seq")[:2]
