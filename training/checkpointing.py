"""Checkpoints a run never loses: ``last.ckpt`` written at every validation, every ``N`` steps and
at the final step, always under that name and atomically, and Ctrl-C or SIGTERM ending a run after
a checkpoint it resumes from."""

import contextlib
import os
import signal
import threading
from pathlib import Path
from weakref import proxy

import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.plugins import TorchCheckpointIO
from lightning.pytorch.utilities import rank_zero_info

from .errors import Stopped, UsageError, one_line


class Interrupted(Stopped):
    """Training stopped on Ctrl-C or SIGTERM: after saving a checkpoint to resume from (``path``),
    or at once, on a second Ctrl-C or one before training began (``path`` None)."""

    def __init__(self, signum: int, steps: int = 0, path: str | None = None,
                 last: str | None = None):
        name = signal.Signals(signum).name
        if path is not None:
            message = (f"stopped by {name} after {steps} steps and saved {path}: resume with the "
                       f"same command and --ckpt_path {path}")
        elif last and os.path.isfile(last):
            message = (f"stopped by {name} at once, without saving; {last} holds the run up to "
                       f"its last save: resume with the same command and --ckpt_path {last}")
        else:
            message = f"stopped by {name} before training saved anything"
        super().__init__(message, signum)


@contextlib.contextmanager
def replacing(path: Path, mode: str = "wb", **open_args):
    """A file to write in place of ``path``: a temporary file beside it, flushed to disk and then
    renamed over it, so that a crash or a full disk while writing leaves the previous file whole,
    never a truncated one."""
    partial_path = path.with_name(f".{path.name}.partial")
    try:
        with open(partial_path, mode, **open_args) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(partial_path, path)
    finally:
        with contextlib.suppress(OSError):  # (on a read-only disk even this fails)
            partial_path.unlink(missing_ok=True)


class AtomicCheckpointIO(TorchCheckpointIO):
    """Writes checkpoints in place of the previous ones (``replacing``): a crash or a full disk
    while saving leaves the previous file whole; a failure names the file and the one kept."""

    def save_checkpoint(self, checkpoint, path, storage_options=None):
        path = Path(path)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            with replacing(path) as f:
                torch.save(checkpoint, f)
        except OSError as e:  # read-only or full: name the file, and the one that is kept
            last = path if path.is_file() else path.with_name("last.ckpt")
            kept = f"; {last} still holds the last good checkpoint" if last.is_file() else ""
            raise OSError(one_line(OSError(e.errno, e.strerror, str(path))) + kept) from e


