"""Token shards: a corpus of many GB tokenized in parallel, resumably, and read back as one array.

A large corpus comes as documents in JSONL or Parquet files (FineWeb-Edu's 10B-token sample is 14
Parquet files of about 2 GB). Preparing it is cut into *units*: a JSONL file, or a run of a
Parquet file's row groups of at most ``UNIT_ROWS`` documents (local or on the hub, whose footers
are read remotely), so that even one big file keeps every core busy. The cut depends on the files
only (never on the number of processes), so a preparation interrupted with 16 processes resumes
with 4.

Each unit is read in batches of ``BATCH_DOCS`` documents, never a whole file, tokenized, and written
to a shard file of its own, under a temporary name that is renamed when the unit is complete. Units
run in ``num_proc`` worker processes (default: every core). A rerun skips the units whose shard
exists: an interrupted preparation does only what was left. Memory is one batch of documents and
its tokens per worker, whatever the size of the corpus.

``TokenShards`` reads a split back: its shards end to end, memory-mapped, indexed by arrays of
positions as a NumPy array is (a window of tokens may span two shards).
"""

import contextlib
import fcntl
import gzip
import itertools
import json
import multiprocessing
import os
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

UNIT_ROWS = 100_000  # documents per unit at most (Parquet row groups are never split)
BATCH_DOCS = 1024  # documents read and tokenized at a time, in each worker
SMALL_CORPUS = 8 * 2**20  # bytes of files under which worker processes would cost more than save


class DataSourceError(ValueError):
    """A data source that cannot be used, with a message that says why and what to do (data.corpus
    raises it too)."""


@dataclass(frozen=True)
class Unit:
    """A piece of the corpus that one worker tokenizes into one shard: a whole file, or row groups
    ``[first, stop)`` of a Parquet file. ``path`` may be an ``hf://`` URL, downloaded by the
    worker."""

    split: str
    path: str
    row_groups: tuple[int, int] | None = None


def _is_parquet(path: str) -> bool:
    return path.lower().endswith(".parquet")


def _parquet_metadata(path: str):
    """A Parquet file's footer: the schema and the row groups, read without the data (for an
    ``hf://`` URL, a few ranged requests to the hub)."""
    import fsspec
    import pyarrow.parquet as pq

    with fsspec.open(path, "rb") as f:
        return pq.ParquetFile(f).metadata


def plan_units(files: dict[str, list[str]], text_column: str,
               unit_rows: int | None = None) -> list[Unit]:
    """The units of ``files`` (split -> paths, in order), in corpus order. A Parquet file, local or
    on the hub, is cut between row groups into units of at most ``unit_rows`` rows."""
    unit_rows = unit_rows or UNIT_ROWS
    units = []
    for split, paths in files.items():
        for path in paths:
            if not _is_parquet(path):
                units.append(Unit(split, path))
                continue
            meta = _parquet_metadata(path)
            if text_column not in meta.schema.names:
                raise DataSourceError(f"{path} has no {text_column!r} column (it has "
                                      f"{meta.schema.names}); set --data.text_column")
            first, rows = 0, 0
            for group in range(meta.num_row_groups):
                group_rows = meta.row_group(group).num_rows
                if rows and rows + group_rows > unit_rows:  # this group starts the next unit
                    units.append(Unit(split, path, (first, group)))
                    first, rows = group, 0
                rows += group_rows
            units.append(Unit(split, path, (first, meta.num_row_groups)))
    return units


# ---------------------------------------------------------------- one unit, in a worker process

def _local_copy(path: str) -> str:
    """``path`` itself, or for an ``hf://datasets/...`` URL the file downloaded into the Hugging
    Face cache (resumed, not restarted, when a download was interrupted)."""
    if not path.startswith("hf://"):
        return path
    from huggingface_hub import HfFileSystem, hf_hub_download

    resolved = HfFileSystem().resolve_path(path)
    return hf_hub_download(resolved.repo_id, resolved.path_in_repo, repo_type=resolved.repo_type,
                           revision=resolved.revision)


def _documents(unit: Unit, text_column: str):
    """Batches of the unit's documents (lists of str), ``BATCH_DOCS`` at a time."""
    path = _local_copy(unit.path)
    if _is_parquet(path):
        import pyarrow.parquet as pq

        parquet = pq.ParquetFile(path)
        if text_column not in parquet.schema_arrow.names:
            raise DataSourceError(f"{unit.path} has no {text_column!r} column (it has "
                                  f"{parquet.schema_arrow.names}); set --data.text_column")
        groups = range(*unit.row_groups) if unit.row_groups else None
        for batch in parquet.iter_batches(BATCH_DOCS, row_groups=groups, columns=[text_column]):
            yield [t or "" for t in batch.column(0).to_pylist()]
        return
    opener = gzip.open if path.lower().endswith(".gz") else open
    with opener(path, "rt", encoding="utf-8") as f:
        batch = []
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataSourceError(f"{unit.path}, line {number}: not valid JSON "
                                      f"({e.msg})") from None
            if not isinstance(row, dict) or text_column not in row:
                keys = list(row) if isinstance(row, dict) else type(row).__name__
                raise DataSourceError(f"{unit.path}, line {number}: no {text_column!r} field "
                                      f"(it has {keys}); set --data.text_column")
            batch.append(row[text_column] or "")
            if len(batch) == BATCH_DOCS:
                yield batch
                batch = []
        if batch:
            yield batch


