"""Every script in scripts/ runs end to end on tiny checkpoints, and each, like train.py, imports
the project's own packages when run from a working directory whose own data/, model/ and train.py
would shadow them if it let them."""

import functools
import importlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import REPO

from training.errors import UsageError, exit_code

GPT_RUN = ["--data.block_size", "16", "--data.batch_size", "4", "--model.config.n_layer", "1",
           "--model.config.n_embd", "16", "--model.config.n_head", "2", "--model.val_samples", "0",
           "--trainer.max_steps", "4", "--trainer.val_check_interval", "2",
           "--trainer.limit_val_batches", "2", "--trainer.enable_progress_bar", "false"]


@pytest.fixture(scope="module")
def foreign_cwd(tmp_path_factory) -> Path:
    """A user's project folder: its own data/, model/ and train.py, each failing loudly if
    imported."""
    folder = tmp_path_factory.mktemp("users_project")
    for package in ("data", "model"):
        (folder / package).mkdir()
        (folder / package / "__init__.py").write_text("raise ImportError('the user\\'s own "
                                                      f"{package}/ was imported')")
    (folder / "train.py").write_text("raise ImportError('the user\\'s own train.py was imported')")
    return folder


def script_cases(ckpts: dict[str, Path], out: Path) -> dict[str, list[str]]:
    """Arguments for each script, on the smallest inputs it takes."""
    hellaswag = out / "hellaswag.jsonl"  # two items in HellaSwag's format, in the text's words
    out.mkdir(parents=True, exist_ok=True)
    endings = ["sat.", "ran.", "flew.", "on."]
    hellaswag.write_text("".join(json.dumps({"ctx": ctx, "endings": endings, "label": label}) + "\n"
                                 for ctx, label in (("The cat", 0), ("A bird", 2))))
    return {
        # the recipe variant: a study's variant that gives its own config
        "ablate": ["recipe", "--variants", "recipe", "--out", str(out / "ablation"),
                   "--plot", str(out / "ablation.png"), "--", "--data.source", str(ckpts["text"]),
                   "--data.cache_dir", str(out / "cache"), *GPT_RUN],
        # one path, windowed: a process of its own measures each run's memory (test_attention.py
        # runs the reference and the tiled path unwindowed, with the plot and the JSON)
        "bench_attention": ["--paths", "sdpa", "--seq-lens", "16", "--windows", "8", "--repeats",
                            "1", "--threads", "1", "--plot", str(out / "attention.png")],
        "bench_optim": ["--n-layer", "1", "--n-embd", "16", "--n-head", "2", "--batch", "2",
                        "--block", "8", "--repeats", "1", "--threads", "1", "--device", "cpu"],
        "bench_generate": ["--ckpt", str(ckpts["gpt"]), "--contexts", "1", "8", "--new-tokens", "4",
                           "--repeats", "1", "--threads", "1"],
        "bench_train": ["--source", str(ckpts["text"]), "--variants", "auto:auto", "naive:32-true",
                        "--steps", "2", "--warmup", "1", "--repeats", "1", "--threads", "1",
                        "--data.cache_dir", str(out / "cache"), *GPT_RUN,
                        "--trainer.accumulate_grad_batches", "2"],  # steps of 2 batches
        "export_hf": ["--ckpt", str(ckpts["gpt"]), "--out", str(out / "exported")],
        "hellaswag": [str(ckpts["gpt"]), "--data", str(hellaswag), "--device", "cpu"],
        "compare_runs": [str(ckpts["gpt_run"]), str(ckpts["seq2seq_run"]), "--all-settings",
                         "--plot", str(out / "compare.png")],
        "plot_attention": ["--ckpt", str(ckpts["gpt"]), "--text", "The cat", "--out",
                           str(out / "gpt.png")],
        "prepare_data": [str(ckpts["text"]), "--cache_dir", str(out / "prepared")],
        "sample": ["--ckpt", str(ckpts["gpt"]), "--prompt", "The", "--max-new-tokens", "8",
                   "--device", "cpu"],
        "translate": ["--ckpt", str(ckpts["seq2seq"]), "--eval", str(ckpts["src"]),
                      str(ckpts["ref"]), "--beam", "2", "--device", "cpu"],
    }


EXPECTED_OUTPUT = {"ablate": "steps to 1.88", "bench_attention": "| T |",
                   "bench_generate": "tokens/s",
                   "bench_optim": "| Muon, 5 Newton-Schulz iterations in fp32",
                   "bench_train": "| auto:auto |", "compare_runs": "best val/loss",
                   "export_hf": "model.safetensors", "hellaswag": "items, acc",
                   "plot_attention": "", "prepare_data": "train", "sample": "The",
                   "translate": "sacreBLEU"}


def test_every_script_is_covered():
    commands = {p.stem for p in (REPO / "scripts").glob("*.py") if not p.stem.startswith("_")}
    assert commands == set(EXPECTED_OUTPUT)


