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
"""

import argparse
import csv
import json
import math
import struct
import sys
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository: model/, data/

import yaml

from training.errors import UsageError, exit_code

# settings that differ between any two runs
IGNORED = {"run_dir", "run_id", "run_name", "run.id", "run.name", "ckpt_path"}
FINAL = ["final/bleu", "final/bleu_lc"]  # seq2seq: the beam-search BLEU at the end of training


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


# ------------------------------------------------------------------ sources


def read_csv_run(path: Path) -> Run:
    """A run folder written by train.py (or its metrics.csv): config from hparams.yaml, else
    config.yaml."""
    folder = path if path.is_dir() else path.parent
    metrics = folder / "metrics.csv"
    config = {}
    for name in ("hparams.yaml", "config.yaml"):
        if (folder / name).is_file():
            config = yaml.safe_load((folder / name).read_text()) or {}
            break
    run = Run(name=str(config.get("run_name") or folder.name), config=flatten(config))
    with open(metrics, newline="") as f:
        for row in csv.DictReader(f):
            if not row.get("step"):
                continue
            step = int(float(row["step"]))
            for key, value in row.items():
                if key not in ("step", "epoch") and value not in ("", None):
                    run.add(key, step, float(value))
    return run


def wandb_records(path: Path):
    """The records of a .wandb file (LevelDB log format: 32 KiB blocks of chunks, each
    <crc:4><len:2><type:1>, type 1 a whole record, 2/3/4 its first/middle/last part), as
    wandb_internal_pb2.Record messages."""
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
        pos += 7 + length
        record = chunk if kind in (1, 2) else record + chunk
        if kind in (1, 4):
            message = wandb_internal_pb2.Record()
            message.ParseFromString(record)
            yield message


def _item_key(item) -> str:
    return "/".join(item.nested_key) if item.nested_key else item.key


def read_wandb_offline(path: Path) -> Run:
    """An offline wandb run: its folder (offline-run-*) or its .wandb file."""
    files = [path] if path.is_file() else sorted(path.glob("*.wandb"))
    if not files:
        raise UsageError(f"{path} has no .wandb file")
    config, name, rows = {}, path.name, []
    for record in wandb_records(files[0]):
        kind = record.WhichOneof("record_type")
        if kind == "run":
            name = record.run.display_name or name
            config.update({_item_key(i): json.loads(i.value_json)
                           for i in record.run.config.update})
        elif kind == "config":
            config.update({_item_key(i): json.loads(i.value_json) for i in record.config.update})
        elif kind == "history":
            rows.append({_item_key(i): json.loads(i.value_json) for i in record.history.item})
    config.pop("_wandb", None)
    return _run_from_rows(str(config.get("run_name") or name), config, rows)


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


class NoMetrics(UsageError):
    """A folder with no metrics in it (a run that stopped before it logged anything): skipped."""


def load(path_text: str) -> Run:
    path = Path(path_text)
    if not path.exists():
        raise UsageError(f"{path} does not exist: give run folders (runs/<project>/<run>), "
                         "metrics.csv files or offline wandb runs")
    if (path / "metrics.csv").is_file() or path.name == "metrics.csv":
        return read_csv_run(path)
    if path.suffix == ".wandb" or list(path.glob("*.wandb")):
        return read_wandb_offline(path)
    raise NoMetrics(f"{path} has no metrics.csv and no .wandb file")


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


def ms_per_step(run: Run) -> float | None:
    """Mean training time per step, validations excluded: the training time at the last validation
    (``val/train_time_s``) over the steps done then, else (runs of older code) the throughput
    monitor's ``train/time``, which counts the samples drawn at validations as training. Steps count
    from 0: at step s, s + 1 are done."""
    points = run.series("val/train_time_s") or run.series("train/time")
    return 1000 * points[-1][1] / (points[-1][0] + 1) if points else None


def to_target(run: Run, metric: str, target: float) -> tuple[int | None, float | None,
                                                               float | None]:
    """The first validation at which ``metric`` is at most ``target``: the optimizer steps done
    then (the logged step, 0-based, plus one), and the training time (validations left out) and
    wall time that reached it; Nones where it never was (or, for the times, where the run did not
    log them: runs of older code lack val/train_time_s)."""
    for step, value in run.series(metric):
        if value <= target:
            return (step + 1, run.history.get("val/train_time_s", {}).get(step),
                    run.history.get("val/wall_time_s", {}).get(step))
    return None, None, None


def table(runs: list[Run], metric: str, all_settings: bool = False,
          target: float | None = None) -> str:
    """A Markdown table: one row per run, the differing settings, then steps, time and metrics;
    with ``target``, the steps and seconds each run took to reach it first."""
    settings = differing(runs, all_settings)
    finals = [k for k in FINAL if any(k in run.history for run in runs)]
    reach = ([f"steps to {target:g}", f"train s to {target:g}", f"wall s to {target:g}"]
             if target is not None else [])
    header = ["run", *settings, "last step", "time (min)", "ms/step", f"best {metric}",
              f"final {metric}", "final train/loss", *reach, *finals]
    rows = []
    for run in runs:
        points = run.series(metric)
        steps = max((step for key in ("train/loss", metric) for step in run.history.get(key, {})),
                    default=None)
        time = run.last("val/wall_time_s")
        rows.append([run.name, *(run.config.get(k) for k in settings), steps,
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


def plot(runs: list[Run], metric: str, path: str) -> None:
    """``metric`` against step and against wall time (minutes), one line per run."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (by_step, by_time) = plt.subplots(1, 2, figsize=(12, 4.5))
    for run in runs:
        points = run.series(metric)
        if not points:
            continue
        steps, values = zip(*points, strict=True)
        line, = by_step.plot(steps, values, marker=".", label=run.name)
        times = run.history.get("val/wall_time_s", {})
        timed = [(times[s] / 60, v) for s, v in points if s in times]
        if timed:
            by_time.plot(*zip(*timed, strict=True), marker=".", color=line.get_color(),
                         label=run.name)
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
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
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
    runs = []
    for path in args.runs:
        try:
            runs.append(load(path))
        except NoMetrics as e:  # a glob over runs/<project>/* may catch a run that never logged
            print(f"skipping {e}", file=sys.stderr)
    if args.runs and not runs and not args.wandb:
        raise UsageError("none of the folders holds metrics: give run folders that train.py wrote")
    if args.wandb:
        runs += read_wandb_project(args.wandb, filters, args.limit)
    if not runs:
        raise UsageError(f"no runs found in wandb project {args.wandb!r} with these filters")
    names = [run.name for run in runs]
    for i, run in enumerate(runs):  # runs of one config share a default name: tell them apart by id
        if names.count(run.name) > 1:
            run.name = f"{run.name} ({run.config.get('run_id') or i + 1})"
    if not any(args.metric in run.history for run in runs):
        raise UsageError(f"no run logged {args.metric!r}; logged: "
                           f"{', '.join(sorted({k for run in runs for k in run.history}))}")
    print(table(runs, args.metric, args.all_settings, args.target))
    plot(runs, args.metric, args.plot)
    print(f"\nWrote {args.plot}: {args.metric} against step and wall time")


if __name__ == "__main__":
    sys.exit(exit_code(main))
