"""The attention mask convention (the only one in this project).

Boolean masks mean **True = may attend**, as in the ``attn_mask`` of
``torch.nn.functional.scaled_dot_product_attention`` (and the opposite of the
``key_padding_mask`` of ``nn.MultiheadAttention``). Two masks are combined:

* causal: query ``i`` may attend to key ``j`` only if ``j <= i + (T_k - T_q)``.
  The triangle is aligned to the bottom right, so ``T_q`` new queries see every
  earlier key (what a KV cache needs); with ``T_q == T_k`` it is the usual
  lower triangle. With a sliding ``window`` (causal only), query ``i`` also sees
  no key older than ``window - 1`` places before its own: a band of width
  ``window`` under the diagonal.
* ``key_mask`` of shape ``(B, T_k)``: True for real keys, False for padding.

A query row that may attend to no key at all outputs zeros, on every path.
"""

import torch
from torch import Tensor

ALL = slice(None)


def causal_mask(T_q: int, T_k: int, device=None, rows: slice = ALL, cols: slice = ALL,
                window: int | None = None) -> Tensor:
    """(T_q, T_k) boolean lower triangle aligned to the bottom right, cut to a band of ``window``
    keys per query when given; or only its block ``rows x cols``."""
    q_pos = torch.arange(T_k - T_q, T_k, device=device)[rows, None]  # each query's place among keys
    k_pos = torch.arange(T_k, device=device)[None, cols]
    mask = k_pos <= q_pos
    if window is not None:
        mask = mask & (k_pos > q_pos - window)  # keys q_pos - window + 1 .. q_pos
    return mask


def build_mask(T_q: int, T_k: int, causal: bool, key_mask: Tensor | None, device=None,
               rows: slice = ALL, cols: slice = ALL, window: int | None = None) -> Tensor | None:
    """The combined mask (or its block ``rows x cols``), broadcastable to (B, nh, T_q, T_k);
    None when every key is visible. ``window`` applies to causal masks only."""
    mask = causal_mask(T_q, T_k, device, rows, cols, window) if causal else None
    if key_mask is not None:
        keys = key_mask[:, None, None, cols]  # (B, 1, 1, T_k)
        mask = keys if mask is None else mask & keys
    return mask