class Checkpoint(ModelCheckpoint):
    """Lightning's ModelCheckpoint keeping the best checkpoints by ``monitor``, and ``last.ckpt``,
    which holds the latest state of the run: a kill loses at most the steps since it was written.

    - last.ckpt is written at every validation (Lightning's only when the monitored value
      improved), every ``every_n_steps`` training steps when set, and at the final step (before the
      EMA callback puts the average in the model). It is always ``last.ckpt``, replaced atomically
      (AtomicCheckpointIO): never ``last-v1.ckpt``, whatever path a resume named it by.
    - ``{step}`` in a file name is the step number metrics.csv gives the last step trained
      (Lightning's names count the steps done, one more).
    - Ctrl-C or SIGTERM during training: the current step finishes, last.ckpt is saved and training
      stops with Interrupted; the same command with ``--ckpt_path`` that checkpoint resumes. A
      second Ctrl-C, or one before training begins, stops at once.
    - A run resumed from a moved folder, or by another spelling of its path, keeps track of its
      best checkpoints in its folder as it is now.

    Args:
        dirpath: folder of the checkpoints; default: the run folder's checkpoints/.
        filename: name of the best checkpoints, e.g. ``best-{step}``.
        monitor: the metric that decides which checkpoints are the best.
        mode: ``min`` or ``max``: whether the best value of ``monitor`` is low or high.
        save_top_k: how many best checkpoints to keep (0: none; -1: all).
        save_last: keep last.ckpt (a run stopped by a signal saves it anyway).
        every_n_steps: also write last.ckpt every this many training steps; None: at validations
            and the final step only.
        verbose: print a line at each save of a best checkpoint.
    """

    def __init__(self, dirpath: str | None = None, filename: str | None = None,
                 monitor: str | None = None, mode: str = "min", save_top_k: int = 1,
                 save_last: bool = True, every_n_steps: int | None = None,
                 verbose: bool = False):
        if every_n_steps is not None and every_n_steps < 1:
            raise UsageError(f"--checkpoint.every_n_steps {every_n_steps}: give a number of steps "
                             f"of 1 or more, or null to write last.ckpt at validations only")
        # last.ckpt is ours (save_last=False to Lightning), under one name (no version counter)
        super().__init__(dirpath=dirpath, filename=filename, monitor=monitor, mode=mode,
                         save_top_k=save_top_k, save_last=False, verbose=verbose,
                         enable_version_counter=False)
        self.keep_last, self.every_n_steps = save_last, every_n_steps
        self._signal, self._saved_step, self._step_before = None, None, None

    @property
    def last_path(self) -> str:
        return os.path.join(self.dirpath, self.CHECKPOINT_NAME_LAST + self.FILE_EXTENSION)

    def format_checkpoint_name(self, metrics, filename=None, ver=None, prefix=None):
        if "step" in metrics:  # the number metrics.csv gives the step: the steps done, less one
            metrics = {**metrics, "step": metrics["step"] - 1}
        return super().format_checkpoint_name(metrics, filename, ver, prefix)

    def write_last(self, trainer, always: bool = False) -> None:
        """Write last.ckpt, if kept (``always``: even if not), once per step."""
        if (self.keep_last or always) and self._saved_step != trainer.global_step:
            self.last_model_path = self.last_path  # before saving: it is part of the state
            trainer.save_checkpoint(self.last_path, weights_only=False)
            self._saved_step = trainer.global_step
            for logger in trainer.loggers:  # as Lightning's saves do: the CSV writes its rows
                logger.after_save_checkpoint(proxy(self))

    # Signals during training: the step finishes, then a save. (Before training, Ctrl-C stops at
    # once: Lightning's exit on it becomes status 130 in the CLI. Lightning puts back the handlers
    # of before the run at its teardown.)

    def on_train_start(self, trainer, pl_module):
        super().on_train_start(trainer, pl_module)
        self._signal, self._saved_step = None, trainer.global_step  # (a resumed step is saved)
        self._step_before = trainer.global_step  # the step count before the latest batch
        self._handle_signals(self._stop_after_this_step)

    def _handle_signals(self, handler) -> None:
        if threading.current_thread() is threading.main_thread():  # where Python delivers them
            for signum in (signal.SIGINT, signal.SIGTERM):
                signal.signal(signum, handler)

    def _stop_after_this_step(self, signum, frame):
        self._signal = signum
        if signum == signal.SIGINT:
            signal.signal(signal.SIGINT, self._stop_now)
        rank_zero_info(f"\n{signal.Signals(signum).name}: saving a checkpoint after this step, "
                       f"then stopping (Ctrl-C again to stop at once, without one)")

    def _stop_now(self, signum, frame):
        raise Interrupted(signum, last=self.last_model_path)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        # with gradient accumulation a batch may end no step: a signal then waits for the batch
        # that ends one (the gradients of a step's first batches are in no checkpoint)
        stepped, self._step_before = trainer.global_step != self._step_before, trainer.global_step
        stop = self._signal is not None
        if trainer.world_size > 1:  # one process was signalled: all stop together
            stop = trainer.strategy.reduce_boolean_decision(stop, all=False)
        stop = stop and stepped
        periodic = self.every_n_steps is not None and trainer.global_step % self.every_n_steps == 0
        final = trainer.should_stop or 0 <= trainer.max_steps <= trainer.global_step
        if stop or periodic or final:  # (a validation at this step saves it again, scored)
            self.write_last(trainer, always=stop)
        if stop:
            raise Interrupted(self._signal or signal.SIGTERM, trainer.global_step, self.last_path)

    def on_validation_end(self, trainer, pl_module):
        super().on_validation_end(trainer, pl_module)  # the best checkpoints
        fitting = trainer.state.fn == "fit" and not trainer.sanity_checking
        if fitting and not trainer.fast_dev_run:
            self._saved_step = None  # again after the one at this step's end: with its score
            self.write_last(trainer)

    def on_train_end(self, trainer, pl_module):
        self.write_last(trainer)  # ended another way (epochs, time limit)

    def load_state_dict(self, state_dict):
        # The run continues in its folder as it is now (moved, or named by another path): the
        # checkpoints the state names are there. (Lightning's keeps the best ones only when the
        # folder's path is spelled as it was.)
        def here(path):  # (a file not in this folder keeps its path: another dirpath, say)
            moved = os.path.join(self.dirpath, os.path.basename(path)) if path else path
            return moved if moved and os.path.exists(moved) else path

        state = {**state_dict, "dirpath": self.dirpath,
                 "best_k_models": {here(p): v for p, v in state_dict["best_k_models"].items()},
                 **{key: here(state_dict[key]) for key in
                    ("best_model_path", "kth_best_model_path", "last_model_path")
                    if key in state_dict}}
        super().load_state_dict(state)
