"""Callbacks a run can have beside its checkpoints: an EMA of the weights, throughput and MFU, and
the time to a target validation loss."""

import warnings

import lightning as L
import torch
from lightning.pytorch.callbacks import ThroughputMonitor, WeightAveraging
from lightning.pytorch.loggers import WandbLogger
from lightning.pytorch.utilities import rank_zero_info

from model.device import peak_dtype
from model.device import peak_flops as table_peak_flops  # (self.peak_flops: the user's)

from .errors import UsageError
from .run_state import RunState


class EMA(WeightAveraging):
    """An exponential moving average of the weights, updated after every optimizer step (Lightning's
    WeightAveraging): validation runs on it, checkpoints store it as the model's weights, and the
    model ends training with it.

    Args:
        decay: weight of the average at each update (0.998: about the last 500 steps), reached
            gradually: update n uses min(decay, (1 + n) / (10 + n)), so the random initial weights
            fade out early.
    """

    def __init__(self, decay: float = 0.998):
        if not 0.0 < decay < 1.0:
            raise ValueError(f"EMA decay must be in (0, 1), got {decay}")

        @torch.no_grad()
        def update(averaged: list[torch.Tensor], current: list[torch.Tensor],
                   n_averaged: torch.Tensor):
            weight = 1.0 - min(decay, (1.0 + n_averaged.item()) / (10.0 + n_averaged.item()))
            torch._foreach_lerp_(averaged, current, weight)

        super().__init__(multi_avg_fn=update, use_buffers=True)


class Throughput(ThroughputMonitor):
    """Logs tokens/s (``train/device/items_per_sec``) every log interval and, where the device's
    peak FLOP/s is known, MFU (``train/device/mfu``, against the peak of one device). The peak is
    ``peak_flops`` when given; else, on a GPU, the dense tensor-core peak at the training precision
    from model/device.py's table (``peak_flops``), and Lightning's table only where ours has no
    figure (a GPU it lacks, plain fp32): Lightning's has sparse figures for some GPUs and misses
    the H200. A CPU needs ``peak_flops``: there is no table (CPUs' peaks vary with cores, clock and
    vector width). Prints the peak it uses once. On a GPU it also logs the most memory the
    training has held (``train/device/max_memory_gib``, PyTorch's allocations on this process's
    GPU). The module sets ``flops_per_batch`` for each batch.

    Args:
        peak_flops: peak FLOP/s of one device at the training precision; overrides the tables.
        window_size: batches averaged over.
    """

    def __init__(self, peak_flops: float | None = None, window_size: int = 50):
        if window_size < 2:  # (a rate needs two points in time)
            raise UsageError(f"--throughput.window_size {window_size}: give 2 or more batches")
        if peak_flops is not None and not peak_flops > 0:
            raise UsageError(f"--throughput.peak_flops {peak_flops}: give the device's peak FLOP/s "
                             f"(above 0), or null to take it from the table of GPUs")
        super().__init__(batch_size_fn=lambda batch: batch[0].size(0), window_size=window_size,
                         length_fn=lambda batch: batch[0].numel())
        self.peak_flops = peak_flops
        self._peak_line: str | None = None  # the peak last printed

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, *args, **kwargs):
        super().on_train_batch_end(trainer, pl_module, outputs, batch, *args, **kwargs)
        memory = max_memory_gib(pl_module.device)
        if memory is not None:  # (logged as the loss is: at the log interval)
            pl_module.log("train/device/max_memory_gib", memory)

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, *args, **kwargs):
        # timed (the training clock leaves validations out), not logged: Lightning logs it at the
        # count of validation batches, which metrics.csv and wandb would read as training steps
        if not trainer.sanity_checking and trainer.is_global_zero:
            self._update(trainer, pl_module, batch, iter_num=0)  # (iter_num: unused)

    def setup(self, trainer, pl_module, stage):
        peak, source = self.peak_flops, "--throughput.peak_flops"
        device = trainer.strategy.root_device
        name = torch.cuda.get_device_name(device) if device.type == "cuda" else str(device)
        if peak is None and device.type == "cuda":
            precision = str(trainer.precision)
            tf32 = torch.get_float32_matmul_precision() != "highest"
            peak = table_peak_flops(name, precision, tf32=tf32)
            source = f"{name}, {peak_dtype(precision, tf32)} dense peak"
        with warnings.catch_warnings():
            if peak is not None:  # Lightning's look-up, unused then, warns of GPUs it lacks
                warnings.filterwarnings("ignore", message="FLOPs not found|.* does not support")
            super().setup(trainer, pl_module, stage)  # sets available_flops from Lightning's table
        if peak is None:  # Lightning's figure, if it has one (it warns where it has none)
            peak, source = self.available_flops, f"{name}, Lightning's table"
        else:  # Lightning's Throughput takes no peak of ours: set it on each
            self.available_flops = peak
            for throughput in self._throughputs.values():
                throughput.available_flops = peak
        line = f"MFU against {peak / 1e12:g} TFLOP/s ({source})" if peak else None
        if line and line != self._peak_line:  # (setup runs again for each fit, validate ...)
            self._peak_line = line
            rank_zero_info(line)


