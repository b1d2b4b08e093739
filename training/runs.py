"""Run folders and logging: each run has its own folder, ``{save_dir}/{project}/{name}-{id}``,
holding config.yaml, metrics.csv (always written, so that runs compare with no wandb account),
checkpoints/ and wandb/. Resuming from a checkpoint of a run continues that run: the same folder,
CSV and wandb run."""

import csv
import json
import netrc
import os
import re
import secrets
import subprocess
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Literal

from lightning.pytorch.cli import SaveConfigCallback
from lightning.pytorch.loggers import CSVLogger, Logger, WandbLogger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter
from lightning.pytorch.loggers.logger import rank_zero_experiment

from model.device import device_info


@dataclass
class RunConfig:
    """Where a run's files go and how wandb knows it (the ``run`` section of a config).

    Args:
        project: wandb project, and the folder of its runs under ``save_dir``; default
            ``$WANDB_PROJECT``, else ``mini-gpt``.
        name: readable run name; default from the config: file stem, model shape, attention path,
            precision.
        group: wandb group; default ``$WANDB_RUN_GROUP``, else the config file's stem.
        tags: wandb tags; default ``$WANDB_TAGS`` (comma-separated).
        notes: wandb notes.
        entity: wandb user or team; default ``$WANDB_ENTITY``, else your wandb default.
        mode: wandb ``online``, ``offline`` (upload later with ``wandb sync``) or ``disabled``;
            default ``$WANDB_MODE``, else online where a wandb API key is set up, else offline.
        id: run id; default new for each run (a date and 4 random hex digits). Give it to resume a
            wandb run by id, or to share one id between the nodes of a multi-node job.
        save_dir: folder of the projects' run folders.
    """

    project: str | None = None
    name: str | None = None
    group: str | None = None
    tags: list[str] | None = None
    notes: str | None = None
    entity: str | None = None
    mode: Literal["online", "offline", "disabled"] | None = None
    id: str | None = None
    save_dir: str = "runs"

    def with_environment(self, stem: str) -> "RunConfig":
        """The settings the config leaves unset, taken from wandb's environment variables as wandb
        itself would (WANDB_MODE is read by ``wandb_mode``), else from our defaults."""
        env = os.environ.get
        tags = self.tags if self.tags is not None else env("WANDB_TAGS", "").split(",")
        return replace(self, project=self.project or env("WANDB_PROJECT") or "mini-gpt",
                       group=self.group or env("WANDB_RUN_GROUP") or stem,
                       tags=[t.strip() for t in tags if t.strip()],
                       entity=self.entity or env("WANDB_ENTITY"))

    def new_run_folder(self, name: str, run_id: str | None) -> tuple[str, Path]:
        """The id (``run_id``, else a new one) and folder of a new run named ``name``."""
        run_id = run_id or f"{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(2)}"
        folder = re.sub(r"[^\w.+-]", "_", name) + f"-{run_id}"
        return run_id, Path(self.save_dir) / self.project / folder


def wandb_mode(mode: str | None) -> str | None:
    """The mode to ask wandb for; None lets wandb read $WANDB_MODE."""
    if mode or os.environ.get("WANDB_MODE"):
        return mode
    if os.environ.get("WANDB_API_KEY"):
        return "online"
    try:
        return "online" if netrc.netrc().authenticators("api.wandb.ai") else "offline"
    except (OSError, netrc.NetrcParseError):
        return "offline"