@pytest.mark.parametrize("script", sorted(EXPECTED_OUTPUT))
def test_script_runs_end_to_end_on_tiny_inputs(script, checkpoints, tmp_path, capsys):
    module = importlib.import_module(f"scripts.{script}")
    assert exit_code(lambda: module.main(script_cases(checkpoints, tmp_path)[script])) == 0, \
        capsys.readouterr().err[-3000:]
    out = capsys.readouterr().out
    assert EXPECTED_OUTPUT[script] in out, out[-2000:]


# Run from the user's folder (on sys.path too: PYTHONPATH=.): each script imports the project's own
# data/, model/ and training/, never the user's. The inference scripts come first: loading a
# checkpoint, sampling, translating, plotting and tokenizing need no Lightning (and so no train.py),
# as nanoGPT's sample.py needs only torch and the model
LIGHTNING_FREE = ["sample", "translate", "plot_attention", "bench_generate", "prepare_data",
                  "hellaswag"]
IMPORT_EVERY_SCRIPT = """
import runpy, sys
lightning_free, scripts = sys.argv[1].split(","), sys.argv[2].split(",")
for name in scripts:
    runpy.run_path(f"{sys.argv[3]}/scripts/{name}.py", run_name="imported")
    loaded = sorted(m for m in sys.modules if m.split(".")[0] in ("lightning", "train"))
    if name in lightning_free and loaded:
        sys.exit(f"importing scripts/{name}.py loads {loaded}")
for package in ("data", "model", "training"):
    if not sys.modules[package].__file__.startswith(sys.argv[3]):
        sys.exit(f"{package} came from {sys.modules[package].__file__}")
print("ok")
"""


def test_every_script_imports_the_projects_packages_from_a_users_folder(foreign_cwd):
    others = sorted(set(EXPECTED_OUTPUT) - set(LIGHTNING_FREE))
    result = subprocess.run([sys.executable, "-c", IMPORT_EVERY_SCRIPT, ",".join(LIGHTNING_FREE),
                             ",".join(LIGHTNING_FREE + others), str(REPO)], cwd=foreign_cwd,
                            capture_output=True, text=True, timeout=300,
                            env={**os.environ, "PYTHONPATH": "."})
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr[-3000:]


OFFLINE = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "HTTP_PROXY": "http://127.0.0.1:9",
           "HTTPS_PROXY": "http://127.0.0.1:9", "NO_PROXY": ""}  # any request would fail at once


def test_train_py_trains_offline_on_the_shipped_text_from_a_users_folder(foreign_cwd, tmp_path):
    """What `make train` runs, with the network off and no --data.source (the shipped Tiny
    Shakespeare), from a folder whose own data/, model/ and train.py would shadow the project's."""
    result = subprocess.run([sys.executable, str(REPO / "train.py"), "fit", "--config",
                             str(REPO / "configs" / "shakespeare_char_cpu.yaml"),
                             "--run.save_dir", str(tmp_path),
                             "--data.cache_dir", str(tmp_path / "cache"), *GPT_RUN],
                            cwd=foreign_cwd, capture_output=True, text=True, timeout=600,
                            env={**os.environ, **OFFLINE, "PYTHONPATH": "."})
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Tokenizing 'tiny_shakespeare'" in result.stderr + result.stdout
    assert list(tmp_path.glob("mini-gpt/*/checkpoints/last.ckpt"))


def test_bench_train_refuses_a_translation_config_with_a_message_not_a_cli_traceback(capsys):
    from scripts import bench_train

    config = str(REPO / "configs" / "multi30k_de_en.yaml")
    with pytest.raises(UsageError, match=r"trains a seq2seq model \(--config.*this script times "
                                         r"the GPT's"):
        bench_train.parse_args(["--config", config])
    with pytest.raises(UsageError, match="trains a seq2seq model"):  # --kind, as train.py reads it
        bench_train.parse_args(["--kind", "seq2seq"])
    with pytest.raises(UsageError, match="no_such.yaml: no such file"):
        bench_train.parse_args(["--config", "configs/no_such.yaml"])


def test_bench_optim_times_the_translation_model_at_each_count_of_iterations(capsys):
    from scripts import bench_optim

    args = ["--seq2seq", "--n-layer", "1", "--n-embd", "16", "--n-head", "2", "--vocab", "40",
            "--batch", "2", "--block", "6", "--repeats", "1", "--threads", "1", "--device", "cpu"]
    bench_optim.main([*args, "--ns-steps", "5", "2"])
    out = capsys.readouterr().out
    assert out.startswith("Seq2SeqTransformer, 1 + 1 layers x 16 dims (11 block matrices")
    for steps in (5, 2):
        assert f"| Muon, {steps} Newton-Schulz iterations in fp32, + AdamW |" in out
    with pytest.raises(ValueError, match="--ns-steps must be 1 or more"):
        bench_optim.main([*args, "--ns-steps", "0"])