def max_memory_gib(device: torch.device) -> float | None:
    """The most memory PyTorch has allocated on a CUDA ``device`` so far, in GiB (a host-side
    counter: no synchronisation); None on other devices."""
    if device.type != "cuda":
        return None
    return torch.cuda.max_memory_allocated(device) / 2**30


class TargetLoss(L.Callback):
    """Time to a target loss: the first validation whose ``val/loss`` is at most ``loss``, with the
    step and three clocks (``RunState``): the training time (validations left out: the speedrun's
    measure), the wall time since training started, validations included, both at the moment that
    validation began, and the command time, from the moment the command started to the moment that
    validation's loss was known (start-up, data and every validation: what its user waited).
    Printed when it happens and at the end of training (``summary``), logged once as
    ``target/step``, ``target/train_time_s``, ``target/wall_time_s`` and
    ``target/command_time_s`` (a row of metrics.csv, and wandb's history and run summary), and kept
    in checkpoints (a resumed run still knows). The resolution is the validation interval: the
    target was reached at most ``val_check_interval`` steps earlier."""

    def __init__(self, loss: float):
        if not loss > 0:
            raise ValueError(f"--target_loss must be a positive loss, got {loss}")
        self.loss = loss
        self.reached: dict | None = None
        self.best: float | None = None

    def on_validation_end(self, trainer, pl_module):
        metric = trainer.callback_metrics.get("val/loss")
        if trainer.sanity_checking or metric is None:
            return
        loss = metric.item()
        self.best = loss if self.best is None else min(self.best, loss)
        if self.reached is not None or loss > self.loss:
            return
        clock = RunState.of(trainer)
        wall, train = clock.val_started_at
        self.reached = {"step": trainer.global_step, "wall_time_s": wall, "train_time_s": train,
                        "command_time_s": clock.val_known_at, "val_loss": loss}
        rank_zero_info(f"\n{self.summary()}")
        metrics = {f"target/{key}": value for key, value in self.reached.items()}
        for logger in trainer.loggers:  # at the validation's step, as the loggers number it
            logger.log_metrics(metrics, step=trainer.global_step - 1)
            if isinstance(logger, WandbLogger) and trainer.is_global_zero:
                # the runs table's columns, set: an offline run's file holds no summary of keys
                # that were only logged
                logger.experiment.summary.update(metrics)

    def summary(self) -> str:
        if self.reached is None:
            best = f" (best {self.best:.4f})" if self.best is not None else ""
            return f"val/loss has not reached the target {self.loss}{best}"
        r = self.reached
        command = (f", {r['command_time_s']:.1f} s from the command's start"
                   if r.get("command_time_s") is not None else "")  # (older checkpoints: none)
        return (f"Time to val/loss <= {self.loss}: step {r['step']}, {r['train_time_s']:.1f} s of "
                f"training ({r['wall_time_s']:.1f} s with validations{command}; val/loss "
                f"{r['val_loss']:.4f})")

    def state_dict(self) -> dict:
        return {"reached": self.reached, "best": self.best}

    def load_state_dict(self, state_dict: dict) -> None:
        self.reached, self.best = state_dict["reached"], state_dict["best"]
