"""Parallel text for translation: loading pairs with ``datasets``, a joint BPE vocabulary, and
batches grouped by length under a token budget.

Sources (``TranslationDataModule(source=...)``):

* a folder of aligned line files ``{train,val}.<src_lang>[.gz]`` and ``{train,val}.<tgt_lang>[.gz]``
  (line i of one translates line i of the other), e.g. the Multi30k repository's
  ``data/task1/raw`` (docs/translation.md);
* a folder with ``train.jsonl[.gz]`` and ``val.jsonl[.gz]``, one pair per line:
  ``{"de": "...", "en": "..."}`` or ``{"translation": {"de": "...", "en": "..."}}``;
* a hub dataset id with such columns and train/validation splits, e.g. ``bentrevett/multi30k``.

A ``test`` split (``test.<lang>`` files, ``test.jsonl``, or the hub dataset's ``test``) is loaded
when there is one; training scores it once, at the very end, and never chooses anything with it.

Cleaning, reported as it happens: files of different line counts are rejected; pairs with an empty
side are dropped; pairs longer than ``max_len`` tokens (source, or target plus bos/eos) are dropped.
"""

import re
from collections.abc import Callable
from functools import cached_property, partial
from pathlib import Path

import lightning as L
import numpy as np
import torch
from lightning.pytorch.utilities import rank_zero_info
from torch.utils.data import DataLoader, IterableDataset

from .batching import token_batches
from .corpus import HUB_ID, DataSourceError, load_hub
from .lm import batches_trained
from .tokenizers import BPETokenizer

MULTI30K_HINT = ("the Multi30k text is at https://github.com/multi30k/dataset (data/task1/raw); a "
                 "folder with train.de.gz, train.en.gz, val.de.gz and val.en.gz works with "
                 "--data.source path/to/folder")


def _find(folder: Path, stem: str) -> Path | None:
    candidates = (folder / f"{stem}{gz}" for gz in ("", ".gz"))
    return next((path for path in candidates if path.is_file()), None)


def _load_line_pairs(folder: Path, src_lang: str, tgt_lang: str):
    """DatasetDict train/val of {src_lang, tgt_lang} columns from aligned line files."""
    from datasets import Dataset, DatasetDict, load_dataset

    splits = {}
    for split in ("train", "val", "test"):
        files = {lang: _find(folder, f"{split}.{lang}") for lang in (src_lang, tgt_lang)}
        missing = [f"{split}.{lang}[.gz]" for lang, f in files.items() if f is None]
        if split == "test" and len(missing) == 2:
            continue  # a test split is optional; half of one is an error
        if split == "test" and missing:
            raise DataSourceError(f"{folder} has {files[src_lang] or files[tgt_lang]} but no "
                                  f"{missing[0]}: a test split needs both sides (or neither)")
        if missing:
            raise DataSourceError(f"{folder} has no {' or '.join(missing)}: a translation folder "
                                  f"needs train.{src_lang}, train.{tgt_lang}, val.{src_lang} and "
                                  f"val.{tgt_lang} (optionally gzipped), or train.jsonl and "
                                  "val.jsonl")
        lines = {}
        for lang, path in files.items():
            try:
                lines[lang] = load_dataset("text", data_files=str(path), split="train")["text"]
            except Exception as e:
                cause = e.__cause__ or e
                raise DataSourceError(f"could not read {path}: {type(cause).__name__}: {cause}. "
                                      f"Text files must be UTF-8.") from e
        n_src, n_tgt = len(lines[src_lang]), len(lines[tgt_lang])
        if n_src != n_tgt:
            raise DataSourceError(f"{files[src_lang]} has {n_src} lines but {files[tgt_lang]} has "
                                  f"{n_tgt}: the files must be aligned line by line (line i "
                                  "translates line i)")
        splits[split] = Dataset.from_dict(lines)
    return DatasetDict(splits)


def _load_jsonl_pairs(folder: Path):
    from datasets import DatasetDict, load_dataset

    splits = {}
    for split in ("train", "val", "test"):  # one at a time: their layouts may differ
        path = _find(folder, f"{split}.jsonl")
        if path is None:  # only test can be missing: load_pairs checked the others
            continue
        try:
            splits[split] = load_dataset("json", data_files=str(path), split="train")
        except Exception as e:
            cause = e.__cause__ or e
            raise DataSourceError(f"could not read {path}: {type(cause).__name__}: {cause}") from e
    return DatasetDict(splits)


