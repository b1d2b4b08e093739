"""Multi-head attention: one module for causal self-attention, bidirectional
self-attention and cross-attention. Masks follow the convention in ``model/masks.py``
(boolean, True = may attend; causal aligned to the bottom right).

Options of today's models, each off by default (``MultiHeadAttention``'s arguments):

* ``n_kv_head``: grouped-query attention (GQA; Ainslie et al. 2023). Fewer key/value heads than
  query heads, each shared by a group of ``n_head / n_kv_head`` query heads; 1 is multi-query
  attention (Shazeer 2019). The KV cache shrinks by ``n_head / n_kv_head``.
* ``window``: sliding-window causal attention (Longformer, Mistral): a query sees only the
  ``window`` latest keys, itself included.
* ``qk_norm``: RMS-normalise each head's queries and keys (learned scale per dimension) before the
  scores, which keeps the logits of the softmax bounded (OLMo 2, Gemma 3, modded-nanogpt).
* rotary positions: ``forward(..., rotary=(cos, sin))`` rotates queries and keys by their positions
  (``model/rotary.py``); the model computes the angles, as only it knows the positions.

Attention paths (``attn_impl``); each serves every option above, except where it says:
-------------------------------------------------------------------------------------
* ``"naive"``: the reference, written out: scores / sqrt(d_k), masked_fill with
  -inf, softmax, dropout, @ V. The only path that can return the weights.
* ``"sdpa"``: ``F.scaled_dot_product_attention``, which picks a fused kernel
  (flash attention for causal or unmasked inputs on CPU and recent GPUs). A window
  is an explicit mask (no flash kernel then).
* ``"flash"``: a flash kernel or an error, never a silent fallback: the
  ``flash_attn`` package on CUDA where installed (fp16/bf16), else PyTorch's flash
  kernel forced with ``sdpa_kernel(SDPBackend.FLASH_ATTENTION)``. Causal or unmasked
  attention only (no key mask), and no attention dropout on CPU. A window that hides keys
  (a ``window`` shorter than the sequence) needs the ``flash_attn`` package: PyTorch's
  flash kernel takes no mask.
* ``"tiled"``: the FlashAttention algorithm (tiles, online softmax, recomputing
  backward) in readable PyTorch, skipping the tiles outside a window; see
  ``model/tiled_attention.py``. No dropout.

Each path is a function in ``ATTENTION_KERNELS``; adding one is adding an entry, and saying what it
cannot serve in ``check_attn_impl``.

Seeing the weights: ``capture_attention(model)`` (at the end of this file) records the weights of
every attention module of a model, through the reference path, during the forward passes inside its
block.
"""

import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from functools import partial

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from .masks import build_mask
from .rotary import apply_rotary
from .tiled_attention import tiled_attention

try:  # Dao-AILab's kernels, CUDA only; optional
    from flash_attn import flash_attn_func
except ImportError:
    flash_attn_func = None


def naive_attention(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, dropout_p: float = 0.0):
    """Reference attention of q (B, nh, T_q, hs) over k, v (B, n_kv, T_k, hs). Returns (output,
    weights before dropout)."""
    if k.size(1) != q.size(1):  # grouped-query: kv head h serves query heads h*g .. h*g + g - 1
        k, v = (t.repeat_interleave(q.size(1) // t.size(1), dim=1) for t in (k, v))
    # q k^T / sqrt(d_k), scaling q first: in fp16 large scores could overflow before the division
    scores = (q / math.sqrt(q.size(-1))) @ k.transpose(-2, -1)  # (B, nh, T_q, T_k)
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    weights = torch.softmax(scores.float(), dim=-1).to(q.dtype)  # softmax in fp32 under autocast
    if mask is not None:
        weights = weights.nan_to_num(0.0)  # a row with no visible key is all -inf: NaN -> 0
    dropped = F.dropout(weights, dropout_p) if dropout_p > 0 else weights
    return dropped @ v, weights  # (B, nh, T_q, hs), (B, nh, T_q, T_k)


def _naive_kernel(q, k, v, *, causal, key_mask, dropout_p, window=None):
    mask = build_mask(q.size(-2), k.size(-2), causal, key_mask, q.device, window=window)
    return naive_attention(q, k, v, mask, dropout_p)[0]


def _sdpa_kernel(q, k, v, *, causal, key_mask, dropout_p, window=None):
    T_q, T_k = q.size(-2), k.size(-2)
    gqa = k.size(1) != q.size(1)  # SDPA shares each kv head among its query heads itself
    if key_mask is None and window is None and (not causal or T_q == T_k):
        # no explicit mask: lets PyTorch pick its flash kernel
        return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, is_causal=causal,
                                              enable_gqa=gqa)
    mask = build_mask(T_q, T_k, causal, key_mask, q.device, window=window)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p,
                                          enable_gqa=gqa)


