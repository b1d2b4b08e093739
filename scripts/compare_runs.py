"""Compare training runs: a table of the settings that differ between them with their final and
best metrics, and a PNG of a validation metric against step and against wall time, one line per run.

    python scripts/compare_runs.py runs/mini-gpt/*                     # run folders: metrics.csv
    python scripts/compare_runs.py runs/mini-gpt/*/wandb/offline-run-* # offline wandb runs
    python scripts/compare_runs.py --wandb my-team/mini-gpt \
        --filters '{"config.model.lr": {"$gte": 0.001}}'
    python scripts/compare_runs.py RUN_A RUN_B --plot val_loss.png --metric val/ppl
    python scripts/compare_runs.py runs/mini-gpt/* --target 1.88      # steps and seconds to 1.88

A run folder is what train.py writes (config, metrics.csv, checkpoints, wandb); a CSV alone works
too, with the config taken from the hparams.yaml beside it. --wandb reads a project online (needs
`wandb login`); --filters takes wandb's MongoDB-style filters on config.*, summary_metrics.*, tags,
state, ...

A resumed run is one row: its folder's settings are those of its last start (config-resume-N.yaml
over config.yaml), and its offline wandb runs (one offline-run-* per start, all of one run id) are
read as one, each start's points replacing the earlier ones from its first step on. Only complete
rows of a metrics.csv count (a run still writing leaves a half-written last line); a run with none
yet, or with no metrics at all, is skipped and named on stderr. Runs are labelled by their names
where these are short and tell them apart, else by the settings that differ between them.
"""

import csv
import io
import json
import math
import struct
import sys
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository: model/, data/
# first: Ctrl-C while the libraries below load ends in one line
from training.errors import (  # isort: split
    ArgumentParser,
    UsageError,
    exit_at_once_on_ctrl_c,
    exit_code,
)

if __name__ == "__main__":
    exit_at_once_on_ctrl_c()

import yaml

# settings that differ between any two runs
IGNORED = {"run_dir", "run_id", "run_name", "run.id", "run.name", "ckpt_path"}
FINAL = ["final/bleu", "final/bleu_lc"]  # seq2seq: the beam-search BLEU at the end of training
# A run's label (the table's first column, the plot's legend) is its name where every name is at
# most this long and no two runs share one (names given with --run.name, or ablate.py's variants);
# else the settings that differ, where at most LABEL_SETTINGS do (more would not fit a legend)
LABEL_NAME_LENGTH = 32
LABEL_SETTINGS = 3


@dataclass
class Run:
    name: str
    config: dict  # flattened: "model.config.n_layer" -> 6
    history: dict[str, dict[int, float]] = field(default_factory=dict)  # metric -> {step: value}

    def add(self, key: str, step: int, value) -> None:
        if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
            self.history.setdefault(key, {})[step] = float(value)

    def series(self, key: str) -> list[tuple[int, float]]:
        return sorted(self.history.get(key, {}).items())

    def last(self, key: str) -> float | None:
        points = self.series(key)
        return points[-1][1] if points else None


def flatten(config: dict, prefix: str = "") -> dict:
    """{"model": {"lr": 1}} -> {"model.lr": 1}; lists as JSON text, so that they compare and
    print."""
    out = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flatten(value, f"{name}."))
        else:
            out[name] = json.dumps(value) if isinstance(value, list) else value
    return out


class NoMetrics(UsageError):
    """A run with nothing to compare yet (one that stopped, or is still starting, before it logged
    a complete row): skipped, and named on stderr. The message is the reason."""


# ------------------------------------------------------------------ sources


def read_yaml(path: Path) -> dict:
    try:
        config = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as e:
        raise UsageError(f"cannot read {path}: {e}") from None
    if not isinstance(config, dict):
        raise UsageError(f"{path} holds no settings (a YAML mapping): is it a run's config?")
    return config


def _resume_number(path: Path) -> int:
    """config-resume-12.yaml -> 12 (sorting by name would put 10 before 2)."""
    number = path.stem.removeprefix("config-resume-")
    return int(number) if number.isdigit() else 0


