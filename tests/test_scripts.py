"""Every script in scripts/ (and train.py) runs end to end from a subprocess on tiny inputs, from a
working directory whose own data/, model/ and train.py would shadow the project's if it let them."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO, make_text

from train import main

GPT_RUN = ["--data.block_size", "16", "--data.batch_size", "4", "--model.config.n_layer", "1",
           "--model.config.n_embd", "16", "--model.config.n_head", "2", "--model.val_samples", "0",
           "--trainer.max_steps", "4", "--trainer.val_check_interval", "2", "--trainer.limit_val_batches", "2",
           "--trainer.enable_progress_bar", "false"]


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> dict[str, Path]:
    """A text, tiny GPT and seq2seq checkpoints written by train.py, and a parallel file pair."""
    root = tmp_path_factory.mktemp("inputs")
    (root / "text.txt").write_text(make_text(400))
    main(["fit", "--config", str(REPO / "configs" / "shakespeare_char_cpu.yaml"), "--data.source",
          str(root / "text.txt"), "--data.cache_dir", str(root / "cache"), "--run.save_dir", str(root / "runs"),
          "--run.name", "gpt", *GPT_RUN])
    words = make_text(600).split()
    pairs = [" ".join(words[i:i + 5]) for i in range(0, 3000, 5)]
    for split, lines in {"train": pairs[:560], "val": pairs[560:]}.items():
        (root / "parallel").mkdir(exist_ok=True)
        (root / "parallel" / f"{split}.xx").write_text("\n".join(lines) + "\n")
        (root / "parallel" / f"{split}.yy").write_text("\n".join(" ".join(reversed(s.split())) for s in lines) + "\n")
    main(["fit", "--config", str(REPO / "configs" / "multi30k_de_en.yaml"), "--data.source", str(root / "parallel"),
          "--data.src_lang", "xx", "--data.tgt_lang", "yy", "--data.vocab_size", "200", "--data.max_len", "32",
          "--data.max_tokens", "400", "--data.dev_size", "20", "--model.tune_length_penalty", "[0.6]",
          "--model.beam_size", "2", "--model.config.n_encoder_layer", "1", "--model.config.n_decoder_layer", "1",
          "--model.config.n_embd", "16", "--model.config.n_head", "2", "--model.config.mlp_hidden", "32",
          "--trainer.max_steps", "4", "--trainer.val_check_interval", "2", "--trainer.max_time", "null",
          "--trainer.enable_progress_bar", "false", "--run.save_dir", str(root / "runs"), "--run.name", "seq2seq"])
    gpt_run, = (root / "runs" / "mini-gpt").glob("gpt-*")
    seq2seq_run, = (root / "runs" / "mini-gpt").glob("seq2seq-*")
    return {"root": root, "text": root / "text.txt", "gpt_run": gpt_run, "seq2seq_run": seq2seq_run,
            "gpt": gpt_run / "checkpoints" / "last.ckpt", "seq2seq": seq2seq_run / "checkpoints" / "last.ckpt",
            "src": root / "parallel" / "val.xx", "ref": root / "parallel" / "val.yy"}


@pytest.fixture(scope="module")
def foreign_cwd(tmp_path_factory) -> Path:
    """A user's project folder: its own data/, model/ and train.py, each failing loudly if imported."""
    folder = tmp_path_factory.mktemp("users_project")
    for package in ("data", "model"):
        (folder / package).mkdir()
        (folder / package / "__init__.py").write_text(f"raise ImportError('the user\\'s own {package}/ was imported')")
    (folder / "train.py").write_text("raise ImportError('the user\\'s own train.py was imported')")
    return folder


