"""Turn a text source into flat arrays of token ids on disk, once.

A source is a local file, glob or folder of ``.txt``, ``.txt.gz``, ``.jsonl``,
``.jsonl.gz`` or ``.parquet`` files, a dataset id on the Hugging Face hub
(``owner/name``), or the name of a text that ships with the project
(``tiny_shakespeare``, the default: it trains offline on a fresh clone). The
tokens go to a cache folder keyed by source + tokenizer (uint16 where the
vocabulary fits), so a second run starts at once, in one of two ways:

* documents (JSONL or Parquet files, local or a hub dataset's) in GPT-2 BPE,
  the way a large corpus comes: into token shards, in worker processes, a
  unit of the files at a time, resuming where an interrupted preparation
  stopped (``data/shards.py``);
* plain text, and any source in characters (whose vocabulary is read from
  the text first): read with ``datasets``, tokenized with ``Dataset.map``
  and written as ``train.bin`` / ``val.bin``.

Splits: the source's own train and validation splits if it has them (files
named ``train*`` and ``val*``/``valid*``/``dev*``, or the hub dataset's
splits), else the first 90% of the tokens for training and the last 10% for
validation (the published Tiny Shakespeare convention).

Text files are read line by line with line breaks kept, so their tokens are
those of the whole text; rows of JSONL / parquet / hub datasets are documents,
separated by the tokenizer's end-of-text token when it has one. The
character vocabulary is built from the training split (from the whole source
when it has no validation split of its own, as nanoGPT does).
"""

import contextlib
import glob
import hashlib
import json
import os
import re
import shutil
import socket
import sys
import tempfile
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from urllib.parse import urlparse

import numpy as np

from .shards import DataSourceError, TokenShards, prepare_shards
from .tokenizers import CharTokenizer, GPT2Tokenizer, check_tokenizer_name, tokenizer_from_dict

CACHE_VERSION = 1
FORMATS = {".txt": "text", ".txt.gz": "text", ".jsonl": "json", ".jsonl.gz": "json",
           ".parquet": "parquet"}
VAL_SPLIT_NAMES = ("validation", "valid", "val", "dev")
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
# Texts that ship inside the repository, usable by name as a source, offline (data/<name>/README.md
# says where each comes from). A local path of the same name, when there is one, wins.
BUNDLED = {"tiny_shakespeare": Path(__file__).resolve().parent / "tiny_shakespeare"
                               / "input.txt.gz"}
# Hub datasets whose published validation split is several of the hub's splits together:
# karpathy/tiny_shakespeare's Parquet version cuts the text 90/5/5, published numbers use 90/10.
HUB_VAL_SPLITS = {"karpathy/tiny_shakespeare": ("validation", "test")}


@dataclass
class TokenizedCorpus:
    """Token arrays of the train and val splits in ``folder``, and the tokenizer that made them."""

    folder: Path
    tokenizer: object
    dtype: str
    num_tokens: dict

    splits: dict | None = None  # a sharded corpus's layout (data/shards.py); None: {split}.bin

    def tokens(self, split: str) -> "np.memmap | TokenShards":
        """The split's tokens, memory-mapped: one array, or the shards of a sharded corpus read as
        one."""
        layout = self.splits[split] if self.splits else None
        if layout is None:
            return np.memmap(self.folder / f"{split}.bin", dtype=self.dtype, mode="r")
        if len(layout["shards"]) == 1 and layout["start"] == 0:  # one shard: itself, sliced
            name, _ = layout["shards"][0]
            return np.memmap(self.folder / name, dtype=self.dtype, mode="r")[:layout["stop"]]
        return TokenShards(self.folder, layout["shards"], layout["start"], layout["stop"],
                           self.dtype)


def _report(message: str) -> None:
    """A line on the console about work that takes a while (on stderr: stdout is the scripts'
    output)."""
    print(message, file=sys.stderr, flush=True)


def default_cache_dir() -> Path:
    xdg_cache = Path(os.environ.get("XDG_CACHE_HOME", "~/.cache"))
    root = os.environ.get("MINIGPT_CACHE") or xdg_cache / "minigpt"
    return Path(root).expanduser() / "tokens"


