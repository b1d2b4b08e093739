"""Pure PyTorch models (no Lightning): masks, attention paths, GPT."""

from .attention import ATTENTION_KERNELS, MultiHeadAttention, naive_attention
from .gpt import GPT, Block, GPTConfig
from .masks import build_mask, causal_mask
from .tiled_attention import tiled_attention

__all__ = ["ATTENTION_KERNELS", "GPT", "Block", "GPTConfig", "MultiHeadAttention", "build_mask", "causal_mask",
           "naive_attention", "tiled_attention"]