def _use_flash_attn_package(q: Tensor) -> bool:
    return flash_attn_func is not None and q.is_cuda and q.dtype in (torch.float16, torch.bfloat16)


def _flash_kernel(q, k, v, *, causal, key_mask, dropout_p, window=None):
    if key_mask is not None:
        raise ValueError("attn_impl='flash' takes causal or unmasked attention only, not a key "
                         "padding mask (flash kernels do not take arbitrary masks); use "
                         "attn_impl='sdpa' for padded batches")
    if _use_flash_attn_package(q):  # its layout is (B, T, nh, hs); its causal mask is bottom-right
        # window_size: keys (left, right) of its own that a query sees; -1 = no limit. It takes
        # fewer kv heads than query heads as they are (grouped-query attention).
        y = flash_attn_func(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                            dropout_p=dropout_p, causal=causal,
                            window_size=(window - 1, 0) if window else (-1, -1))
        return y.transpose(1, 2)
    if window is not None:
        raise ValueError(f"attn_impl='flash' masks a sliding window ({window} keys of "
                         f"{k.size(-2)}: a model's window, or a rotary model's input longer than "
                         f"block_size) only through the flash_attn package, on CUDA in fp16/bf16 "
                         f"(here: {q.dtype} on {q.device.type}); PyTorch's flash kernel takes no "
                         f"mask: use attn_impl='sdpa' or 'tiled'")
    if dropout_p > 0 and q.device.type == "cpu":
        raise ValueError("PyTorch's flash kernel on CPU has no attention dropout: set the model's "
                         "dropout to 0 or use attn_impl='sdpa'")
    T_q, T_k = q.size(-2), k.size(-2)
    mask, is_causal = None, causal
    if causal and T_q != T_k:  # is_causal aligns the triangle top-left; we need bottom-right
        # imported here, not at the top: the module imports torch._dynamo, over a second at start-up
        from torch.nn.attention.bias import causal_lower_right

        mask, is_causal = causal_lower_right(T_q, T_k), False
    try:
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p,
                                                  is_causal=is_causal,
                                                  enable_gqa=k.size(1) != q.size(1))
    except RuntimeError as e:
        raise ValueError(f"PyTorch's flash kernel cannot serve this call ({q.dtype} on "
                         f"{q.device.type}, head size {q.size(-1)}, T_q {T_q}, T_k {T_k}): "
                         f"{str(e).splitlines()[0]} On GPUs it needs fp16 or bf16 "
                         "(--trainer.precision bf16-mixed); otherwise use "
                         "attn_impl='sdpa'.") from e


def _tiled_kernel(q, k, v, *, causal, key_mask, dropout_p, window=None):
    return tiled_attention(q, k, v, causal=causal, key_mask=key_mask, window=window)


# attn_impl -> kernel(q (B, nh, T_q, hs), k, v (B, n_kv, T_k, hs), *, causal, key_mask, dropout_p,
#                     window) -> (B, nh, T_q, hs)
ATTENTION_KERNELS = {"naive": _naive_kernel, "sdpa": _sdpa_kernel, "flash": _flash_kernel,
                     "tiled": _tiled_kernel}