def read_folder_config(folder: Path) -> dict:
    """The flattened settings a run folder's run last ran with. train.py writes config.yaml at the
    start and config-resume-N.yaml at the N-th resume (what may change at one, e.g.
    trainer.max_steps, can differ), each overriding the ones before it; then, at once, the config
    that start logs, into hparams.yaml (the CSV logger rewrites it at each start). That comes last:
    it is the latest start's, with the values resolved at the start (vocab_size, block_size) and
    what only the logged config has (the parameter count, device, commit, run name and id)."""
    resumes = sorted(folder.glob("config-resume-*.yaml"), key=_resume_number)
    config = {}
    for path in [folder / "config.yaml", *resumes, folder / "hparams.yaml"]:
        if path.is_file():
            config.update(flatten(read_yaml(path)))
    return config


def complete_rows(path: Path) -> list[dict[str, str]]:
    """The rows of a CSV file that were written whole, as {column: text}. A run still writing, or
    killed while writing, can leave a last line without its line end, cut anywhere (in a number:
    "3.7" of "3.7024"); and Lightning's logger, on meeting a new metric, rewrites the whole file
    under a longer header, so that a kill then can leave rows of fewer fields than the header.
    Neither is read."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise UsageError(f"cannot read {path}: {e}") from None
    whole = text[:text.rfind("\n") + 1]  # up to the last line end ("" if there is none)
    try:
        lines = list(csv.reader(io.StringIO(whole)))
    except csv.Error as e:
        raise UsageError(f"{path} is not a CSV file: {e}") from None
    if not lines:
        return []
    header = lines[0]
    return [dict(zip(header, line, strict=True)) for line in lines[1:] if len(line) == len(header)]


def _number(text: str, path: Path, column: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise UsageError(f"{path}: {text!r} in column {column!r} is not a number: is this a "
                         "metrics.csv that train.py wrote?") from None


def read_csv_run(path: Path) -> Run:
    """A run folder written by train.py (or its metrics.csv): settings from its config files
    (``read_folder_config``), metrics from the complete rows of its metrics.csv. A step may have
    several rows (one per log call: learning rate, throughput, training loss, validation): its
    values are merged, a later row's winning for a metric two rows hold."""
    folder = path if path.is_dir() else path.parent
    metrics = folder / "metrics.csv"
    config = read_folder_config(folder)
    run = Run(name=str(config.get("run_name") or folder.name), config=config)
    if metrics.stat().st_size == 0:
        raise NoMetrics("metrics.csv is empty (the run has logged nothing yet)")
    rows = complete_rows(metrics)
    if not rows:
        raise NoMetrics("metrics.csv has no complete rows yet")
    for row in rows:
        if not row.get("step"):
            continue
        step = int(_number(row["step"], metrics, "step"))
        for key, value in row.items():
            if key not in ("step", "epoch") and value != "":
                run.add(key, step, _number(value, metrics, key))
    if not run.history:
        raise NoMetrics("metrics.csv has no metric values in its complete rows yet")
    return run


def wandb_records(path: Path):
    """The records of a .wandb file (LevelDB log format: 32 KiB blocks of chunks, each
    <crc:4><len:2><type:1>, type 1 a whole record, 2/3/4 its first/middle/last part), as
    wandb_internal_pb2.Record messages. A chunk cut short (the file of a run still writing) ends
    them."""
    from wandb.proto import wandb_internal_pb2

    data, block = path.read_bytes(), 32768
    if data[:4] != b":W&B":
        raise UsageError(f"{path} is not a wandb run file")
    pos, record = 7, b""
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a chunk header is padding
            pos += block - pos % block
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if length == 0 and kind == 0:
            pos += block - pos % block
            continue
        chunk = data[pos + 7:pos + 7 + length]
        if len(chunk) < length:
            return
        pos += 7 + length
        record = chunk if kind in (1, 2) else record + chunk
        if kind in (1, 4):
            message = wandb_internal_pb2.Record()
            message.ParseFromString(record)
            yield message


def _item_key(item) -> str:
    return "/".join(item.nested_key) if item.nested_key else item.key


@dataclass
class Process:
    """What one process of a wandb run logged: a resumed run has one per start, each its own
    offline-run-* folder, all under the run's id."""
    run_id: str
    started: float  # seconds since the epoch: the order of a run's processes
    run: Run