def test_bench_optim_times_the_compiled_pass_beside_the_eager_one(capsys, monkeypatch):
    from scripts import bench_optim

    # Dynamo's eager backend: the script's compile row without inductor's ~20 s of building
    # kernels (test_training.py trains a compiled model, through inductor on a GPU)
    monkeypatch.setattr(torch, "compile", functools.partial(torch.compile, backend="eager"))
    bench_optim.main(["--seq2seq", "--n-layer", "1", "--n-embd", "16", "--n-head", "2", "--vocab",
                      "40", "--batch", "2", "--block", "6", "--repeats", "1", "--threads", "1",
                      "--device", "cpu", "--compile"])
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| forward")]
    assert rows[0].startswith("| forward + backward | ")
    assert rows[1].startswith("| forward + backward, compiled (compiling: ")


# whether a 64 MiB tensor (past glibc's 32 MiB mmap threshold) is mapped from the kernel, before and
# after keep_freed_memory(): mallinfo2().hblkhd counts the bytes malloc holds in mmapped blocks
MMAPPED_TENSOR = """
import ctypes, torch
from training.memory import keep_freed_memory

class Mallinfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in ("arena", "ordblks", "smblks", "hblks",
                "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]

libc = ctypes.CDLL("libc.so.6")
libc.mallinfo2.restype = Mallinfo2

def mmapped():
    before = libc.mallinfo2().hblkhd
    x = torch.ones(64 << 20, dtype=torch.uint8)
    return libc.mallinfo2().hblkhd - before >= 64 << 20

print(mmapped(), keep_freed_memory(), mmapped())
"""


@pytest.mark.skipif(sys.platform != "linux" or os.confstr("CS_GNU_LIBC_VERSION") is None,
                    reason="keep_freed_memory tunes glibc's malloc; other C libraries are left as "
                           "they are")
def test_keep_freed_memory_serves_big_tensors_from_the_heap_unless_the_user_set_malloc():
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MALLOC_", "GLIBC_"))}

    def run(**extra) -> list[str]:
        return subprocess.run([sys.executable, "-c", MMAPPED_TENSOR], cwd=REPO, check=True,
                              capture_output=True, text=True, env=env | extra).stdout.split()

    assert run() == ["True", "True", "False"]  # mapped afresh at each step, then not
    # a threshold of the user's own wins: left as it is (here, mapping from 32 MiB up)
    assert run(MALLOC_MMAP_THRESHOLD_=str(32 << 20)) == ["True", "False", "True"]


def test_translate_refuses_blank_input_and_leaves_the_blank_lines_of_a_file_blank(checkpoints,
                                                                                  tmp_path, capsys):
    from scripts import translate

    args = ["--ckpt", str(checkpoints["seq2seq"]), "--beam", "1", "--device", "cpu"]
    for text in ("", "   "):  # spaces alone would come out as a made-up sentence
        assert exit_code(lambda text=text: translate.main([*args, "--text", text])) == 1
        err = capsys.readouterr().err.splitlines()
        assert len(err) == 1 and err[0].startswith("error: --text is blank: give the sentence")

    # line i out is line i's translation: a blank line in, a blank line out, and stderr says so
    lines = ["the cat sat on a mat", "", "   ", "a dog ran under the tree"]
    source = tmp_path / "source.txt"
    source.write_text("\n".join(lines) + "\n")
    alone = []
    for text in (lines[0], lines[3]):
        translate.main([*args, "--text", text])
        alone.append(capsys.readouterr().out.removesuffix("\n"))
    assert exit_code(lambda: translate.main([*args, "--file", str(source)])) == 0
    out, err = capsys.readouterr()
    assert out.split("\n") == [alone[0], "", "", alone[1], ""]
    assert err == f"lines 2, 3 of {source} are blank: left blank in the output\n"

    source.write_text("\n  \n")  # nothing to translate
    assert exit_code(lambda: translate.main([*args, "--file", str(source)])) == 1
    assert capsys.readouterr().err.splitlines() == [
        f"error: {source} has no text to translate (every line is blank): give one sentence per "
        "line"]


def test_sample_refuses_an_empty_prompt_which_leaving_it_out_means(checkpoints, tmp_path,
                                                                      capsys):
    from scripts import sample

    args = ["--ckpt", str(checkpoints["gpt"]), "--max-new-tokens", "12", "--device", "cpu"]
    (tmp_path / "empty.txt").write_text("")
    for empty, named in ((["--prompt", ""], "--prompt is empty"),
                         (["--prompt-file", str(tmp_path / "empty.txt")], "is empty")):
        assert sample.exit_code(lambda e=empty: sample.main([*args, *e])) == 1
        out, err = capsys.readouterr()
        assert out == "" and err.count("\n") == 1 and named in err
    sample.main(args)  # without a prompt: from the start token
    assert len(capsys.readouterr().out) > 12
