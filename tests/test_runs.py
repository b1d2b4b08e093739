"""Run folders, CSV and offline wandb logging through train.py, resumed runs, and
scripts/compare_runs.py."""

import csv
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from conftest import REPO, fit, run_folders, tiny_run

from model.device import choose_attn_impl, choose_precision, device_info
from scripts import compare_runs
from train import main


def wandb_id(offline_run: Path) -> str:
    """The run id, from the run-<id>.wandb file that wandb writes in an offline run's folder."""
    return next(offline_run.glob("run-*.wandb")).stem.removeprefix("run-")


def csv_rows(folder: Path) -> list[dict]:
    with open(folder / "metrics.csv", newline="") as f:
        return list(csv.DictReader(f))


def test_a_run_writes_its_folder_and_an_offline_wandb_run_that_reads_back(text_file, tmp_path):
    fit(text_file, tmp_path)
    folder, = run_folders(tmp_path)
    # the config's auto precision and attention path, resolved for this CPU
    cpu = device_info("cpu")
    precision = choose_precision(cpu)
    attn_impl = choose_attn_impl(cpu, precision, seq_len=16)
    # config stem, shape (with the recipe's attention options), attention path, precision
    name = f"shakespeare_char_cpu-1L16d-rope-qknorm-{attn_impl}-{precision}"
    assert folder.name.startswith(name + "-")
    assert ({"config.yaml", "metrics.csv", "checkpoints", "wandb"}
            <= {p.name for p in folder.iterdir()})

    offline, = (folder / "wandb").glob("offline-run-*")
    # from the file wandb wrote, not from this process
    run = compare_runs.read_wandb_offline(offline)
    assert run.name == name
    config = run.config
    assert config["model.config.n_layer"] == 1 and config["model.config.n_embd"] == 16
    assert config["trainer.max_steps"] == 20 and config["trainer.precision"] == precision
    assert config["model.config.attn_impl"] == attn_impl and config["device"] == cpu.describe()
    assert config["data.block_size"] == 16 and config["model.lr"] == 3e-3
    assert config["n_params"] > 0 and config["run_dir"] == str(folder) and config["kind"] == "gpt"
    assert config["git_commit"] is None or len(config["git_commit"].split("+")[0]) == 40
    for key in ("train/loss", "val/loss", "val/ppl", "train/grad_norm", "lr-CombinedOptimizer/muon",
                "val/wall_time_s", "train/device/items_per_sec"):
        assert run.history.get(key), key
    assert sorted(run.history["val/loss"]) == [9, 19]

    # the CSV holds the same numbers
    rows = csv_rows(folder)
    val = {int(r["step"]): float(r["val/loss"]) for r in rows if r["val/loss"]}
    assert val == pytest.approx(run.history["val/loss"])
    ppl = {int(r["step"]): float(r["val/ppl"]) for r in rows if r["val/ppl"]}
    assert ppl[19] == pytest.approx(2.718281828 ** val[19], rel=1e-4)  # GPT: the loss is the NLL


