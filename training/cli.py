"""train.py's command line: LightningCLI for one model kind, with what every run has (its folder and
loggers, checkpoints, the learning-rate and throughput monitors, its clock), ``auto`` precision and
attention path resolved for the device, resuming a run from its checkpoint and warm starts.

Reading order: the Trainer with ``auto`` precision; the CLI (options, ``auto``, the checks of a
resume or warm start, the run's Trainer, running and finishing); building it.
"""

import contextlib
import os
import shutil
import signal
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Literal

import lightning as L
from lightning.fabric.connector import _PRECISION_INPUT
from lightning.fabric.utilities.exceptions import MisconfigurationException
from lightning.pytorch.callbacks import LearningRateMonitor, ProgressBar
from lightning.pytorch.callbacks import ModelSummary as LightningModelSummary
from lightning.pytorch.cli import LightningCLI
from lightning.pytorch.plugins import CheckpointIO
from lightning.pytorch.utilities import rank_zero_info, rank_zero_only
from lightning.pytorch.utilities.exceptions import SIGTERMException
from lightning.pytorch.utilities.model_summary import get_human_readable_count

from model import GPTConfig
from model.checkpoint import load_gpt_weights, read_checkpoint, source_config, source_state_dict
from model.device import (
    DeviceInfo,
    choose_attn_impl,
    choose_precision,
    device_info,
    resolve_device,
    slow_precision_warning,
    unsupported_precision,
)

from . import resume
from .callbacks import TargetLoss, Throughput
from .checkpointing import AtomicCheckpointIO, Checkpoint
from .command import ModelKind, model_kind, subcommands
from .console import ModelSummary, StepProgressBar, quiet_libraries
from .errors import Stopped, UsageError
from .global_batch import apply_tokens_per_step, planned_steps
from .memory import keep_freed_memory
from .run_state import RunState
from .runs import RunConfig, RunFolderLock, SaveRunConfig, finish_loggers, run_loggers, stop_wandb
from .trainer_checks import check_length, check_strategy


def accelerator_device(accelerator) -> DeviceInfo:
    """The device a Trainer ``accelerator`` setting trains on, and what it can do."""
    return device_info(resolve_device(accelerator if isinstance(accelerator, str) else "auto"))


class Trainer(L.Trainer):
    """Lightning's Trainer, whose ``precision`` also takes ``auto`` (the default): bf16-mixed where
    the device computes in bf16, else 16-mixed on GPUs and 32-true on CPUs
    (``model.device.choose_precision``). The CLI resolves ``auto`` before building the Trainer, so
    that the run's config holds the choice."""

    def __init__(self, *args, precision: Literal["auto"] | _PRECISION_INPUT | None = "auto",
                 **kwargs):
        if precision == "auto":
            precision = choose_precision(accelerator_device(kwargs.get("accelerator", "auto")))
        super().__init__(*args, precision=precision, **kwargs)


def _as_list(value) -> list:
    """A Trainer option that takes one object or a list of them (None, or a bool, is none)."""
    if value is None or isinstance(value, bool):
        return []
    return list(value) if isinstance(value, list) else [value]


