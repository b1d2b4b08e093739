"""What a run prints: the project's lines and Lightning's progress, not the libraries' noise (tips,
warnings about library internals, lines that say nothing on this run)."""

import logging
import warnings

from lightning.pytorch.callbacks import ModelSummary as LightningModelSummary
from lightning.pytorch.callbacks import TQDMProgressBar
from lightning.pytorch.utilities import rank_zero_info
from lightning.pytorch.utilities.model_summary.model_summary import _format_summary_table

# Lightning's info lines that say nothing about a run: an advertisement, the accelerators it does
# not have (the "Device:" line says what the run uses), and that it takes our model summary
NOISE = ("💡 Tip:", "GPU available: False, used: False", "TPU available: False",
         "Trainer already configured with model summary")
# warnings about the libraries' own code, which a user cannot act on
LIBRARY_WARNINGS = [
    (FutureWarning, r".*isinstance\(treespec, LeafSpec\)"),  # Lightning's pytree, newer torch
    (UserWarning, r"LightningCLI's args parameter is intended"),  # tests and scripts pass args
    (UserWarning, r".*does not have many workers"),  # the data is in memory: workers do not help
    (UserWarning, r"Checkpoint directory .* exists and is not empty"),  # a resumed run's, its own
]


class _DropNoise(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).lstrip().startswith(NOISE)


def quiet_libraries() -> None:
    """Drop the lines of NOISE and LIBRARY_WARNINGS (once per process)."""
    for category, message in LIBRARY_WARNINGS:
        warnings.filterwarnings("ignore", message=message, category=category)
    for name in ("lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.rank_zero"):
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropNoise) for f in logger.filters):
            logger.addFilter(_DropNoise())


class ModelSummary(LightningModelSummary):
    """Lightning's table of the model's modules and parameter counts, without its FLOPs: they are
    counted from an example input, which the modules here do not give, and read 0 (the Throughput
    callback logs the FLOPs of each step)."""

    @staticmethod
    def summarize(summary_data, total_parameters, trainable_parameters, model_size,
                  total_training_modes, total_flops, **summarize_kwargs):
        columns = [(name, values) for name, values in summary_data if name != "FLOPs"]
        table = _format_summary_table(total_parameters, trainable_parameters, model_size,
                                      total_training_modes, total_flops, *columns)
        rank_zero_info("\n" + table.rpartition("\n")[0])  # the table, less its total FLOPs


class StepProgressBar(TQDMProgressBar):
    """Lightning's progress bar, counting a run of ``max_steps`` in optimizer steps. Lightning's
    counts batches against the optimizer steps left: with accumulated batches it is full a
    fraction of the way through and counts on without a total, and a resumed run starts it at
    the batches already done against the steps left."""

    def _counts_steps(self, trainer) -> bool:  # when Lightning's total is the steps left
        return trainer.max_epochs == -1 and trainer.max_steps is not None and trainer.max_steps > 0

    def _start_at_steps_done(self, trainer) -> None:
        if self._counts_steps(trainer):
            self.train_progress_bar.total = trainer.max_steps
            self.train_progress_bar.n = trainer.global_step
            self.train_progress_bar.refresh()

    def on_train_start(self, trainer, *args):  # (a run resumed mid-epoch starts no epoch)
        super().on_train_start(trainer, *args)
        self._start_at_steps_done(trainer)

    def on_train_epoch_start(self, trainer, *args):
        super().on_train_epoch_start(trainer, *args)
        self._start_at_steps_done(trainer)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if not self._counts_steps(trainer):
            return super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        bar, step = self.train_progress_bar, trainer.global_step  # steps done, this one's too
        # redrawn every refresh_rate steps and at the end (at each batch of such a step: a redraw
        # costs ~1 ms)
        if bar is not None and (step % self.refresh_rate == 0 or step == bar.total):
            bar.n = step
            bar.set_postfix(self.get_metrics(trainer, pl_module))  # (redraws)
