"""Corpus preparation (sources, splits, cache) and the language-modelling data module."""

import gzip
import hashlib
import json
import os
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from conftest import make_text

from data import corpus as corpus_module
from data.corpus import BUNDLED, DataSourceError, _hub_splits, prepare_corpus
from data.lm import LMDataModule


def all_tokens(corpus) -> np.ndarray:
    return np.concatenate([corpus.tokens("train"), corpus.tokens("val")])


def test_single_text_file_splits_90_10_and_keeps_every_character(text_file, cache_dir):
    text = text_file.read_text()
    corpus = prepare_corpus(str(text_file), "char", cache_dir=cache_dir)
    n = len(text)
    assert corpus.num_tokens == {"train": int(n * 0.9), "val": n - int(n * 0.9)}
    assert corpus.dtype == "uint16"
    assert corpus.tokenizer.decode(all_tokens(corpus).tolist()) == text  # line breaks and all
    assert corpus.tokenizer.decode(corpus.tokens("val").tolist()) == text[int(n * 0.9):]


def test_gpt2_tokens_equal_encoding_the_whole_text(text_file, cache_dir):
    corpus = prepare_corpus(str(text_file), "gpt2", cache_dir=cache_dir)
    assert all_tokens(corpus).tolist() == corpus.tokenizer.encode(text_file.read_text())


def test_second_run_reads_the_cache_and_a_changed_file_is_retokenized(text_file, cache_dir, monkeypatch):
    first = prepare_corpus(str(text_file), "char", cache_dir=cache_dir)

    def no_loading(*args, **kwargs):
        raise AssertionError("the source was read again despite the cache")

    with monkeypatch.context() as m:
        m.setattr(corpus_module, "load_local", no_loading)
        again = prepare_corpus(str(text_file), "char", cache_dir=cache_dir)
    assert again.folder == first.folder
    assert np.array_equal(all_tokens(again), all_tokens(first))

    text_file.write_text(text_file.read_text() + "A new line.\n")
    os.utime(text_file, ns=(0, 10**18))  # a new mtime even on coarse clocks
    changed = prepare_corpus(str(text_file), "char", cache_dir=cache_dir)
    assert changed.folder != first.folder
    assert sum(changed.num_tokens.values()) == sum(first.num_tokens.values()) + len("A new line.\n")
    # another tokenizer is another cache entry
    assert prepare_corpus(str(text_file), "gpt2", cache_dir=cache_dir).folder not in (first.folder, changed.folder)


def test_folder_with_train_and_val_files_uses_them_as_splits(tmp_path, cache_dir):
    folder = tmp_path / "corpus"
    folder.mkdir()
    (folder / "train.txt").write_text("abc abc abc\n")
    (folder / "val.txt").write_text("cab\n")
    (folder / "test.txt").write_text("ignored\n")
    corpus = prepare_corpus(str(folder), "char", cache_dir=cache_dir)
    assert corpus.num_tokens == {"train": 12, "val": 4}
    assert corpus.tokenizer.decode(corpus.tokens("val").tolist()) == "cab\n"


def test_validation_characters_outside_the_training_vocabulary_are_reported(tmp_path, cache_dir):
    (tmp_path / "train.txt").write_text("abc\n")
    (tmp_path / "val.txt").write_text("abz\n")
    with pytest.raises(DataSourceError, match="val split: .*'z'"):
        prepare_corpus(str(tmp_path), "char", cache_dir=cache_dir)


def test_gzip_and_glob_sources(tmp_path, cache_dir):
    for i, text in enumerate(["first part\n", "second part\n"]):
        with gzip.open(tmp_path / f"part{i}.txt.gz", "wt") as f:
            f.write(text)
    corpus = prepare_corpus(str(tmp_path / "part*.txt.gz"), "char", cache_dir=cache_dir)
    assert corpus.tokenizer.decode(all_tokens(corpus).tolist()) == "first part\nsecond part\n"


