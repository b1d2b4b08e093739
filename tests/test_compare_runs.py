"""scripts/compare_runs.py on run folders made by hand, as a run leaves them at any moment: half
written, empty, resumed, one row per log call or per step (tests/test_runs.py compares the folders
and offline wandb runs that train.py writes)."""

from pathlib import Path

import pytest
import yaml

from scripts import compare_runs
from scripts.compare_runs import Process, Run

HEADER = "epoch,lr,step,train/loss,val/loss,val/wall_time_s"
LONG_NAME = "shakespeare_char_cpu-1L16d-rope-qknorm-sdpa-32-true"  # train.py's default names


def run_folder(path: Path, lines: list[str], name: str = LONG_NAME, run_id: str = "id-1",
               **settings) -> Path:
    """A run folder: config.yaml of ``settings`` ({"model": {"lr": ...}}) and a metrics.csv of
    ``lines`` written as given (Lightning writes \\r\\n line ends)."""
    path.mkdir(parents=True)
    config = {"run_name": name, "run_id": run_id, **settings}
    (path / "config.yaml").write_text(yaml.safe_dump(config))
    (path / "metrics.csv").write_bytes("".join(lines).encode())
    return path


def rows(lines: str) -> list[str]:
    return [line + "\r\n" for line in lines.split()]


def cells(table: str) -> list[list[str]]:
    """A Markdown table's rows (header first, the line under it left out) as lists of cells."""
    lines = table.splitlines()
    return [[c.strip() for c in line.strip("|").split("|")] for line in lines[:1] + lines[2:]]


def test_only_complete_rows_of_a_metrics_csv_are_read(tmp_path, capsys):
    """A run still writing leaves a last line cut anywhere: in a number ("3.1" of "3.1234"), or a
    row with fewer fields than the header; the last complete value is reported."""
    complete = rows(f"{HEADER} 0,,9,,3.5,60 0,,19,,3.25,120 0,,24,3.0,,")
    folder = run_folder(tmp_path / "writing", [*complete, "0,,29,2.9,3.1"])  # cut, no line end
    run = compare_runs.load(str(folder))
    assert run.series("val/loss") == [(9, 3.5), (19, 3.25)] and run.last("train/loss") == 3.0

    folder = run_folder(tmp_path / "rewritten", [*complete, "0,,29\r\n"])  # fewer fields
    assert compare_runs.load(str(folder)).series("val/loss") == [(9, 3.5), (19, 3.25)]

    compare_runs.main([str(tmp_path / "writing"), "--plot", str(tmp_path / "plot.png")])
    header, row = cells(capsys.readouterr().out.split("\n\nWrote")[0])
    assert row[header.index("final val/loss")] == "3.25" and row[header.index("last step")] == "24"


def test_the_rows_of_one_step_are_merged_one_row_per_log_call_or_per_step(tmp_path):
    """Lightning's CSV logger writes a row per log call (learning rate, training loss, validation,
    each at its step); a row per step holds the same."""
    per_call = rows(f"{HEADER} ,0.1,4,,, 0,,4,3.5,, 0,,4,,3.4,60 ,0.2,9,,, 0,,9,3.0,,")
    per_step = rows(f"{HEADER} 0,0.1,4,3.5,3.4,60 0,0.2,9,3.0,,")
    runs = [compare_runs.load(str(run_folder(tmp_path / name, lines)))
            for name, lines in (("per_call", per_call), ("per_step", per_step))]
    assert runs[0].history == runs[1].history == {
        "lr": {4: 0.1, 9: 0.2}, "train/loss": {4: 3.5, 9: 3.0}, "val/loss": {4: 3.4},
        "val/wall_time_s": {4: 60.0}}


def test_folders_with_nothing_to_compare_are_skipped_and_named(tmp_path, capsys):
    good = run_folder(tmp_path / "good", rows(f"{HEADER} 0,,9,3.5,3.4,60"))
    header_only = run_folder(tmp_path / "header-only", rows(HEADER))
    no_bytes = run_folder(tmp_path / "no-bytes", [])
    half_header = run_folder(tmp_path / "half-header", ["epoch,lr,st"])
    nothing = tmp_path / "nothing"
    (nothing / "wandb").mkdir(parents=True)
    compare_runs.main([str(p) for p in (good, header_only, no_bytes, half_header, nothing)]
                      + ["--plot", str(tmp_path / "plot.png")])
    out, err = capsys.readouterr()
    assert err.splitlines() == [
        f"skipped {header_only}: metrics.csv has no complete rows yet",
        f"skipped {no_bytes}: metrics.csv is empty (the run has logged nothing yet)",
        f"skipped {half_header}: metrics.csv has no complete rows yet",
        f"skipped {nothing}: no metrics.csv and no offline wandb run (.wandb file) in it"]
    assert len(cells(out.split("\n\nWrote")[0])) == 2  # the header and the good run's row

    with pytest.raises(ValueError, match="no run given has metrics to compare yet"):
        compare_runs.main([str(header_only), str(no_bytes), str(nothing)])


