"""Batches of sequences of similar length under a token budget: for training on translation pairs
(``data.translation.PairBatches``) and for translating a file (``model.translate``)."""

import numpy as np


def token_batches(lengths: np.ndarray, max_tokens: int, rng: np.random.Generator | None = None
                  ) -> list[np.ndarray]:
    """Indices grouped into batches of similar length, each at most ``max_tokens`` once padded
    (rows x longest row). With ``rng``: ties in length broken at random and the batches shuffled."""
    tiebreak = rng.random(len(lengths)) if rng is not None else np.arange(len(lengths))
    order = np.lexsort((tiebreak, lengths))  # by length, then by tiebreak
    # walk the sorted indices, closing a batch when one more row (padded to the longest so far,
    # which is the newest: the order is ascending) would pass the budget
    batches, start = [], 0
    for end in range(1, len(order) + 1):
        if end == len(order) or (end + 1 - start) * lengths[order[end]] > max_tokens:
            batches.append(order[start:end])
            start = end
    if rng is not None:
        rng.shuffle(batches)
    return batches