def test_jsonl_and_parquet_rows_are_documents_separated_by_end_of_text(tmp_path, cache_dir):
    docs = ["one document", "another one", "a third"]
    (tmp_path / "docs.jsonl").write_text("".join(json.dumps({"content": d}) + "\n" for d in docs))
    pq.write_table(pa.table({"content": docs}), tmp_path / "docs.parquet")
    for name in ("docs.jsonl", "docs.parquet"):
        corpus = prepare_corpus(str(tmp_path / name), "gpt2", text_column="content", val_fraction=0.2,
                                cache_dir=cache_dir)
        ids = all_tokens(corpus).tolist()
        eot = corpus.tokenizer.eot_token
        assert ids.count(eot) == 3 and ids[-1] == eot
        assert corpus.tokenizer.decode(ids) == "<|endoftext|>".join(docs) + "<|endoftext|>"


def test_missing_text_column_names_the_columns(tmp_path, cache_dir):
    (tmp_path / "docs.jsonl").write_text(json.dumps({"body": "x"}) + "\n")
    with pytest.raises(DataSourceError, match="no 'text' column \\(it has \\['body'\\]\\)"):
        prepare_corpus(str(tmp_path / "docs.jsonl"), "char", cache_dir=cache_dir)


@pytest.mark.parametrize("source,message", [
    ("no/such/file.txt", "no such file, folder or glob match"),
    ("missing.txt", "no such file, folder or glob match"),
])
def test_missing_local_source(source, message, cache_dir):
    with pytest.raises(DataSourceError, match=message):
        prepare_corpus(source, "char", cache_dir=cache_dir)


def test_unsupported_file_type(tmp_path, cache_dir):
    (tmp_path / "data.csv").write_text("a,b\n")
    with pytest.raises(DataSourceError, match="unsupported file type"):
        prepare_corpus(str(tmp_path / "data.csv"), "char", cache_dir=cache_dir)


def test_non_utf8_text_is_a_clear_error(tmp_path, cache_dir):
    (tmp_path / "latin1.txt").write_bytes("café au lait\n".encode("latin-1"))
    with pytest.raises(DataSourceError, match="must be UTF-8"):
        prepare_corpus(str(tmp_path / "latin1.txt"), "char", cache_dir=cache_dir)


def test_hub_id_offline_fails_with_advice(cache_dir, monkeypatch):
    monkeypatch.setattr(corpus_module, "hub_reachable", lambda timeout=1.0: False)  # offline, wherever this runs
    with pytest.raises(DataSourceError, match="hub cannot be reached.*--data.source "
                                              "path/to/input.txt"):
        prepare_corpus("minigpt-tests/no-such-dataset", "char", cache_dir=cache_dir)


def test_unknown_tokenizer(text_file, cache_dir):
    with pytest.raises(ValueError, match="unknown tokenizer"):
        prepare_corpus(str(text_file), "words", cache_dir=cache_dir)
    with pytest.raises(ValueError, match="unknown tokenizer"):
        LMDataModule(str(text_file), tokenizer="words")


# ---------------------------------------------------------------- the data module

def make_datamodule(source, cache_dir, **kwargs) -> LMDataModule:
    kwargs = {"block_size": 16, "batch_size": 4, **kwargs}
    dm = LMDataModule(str(source), cache_dir=str(cache_dir), **kwargs)
    dm.setup("fit")
    return dm


def test_batches_are_windows_of_the_text_with_targets_shifted_by_one(text_file, cache_dir):
    dm = make_datamodule(text_file, cache_dir)
    text = text_file.read_text()
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == y.shape == (4, 16) and x.dtype == torch.long
    assert torch.equal(x[:, 1:], y[:, :-1])
    for row_x, row_y in zip(x, y, strict=True):
        window = dm.tokenizer.decode(row_x.tolist()) + dm.tokenizer.decode(row_y[-1:].tolist())
        assert window in text[:int(len(text) * 0.9)]  # training windows come from the training split


def test_training_stream_is_seeded_per_rank(text_file, cache_dir):
    from data.lm import RandomWindows

    corpus = make_datamodule(text_file, cache_dir).corpus

    def first_batch(seed, rank):
        return next(iter(RandomWindows(corpus, "train", 16, 4, seed, rank)))[0]

    assert torch.equal(first_batch(1, 0), first_batch(1, 0))
    assert not torch.equal(first_batch(1, 0), first_batch(1, 1))
    assert not torch.equal(first_batch(1, 0), first_batch(2, 0))


