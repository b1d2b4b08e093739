"""The transformer block both models are built from: pre-norm sublayers, each added to the
residual stream.

* GPT and the seq2seq decoder: causal self-attention, MLP (the decoder adds cross-attention between
  them).
* The seq2seq encoder: bidirectional self-attention (with a key padding mask), MLP.

The block's norm is GPT-2's LayerNorm or RMSNorm, and its MLP a GELU (exact, or the tanh
approximation the published GPT-2 weights were trained with), the squared ReLU of modded-nanogpt
and nanochat, or LLaMA's SwiGLU (``NORMS``, ``MLPS``).
"""

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.autograd.function import once_differentiable

from .attention import KVCache, MultiHeadAttention, check_attn_impl

NORMS = ("layernorm", "rmsnorm")
MLPS = ("gelu", "gelu_tanh", "relu2", "swiglu")
POS_EMBS = ("learned", "rope")  # a table added to the embeddings, or rotary (model/rotary.py)


def check_config(config, positive: tuple[str, ...], key_mask: bool = False) -> None:
    """The checks every model config needs: ``positive`` fields >= 1, heads dividing the width,
    dropout in [0, 1), a known norm, MLP and position encoding, and an attention path that can
    serve it (``check_attn_impl``; ``key_mask``: the model's attention masks padded keys). Raises
    ValueError naming the field and the fix."""
    name = type(config).__name__
    for field, choices in (("norm", NORMS), ("mlp", MLPS), ("pos_emb", POS_EMBS)):
        value = getattr(config, field, choices[0])
        if value not in choices:
            raise ValueError(f"{name}.{field} {value!r} is unknown; choose one of {list(choices)}")
    for field in positive:
        if getattr(config, field) < 1:
            raise ValueError(f"{name}.{field} must be at least 1, got {getattr(config, field)}")
    if config.n_embd % config.n_head != 0:
        raise ValueError(f"{name}.n_embd ({config.n_embd}) must be divisible by n_head "
                         f"({config.n_head}): each head gets n_embd / n_head dimensions")
    n_kv_head = config.n_kv_head
    if n_kv_head is not None and not (1 <= n_kv_head <= config.n_head
                                      and config.n_head % n_kv_head == 0):
        raise ValueError(f"{name}.n_kv_head ({n_kv_head}) must divide n_head ({config.n_head}): "
                         f"each key/value head serves n_head / n_kv_head query heads (None: as "
                         f"many as n_head, 1: multi-query attention)")
    if getattr(config, "pos_emb", "learned") == "rope" and (config.n_embd // config.n_head) % 2:
        raise ValueError(f"{name}.pos_emb 'rope' rotates pairs of dimensions: the head size "
                         f"n_embd / n_head ({config.n_embd // config.n_head}) must be even")
    if getattr(config, "rope_theta", 1.0) <= 0:
        raise ValueError(f"{name}.rope_theta must be positive, got {config.rope_theta}")
    if not 0.0 <= config.dropout < 1.0:
        raise ValueError(f"{name}.dropout must be in [0, 1), got {config.dropout}")
    check_attn_impl(config.attn_impl, dropout=config.dropout,
                    window=getattr(config, "window", None), key_mask=key_mask)


def init_weights(model: nn.Module, n_layer: int, std: float = 0.02,
                 zero_out_proj: bool = False) -> None:
    """GPT-2's initialisation: N(0, std) weights (0.02 in GPT-2), zero biases, and the projections
    that write into the residual stream (``out_proj``) scaled down by 1/sqrt(2 * n_layer), n_layer
    blocks adding to one stream. ``zero_out_proj``: those projections start at zero instead
    (modded-nanogpt), so that every block starts as the identity and the stream as the embedding;
    their gradients are not zero, so they move at the first step."""
    def init(module: nn.Module):
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=std)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    model.apply(init)
    for name, p in model.named_parameters():
        if name.endswith("out_proj.weight"):
            if zero_out_proj:
                nn.init.zeros_(p)
            else:
                nn.init.normal_(p, mean=0.0, std=std / math.sqrt(2 * n_layer))


def make_norm(norm: str, n_embd: int, bias: bool) -> nn.Module:
    """LayerNorm (centre, scale to unit variance, gain and bias) or RMSNorm (scale to unit root mean
    square, gain only: no mean to subtract, one reduction fewer)."""
    return nn.LayerNorm(n_embd, bias=bias) if norm == "layernorm" else nn.RMSNorm(n_embd)


def mlp_hidden_size(mlp: str, n_embd: int) -> int:
    """The hidden width: 4 * n_embd; SwiGLU's two input matrices get 2/3 of it each (rounded up
    to a multiple of 8), so that its MLP has about as many weights as the others'."""
    if mlp == "swiglu":
        return 8 * math.ceil(8 * n_embd / 3 / 8)
    return 4 * n_embd