def prepare_corpus(source: str, tokenizer: str = "char", *, text_column: str = "text",
                   val_fraction: float = 0.1, cache_dir: str | os.PathLike | None = None,
                   num_proc: int | None = None, subset: str | None = None) -> TokenizedCorpus:
    """Tokenize ``source`` into the cache (or find it there) and return the corpus. ``subset``: the
    hub dataset's configuration (e.g. FineWeb-Edu's ``sample-10BT``)."""
    check_tokenizer_name(tokenizer)
    if not 0.0 < val_fraction < 1.0:
        raise DataSourceError(f"val_fraction must be between 0 and 1, got {val_fraction}")
    if num_proc is not None and num_proc < 1:
        raise DataSourceError(f"num_proc {num_proc}: give the number of tokenizing processes (1 "
                              f"or more), or leave it unset")
    files = find_local_files(source)
    if files and subset is not None:
        raise DataSourceError(f"--data.subset {subset!r} picks a configuration of a hub dataset; "
                              f"{source!r} is a local path: leave it unset (--data.subset "
                              f"null)")
    # the cache folder's name: a hash of everything the tokens depend on, local files by path,
    # size and modification time (an edited file is tokenized again)
    files_id = [(str(f.resolve()), f.stat().st_size, f.stat().st_mtime_ns) for f in files or []]
    identity = {"version": CACHE_VERSION, "tokenizer": tokenizer, "text_column": text_column,
                "val_fraction": val_fraction, "source": files_id if files else source,
                **({"subset": subset} if subset is not None else {})}
    digest = hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:16]
    name = Path(files[0]).name.split(".")[0] if files else source.replace("/", "--")
    folder = Path(cache_dir or default_cache_dir()) / f"{name}-{tokenizer}-{digest}"
    if not (folder / "meta.json").exists():
        _report(f"Tokenizing {source!r} with the {tokenizer} tokenizer into {folder}")
        # documents (JSONL, Parquet) in a fixed vocabulary go to token shards, in parallel and
        # resumably (data/shards.py); plain text, and characters (whose vocabulary is read from
        # the text first), through datasets
        by_split = None
        if tokenizer != "char":
            documents = files and FORMATS[_suffix(files[0])] != "text"
            by_split = split_files(files) if documents else None
            by_split = _hub_document_files(source, subset) if not files else by_split
        if by_split:
            prepare_shards({split: [str(f) for f in paths] for split, paths in by_split.items()},
                           GPT2Tokenizer(), text_column, folder, val_fraction, num_proc)
        else:
            if files:
                raw, join_lines = load_local(files), FORMATS[_suffix(files[0])] == "text"
            else:
                raw, join_lines = load_hub(source, subset=subset), False
            _write_corpus(raw, tokenizer, text_column, val_fraction, join_lines, folder,
                          num_proc)
    meta = json.loads((folder / "meta.json").read_text())
    return TokenizedCorpus(folder, tokenizer_from_dict(meta["tokenizer"]), meta["dtype"],
                           meta["num_tokens"], meta.get("splits"))


# ---------------------------------------------------------------- finding and loading the source

def _suffix(path: Path) -> str | None:
    name = path.name.lower()
    return next((ext for ext in FORMATS if name.endswith(ext)), None)


def find_local_files(source: str) -> list[Path] | None:
    """The local files of ``source``, or None when it is not local and looks like a hub id."""
    path = Path(source).expanduser()
    if source in BUNDLED and not path.exists():
        path = BUNDLED[source]
    if path.is_file():
        files = [path]
    elif path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and _suffix(p))
        if not files:
            raise DataSourceError(f"folder {source!r} holds no {'/'.join(FORMATS)} files")
    else:
        files = sorted(Path(p) for p in glob.glob(str(path), recursive=True) if Path(p).is_file())
        if not files:
            if HUB_ID.match(source) and not _suffix(path):
                return None
            raise DataSourceError(f"data source {source!r}: no such file, folder or glob match. "
                                  f"Pass a local {'/'.join(FORMATS)} file, a folder or glob of "
                                  "them, a hub dataset id (owner/name) or a text that ships with "
                                  f"the project ({', '.join(BUNDLED)}), e.g. --data.source "
                                  "path/to/input.txt")
    unsupported = [str(f) for f in files if not _suffix(f)]
    if unsupported:
        raise DataSourceError(f"unsupported file type: {unsupported[:3]}; use {'/'.join(FORMATS)} "
                              "files")
    if len({FORMATS[_suffix(f)] for f in files}) > 1:
        raise DataSourceError(f"data source {source!r} mixes file formats; give files of one "
                              f"format")
    return files


def _split_of(path: Path) -> str | None:
    stem = path.name.split(".")[0].lower()
    if stem.startswith("train"):
        return "train"
    if stem.startswith(VAL_SPLIT_NAMES):
        return "val"
    return None