def load_pairs(source: str, src_lang: str, tgt_lang: str) -> dict[str, tuple[list[str], list[str]]]:
    """{"train": (sources, targets), "val": (...), and "test" where the source has one} as lists
    of stripped strings, pairs with an empty side dropped."""
    folder = Path(source).expanduser()
    if folder.is_dir():
        if _find(folder, "train.jsonl") and _find(folder, "val.jsonl"):
            ds = _load_jsonl_pairs(folder)
        else:
            ds = _load_line_pairs(folder, src_lang, tgt_lang)
    elif HUB_ID.match(source) and not folder.exists():
        ds = load_hub(source, hint=MULTI30K_HINT, keep_test=True)
        if "val" not in ds:
            raise DataSourceError(f"hub dataset {source!r} has no validation split")
    else:
        raise DataSourceError(f"{source} is not a folder of parallel text files nor a hub dataset "
                              f"id; {MULTI30K_HINT}")
    pairs = {}
    for split in [name for name in ("train", "val", "test") if name in ds]:
        sources, targets = _columns(ds[split], src_lang, tgt_lang, source)
        kept = [(s.strip(), t.strip()) for s, t in zip(sources, targets, strict=True)
                if s.strip() and t.strip()]
        if len(kept) < len(sources):
            dropped = len(sources) - len(kept)
            rank_zero_info(f"{source} {split}: dropped {dropped} of {len(sources)} pairs with an "
                           "empty side")
        if not kept:
            raise DataSourceError(f"{source} has no {split} pairs with text on both sides")
        pairs[split] = ([s for s, _ in kept], [t for _, t in kept])
    return pairs


def _columns(ds, src_lang: str, tgt_lang: str, source: str) -> tuple[list[str], list[str]]:
    if "translation" in ds.column_names:
        flat = ds.flatten()
        ds = flat.rename_columns({f"translation.{lang}": lang for lang in (src_lang, tgt_lang)
                                  if f"translation.{lang}" in flat.column_names})
    missing = [lang for lang in (src_lang, tgt_lang) if lang not in ds.column_names]
    if missing:
        raise DataSourceError(f"{source} has no {missing} column (it has {ds.column_names}); set "
                              f"--data.src_lang and --data.tgt_lang to its language keys")
    return ds[src_lang], ds[tgt_lang]


class PairBatches(IterableDataset):
    """Padded (src, tgt_in, tgt_out) batches of token-id pairs, regrouped and reshuffled at every
    pass. Each rank of a multi-process run takes every world_size-th batch (the same number on every
    rank).

    ``position``, when given, returns how many batches training has taken; each pass starts from
    there (the epoch and the place in it), so that a resumed run sees the batches an
    uninterrupted one would."""

    def __init__(self, src: list[list[int]], tgt: list[list[int]], max_tokens: int, shuffle: bool,
                 seed: int = 0, pad_id: int = BPETokenizer.pad_id,
                 bos_id: int = BPETokenizer.bos_id, eos_id: int = BPETokenizer.eos_id,
                 position: Callable[[], int] | None = None):
        self.src, self.tgt, self.position = src, tgt, position
        self.lengths = np.array([max(len(s), len(t) + 1) for s, t in zip(src, tgt, strict=True)])
        self.max_tokens, self.shuffle, self.seed = max_tokens, shuffle, seed
        self.pad_id, self.bos_id, self.eos_id = pad_id, bos_id, eos_id
        self.epoch, self.rank, self.world_size = 0, 0, 1

    def _batches(self) -> list[np.ndarray]:
        rng = np.random.default_rng(self.seed + self.epoch) if self.shuffle else None
        batches = token_batches(self.lengths, self.max_tokens, rng)
        # every rank takes the same number of batches: the remainder is left out of this epoch
        usable = len(batches) - len(batches) % self.world_size
        return batches[self.rank:usable:self.world_size]

    def __len__(self) -> int:
        return len(self._batches())

    def _pad(self, rows: list[list[int]]) -> torch.Tensor:
        out = torch.full((len(rows), max(map(len, rows))), self.pad_id, dtype=torch.long)
        for i, row in enumerate(rows):
            out[i, :len(row)] = torch.tensor(row)
        return out

    def __iter__(self):
        skip = 0
        if self.position is not None:
            self.epoch, skip = divmod(self.position(), len(self))
        batches = self._batches()
        self.epoch += 1
        for index in batches[skip:]:
            src = self._pad([self.src[i] for i in index])
            tgt_in = self._pad([[self.bos_id, *self.tgt[i]] for i in index])
            tgt_out = self._pad([[*self.tgt[i], self.eos_id] for i in index])
            yield src, tgt_in, tgt_out


