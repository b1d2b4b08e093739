"""Run folders and logging: each run has its own folder, ``{save_dir}/{project}/{name}-{id}``,
holding config.yaml, metrics.csv (always written, so that runs compare with no wandb account),
checkpoints/ and wandb/, and while a process trains it, the .lock that keeps others out. Resuming
from a checkpoint of a run continues that run: the same folder, CSV and wandb run."""

import contextlib
import csv
import fcntl
import json
import logging
import netrc
import os
import re
import secrets
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Literal

import torch
from lightning.pytorch.cli import SaveConfigCallback
from lightning.pytorch.loggers import CSVLogger, Logger, WandbLogger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter
from lightning.pytorch.loggers.logger import rank_zero_experiment
from lightning.pytorch.utilities import rank_zero_info

from model.device import device_info

from .checkpointing import replacing
from .errors import UsageError


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


class RunFolderLock:
    """One writer per run folder: the process that trains a run holds an exclusive lock on its
    ``.lock`` file, which names it (pid and host). A second process on the run ends at once naming
    the first; the operating system releases the lock when its process ends, however it ends, so a
    lock left by a killed process is taken over (with a note) rather than blocking the resume.

    ``claim`` makes the folder of a new run (it must not exist: two new runs with one ``--run.id``
    cannot share it) or locks that of a resumed one; ``release`` unlocks it. ``made``: whether
    this process made the folder (a start that fails may remove it then, and only then)."""

    NAME = ".lock"

    def __init__(self, folder: Path):
        self.folder, self._fd, self.made = folder, None, False

    def check(self, new: bool) -> None:
        """The messages of ``claim``, without claiming: a check before the run is set up."""
        holder = self.holder()
        if holder is not None:
            raise UsageError(f"the run {self.folder} is being trained by {holder}: wait for it to "
                             f"end, or stop it; one process writes a run at a time")
        if new and self.folder.exists():
            raise UsageError(f"the run folder {self.folder} exists already: choose another "
                             f"--run.id, or resume that run with --ckpt_path "
                             f"{self.folder}/checkpoints/last.ckpt")

    def holder(self) -> str | None:
        """The process that holds the lock; None when none does."""
        try:
            fd = os.open(self.folder / self.NAME, os.O_RDONLY)
        except OSError:
            return None
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
            return None
        except BlockingIOError:
            return os.read(fd, 200).decode(errors="replace").strip() or "another process"
        finally:
            os.close(fd)

    def claim(self, new: bool) -> str | None:
        """Lock the folder; returns a note when a lock left by an ended process was taken over."""
        if not new and not self.folder.is_dir():
            raise UsageError(f"the run folder {self.folder} that the checkpoint belongs to is "
                             f"gone: resume from the last.ckpt in the run's folder where it now "
                             f"is, or start a new run from these weights with --model.init_from")
        if new:
            try:
                self.folder.mkdir(parents=True)
            except FileExistsError:
                self.check(new)  # says why
                raise
            self.made = True
        while True:  # until the file we lock is the one in the folder (see release)
            path = self.folder / self.NAME
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                self.check(new=False)  # says by whom
                continue  # (it ended in between)
            if os.path.exists(path) and os.stat(path).st_ino == os.fstat(fd).st_ino:
                break
            os.close(fd)  # released and removed while we opened it: lock the new one
        previous = os.read(fd, 200).decode(errors="replace").strip()
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"process {os.getpid()} on {socket.gethostname()}\n".encode(), 0)
        self._fd = fd
        if previous:
            return f"Note: took over the run's lock from {previous}, which has ended"
        return None

    def release(self) -> None:
        """Remove the lock file, then unlock: a process waiting on the removed file tries again."""
        if self._fd is not None:
            with contextlib.suppress(OSError):  # a folder now read-only: the next claim takes
                (self.folder / self.NAME).unlink(missing_ok=True)  # the lock over
            os.close(self._fd)
            self._fd = None


def newest_run_config(run_dir: Path) -> Path:
    """The run's config.yaml, or config-resume-N.yaml of its latest resume (SaveRunConfig)."""
    resumes = sorted(run_dir.glob("config-resume-*.yaml"),
                     key=lambda path: int(path.stem.rpartition("-")[2]))
    return resumes[-1] if resumes else run_dir / "config.yaml"


def wandb_mode(mode: str | None) -> str | None:
    """The mode to ask wandb for (None lets wandb read $WANDB_MODE): online where an API key is set
    up, else offline; online without a key ends the start, rather than a run that fails to log."""
    asked = mode or os.environ.get("WANDB_MODE")
    if asked == "online" and not wandb_key_found():
        raise UsageError("wandb mode online needs a wandb API key: run `wandb login` (or set "
                         "WANDB_API_KEY), or log offline with --run.mode offline and upload "
                         "later with `wandb sync`")
    if asked:
        return mode
    return "online" if wandb_key_found() else "offline"


def wandb_key_found() -> bool:
    """Whether wandb has an API key: $WANDB_API_KEY, or ~/.netrc as `wandb login` writes it."""
    if os.environ.get("WANDB_API_KEY"):
        return True
    host = re.sub(r"^\w+://|[:/].*$", "", os.environ.get("WANDB_BASE_URL", "api.wandb.ai"))
    try:
        return netrc.netrc(os.environ.get("NETRC")).authenticators(host) is not None
    except (OSError, netrc.NetrcParseError):
        return False


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


