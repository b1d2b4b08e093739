"""The optimizer's settings beyond building it (model/optim.py): the options in range, a resumed
run taking this command's settings, and the command that resumes a run whose loss went NaN."""

import math
import os
from pathlib import Path

from .errors import UsageError
from .runs import newest_run_config


def check_optimization(hp) -> None:
    """The optimizer and schedule options of ``TrainModule`` (``hp``, its hparams) in range, or
    one line naming the first that is not (a zero lr, say, would divide by zero in the
    schedule)."""
    rules = [("lr", 0 < hp.lr < math.inf, "a learning rate above 0"),
             ("min_lr", 0 <= hp.min_lr <= hp.lr, "a learning rate from 0 to --model.lr"),
             ("warmup_steps", hp.warmup_steps >= 0, "0 or more steps"),
             ("lr_decay_steps", hp.lr_decay_steps is None or hp.lr_decay_steps >= 1,
              "1 or more steps, or null for --trainer.max_steps"),
             ("weight_decay", hp.weight_decay >= 0, "0 or more"),
             ("betas", len(hp.betas) == 2 and all(0 <= b < 1 for b in hp.betas),
              "two numbers from 0 to below 1"),
             ("muon_lr", 0 < hp.muon_lr < math.inf, "a learning rate above 0"),
             ("muon_momentum", 0 <= hp.muon_momentum < 1, "a number from 0 to below 1"),
             ("muon_ns_steps", hp.muon_ns_steps >= 1, "1 or more Newton-Schulz iterations"),
             ("embedding_lr", hp.get("embedding_lr") is None or 0 < hp.embedding_lr < math.inf,
              "a learning rate above 0, or null for --model.lr"),
             ("val_samples", hp.get("val_samples", 0) >= 0, "0 or more samples"),
             ("val_sample_tokens", hp.get("val_sample_tokens", 1) >= 1, "1 or more tokens"),
             ("beam_size", hp.get("beam_size", 1) >= 1, "1 or more")]
    for name, ok, what in rules:
        if not ok:
            raise UsageError(f"--model.{name} {hp[name]}: give {what}")


def take_settings(scheduler, settings: list[dict]) -> None:
    """A resumed run's optimizer (``scheduler.optimizer``) has the checkpoint's state and
    settings: its groups take ``settings`` (this command's, each group's peak ``lr`` with the
    rest), and the schedule the new peaks, so that a resume may lower the lr, say
    (training/resume.py). Nothing changes when the settings are the checkpoint's."""
    groups = scheduler.optimizer.param_groups
    if all(group.get("initial_lr") == ours["lr"]  # (ours: the peak; the group's: scheduled)
           and all(group.get(key) == value for key, value in ours.items() if key != "lr")
           for group, ours in zip(groups, settings, strict=True)):
        return
    scheduler.base_lrs = [ours["lr"] for ours in settings]
    for group, ours, schedule in zip(groups, settings, scheduler.lr_lambdas, strict=True):
        group.update(ours, initial_lr=ours["lr"], lr=ours["lr"] * schedule(scheduler.last_epoch))


def lower_lr_advice(hp, trainer, run_info: dict | None) -> str:
    """The command that resumes a run from its last checkpoint at half the learning rate (a tenth,
    starting again: a run that diverges before its first checkpoint is far off)."""
    last = getattr(trainer.checkpoint_callback, "last_model_path", "")
    resume = bool(last and os.path.isfile(last) and run_info)
    by = 2 if resume else 10
    lower = (f"--model.lr {hp.lr / by:g} --model.min_lr {hp.min_lr / by:g}"
             + (f" --model.muon_lr {hp.muon_lr / by:g}" if hp.optimizer == "muon" else "")
             + (f" --model.embedding_lr {hp.embedding_lr / by:g}"
                if hp.get("embedding_lr") is not None else ""))
    full = "32-true" if str(trainer.precision) not in ("32-true", "32", "64-true", "64") else None
    or_full = f" (or with --trainer.precision {full})" if full else ""
    if not resume:
        return f"No checkpoint yet: start again with a lower learning rate, {lower}{or_full}"
    config = newest_run_config(Path(run_info["dir"]))
    return (f"Resume from the last good checkpoint with a lower learning rate: python train.py "
            f"fit --config {config} --ckpt_path {last} {lower}{or_full}")
