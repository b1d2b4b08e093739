"""Token shards: a multi-file Parquet/JSONL corpus tokenized in units, in parallel, resumably, and
read back as one array (data/shards.py), also through the data module."""

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from data import corpus as corpus_module
from data import shards
from data.corpus import DataSourceError, prepare_corpus
from data.tokenizers import GPT2Tokenizer

WORDS = ["the", "cat", "sat", "on", "a", "mat", "and", "then", "ran", "away", "Über", "naïve"]


def documents(n: int, seed: int) -> list[str]:
    rng = np.random.default_rng(seed)
    return [" ".join(rng.choice(WORDS, size=rng.integers(3, 40))) for _ in range(n)]


def write_parquet_corpus(folder, files: int = 3, rows: int = 120, row_group: int = 25) -> list:
    """Parquet files of ``rows`` documents in row groups of ``row_group``; returns every document
    in corpus order (files sorted by name)."""
    folder.mkdir(parents=True, exist_ok=True)
    every = []
    for i in range(files):
        docs = documents(rows, seed=i)
        pq.write_table(pa.table({"id": list(range(rows)), "text": docs}),
                       folder / f"part-{i:03d}.parquet", row_group_size=row_group)
        every += docs
    return every


def expected_tokens(docs: list[str]) -> list[int]:
    gpt2 = GPT2Tokenizer()
    return [t for doc in docs for t in gpt2.encode(doc) + [gpt2.eot_token]]


def test_a_multi_shard_parquet_corpus_gives_every_document_in_order(tmp_path, monkeypatch):
    docs = write_parquet_corpus(tmp_path / "corpus")
    monkeypatch.setattr(shards, "UNIT_ROWS", 50)  # 2 row groups per unit: 2 units per file
    units = shards.plan_units({"train": sorted(str(p) for p in (tmp_path / "corpus").iterdir())},
                              "text", unit_rows=50)
    assert [u.row_groups for u in units[:3]] == [(0, 2), (2, 4), (4, 5)]  # groups never split

    corpus = prepare_corpus(str(tmp_path / "corpus"), "gpt2", cache_dir=tmp_path / "cache",
                            val_fraction=0.2, num_proc=2)
    expected = expected_tokens(docs)
    n_train = int(len(expected) * 0.8)
    assert corpus.num_tokens == {"train": n_train, "val": len(expected) - n_train}
    assert len(list(corpus.folder.glob("train-*.bin"))) == 9  # 3 units per file
    train, val = corpus.tokens("train"), corpus.tokens("val")
    assert isinstance(train, shards.TokenShards)  # read across the shards, not copied together
    assert np.array_equal(np.asarray(train), expected[:n_train])
    assert val.tolist() == expected[n_train:]
    # windows that span shard boundaries, indexed as the training loader indexes
    starts = np.arange(0, n_train - 33, 97)
    windows = train[starts[:, None] + np.arange(33)]
    assert np.array_equal(windows, np.array(expected)[starts[:, None] + np.arange(33)])
    with pytest.raises(IndexError):
        train[np.array([n_train])]

    # the same tokens from one process, and from the same documents as JSONL
    one = prepare_corpus(str(tmp_path / "corpus"), "gpt2", cache_dir=tmp_path / "one",
                         val_fraction=0.2, num_proc=1)
    assert np.array_equal(np.asarray(one.tokens("train")), np.asarray(train))
    jsonl = tmp_path / "docs.jsonl"
    jsonl.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    as_json = prepare_corpus(str(jsonl), "gpt2", cache_dir=tmp_path / "json", val_fraction=0.2)
    assert np.array_equal(np.asarray(as_json.tokens("val")), np.asarray(val))


def test_an_interrupted_preparation_resumes_without_redoing_finished_shards(tmp_path,
                                                                            monkeypatch):
    write_parquet_corpus(tmp_path / "corpus", files=4)
    clean = prepare_corpus(str(tmp_path / "corpus"), "gpt2", cache_dir=tmp_path / "clean",
                           num_proc=1)

    real, calls = shards.tokenize_unit, []

    def interrupted(unit, *args):
        if len(calls) == 2:
            raise KeyboardInterrupt  # Ctrl-C during the third unit
        calls.append(unit)
        return real(unit, *args)

    monkeypatch.setattr(shards, "tokenize_unit", interrupted)
    with pytest.raises(KeyboardInterrupt):
        prepare_corpus(str(tmp_path / "corpus"), "gpt2", cache_dir=tmp_path / "cache", num_proc=1)
    partial, = (tmp_path / "cache").glob("*.partial")
    assert len(list(partial.glob("*.bin"))) == 2 and not list((tmp_path / "cache").glob("*/meta*"))

    def counted(unit, *args):
        calls.append(unit)
        return real(unit, *args)

    calls.clear()
    monkeypatch.setattr(shards, "tokenize_unit", counted)
    resumed = prepare_corpus(str(tmp_path / "corpus"), "gpt2", cache_dir=tmp_path / "cache",
                             num_proc=1)
    assert len(calls) == 2  # the two units left of four
    assert not partial.exists() and resumed.num_tokens == clean.num_tokens
    for split in ("train", "val"):
        assert np.array_equal(np.asarray(resumed.tokens(split)), np.asarray(clean.tokens(split)))