class ReLUSquared(torch.autograd.Function):
    """relu(h)^2 with its backward written out: the gradient is 2 relu(h), which the forward pass
    already holds. Autograd through ``F.relu(h).square()`` computes it with a general ``pow`` and
    a second pass for relu's mask, a few percent of a CPU training step of a small model."""

    @staticmethod
    def forward(ctx, h: Tensor) -> Tensor:
        r = F.relu(h)
        ctx.save_for_backward(r)
        return r * r

    @staticmethod
    @once_differentiable  # (a second derivative through it raises rather than comes out wrong)
    def backward(ctx, grad: Tensor) -> Tensor:
        r, = ctx.saved_tensors
        return grad * r * 2  # zero where h <= 0, as relu's mask would make it


class MLP(nn.Module):
    """out_proj(act(fc(x))): act is GELU (``gelu``; ``gelu_tanh``: its tanh approximation, which
    GPT-2 used and its weights expect, Hugging Face's "gelu_new") or relu(.)^2 (``relu2``: as cheap
    as ReLU, smooth at 0 and sparse). ``swiglu``: fc makes two vectors, and silu(gate) * up goes
    on."""

    def __init__(self, n_embd: int, hidden: int, dropout: float, bias: bool, mlp: str = "gelu"):
        super().__init__()
        self.kind = mlp
        self.fc = nn.Linear(n_embd, 2 * hidden if mlp == "swiglu" else hidden, bias=bias)
        self.out_proj = nn.Linear(hidden, n_embd, bias=bias)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: Tensor) -> Tensor:
        h = self.fc(x)  # (B, T, hidden), or (B, T, 2 * hidden) for SwiGLU
        if self.kind == "gelu":
            h = F.gelu(h)
        elif self.kind == "gelu_tanh":
            h = F.gelu(h, approximate="tanh")
        elif self.kind == "relu2":
            h = ReLUSquared.apply(h)
        else:
            gate, up = h.chunk(2, dim=-1)
            h = F.silu(gate) * up
        return self.dropout(self.out_proj(h))


class Block(nn.Module):
    """x + attn(ln(x)), then (cross=True) x + cross_attn(ln(x), context), then x + mlp(ln(x)).

    ``norm`` and ``mlp``: see ``NORMS`` and ``MLPS``; ``mlp_hidden`` defaults to
    ``mlp_hidden_size``; ``attn_impl`` is one of
    ``model.attention.ATTENTION_KERNELS``; ``n_kv_head`` and ``qk_norm`` apply to both attentions,
    ``window`` to the self-attention (``model.attention.MultiHeadAttention``).
    """

    def __init__(self, n_embd: int, n_head: int, *, n_kv_head: int | None = None,
                 dropout: float = 0.0, bias: bool = True, attn_impl: str = "sdpa", causal: bool,
                 cross: bool = False, mlp_hidden: int | None = None, window: int | None = None,
                 qk_norm: bool = False, norm: str = "layernorm", mlp: str = "gelu"):
        super().__init__()
        attn_args = dict(n_kv_head=n_kv_head, dropout=dropout, bias=bias, attn_impl=attn_impl,
                         qk_norm=qk_norm)
        self.ln_1 = make_norm(norm, n_embd, bias)
        self.attn = MultiHeadAttention(n_embd, n_head, causal=causal, window=window, **attn_args)
        self.ln_cross = make_norm(norm, n_embd, bias) if cross else None
        self.cross_attn = (MultiHeadAttention(n_embd, n_head, cross=True, **attn_args) if cross
                           else None)
        self.ln_2 = make_norm(norm, n_embd, bias)
        self.mlp = MLP(n_embd, mlp_hidden or mlp_hidden_size(mlp, n_embd), dropout, bias, mlp)

    def forward(self, x: Tensor, key_mask: Tensor | None = None, kv_cache: KVCache | None = None,
                context: Tensor | None = None, context_mask: Tensor | None = None,
                context_cache: KVCache | None = None,
                rotary: tuple[Tensor, Tensor] | None = None) -> Tensor:
        """x: (B, T, C); key_mask: (B, T_keys) for the self-attention; kv_cache: its keys and values
        so far; rotary: its (cos, sin) of the tokens' positions. Cross-attention: context (B, S, C),
        context_mask (B, S), context_cache (its projected keys and values, filled on the first call
        and reused after)."""
        x = x + self.attn(self.ln_1(x), key_mask=key_mask, kv_cache=kv_cache, rotary=rotary)
        if self.cross_attn is not None:
            x = x + self.cross_attn(self.ln_cross(x), context, key_mask=context_mask,
                                    kv_cache=context_cache)
        return x + self.mlp(self.ln_2(x))
