"""Run a study: a baseline config trained with each of its variants, one run after another on this
machine, then one table (scripts/compare_runs.py's) and a plot of val/loss against step and time.

    python scripts/ablate.py recipe                          # experiments/studies/recipe.yaml
    python scripts/ablate.py recipe --variants baseline muon -- --trainer.max_steps 500
    python scripts/ablate.py experiments/studies/attention.yaml --out runs/attention
    python scripts/ablate.py translation_2400 -- --data.source path/to/multi30k

A study file (experiments/README.md has the format) names a baseline config, the train.py flags
every run gets, its variants (flags added to the baseline; a variant that gives --config replaces
the baseline config), the environment variables its runs need and what it measures. What follows
``--`` goes to every run's command line, after those. Runs land in --out/<project>/<variant>-<id>/
(compare them again later with scripts/compare_runs.py). Times are training time (validations
left out): run nothing else on the machine meanwhile, or they are not comparable.
"""

import argparse
import contextlib
import dataclasses
import io
import os
import subprocess
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
    one_line,
)

if __name__ == "__main__":
    exit_at_once_on_ctrl_c()

import yaml

from scripts import compare_runs

REPO = Path(__file__).resolve().parents[1]
STUDIES = REPO / "experiments" / "studies"


@dataclass
class Study:
    """A study file's contents (experiments/README.md)."""

    config: str  # the baseline's config, relative to the repository
    variants: dict[str, list[str]]  # name -> train.py flags; "n_head/2", "block_size/2" resolved
    description: str = ""
    measures: str = ""
    flags: list[str] = field(default_factory=list)  # every run's
    env: dict[str, str] = field(default_factory=dict)  # every run's environment variables
    target: float | None = None  # compare_runs --target: steps and seconds to this val/loss


def study_path(name: str) -> Path:
    """A study's file: a path, or the name of a file in experiments/studies/."""
    path = Path(name)
    return path if path.suffix in (".yaml", ".yml") else STUDIES / f"{name}.yaml"


def load_study(name: str) -> Study:
    """The study of ``study_path(name)``, its fields checked; a mistake is a UsageError."""
    path = study_path(name)
    if not path.is_file():
        known = ", ".join(sorted(p.stem for p in STUDIES.glob("*.yaml")))
        raise UsageError(f"no study file {path}; the studies in {STUDIES}: {known}")
    try:
        fields = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise UsageError(f"{path} is not valid YAML: {e}") from None
    keys = [f.name for f in dataclasses.fields(Study)]
    if not isinstance(fields, dict) or not {"config", "variants"} <= fields.keys() \
            or not fields.keys() <= set(keys):
        found = sorted(fields) if isinstance(fields, dict) else type(fields).__name__
        raise UsageError(f"{path} has the keys {found}; a study file has config and variants, and "
                         f"may have {', '.join(keys[2:])} (experiments/README.md)")
    study = Study(**fields)
    lists = [("flags", study.flags), *((f"variants.{k}", v) for k, v in study.variants.items())]
    for key, flags in lists:
        if not isinstance(flags, list) or not all(isinstance(f, str) for f in flags):
            raise UsageError(f"{path}: {key} must be a list of train.py flags, got {flags!r}")
    if not (REPO / study.config).is_file():
        raise UsageError(f"{path}: its config {study.config} is not in the repository")
    return study


def resolve(flag: str, shape: dict) -> str:
    """'--x=n_head/2' -> '--x=2' for n_head 4 (at least 1); '--config=configs/...' -> the
    repository's file, from any working directory; other flags as they are."""
    name, _, value = flag.partition("=")
    if name == "--config":
        return f"--config={REPO / value}"
    field_name, slash, divisor = value.partition("/")
    if slash and field_name in shape:
        return f"{name}={max(1, shape[field_name] // int(divisor))}"
    return flag


def variant_args(study: Study, variant: str, config: str, shape: dict, extra: list[str]
                 ) -> list[str]:
    """train.py's arguments after ``fit`` for one variant: the baseline ``config`` (or the
    variant's own), the study's flags, the variant's other flags, then ``extra``: later flags
    win, so a variant's own settings hold over the study's."""
    flags = [resolve(flag, shape) for flag in study.variants[variant]]
    configs = [flag for flag in flags if flag.startswith("--config=")] or ["--config", config]
    return [*configs, *study.flags, *(f for f in flags if f not in configs), *extra]