class _StepRowsWriter(ExperimentWriter):
    """metrics.csv with one row per step, rewritten whole into a temporary file and renamed into
    place at each save: a kill never leaves a half-written row. (Lightning's writer appends a row
    per log call, so that one step's learning rate, throughput and loss take three rows, and
    deletes an earlier metrics.csv: a resumed run's.)"""

    def __init__(self, log_dir: str, rows: list[dict]):
        super().__init__(log_dir)
        self.rows = {}  # step -> its metrics (a run from before kept a row per log call: merged)
        for row in rows:
            step = int(row["step"])
            self.rows.setdefault(step, {"step": step}).update(
                (key, value) for key, value in row.items() if value != "" and key != "step")

    def _check_log_dir_exists(self):  # (where Lightning's deletes the file)
        pass

    def log_metrics(self, metrics_dict, step=None):
        row = self.rows.setdefault(step, {"step": step})
        row.update((key, value.item() if isinstance(value, torch.Tensor) else value)
                   for key, value in metrics_dict.items())

    def save(self):
        # the whole file each time (Lightning saves its loggers after every log call, and a
        # checkpoint saves it too): ~10k rows, a long run's at one row per 10 steps, take
        # milliseconds
        keys = ["step", *sorted({key for row in self.rows.values() for key in row} - {"step"})]
        with replacing(Path(self.metrics_file_path), "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=keys)
            writer.writeheader()
            writer.writerows(self.rows[step] for step in sorted(self.rows))


class RunCSVLogger(CSVLogger):
    """Lightning's CSVLogger writing ``metrics.csv`` straight into a run folder, one row per step,
    saved at every checkpoint too (``_StepRowsWriter``). Resuming from the checkpoint after step
    ``resume_step`` (its global step: the steps done), it keeps the rows of the steps before it and
    drops the later ones, which the resumed run logs again."""

    def __init__(self, run_dir: Path, resume_step: int | None = None):
        super().__init__(save_dir=run_dir.parent, name="", version=run_dir.name)
        self.resume_step = resume_step

    @property
    @rank_zero_experiment
    def experiment(self) -> ExperimentWriter:
        if self._experiment is None:
            path, rows = Path(self.log_dir) / "metrics.csv", []
            if self.resume_step is not None and path.is_file():
                with open(path, newline="") as f:  # (step n is the (n+1)-th: 0 is the first)
                    rows = [row for row in csv.DictReader(f)
                            if row.get("step") and int(row["step"]) < self.resume_step]
            self._experiment = _StepRowsWriter(self.log_dir, rows)
        return self._experiment

    def after_save_checkpoint(self, checkpoint_callback):
        self.save()  # the metrics up to a checkpoint are on disk with it

    def finalize(self, status):
        try:
            super().finalize(status)
        except OSError:  # a run failing on a full disk, say: its own error is the one to report
            if status != "failed":
                raise


def run_loggers(run: RunConfig, name: str, run_id: str, run_dir: Path, resume_step: int | None,
                job_type: str) -> list[Logger]:
    """The run's CSV and wandb loggers, both writing into ``run_dir``."""
    import wandb  # (a second or two to import: only for a run)

    # wandb's banner, and its history and summary at the end, are not printed: the run's own lines
    # say where it logs (an online run keeps wandb's link to its page; finish_loggers prints how to
    # upload an offline one)
    mode = wandb_mode(run.mode)
    offline = (mode or os.environ.get("WANDB_MODE")) != "online"
    wandb_logger = WandbLogger(name=name, project=run.project, id=run_id, save_dir=str(run_dir),
                               group=run.group, tags=run.tags, notes=run.notes,
                               entity=run.entity, mode=mode, job_type=job_type,
                               settings=wandb.Settings(quiet=True, silent=offline))
    wandb_logger._wandb_init.pop("anonymous", None)  # Lightning passes it; wandb warns it is gone
    return [RunCSVLogger(run_dir, resume_step=resume_step), wandb_logger]


def finish_loggers(loggers: list[Logger], exit_code: int = 0, rank_zero: bool = True,
                   announce: bool = True) -> None:
    """Flush the loggers and close the wandb run (the next run in this process gets its own): each
    of them, even after one failed (a full disk, say), then raise the first failure. ``announce``:
    print how to upload an offline wandb run (not for a folder about to be removed)."""
    failures = []
    for logger in loggers:
        if getattr(logger, "_experiment", True) is None:  # never start one to end it
            continue
        try:
            if isinstance(logger, WandbLogger):
                if rank_zero:
                    _finish_wandb(logger.experiment, exit_code, announce)
            else:
                logger.save()
        except Exception as e:
            failures.append(e)
    if failures:
        raise failures[0]


def stop_wandb() -> None:
    """Stop wandb's service and console capture, if wandb started: nothing more is written into
    the run's folder (a start stopped half way has a wandb run that no logger holds)."""
    wandb = sys.modules.get("wandb")
    if wandb is None:
        return
    if wandb.run is not None:  # (its console capture would write on, to a stopped service)
        with contextlib.suppress(Exception):
            wandb.run.finish(exit_code=1)
    with contextlib.suppress(Exception):
        wandb.teardown()
    logging.getLogger("wandb").handlers.clear()


def _finish_wandb(run, exit_code: int, announce: bool) -> None:
    offline = run.settings.mode == "offline"
    try:
        run.finish(exit_code=exit_code)
    finally:
        # finish() can return before wandb's service has written the last records of the run's
        # .wandb file (3 of 30 offline runs read short right after it); stopping the service
        # flushes it, so the file is whole when this run returns. After a failed finish too, so
        # that the next run in this process starts clean (without the failed run's log file)
        stop_wandb()
    if offline and announce:
        rank_zero_info(f"wandb: logged offline; upload with `wandb sync {Path(run.dir).parent}`")


# wandb run summaries keep the best value of these (and the last): val loss is best low, BLEU high
SUMMARY_METRICS = {"val/loss": "min", "val/ppl": "min", "val/bpb": "min", "val/bleu": "max",
                   "val/bleu_lc": "max"}


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
