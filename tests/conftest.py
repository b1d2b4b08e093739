"""Test settings (one torch thread, every cache in a temporary folder) and what tests share: texts,
runs of train.py, and checkpoints written by train.py itself."""

import gzip
import os
import random
import shutil
import tempfile
from pathlib import Path

_CACHE_ROOT = tempfile.mkdtemp(prefix="minigpt-tests-")
# set before datasets / tiktoken / wandb / inductor are imported: they read these at import
CACHES = {"HF_HOME": "hf", "MINIGPT_CACHE": "minigpt", "TIKTOKEN_CACHE_DIR": "tiktoken",
          "WANDB_DIR": "wandb", "WANDB_CACHE_DIR": "wandb-cache",
          "TORCHINDUCTOR_CACHE_DIR": "inductor"}
for var, sub in CACHES.items():
    os.environ[var] = os.path.join(_CACHE_ROOT, sub)
os.environ["WANDB_MODE"] = "offline"
os.environ["OMP_NUM_THREADS"] = "1"  # also for the subprocesses tests start

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(1)  # tiny models on a shared 2-core machine: 1 thread is far faster than 2

REPO = Path(__file__).resolve().parent.parent
WORDS = ["the", "cat", "dog", "bird", "sat", "ran", "flew", "on", "under", "over", "a", "mat",
         "log", "tree", "and", "then", "quickly", "slowly", "happy", "sad", "red", "blue", "green"]


def make_text(num_lines: int = 2000, seed: int = 0) -> str:
    """Structured text (short sentences of a small vocabulary) that a tiny model learns quickly."""
    rng = random.Random(seed)
    lines = []
    for _ in range(num_lines):
        sentence = " ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 8)))
        lines.append(sentence.capitalize() + ".")
    return "\n".join(lines) + "\n"


@pytest.fixture
def text_file(tmp_path) -> Path:
    path = tmp_path / "corpus.txt"
    path.write_text(make_text())
    return path


@pytest.fixture
def cache_dir(tmp_path) -> Path:
    return tmp_path / "token-cache"


def fit(text_file: Path, save_dir: Path, *extra: str) -> None:
    """A tiny GPT run of train.py in this process (no second `import lightning`)."""
    from train import main

    main(tiny_run(text_file, save_dir, *extra))


def tiny_run(text_file: Path, save_dir: Path, *extra: str) -> list[str]:
    """train.py arguments for a tiny GPT run of 20 steps; later flags win."""
    return ["fit", "--config", str(REPO / "configs" / "shakespeare_char_cpu.yaml"),
            "--data.source", str(text_file), "--data.cache_dir", str(save_dir / "cache"),
            "--data.block_size", "16", "--model.config.n_layer", "1", "--model.config.n_embd", "16",
            "--model.config.n_head", "2", "--model.val_samples", "0", "--trainer.max_steps", "20",
            "--trainer.val_check_interval", "10", "--trainer.log_every_n_steps", "5",
            "--trainer.limit_val_batches", "4", "--trainer.enable_progress_bar", "false",
            "--throughput.window_size", "5", "--run.save_dir", str(save_dir), *extra]


# tiny_run's options that make its model one of GPT-2's architecture (with n_layer 2: the shape of
# the checkpoints fixture's GPT)
GPT2_SHAPED = ("--model.config.pos_emb", "learned", "--model.config.qk_norm", "false",
               "--model.config.mlp", "gelu_tanh", "--model.config.smear", "false")


def run_folders(save_dir: Path) -> list[Path]:
    return sorted(p for p in (save_dir / "mini-gpt").iterdir() if p.is_dir())


REVERSE_WORDS = ["ab", "cd", "ef", "gh", "ij", "kl", "mn", "op", "qr", "st"]


def reverse_pairs(n: int, seed: int) -> list[tuple[str, str]]:
    """A synthetic translation task: the target is the source's words in reverse order."""
    rng = random.Random(seed)
    pairs = []
    for _ in range(n):
        words = [rng.choice(REVERSE_WORDS) for _ in range(rng.randint(3, 6))]
        pairs.append((" ".join(words), " ".join(reversed(words))))
    return pairs


def write_parallel(folder: Path, splits: dict[str, list[tuple[str, str]]], src="xx", tgt="yy",
                   gz=False) -> Path:
    """Aligned line files {split}.{src} and {split}.{tgt} (gzipped with ``gz``) in ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    for split, pairs in splits.items():
        for lang, side in ((src, 0), (tgt, 1)):
            text = "".join(p[side] + "\n" for p in pairs)
            path = folder / f"{split}.{lang}{'.gz' if gz else ''}"
            path.write_bytes(gzip.compress(text.encode()) if gz else text.encode())
    return folder


@pytest.fixture(scope="session")
def checkpoints(tmp_path_factory) -> dict[str, Path]:
    """A tiny GPT (2 layers of 2 heads, block_size 32, 30 steps) and a tiny seq2seq model (4 steps),
    each trained and saved by train.py, the code that writes real checkpoints; their run folders,
    the GPT's text and the seq2seq model's val files."""
    from train import main

    root = tmp_path_factory.mktemp("checkpoints")
    (root / "text.txt").write_text(make_text())
    # learned positions: the tests of block_size's limit need them (rotary checkpoints are tested
    # in test_attention_options.py); with GPT's MLP and no QK-norm, GPT-2's architecture, which
    # scripts/export_hf.py exports
    main(tiny_run(root / "text.txt", root / "runs", "--data.block_size", "32", "--model.lr", "1e-2",
                  *GPT2_SHAPED,
                  "--model.config.n_layer", "2", "--trainer.max_steps", "30",
                  "--trainer.val_check_interval", "30", "--trainer.limit_val_batches", "1",
                  "--run.name", "gpt"))
    words = make_text(600).split()
    pairs = [" ".join(words[i:i + 5]) for i in range(0, 3000, 5)]
    pairs = [(s, " ".join(reversed(s.split()))) for s in pairs]
    parallel = write_parallel(root / "parallel", {"train": pairs[:560], "val": pairs[560:]})
    main(["fit", "--config", str(REPO / "configs" / "multi30k_de_en.yaml"),
          "--data.source", str(parallel), "--data.src_lang", "xx", "--data.tgt_lang", "yy",
          "--data.vocab_size", "200", "--data.max_len", "32", "--data.max_tokens", "400",
          "--data.dev_size", "20", "--model.tune_length_penalty", "[0.6]", "--model.beam_size", "2",
          "--model.config.n_encoder_layer", "1", "--model.config.n_decoder_layer", "1",
          "--model.config.n_embd", "16", "--model.config.n_head", "2",
          "--model.config.mlp_hidden", "32", "--trainer.max_steps", "4",
          "--trainer.val_check_interval", "2", "--trainer.max_time", "null",
          "--trainer.enable_progress_bar", "false", "--run.save_dir", str(root / "runs"),
          "--run.name", "seq2seq"])
    gpt_run, = (root / "runs" / "mini-gpt").glob("gpt-*")
    seq2seq_run, = (root / "runs" / "mini-gpt").glob("seq2seq-*")
    return {"text": root / "text.txt", "gpt_run": gpt_run, "seq2seq_run": seq2seq_run,
            "gpt": gpt_run / "checkpoints" / "last.ckpt",
            "seq2seq": seq2seq_run / "checkpoints" / "last.ckpt",
            "src": parallel / "val.xx", "ref": parallel / "val.yy"}


def pytest_sessionfinish(session, exitstatus):
    shutil.rmtree(_CACHE_ROOT, ignore_errors=True)
