"""Test settings: one torch thread, and every cache in a temporary folder."""

import os
import random
import shutil
import tempfile
from pathlib import Path

_CACHE_ROOT = tempfile.mkdtemp(prefix="minigpt-tests-")
# set before datasets / tiktoken / wandb / inductor are imported: they read these at import
for var, sub in {"HF_HOME": "hf", "MINIGPT_CACHE": "minigpt", "TIKTOKEN_CACHE_DIR": "tiktoken",
                 "WANDB_DIR": "wandb", "WANDB_CACHE_DIR": "wandb-cache", "TORCHINDUCTOR_CACHE_DIR": "inductor"}.items():
    os.environ[var] = os.path.join(_CACHE_ROOT, sub)
os.environ["WANDB_MODE"] = "offline"
os.environ["OMP_NUM_THREADS"] = "1"  # also for the subprocesses tests start

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(1)  # tiny models on a shared 2-core machine: 1 thread is far faster than 2

REPO = Path(__file__).resolve().parent.parent
WORDS = ["the", "cat", "dog", "bird", "sat", "ran", "flew", "on", "under", "over", "a", "mat", "log", "tree",
         "and", "then", "quickly", "slowly", "happy", "sad", "red", "blue", "green"]


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


def pytest_sessionfinish(session, exitstatus):
    shutil.rmtree(_CACHE_ROOT, ignore_errors=True)
