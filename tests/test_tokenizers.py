"""Tokenizers: round trips, known GPT-2 ids, save/load, errors."""

import pytest

from data import tokenizers as tokenizers_module
from data.tokenizers import CharTokenizer, GPT2Tokenizer, tokenizer_from_dict

SAMPLES = ["Hello world", "First Citizen:\nBefore we proceed any further, hear me speak.\n",
           "tabs\tand  spaces   ", "ünïcödé — emoji 🙂 and 中文", ""]


def test_char_round_trip_and_vocabulary():
    tok = CharTokenizer.from_texts(["hello ", "world\n"])
    assert tok.chars == "\n dehlorw"  # sorted, unique
    assert tok.vocab_size == 9
    ids = tok.encode("hello world\n")
    assert max(ids) < tok.vocab_size
    assert tok.decode(ids) == "hello world\n"


def test_char_unknown_character_is_a_clear_error():
    tok = CharTokenizer("abc")
    with pytest.raises(ValueError, match="not in the character vocabulary.*'xz'"):
        tok.encode("abxcz")
    with pytest.raises(ValueError, match="at least one character"):
        CharTokenizer("")


@pytest.mark.parametrize("text", SAMPLES)
def test_gpt2_round_trip(text):
    tok = GPT2Tokenizer()
    assert tok.decode(tok.encode(text)) == text


def test_gpt2_matches_the_published_encoding():
    tok = GPT2Tokenizer()
    assert tok.vocab_size == 50257 and tok.eot_token == 50256
    assert tok.encode("Hello world") == [15496, 995]
    assert tok.encode(" the") == [262]
    # the special marker in text stays ordinary text, never the end-of-text token
    assert 50256 not in tok.encode("a <|endoftext|> b")


def test_gpt2_files_with_a_wrong_hash_are_rejected(monkeypatch):
    tokenizers_module.gpt2_encoding.cache_clear()
    monkeypatch.setitem(tokenizers_module.GPT2_FILES_SHA256, "vocab.bpe", "0" * 64)
    try:
        with pytest.raises(ValueError, match="vocab.bpe does not have the sha256"):
            GPT2Tokenizer()
    finally:
        tokenizers_module.gpt2_encoding.cache_clear()


@pytest.mark.parametrize("tok", [CharTokenizer("abc \n"), GPT2Tokenizer()], ids=["char", "gpt2"])
def test_save_and_load(tok):
    again = tokenizer_from_dict(tok.to_dict())
    assert type(again) is type(tok) and again.vocab_size == tok.vocab_size
    assert again.encode("a bc\n") == tok.encode("a bc\n")


def test_unknown_tokenizer_name():
    with pytest.raises(ValueError, match="unknown tokenizer 'wordpiece'; choose one of char, gpt2"):
        tokenizer_from_dict({"name": "wordpiece"})
