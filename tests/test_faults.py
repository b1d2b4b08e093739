"""Faults a run survives: kills at any moment, resumes by any path, two processes on one run,
storage that is read-only or full, and Ctrl-C while a command starts."""

import csv
import os
import random
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import REPO, fit, run_folders, tiny_run

from train import cli
from training.checkpointing import AtomicCheckpointIO
from training.errors import Stopped
from training.runs import RunCSVLogger, RunFolderLock

FLAT = ("--model.lr", "1e-9", "--model.min_lr", "0", "--model.muon_lr", "1e-9")  # a flat loss


def steps(ckpt: Path) -> int:
    return torch.load(ckpt, weights_only=True)["global_step"]


def metric_rows(folder: Path) -> list[dict]:
    with open(folder / "metrics.csv", newline="") as f:
        return list(csv.DictReader(f))


def finish(process: subprocess.Popen, timeout: float = 60) -> tuple[str, str]:
    """The process's output once it ends; killed first if it has not within ``timeout`` s."""
    try:
        return process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        out, err = process.communicate()
        pytest.fail(f"still running {timeout} s after the signal:\n{err[-3000:]}")


def one_line_error(err: str) -> str:
    lines = [line for line in err.strip().splitlines() if line.strip()]
    assert "Traceback" not in err, err[-3000:]
    return lines[-1]


def test_last_ckpt_is_written_at_every_validation_and_interval_whatever_the_loss_did(
        text_file, tmp_path, monkeypatch):
    writes = []
    save = AtomicCheckpointIO.save_checkpoint

    def recording(self, checkpoint, path, storage_options=None):
        writes.append((Path(path).name, checkpoint["global_step"]))
        save(self, checkpoint, path, storage_options)

    monkeypatch.setattr(AtomicCheckpointIO, "save_checkpoint", recording)
    fit(text_file, tmp_path, *FLAT, "--trainer.val_check_interval", "5",
        "--checkpoint.every_n_steps", "3", "--trainer.log_every_n_steps", "1")
    last = sorted({step for name, step in writes if name == "last.ckpt"})
    assert last == [3, 5, 6, 9, 10, 12, 15, 18, 20]  # every interval and every validation
    folder, = run_folders(tmp_path)
    names = {path.name for path in (folder / "checkpoints").iterdir()}
    best = [name for name in names if name.startswith("best-")]
    assert names == {"last.ckpt", *best} and len(best) == 1  # never last-v1.ckpt
    # a checkpoint's name gives the step as metrics.csv numbers it: the last step trained
    best_step = int(best[0].removeprefix("best-step=").removesuffix(".ckpt"))
    rows = {int(row["step"]): row for row in metric_rows(folder)}
    assert rows[best_step]["val/loss"] and best_step + 1 in {step for _, step in writes}
    assert sorted(rows) == list(range(20))  # one row per step


def test_a_resume_by_any_path_continues_the_run_in_its_own_folder(text_file, tmp_path,
                                                                   monkeypatch):
    same = ("--trainer.val_check_interval", "2", "--trainer.log_every_n_steps", "1")
    monkeypatch.chdir(tmp_path)
    fit(text_file, tmp_path, *same, "--trainer.max_steps", "2", "--run.save_dir", ".")  # relative
    folder, = run_folders(tmp_path)
    (tmp_path / "link").symlink_to(folder)
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "latest.ckpt").symlink_to(folder / "checkpoints" / "last.ckpt")
    moved = tmp_path / "elsewhere" / folder.name

    def moved_folder():
        monkeypatch.chdir(tmp_path)
        moved.parent.mkdir()
        folder.rename(moved)
        return moved / "checkpoints" / "last.ckpt"

    paths = [lambda: Path(os.path.relpath(folder, tmp_path)) / "checkpoints" / "last.ckpt",
             lambda: folder / "checkpoints" / "last.ckpt",
             lambda: tmp_path / "link" / "checkpoints" / "last.ckpt",
             lambda: (monkeypatch.chdir(tmp_path / "other"), Path("latest.ckpt"))[-1],
             moved_folder]
    for i, path in enumerate(paths, start=1):
        ckpt = path()
        assert cli(tiny_run(text_file, tmp_path, *same, "--trainer.max_steps", str(2 + 2 * i),
                            "--ckpt_path", str(ckpt))) == 0
        assert steps(ckpt) == 2 + 2 * i
        checkpoints = ckpt.resolve().parent
        names = sorted(p.name for p in checkpoints.iterdir())
        assert names == ["best-step=" + names[0].split("=")[1], "last.ckpt"], names
        rows = [int(row["step"]) for row in metric_rows(checkpoints.parent)]
        assert rows == list(range(2 + 2 * i))  # each step once: none lost, none twice
    assert run_folders(tmp_path) == []  # the run moved, and no other folder was made
    assert [p.name for p in (tmp_path / "elsewhere").iterdir()] == [folder.name]