def split_files(files: list[Path]) -> dict[str, list[Path]]:
    """The files of each split: "train" and, when the files name their splits, "val"."""
    by_split = {"train": [f for f in files if _split_of(f) == "train"],
                "val": [f for f in files if _split_of(f) == "val"]}
    if not (by_split["train"] and by_split["val"]):
        by_split = {"train": files}
    else:
        ignored = [f.name for f in files if _split_of(f) is None]
        if ignored:
            _report(f"Using the train*/val* files as splits; ignoring {ignored}")
    if all(f.stat().st_size == 0 for f in files):
        raise DataSourceError(f"{[str(f) for f in files][:3]} {'is' if len(files) == 1 else 'are'} "
                              "empty: there is no text to train on")
    return by_split


def load_local(files: list[Path]):
    """A DatasetDict with "train" and, when the files name their splits, "val"."""
    from datasets import load_dataset

    by_split = split_files(files)
    builder = FORMATS[_suffix(files[0])]
    kwargs = {"keep_linebreaks": True} if builder == "text" else {}
    data_files = {split: [str(f) for f in fs] for split, fs in by_split.items()}
    try:
        return load_dataset(builder, data_files=data_files, **kwargs)
    except Exception as e:  # datasets wraps decoding errors several levels deep
        cause = e.__cause__ or e
        raise DataSourceError(f"could not read {[str(f) for f in files][:3]} as {builder} data: "
                              f"{type(cause).__name__}: {cause}. Text files must be UTF-8.") from e


@contextlib.contextmanager
def _hub_offline():
    import datasets
    import huggingface_hub

    saved = datasets.config.HF_HUB_OFFLINE, huggingface_hub.constants.HF_HUB_OFFLINE
    datasets.config.HF_HUB_OFFLINE = huggingface_hub.constants.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        datasets.config.HF_HUB_OFFLINE, huggingface_hub.constants.HF_HUB_OFFLINE = saved