def script_cases(inputs: dict[str, Path], out: Path) -> dict[str, list[str]]:
    """Arguments for each script, on the smallest inputs it takes."""
    return {
        "bench_attention": ["--paths", "naive", "sdpa", "--seq-lens", "16", "--repeats", "1", "--threads", "1",
                            "--plot", str(out / "attention.png")],
        "bench_generate": ["--ckpt", str(inputs["gpt"]), "--contexts", "1", "8", "--new-tokens", "4", "--repeats",
                           "1", "--threads", "1"],
        "bench_train": ["--source", str(inputs["text"]), "--variants", "auto:auto", "naive:32-true", "--steps", "2",
                        "--warmup", "1", "--repeats", "1", "--threads", "1", "--data.cache_dir",
                        str(out / "cache"), *GPT_RUN],
        "compare_runs": [str(inputs["gpt_run"]), str(inputs["seq2seq_run"]), "--all-settings", "--plot",
                         str(out / "compare.png")],
        "plot_attention": ["--ckpt", str(inputs["gpt"]), "--text", "The cat", "--out", str(out / "gpt.png")],
        "prepare_data": [str(inputs["text"]), "--cache_dir", str(out / "prepared")],
        "sample": ["--ckpt", str(inputs["gpt"]), "--prompt", "The", "--max-new-tokens", "8", "--device", "cpu"],
        "translate": ["--ckpt", str(inputs["seq2seq"]), "--eval", str(inputs["src"]), str(inputs["ref"]),
                      "--beam", "2", "--device", "cpu"],
    }


EXPECTED_OUTPUT = {"bench_attention": "| T |", "bench_generate": "tokens/s", "bench_train": "| auto:auto |",
                   "compare_runs": "best val/loss", "plot_attention": "", "prepare_data": "train",
                   "sample": "The", "translate": "sacreBLEU"}


def test_every_script_is_covered():
    assert {p.stem for p in (REPO / "scripts").glob("*.py")} == set(EXPECTED_OUTPUT)


@pytest.mark.parametrize("script", sorted(EXPECTED_OUTPUT))
def test_script_runs_from_a_folder_with_its_own_data_and_model(script, inputs, foreign_cwd, tmp_path):
    args = script_cases(inputs, tmp_path)[script]
    env = {"PYTHONPATH": "."}  # the user's folder on the path too: the project's own packages must still win
    result = subprocess.run([sys.executable, str(REPO / "scripts" / f"{script}.py"), *args], cwd=foreign_cwd,
                            capture_output=True, text=True, timeout=600, env={**os.environ, **env})
    assert result.returncode == 0, result.stderr[-3000:]
    assert EXPECTED_OUTPUT[script] in result.stdout, result.stdout[-2000:]


def test_train_py_runs_from_a_folder_with_its_own_data_and_model(inputs, foreign_cwd, tmp_path):
    result = subprocess.run([sys.executable, str(REPO / "train.py"), "fit", "--config",
                             str(REPO / "configs" / "shakespeare_char_cpu.yaml"), "--data.source", str(inputs["text"]),
                             "--data.cache_dir", str(tmp_path / "cache"), "--run.save_dir", str(tmp_path), *GPT_RUN],
                            cwd=foreign_cwd, capture_output=True, text=True, timeout=600,
                            env={**os.environ, "PYTHONPATH": "."})
    assert result.returncode == 0, result.stderr[-3000:]
    assert list(tmp_path.glob("mini-gpt/*/checkpoints/last.ckpt"))


OFFLINE = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "HTTP_PROXY": "http://127.0.0.1:9",
           "HTTPS_PROXY": "http://127.0.0.1:9", "NO_PROXY": ""}  # any request would fail at once


def test_make_train_trains_offline_on_the_shipped_text_with_no_source_given(tmp_path):
    """What `make train` runs, with the network off and no --data.source: the shipped Tiny Shakespeare."""
    result = subprocess.run([sys.executable, str(REPO / "train.py"), "fit", "--config",
                             str(REPO / "configs" / "shakespeare_char_cpu.yaml"), "--run.save_dir", str(tmp_path),
                             "--data.cache_dir", str(tmp_path / "cache"), *GPT_RUN], cwd=tmp_path,
                            capture_output=True, text=True, timeout=600, env={**os.environ, **OFFLINE})
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Tokenizing 'tiny_shakespeare'" in result.stderr + result.stdout
    assert list(tmp_path.glob("mini-gpt/*/checkpoints/last.ckpt"))