def _hold_lock(folder: Path) -> subprocess.Popen:
    """Another process holding the run's lock as train.py does, until killed."""
    code = ("import fcntl, os, sys, time; fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT); "
            "fcntl.flock(fd, fcntl.LOCK_EX); os.write(fd, b'process %d on here' % os.getpid()); "
            "print('locked', flush=True); time.sleep(600)")
    holder = subprocess.Popen([sys.executable, "-c", code, str(folder / RunFolderLock.NAME)],
                              stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "locked"
    return holder


def test_one_process_writes_a_run_and_a_stale_lock_is_taken_over(text_file, tmp_path, capsys,
                                                                 caplog):
    fit(text_file, tmp_path, "--trainer.max_steps", "2", "--run.id", "r1")
    folder, = run_folders(tmp_path)
    last, metrics = folder / "checkpoints" / "last.ckpt", (folder / "metrics.csv").read_text()
    holder = _hold_lock(folder)
    try:
        for extra in (["--ckpt_path", str(last)], ["--run.id", "r1"]):  # a resume; a new run
            assert cli(tiny_run(text_file, tmp_path, "--trainer.max_steps", "4", *extra)) == 1
            line = one_line_error(capsys.readouterr().err)
            assert f"is being trained by process {holder.pid} on here" in line
        assert steps(last) == 2 and (folder / "metrics.csv").read_text() == metrics  # untouched
    finally:
        holder.kill()
        holder.wait()
    assert cli(tiny_run(text_file, tmp_path, "--trainer.max_steps", "4", "--ckpt_path",
                        str(last))) == 0
    assert f"took over the run's lock from process {holder.pid} on here" in caplog.text
    assert steps(last) == 4 and not (folder / RunFolderLock.NAME).exists()
    # a resume with no step left to train is refused, before it touches the run
    assert cli(tiny_run(text_file, tmp_path, "--trainer.max_steps", "4", "--ckpt_path",
                        str(last))) == 1
    assert "has trained 4 steps already" in one_line_error(capsys.readouterr().err)


def test_a_resumed_run_from_before_one_row_per_step_keeps_every_metric(tmp_path):
    """metrics.csv of an older run had a row per log call; a resume merges each step's."""
    folder = tmp_path / "run"
    folder.mkdir()
    (folder / "metrics.csv").write_text("step,lr,train/loss,val/loss\n0,0.1,,\n0,,2.5,\n"
                                        "1,0.2,,\n1,,2.4,\n1,,,2.6\n2,0.3,,\n")
    logger = RunCSVLogger(folder, resume_step=2)
    logger.log_metrics({"lr": 0.3, "train/loss": 2.3}, step=2)
    logger.save()
    rows = metric_rows(folder)
    assert [(r["step"], r["lr"], r["train/loss"], r["val/loss"]) for r in rows] == [
        ("0", "0.1", "2.5", ""), ("1", "0.2", "2.4", "2.6"), ("2", "0.3", "2.3", "")]


@pytest.mark.slow
def test_kill_9_at_random_moments_loses_at_most_one_interval(text_file, tmp_path):
    """SIGKILL anywhere (in a save, a validation, a step), twice, over a run whose loss is flat (so
    no best checkpoint is written after the first): each resume starts less than one interval
    behind the latest step metrics.csv holds, and metrics.csv ends with each step once."""
    rng = random.Random(0)
    every, val = 3, 7
    args = [sys.executable, str(REPO / "train.py"),
            *tiny_run(text_file, tmp_path, *FLAT, "--trainer.max_steps", "100000",
                      "--trainer.val_check_interval", str(val), "--trainer.log_every_n_steps", "1",
                      "--checkpoint.every_n_steps", str(every))]
    ckpt = None
    for _ in range(2):
        command = args + (["--ckpt_path", str(ckpt)] if ckpt else [])
        before = steps(ckpt) if ckpt else 0
        process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and (ckpt is None or steps(ckpt) <= before):
            ckpt = next(iter(tmp_path.glob("mini-gpt/*/checkpoints/last.ckpt")), None)
            time.sleep(0.1)
        time.sleep(rng.uniform(0.0, 2.0))
        process.kill()
        process.wait()
        rows = {int(row["step"]): row for row in metric_rows(ckpt.parent.parent)}
        saved = steps(ckpt)  # whole: written atomically
        # metrics.csv is written at every log call: row n (step n + 1) gets its learning rate as
        # the step begins and a validation's loss just before that validation's checkpoint, so the
        # steps done, at least max(rows), are less than one interval ahead of the checkpoint
        assert saved >= max(max(rows) - (every - 1), before + 1)
        assert saved % every == 0 or saved % val == 0
    end = steps(ckpt) + 2
    assert cli([*args[2:], "--trainer.max_steps", str(end), "--ckpt_path", str(ckpt)]) == 0
    rows = [int(row["step"]) for row in metric_rows(ckpt.parent.parent)]
    assert rows == list(range(end))


# --- storage that cannot be written --------------------------------------------------------------

@pytest.fixture
def small_fs(tmp_path):
    """A 2 MiB tmpfs mounted for the test (as root; skipped elsewhere, where mounting is not
    allowed)."""
    mount = tmp_path / "fs"
    mount.mkdir()
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs",
                                            str(mount)], capture_output=True).returncode != 0:
        pytest.skip("needs to mount a tmpfs: runs as root where mounting is allowed")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=False)


