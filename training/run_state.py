"""What a run carries across a resume beside Lightning's own state (weights, optimizer, schedule,
step, loops): its clock and its random states, so that N steps, a resume and N more give what 2N
steps straight give, and time keeps counting from where the run stopped."""

import os
import random
import time

import lightning as L
import torch


def process_start_time(pid: int | str = "self") -> float | None:
    """When process ``pid`` (default: this one) started, in ``time.time()`` seconds, as the kernel
    recorded it (Linux's /proc, to 1/100 s), so that the interpreter's own start-up and every
    import count; None where there is no /proc."""
    try:
        with open(f"/proc/{pid}/stat") as f:  # "pid (name) state ...": the name may hold spaces
            fields = f.read().rsplit(")", 1)[1].split()
        after_boot = int(fields[19]) / os.sysconf("SC_CLK_TCK")  # field 22: start, in clock ticks
        age = time.clock_gettime(time.CLOCK_BOOTTIME) - after_boot
    except (OSError, ValueError, IndexError, AttributeError):
        return None
    return time.time() - age if age >= 0 else None


class RunState(L.Callback):
    """The run's clock and random states, kept in every checkpoint.

    The clock: ``wall_time`` is the seconds since training started, resumes included (the time
    between them left out); ``validation_time`` the part of it spent validating (val loss,
    samples, BLEU, and the checkpoints saved there: a validation lasts until training goes on,
    the next batch's fetching included);
    ``train_time`` the rest, the speedrun's measure, which does not change with how often a run
    validates. Each validation logs ``val/wall_time_s`` and ``val/train_time_s``: the time that
    training took to reach the weights it measures.

    The random states (torch, CUDA, Python: dropout, the data order) of a resumed run are put back
    when training starts, after the set-up (model, data, optimizer, sanity check) may have drawn
    random numbers, and before the first step.
    """

    def __init__(self, command_started: float | None = None):
        self.command_started = time.time() if command_started is None else command_started
        self.val_known_at = 0.0  # command time when the last validation's metrics were known
        self._elapsed_before = 0.0  # wall-clock seconds of training before a resume
        self._fit_start: float | None = None
        self._val_seconds = 0.0  # seconds spent validating, resumes included
        self._val_began: float | None = None  # when the validation under way began
        self.val_started_at = (0.0, 0.0)  # (wall time, training time) when the last one began
        self._rng_to_restore: dict | None = None

    @staticmethod
    def of(trainer: L.Trainer) -> "RunState":
        """The trainer's RunState (train.py's CLI adds one to every run)."""
        found = next((c for c in trainer.callbacks if isinstance(c, RunState)), None)
        if found is None:
            raise RuntimeError("this needs a training.run_state.RunState among the callbacks")
        return found

    def wall_time(self) -> float:
        if self._fit_start is None:
            return self._elapsed_before
        return time.perf_counter() - self._fit_start

    def validation_time(self) -> float:
        running = time.perf_counter() - self._val_began if self._val_began is not None else 0.0
        return self._val_seconds + running

    def train_time(self) -> float:
        return self.wall_time() - self.validation_time()

    def command_time(self) -> float:
        """Seconds since this command started (a resumed run's count from its own command)."""
        return time.time() - self.command_started

    def on_fit_start(self, trainer, pl_module):  # after a resume's on_load_checkpoint
        self._fit_start = time.perf_counter() - self._elapsed_before

    def on_validation_start(self, trainer, pl_module):
        self.val_started_at = (self.wall_time(), self.train_time())
        self._val_began = time.perf_counter()

    def _end_validation(self):
        if self._val_began is not None:
            self._val_seconds += time.perf_counter() - self._val_began
            self._val_began = None

    # A validation ends when training goes on (or ends): the checkpoints saved after it count too,
    # which Lightning's ModelCheckpoint saves in its on_validation_end, after every other callback's
    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self._end_validation()

    def on_sanity_check_end(self, trainer, pl_module):  # the set-up after it is not validating
        self._end_validation()

    def on_train_end(self, trainer, pl_module):
        self._end_validation()

    def on_validation_epoch_end(self, trainer, pl_module):
        if self._fit_start is not None and not trainer.sanity_checking:
            wall, train = self.val_started_at
            self.val_known_at = self.command_time()
            pl_module.log("val/wall_time_s", wall, sync_dist=True)
            pl_module.log("val/train_time_s", train, sync_dist=True)
            # the oldest process's clock: rank 0, the command's (a launcher starts the others later)
            pl_module.log("val/command_time_s", self.val_known_at, sync_dist=True, reduce_fx="max")

    def on_save_checkpoint(self, trainer, pl_module, checkpoint):
        checkpoint["wall_time_s"] = self.wall_time()
        checkpoint["val_time_s"] = self.validation_time()
        checkpoint["rng_states"] = {"torch": torch.get_rng_state(), "python": random.getstate()}
        if torch.cuda.is_available():
            checkpoint["rng_states"]["cuda"] = torch.cuda.get_rng_state_all()

    def on_load_checkpoint(self, trainer, pl_module, checkpoint):
        self._elapsed_before = checkpoint.get("wall_time_s", 0.0)
        self._val_seconds = checkpoint.get("val_time_s", 0.0)
        self._rng_to_restore = checkpoint.get("rng_states")

    def on_train_start(self, trainer, pl_module):  # nothing draws between it and the first step
        if self._rng_to_restore is None:
            return
        torch.set_rng_state(self._rng_to_restore["torch"])
        if "cuda" in self._rng_to_restore and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(self._rng_to_restore["cuda"])
        version, state, gauss = self._rng_to_restore["python"]  # a list after torch.load
        random.setstate((version, tuple(state), gauss))
        self._rng_to_restore = None