def test_short_context_warmup_trains_its_steps_on_shorter_windows_of_the_same_tokens(
        text_file, cache_dir):
    from data.lm import RandomWindows

    dm = make_datamodule(text_file, cache_dir, short_block_size=4, short_steps=2)
    text = dm.tokenizer.decode(dm.corpus.tokens("train").tolist())

    def stream(accumulate, start=0, count=6):
        windows = iter(RandomWindows(dm.corpus, "train", 16, 4, 1337, accumulate=accumulate,
                                     start=start, short_block_size=4, short_steps=2))
        return [next(windows) for _ in range(count)]

    batches = stream(accumulate=2)  # steps 0 and 1 are batches 0-3
    assert [x.shape for x, _ in batches] == [(16, 4)] * 4 + [(4, 16)] * 2
    for x, y in batches:
        assert torch.equal(x[:, 1:], y[:, :-1])
        for row_x, row_y in zip(x, y, strict=True):
            assert dm.tokenizer.decode(row_x.tolist() + row_y[-1:].tolist()) in text
    # a run resumed inside the warmup goes on with the same batches, and ends it at the same step
    assert all(torch.equal(a[0], b[0]) for a, b in zip(stream(2, start=3, count=3), batches[3:],
                                                         strict=True))
    # the data module's loader is that stream; validation keeps block_size windows
    assert next(iter(dm.train_dataloader()))[0].shape == (16, 4)
    assert {x.shape[1] for x, _ in dm.val_dataloader()} == {16}


@pytest.mark.parametrize("options, message", [
    ({"short_block_size": 4}, "needs both --data.short_block_size .* and --data.short_steps"),
    ({"short_steps": 10}, "needs both --data.short_block_size .* and --data.short_steps"),
    ({"short_block_size": 5, "short_steps": 10},
     r"short_block_size 5 must be shorter than block_size \(16\) and divide it, .*e.g. 1, 2, 4, 8"),
    ({"short_block_size": 16, "short_steps": 10}, "short_block_size 16 must be shorter"),
    ({"short_block_size": 4, "short_steps": -1}, "short_steps must be 0 or more, got -1"),
    ({"short_block_size": 0, "short_steps": 10}, "short_block_size must be at least 1, got 0"),
])
def test_short_context_warmup_options_are_checked(text_file, cache_dir, options, message):
    with pytest.raises(ValueError, match=message):
        make_datamodule(text_file, cache_dir, **options)


def test_validation_batches_are_fixed_and_cover_the_split(text_file, cache_dir):
    dm = make_datamodule(text_file, cache_dir)
    first = [x for x, _ in dm.val_dataloader()]
    second = [x for x, _ in dm.val_dataloader()]
    assert all(torch.equal(a, b) for a, b in zip(first, second, strict=True))
    n_val = dm.corpus.num_tokens["val"]
    assert sum(x.numel() for x in first) == (n_val - 1) // 16 * 16  # every window once
    # consecutive windows in a shuffled order: the first batch is not the start of the split
    start = torch.from_numpy(dm.corpus.tokens("val")[:16].astype(np.int64))
    assert not torch.equal(first[0][0], start)


def test_corpus_shorter_than_a_block_is_rejected(tmp_path, cache_dir):
    (tmp_path / "short.txt").write_text("too short for a block of 64 characters\n" * 2)
    message = r"val split .* has 8 tokens, fewer than block_size \+ 1 = 65"
    with pytest.raises(DataSourceError, match=message):
        make_datamodule(tmp_path / "short.txt", cache_dir, block_size=64)


def test_empty_file_is_rejected(tmp_path, cache_dir):
    (tmp_path / "empty.txt").write_text("")
    for tokenizer in ("char", "gpt2"):
        with pytest.raises(DataSourceError, match="empty.txt'\\] is empty: there is no text"):
            make_datamodule(tmp_path / "empty.txt", cache_dir, tokenizer=tokenizer)


