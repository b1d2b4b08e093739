"""Pure PyTorch models (no Lightning): masks, attention paths, GPT, sampling."""

from .attention import ATTENTION_KERNELS, KVCache, MultiHeadAttention, naive_attention
from .gpt import GPT, Block, GPTConfig
from .masks import build_mask, causal_mask
from .sampling import sample_next, top_k_filter, top_p_filter
from .tiled_attention import tiled_attention

__all__ = ["ATTENTION_KERNELS", "GPT", "Block", "GPTConfig", "KVCache", "MultiHeadAttention", "build_mask",
           "causal_mask", "naive_attention", "sample_next", "tiled_attention", "top_k_filter", "top_p_filter"]
