"""Tokenizers, tokenized corpora and Lightning data modules."""

from .corpus import DataSourceError, TokenizedCorpus, prepare_corpus
from .lm import LMDataModule
from .tokenizers import CharTokenizer, GPT2Tokenizer, tokenizer_from_dict

__all__ = ["CharTokenizer", "DataSourceError", "GPT2Tokenizer", "LMDataModule", "TokenizedCorpus",
           "prepare_corpus", "tokenizer_from_dict"]