def hub_reachable(timeout: float = 1.0) -> bool:
    """Whether a TCP connection to the hub endpoint opens within ``timeout`` seconds."""
    import huggingface_hub

    url = urlparse(huggingface_hub.constants.ENDPOINT)
    try:
        socket.create_connection((url.hostname, url.port or 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def load_hub(dataset_id: str, hint: str = "e.g. --data.source path/to/input.txt, or --data.source "
                                          "tiny_shakespeare for the copy that ships with the "
                                          "project", keep_test: bool = False,
             subset: str | None = None):
    """A hub dataset's DatasetDict: from the local HF cache if it is there, else downloaded.
    ``keep_test``: with its ``test`` split too, where it has one that is not part of val;
    ``subset``: the dataset's configuration, where it has several.

    Offline and not cached, fails at once (instead of ~20 s of retries), with ``hint`` saying where
    else the data can come from."""
    from datasets import load_dataset

    splits = partial(_hub_splits, dataset_id=dataset_id, keep_test=keep_test)
    with contextlib.suppress(Exception), _hub_offline():
        return splits(load_dataset(dataset_id, subset))
    if os.environ.get("HF_HUB_OFFLINE") == "1" or os.environ.get("HF_DATASETS_OFFLINE") == "1" \
            or not hub_reachable():
        raise DataSourceError(
            f"{dataset_id!r} is not a local path, not in the Hugging Face cache, and the hub "
            f"cannot be reached (offline). Pass a local path instead: {hint}.")
    try:
        return splits(load_dataset(dataset_id, subset))
    except Exception as e:
        raise DataSourceError(f"could not load {dataset_id!r} from the hub: {type(e).__name__}: "
                              f"{e}. Download its text and pass a local path instead: "
                              f"{hint}.") from e


def _hub_document_files(dataset_id: str, subset: str | None) -> dict[str, list[str]] | None:
    """The data files of a hub dataset (``hf://`` URLs of its train and val splits, which the
    tokenizing workers download into the Hugging Face cache) when they are all Parquet or JSONL
    files, as a large corpus is: they are tokenized into shards, in parallel (data/shards.py). None
    where they are not, or where they cannot be listed: ``load_hub`` then reads the dataset, and
    says what is wrong."""
    from datasets import load_dataset_builder

    builder = None
    with contextlib.suppress(Exception), _hub_offline():  # listed in the cache already
        builder = load_dataset_builder(dataset_id, subset)
    if builder is None and hub_reachable():
        with contextlib.suppress(Exception):
            builder = load_dataset_builder(dataset_id, subset)
    files = dict(builder.config.data_files or {}) if builder is not None else {}
    if "train" not in files:
        return None
    by_split = {"train": list(files["train"]),
                "val": [f for s in _hub_val_splits(dataset_id, files) for f in files[s]]}
    by_split = {split: paths for split, paths in by_split.items() if paths}
    every = [p.lower().removesuffix(".gz") for paths in by_split.values() for p in paths]
    return by_split if all(p.endswith((".parquet", ".jsonl")) for p in every) else None


def _hub_splits(ds, dataset_id: str, keep_test: bool = False):
    """train, and val where the dataset has one: its published validation split (HUB_VAL_SPLITS),
    else the first of VAL_SPLIT_NAMES it has; with ``keep_test``, test where val is not it."""
    from datasets import DatasetDict, concatenate_datasets

    if "train" not in ds:
        raise DataSourceError(f"hub dataset {dataset_id!r} has no 'train' split (it has "
                              f"{list(ds)})")
    val = _hub_val_splits(dataset_id, ds)
    splits = {"train": ds["train"]}
    if val:
        splits["val"] = concatenate_datasets([ds[s] for s in val]) if len(val) > 1 else ds[val[0]]
    if keep_test and "test" in ds and "test" not in val:
        splits["test"] = ds["test"]
    return DatasetDict(splits)


def _hub_val_splits(dataset_id: str, available) -> list[str]:
    """The hub dataset's splits that make its validation split: its published one
    (HUB_VAL_SPLITS), else the first of VAL_SPLIT_NAMES it has; none where it has none."""
    published = HUB_VAL_SPLITS.get(dataset_id)
    if published and all(split in available for split in published):
        return list(published)
    return [split for split in VAL_SPLIT_NAMES if split in available][:1]


# ---------------------------------------------------------------- tokenizing into the cache

def _write_corpus(raw, tokenizer_name, text_column, val_fraction, join_lines, folder: Path,
                  num_proc):
    if text_column not in raw["train"].column_names:
        raise DataSourceError(f"the data has no {text_column!r} column (it has "
                              f"{raw['train'].column_names}); set --data.text_column")
    if tokenizer_name == "char":
        tokenizer = CharTokenizer.from_texts(
            t or "" for batch in raw["train"].iter(batch_size=10_000) for t in batch[text_column])
    else:
        tokenizer = GPT2Tokenizer()
    dtype = np.uint16 if tokenizer.vocab_size <= 2**16 else np.uint32

    folder.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=folder.name + ".tmp-", dir=folder.parent))
    work.chmod(0o755)  # mkdtemp makes it private; the cache is shared like any other
    try:
        num_tokens = {split: _tokenize_split(raw[split], split, tokenizer, text_column,
                                             join_lines, dtype, work, num_proc)
                      for split in raw}
        if "val" not in raw:  # no validation split of its own: the last val_fraction of the tokens
            n = num_tokens["train"]
            n_train = int(n * (1 - val_fraction))
            np.memmap(work / "train.bin", dtype=dtype, mode="r")[n_train:].tofile(work / "val.bin")
            os.truncate(work / "train.bin", n_train * np.dtype(dtype).itemsize)
            num_tokens = {"train": n_train, "val": n - n_train}
        meta = {"tokenizer": tokenizer.to_dict(), "dtype": np.dtype(dtype).name,
                "num_tokens": num_tokens}
        (work / "meta.json").write_text(json.dumps(meta))
        for leftover in work.glob("*.arrow"):
            leftover.unlink()
        try:
            work.rename(folder)  # atomic: a reader sees the whole folder or none of it
        except OSError:
            if not (folder / "meta.json").exists():  # not another process that finished first
                raise
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _tokenize_split(ds, split, tokenizer, text_column, join_lines, dtype, work: Path,
                    num_proc) -> int:
    eot = tokenizer.eot_token

    def encode(batch):
        texts = [t or "" for t in batch[text_column]]
        if join_lines:  # lines of a text file: encode them together, as the text they are
            return {"ids": [tokenizer.encode("".join(texts))]}
        ids = tokenizer.encode_batch(texts)
        return {"ids": [x + [eot] for x in ids] if eot is not None else ids}

    try:
        tokenized = ds.map(encode, batched=True, batch_size=1000, remove_columns=ds.column_names,
                           num_proc=num_proc, cache_file_name=str(work / f"{split}.arrow"),
                           new_fingerprint=f"{work.name}-{split}", desc=f"tokenizing {split}")
    except ValueError as e:
        raise DataSourceError(f"{split} split: {e}") from None
    n = 0
    with open(work / f"{split}.bin", "wb") as f:
        for chunk in tokenized.data.column("ids").chunks:  # streamed: never all of it in Python
            ids = chunk.flatten().to_numpy().astype(dtype)
            f.write(ids.tobytes())
            n += len(ids)
    return n
