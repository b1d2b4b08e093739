"""Tokenize a data source into the token cache ahead of training, and say what it holds.

    python scripts/prepare_data.py input.txt
    python scripts/prepare_data.py 'shards/*.jsonl.gz' --tokenizer gpt2 --num-proc 8
    python scripts/prepare_data.py HuggingFaceFW/fineweb-edu --subset sample-10BT --tokenizer gpt2
    python scripts/prepare_data.py --config configs/gpt2_124m.yaml   # the data a config trains on

Documents (JSONL, Parquet) in GPT-2 BPE are tokenized into shards on every core; an interrupted
preparation, run again, does only what was left (data/shards.py).

Training with the same --data.source, --data.tokenizer, --data.val_fraction (and --data.cache_dir)
then starts at once: --config takes them from the training config.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository: model/, data/
# first: Ctrl-C while the libraries below load ends in one line
from training.errors import ArgumentParser, exit_at_once_on_ctrl_c, exit_code  # isort: split

if __name__ == "__main__":
    exit_at_once_on_ctrl_c()

import yaml

from data.corpus import prepare_corpus
from training.errors import UsageError

# each option: (its default, the config's key under data:)
DATA_OPTIONS = {"tokenizer": ("char", "tokenizer"), "text_column": ("text", "text_column"),
                "val_fraction": (0.1, "val_fraction"), "cache_dir": (None, "cache_dir"),
                "num_proc": (None, "num_proc"), "subset": (None, "subset")}


def parse_args(argv=None):
    p = ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("source", nargs="?",
                   help="what --data.source would be: a file, glob, folder, hub id, or "
                        "tiny_shakespeare (default: the --config's)")
    p.add_argument("--config", default=None,
                   help="a training config: its data settings are this script's defaults, so the "
                        "cache it fills is the one that config's training reads")
    # each option also in train.py's spelling (--text_column), which this script once took
    # (and as train.py's --data.* options, which error messages name)
    p.add_argument("--tokenizer", "--data.tokenizer", default=None,
                   help="char or gpt2 (default: char)")
    p.add_argument("--text-column", "--text_column", "--data.text_column", default=None,
                   help="column of the text in JSONL / parquet / hub data (default: text)")
    p.add_argument("--val-fraction", "--val_fraction", "--data.val_fraction", type=float,
                   default=None,
                   help="share held out for validation when the source has no val split "
                        "(default: 0.1)")
    p.add_argument("--cache-dir", "--cache_dir", "--data.cache_dir", default=None,
                   help="token cache folder (default $MINIGPT_CACHE or ~/.cache/minigpt)")
    p.add_argument("--num-proc", "--num_proc", "--data.num_proc", type=int, default=None,
                   help="tokenizing processes (default: every core for documents in GPT-2 BPE, "
                        "one otherwise)")
    p.add_argument("--subset", "--data.subset", default=None,
                   help="the hub dataset's configuration, e.g. sample-10BT of "
                        "HuggingFaceFW/fineweb-edu (null: none, over the --config's)")
    args = p.parse_args(argv)
    data = config_data(args.config) if args.config else {}
    args.source = args.source or data.get("source")
    if args.source is None:
        p.error("give a source (a file, glob, folder or hub id), or --config with data.source")
    for option, (default, key) in DATA_OPTIONS.items():  # the command line, the config, default
        if getattr(args, option) is None:
            setattr(args, option, data.get(key, default))
        elif getattr(args, option) == "null":  # unset, in train.py's spelling (--subset null)
            setattr(args, option, None)
    return args


def config_data(path: str) -> dict:
    """The ``data:`` settings of a training config."""
    if not Path(path).is_file():
        raise UsageError(f"--config {path}: no such file")
    try:
        config = yaml.safe_load(Path(path).read_text()) or {}
    except yaml.YAMLError as e:
        raise UsageError(f"--config {path}: not valid YAML ({e})") from None
    data = config.get("data") if isinstance(config, dict) else None
    return data if isinstance(data, dict) else {}


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