class TranslationDataModule(L.LightningDataModule):
    """Parallel text for ``Seq2SeqTransformer``: a joint BPE vocabulary trained on the training
    split only, and batches of similar-length pairs under a token budget.

    Args:
        source: a folder of parallel files or a hub dataset id (see the module docstring).
        src_lang: source language key (file suffix, JSON key or column).
        tgt_lang: target language key.
        vocab_size: size of the joint BPE vocabulary, special tokens included.
        max_len: longest source, or target with bos or eos, in tokens; longer pairs are dropped.
        max_tokens: tokens per training batch and side, padding included.
        seed: seed of the batch shuffling (epoch e uses seed + e) and of the dev split.
        dev_size: training pairs held out at random as a ``dev`` split, on which decoding settings
            can be tuned without looking at val (the vocabulary is trained without them too); 0 for
            none.
    """

    def __init__(self, source: str = "bentrevett/multi30k", src_lang: str = "de",
                 tgt_lang: str = "en", vocab_size: int = 8000, max_len: int = 128,
                 max_tokens: int = 3000, seed: int = 0, dev_size: int = 0):
        super().__init__()
        languages_ok = all(re.fullmatch(r"[\w-]+", lang) for lang in (src_lang, tgt_lang))
        if not languages_ok or src_lang == tgt_lang:
            raise ValueError("src_lang and tgt_lang must be two different language keys, got "
                             f"{src_lang!r}, {tgt_lang!r}")
        if max_tokens < max_len:
            raise ValueError(f"max_tokens ({max_tokens}) must be at least max_len ({max_len}), so "
                             "that the longest pair fits in a batch")
        if dev_size < 0:
            raise ValueError("dev_size must be 0 (no dev split) or a number of training pairs, got "
                             f"{dev_size}")
        self.save_hyperparameters(logger=False)  # the CLI logs the whole config

    @cached_property
    def texts(self) -> dict[str, tuple[list[str], list[str]]]:
        """{"train": (sources, targets), "val": ..., "dev" with dev_size, and "test" where the
        source has one}."""
        hp = self.hparams
        pairs = load_pairs(hp.source, hp.src_lang, hp.tgt_lang)
        if hp.dev_size:
            sources, targets = pairs["train"]
            if hp.dev_size >= len(sources):
                raise DataSourceError(f"dev_size ({hp.dev_size}) must be smaller than the "
                                      f"{len(sources)} training pairs of {hp.source}")
            order = np.random.default_rng(hp.seed).permutation(len(sources))
            for split, index in (("dev", order[:hp.dev_size]), ("train", order[hp.dev_size:])):
                index = np.sort(index)
                pairs[split] = ([sources[i] for i in index], [targets[i] for i in index])
        return pairs

    @cached_property
    def tokenizer(self) -> BPETokenizer:
        sources, targets = self.texts["train"]
        return BPETokenizer.train(sources + targets, self.hparams.vocab_size)

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.vocab_size

    @cached_property
    def ids(self) -> dict[str, tuple[list[list[int]], list[list[int]]]]:
        """Token ids of the splits batched for training and the val loss, pairs longer than max_len
        dropped (and reported). (dev and test are only translated, every line of them.)"""
        out, limit = {}, self.hparams.max_len
        for split in ("train", "val"):
            sources, targets = self.texts[split]
            src, tgt = self.tokenizer.encode_batch(sources), self.tokenizer.encode_batch(targets)
            keep = [i for i in range(len(src)) if len(src[i]) <= limit and len(tgt[i]) + 1 <= limit]
            if len(keep) < len(src):
                dropped = len(src) - len(keep)
                rank_zero_info(f"{split}: dropped {dropped} of {len(src)} pairs longer than "
                               f"max_len ({limit} tokens)")
            out[split] = ([src[i] for i in keep], [tgt[i] for i in keep])
        return out

    def _dataset(self, split: str, shuffle: bool) -> PairBatches:
        data = PairBatches(*self.ids[split], self.hparams.max_tokens, shuffle,
                           seed=self.hparams.seed)
        if self.trainer is not None:
            data.rank, data.world_size = self.trainer.global_rank, self.trainer.world_size
            if shuffle:
                data.position = partial(batches_trained, self.trainer)
        return data

    def setup(self, stage: str):
        self.ids  # noqa: B018  load, train the vocabulary and tokenize once, before any loader

    def train_dataloader(self):  # own generator: see LMDataModule._loader
        return DataLoader(self._dataset("train", shuffle=True), batch_size=None,
                          generator=torch.Generator().manual_seed(self.hparams.seed))

    def val_dataloader(self):
        return DataLoader(self._dataset("val", shuffle=False), batch_size=None,
                          generator=torch.Generator().manual_seed(self.hparams.seed))