def tokenize_unit(unit: Unit, tokenizer_dict: dict, text_column: str, dtype: str,
                  shard: str) -> int:
    """Tokenize ``unit`` into the file ``shard`` (each document followed by the end-of-text token,
    where the tokenizer has one); returns its number of tokens. The file appears whole or not at
    all."""
    from .tokenizers import tokenizer_from_dict

    tokenizer = tokenizer_from_dict(tokenizer_dict)
    eot = [tokenizer.eot_token] if tokenizer.eot_token is not None else []
    partial = Path(shard + ".tmp")
    n = 0
    try:
        with open(partial, "wb") as f:
            for texts in _documents(unit, text_column):
                ids = tokenizer.encode_batch(texts)
                count = sum(len(x) for x in ids) + len(eot) * len(ids)
                flat = itertools.chain.from_iterable(x + eot for x in ids)
                f.write(np.fromiter(flat, dtype=dtype, count=count).tobytes())
                n += count
    except UnicodeDecodeError as e:
        raise DataSourceError(f"{unit.path}: not UTF-8 text ({e.reason} at byte "
                              f"{e.start})") from None
    os.replace(partial, shard)
    return n


# ---------------------------------------------------------------- the whole corpus

@contextlib.contextmanager
def _exclusive(lock_path: Path):
    """Hold an exclusive lock on ``lock_path``: a second process preparing the same corpus (the
    first process of each node, in a multi-node run) waits for the first one to finish."""
    with open(lock_path, "a") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            print(f"Waiting for another process preparing {lock_path.with_suffix('')} ...",
                  file=sys.stderr, flush=True)
            fcntl.flock(f, fcntl.LOCK_EX)
        yield


def shard_name(index: int, unit: Unit) -> str:
    return f"{unit.split}-{index:05d}.bin"


