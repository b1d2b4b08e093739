"""Checkpoints safe to interrupt: written atomically, ``last.ckpt`` at the final step, and
Ctrl-C or SIGTERM ending a run after a checkpoint it resumes from."""

import os
import signal
import threading
from pathlib import Path

import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.plugins import TorchCheckpointIO
from lightning.pytorch.utilities import rank_zero_info


class Interrupted(Exception):
    """Training stopped on Ctrl-C or SIGTERM, after saving a checkpoint to resume from."""

    def __init__(self, signum: int, step: int, path: str):
        self.signum = signum
        super().__init__(f"stopped by {signal.Signals(signum).name} after step {step}; saved "
                         f"{path}. Resume with the same command and --ckpt_path {path}")


class AtomicCheckpointIO(TorchCheckpointIO):
    """Writes a checkpoint to a temporary file beside it, flushes it to disk, then renames it into
    place: a crash while saving leaves the previous file whole, never a truncated one."""

    def save_checkpoint(self, checkpoint, path, storage_options=None):
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        partial_path = path.with_name(f".{path.name}.partial")
        try:
            with open(partial_path, "wb") as f:
                torch.save(checkpoint, f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(partial_path, path)
        finally:
            partial_path.unlink(missing_ok=True)


class Checkpoint(ModelCheckpoint):
    """Lightning's ModelCheckpoint (here: the best by val/loss, and last.ckpt), with two more
    guarantees.

    - last.ckpt holds the final step: it is saved at the last training batch. (Lightning saves it at
      the end of training only when no validation did, and after the EMA callback has put the
      average in the model.)
    - Ctrl-C or SIGTERM: the current step finishes, last.ckpt is saved and training stops with
      Interrupted; the same command with ``--ckpt_path`` that checkpoint resumes. A second Ctrl-C
      stops at once.
    """

    def on_train_start(self, trainer, pl_module):
        self._signal, self._final_step = None, None
        if threading.current_thread() is threading.main_thread():  # where Python delivers signals
            for signum in (signal.SIGINT, signal.SIGTERM):  # Lightning restores them at teardown
                signal.signal(signum, self._stop_after_this_step)

    def _stop_after_this_step(self, signum, frame):
        self._signal = signum
        if signum == signal.SIGINT:
            signal.signal(signal.SIGINT, signal.default_int_handler)
        rank_zero_info(f"\n{signal.Signals(signum).name}: saving a checkpoint after this step, "
                       f"then stopping (Ctrl-C again to stop at once, without one)")

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        stop = self._signal is not None
        if trainer.world_size > 1:  # one process was signalled: all stop together
            stop = trainer.strategy.reduce_boolean_decision(stop, all=False)
        if stop or trainer.should_stop or 0 <= trainer.max_steps <= trainer.global_step:
            path = os.path.join(self.dirpath, self.CHECKPOINT_NAME_LAST + self.FILE_EXTENSION)
            trainer.save_checkpoint(path)  # a validation at this step may save it again, scored
            self._final_step = trainer.global_step
            if stop:
                raise Interrupted(self._signal or signal.SIGTERM, trainer.global_step, path)

    def on_train_end(self, trainer, pl_module):
        if self._final_step != trainer.global_step:  # ended another way (epochs, time limit)
            super().on_train_end(trainer, pl_module)