def check_attn_impl(attn_impl: str, *, dropout: float = 0.0, window: int | None = None,
                    key_mask: bool = False) -> None:
    """Whether ``attn_impl`` can serve attention with this ``dropout``, a sliding ``window`` and
    key padding masks (``key_mask``): the one place that says which path serves what, for a
    module and for a model's config alike. Raises ValueError naming what to choose instead. (What
    only a call can show, such as a rotary sequence longer than block_size for PyTorch's flash
    kernel, the kernels refuse when it happens.)"""
    choices = sorted(ATTENTION_KERNELS)
    if attn_impl == "auto":
        raise ValueError(f"attn_impl 'auto' is resolved for the device when training starts; in "
                         f"code, choose one of {choices} (model.device.choose_attn_impl picks "
                         f"the fastest for a device)")
    if attn_impl not in ATTENTION_KERNELS:
        raise ValueError(f"attn_impl {attn_impl!r} is unknown; choose one of {choices}")
    if attn_impl == "tiled" and dropout > 0:
        raise ValueError("attn_impl 'tiled' has no attention dropout: set dropout to 0 or use "
                         "another attn_impl")
    if attn_impl == "flash" and key_mask:
        raise ValueError("attn_impl 'flash' cannot take key padding masks (a translation model's "
                         "padded sources): use 'sdpa', which runs a fused kernel where it can, "
                         "'naive' or 'tiled'")
    if attn_impl == "flash" and window is not None and flash_attn_func is None:
        raise ValueError("attn_impl 'flash' cannot serve a window: PyTorch's flash kernel takes no "
                         "mask, and the flash_attn package (CUDA) is not installed; use attn_impl "
                         "'sdpa' or 'tiled'")