def test_tiny_shakespeare_ships_with_the_published_split(cache_dir):
    """The bundled text, by name: nanoGPT's shakespeare_char, 65 characters, 1,003,854 train and
    111,540 val tokens; and the same text as the public copy where one is at hand
    (MINIGPT_SHARED_DATA)."""
    corpus = prepare_corpus("tiny_shakespeare", "char", cache_dir=cache_dir)
    assert corpus.tokenizer.vocab_size == 65
    assert corpus.num_tokens == {"train": 1_003_854, "val": 111_540}
    shipped = gzip.decompress(BUNDLED["tiny_shakespeare"].read_bytes())
    assert hashlib.sha256(shipped).hexdigest() == \
        "86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed"  # data/tiny_shakespeare/README.md
    shared = os.environ.get("MINIGPT_SHARED_DATA")
    if shared:
        assert (Path(shared) / "tinyshakespeare" / "input.txt").read_bytes() == shipped


def test_a_local_path_wins_over_a_bundled_name(tmp_path, cache_dir, monkeypatch):
    (tmp_path / "tiny_shakespeare").mkdir()
    (tmp_path / "tiny_shakespeare" / "input.txt").write_text(make_text(200))
    monkeypatch.chdir(tmp_path)
    assert prepare_corpus("tiny_shakespeare", "char", cache_dir=cache_dir).tokenizer.vocab_size < 65


def test_hub_tiny_shakespeare_gets_the_published_90_10_split():
    """The hub's Parquet copy is cut 90/5/5 into train/validation/test: validation and test, in that
    order, together are the published validation split (the last 10% of the text)."""
    from datasets import Dataset, DatasetDict

    text = "".join(chr(ord("a") + i % 26) for i in range(1000))
    ds = DatasetDict({"train": Dataset.from_dict({"text": [text[:900]]}),
                      "validation": Dataset.from_dict({"text": [text[900:950]]}),
                      "test": Dataset.from_dict({"text": [text[950:]]})})
    splits = _hub_splits(ds, "karpathy/tiny_shakespeare")
    assert sorted(splits) == ["train", "val"]
    assert "".join(splits["val"]["text"]) == text[900:]
    assert splits["train"]["text"] == [text[:900]]
    assert "".join(_hub_splits(ds, "someone/other")["val"]["text"]) == text[900:950]  # others: validation


def test_prepare_data_script_fills_the_cache_that_training_reads(text_file, cache_dir):
    import subprocess
    import sys

    from conftest import REPO

    result = subprocess.run([sys.executable, str(REPO / "scripts" / "prepare_data.py"), str(text_file),
                             "--cache_dir", str(cache_dir)], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    corpus = prepare_corpus(str(text_file), "char", cache_dir=cache_dir)  # a cache hit: same folder
    assert result.stdout.splitlines()[0] == str(corpus.folder)
    assert f"train: {corpus.num_tokens['train']:,} tokens" in result.stdout


@pytest.mark.parametrize("tokenizer", ["char", "gpt2"])
def test_tokenizing_in_parallel_processes_writes_the_same_token_arrays(tmp_path, tokenizer):
    """Tokenization runs in num_proc processes and streams into the token arrays: the same tokens as
    one process, documents in order, across shard files."""
    rng = np.random.default_rng(0)
    words = ["the", "cat", "sat", "on", "a", "mat", "and", "then", "ran", "away", "quickly", "Über"]
    for shard in range(3):
        with gzip.open(tmp_path / f"docs-{shard}.jsonl.gz", "wt", encoding="utf-8") as f:
            for _ in range(1500):
                f.write(json.dumps({"text": " ".join(rng.choice(words, size=rng.integers(5, 30)))}) + "\n")
    source = str(tmp_path / "docs-*.jsonl.gz")
    one = prepare_corpus(source, tokenizer, cache_dir=tmp_path / "one", num_proc=1)
    two = prepare_corpus(source, tokenizer, cache_dir=tmp_path / "two", num_proc=2)
    for split in ("train", "val"):
        assert np.array_equal(one.tokens(split), two.tokens(split))
    assert one.num_tokens == two.num_tokens and one.num_tokens["train"] > 50_000
