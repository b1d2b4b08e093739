"""Loading the checkpoints that train.py writes, with torch alone: no Lightning, no training code.

A checkpoint is one file written by ``torch.save`` (Lightning's ``Trainer.save_checkpoint``, with
what ``train.TrainModule`` and ``training.run_state.RunState`` add). Inference reads these entries
and nothing else:

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

A model can also come from elsewhere: ``load_model`` and a warm start (train.py's
``--model.init_from``) take a *source*, which is one of these checkpoints, a published GPT-2
(``gpt2``, ``gpt2-medium``, ``gpt2-large``, ``gpt2-xl``) or a folder holding a Hugging Face GPT-2
(model/hf_gpt2.py).
"""

from pathlib import Path

import torch
from torch import nn

from data.tokenizers import tokenizer_from_dict

from .gpt import GPT, GPTConfig
from .hf_gpt2 import gpt_config_from_hf, load_hf_state_dict, load_hf_tokenizer_dict, read_hf_config
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


# ------------------------------------------------------------------------------------------------
# Sources: our checkpoints, and GPT-2 in the Hugging Face format


def is_checkpoint_path(source: str) -> bool:
    """Whether a source names one of our checkpoints (a file, or a missing .ckpt) rather than a
    GPT-2 (a published name or a folder)."""
    return Path(source).is_file() or str(source).endswith(".ckpt")


def source_config(source: str) -> tuple[str, dict, dict | None]:
    """What a source holds, read without its weights: its model kind, its config (GPTConfig or
    Seq2SeqConfig fields, as a dict) and its tokenizer (``to_dict()``; None where the source has
    none this project knows). Raises CheckpointError or ``hf_gpt2.HFImportError`` saying why."""
    if is_checkpoint_path(source):
        ckpt = read_checkpoint(source)
        return ckpt.get("model_kind", "gpt"), ckpt["hyper_parameters"]["config"], ckpt["tokenizer"]
    config = gpt_config_from_hf(read_hf_config(source), source)
    return "gpt", config, load_hf_tokenizer_dict(source, config["vocab_size"])


def source_state_dict(source: str) -> dict:
    """A source's weights, named as the model's parameters (no ``model.`` prefix)."""
    if is_checkpoint_path(source):
        state = read_checkpoint(source)["state_dict"]
        return {key.removeprefix("model."): value for key, value in state.items()}
    return load_hf_state_dict(source)


def load_gpt_weights(model: GPT, state: dict, source: str) -> None:
    """Copy a source's weights into ``model``, whose config may differ from the source's in what
    does not change a weight's shape (dropout, the attention path) and in ``block_size``: a learned
    position table longer than the model's is cut to its first rows (the model reads shorter
    sequences; nanoGPT's crop_block_size). Raises CheckpointError, naming them, for weights that do
    not fit."""
    if model.wpe is not None and "wpe.weight" in state:
        state = {**state, "wpe.weight": state["wpe.weight"][:model.config.block_size]}
    ours = model.state_dict()
    problems = ([f"missing {k}" for k in ours.keys() - state.keys()]
                + [f"unknown {k}" for k in state.keys() - ours.keys()]
                + [f"{k} is {tuple(state[k].shape)}, not {tuple(ours[k].shape)}"
                   for k in ours.keys() & state.keys() if state[k].shape != ours[k].shape])
    if problems:
        raise CheckpointError(f"the weights of {source} do not fit the model: "
                              f"{'; '.join(sorted(problems)[:5])}")
    model.load_state_dict(state)


def load_model(source: str, device: str = "cpu", kind: str | None = None):
    """The model (in eval mode, on ``device``), tokenizer (None where the source has none this
    project knows) and kind of a source: a checkpoint of ours (``load_checkpoint``), a published
    GPT-2 or a Hugging Face GPT-2 folder."""
    if is_checkpoint_path(source):
        return load_checkpoint(source, device, kind)
    _, config, tokenizer = source_config(source)
    if kind not in (None, "gpt"):
        raise CheckpointError(f"{source} holds a gpt model, not a {kind} one")
    model = GPT(GPTConfig(**config))
    load_gpt_weights(model, load_hf_state_dict(source), source)
    return model.to(device).eval(), tokenizer_from_dict(tokenizer) if tokenizer else None, "gpt"
