"""The commands the docs give and the studies the lab runs: every command in README.md and docs/
parses as written, and every variant of every study file in experiments/studies/ is a run that
train.py accepts and that differs from its study's baseline. Parsing only: nothing is trained,
read or downloaded."""

import contextlib
import importlib
import io
import re
import shlex
from pathlib import Path

import pytest
import yaml
from conftest import REPO

import train
from scripts import ablate
from training.errors import UsageError

DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
# a command: python train.py ..., python scripts/NAME.py ..., or make train ...
COMMAND = re.compile(r"^(?:python3? (?:train\.py|scripts/\w+\.py)|make train)\b")


def doc_commands(path: Path) -> list[str]:
    """The commands of a markdown file: the lines of its code blocks (continuations joined) and
    its inline code spans that are commands, with environment settings in front dropped."""
    text = path.read_text()
    found = []
    for block in re.findall(r"^```[^\n]*\n(.*?)^```", text, flags=re.S | re.M):
        for line in block.replace("\\\n", " ").splitlines():
            found.append(line.strip())
    found += re.findall(r"`([^`\n]+)`", re.sub(r"^```.*?^```", "", text, flags=re.S | re.M))
    commands = []
    for line in found:
        line = re.sub(r"^(?:/usr/bin/time(?: -v)? |[A-Z_]+=\S+ )+", "", line)
        if COMMAND.match(line):
            commands.append(line)
    return commands


ALL = [(path.relative_to(REPO).as_posix(), command) for path in DOCS
       for command in doc_commands(path)]


def make_train_args(words: list[str]) -> list[str]:
    """What `make train VAR=value ...` runs (the Makefile's train target)."""
    settings = dict(word.split("=", 1) for word in words[2:])
    config = settings.get("CONFIG", "configs/shakespeare_char_cpu.yaml")
    data = ["--data.source", settings["DATA"]] if settings.get("DATA") else []
    return ["fit", "--config", config, *data, *shlex.split(settings.get("ARGS", ""))]


def parse_train(args: list[str]) -> str:
    """train.py's CLI parsing ``args`` (its --print_config: the merged config, nothing built)."""
    out = io.StringIO()
    with pytest.raises(SystemExit) as exit_, contextlib.redirect_stdout(out):
        train.main([*args, "--print_config"])
    assert exit_.value.code in (0, None), f"train.py {' '.join(args)} does not parse"
    return out.getvalue()


def test_the_docs_give_commands_and_every_script_they_name_exists():
    assert len(ALL) >= 40, ALL  # the extraction finds them
    for where, command in ALL:
        words = shlex.split(command, comments=True)
        if words[0].startswith("python"):
            assert (REPO / words[1]).is_file(), f"{where}: {command}"


@pytest.mark.parametrize("where, command", ALL, ids=[f"{w}:{c[:60]}" for w, c in ALL])
def test_every_command_in_the_docs_parses_as_written(where, command, monkeypatch):
    monkeypatch.chdir(REPO)  # commands are written for the repository's root
    words = shlex.split(command, comments=True)
    if words[0] == "make":
        parse_train(make_train_args(words))
    elif words[1] == "train.py":
        parse_train(words[2:])
    else:
        script = importlib.import_module(f"scripts.{Path(words[1]).stem}")
        try:
            script.parse_args(words[2:])
        except SystemExit as e:  # --help
            assert e.code in (0, None), f"{where}: {command} does not parse"


STUDIES = sorted((REPO / "experiments" / "studies").glob("*.yaml"))


@pytest.mark.parametrize("path", STUDIES, ids=[p.stem for p in STUDIES])
def test_every_variant_of_a_study_is_a_run_that_differs_from_its_baseline(path, monkeypatch):
    monkeypatch.chdir(REPO)
    study = ablate.load_study(str(path))
    assert study.description and study.measures and study.variants
    config = str(REPO / study.config)
    baseline = yaml.safe_load(parse_train(["fit", "--config", config, *study.flags]))
    shape = ablate.shape_of(baseline)
    for variant, flags in study.variants.items():
        merged = yaml.safe_load(parse_train(["fit", *ablate.variant_args(study, variant, config,
                                                                         shape, [])]))
        if flags:  # a variant changes something: a flag that sets what the baseline has is a slip
            assert merged != baseline, f"{path.stem}: {variant} runs the baseline"


def test_a_study_file_with_a_mistake_is_refused_in_one_line(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("config: configs/shakespeare_char_cpu.yaml\nvariants: {a: []}\nsteps: 3\n")
    with pytest.raises(UsageError, match="unexpected keyword argument 'steps'"):
        ablate.load_study(str(path))
    path.write_text("config: configs/shakespeare_char_cpu.yaml\nvariants: {a: --model.lr=1}\n")
    with pytest.raises(UsageError, match="variants.a must be a list of train.py flags"):
        ablate.load_study(str(path))
    with pytest.raises(UsageError, match="no study file .*no_such.yaml; the studies in"):
        ablate.load_study("no_such")