class KVCache:
    """Keys and values one attention layer has seen, kept for the next decoding steps: a
    self-attention's grow by the new tokens at each step; a cross-attention's hold the projected
    context, computed once.

    The default cache allocates buffers of ``max_len`` positions on first use, fills them in place
    and refuses more. A ``rolling`` cache keeps only the latest ``max_len`` keys and values,
    dropping the oldest: what sliding-window attention over rotary positions needs, since no later
    query sees the dropped keys and the kept ones stay valid (``model/rotary.py``).
    """

    def __init__(self, max_len: int, rolling: bool = False):
        self.max_len, self.rolling = max_len, rolling
        self.length = 0  # positions held now
        self.seen = 0  # tokens appended since the last reset: the position of the next one
        self.k = self.v = None  # (B, n_kv, max_len, hs)

    def append(self, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Store (B, n_kv, T, hs) new keys and values; return what the new queries attend to: the
        keys and values held before, then these."""
        if self.rolling:
            self.seen += k.size(2)
            if self.length:
                k, v = torch.cat([self.k, k], dim=2), torch.cat([self.v, v], dim=2)
            self.k, self.v = k[:, :, -self.max_len:], v[:, :, -self.max_len:]  # the newest only
            self.length = self.k.size(2)
            return k, v
        end = self.length + k.size(2)
        if end > self.max_len:
            raise ValueError(f"the KV cache holds {self.max_len} positions; {end} do not fit")
        if self.k is None or self.k.shape[0] != k.size(0) or self.k.dtype != k.dtype:
            B, n_kv, _, hs = k.shape
            self.k = k.new_empty(B, n_kv, self.max_len, hs)
            self.v = v.new_empty(B, n_kv, self.max_len, hs)
        self.k[:, :, self.length:end] = k
        self.v[:, :, self.length:end] = v
        self.length = self.seen = end
        return self.stored()

    def stored(self) -> tuple[Tensor, Tensor]:
        """The keys and values held now, (B, n_kv, length, hs) each."""
        return self.k[:, :, :self.length], self.v[:, :, :self.length]

    def reset(self):
        self.length = self.seen = 0

    def reorder(self, index: Tensor):
        """Keep rows ``index`` (B_new,) of the batch, in that order (beam search)."""
        if self.k is None:
            return
        if self.rolling:  # its buffers hold exactly what is stored
            self.k, self.v = self.k.index_select(0, index), self.v.index_select(0, index)
            return
        # Move only the positions filled so far, not the whole max_len buffers: beam search
        # reorders at every step, and copying all 128 positions then took 62% of its time on a CPU
        # (measured: 8.3 of 13.4 s for 300 Multi30k sentences, beam 4).
        k, v = self.stored()
        k, v = k.index_select(0, index), v.index_select(0, index)  # (B_new, n_kv, length, hs)
        if index.numel() != self.k.size(0):
            self.k = k.new_empty(index.numel(), *self.k.shape[1:])
            self.v = v.new_empty(index.numel(), *self.v.shape[1:])
        self.k[:, :, :self.length], self.v[:, :, :self.length] = k, v


class MultiHeadAttention(nn.Module):
    """Multi-head scaled dot-product attention with output projection and dropout.

    Self-attention (``cross=False``): q, k, v come from ``x`` through one fused
    projection; ``causal=True`` makes it a decoder's causal self-attention.
    Cross-attention (``cross=True``): q comes from ``x``, k and v from ``context``,
    a sequence that may have another length (the encoder output).

    ``n_kv_head`` (default n_head), ``window`` (causal self-attention only) and ``qk_norm``: see the
    top of this file.
    """

    def __init__(self, n_embd: int, n_head: int, *, n_kv_head: int | None = None,
                 dropout: float = 0.0, bias: bool = True, attn_impl: str = "sdpa",
                 causal: bool = False, cross: bool = False, window: int | None = None,
                 qk_norm: bool = False):
        super().__init__()
        n_kv_head = n_kv_head or n_head
        if n_embd % n_head != 0:
            raise ValueError(f"n_embd ({n_embd}) must be divisible by n_head ({n_head})")
        if n_head % n_kv_head != 0:
            raise ValueError(f"n_head ({n_head}) must be a multiple of n_kv_head ({n_kv_head}): "
                             f"each key/value head serves a group of n_head / n_kv_head query "
                             f"heads")
        check_attn_impl(attn_impl, dropout=dropout)
        if window is not None and (not causal or cross or window < 1):
            raise ValueError(f"window ({window}) must be at least 1, and is for causal "
                             f"self-attention only")
        self.n_head, self.n_kv_head, self.n_embd = n_head, n_kv_head, n_embd
        self.head_size = n_embd // n_head
        self.attn_impl, self.causal, self.cross, self.window = attn_impl, causal, cross, window
        kv_dim = n_kv_head * self.head_size  # C for multi-head attention, less with GQA
        if cross:
            self.q_proj = nn.Linear(n_embd, n_embd, bias=bias)
            self.kv_proj = nn.Linear(n_embd, 2 * kv_dim, bias=bias)
        else:
            self.qkv_proj = nn.Linear(n_embd, n_embd + 2 * kv_dim, bias=bias)
        self.q_norm = nn.RMSNorm(self.head_size) if qk_norm else None
        self.k_norm = nn.RMSNorm(self.head_size) if qk_norm else None
        self.out_proj = nn.Linear(n_embd, n_embd, bias=bias)
        self.attn_dropout = dropout
        self.resid_dropout = nn.Dropout(dropout)
        self.capture: Callable[[Tensor], None] | None = None  # capture_attention's: gets weights

    def _split_heads(self, t: Tensor) -> Tensor:  # (B, T, heads * hs) -> (B, heads, T, hs)
        B, T, _ = t.shape
        return t.view(B, T, -1, self.head_size).transpose(1, 2)

    def _project(self, x: Tensor, context: Tensor | None, kv_cache: KVCache | None,
                 rotary: tuple[Tensor, Tensor] | None) -> tuple[Tensor, Tensor, Tensor]:
        """q (B, nh, T_q, hs) and the keys and values it attends to, k, v (B, n_kv, T_k, hs):
        normalised (qk_norm), rotated (rotary) and joined to the cached ones."""
        C, kv_dim = self.n_embd, self.n_kv_head * self.head_size
        if self.cross:
            if rotary is not None:
                raise ValueError("rotary positions are for self-attention: a cross-attention's "
                                 "keys are another sequence's")
            q = self._norm(self._split_heads(self.q_proj(x)), self.q_norm)
            if kv_cache is not None and kv_cache.length > 0:
                return q, *kv_cache.stored()  # the context's, projected at the first step
            if context is None:
                raise ValueError("cross-attention needs a context (the sequence to attend to)")
            k, v = map(self._split_heads, self.kv_proj(context).split(kv_dim, dim=2))
            k = self._norm(k, self.k_norm)
            if kv_cache is not None:
                kv_cache.append(k, v)
            return q, k, v
        if context is not None:
            raise ValueError("self-attention takes no context; build the module with cross=True")
        q, k, v = map(self._split_heads, self.qkv_proj(x).split([C, kv_dim, kv_dim], dim=2))
        q, k = self._norm(q, self.q_norm), self._norm(k, self.k_norm)
        if rotary is not None:  # rotate by position after normalising, as Gemma 3 does
            q, k = apply_rotary(q, *rotary), apply_rotary(k, *rotary)
        if kv_cache is not None:
            k, v = kv_cache.append(k, v)  # (B, n_kv, T_past + T_q, hs)
        return q, k, v

    @staticmethod
    def _norm(t: Tensor, norm: nn.Module | None) -> Tensor:
        return t if norm is None else norm(t)

    def forward(self, x: Tensor, context: Tensor | None = None, key_mask: Tensor | None = None,
                return_weights: bool = False, kv_cache: KVCache | None = None,
                rotary: tuple[Tensor, Tensor] | None = None):
        """x: (B, T_q, C); context: (B, T_k, C), cross-attention only; key_mask: (B, T_k) bool;
        kv_cache: self-attention: the keys and values of earlier tokens, extended with these;
        cross-attention: the context's, projected on the first call (an empty cache) and reused
        after (the context may then be None); rotary: (cos, sin) of the new tokens' positions
        (``model.rotary.rotary_angles``), self-attention only.

        Returns y (B, T_q, C); with ``return_weights=True``, (y, weights (B, nh, T_q, T_k)),
        computed through the reference path whatever ``attn_impl`` is.
        """
        B, T_q, C = x.shape
        q, k, v = self._project(x, context, kv_cache, rotary)
        T_k = k.size(2)
        if key_mask is not None and (key_mask.dtype != torch.bool or key_mask.shape != (B, T_k)):
            raise ValueError(f"key_mask must be a bool tensor of shape {(B, T_k)} (True = real "
                             f"key), got {key_mask.dtype} {tuple(key_mask.shape)}")
        window = self.window
        if window is not None:
            # keys older than the first query's window are seen by no query (a rolling cache holds
            # one such key at each step): leave them out, then drop a window that hides nothing
            first = T_k - T_q - window + 1
            if first > 0:
                k, v, T_k = k[:, :, first:], v[:, :, first:], T_k - first
                key_mask = key_mask[:, first:] if key_mask is not None else None
            if window >= T_k:  # the newest query, the one the window cuts most, sees every key
                window = None
        dropout_p = self.attn_dropout if self.training else 0.0
        # a single (newest) query sees every key, unless a window hides some: no mask needed
        causal = self.causal and (T_q > 1 or window is not None)

        if return_weights or self.capture is not None:
            mask = build_mask(T_q, T_k, causal, key_mask, x.device, window=window)
            y, weights = naive_attention(q, k, v, mask, dropout_p)
            if self.capture is not None:
                self.capture(weights.detach())
        else:
            kernel = ATTENTION_KERNELS[self.attn_impl]
            y = kernel(q, k, v, causal=causal, key_mask=key_mask, dropout_p=dropout_p,
                       window=window)

        y = y.transpose(1, 2).contiguous().view(B, T_q, C)  # re-assemble the heads side by side
        y = self.resid_dropout(self.out_proj(y))
        return (y, weights) if return_weights else y


@contextmanager
def capture_attention(model: nn.Module) -> Iterator[dict[str, Tensor]]:
    """Record the attention weights of every MultiHeadAttention in ``model`` during the forward
    passes run inside the ``with`` block: they go through the reference path (whatever ``attn_impl``
    the model was built with; the outputs are the same) and the yielded dict maps each module's
    name, e.g. ``blocks.0.attn`` or ``decoder.1.cross_attn``, to its weights (B, nh, T_q, T_k) of
    the latest pass. Outside the block nothing is recorded and the fused paths run as usual.

        with capture_attention(model) as weights:
            model(idx)
        weights["blocks.0.attn"][0, 2]  # (T, T): head 2 of layer 0 for the first sequence
    """
    weights: dict[str, Tensor] = {}
    modules = {name: m for name, m in model.named_modules() if isinstance(m, MultiHeadAttention)}
    for name, module in modules.items():
        module.capture = partial(weights.__setitem__, name)
    try:
        yield weights
    finally:
        for module in modules.values():
            module.capture = None