class CLI(LightningCLI):
    """LightningCLI for one ``ModelKind``, with what every run shares: the run folder and wandb
    (``run``, see ``RunConfig``), checkpoints (best by val/loss, and last), the learning rate and
    throughput monitors, ``auto`` precision and attention path, and resuming a run from its
    checkpoint. Loggers given in ``trainer.logger`` are added to the run's CSV and wandb ones.

    Args:
        model_kind: the model kind to train.
        kind_names: every kind's name, which a config's ``kind`` may give.
        launcher_run_id: the run id of a multi-process run, which its launcher passes to the
            worker processes in $MINIGPT_RUN_ID (they start from the command line again).
        command_started: when the command started, in ``time.time()`` seconds, for the command
            clock of ``RunState`` (default: now).
        subcommands: the subcommands to build parsers for (``training.command.subcommands``;
            default: all of Lightning's).
    """

    def __init__(self, model_kind: ModelKind, *, kind_names: tuple[str, ...] = ("gpt",),
                 launcher_run_id: str | None = None, command_started: float | None = None,
                 subcommands: dict[str, set[str]] | None = None, **kwargs):
        self.model_kind, self.kind_names = model_kind, kind_names
        self.launcher_run_id = launcher_run_id
        self.command_started = time.time() if command_started is None else command_started
        self._subcommands = LightningCLI.subcommands() if subcommands is None else subcommands
        super().__init__(model_kind.module, model_kind.data, **kwargs)

    def subcommands(self) -> dict[str, set[str]]:  # (Lightning's is static: every subcommand)
        return self._subcommands

    def add_arguments_to_parser(self, parser):
        parser.add_argument("--kind", choices=list(self.kind_names), default="gpt",
                            help="the model to train")
        # the data decides the longest sequence and the vocabulary; the model follows
        seq_len = self.model_kind.seq_len_option
        parser.link_arguments(f"data.{seq_len}", f"model.config.{seq_len}")
        parser.link_arguments("data.vocab_size", "model.config.vocab_size", apply_on="instantiate")
        parser.add_class_arguments(RunConfig, "run")
        parser.add_lightning_class_args(Checkpoint, "checkpoint")
        parser.set_defaults({"checkpoint.monitor": "val/loss", "checkpoint.mode": "min",
                             "checkpoint.save_last": True, "checkpoint.filename": "best-{step}"})
        parser.add_lightning_class_args(LearningRateMonitor, "lr_monitor")
        parser.set_defaults({"lr_monitor.logging_interval": "step"})
        parser.add_lightning_class_args(Throughput, "throughput")
        parser.add_argument("--tokens_per_step", type=int | None, default=None,
                            help="tokens per optimizer step over all processes (a GPT's global "
                                 "batch): sets trainer.accumulate_grad_batches from the "
                                 "micro-batch and the number of processes, and reads "
                                 "trainer.val_check_interval as optimizer steps "
                                 "(training/global_batch.py)")
        parser.add_argument("--max_tokens", type=int | None, default=None,
                            help="training budget in tokens, with --tokens_per_step: training "
                                 "stops after max_tokens / tokens_per_step steps, or at "
                                 "trainer.max_steps if that comes first")
        parser.add_argument("--target_loss", type=float | None, default=None,
                            help="report the step and time at which val/loss first reaches this "
                                 "(training.callbacks.TargetLoss)")
        # --help: this project's options (model, data, run, checkpoint ...) before Lightning's
        # Trainer's, which are many
        groups = parser._action_groups
        trainer = [group for group in groups if group.title and "Trainer" in group.title]
        parser._action_groups = [g for g in groups if g not in trainer] + trainer

    def _subconfig(self, config):
        return config[self.subcommand] if self.subcommand else config

    def before_instantiate_classes(self):
        """Resolve ``auto`` precision and attention path from what the device can do
        (model/device.py), in the config itself: the run's config.yaml and wandb config hold the
        choice, not ``auto``."""
        config = self._subconfig(self.config)
        trainer, model_config = config.trainer, config.model.config
        check_length(trainer)
        check_strategy(trainer, config.model)
        info = accelerator_device(trainer.accelerator)
        if (why := unsupported_precision(info, trainer.precision)) is not None:
            raise UsageError(why)
        resolved = []
        if trainer.precision == "auto":
            trainer.precision = choose_precision(info)
            resolved.append(f"precision auto -> {trainer.precision}")
        elif (warning := slow_precision_warning(info, trainer.precision)) is not None:
            rank_zero_info(f"Warning: {warning}")
        if model_config.attn_impl == "auto":
            model_config.attn_impl = choose_attn_impl(
                info, str(trainer.precision), seq_len=config.data[self.model_kind.seq_len_option],
                key_mask=self.model_kind.masks_padded_keys)
            resolved.append(f"attn_impl auto -> {model_config.attn_impl}")
        choices = f"; {', '.join(resolved)}" if resolved else ""
        rank_zero_info(f"Device: {info.describe()}{choices}")

    # Resuming a run: ``--ckpt_path`` names a checkpoint. Its run continues in the same folder, CSV
    # and wandb run, with the same model and training options. The checkpoint is read once, before
    # anything is built: a missing or foreign file, or options that differ from the run's, end the
    # start with a message (training/resume.py). instantiate_trainer then finds the run's folder.

    def _parse_ckpt_path(self):
        """Lightning's (it applies the checkpoint's model hyperparameters to the config), after the
        checks above. The checkpoint is kept for instantiate_trainer."""
        subcommand = self.config.get("subcommand")
        config = self.config[subcommand] if subcommand else self.config  # (no self.subcommand yet)
        ckpt_path = config.get("ckpt_path")
        self._checkpoint = self._init_tokenizer = None
        model = config.model
        if not ckpt_path:
            if model.get("init_from"):
                self._init_tokenizer = self._take_architecture(model, model.init_from)
            return super()._parse_ckpt_path()
        resume.check_ckpt_path(ckpt_path)
        self._checkpoint = read_checkpoint(ckpt_path, "cpu", self.model_kind.name)
        if subcommand == "fit":
            max_steps = planned_steps(config.trainer.max_steps, config.get("max_tokens"),
                                      config.get("tokens_per_step"))
            resume.check_steps_left(ckpt_path, max_steps, self._checkpoint["global_step"])
        if model.get("init_from"):  # a warm-started run resumes: its architecture is in the file
            self._take_architecture(model, ckpt_path)
        ours = model.as_dict()
        retuned = resume.check_resume_options(ckpt_path, ours, self._checkpoint["hyper_parameters"],
                                              self.model_kind.seq_len_option)
        super()._parse_ckpt_path()  # sets the model options to the checkpoint's...
        flat_ours = resume.flat(ours)
        for key in (*resume.RESUME_MAY_CHANGE, *resume.RESUME_MAY_RETUNE):  # ... but ours win
            if key in flat_ours:  # for these (Lightning's parse made a new self.config)
                self.config[subcommand].model[key] = flat_ours[key]
        if retuned:  # (the run's config-resume-N.yaml records them)
            rank_zero_info(f"Resuming with other optimizer settings than the checkpoint's: "
                           f"{', '.join(retuned)}")

    def _take_architecture(self, model, source: str) -> dict | None:
        """A warm start's model options take the architecture of ``source``
        (``resume.take_architecture``); returns the source's tokenizer (``to_dict()``; None for
        one this project does not know), read without the weights."""
        kind, theirs, tokenizer = source_config(source)
        if kind != self.model_kind.name:
            raise ValueError(f"--model.init_from {source} holds a {kind} model; a "
                             f"{self.model_kind.name} run cannot start from it")
        rank_zero_info(resume.take_architecture(model.config, theirs, asdict(GPTConfig()), source))
        return tokenizer

    def instantiate_trainer(self, **kwargs):
        """The Trainer, logging into the run's folder: a new one, or that of the run a fit
        resumes."""
        config = self._subconfig(self.config_init)
        files = config.get("config") or []
        stem = Path(str(files[-1])).stem if files else self.model.kind
        run: RunConfig = config.run.with_environment(stem)
        name = run.name or (f"{stem}-{self.model.shape}-{self.model.model.config.attn_impl}-"
                            f"{config.trainer.get('precision') or '32'}")
        run_id, run_dir = run.new_run_folder(name, run.id or self.launcher_run_id)
        ckpt_path = config.get("ckpt_path")
        resumed = (resume.resumed_run(self._checkpoint, ckpt_path)
                   if self.subcommand == "fit" and ckpt_path else None)
        if resumed:
            run_id, name, run_dir = resumed[0]["id"], resumed[0]["name"], Path(resumed[0]["dir"])
        tokenizer = getattr(self.datamodule, "tokenizer", None)
        if self._checkpoint is not None and "tokenizer" in self._checkpoint:
            resume.check_resume_tokenizer(ckpt_path, tokenizer, self._checkpoint["tokenizer"])
        elif self.model.hparams.get("init_from"):  # a warm start: the data must speak its tokens
            resume.check_warm_start_tokenizer(self.model.hparams.init_from, tokenizer,
                                              self._init_tokenizer,
                                              self.model.model.config.vocab_size)
        self.lock = RunFolderLock(run_dir)
        if not self.launcher_run_id and rank_zero_only.rank == 0:  # (rank 0 holds the lock)
            self.lock.check(new=resumed is None)
        # the folder itself is made when the run starts (_run_subcommand), so that bad input
        # leaves none behind
        self.run_dir, self.resumed = run_dir, resumed is not None
        self.model.run_info = {"id": run_id, "name": name, "dir": str(run_dir.resolve())}
        checkpoint = config.get("checkpoint")
        if checkpoint is not None and checkpoint.dirpath is None:
            checkpoint.dirpath = str(run_dir / "checkpoints")
        loggers = [*run_loggers(run, name, run_id, run_dir, resumed[1] if resumed else None,
                                job_type=self.subcommand or "fit"),
                   *_as_list(config.trainer.get("logger"))]
        rank_zero_info(f"Run {name}, id {run_id}: {run_dir}"
                       + (f" (resumed at step {resumed[1]})" if resumed else ""))
        plugins = _as_list(config.trainer.get("plugins"))
        if not any(isinstance(plugin, CheckpointIO) for plugin in plugins):
            plugins.append(AtomicCheckpointIO())
        callbacks = [*_as_list(config.trainer.get("callbacks")), RunState(self.command_started)]
        if config.get("target_loss") is not None:
            callbacks.append(TargetLoss(config.target_loss))
        if config.trainer.get("enable_model_summary") is not False and \
                not any(isinstance(callback, LightningModelSummary) for callback in callbacks):
            callbacks.append(ModelSummary())
        if config.trainer.get("enable_progress_bar") is not False and \
                not any(isinstance(callback, ProgressBar) for callback in callbacks):
            # the bar redraws when the loggers write, not at every step (a redraw costs ~1 ms)
            callbacks.append(StepProgressBar(refresh_rate=config.trainer.log_every_n_steps or 1))
        try:
            trainer = super().instantiate_trainer(**{**kwargs, "logger": loggers,
                                                     "plugins": plugins, "callbacks": callbacks})
        except MisconfigurationException as e:  # Lightning's checks of the Trainer's options
            raise UsageError(f"--trainer: {e}") from None
        if config.get("max_tokens") is not None and config.get("tokens_per_step") is None:
            raise UsageError("--max_tokens needs --tokens_per_step (the tokens of one step), or "
                             "give --trainer.max_steps instead")
        if config.get("tokens_per_step") is not None:
            if self.model_kind.name != "gpt":
                raise UsageError("--tokens_per_step sets a GPT's global batch; a translation "
                                 "run's batches are budgets of tokens already "
                                 "(--data.max_tokens): leave it unset")
            data = self.datamodule.hparams
            apply_tokens_per_step(trainer, config.tokens_per_step, data.batch_size,
                                  data[self.model_kind.seq_len_option], config.get("max_tokens"))
        short_steps = self.datamodule.hparams.get("short_steps", 0)
        steps = planned_steps(trainer.max_steps, config.get("max_tokens"),
                              config.get("tokens_per_step"))
        if short_steps and steps not in (None, -1) and short_steps >= steps:
            raise UsageError(f"--data.short_steps {short_steps} covers the whole run ({steps} "
                             f"steps): it would never train on windows of block_size, which "
                             f"validation reads; give fewer short steps")
        return trainer

    def _run_subcommand(self, subcommand):
        # The worker processes of a multi-process run start from the command line again and take
        # this run's id from the environment (build_cli): set for as long as the run lasts only,
        # so that a later CLI in this process (or one built without running) starts its own run.
        os.environ["MINIGPT_RUN_ID"] = self.model.run_info["id"]
        try:  # (the claim too: a signal may come as soon as the folder is made)
            if not self.launcher_run_id and self.trainer.is_global_zero:  # one writer per run
                note = self.lock.claim(new=not self.resumed)
                if note:
                    rank_zero_info(note)
            source = self.model.hparams.get("init_from")
            if source and not self.config_init[subcommand].ckpt_path:
                # a warm start: the source's weights before anything is trained (the optimizer is
                # made afterwards, fresh); a resumed run's weights are its checkpoint's
                load_gpt_weights(self.model.model, source_state_dict(source), source)
                n_params = self.model.model.num_params(non_embedding=False)
                rank_zero_info(f"Warm start: the weights of {source} "
                               f"({get_human_readable_count(n_params)} parameters)")
            super()._run_subcommand(subcommand)
        except BaseException as e:  # interrupted, or failed: close the wandb run as failed
            # a failed start leaves no folder (and no line on how to upload its wandb run)
            remove = self.lock.made and self.trainer.global_step == 0
            with contextlib.suppress(Exception):  # (a full disk, say: the first error is the one
                self.finish_run(exit_code=1, announce=not remove)  # to report); a resume reopens
            if remove:  # the wandb run
                stop_wandb()  # (a start stopped inside wandb's own would write into the folder)
                shutil.rmtree(self.run_dir, ignore_errors=True)
            if isinstance(e, SIGTERMException):  # Lightning's, on a SIGTERM while setting up
                raise Stopped("stopped by SIGTERM", signal.SIGTERM) from None
            if isinstance(e, SystemExit) and isinstance(e.__context__, KeyboardInterrupt):
                raise KeyboardInterrupt from None  # Lightning's exit(1) on Ctrl-C: ours is 130
            raise
        finally:
            os.environ.pop("MINIGPT_RUN_ID", None)
            self.lock.release()

    def after_fit(self):
        ckpt = self.trainer.checkpoint_callback
        if ckpt is not None and ckpt.best_model_path:
            rank_zero_info(f"Best checkpoint: {ckpt.best_model_path} "
                           f"(val/loss {ckpt.best_model_score:.4f})")
        self.model.evaluate_after_fit()
        for callback in self.trainer.callbacks:
            if isinstance(callback, TargetLoss):
                rank_zero_info(callback.summary())
        self.finish_run()

    def after_validate(self):
        self.finish_run()

    def after_test(self):
        self.finish_run()

    def finish_run(self, exit_code: int = 0, announce: bool = True):
        finish_loggers(self.trainer.loggers, exit_code, rank_zero=self.trainer.is_global_zero,
                       announce=announce)


