"""Trainer options that Lightning would accept but that would train nothing, train wrong, or count
wrong, refused at start-up in one line (before anything is built)."""

from .errors import UsageError


def check_length(trainer) -> None:
    """A run that would train no step, or whose steps, validations or logs Lightning would count
    wrong, ends the start."""
    if trainer.max_steps == 0 or trainer.limit_train_batches in (0, 0.0):
        option = "max_steps" if trainer.max_steps == 0 else "limit_train_batches"
        raise UsageError(f"--trainer.{option} 0 trains nothing: give a number of steps (or "
                         f"batches) of 1 or more")
    if trainer.max_steps is not None and trainer.max_steps < -1:
        raise UsageError(f"--trainer.max_steps {trainer.max_steps}: give a number of steps of 1 "
                         f"or more, or -1 to train until --max_tokens or --trainer.max_time")
    interval = trainer.val_check_interval
    if interval is not None and not isinstance(interval, bool) and interval <= 0:
        raise UsageError(f"--trainer.val_check_interval {interval}: give the training steps "
                         f"between validations (1 or more)")
    if trainer.log_every_n_steps is not None and trainer.log_every_n_steps < 1:
        raise UsageError(f"--trainer.log_every_n_steps {trainer.log_every_n_steps}: give the "
                         f"steps between logged training metrics (1 or more)")


def check_strategy(trainer, model) -> None:
    """A distributed strategy the model's optimizer cannot train under ends the start."""
    strategy = str(getattr(trainer.strategy, "class_path", trainer.strategy)).lower()
    if "fsdp" in strategy and model.get("optimizer") == "muon":
        raise UsageError("Muon orthogonalises whole weight matrices, and FSDP shards them across "
                         "processes: use --trainer.strategy ddp with Muon, or --model.optimizer "
                         "adamw with FSDP")