def read_wandb_process(path: Path) -> Process:
    """An offline wandb run, as one process wrote it: its folder (offline-run-*) or .wandb file."""
    files = [path] if path.is_file() else sorted(path.glob("*.wandb"))
    if not files:
        raise UsageError(f"{path} has no .wandb file")
    config, name, rows = {}, path.name, []
    run_id, started = files[0].stem.removeprefix("run-"), 0.0
    for record in wandb_records(files[0]):
        kind = record.WhichOneof("record_type")
        if kind == "run":
            name = record.run.display_name or name
            run_id = record.run.run_id or run_id
            started = record.run.start_time.seconds + record.run.start_time.nanos / 1e9
            config.update({_item_key(i): json.loads(i.value_json)
                           for i in record.run.config.update})
        elif kind == "config":
            config.update({_item_key(i): json.loads(i.value_json) for i in record.config.update})
        elif kind == "history":
            rows.append({_item_key(i): json.loads(i.value_json) for i in record.history.item})
    config.pop("_wandb", None)
    return Process(run_id, started, _run_from_rows(str(config.get("run_name") or name), config,
                                                   rows))


def read_wandb_offline(path: Path) -> Run:
    """An offline wandb run, as one process wrote it (``merge`` joins the processes of a run)."""
    return read_wandb_process(path).run


def merge(processes: list[Process]) -> Run:
    """One run from the processes that logged it. A resumed process logs again from the step of
    its checkpoint, so each process's points replace the earlier processes' from its first logged
    step on (steps they logged past the checkpoint were done again), and its settings override
    theirs: a resumed run shows what it last ran with."""
    ordered = sorted(processes, key=lambda p: p.started)  # stable: ties stay in the given order
    run = Run(name=ordered[-1].run.name, config={})
    for process in ordered:
        run.config.update(process.run.config)
        steps = [step for points in process.run.history.values() for step in points]
        if steps:
            first = min(steps)
            for points in run.history.values():
                for step in [s for s in points if s >= first]:
                    del points[step]
        for key, points in process.run.history.items():
            run.history.setdefault(key, {}).update(points)
    return run


def _run_from_rows(name: str, config: dict, rows: list[dict]) -> Run:
    run = Run(name=name, config=flatten(config))
    for row in rows:
        step = int(row.get("trainer/global_step", row.get("_step", 0)))
        for key, value in row.items():
            if not key.startswith("_") and key not in ("trainer/global_step", "epoch"):
                run.add(key, step, value)
        if "val/loss" in row and "val/wall_time_s" not in row and "_runtime" in row:
            run.add("val/wall_time_s", step, row["_runtime"])
    return run


def read_wandb_project(path: str, filters: dict | None, limit: int) -> list[Run]:
    """Runs of an online wandb project ("entity/project"), newest first."""
    import wandb

    try:
        api = wandb.Api(timeout=30)
        found = api.runs(path, filters=filters or {}, order="-created_at")
        runs = []
        for remote in found[:limit]:
            config = {k: v for k, v in dict(remote.config).items() if not k.startswith("_")}
            runs.append(_run_from_rows(remote.name, config, list(remote.scan_history())))
        return runs
    except (wandb.errors.UsageError, wandb.errors.CommError, ValueError) as e:
        raise UsageError(f"cannot read wandb project {path!r}: {e}. Log in with `wandb login` (and "
                         "check the entity/project), or compare the local run folders "
                         "instead") from None


def is_offline_wandb(path: Path) -> bool:
    """Whether ``path`` is one offline wandb run: a .wandb file, or a folder (offline-run-*) that
    holds one and no metrics.csv (a run folder's is read first)."""
    if path.is_file():
        return path.suffix == ".wandb"
    return not (path / "metrics.csv").is_file() and any(path.glob("*.wandb"))


def merged_wandb(processes: list[Process]) -> Run:
    run = merge(processes)
    if not run.history:
        raise NoMetrics("its offline wandb run has logged no metrics yet")
    return run


def load(path_text: str) -> Run:
    """One run: a run folder (its metrics.csv; lacking one, its offline wandb runs), a metrics.csv,
    or one offline wandb run (one process of it: ``load_runs`` joins those of one run id)."""
    path = Path(path_text)
    if not path.exists():
        raise UsageError(f"{path} does not exist: give run folders (runs/<project>/<run>), "
                         "metrics.csv files or offline wandb runs")
    if (path / "metrics.csv").is_file() or path.name == "metrics.csv":
        return read_csv_run(path)
    if is_offline_wandb(path):
        return merged_wandb([read_wandb_process(path)])
    offline = sorted(p for p in path.glob("wandb/offline-run-*") if is_offline_wandb(p))
    if offline:  # a run folder's processes all log under its one run id
        return merged_wandb([read_wandb_process(p) for p in offline])
    raise NoMetrics("no metrics.csv and no offline wandb run (.wandb file) in it")


