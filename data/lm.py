"""Lightning DataModule for language modelling on a tokenized corpus.

Training batches are random windows of ``block_size + 1`` tokens (x = window[:-1],
y = window[1:]), drawn endlessly, as nanoGPT does; each batch from a random
generator seeded by its optimizer step and its place in the step, so that the
windows of a step are the same on any number of processes (DDP ranks, loader
workers) and a resumed run goes on where the stream stopped. A short-context warmup
(``short_block_size``, ``short_steps``) trains the first steps on shorter windows, more of
them a batch: the same tokens a step, at less attention cost. Validation
batches are the split cut into consecutive windows, in a fixed shuffled order, so every
evaluation sees the same batches and ``limit_val_batches`` takes a spread-out
sample of the split rather than its beginning.
"""

import itertools
import math
from functools import cached_property

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, IterableDataset, get_worker_info

from .corpus import DataSourceError, TokenizedCorpus, prepare_corpus
from .tokenizers import check_tokenizer_name


def batches_trained(trainer) -> int:
    """Training batches this process has trained on: none in a new run; a resumed one (whose step is
    restored before its loaders are made) goes on from there."""
    return trainer.global_step * trainer.accumulate_grad_batches


def _windows_to_xy(windows: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    """Windows of T + 1 tokens -> inputs x and targets y, both (B, T): y is x shifted by one, so
    position t of a window learns to predict token t + 1."""
    w = torch.from_numpy(windows.astype(np.int64))  # (B, T + 1)
    return w[:, :-1], w[:, 1:]


class RandomWindows(IterableDataset):
    """Endless batches of ``batch_size`` random windows, each batch drawn from a random generator of
    its own, seeded by (seed, optimizer step, slot): the slot of a batch is its place among the
    ``world_size x accumulate`` batches that make up one optimizer step (this process's ``rank``
    times ``accumulate``, plus the batch's place in the accumulation).

    So an optimizer step trains on the same windows however its batches are spread: N processes
    accumulating A batches see what one process accumulating N x A batches sees, and a resumed run
    (``start``: the batches this process has trained on) goes on with the batches an uninterrupted
    one would have had, with any number of loader workers.

    ``short_steps`` > 0: the batches of the first ``short_steps`` optimizer steps are windows of
    ``short_block_size`` tokens, ``block_size / short_block_size`` times as many (the same tokens
    a batch); ``LMDataModule`` checks that it divides ``block_size``."""

    def __init__(self, corpus: TokenizedCorpus, split: str, block_size: int, batch_size: int,
                 seed: int, rank: int = 0, accumulate: int = 1, start: int = 0,
                 short_block_size: int | None = None, short_steps: int = 0):
        self.corpus, self.split = corpus, split
        self.block_size, self.batch_size, self.seed = block_size, batch_size, seed
        self.rank, self.accumulate, self.start = rank, accumulate, start
        self.short_block_size, self.short_steps = short_block_size, short_steps

    def batch_shape(self, batch: int) -> tuple[int, int]:
        """(windows, tokens a window) of this process's batch number ``batch``."""
        if batch // self.accumulate < self.short_steps:  # the short-context warmup's steps
            short = self.short_block_size
            return self.batch_size * (self.block_size // short), short
        return self.batch_size, self.block_size

    def batch_seed(self, batch: int) -> list[int]:
        """The seed of this process's batch number ``batch`` (counted from the run's start)."""
        step, place = divmod(batch, self.accumulate)
        return [self.seed, step, self.rank * self.accumulate + place]

    def __iter__(self):
        tokens = self.corpus.tokens(self.split)  # memory-mapped, opened in the worker
        worker = get_worker_info()
        # the loader takes batch k from worker k % W: worker w gives batches start + w, + W, ...
        first, every = (self.start + worker.id, worker.num_workers) if worker else (self.start, 1)
        for batch in itertools.count(first, every):
            rng = np.random.default_rng(self.batch_seed(batch))
            B, T = self.batch_shape(batch)
            # a window may start anywhere its T + 1 tokens fit: (B, T + 1)
            starts = rng.integers(0, len(tokens) - T, size=B)
            yield _windows_to_xy(tokens[starts[:, None] + np.arange(T + 1)])


class FixedWindows(Dataset):
    """The split as consecutive windows (each token is a target once), batched in a fixed
    shuffled order."""

    def __init__(self, corpus: TokenizedCorpus, split: str, block_size: int, batch_size: int,
                 seed: int):
        self.corpus, self.split = corpus, split
        self.block_size, self.batch_size = block_size, batch_size
        # windows start every block_size tokens and overlap by one (the last target of one is the
        # first input of the next), so every token but the first is a target exactly once
        num_windows = (corpus.num_tokens[split] - 1) // block_size
        self.starts = np.random.default_rng(seed).permutation(num_windows) * block_size

    def __len__(self) -> int:
        return math.ceil(len(self.starts) / self.batch_size)

    def __getitem__(self, i: int):
        if not 0 <= i < len(self):
            raise IndexError(i)
        starts = self.starts[i * self.batch_size:(i + 1) * self.batch_size]
        tokens = self.corpus.tokens(self.split)
        return _windows_to_xy(tokens[starts[:, None] + np.arange(self.block_size + 1)])


def check_short_context(block_size: int, short_block_size: int | None, short_steps: int) -> None:
    """A short-context warmup needs both its options, and windows that divide ``block_size``
    (a batch then holds exactly the tokens of a full-length one). Raises ValueError with the fix."""
    if short_steps < 0:
        raise ValueError(f"--data.short_steps must be 0 or more, got {short_steps}")
    if (short_block_size is None) != (short_steps == 0):
        raise ValueError("a short-context warmup needs both --data.short_block_size (its window) "
                         "and --data.short_steps (how many steps); set both, or neither")
    if short_block_size is not None and short_block_size < 1:
        raise ValueError(f"--data.short_block_size must be at least 1, got {short_block_size}")
    if short_block_size is not None and not (short_block_size < block_size
                                             and block_size % short_block_size == 0):
        divisors = [d for d in range(1, block_size) if block_size % d == 0][-4:]
        examples = f": e.g. {', '.join(map(str, divisors))}" if divisors else ""
        raise ValueError(f"--data.short_block_size {short_block_size} must be shorter than "
                         f"block_size ({block_size}) and divide it, so that a batch holds the "
                         f"same tokens{examples}")


class LMDataModule(L.LightningDataModule):
    """Language-modelling data from a local file/glob/folder or a hub dataset id.

    Args:
        source: a ``.txt``/``.txt.gz``/``.jsonl``/``.parquet`` file, glob or folder, or a hub id.
        tokenizer: ``"char"`` or ``"gpt2"``.
        block_size: tokens per training example (the model's context length).
        batch_size: examples per batch (per process; more in a short-context warmup).
        short_block_size: a short-context warmup: the first ``short_steps`` optimizer steps train
            on windows of this many tokens (a divisor of ``block_size``), ``block_size /
            short_block_size`` times as many a batch, so a batch holds as many tokens. Early
            steps learn what nearby characters or words predict, which short windows teach too,
            and attention's cost per token grows with the window. Validation always reads
            windows of ``block_size``. None: ``block_size`` from the first step.
        short_steps: optimizer steps of the short-context warmup (fewer than the run's).
        text_column: column holding the text in JSONL/parquet/hub data.
        val_fraction: share of the tokens held out for validation when the source has no val split.
        cache_dir: where token arrays are cached (default ``$MINIGPT_CACHE`` or
            ``~/.cache/minigpt``).
        num_proc: processes for tokenizing. None: every core for documents in GPT-2 BPE (token
            shards, data/shards.py; one for files under 8 MB), this process for plain text and
            characters.
        num_workers: DataLoader workers.
        seed: seed of the training windows and the order of the validation windows.
        subset: the configuration of a hub dataset that has several (``load_dataset``'s
            ``name``), e.g. ``sample-10BT`` of ``HuggingFaceFW/fineweb-edu``.
    """

    def __init__(self, source: str = "tiny_shakespeare", tokenizer: str = "char",
                 block_size: int = 256, batch_size: int = 64,
                 short_block_size: int | None = None, short_steps: int = 0,
                 text_column: str = "text", val_fraction: float = 0.1,
                 cache_dir: str | None = None, num_proc: int | None = None, num_workers: int = 0,
                 seed: int = 1337, subset: str | None = None):
        super().__init__()
        check_tokenizer_name(tokenizer)
        if block_size < 1 or batch_size < 1:
            raise ValueError(f"block_size and batch_size must be at least 1, got {block_size} and "
                             f"{batch_size}")
        check_short_context(block_size, short_block_size, short_steps)
        self.save_hyperparameters(logger=False)  # the CLI logs the whole config

    @cached_property
    def corpus(self) -> TokenizedCorpus:
        """Tokenizes the source on first use (or finds it in the cache)."""
        hp = self.hparams
        return prepare_corpus(hp.source, hp.tokenizer, text_column=hp.text_column,
                              val_fraction=hp.val_fraction, cache_dir=hp.cache_dir,
                              num_proc=hp.num_proc, subset=hp.subset)

    @property
    def tokenizer(self):
        return self.corpus.tokenizer

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.vocab_size

    def prepare_data(self):
        self.corpus  # noqa: B018  (tokenize once, before the processes of a distributed run start)

    def setup(self, stage: str):
        need = self.hparams.block_size + 1
        for split, n in self.corpus.num_tokens.items():
            if n < need:
                raise DataSourceError(f"the {split} split of {self.hparams.source!r} has {n} "
                                      f"tokens, fewer than block_size + 1 = {need}; use a smaller "
                                      "--data.block_size or more text (or, where validation is "
                                      "the held-out share, a larger --data.val_fraction)")

    def _loader(self, dataset) -> DataLoader:
        # its own generator: making an iterator draws a seed from it, which would shift the global
        # one that dropout uses, and a resumed run (new iterator) would then differ from an
        # uninterrupted one
        return DataLoader(dataset, batch_size=None, num_workers=self.hparams.num_workers,
                          pin_memory=torch.cuda.is_available(),
                          persistent_workers=self.hparams.num_workers > 0,
                          generator=torch.Generator().manual_seed(self.hparams.seed))

    def train_dataloader(self) -> DataLoader:
        hp = self.hparams
        rank, accumulate, done = 0, 1, 0
        if self.trainer is not None:  # a resumed run's windows go on where it stopped
            rank, accumulate = self.trainer.global_rank, self.trainer.accumulate_grad_batches
            done = batches_trained(self.trainer)
        return self._loader(RandomWindows(self.corpus, "train", hp.block_size, hp.batch_size,
                                          hp.seed, rank, accumulate, done,
                                          hp.short_block_size, hp.short_steps))

    def val_dataloader(self) -> DataLoader:
        hp = self.hparams
        return self._loader(FixedWindows(self.corpus, "val", hp.block_size, hp.batch_size, hp.seed))
