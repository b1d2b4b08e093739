"""Tokenize a data source into the token cache ahead of training, and say what it holds.

    python scripts/prepare_data.py input.txt
    python scripts/prepare_data.py 'shards/*.jsonl.gz' --tokenizer gpt2 --num_proc 8

Training with the same --data.source, --data.tokenizer (and --data.cache_dir) then starts at once.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository: model/, data/

from jsonargparse import CLI

from data import prepare_corpus


def prepare(source: str, tokenizer: str = "char", text_column: str = "text", val_fraction: float = 0.1,
            cache_dir: str | None = None, num_proc: int | None = None) -> None:
    """Tokenize ``source`` (a file, glob, folder or hub id) once and print the cache folder and token counts.

    Args:
        source: what --data.source would be.
        tokenizer: "char" or "gpt2".
        text_column: column of the text in JSONL / parquet / hub data.
        val_fraction: share held out for validation when the source has no val split.
        cache_dir: token cache folder (default $MINIGPT_CACHE or ~/.cache/minigpt).
        num_proc: tokenizing processes.
    """
    corpus = prepare_corpus(source, tokenizer, text_column=text_column, val_fraction=val_fraction,
                            cache_dir=cache_dir, num_proc=num_proc)
    print(f"{corpus.folder}")
    print(f"tokenizer {corpus.tokenizer.name}, vocabulary {corpus.tokenizer.vocab_size}, stored as {corpus.dtype}")
    for split, n in corpus.num_tokens.items():
        print(f"{split:>5}: {n:,} tokens")


if __name__ == "__main__":
    CLI(prepare)