def load_runs(paths: list[str]) -> list[Run]:
    """The runs at ``paths``, in their order. Offline wandb runs of one run id (the processes of a
    resumed run) become one run, where the first of them is. Each path with nothing to compare yet
    is skipped, and named on stderr with the reason."""
    found: list[Run | str] = []  # runs, and the run ids of offline wandb runs in their place
    processes: dict[str, list[Process]] = {}
    given: dict[str, list[str]] = {}  # run id -> its paths, to name them if it is skipped
    for text in paths:
        try:
            path = Path(text)
            if is_offline_wandb(path):
                process = read_wandb_process(path)
                if process.run_id not in processes:
                    found.append(process.run_id)
                processes.setdefault(process.run_id, []).append(process)
                given.setdefault(process.run_id, []).append(text)
            else:
                found.append(load(text))
        except NoMetrics as e:  # a glob over runs/<project>/* may catch a run that never logged
            print(f"skipped {text}: {e}", file=sys.stderr)
    runs = []
    for item in found:
        if isinstance(item, Run):
            runs.append(item)
            continue
        try:
            runs.append(merged_wandb(processes[item]))
        except NoMetrics as e:
            print(f"skipped {', '.join(given[item])}: {e}", file=sys.stderr)
    return runs


# ------------------------------------------------------------------ output


def differing(runs: list[Run], all_settings: bool = False) -> list[str]:
    """The settings whose values are not the same in every run. Settings that only some runs have
    (runs of another model kind, or of older code) count only with ``all_settings``, absent
    counting as a value."""
    keys = {k for run in runs for k in run.config if k not in IGNORED}
    if not all_settings:
        keys = {k for k in keys if all(k in run.config for run in runs)}
    def values(key):
        return {json.dumps(run.config.get(key), default=str) for run in runs}
    return [k for k in sorted(keys) if len(values(k)) > 1]


