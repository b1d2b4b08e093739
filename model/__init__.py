"""Pure PyTorch models (no Lightning): attention, GPT."""

from .attention import ATTENTION_KERNELS, MultiHeadAttention, build_mask, causal_mask, naive_attention
from .gpt import GPT, Block, GPTConfig

__all__ = ["ATTENTION_KERNELS", "GPT", "Block", "GPTConfig", "MultiHeadAttention", "build_mask", "causal_mask",
           "naive_attention"]
