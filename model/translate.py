"""Translation as text in, text out: tokenize, batch by length, search (``model.search``),
detokenize; and sacreBLEU scores of the result, with the signature that says how they were
computed."""

import sys
from collections.abc import Sequence
from functools import cache

import numpy as np
import torch
from sacrebleu.metrics import BLEU

from data.batching import token_batches

from .search import beam_search_alphas, greedy_search
from .seq2seq import Seq2SeqTransformer


def translate(model: Seq2SeqTransformer, tokenizer, texts: list[str], beam_size: int = 1,
              alpha: float = 0.6, max_tokens: int = 4000, truncate: bool = False) -> list[str]:
    """Translate ``texts`` (detokenized strings in, detokenized strings out), in batches of similar
    length of at most ``max_tokens`` source tokens; beam_size 1 is greedy search, ``alpha`` the
    length penalty of beam search. The model must be in eval mode. A text longer than the model's
    ``max_len`` tokens is an error, or with ``truncate`` cut to its first ``max_len`` tokens
    (scoring a whole evaluation set: every line counts, a cut one as it comes out)."""
    return translate_alphas(model, tokenizer, texts, beam_size, [alpha], max_tokens,
                            truncate)[alpha]


def translate_alphas(model: Seq2SeqTransformer, tokenizer, texts: list[str], beam_size: int,
                     alphas: Sequence[float], max_tokens: int = 4000, truncate: bool = False
                     ) -> dict[float, list[str]]:
    """``translate`` with each length penalty of ``alphas``, from one beam search
    (``model.search.beam_search_alphas``): {alpha: translations}. Greedy search (beam_size 1)
    has no length penalty: every alpha gets its translations."""
    ids = tokenizer.encode_batch(texts)
    limit = model.config.max_len
    too_long = [i for i, row in enumerate(ids) if len(row) > limit]
    if too_long and truncate:
        print(f"{len(too_long)} of {len(texts)} sources are longer than max_len ({limit} tokens): "
              f"translating their first {limit} tokens", file=sys.stderr)
        ids = [row[:limit] for row in ids]
    elif too_long:
        first = too_long[0]
        raise ValueError(f"line {first + 1} is {len(ids[first])} tokens long; this model reads at "
                         f"most {limit} (its max_len): split it into shorter sentences")
    device = next(model.parameters()).device
    out = {alpha: [""] * len(texts) for alpha in alphas}  # an empty line translates to one
    nonempty = np.array([i for i, row in enumerate(ids) if row], dtype=np.int64)
    lengths = np.array([len(ids[i]) for i in nonempty])
    # beam search decodes beam_size rows per source: the budget is shared among them
    for batch in token_batches(lengths, max(max_tokens, limit) // beam_size):
        index = nonempty[batch]  # positions in texts of this batch's sources
        src = torch.full((len(index), max(len(ids[i]) for i in index)), model.config.pad_id)
        for row, i in enumerate(index):  # right-padded: (B, S)
            src[row, :len(ids[i])] = torch.tensor(ids[i])
        src = src.to(device)
        if beam_size == 1:
            hyps = dict.fromkeys(alphas, greedy_search(model, src))
        else:
            hyps = beam_search_alphas(model, src, beam_size, alphas)
        for alpha in alphas:
            for i, hyp in zip(index, hyps[alpha], strict=True):
                out[alpha][i] = tokenizer.decode(hyp).strip()
    return out


def bleu(hypotheses: list[str], references: list[str]) -> dict[str, float]:
    """sacreBLEU on detokenized text: the standard cased score and the lowercased one."""
    return {"bleu": BLEU().corpus_score(hypotheses, [references]).score,
            "bleu_lc": BLEU(lowercase=True).corpus_score(hypotheses, [references]).score}


@cache
def bleu_signature() -> str:
    """sacreBLEU's signature of the cased score (one reference), which says how the scores were
    computed: quote it beside them. The lowercase score's differs only in ``case:lc``."""
    metric = BLEU()
    # the signature names the number of references, known only once a score was computed
    metric.corpus_score(["a"], [["a"]])
    return str(metric.get_signature())


def bleu_by_length_penalty(model: Seq2SeqTransformer, tokenizer, sources: list[str],
                           references: list[str], beam_size: int, alphas: Sequence[float]
                           ) -> dict[float, float]:
    """The cased sacreBLEU of beam search at each length penalty of ``alphas``: {alpha: score},
    from one beam search (the alphas only rank its final hypotheses)."""
    translations = translate_alphas(model, tokenizer, sources, beam_size, alphas, truncate=True)
    return {alpha: bleu(hyps, references)["bleu"] for alpha, hyps in translations.items()}