def git_commit() -> str | None:
    """The commit of this code, with ``+dirty`` when tracked files have changed since; None outside
    git."""
    def git(*args):
        return subprocess.run(["git", *args], cwd=Path(__file__).resolve().parent, timeout=10,
                              capture_output=True, text=True, check=True).stdout.strip()
    try:
        dirty = git("status", "--porcelain", "--untracked-files=no")
        return git("rev-parse", "HEAD") + ("+dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return None


class _KeepingWriter(ExperimentWriter):
    def _check_log_dir_exists(self):  # Lightning's warns about, and deletes, an earlier metrics.csv
        pass


class RunCSVLogger(CSVLogger):
    """Lightning's CSVLogger writing ``metrics.csv`` straight into a run folder. Resuming, it keeps
    the rows up to the step it resumes from (Lightning's deletes the file) and drops the later ones,
    which the resumed run logs again."""

    def __init__(self, run_dir: Path, resume_step: int | None = None):
        super().__init__(save_dir=run_dir.parent, name="", version=run_dir.name)
        self.resume_step = resume_step

    @property
    @rank_zero_experiment
    def experiment(self) -> ExperimentWriter:
        if self._experiment is None:
            self._experiment = _KeepingWriter(self.log_dir)
            path = self._experiment.metrics_file_path
            if self.resume_step is not None and os.path.isfile(path):
                with open(path, newline="") as f:
                    reader = csv.DictReader(f)
                    rows = [row for row in reader
                            if row["step"] and int(row["step"]) <= self.resume_step]
                with open(path, "w", newline="") as f:
                    writer = csv.DictWriter(f, fieldnames=reader.fieldnames)
                    writer.writeheader()
                    writer.writerows(rows)
                self._experiment.metrics_keys = list(reader.fieldnames)
        return self._experiment


def run_loggers(run: RunConfig, name: str, run_id: str, run_dir: Path, resume_step: int | None,
                job_type: str) -> list[Logger]:
    """The run's CSV and wandb loggers, both writing into ``run_dir``."""
    return [RunCSVLogger(run_dir, resume_step=resume_step),
            WandbLogger(name=name, project=run.project, id=run_id, save_dir=str(run_dir),
                        group=run.group, tags=run.tags, notes=run.notes, entity=run.entity,
                        mode=wandb_mode(run.mode), job_type=job_type)]


def finish_loggers(loggers: list[Logger], exit_code: int = 0, rank_zero: bool = True) -> None:
    """Flush the loggers and close the wandb run (the next run in this process gets its own)."""
    for logger in loggers:
        started = getattr(logger, "_experiment", True) is not None  # never start one to end it
        if started:
            logger.save()
        if started and isinstance(logger, WandbLogger) and rank_zero:
            logger.experiment.finish(exit_code=exit_code)
            # finish() can return before wandb's service has written the last records of the
            # run's .wandb file (3 of 30 offline runs read short right after it); stopping the
            # service flushes it, so the file is whole when this run returns.
            import wandb  # (imported already, by the logger)

            wandb.teardown()


# wandb run summaries keep the best value of these (and the last): val loss is best low, BLEU high
SUMMARY_METRICS = {"val/loss": "min", "val/ppl": "min", "val/bleu": "max", "val/bleu_lc": "max"}


class SaveRunConfig(SaveConfigCallback):
    """Writes the resolved config into the run folder, as config.yaml (config-resume-N.yaml at the
    N-th resume: nothing is overwritten), and logs it to every logger with the parameter count, the
    device and the git commit, so that runs can be filtered and grouped by any setting."""

    def save_config(self, trainer, pl_module, stage):
        folder = Path(trainer.loggers[0].log_dir)  # the CSV logger's (trainer.log_dir would wait)
        folder.mkdir(parents=True, exist_ok=True)
        path, n = folder / "config.yaml", 0
        while path.exists():
            n += 1
            path = folder / f"config-resume-{n}.yaml"
        self.parser.save(self.config, str(path), skip_unset=False)
        config = json.loads(json.dumps(self.config.as_dict(), default=str))
        config["config_files"] = config.pop("config", None)
        device = device_info(trainer.strategy.root_device.type).describe()
        config.update(n_params=sum(p.numel() for p in pl_module.parameters()),
                      git_commit=git_commit(), device=device,
                      **{f"run_{key}": value for key, value in (pl_module.run_info or {}).items()})
        for logger in trainer.loggers:
            logger.log_hyperparams(config)
            if isinstance(logger, WandbLogger) and trainer.is_global_zero:  # for the runs table
                for metric, best in SUMMARY_METRICS.items():
                    logger.experiment.define_metric(metric, summary=f"{best},last")
