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
import os
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository: model/, data/

import yaml

from scripts import compare_runs
from training.errors import UsageError, exit_code

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
    try:
        study = Study(**fields)
    except TypeError as e:  # a missing or unknown key
        raise UsageError(f"{path}: {e}; experiments/README.md lists a study's keys") from None
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
    """train.py's arguments after ``fit`` for one variant: the baseline ``config`` (unless the
    variant gives its own), the variant's flags, the study's, then ``extra``."""
    flags = [resolve(flag, shape) for flag in study.variants[variant]]
    base = [] if any(flag.startswith("--config=") for flag in flags) else ["--config", config]
    return [*base, *flags, *study.flags, *extra]


def run_shape(config: str, extra: list[str]) -> dict:
    """n_head and block_size of the runs, from the config train.py would run with these flags
    (LightningCLI's --print_config merges them as training does)."""
    printed = subprocess.run([sys.executable, str(REPO / "train.py"), "fit", "--config", config,
                              *extra, "--print_config"], capture_output=True, text=True)
    if printed.returncode != 0:
        reason = printed.stderr.strip().splitlines()[-1].removeprefix("error: ")
        raise UsageError(f"train.py refuses --config and the flags after '--' ({reason})")
    return shape_of(yaml.safe_load(printed.stdout))


def shape_of(merged: dict) -> dict:
    """The fields of a printed config that a variant's "n_head/2" or "block_size/2" may name."""
    return {"n_head": merged["model"]["config"]["n_head"],
            "block_size": merged["data"].get("block_size")}  # a GPT's (the seq2seq has max_len)


def parse_args(argv=None) -> argparse.Namespace:
    """The options; what follows ``--`` in ``args.extra``."""
    argv = sys.argv[1:] if argv is None else argv
    extra = argv[argv.index("--") + 1:] if "--" in argv else []
    argv = argv[:argv.index("--")] if "--" in argv else argv
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("study", help="a study file, or the name of one in experiments/studies/")
    p.add_argument("--config", default=None, help="another baseline config than the study's")
    p.add_argument("--variants", nargs="+", default=None,
                   help="the variants to run, in order (default: all of the study's)")
    p.add_argument("--out", default="runs/ablation", help="the runs' save_dir")
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
    shape = run_shape(config, [*study.flags, *extra])
    env = {**os.environ, **{key: str(value) for key, value in study.env.items()}}
    folders = []
    for variant in args.variants or study.variants:
        command = [sys.executable, str(REPO / "train.py"), "fit",
                   *variant_args(study, variant, config, shape, extra),
                   f"--run.save_dir={args.out}", f"--run.name={variant}",
                   f"--run.group=ablate-{name}"]
        print(f"\n== {variant}: {' '.join(study.variants[variant]) or 'the baseline as it is'}",
              flush=True)
        before = set(Path(args.out).glob(f"*/{variant}-*"))
        subprocess.run(command, check=True, env=env)
        folders += sorted(set(Path(args.out).glob(f"*/{variant}-*")) - before)
    print()
    target = ["--target", str(study.target)] if study.target is not None else []
    compare_runs.main([*map(str, folders), "--plot", args.plot or f"ablate_{name}.png", *target])


if __name__ == "__main__":
    sys.exit(exit_code(main))