def test_train_and_val_files_are_shards_of_their_own_split(tmp_path):
    folder = tmp_path / "corpus"
    folder.mkdir()
    train, val = documents(60, 0), documents(20, 1)
    pq.write_table(pa.table({"text": train}), folder / "train-000.parquet")
    (folder / "validation.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in val))
    with pytest.raises(DataSourceError, match="mixes file formats"):
        prepare_corpus(str(folder), "gpt2", cache_dir=tmp_path / "cache")
    (folder / "validation.jsonl").unlink()
    pq.write_table(pa.table({"text": val}), folder / "validation.parquet")
    corpus = prepare_corpus(str(folder), "gpt2", cache_dir=tmp_path / "cache", num_proc=1)
    assert corpus.tokens("val").tolist() == expected_tokens(val)
    assert corpus.tokens("train").tolist() == expected_tokens(train)


def test_bad_documents_are_one_line_errors_naming_the_file(tmp_path):
    write_parquet_corpus(tmp_path / "corpus", files=1)
    with pytest.raises(DataSourceError, match=r"part-000.parquet has no 'body' column \(it has "
                                              r"\['id', 'text'\]\); set --data.text_column"):
        prepare_corpus(str(tmp_path / "corpus"), "gpt2", text_column="body",
                       cache_dir=tmp_path / "cache")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\n{"text": "cut\n')
    with pytest.raises(DataSourceError, match=r"bad.jsonl, line 2: not valid JSON"):
        prepare_corpus(str(bad), "gpt2", cache_dir=tmp_path / "cache")
    bad.write_text('{"text": "fine"}\n{"body": "no text"}\n')
    with pytest.raises(DataSourceError, match=r"line 2: no 'text' field \(it has \['body'\]\)"):
        prepare_corpus(str(bad), "gpt2", cache_dir=tmp_path / "cache")
    empty = tmp_path / "empty.parquet"
    pq.write_table(pa.table({"text": pa.array([], pa.string())}), empty)
    with pytest.raises(DataSourceError, match="no documents in the 'text' column"):
        prepare_corpus(str(empty), "gpt2", cache_dir=tmp_path / "cache")


def test_a_hub_dataset_of_parquet_files_goes_to_shards(tmp_path, monkeypatch):
    """A hub id whose data files are Parquet (FineWeb-Edu's) is tokenized as shards; its files are
    listed by ``datasets`` and downloaded by the workers (here: local files stand in for them)."""
    docs = write_parquet_corpus(tmp_path / "hub", files=2)
    files = sorted(str(p) for p in (tmp_path / "hub").iterdir())
    asked = []

    def listed(dataset_id, subset):
        asked.append((dataset_id, subset))
        return {"train": files}

    monkeypatch.setattr(corpus_module, "_hub_document_files", listed)
    corpus = prepare_corpus("owner/web-corpus", "gpt2", subset="sample-1BT",
                            cache_dir=tmp_path / "cache", val_fraction=0.05, num_proc=1)
    assert asked == [("owner/web-corpus", "sample-1BT")]
    assert corpus.folder.name.startswith("owner--web-corpus-gpt2-")
    assert np.concatenate([corpus.tokens("train"), corpus.tokens("val")]).tolist() == \
        expected_tokens(docs)
    # another subset is another corpus; a subset of a local path is a mistake
    other = prepare_corpus("owner/web-corpus", "gpt2", subset="sample-2BT",
                           cache_dir=tmp_path / "cache", num_proc=1)
    assert other.folder != corpus.folder
    with pytest.raises(DataSourceError, match=r"leave it unset \(--data.subset null\)"):
        prepare_corpus(files[0], "gpt2", subset="sample-1BT", cache_dir=tmp_path / "cache")


def test_the_data_module_trains_on_shards(tmp_path):
    from data.lm import LMDataModule

    write_parquet_corpus(tmp_path / "corpus")
    dm = LMDataModule(str(tmp_path / "corpus"), "gpt2", block_size=32, batch_size=4,
                      cache_dir=str(tmp_path / "cache"), num_proc=1)
    dm.prepare_data()
    dm.setup("fit")
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == (4, 32) and bool((x[:, 1:] == y[:, :-1]).all())
    val = list(dm.val_dataloader())
    covered = sum(b[1].numel() for b in val)
    assert covered == (dm.corpus.num_tokens["val"] - 1) // 32 * 32  # every window once


def test_prepare_data_with_a_config_fills_the_cache_its_training_reads(tmp_path, capsys):
    """scripts/prepare_data.py --config takes the config's data settings (GPT-2 BPE, 0.1% held
    out), so the folder it fills is the one training with that config finds."""
    from conftest import REPO

    from scripts import prepare_data

    write_parquet_corpus(tmp_path / "corpus", files=1)
    config = str(REPO / "configs" / "gpt2_124m.yaml")
    prepare_data.main([str(tmp_path / "corpus"), "--config", config, "--subset", "null",
                       "--cache-dir", str(tmp_path / "cache"), "--num-proc", "1"])
    folder = capsys.readouterr().out.splitlines()[0]
    corpus = prepare_corpus(str(tmp_path / "corpus"), "gpt2", val_fraction=0.001,
                            cache_dir=tmp_path / "cache")
    assert folder == str(corpus.folder)


def test_a_second_process_waits_for_the_first_and_finds_its_work_done(tmp_path, monkeypatch):
    """Every process of a run asks for the corpus: while one prepares it (holding the lock beside
    its folder), another waits, then reads it without tokenizing anything."""
    import fcntl
    import threading

    write_parquet_corpus(tmp_path / "corpus", files=1)
    first = prepare_corpus(str(tmp_path / "corpus"), "gpt2", cache_dir=tmp_path / "cache",
                           num_proc=1)
    lock = first.folder.with_name(first.folder.name + ".lock")
    ready = tmp_path / "cache" / "ready"
    (first.folder).rename(ready)  # as if not prepared yet: the second must wait for it
    holder = open(lock, "a")  # noqa: SIM115 (held across the thread's start)
    fcntl.flock(holder, fcntl.LOCK_EX)
    monkeypatch.setattr(shards, "tokenize_unit", lambda *a: pytest.fail("tokenized again"))
    result = {}
    second = threading.Thread(target=lambda: result.setdefault(
        "corpus", prepare_corpus(str(tmp_path / "corpus"), "gpt2", cache_dir=tmp_path / "cache")))
    second.start()
    second.join(timeout=1.0)
    assert second.is_alive()  # waiting on the lock
    ready.rename(first.folder)  # the first process finishes, and lets go
    holder.close()
    second.join(timeout=30)
    assert result["corpus"].num_tokens == first.num_tokens


def test_ctrl_c_stops_every_worker_in_one_line_and_a_rerun_resumes(tmp_path):
    """Ctrl-C in a terminal reaches the whole process group: the workers leave it to the main
    process, which ends in one line (exit 130) and terminates them; the next run does the rest."""
    import os
    import signal
    import subprocess
    import sys

    from conftest import REPO

    write_parquet_corpus(tmp_path / "corpus", files=6, rows=1500, row_group=500)
    cmd = [sys.executable, str(REPO / "scripts" / "prepare_data.py"), str(tmp_path / "corpus"),
           "--tokenizer", "gpt2", "--num-proc", "2", "--cache-dir", str(tmp_path / "cache")]
    # (a test runner started in the background ignores SIGINT, and its children inherit that:
    # this one takes Ctrl-C as a terminal's process does)
    run = subprocess.Popen(cmd, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True,
                           start_new_session=True,
                           preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    lines = []
    for line in run.stderr:  # the first finished shard: the workers are busy with the next ones
        lines.append(line)
        if line.startswith("  shard 1/"):
            os.killpg(run.pid, signal.SIGINT)
            break
    lines += run.stderr.readlines()
    assert run.wait(timeout=60) == 130
    assert lines[-1] == "stopped by Ctrl-C\n" and not any("Traceback" in x for x in lines), lines
    again = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert again.returncode == 0 and "Resuming: " in again.stderr, again.stderr[-2000:]
