"""What a resumed run and a warm start may change, as plain functions over options, and the
one-line messages when they may not.

Resuming (``--ckpt_path``) continues a run: its model and training options are the checkpoint's,
except ``RESUME_MAY_CHANGE`` and the optimizer's settings, ``RESUME_MAY_RETUNE``. A warm start
(``--model.init_from``) begins a new run from a source's weights: the architecture and the
tokenizer are the source's, except ``WARM_START_MAY_CHANGE``.
"""

from pathlib import Path

# Model options a resumed run may change: the attention path and compiling change how it computes,
# not what. Any other model option that differs from the checkpoint's ends the start with a message.
RESUME_MAY_CHANGE = ("config.attn_impl", "compile")
# Optimizer and schedule settings a resumed run may change, e.g. a lower lr after a loss that went
# NaN: the optimizer's state (its moments) is the checkpoint's, its settings the command's
# (``TrainModule.on_train_start``). Not the optimizer itself, nor which parameters decay: those
# change the state's layout.
RESUME_MAY_RETUNE = ("lr", "min_lr", "warmup_steps", "lr_decay_steps", "weight_decay", "betas",
                     "muon_lr", "muon_momentum", "muon_ns_steps", "embedding_lr")
# Retunable settings whose null means "no group of its own": from or to null changes the state's
# layout (the embeddings join or leave the other groups), so that is refused like any other option.
RETUNE_NOT_FROM_OR_TO_NULL = ("embedding_lr",)
# Options newer than some checkpoints, and the value a checkpoint without them was trained with: a
# resume compares them too (set to another value, the model or the optimizer's groups differ).
ADDED_OPTIONS = {"config.smear": False, "embedding_lr": None}
# Model config options a warm start sets for itself: how the model computes and is regularised, and
# its initialisation (overwritten by the source's weights), not the shapes of its weights.
# block_size too: up to the source's with learned positions (the table is cut to it). The
# vocabulary is the tokenizer's, which must be the source's. Any other option left at its default
# takes the source's value; set to another value, it ends the start with a message.
WARM_START_MAY_CHANGE = ("dropout", "attn_impl", "block_size", "zero_init_proj", "vocab_size")
# --ckpt_path values Lightning looks up in its own checkpoint folder, which a new run's is not
LIGHTNING_CKPT_NAMES = ("last", "best", "hpc", "registry")


def flat(options: dict, prefix: str = "") -> dict:
    """{"config": {"n_layer": 4}, "lr": 3e-3} -> {"config.n_layer": 4, "lr": 0.003}, with tuples as
    lists (YAML's and a checkpoint's spellings of the same betas compare equal)."""
    found = {}
    for key, value in options.items():
        if isinstance(value, dict):
            found.update(flat(value, f"{prefix}{key}."))
        elif not key.startswith("_"):  # Lightning's _instantiator, _class_path
            found[f"{prefix}{key}"] = list(value) if isinstance(value, tuple) else value
    return found


def check_ckpt_path(ckpt_path: str) -> None:
    if ckpt_path in LIGHTNING_CKPT_NAMES:
        raise ValueError(f"--ckpt_path {ckpt_path}: give the checkpoint's path, e.g. "
                         f"runs/<project>/<run>/checkpoints/last.ckpt. Each run has its own "
                         f"folder, where Lightning's {ckpt_path!r} would find nothing and train "
                         f"from scratch")


def check_steps_left(ckpt_path: str, max_steps: int | None, steps_done: int) -> None:
    """A resume that would train no step (``max_steps`` reached already) is refused."""
    if max_steps is not None and 0 <= max_steps <= steps_done:
        raise ValueError(f"--ckpt_path {ckpt_path} has trained {steps_done} steps already, and "
                         f"--trainer.max_steps is {max_steps}: give a larger --trainer.max_steps "
                         f"to train on")


