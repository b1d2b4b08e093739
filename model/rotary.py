"""Rotary position embeddings (RoPE; Su et al. 2021, "RoFormer"), as in Llama, Mistral, Gemma and
nanochat.

GPT-2 adds a learned vector per position to each token's embedding: a table of block_size rows,
so the model cannot read position block_size or later. RoPE adds nothing to the embeddings;
instead, inside every attention layer, it turns each query and key by an angle that grows with its
position:

* a head's vector of size hs is taken as hs/2 pairs of numbers, each pair a point in a plane;
  here pair i is (x[i], x[i + hs/2]), the two halves of the vector side by side;
* pair i of the vector at position p turns by the angle p * freq_i, with
  freq_i = theta ** (-2i / hs): the first pairs turn fast (one radian per position), the last
  ones slowly (theta = 10000: a full turn every ~60,000 positions);
* turning q (at position m) by R(m) and k (at position n) by R(n) makes their dot product
  q · R(n - m) k: the score depends on the distance n - m, never on m or n alone.

So attention sees *relative* positions. A key rotated once, when its token arrived, stays right for
every later query: a KV cache can keep keys however far along the sequence has gone, drop the
oldest and slide (``KVCache(rolling=True)``), which learned positions cannot do.
"""

import torch
from torch import Tensor


def rotary_angles(positions: Tensor, head_size: int, theta: float = 10000.0):
    """cos and sin of the rotation angles, (T, hs) each, for the (T,) integer ``positions``: column
    i and column i + hs/2 hold pair i's angle, laid out as the pairs are."""
    freq = theta ** (-torch.arange(0, head_size, 2, device=positions.device) / head_size)
    angles = positions.float()[:, None] * freq[None, :]  # (T, hs/2): position p, pair i -> p*freq_i
    angles = torch.cat([angles, angles], dim=-1)  # (T, hs)
    return angles.cos(), angles.sin()


def apply_rotary(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Turn each pair (x[i], x[i + hs/2]) of x (B, nh, T, hs) by its angle; cos, sin: (T, hs).
    Computed in fp32, returned in x's dtype.

    The 2D rotation of a pair (a, b) by angle t is (a cos t - b sin t, a sin t + b cos t): for all
    pairs at once, x * cos + (-b, a) * sin, where (-b, a) swaps the halves and negates the first.
    """
    x32 = x.float()
    first, second = x32.chunk(2, dim=-1)  # (B, nh, T, hs/2) each: the pairs' two coordinates
    swapped = torch.cat([-second, first], dim=-1)
    return (x32 * cos + swapped * sin).to(x.dtype)