def prepare_shards(files: dict[str, list[str]], tokenizer, text_column: str, folder: Path,
                   val_fraction: float, num_proc: int | None = None,
                   unit_rows: int | None = None) -> None:
    """Tokenize ``files`` (split -> paths) into shards in ``folder``, with its ``meta.json``.
    Without a "val" split, validation is the last ``val_fraction`` of the tokens.

    The work happens in ``<folder>.partial`` and the folder is renamed when complete; finished
    shards there survive an interruption and are not redone."""
    work = folder.with_name(folder.name + ".partial")
    folder.parent.mkdir(parents=True, exist_ok=True)
    # every process of a run asks for the corpus: the first prepares it, the others wait on this
    # lock (a file beside the folder, never removed, so all of them lock the same file) and then
    # find it done
    with _exclusive(folder.with_name(folder.name + ".lock")):
        if (folder / "meta.json").exists():  # another process finished it while we waited
            return
        work.mkdir(exist_ok=True)
        units = plan_units(files, text_column, unit_rows)
        names = [shard_name(i, unit) for i, unit in enumerate(units)]
        dtype = np.dtype(np.uint16 if tokenizer.vocab_size <= 2**16 else np.uint32).name
        todo = [i for i, name in enumerate(names) if not (work / name).exists()]
        if len(todo) < len(units):
            print(f"Resuming: {len(units) - len(todo)} of {len(units)} shards are done",
                  file=sys.stderr, flush=True)
        args = [(units[i], tokenizer.to_dict(), text_column, dtype, str(work / names[i]))
                for i in todo]
        _run_units(args, num_proc)
        counts = [(work / name).stat().st_size // np.dtype(dtype).itemsize for name in names]
        meta = {"tokenizer": tokenizer.to_dict(), "dtype": dtype,
                **_split_layout(units, names, counts, val_fraction)}
        if sum(meta["num_tokens"].values()) == 0:
            raise DataSourceError(f"{list(itertools.chain(*files.values()))[:3]}: no documents "
                                  f"in the {text_column!r} column: there is nothing to train on")
        (work / "meta.json").write_text(json.dumps(meta))
        work.rename(folder)  # a reader sees the whole corpus or none of it


def _run_units(args: list[tuple], num_proc: int | None) -> None:
    """Tokenize the units in ``num_proc`` processes (default: every core this process may use, or
    this process alone for a corpus under ``SMALL_CORPUS`` bytes, which it tokenizes sooner than
    worker processes start), reporting progress; in this process when there is one unit or one
    process."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    if num_proc is None and _local_bytes([unit for unit, *_ in args]) < SMALL_CORPUS:
        num_proc = 1
    processes = min(num_proc or cores or 1, len(args))
    started, tokens = time.perf_counter(), 0

    def done(i: int, n: int) -> None:
        nonlocal tokens
        tokens += n
        rate = tokens / max(time.perf_counter() - started, 1e-9)
        print(f"  shard {i}/{len(args)}: {tokens:,} tokens ({rate:,.0f} tokens/s)",
              file=sys.stderr, flush=True)

    if processes <= 1:
        for i, unit_args in enumerate(args, 1):
            done(i, tokenize_unit(*unit_args))
        return
    # forked on Linux, as datasets' own workers are: a spawned worker would import the parent's
    # main module again, which for a training run is torch and Lightning (seconds and hundreds of
    # MB per worker). The workers use NumPy, Arrow and the tokenizer only, never a thread of the
    # parent's. Elsewhere (macOS, Windows), where forking is unsafe, spawned.
    context = multiprocessing.get_context("fork" if sys.platform == "linux" else "spawn")
    with context.Pool(processes, initializer=_worker_signals) as pool:
        for i, n in enumerate(pool.imap_unordered(_tokenize_unit_args, args), 1):
            done(i, n)


def _tokenize_unit_args(args: tuple) -> int:
    return tokenize_unit(*args)


def _worker_signals() -> None:
    """A worker leaves Ctrl-C to the main process, whose leaving the pool (an error, Ctrl-C)
    terminates it with SIGTERM, which ends it quietly (not through a handler a forked worker
    inherits): the unit it was writing stays a temporary file, redone by the next run."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)


def _local_bytes(units: list[Unit]) -> float:
    """The size of the units' files on disk (infinite for files still to download)."""
    paths = {unit.path for unit in units}
    if any(path.startswith("hf://") for path in paths):
        return float("inf")
    return sum(os.path.getsize(path) for path in paths)


def _split_layout(units: list[Unit], names: list[str], counts: list[int],
                  val_fraction: float) -> dict:
    """meta.json's ``splits``: each split's shards and its ``[start, stop)`` in them, and
    ``num_tokens``. Without val units, train and val share the shards: val is their last
    ``val_fraction`` of the tokens (cut as the single-file cache cuts them)."""
    splits = {}
    for split in ("train", "val"):
        shards = [[name, n] for unit, name, n in zip(units, names, counts, strict=True)
                  if unit.split == split]
        if shards:
            splits[split] = {"shards": shards, "start": 0, "stop": sum(n for _, n in shards)}
    if "val" not in splits:
        n = splits["train"]["stop"]
        n_train = int(n * (1 - val_fraction))
        splits = {"train": {**splits["train"], "stop": n_train},
                  "val": {**splits["train"], "start": n_train}}
    return {"splits": splits,
            "num_tokens": {split: s["stop"] - s["start"] for split, s in splits.items()}}


class TokenShards:
    """Tokens ``[start, stop)`` of shard files put end to end, read like a 1-D NumPy array:
    ``len()``, and indexing by an integer array or a slice (windows may span two shards)."""

    def __init__(self, folder: Path, shards: list[tuple[str, int]], start: int, stop: int,
                 dtype: str):
        sizes = np.array([n for _, n in shards], dtype=np.int64)
        self.bounds = np.concatenate([[0], np.cumsum(sizes)])  # where each shard begins
        self.folder, self.names = folder, [name for name, _ in shards]
        # each shard is memory-mapped when first read: a split reads only its own (the val split,
        # the tail of the last shards), and an empty shard, which np.memmap refuses, never
        self.arrays: list[np.memmap | None] = [None] * len(shards)
        self.start, self.stop, self.dtype = start, stop, np.dtype(dtype)

    def __len__(self) -> int:
        return self.stop - self.start

    def __getitem__(self, index) -> np.ndarray:
        if isinstance(index, slice):
            index = np.arange(*index.indices(len(self)))
        index = np.asarray(index, dtype=np.int64)
        if index.size and (index.min() < 0 or index.max() >= len(self)):
            raise IndexError(f"token index out of range [0, {len(self)})")
        position = index + self.start
        shard = np.searchsorted(self.bounds, position, side="right") - 1
        out = np.empty(index.shape, dtype=self.dtype)
        for s in np.unique(shard):
            if self.arrays[s] is None:
                self.arrays[s] = np.memmap(self.folder / self.names[s], dtype=self.dtype, mode="r")
            where = shard == s
            out[where] = self.arrays[s][position[where] - self.bounds[s]]
        return out

    def __array__(self, dtype=None, copy=None):
        tokens = self[:]
        return tokens if dtype is None else tokens.astype(dtype)

    def tolist(self) -> list[int]:
        return self[:].tolist()