def test_two_runs_in_a_row_get_their_own_folders_and_wandb_runs(text_file, tmp_path):
    fit(text_file, tmp_path, "--model.lr", "0.002")
    fit(text_file, tmp_path, "--model.lr", "0.003", "--run.name", "my run", "--run.tags", "[a, b]")
    first, second = sorted(run_folders(tmp_path), key=lambda p: p.stat().st_mtime)
    assert second.name.startswith("my_run-")
    ids = [wandb_id(next((f / "wandb").glob("offline-run-*"))) for f in (first, second)]
    assert ids[0] != ids[1]
    for folder, lr in ((first, 0.002), (second, 0.003)):
        assert yaml.safe_load((folder / "config.yaml").read_text())["model"]["lr"] == lr
        assert any(r["val/loss"] for r in csv_rows(folder))
    again = compare_runs.read_wandb_offline(next((second / "wandb").glob("offline-run-*")))
    assert again.name == "my run" and again.config["run.tags"] == '["a", "b"]'

    # compare_runs: each run labelled by the settings that differ (the first's default name is
    # long), then the metrics, and a PNG; a folder without metrics is skipped, and named
    stopped = tmp_path / "mini-gpt" / "stopped-early"
    (stopped / "wandb").mkdir(parents=True)
    png = tmp_path / "compare.png"
    out = subprocess.run([sys.executable, str(REPO / "scripts" / "compare_runs.py"), str(first),
                          str(stopped), str(second), "--plot", str(png)],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert f"skipped {stopped}: no metrics.csv and no offline wandb run" in out.stderr
    header, _, row1, row2, *_ = out.stdout.splitlines()
    columns = [c.strip() for c in header.strip("|").split("|")]
    assert columns[:2] == ["run", "last step"] and "best val/loss" in columns
    labels = [r.strip("|").split("|")[0].strip() for r in (row1, row2)]
    assert labels == ["model.lr=0.002, run.tags=-", 'model.lr=0.003, run.tags=["a", "b"]']
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000


def test_a_cli_built_without_running_hands_its_run_id_to_no_later_run(text_file, tmp_path):
    """The run id reaches a multi-process run's workers through the environment: only while that
    run lasts, so that a CLI built without running (scripts/bench_train.py) leaves none behind."""
    built = main(tiny_run(text_file, tmp_path)[1:], run=False)
    fit(text_file, tmp_path, "--trainer.max_steps", "2")
    folder, = run_folders(tmp_path)
    assert not folder.name.endswith(built.model.run_info["id"])


def test_wandb_environment_variables_fill_what_the_config_leaves_unset(text_file, tmp_path,
                                                                       monkeypatch):
    for var, value in {"WANDB_PROJECT": "env-project", "WANDB_ENTITY": "env-team",
                       "WANDB_RUN_GROUP": "env-group", "WANDB_TAGS": "cpu, sweep"}.items():
        monkeypatch.setenv(var, value)
    fit(text_file, tmp_path)
    folder, = (tmp_path / "env-project").iterdir()  # the project names the folder of its runs
    records = list(compare_runs.wandb_records(
        next((folder / "wandb").glob("offline-run-*/*.wandb"))))
    assert records[-1].WhichOneof("record_type") == "exit"  # the file is whole when the run returns
    run = next(r.run for r in records if r.WhichOneof("record_type") == "run")
    assert (run.project, run.entity, run.run_group, list(run.tags)) == (
        "env-project", "env-team", "env-group", ["cpu", "sweep"])
    # the runs table sorts on the best val loss (min) and BLEU (max) of a run, not only the last
    summaries = {r.metric.name: r.metric.summary
                 for r in records if r.WhichOneof("record_type") == "metric"}
    assert summaries["val/loss"].min and summaries["val/loss"].last and summaries["val/bleu"].max

    fit(text_file, tmp_path, "--run.project", "cli-project", "--run.group", "cli-group",
        "--run.tags", "[x]")
    folder, = (tmp_path / "cli-project").iterdir()  # the config's settings win over the environment
    records = compare_runs.wandb_records(next((folder / "wandb").glob("offline-run-*/*.wandb")))
    run = next(r.run for r in records if r.WhichOneof("record_type") == "run")
    assert (run.project, run.run_group, list(run.tags)) == ("cli-project", "cli-group", ["x"])


def test_a_resumed_run_continues_its_folder_csv_and_wandb_run(text_file, tmp_path):
    fit(text_file, tmp_path, "--trainer.max_steps", "20")
    # the run folder can be moved
    folder = run_folders(tmp_path)[0].rename(tmp_path / "mini-gpt" / "moved")
    before = csv_rows(folder)
    fit(text_file, tmp_path, "--trainer.max_steps", "30",
        "--ckpt_path", str(folder / "checkpoints" / "last.ckpt"))
    assert run_folders(tmp_path) == [folder]  # no second folder
    assert (folder / "config.yaml").is_file() and (folder / "config-resume-1.yaml").is_file()
    # kept as it was
    assert yaml.safe_load((folder / "config.yaml").read_text())["trainer"]["max_steps"] == 20

    rows = csv_rows(folder)
    # earlier rows kept
    assert rows[:len(before)] == [{k: r.get(k, "") for k in rows[0]} for r in before]
    train_steps = [int(r["step"]) for r in rows if r["train/loss"]]
    assert len(train_steps) == len(set(train_steps)) and max(train_steps) >= 25
    val = {int(r["step"]): float(r["val/wall_time_s"]) for r in rows if r["val/wall_time_s"]}
    # wall time goes on from the checkpoint
    assert sorted(val) == [9, 19, 29] and val[29] > val[19] > val[9]
    val_loss = {int(r["step"]): float(r["val/loss"]) for r in rows if r["val/loss"]}

    offline = sorted((folder / "wandb").glob("offline-run-*"))
    assert len(offline) == 2 and len({wandb_id(p) for p in offline}) == 1  # the same wandb run id
    resumed = compare_runs.read_wandb_offline(offline[-1])
    assert sorted(resumed.history["val/loss"]) == [29]

    # compare_runs: the folder, and its two offline wandb runs, are each one run, with the
    # settings of its last start
    for given in ([folder], offline[::-1]):
        run, = compare_runs.load_runs([str(p) for p in given])
        assert sorted(run.history["val/loss"]) == [9, 19, 29], given
        assert run.history["val/loss"][29] == pytest.approx(val_loss[29])
        assert run.config["trainer.max_steps"] == 30
        assert run.config["run_id"] == wandb_id(offline[0])

    # the .wandb file of a run still writing, cut anywhere, reads up to its last whole record
    data = next(offline[-1].glob("*.wandb")).read_bytes()
    cut = tmp_path / "cut.wandb"
    for size in range(8, len(data), len(data) // 50):
        cut.write_bytes(data[:size])
        assert set(compare_runs.read_wandb_offline(cut).history.get("val/loss", {})) <= {29}


def test_run_folder_mistakes_get_clear_errors(text_file, tmp_path):
    with pytest.raises(ValueError, match="--ckpt_path last: give the checkpoint's path"):
        fit(text_file, tmp_path, "--ckpt_path", "last")
    fit(text_file, tmp_path, "--run.id", "fixed", "--trainer.max_steps", "2")
    with pytest.raises(ValueError, match="exists already: choose another --run.id, or resume that "
                                         "run"):
        fit(text_file, tmp_path, "--run.id", "fixed", "--trainer.max_steps", "2")


def test_compare_runs_bad_input(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        compare_runs.main([str(tmp_path / "nope")])
    with pytest.raises(ValueError, match="no run given has metrics to compare yet"):
        compare_runs.main([str(tmp_path)])
    with pytest.raises(ValueError, match="give run folders to compare"):
        compare_runs.main([])
    with pytest.raises(ValueError, match="--filters is not JSON"):
        compare_runs.main(["--wandb", "me/proj", "--filters", "{nope"])


def test_compare_runs_without_a_wandb_login_fails_fast_and_says_what_to_do(tmp_path, monkeypatch):
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "no-netrc"))
    monkeypatch.setenv("WANDB_CONFIG_DIR", str(tmp_path))
    start = time.perf_counter()
    with pytest.raises(ValueError, match="cannot read wandb project 'me/proj'.*wandb login"):
        compare_runs.main(["--wandb", "me/proj"])
    assert time.perf_counter() - start < 30
