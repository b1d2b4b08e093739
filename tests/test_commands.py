"""The commands the docs give and the studies the lab runs: every command in README.md and docs/
parses as written, and every variant of every study file in experiments/studies/ is a run that
train.py accepts and that differs from its study's baseline. Parsing only: nothing is trained,
read or downloaded."""

import importlib
import os
import re
import shlex
import subprocess
from pathlib import Path

import pytest
import yaml
from conftest import REPO

from scripts import ablate, bench_train
from training.errors import UsageError

DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md")),
        REPO / "experiments" / "README.md"]
# a command: python train.py ..., python scripts/NAME.py ..., make train|speedrun ..., wherever
# it starts in a line (after `echo ... |` or environment settings), up to the end of its code span
COMMAND = re.compile(r"(?:python3? (?:train\.py|scripts/\w+\.py)|make (?:train|speedrun))\b[^`]*")


def doc_commands(path: Path) -> list[str]:
    """The commands of a markdown file, in its code blocks (continued lines joined) and in its
    inline code spans (which may wrap): the first in each line or span."""
    text = path.read_text()
    found = []
    for block in re.findall(r"^```[^\n]*\n(.*?)^```", text, flags=re.S | re.M):
        found += block.replace("\\\n", " ").splitlines()
    prose = re.sub(r"^```.*?^```", "", text, flags=re.S | re.M)
    found += [" ".join(span.split()) for span in re.findall(r"`([^`]+)`", prose)]
    return [match.group(0).strip() for line in found if (match := COMMAND.search(line))]


ALL = [(path.relative_to(REPO).as_posix(), command) for path in DOCS
       for command in doc_commands(path)]


def make_train_args(words: list[str]) -> list[str]:
    """What `make train VAR=value ...` runs: train.py's arguments in the Makefile's recipe."""
    # a make of our own, without the variables of a `make test ARGS=...` that may be running this
    # test: they reach it through MAKEFLAGS and the environment, where the Makefile's ?= takes them
    own = re.findall(r"^(\w+)\s*\?=", (REPO / "Makefile").read_text(), flags=re.M)
    env = {k: v for k, v in os.environ.items()
           if k not in ("MAKEFLAGS", "MFLAGS", "MAKELEVEL", *own)}
    lines = subprocess.run(["make", "-n", "-s", *words[1:]], cwd=REPO, capture_output=True,
                           text=True, check=True, env=env).stdout.splitlines()
    line, = (line for line in lines if " train.py " in line)
    return shlex.split(line.split(" train.py ", 1)[1])


def parse_train(args: list[str]) -> str:
    """train.py's CLI parsing ``args`` (its subcommand first): the config it would run, printed,
    or its help."""
    return ablate.merged_config(args[1:], subcommand=args[0])


def test_the_docs_give_commands_and_every_script_they_name_exists():
    assert len(ALL) >= 60, ALL  # the extraction finds them
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
        return
    if words[1] == "train.py":
        parse_train(words[2:])
        return
    script = importlib.import_module(f"scripts.{Path(words[1]).stem}")
    try:
        args = script.parse_args(words[2:])
    except SystemExit as e:  # --help
        assert e.code in (0, None), f"{where}: {command} does not parse"
        return
    if script is bench_train and args.train_flags:  # the flags it hands on to train.py
        parse_train(["fit", "--config", args.config, *args.train_flags])
    if script is ablate:  # the study, and the flags after -- with its own
        study = ablate.load_study(args.study)
        ablate.merged_config(["--config", args.config or str(REPO / study.config),
                              *study.flags, *args.extra])


STUDIES = sorted((REPO / "experiments" / "studies").glob("*.yaml"))


@pytest.mark.parametrize("path", STUDIES, ids=[p.stem for p in STUDIES])
def test_every_variant_of_a_study_is_a_run_that_differs_from_its_baseline(path, monkeypatch):
    monkeypatch.chdir(REPO)
    study = ablate.load_study(str(path))
    assert study.description and study.measures and study.variants
    config = str(REPO / study.config)
    baseline = yaml.safe_load(ablate.merged_config(["--config", config, *study.flags]))
    shape = ablate.shape_of(baseline)
    for variant, flags in study.variants.items():
        merged = yaml.safe_load(ablate.merged_config(ablate.variant_args(study, variant, config,
                                                                         shape, [])))
        if flags:  # a variant changes something: a flag that sets what the baseline has is a slip
            assert merged != baseline, f"{path.stem}: {variant} runs the baseline"


