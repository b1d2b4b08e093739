"""Tokenize a data source into the token cache ahead of training, and say what it holds.

    python scripts/prepare_data.py input.txt
    python scripts/prepare_data.py 'shards/*.jsonl.gz' --tokenizer gpt2 --num-proc 8
    python scripts/prepare_data.py HuggingFaceFW/fineweb-edu --subset sample-10BT --tokenizer gpt2

Documents (JSONL, Parquet) in GPT-2 BPE are tokenized into shards on every core; an interrupted
preparation, run again, does only what was left (data/shards.py).

Training with the same --data.source, --data.tokenizer (and --data.cache_dir) then starts at once.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository: model/, data/
# first: Ctrl-C while the libraries below load ends in one line
from training.errors import ArgumentParser, exit_at_once_on_ctrl_c, exit_code  # isort: split

if __name__ == "__main__":
    exit_at_once_on_ctrl_c()

from data.corpus import prepare_corpus


def parse_args(argv=None):
    p = ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("source",
                   help="what --data.source would be: a file, glob, folder, hub id, or "
                        "tiny_shakespeare")
    p.add_argument("--tokenizer", default="char", help="char or gpt2")
    # each option also in train.py's spelling (--text_column), which this script once took
    p.add_argument("--text-column", "--text_column", default="text",
                   help="column of the text in JSONL / parquet / hub data")
    p.add_argument("--val-fraction", "--val_fraction", type=float, default=0.1,
                   help="share held out for validation when the source has no val split")
    p.add_argument("--cache-dir", "--cache_dir", default=None,
                   help="token cache folder (default $MINIGPT_CACHE or ~/.cache/minigpt)")
    p.add_argument("--num-proc", "--num_proc", type=int, default=None,
                   help="tokenizing processes (default: every core for documents in GPT-2 BPE, "
                        "one otherwise)")
    p.add_argument("--subset", default=None,
                   help="the hub dataset's configuration, e.g. sample-10BT of "
                        "HuggingFaceFW/fineweb-edu")
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    corpus = prepare_corpus(args.source, args.tokenizer, text_column=args.text_column,
                            val_fraction=args.val_fraction, cache_dir=args.cache_dir,
                            num_proc=args.num_proc, subset=args.subset)
    print(f"{corpus.folder}")
    print(f"tokenizer {corpus.tokenizer.name}, vocabulary {corpus.tokenizer.vocab_size}, "
          f"stored as {corpus.dtype}")
    for split, n in corpus.num_tokens.items():
        print(f"{split:>5}: {n:,} tokens")


if __name__ == "__main__":
    sys.exit(exit_code(main))
