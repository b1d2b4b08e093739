"""Decoding a Seq2SeqTransformer: greedy search and beam search, batched.

Both run the encoder once per batch; with ``use_cache`` (the default) the decoder feeds one token
per step, its self-attention keys and values kept in a cache and the encoder output projected for
cross-attention once. A row that has produced eos is finished: it is extended with padding, at no
cost to its score, until every row is. Results are token ids without bos and eos.
"""

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from .seq2seq import Seq2SeqTransformer


def _max_new_tokens(model: Seq2SeqTransformer, src: Tensor, max_new_tokens: int | None) -> int:
    """Default: 1.5 x the longest source + 10 (translations are rarely longer), within max_len."""
    if max_new_tokens is None:
        max_new_tokens = int(1.5 * (src != model.config.pad_id).sum(1).max().item()) + 10
    return min(max_new_tokens, model.config.max_len)


def _strip(rows: Tensor, eos_id: int) -> list[list[int]]:
    """(N, T) generated ids (no bos) -> lists cut before the first eos."""
    out = []
    for row in rows.tolist():
        out.append(row[:row.index(eos_id)] if eos_id in row else row)
    return out


def _step_logits(model, tokens: Tensor, memory: Tensor, src_mask: Tensor, cache) -> Tensor:
    """Logits (N, vocab) of the next token after ``tokens`` (N, t), feeding only what the cache has
    not seen. Padding and bos are never predicted."""
    new = tokens[:, cache.length:] if cache is not None else tokens
    logits = model.decode(new, memory, src_mask, cache)[:, -1].float()
    logits[:, [model.config.pad_id, model.config.bos_id]] = float("-inf")
    return logits


@torch.inference_mode()
def greedy_search(model: Seq2SeqTransformer, src: Tensor, max_new_tokens: int | None = None,
                  use_cache: bool = True) -> list[list[int]]:
    """src (B, S) padded source ids -> B translations (token ids), the likeliest token at each
    step."""
    c = model.config
    steps = _max_new_tokens(model, src, max_new_tokens)
    memory, src_mask = model.encode(src)
    cache = model.new_cache(src.size(1)) if use_cache else None
    tokens = torch.full((src.size(0), 1), c.bos_id, dtype=torch.long, device=src.device)
    finished = torch.zeros(src.size(0), dtype=torch.bool, device=src.device)
    for _ in range(steps):
        next_tokens = _step_logits(model, tokens, memory, src_mask, cache).argmax(-1)
        next_tokens = next_tokens.masked_fill(finished, c.pad_id)
        tokens = torch.cat([tokens, next_tokens[:, None]], dim=1)
        finished |= next_tokens == c.eos_id
        if finished.all():
            break
    return _strip(tokens[:, 1:], c.eos_id)


def length_penalty(lengths: Tensor, alpha: float) -> Tensor:
    """GNMT's ((5 + length) / 6) ** alpha: a score divided by it favours longer hypotheses as alpha
    grows (0: raw log-probabilities, which favour short ones)."""
    return ((5.0 + lengths) / 6.0) ** alpha


def beam_search(model: Seq2SeqTransformer, src: Tensor, beam_size: int = 4, alpha: float = 0.6,
                max_new_tokens: int | None = None, use_cache: bool = True) -> list[list[int]]:
    """src (B, S) -> B translations: the best of ``beam_size`` hypotheses kept per sentence at each
    step, ranked at the end by log-probability / length_penalty(length, alpha)."""
    return beam_search_alphas(model, src, beam_size, [alpha], max_new_tokens, use_cache)[alpha]


@torch.inference_mode()
def beam_search_alphas(model: Seq2SeqTransformer, src: Tensor, beam_size: int,
                       alphas: Sequence[float], max_new_tokens: int | None = None,
                       use_cache: bool = True) -> dict[float, list[list[int]]]:
    """``beam_search`` for several length penalties at the cost of one: {alpha: B translations}.

    The search ranks hypotheses by their summed log-probabilities; the length penalty only picks
    among the ``beam_size`` final ones of each sentence. So one search serves every alpha, and
    tuning alpha on a dev set costs one beam search, not one per alpha."""
    if beam_size < 1:
        raise ValueError(f"beam_size must be at least 1, got {beam_size}")
    c, (B, S), K = model.config, src.shape, beam_size
    steps = _max_new_tokens(model, src, max_new_tokens)
    # The K hypotheses of sentence b live in rows b*K .. b*K + K-1 of one (B*K, ...) batch, so
    # that one decoder call extends all of them. The encoder runs once; its output is repeated.
    memory, src_mask = model.encode(src)
    memory = memory.repeat_interleave(K, 0)  # (B*K, S, C)
    src_mask = src_mask.repeat_interleave(K, 0)  # (B*K, S)
    cache = model.new_cache(S) if use_cache else None
    tokens = torch.full((B * K, 1), c.bos_id, dtype=torch.long, device=src.device)
    finished = torch.zeros(B * K, dtype=torch.bool, device=src.device)
    scores = torch.zeros(B, K, device=src.device)  # summed log-probabilities of each hypothesis
    scores[:, 1:] = float("-inf")  # all beams start as the same hypothesis: keep one copy
    for _ in range(steps):
        # 1. Log-probabilities of every next token for every hypothesis: (B*K, V). A finished
        #    hypothesis may only go on with padding, at no cost, so it competes with its score.
        logp = F.log_softmax(_step_logits(model, tokens, memory, src_mask, cache), dim=-1)
        logp[finished] = float("-inf")
        logp[finished, c.pad_id] = 0.0
        # 2. Each sentence has K * V candidate extensions (hypothesis k, then token v), scored
        #    by the hypothesis' score plus the token's log-probability: keep the K best.
        V = logp.size(-1)
        candidates = (scores.view(B * K, 1) + logp).view(B, K * V)
        scores, index = candidates.topk(K, dim=-1)  # (B, K)
        # 3. Candidate index i is hypothesis i // V extended by token i % V: gather the parent
        #    rows (their tokens, their finished flags and their cached keys) and append the token.
        rows = (torch.arange(B, device=src.device)[:, None] * K + index // V).view(-1)  # (B*K,)
        next_tokens = (index % V).view(-1)
        tokens = torch.cat([tokens[rows], next_tokens[:, None]], dim=1)
        finished = finished[rows] | (next_tokens == c.eos_id)
        if cache is not None:
            cache.reorder(rows)
        if finished.all():
            break
    # 4. Rank each sentence's K hypotheses by score / length penalty (the length counts eos;
    #    a hypothesis that never ended counts its tokens) and keep the best, for each alpha.
    generated = tokens[:, 1:]
    is_eos = generated == c.eos_id
    ended = is_eos.any(1)
    lengths = torch.where(ended, is_eos.float().argmax(1) + 1, (generated != c.pad_id).sum(1))
    offsets = torch.arange(B, device=src.device) * K
    best = {}
    for alpha in alphas:
        final = scores.view(-1) / length_penalty(lengths.float(), alpha)
        best[alpha] = _strip(generated[final.view(B, K).argmax(-1) + offsets], c.eos_id)
    return best