def _format(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def run_labels(runs: list[Run], settings: list[str]) -> tuple[list[str], bool]:
    """Each run's label, for the table's first column and the plot's legend (see
    LABEL_NAME_LENGTH): its name, or the differing ``settings``, e.g. "model.lr=0.003,
    model.optimizer=muon"; and whether they are the settings. Runs that would share a label (runs
    of one config) get their run ids after it."""
    names = [run.name for run in runs]
    from_settings = ((len(set(names)) < len(names)
                      or max(map(len, names), default=0) > LABEL_NAME_LENGTH)
                     and 0 < len(settings) <= LABEL_SETTINGS)
    if from_settings:
        names = [", ".join(f"{key}={_format(run.config.get(key))}" for key in settings)
                 for run in runs]
    return [f"{name} ({run.config.get('run_id') or i + 1})" if names.count(name) > 1 else name
            for i, (run, name) in enumerate(zip(runs, names, strict=True))], from_settings


def ms_per_step(run: Run) -> float | None:
    """Mean training time per step, validations excluded: the training time at the last validation
    (``val/train_time_s``) over the steps done then, else (runs of older code) the throughput
    monitor's ``train/time``, which counts the samples drawn at validations as training. Steps count
    from 0: at step s, s + 1 are done."""
    points = run.series("val/train_time_s") or run.series("train/time")
    return 1000 * points[-1][1] / (points[-1][0] + 1) if points else None


TARGET_CLOCKS = ("val/train_time_s", "val/wall_time_s", "val/command_time_s")


def to_target(run: Run, metric: str, target: float) -> tuple[int | None, float | None,
                                                               float | None, float | None]:
    """The first validation at which ``metric`` is at most ``target``: the optimizer steps done
    then (the logged step, 0-based, plus one), the training time (validations left out) and wall
    time that reached it, and the time from the command's start to that validation's result
    (training.run_state.RunState); Nones where it never was (or, for the times, where the run did
    not log them: runs of older code lack some)."""
    for step, value in run.series(metric):
        if value <= target:
            return (step + 1, *(run.history.get(clock, {}).get(step) for clock in TARGET_CLOCKS))
    return None, None, None, None


def table(runs: list[Run], metric: str, all_settings: bool = False,
          target: float | None = None) -> str:
    """A Markdown table: one row per run, its label (``run_labels``), the differing settings (unless
    the labels are they), then steps, time and metrics; with ``target``, the steps and seconds
    each run took to reach it first."""
    settings = differing(runs, all_settings)
    names, from_settings = run_labels(runs, settings)
    if from_settings:  # the first column shows them already
        settings = []
    finals = [k for k in FINAL if any(k in run.history for run in runs)]
    reach = ([f"steps to {target:g}", f"train s to {target:g}", f"wall s to {target:g}",
              f"command s to {target:g}"] if target is not None else [])
    header = ["run", *settings, "last step", "time (min)", "ms/step", f"best {metric}",
              f"final {metric}", "final train/loss", *reach, *finals]
    rows = []
    for name, run in zip(names, runs, strict=True):
        points = run.series(metric)
        steps = max((step for key in ("train/loss", metric) for step in run.history.get(key, {})),
                    default=None)
        time = run.last("val/wall_time_s")
        rows.append([name, *(run.config.get(k) for k in settings), steps,
                     time / 60 if time is not None else None, ms_per_step(run),
                     min((v for _, v in points), default=None),
                     points[-1][1] if points else None, run.last("train/loss"),
                     *(to_target(run, metric, target) if target is not None else ()),
                     *(run.last(k) for k in finals)])
    cells = [header] + [[_format(v) for v in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]
    lines = ["| " + " | ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)) + " |"
             for row in cells]
    lines.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return "\n".join(lines)


def plot(runs: list[Run], metric: str, path: str, all_settings: bool = False) -> None:
    """``metric`` against step and against wall time (minutes), one line per run, labelled as the
    table's rows."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (by_step, by_time) = plt.subplots(1, 2, figsize=(12, 4.5))
    names, _ = run_labels(runs, differing(runs, all_settings))
    for name, run in zip(names, runs, strict=True):
        points = run.series(metric)
        if not points:
            continue
        steps, values = zip(*points, strict=True)
        line, = by_step.plot(steps, values, marker=".", label=name)
        times = run.history.get("val/wall_time_s", {})
        timed = [(times[s] / 60, v) for s, v in points if s in times]
        if timed:
            by_time.plot(*zip(*timed, strict=True), marker=".", color=line.get_color(),
                         label=name)
    for axis, xlabel in ((by_step, "step"), (by_time, "wall time (min)")):
        axis.set_xlabel(xlabel)
        axis.set_ylabel(metric)
        axis.grid(alpha=0.3)
    fig.tight_layout()
    handles, labels = by_step.get_legend_handles_labels()
    fig.legend(handles, labels, loc="upper center", bbox_to_anchor=(0.5, 0.0), fontsize="small")
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)


def parse_args(argv=None):
    p = ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("runs", nargs="*", help="run folders, metrics.csv files or offline wandb runs")
    p.add_argument("--wandb", metavar="ENTITY/PROJECT", default=None,
                   help="also compare runs of this wandb project")
    p.add_argument("--filters", default=None,
                   help="with --wandb: a JSON filter, e.g. '{\"state\": \"finished\"}'")
    p.add_argument("--limit", type=int, default=20,
                   help="with --wandb: at most this many runs, newest first")
    p.add_argument("--metric", default="val/loss", help="the metric to rank and plot")
    p.add_argument("--plot", default="compare_runs.png", help="where to write the PNG")
    p.add_argument("--target", type=float, default=None,
                   help="also the step, training seconds and wall seconds at which each run's "
                        "metric first reached this value (or went below it)")
    p.add_argument("--all-settings", action="store_true",
                   help="also settings that only some of the runs have (by default, those all runs "
                        "have)")
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    if not args.runs and not args.wandb:
        raise UsageError("give run folders to compare (e.g. runs/mini-gpt/*), or --wandb "
                         "ENTITY/PROJECT")
    try:
        filters = json.loads(args.filters) if args.filters else None
    except json.JSONDecodeError as e:
        raise UsageError(f"--filters is not JSON: {e}") from None
    runs = load_runs(args.runs)
    if args.runs and not runs and not args.wandb:
        raise UsageError("no run given has metrics to compare yet (each is named above, with "
                         "the reason): give run folders that train.py wrote, once they have "
                         "logged")
    if args.wandb:
        runs += read_wandb_project(args.wandb, filters, args.limit)
    if not runs:
        raise UsageError(f"no runs found in wandb project {args.wandb!r} with these filters")
    if not any(args.metric in run.history for run in runs):
        raise UsageError(f"no run logged {args.metric!r}; logged: "
                         f"{', '.join(sorted({k for run in runs for k in run.history}))}")
    print(table(runs, args.metric, args.all_settings, args.target))
    plot(runs, args.metric, args.plot, args.all_settings)
    print(f"\nWrote {args.plot}: {args.metric} against step and wall time")


if __name__ == "__main__":
    sys.exit(exit_code(main))
