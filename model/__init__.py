"""Pure PyTorch models (no Lightning): masks, attention paths, the block, GPT and sampling, the
seq2seq Transformer and its decoding."""

from .attention import (
    ATTENTION_KERNELS,
    KVCache,
    MultiHeadAttention,
    capture_attention,
    naive_attention,
)
from .block import Block
from .gpt import GPT, GPTConfig
from .masks import build_mask, causal_mask
from .sampling import sample_next, top_k_filter, top_p_filter
from .search import beam_search, greedy_search
from .seq2seq import Seq2SeqConfig, Seq2SeqTransformer
from .tiled_attention import tiled_attention

__all__ = ["ATTENTION_KERNELS", "GPT", "Block", "GPTConfig", "KVCache", "MultiHeadAttention",
           "Seq2SeqConfig", "Seq2SeqTransformer", "beam_search", "build_mask", "capture_attention",
           "greedy_search", "causal_mask", "naive_attention", "sample_next", "tiled_attention",
           "top_k_filter", "top_p_filter"]