def merged_config(args: list[str], subcommand: str = "fit") -> str:
    """The config ``train.py SUBCOMMAND ARGS`` would run, as its --print_config prints it, parsed
    in this process: nothing is built or read. A refusal is a UsageError with train.py's
    reason."""
    import train  # here: Lightning takes seconds to import, and --help needs none of it

    out, err = io.StringIO(), io.StringIO()
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            train.main([subcommand, *args, "--print_config"])
    except SystemExit as e:  # --print_config exits 0
        if e.code not in (0, None):
            lines = err.getvalue().strip().splitlines() or [f"exit status {e.code}"]
            raise UsageError(lines[-1].removeprefix("error: ")) from None
    except argparse.ArgumentError as e:  # train.py's parse errors raise (training/cli.py)
        raise UsageError(one_line(e)) from None
    return out.getvalue()


def shape_of(merged: dict) -> dict:
    """The fields of a printed config that a variant's "n_head/2" or "block_size/2" may name."""
    return {"n_head": merged["model"]["config"]["n_head"],
            "block_size": merged["data"].get("block_size")}  # a GPT's (the seq2seq has max_len)


def parse_args(argv=None) -> argparse.Namespace:
    """The options; what follows ``--`` in ``args.extra``."""
    argv = sys.argv[1:] if argv is None else argv
    extra = argv[argv.index("--") + 1:] if "--" in argv else []
    argv = argv[:argv.index("--")] if "--" in argv else argv
    p = ArgumentParser(
        description=__doc__.split("\n\n")[0],
        usage="%(prog)s STUDY [options] [-- train.py flags for every run]",
        epilog="Flags after -- go to every run's train.py command line, after the study's.")
    p.add_argument("study", help="a study file, or the name of one in experiments/studies/")
    p.add_argument("--config", default=None, help="another baseline config than the study's")
    p.add_argument("--variants", nargs="+", default=None,
                   help="the variants to run, in order (default: all of the study's)")
    p.add_argument("--out", default="runs/ablation",
                   help="the runs' save_dir (default: runs/ablation): runs land in "
                        "OUT/<project>/<variant>-<id>/")
    p.add_argument("--plot", default=None, help="val/loss curves (default: ablate_<study>.png)")
    args = p.parse_args(argv)
    args.extra = extra
    return args


def main(argv=None):
    args = parse_args(argv)
    extra = args.extra
    study, name = load_study(args.study), study_path(args.study).stem
    unknown = set(args.variants or ()) - set(study.variants)
    if unknown:
        raise UsageError(f"{', '.join(sorted(unknown))}: not a variant of the {name} study; "
                         f"choose from {', '.join(study.variants)}")
    config = args.config or str(REPO / study.config)
    if not Path(config).is_file():
        raise UsageError(f"no config at {config}")
    try:
        shape = shape_of(yaml.safe_load(merged_config(["--config", config, *study.flags,
                                                       *extra])))
    except UsageError as e:
        raise UsageError(f"train.py refuses the {name} study's flags or those after '--': "
                         f"{e}") from None
    variants = args.variants or list(study.variants)
    commands = {}
    for variant in variants:  # every run checked before the first one trains
        run_args = [*variant_args(study, variant, config, shape, extra),
                    f"--run.save_dir={args.out}", f"--run.name={variant}",
                    f"--run.group=ablate-{name}"]
        try:
            merged_config(run_args)
        except UsageError as e:
            raise UsageError(f"train.py refuses the {variant} variant of {study_path(args.study)}"
                             f": {e}") from None
        commands[variant] = [sys.executable, str(REPO / "train.py"), "fit", *run_args]
    env = {**os.environ, **{key: str(value) for key, value in study.env.items()}}
    folders, failed = [], None
    for variant, command in commands.items():
        print(f"\n== {variant}: {' '.join(study.variants[variant]) or 'the baseline as it is'}",
              flush=True)
        before = set(Path(args.out).glob(f"*/{variant}-*"))
        code = subprocess.run(command, env=env).returncode
        folders += sorted(set(Path(args.out).glob(f"*/{variant}-*")) - before)
        if code != 0:
            failed = f"the {variant} run ended with exit status {code} (its output is above)"
            break
    print()
    target = ["--target", str(study.target)] if study.target is not None else []
    if folders:
        compare_runs.main([*map(str, folders), "--plot", args.plot or f"ablate_{name}.png",
                           *target])
    if failed:
        raise UsageError(f"{failed}; the table holds the runs before it")


if __name__ == "__main__":
    sys.exit(exit_code(main))