def _read_only(path: Path) -> None:
    subprocess.run(["mount", "-o", "remount,ro", str(path)], check=True)


def test_a_full_disk_ends_in_one_line_and_keeps_the_last_good_checkpoint(text_file, tmp_path,
                                                                       small_fs, capsys,
                                                                       monkeypatch):
    save, calls = AtomicCheckpointIO.save_checkpoint, []

    def fill_the_disk_then_save(self, checkpoint, path, storage_options=None):
        calls.append(path)
        if len(calls) == 3:  # the disk fills up after the first validation's two checkpoints
            fd = os.open(small_fs / "filler", os.O_WRONLY | os.O_CREAT)
            with pytest.raises(OSError, match="No space"):
                while True:
                    os.write(fd, b"\0" * 65536)
            os.close(fd)
        save(self, checkpoint, path, storage_options)

    monkeypatch.setattr(AtomicCheckpointIO, "save_checkpoint", fill_the_disk_then_save)
    code = cli(tiny_run(text_file, small_fs, "--data.cache_dir", str(tmp_path / "cache"),
                        "--trainer.val_check_interval", "5"))
    line = one_line_error(capsys.readouterr().err)
    last = next(small_fs.glob("mini-gpt/*/checkpoints/last.ckpt"))
    assert code == 1
    assert re.search(rf"cannot write {last.parent}/\S+\.ckpt: No space left on device", line)
    assert f"{last} still holds the last good checkpoint" in line
    assert steps(last) == 5  # whole, and nothing half-written beside it
    assert not list(last.parent.glob(".*partial"))