def test_a_study_file_with_a_mistake_is_refused_in_one_line(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("config: configs/shakespeare_char_cpu.yaml\nvariants: {a: []}\nsteps: 3\n")
    with pytest.raises(UsageError, match=r"'steps', 'variants'\]; a study file has config"):
        ablate.load_study(str(path))
    path.write_text("config: configs/shakespeare_char_cpu.yaml\nvariants: {a: --model.lr=1}\n")
    with pytest.raises(UsageError, match="variants.a must be a list of train.py flags"):
        ablate.load_study(str(path))
    with pytest.raises(UsageError, match="no study file .*no_such.yaml; the studies in"):
        ablate.load_study("no_such")


def test_a_study_variant_train_py_refuses_is_named_before_any_run_trains(tmp_path, capsys):
    path = tmp_path / "typo.yaml"
    path.write_text("description: d\nmeasures: m\nconfig: configs/shakespeare_char_cpu.yaml\n"
                    "variants: {good: [--model.lr=1e-3], bad: [--model.lrr=3e-3]}\n")
    with pytest.raises(UsageError, match=r"refuses the bad variant of .*typo.yaml: .*--model.lrr"):
        ablate.main([str(path), "--out", str(tmp_path / "runs")])
    assert not (tmp_path / "runs").exists()  # the good variant did not train first


def test_make_install_takes_pytorchs_cpu_index_only_with_no_nvidia_gpu_and_where_it_answers(
        tmp_path, monkeypatch):
    """`make install`'s PyTorch step (scripts/_install_torch.py) decides without a network or a GPU
    here: a fake `nvidia-smi` on PATH, a local server standing in for PyTorch's CPU index."""
    import http.server
    import sys
    import threading

    from scripts import _install_torch as install

    class Index(http.server.BaseHTTPRequestHandler):
        def do_HEAD(self):
            self.send_response(200 if self.path == "/whl/cpu/torch/" else 404)
            self.end_headers()

        def log_message(self, *args):
            pass

    server = http.server.HTTPServer(("127.0.0.1", 0), Index)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    host = f"http://127.0.0.1:{server.server_port}"
    for name in ("NO_PROXY", "no_proxy"):
        monkeypatch.setenv(name, "127.0.0.1")
    gpu, no_gpu, gpu_gone = (tmp_path / name for name in ("gpu", "no_gpu", "gpu_gone"))
    for folder, script in ((gpu, "echo 'GPU 0: NVIDIA H200 (UUID: GPU-1)'"),
                           (gpu_gone, "echo 'No devices were found'; exit 6"), (no_gpu, None)):
        folder.mkdir()
        if script:
            (folder / "nvidia-smi").write_text(f"#!/bin/sh\n{script}\n")
            (folder / "nvidia-smi").chmod(0o755)
    monkeypatch.setattr(sys, "platform", "linux")

    def choose(path, index_url, index="auto", torch=("torch==2.13.0",)):
        monkeypatch.setenv("PATH", str(path))
        monkeypatch.setattr(install, "CPU_INDEX", index_url)
        return install.choose(index, list(torch))

    try:
        cpu = f"{host}/whl/cpu"
        assert choose(no_gpu, cpu) == (["--index-url", cpu],
                                       f"PyTorch: CPU build from {cpu} (no NVIDIA GPU)")
        assert choose(gpu_gone, cpu)[0] == ["--index-url", cpu]
        assert choose(gpu, cpu) == ([], "PyTorch: default build (NVIDIA GPU found)")
        args, line = choose(no_gpu, f"{host}/whl/gone")  # answers, but has no torch
        assert args == [] and line.endswith(f"{host[7:]}/whl/gone not reachable)")
        assert choose(no_gpu, cpu, index="") == ([], "PyTorch: from the package index "
                                                     "(TORCH_INDEX is empty)")
        assert choose(gpu, cpu, index="https://mirror/t")[0] == ["--index-url", "https://mirror/t"]
        assert choose(no_gpu, cpu, torch=["torch", "-i", "https://mirror/t"])[0] == []
        monkeypatch.setattr(sys, "platform", "darwin")  # PyPI's macOS wheels carry no CUDA
        assert choose(no_gpu, cpu) == ([], "PyTorch: default build from the package index (darwin)")
        monkeypatch.setattr(sys, "platform", "linux")
    finally:
        server.shutdown()
        server.server_close()
    assert "not reachable" in choose(no_gpu, cpu)[1]  # nothing listening there now
    # the Makefile's command line, with TORCH_INDEX= (so the same on any platform): one line, then
    # pip's command with the configured index, the pin as given
    result = subprocess.run([sys.executable, str(REPO / "scripts" / "_install_torch.py"),
                             "--dry-run", "--index=", "torch==2.13.0"], capture_output=True,
                            text=True, check=True, timeout=30)
    assert result.stdout.splitlines() == ["PyTorch: from the package index (TORCH_INDEX is empty)",
                                          f"{sys.executable} -m pip install torch==2.13.0"]


def test_every_case_of_the_bad_input_sweep_runs_a_command_that_exists():
    sweep = yaml.safe_load((REPO / "experiments" / "sweeps" / "bad_input.yaml").read_text())
    cases = [*sweep["cases"].values(), *(run["command"] for run in sweep["runs"].values())]
    assert len(cases) >= 50
    for case in cases:
        assert case[0] == "train" or (REPO / case[0]).is_file(), case
