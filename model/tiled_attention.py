"""Tiled attention with an online softmax: the FlashAttention algorithm in plain PyTorch.

The reference path computes the whole (T_q, T_k) score matrix. Here queries and keys
are taken in tiles, and for each tile of queries a running row maximum ``m``, softmax
normaliser ``l`` and unnormalised output ``acc`` are updated one tile of keys at a time:

    s     = q_tile k_tileᵀ / √d                   scores of this pair of tiles only
    m_new = max(m, rowmax(s))
    p     = exp(s - m_new)
    l     = exp(m - m_new) · l + rowsum(p)          rescale what was summed so far
    acc   = exp(m - m_new) · acc + p v_tile
    out   = acc / l                                 after the last tile of keys

so no T_q x T_k matrix is ever held and memory grows linearly with T. The backward pass
keeps only ``out`` and the log-sum-exp ``lse = m + log l`` of each row and recomputes
each tile's probabilities from them (FlashAttention-2's backward):

    p  = exp(s - lse)
    dv += pᵀ do,   dp = do vᵀ,   ds = p ∘ (dp - rowsum(do ∘ out)),
    dq += ds k / √d,   dk += dsᵀ q / √d

Tiles that no query of a tile may see are never visited: with a causal mask, the key tiles past the
query tile (half the pairs); with a sliding window of w keys, also those wholly older than the
window. A query tile then visits about w / tile + 1 key tiles whatever T is, so time, like memory,
grows linearly with T: local attention (Longformer, Mistral) in the same loop.

Written for reading and for proving the algorithm (tests check it against the reference);
the Python loop over tiles makes it slower than the fused kernels. It has no dropout.
Masks follow ``model/masks.py``. All arithmetic is in fp32, whatever the input dtype.
"""

import torch
from torch import Tensor

from .masks import build_mask

NEG_INF = float("-inf")


def _tiles(n: int, size: int):
    return [(start, min(start + size, n)) for start in range(0, n, size)]


def _visible_key_tiles(i0: int, i1: int, T_q: int, T_k: int, causal: bool, window: int | None,
                       tile: int):
    """The key tiles that queries i0 .. i1 - 1 may see, on the same grid of ``tile`` keys: with a
    causal mask, none past the newest query's key i1 - 1 + (T_k - T_q); with a window, none wholly
    before the oldest query's first key i0 + (T_k - T_q) - window + 1."""
    end = min(T_k, i1 + T_k - T_q) if causal else T_k
    begin = max(0, i0 + T_k - T_q - window + 1) if causal and window is not None else 0
    first = begin // tile * tile  # the tile that holds key `begin`
    return [(j0, min(j0 + tile, end)) for j0 in range(first, max(end, 0), tile)]


def _scores(q_tile, k_tile, scale, mask):
    s = (q_tile @ k_tile.transpose(-2, -1)) * scale  # (B, nh, tq, tk)
    return s if mask is None else s.masked_fill(~mask, NEG_INF)


class TiledAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, causal: bool, key_mask, window: int | None, tile: int):
        B, nh, T_q, hs = q.shape
        T_k, scale = k.size(2), hs ** -0.5
        out = torch.zeros(B, nh, T_q, hs, device=q.device, dtype=torch.float32)
        lse = torch.full((B, nh, T_q), NEG_INF, device=q.device, dtype=torch.float32)
        with torch.autocast(q.device.type, enabled=False):
            for i0, i1 in _tiles(T_q, tile):  # one tile of queries at a time...
                q_tile = q[:, :, i0:i1].float()
                m = torch.full((B, nh, i1 - i0), NEG_INF, device=q.device)  # running row maximum
                l = torch.zeros(B, nh, i1 - i0, device=q.device)  # running softmax normaliser
                acc = torch.zeros(B, nh, i1 - i0, hs, device=q.device)  # unnormalised output
                # ...over the key tiles they may see
                for j0, j1 in _visible_key_tiles(i0, i1, T_q, T_k, causal, window, tile):
                    mask = build_mask(T_q, T_k, causal, key_mask, q.device, slice(i0, i1),
                                      slice(j0, j1), window)
                    s = _scores(q_tile, k[:, :, j0:j1].float(), scale, mask)
                    # a larger maximum shrinks everything summed so far by exp(m - m_new)
                    m_new = torch.maximum(m, s.amax(-1))
                    m_safe = m_new.masked_fill(m_new == NEG_INF, 0.0)  # rows that saw no key yet
                    p = torch.exp(s - m_safe[..., None])
                    rescale = torch.exp(m - m_safe)
                    l = rescale * l + p.sum(-1)
                    acc = rescale[..., None] * acc + p @ v[:, :, j0:j1].float()
                    m = m_new
                # normalise once at the end; keep log-sum-exp per row for the backward pass
                seen = l > 0  # a row that may see no key keeps out = 0 and lse = -inf
                l_safe = l.clamp_min(1e-30)
                out[:, :, i0:i1] = torch.where(seen[..., None], acc / l_safe[..., None], 0.0)
                lse[:, :, i0:i1] = torch.where(seen, m + torch.log(l_safe), NEG_INF)
        ctx.save_for_backward(q, k, v, out, lse, key_mask)  # no (T_q, T_k) matrix is kept
        ctx.causal, ctx.window, ctx.tile = causal, window, tile
        return out.to(q.dtype)

    @staticmethod
    def backward(ctx, d_out):
        q, k, v, out, lse, key_mask = ctx.saved_tensors
        causal, window, tile = ctx.causal, ctx.window, ctx.tile
        T_q, T_k, scale = q.size(2), k.size(2), q.size(-1) ** -0.5
        dq = torch.zeros_like(q, dtype=torch.float32)
        dk = torch.zeros_like(k, dtype=torch.float32)
        dv = torch.zeros_like(v, dtype=torch.float32)
        with torch.autocast(q.device.type, enabled=False):
            d_out = d_out.float()
            # The softmax's gradient needs, per query row, the sum over keys of p * dp, which is
            # rowsum(do * out) (out = p v): computed once here, it spares a first pass over keys.
            delta = (d_out * out).sum(-1)  # (B, nh, T_q)
            lse = lse.masked_fill(lse == NEG_INF, 0.0)  # those rows' scores are all -inf: p = 0
            for i0, i1 in _tiles(T_q, tile):
                q_tile, do_tile = q[:, :, i0:i1].float(), d_out[:, :, i0:i1]
                for j0, j1 in _visible_key_tiles(i0, i1, T_q, T_k, causal, window, tile):
                    k_tile, v_tile = k[:, :, j0:j1].float(), v[:, :, j0:j1].float()
                    mask = build_mask(T_q, T_k, causal, key_mask, q.device, slice(i0, i1),
                                      slice(j0, j1), window)
                    # 1. recompute this tile's probabilities exactly: p = exp(s - lse)
                    p = torch.exp(_scores(q_tile, k_tile, scale, mask) - lse[:, :, i0:i1, None])
                    # 2. out = p v, so the values' gradient collects pᵀ do from every query tile
                    dv[:, :, j0:j1] += p.transpose(-2, -1) @ do_tile
                    # 3. through the softmax: ds = p * (dp - delta), with dp = do vᵀ
                    ds = p * (do_tile @ v_tile.transpose(-2, -1) - delta[:, :, i0:i1, None])
                    # 4. through s = q kᵀ * scale: to the queries and to the keys
                    dq[:, :, i0:i1] += (ds @ k_tile) * scale
                    dk[:, :, j0:j1] += (ds.transpose(-2, -1) @ q_tile) * scale
        return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), None, None, None, None


def tiled_attention(q: Tensor, k: Tensor, v: Tensor, causal: bool = False,
                    key_mask: Tensor | None = None, window: int | None = None,
                    tile: int = 128) -> Tensor:
    """Attention of q (B, nh, T_q, hs) over k, v (B, n_kv, T_k, hs), ``tile`` queries x ``tile``
    keys at a time; ``window``: sliding-window causal attention. With fewer key/value heads than
    query heads (grouped-query attention), each is repeated for its group of query heads first."""
    if k.size(1) != q.size(1):
        k, v = (t.repeat_interleave(q.size(1) // t.size(1), dim=1) for t in (k, v))
    return TiledAttention.apply(q, k, v, causal, key_mask, window, tile)