def test_a_resumed_folder_is_one_row_with_the_settings_of_its_last_start(tmp_path, capsys):
    first = run_folder(tmp_path / "first", rows(f"{HEADER} 0,,9,3.5,3.4,60"),
                       trainer={"max_steps": 20})
    resumed = run_folder(tmp_path / "resumed", rows(f"{HEADER} 0,,9,3.5,3.4,60 0,,29,3.0,2.9,90"),
                         run_id="id-2", trainer={"max_steps": 20})
    for n, max_steps in ((1, 30), (2, 40), (10, 50)):  # the 10th resume is newer than the 2nd
        (resumed / f"config-resume-{n}.yaml").write_text(yaml.safe_dump(
            {"run_name": LONG_NAME, "run_id": "id-2", "trainer": {"max_steps": max_steps}}))
    assert compare_runs.load(str(resumed)).config["trainer.max_steps"] == 50

    compare_runs.main([str(first), str(resumed), "--plot", str(tmp_path / "plot.png")])
    header, *table = cells(capsys.readouterr().out.split("\n\nWrote")[0])
    assert [row[0] for row in table] == ["trainer.max_steps=20", "trainer.max_steps=50"]


def process(run_id: str, started: float, lr: float, history: dict) -> Process:
    return Process(run_id, started, Run(LONG_NAME, {"model.lr": lr}, history))


def test_the_processes_of_a_resumed_wandb_run_merge_into_one(tmp_path):
    """A resumed run's second process logs again from its checkpoint's step (20): its points
    replace the first's from its first step on, those it did not log again too (step 29, logged
    by the first process after the checkpoint), and its settings win."""
    first = process("a", 100.0, 0.003, {"val/loss": {9: 3.5, 19: 3.2, 29: 3.1},
                                        "train/loss": {4: 3.6, 24: 3.3}})
    second = process("a", 200.0, 0.001, {"train/loss": {24: 3.0}, "val/loss": {39: 2.8}})
    for given in ([first, second], [second, first]):  # in the order the processes started
        run = compare_runs.merge(given)
        assert run.history == {"val/loss": {9: 3.5, 19: 3.2, 39: 2.8},
                               "train/loss": {4: 3.6, 24: 3.0}}
        assert run.config == {"model.lr": 0.001}


def labelled(names: list[str], configs: list[dict]) -> list[list[str]]:
    runs = [Run(name, config, {"val/loss": {9: 3.0}}) for name, config in zip(names, configs,
                                                                               strict=True)]
    return cells(compare_runs.table(runs, "val/loss"))


def test_runs_are_labelled_by_the_settings_that_differ_unless_their_names_tell_them_apart():
    long_names = [LONG_NAME, LONG_NAME, LONG_NAME]
    configs = [{"model.lr": 0.003, "model.optimizer": "adamw", "run_id": "a", "seed": 1},
               {"model.lr": 0.003, "model.optimizer": "muon", "run_id": "b", "seed": 1},
               {"model.lr": 0.01, "model.optimizer": "muon", "run_id": "c", "seed": 1}]
    header, *table = labelled(long_names, configs)
    assert [row[0] for row in table] == ["model.lr=0.003, model.optimizer=adamw",
                                         "model.lr=0.003, model.optimizer=muon",
                                         "model.lr=0.01, model.optimizer=muon"]
    assert header[1] == "last step"  # the settings are in the labels: no columns of them again

    # names that tell runs apart (--run.name, ablate.py's variants) label them, beside the settings
    header, *table = labelled(["baseline", "muon", "muon-lr"], configs)
    assert [row[0] for row in table] == ["baseline", "muon", "muon-lr"]
    assert header[:3] == ["run", "model.lr", "model.optimizer"]

    # runs of one config: their names, told apart by run id
    header, *table = labelled(long_names[:2], [{"run_id": "a"}, {"run_id": "b"}])
    assert [row[0] for row in table] == [f"{LONG_NAME} (a)", f"{LONG_NAME} (b)"]
    # labels made of settings that two runs share
    header, *table = labelled(long_names, [configs[0], configs[0] | {"run_id": "d"}, configs[2]])
    assert [row[0] for row in table] == ["model.lr=0.003, model.optimizer=adamw (a)",
                                         "model.lr=0.003, model.optimizer=adamw (d)",
                                         "model.lr=0.01, model.optimizer=muon"]
    # too many settings differ for a label: the names, and a column each
    many = [{f"s{i}": run for i in range(4)} | {"run_id": f"{run}"} for run in range(2)]
    header, *table = labelled(long_names[:2], many)
    assert [row[0] for row in table] == [f"{LONG_NAME} (0)", f"{LONG_NAME} (1)"]
    assert header[1:5] == ["s0", "s1", "s2", "s3"]