def check_resume_options(ckpt_path: str, ours: dict, theirs: dict, seq_len: str) -> list[str]:
    """The model options of a command (``ours``) against those of the checkpoint it resumes
    (``theirs``): any that differs but ``RESUME_MAY_CHANGE`` and ``RESUME_MAY_RETUNE`` is refused,
    naming each. Returns the retuned ones (``model.lr 0.003 -> 0.0015``). ``seq_len``: the model
    option set through the data option of the same name."""
    ours, theirs = flat(ours), {**ADDED_OPTIONS, **flat(theirs)}
    differ = [(key, value, ours[key]) for key, value in theirs.items()
              if key in ours and key not in RESUME_MAY_CHANGE and key != "config.vocab_size"
              and ours[key] != value]
    conflicts = [(key, value, mine) for key, value, mine in differ
                 if key not in RESUME_MAY_RETUNE
                 or (key in RETUNE_NOT_FROM_OR_TO_NULL and None in (value, mine))]
    if not conflicts:
        return [f"model.{key} {value} -> {mine}" for key, value, mine in differ]
    option = {f"config.{seq_len}": f"data.{seq_len}"}
    settings = "; ".join(f"{option.get(key, f'model.{key}')} is {mine} here but {value} in the "
                         f"checkpoint" for key, value, mine in conflicts)
    run_config = Path(ckpt_path).parent.parent / "config.yaml"
    how = (f"--config {run_config} (the run's own config)" if run_config.is_file()
           else "the options the run was started with")
    raise ValueError(f"--ckpt_path {ckpt_path} resumes a run with other settings: {settings}. A "
                     f"resumed run keeps its model and training options: resume with {how}, or "
                     f"start a new run without --ckpt_path to train with the new ones")


def take_architecture(ours, theirs: dict, defaults: dict, source: str) -> str:
    """A warm start's model config (``ours``, set item by item) takes the architecture of
    ``source`` (``theirs``): each option left at its default (``defaults``) gets the source's
    value, and one set to another value is refused. Returns a line saying what was taken."""
    conflicts = []
    older = {key.removeprefix("config."): value for key, value in ADDED_OPTIONS.items()
             if key.startswith("config.")}  # what a source from before them was built with
    for key, value in {**older, **theirs}.items():
        if key in WARM_START_MAY_CHANGE or ours[key] == value:
            continue
        if ours[key] == defaults[key]:
            ours[key] = value  # left unset: the source's
        else:
            conflicts.append(f"model.config.{key} is {ours[key]!r} here but {value!r} there")
    if conflicts:
        raise ValueError(f"--model.init_from {source} keeps the architecture of the model it "
                         f"starts from: {'; '.join(conflicts)}. Leave these options out (the "
                         f"source's are taken), or train from scratch without --model.init_from")
    if theirs.get("pos_emb", "learned") == "learned" and ours["block_size"] > theirs["block_size"]:
        raise ValueError(f"--data.block_size {ours['block_size']} is longer than the "
                         f"{theirs['block_size']} positions {source} has learned: set "
                         f"--data.block_size {theirs['block_size']} or less")
    shape = ", ".join(f"{key} {ours[key]}" for key in ("n_layer", "n_head", "n_embd"))
    return f"Model: the architecture of {source} ({shape}; model.config in the run's config.yaml)"


def check_resume_tokenizer(ckpt_path: str, ours, theirs: dict) -> None:
    """The data's tokenizer (``ours``) must be the one the checkpoint was trained with."""
    if ours is not None and ours.to_dict() != theirs:
        raise ValueError(f"{ckpt_path} was trained with another vocabulary than this data's "
                         f"tokenizer ({ours.vocab_size} tokens): use it with the data and "
                         f"--data.tokenizer it was trained with")


def check_warm_start_tokenizer(source: str, ours, theirs: dict | None, vocab_size: int) -> None:
    """The data's tokenizer (``ours``) must be the source's (``theirs``: its ``to_dict()``, None
    for one this project does not know)."""
    if ours is None or ours.to_dict() == theirs:
        return
    if theirs is None:
        raise ValueError(f"--model.init_from {source} has a vocabulary of {vocab_size} tokens and "
                         f"no tokenizer this project knows, so no data can be tokenized for it")
    if theirs["name"] == ours.name:  # characters: each text has its own vocabulary
        raise ValueError(f"--model.init_from {source} was trained on another character vocabulary "
                         f"than this data's ({ours.vocab_size} characters): the tokenizer comes "
                         f"with the weights; start from it on text of the same characters (such "
                         f"as the text it was trained on)")
    raise ValueError(f"--model.init_from {source} reads {theirs['name']} tokens, but the data is "
                     f"tokenized with --data.tokenizer {ours.name}: the tokenizer comes with the "
                     f"weights; set --data.tokenizer {theirs['name']}")


def resumed_run(checkpoint: dict, ckpt_path: str) -> tuple[dict, int] | None:
    """The id, name and folder of the run that wrote ``checkpoint`` (read from ``ckpt_path``), and
    its step; None for a checkpoint written outside a run folder."""
    info = checkpoint.get("run")
    if info is None:
        return None
    path = Path(ckpt_path).resolve()  # through symlinks, to the file itself
    if path.parent.name == "checkpoints":  # the run's folder, wherever it now is
        info = {**info, "dir": str(path.parent.parent)}
    return info, checkpoint["global_step"]