TRAINER_DEFAULTS = {
    "max_steps": 5000,
    "val_check_interval": 250,  # training batches between validations
    "check_val_every_n_epoch": None,  # the training stream is endless: validate by steps only
    "gradient_clip_val": 1.0,
    "log_every_n_steps": 10,
}


def build_cli(kinds: dict[str, ModelKind], args: list[str] | None = None, run: bool = True,
              command_started: float | None = None) -> CLI:
    """The CLI for ``args`` (default: the command line), of the kind they ask for. ``run=False``
    builds the model, data module and Trainer without training (``args`` then has no ``fit``).
    ``command_started``: when the command started (``time.time()``; default now)."""
    args_given = sys.argv[1:] if args is None else args
    kind = kinds[model_kind(args_given, kinds)]
    chosen = subcommands(args_given)  # the one the command runs, where it names it
    quiet_libraries()  # the project's lines and Lightning's progress, not library noise
    keep_freed_memory()  # big CPU tensors reused, not paged in at every step (training/memory.py)
    # parse errors raise, for one line (training/errors.py), rather than print the usage and exit,
    # and an abbreviated option is refused (--trainer.max_step would be taken for max_steps);
    # the optimizer is the model's own (--model.optimizer): no Lightning --optimizer to bypass it
    no_exit = {"exit_on_error": False, "allow_abbrev": False}  # (a typo is no option of ours)
    usage = ("%(prog)s [--config FILE] [--model.* ...] [--data.* ...] [--run.* ...] "
             "[--checkpoint.* ...] [--trainer.* ...] [--ckpt_path CKPT]")
    parser_kwargs = {**no_exit, **{name: {**no_exit, "usage": usage} for name in chosen}}
    return CLI(kind, kind_names=tuple(kinds), subcommands=chosen, trainer_class=Trainer,
               seed_everything_default=1337, run=run, trainer_defaults=TRAINER_DEFAULTS, args=args,
               parser_kwargs=parser_kwargs, auto_configure_optimizers=False,
               save_config_callback=SaveRunConfig, save_config_kwargs={"save_to_log_dir": False},
               launcher_run_id=os.environ.pop("MINIGPT_RUN_ID", None),
               command_started=command_started)