def test_a_read_only_place_ends_in_one_line(text_file, tmp_path, small_fs, capsys, checkpoints):
    from scripts import export_hf, plot_attention

    fit(text_file, small_fs, "--trainer.max_steps", "2", "--data.cache_dir",
        str(tmp_path / "cache"))
    last = next(small_fs.glob("mini-gpt/*/checkpoints/last.ckpt"))
    _read_only(small_fs)
    commands = {
        "a new run": lambda: cli(tiny_run(text_file, small_fs, "--data.cache_dir",
                                          str(tmp_path / "cache"))),
        "a resumed run": lambda: cli(tiny_run(text_file, small_fs, "--trainer.max_steps", "4",
                                              "--data.cache_dir", str(tmp_path / "cache"),
                                              "--ckpt_path", str(last))),
        "export_hf.py": lambda: export_hf.exit_code(lambda: export_hf.main(
            ["--ckpt", str(checkpoints["gpt"]), "--out", str(small_fs / "hf")])),
        "plot_attention.py": lambda: plot_attention.exit_code(lambda: plot_attention.main(
            ["--ckpt", str(checkpoints["gpt"]), "--text", "the cat",
             "--out", str(small_fs / "a.png")])),
    }
    for name, command in commands.items():
        assert command() == 1, name
        line = one_line_error(capsys.readouterr().err)
        assert "Read-only file system" in line and str(small_fs) in line, (name, line)
    assert steps(last) == 2
    with pytest.raises(OSError, match=f"{last} still holds the last good checkpoint"):
        AtomicCheckpointIO().save_checkpoint({"step": 3}, last)  # a disk gone read-only mid-run


# --- Ctrl-C -------------------------------------------------------------------------------------

@pytest.mark.parametrize("after_s", [0.5, 3.0])
def test_ctrl_c_while_a_run_starts_ends_in_one_line_with_status_130(text_file, tmp_path,
                                                                    after_s):
    """While the libraries load (0.5 s) or the run sets up (3 s here; training already, on a fast
    machine): one line, status 130, and no folder, or a checkpoint to resume from."""
    # Ctrl-C as in a terminal: the test runner's process may ignore SIGINT, which its children
    # would inherit (and Python then leaves it ignored)
    process = subprocess.Popen([sys.executable, str(REPO / "train.py"),
                                *tiny_run(text_file, tmp_path, "--trainer.max_steps", "100000")],
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                               preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    time.sleep(after_s)
    process.send_signal(signal.SIGINT)
    _, err = finish(process)
    assert process.returncode == 130, err[-3000:]
    line = one_line_error(err)
    saved = list(tmp_path.glob("mini-gpt/*/checkpoints/last.ckpt"))
    if saved:  # it was training: the step finished, and a checkpoint was saved
        assert line.startswith(f"stopped by SIGINT after {steps(saved[0])} steps and saved")
    else:
        assert line.startswith("stopped by") and not list(tmp_path.glob("mini-gpt/*"))


def test_a_signal_just_after_the_run_folder_is_made_leaves_no_folder(text_file, tmp_path,
                                                                     monkeypatch):
    """The moment the test below may hit by chance, every time: the folder made, the lock taken,
    then SIGTERM (Stopped, as errors.py's handler raises it)."""
    claim = RunFolderLock.claim

    def claim_then_signal(self, new):
        claim(self, new)
        raise Stopped("stopped by SIGTERM", signal.SIGTERM)

    monkeypatch.setattr(RunFolderLock, "claim", claim_then_signal)
    with pytest.raises(Stopped):
        fit(text_file, tmp_path)
    assert not list(tmp_path.glob("mini-gpt/*"))


def test_sigterm_while_a_run_sets_up_ends_in_one_line_with_status_143(text_file, tmp_path):
    """As Ctrl-C: no traceback and no folder, or a checkpoint where training had begun."""
    process = subprocess.Popen([sys.executable, str(REPO / "train.py"),
                                *tiny_run(text_file, tmp_path, "--trainer.max_steps", "100000")],
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 60
    while not list(tmp_path.glob("mini-gpt/*")) and time.monotonic() < deadline:
        time.sleep(0.02)  # until the run folder is made: the run is setting up
    process.send_signal(signal.SIGTERM)
    _, err = finish(process)
    assert process.returncode == 143, err[-3000:]
    line = one_line_error(err)
    saved = list(tmp_path.glob("mini-gpt/*/checkpoints/last.ckpt"))
    if saved:
        assert line.startswith(f"stopped by SIGTERM after {steps(saved[0])} steps and saved")
    else:
        assert line == "stopped by SIGTERM" and not list(tmp_path.glob("mini-gpt/*"))
