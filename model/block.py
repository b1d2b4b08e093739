"""The transformer block both models are built from: pre-LayerNorm sublayers, each added to the residual stream.

* GPT and the seq2seq decoder: causal self-attention, MLP (the decoder adds cross-attention between them).
* The seq2seq encoder: bidirectional self-attention (with a key padding mask), MLP.
"""

from torch import Tensor, nn

from .attention import KVCache, MultiHeadAttention


class MLP(nn.Module):
    def __init__(self, n_embd: int, hidden: int, dropout: float, bias: bool):
        super().__init__()
        self.fc = nn.Linear(n_embd, hidden, bias=bias)
        self.gelu = nn.GELU()
        self.out_proj = nn.Linear(hidden, n_embd, bias=bias)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: Tensor) -> Tensor:
        return self.dropout(self.out_proj(self.gelu(self.fc(x))))


class Block(nn.Module):
    """x + attn(ln(x)), then (cross=True) x + cross_attn(ln(x), context), then x + mlp(ln(x)).

    ``mlp_hidden`` defaults to 4 * n_embd; ``attn_impl`` is one of ``model.attention.ATTENTION_KERNELS``.
    """

    def __init__(self, n_embd: int, n_head: int, *, dropout: float = 0.0, bias: bool = True, attn_impl: str = "sdpa",
                 causal: bool, cross: bool = False, mlp_hidden: int | None = None):
        super().__init__()
        attn_args = dict(dropout=dropout, bias=bias, attn_impl=attn_impl)
        self.ln_1 = nn.LayerNorm(n_embd, bias=bias)
        self.attn = MultiHeadAttention(n_embd, n_head, causal=causal, **attn_args)
        if cross:
            self.ln_cross = nn.LayerNorm(n_embd, bias=bias)
            self.cross_attn = MultiHeadAttention(n_embd, n_head, cross=True, **attn_args)
        self.ln_2 = nn.LayerNorm(n_embd, bias=bias)
        self.mlp = MLP(n_embd, mlp_hidden or 4 * n_embd, dropout, bias)

    def forward(self, x: Tensor, key_mask: Tensor | None = None, kv_cache: KVCache | None = None,
                context: Tensor | None = None, context_mask: Tensor | None = None,
                context_cache: KVCache | None = None) -> Tensor:
        """x: (B, T, C); key_mask: (B, T_keys) for the self-attention; kv_cache: its keys and values so far.
        Cross-attention: context (B, S, C), context_mask (B, S), context_cache (its projected keys and values,
        filled on the first call and reused after)."""
        x = x + self.attn(self.ln_1(x), key_mask=key_mask, kv_cache=kv_cache)
        if hasattr(self, "cross_attn"):
            x = x + self.cross_attn(self.ln_cross(x), context, key_mask=context_mask, kv_cache=context_cache)
        return x + self.mlp(self.ln_2(x))
