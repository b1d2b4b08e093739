"""The encoder-decoder Transformer: cross-attention shapes, masking, decoding, and learning a
task."""

import itertools

import pytest
import torch

from model import Seq2SeqConfig, Seq2SeqTransformer, beam_search, greedy_search
from model.search import beam_search_alphas, length_penalty

PAD = 0
IMPLS = ["naive", "sdpa", "tiled"]


def make_model(attn_impl: str = "sdpa", seed: int = 0, **overrides) -> Seq2SeqTransformer:
    torch.manual_seed(seed)
    shape = dict(vocab_size=40, max_len=24, n_encoder_layer=2, n_decoder_layer=2, n_head=4, n_embd=32,
                 mlp_hidden=64, dropout=0.0, attn_impl=attn_impl)
    return Seq2SeqTransformer(Seq2SeqConfig(**{**shape, **overrides})).eval()


def padded_batch(lengths: list[int], width: int, seed: int = 0) -> torch.Tensor:
    """Random token ids (4..39, no specials), row i real for lengths[i] positions, then padding."""
    g = torch.Generator().manual_seed(seed)
    src = torch.randint(4, 40, (len(lengths), width), generator=g)
    for i, n in enumerate(lengths):
        src[i, n:] = PAD
    return src


@pytest.mark.parametrize("B,S,T", [(1, 1, 1), (2, 7, 3), (3, 4, 11), (5, 12, 12)])
def test_cross_attention_shapes_with_source_and_target_of_different_lengths(B, S, T):
    model = make_model()
    src, tgt = padded_batch([S] * B, S), padded_batch([T] * B, T, seed=1)
    logits, loss = model(src, tgt, tgt)
    assert logits.shape == (B, T, 40) and loss.shape == ()
    memory, src_mask = model.encode(src)
    assert memory.shape == (B, S, 32) and src_mask.shape == (B, S)
    cross = model.decoder[0].cross_attn
    _, weights = cross(torch.randn(B, T, 32), memory, key_mask=src_mask, return_weights=True)
    assert weights.shape == (B, 4, T, S)  # target queries x source keys, per head


@pytest.mark.parametrize("impl", IMPLS)
def test_padding_the_source_further_changes_no_output(impl):
    """The same sentences padded to 6 or to 10 positions: identical logits (padding is
    invisible)."""
    model = make_model(impl)
    src = padded_batch([6, 3], 6)
    wider = torch.cat([src, torch.full((2, 4), PAD)], dim=1)
    tgt = padded_batch([5, 5], 5, seed=1)
    torch.testing.assert_close(model(wider, tgt)[0], model(src, tgt)[0], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("impl", IMPLS)
def test_content_at_padded_source_positions_changes_no_output(impl):
    """Whatever the encoder output holds at padded positions, cross-attention gives it no weight."""
    model = make_model(impl)
    src, tgt = padded_batch([6, 3], 6), padded_batch([5, 5], 5, seed=1)
    memory, src_mask = model.encode(src)
    garbage = memory.masked_fill(~src_mask[..., None], 0.0) + 100.0 * torch.randn_like(memory) * ~src_mask[..., None]
    torch.testing.assert_close(model.decode(tgt, garbage, src_mask), model.decode(tgt, memory, src_mask))


@pytest.mark.parametrize("impl", IMPLS)
def test_a_later_target_token_changes_no_earlier_logit(impl):
    model = make_model(impl)
    src, tgt = padded_batch([7, 4], 7), padded_batch([9, 9], 9, seed=1)
    base = model(src, tgt)[0]
    for t in range(8):
        changed = tgt.clone()
        changed[:, t + 1:] = torch.randint(4, 40, changed[:, t + 1:].shape)
        logits = model(src, changed)[0]
        torch.testing.assert_close(logits[:, :t + 1], base[:, :t + 1], atol=1e-5, rtol=1e-5)
        assert not torch.allclose(logits[:, t + 1:], base[:, t + 1:])  # the test can fail


@pytest.mark.parametrize("impl", IMPLS)
def test_an_all_padding_source_row_gives_no_nan_and_leaves_other_rows_alone(impl):
    model = make_model(impl)
    src, tgt = padded_batch([5, 0], 5), padded_batch([4, 4], 4, seed=1)
    logits, loss = model(src, tgt, tgt)
    assert torch.isfinite(logits).all() and torch.isfinite(loss)
    torch.testing.assert_close(logits[:1], model(src[:1, :5], tgt[:1])[0], atol=1e-5, rtol=1e-5)
    loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def test_loss_ignores_padding_and_smooths_labels():
    model = make_model(label_smoothing=0.0)
    src, tgt = padded_batch([5, 5], 5), padded_batch([4, 2], 4, seed=1)
    logits, loss = model(src, tgt, tgt)
    real = tgt != PAD
    expected = torch.nn.functional.cross_entropy(logits[real], tgt[real])
    torch.testing.assert_close(loss, expected)
    smoothed = make_model(label_smoothing=0.1)(src, tgt, tgt)[1]
    assert smoothed > loss  # the same weights (same seed): smoothing adds the spread term


def test_word_dropout_zeroes_whole_tokens_while_training_and_nothing_in_eval():
    model = make_model(word_dropout=0.5)
    src = padded_batch([20, 20], 20)
    positions = model.enc_pos(torch.arange(20))
    tokens = model.tok_emb(src)  # (B, S, C)
    model.train()
    torch.manual_seed(0)
    dropped = model._embed(src, model.enc_pos, 0, "the source")[0] - positions  # (B, S, C)
    zeroed = dropped.abs().amax(-1) < 1e-6  # (B, S): a token's every channel, or none
    kept = torch.isclose(dropped, 2 * tokens, atol=1e-6).all(-1)  # the rest scaled by 1 / (1 - p)
    assert (zeroed ^ kept).all() and 10 <= zeroed.sum() <= 30  # ~20 of 40 dropped
    model.eval()  # decoding: every token, unscaled, as a model without word dropout
    plain = make_model()
    plain.load_state_dict(model.state_dict())
    tgt = padded_batch([6, 3], 6, seed=1)
    torch.testing.assert_close(model(src, tgt)[0], plain(src, tgt)[0])
    with pytest.raises(ValueError, match="word_dropout must be in"):
        make_model(word_dropout=1.0)


@pytest.mark.parametrize("impl", IMPLS)
def test_cached_decoding_equals_uncached(impl):
    model = make_model(impl, seed=3)
    src = padded_batch([7, 2, 5], 7)
    assert greedy_search(model, src, max_new_tokens=12) == greedy_search(model, src, 12, use_cache=False)
    assert beam_search(model, src, 3, max_new_tokens=12) == beam_search(model, src, 3, max_new_tokens=12,
                                                                         use_cache=False)
    # and the cached logits themselves, step by step, against the full recomputation
    memory, src_mask = model.encode(src)
    tgt = padded_batch([6, 6, 6], 6, seed=2)
    cache = model.new_cache(src.size(1))
    steps = torch.cat([model.decode(tgt[:, t:t + 1], memory, src_mask, cache) for t in range(6)], dim=1)
    torch.testing.assert_close(steps, model.decode(tgt, memory, src_mask), atol=1e-5, rtol=1e-5)


def test_beam_search_of_one_beam_is_greedy_search():
    for seed in range(3):
        model = make_model(seed=seed)
        src = padded_batch([6, 3, 6, 1], 6, seed=seed)
        assert beam_search(model, src, beam_size=1, max_new_tokens=15) == greedy_search(model, src, 15)


def test_finished_rows_stay_finished_and_results_stop_before_eos():
    model = make_model(seed=1)
    src = padded_batch([6, 6, 6, 6, 6, 6], 6, seed=4)
    for hyps in (greedy_search(model, src, 20), beam_search(model, src, 3, max_new_tokens=20)):
        for hyp in hyps:
            assert model.config.eos_id not in hyp and model.config.pad_id not in hyp
            assert model.config.bos_id not in hyp and len(hyp) <= 20


# the recipe's options (rotary positions in both self-attentions, QK-norm, RMSNorm, squared ReLU
# or SwiGLU): the masking and caching properties above hold with them too
RECIPES = {"rope-qknorm-rmsnorm-relu2": dict(pos_emb="rope", qk_norm=True, norm="rmsnorm", mlp="relu2"),
           "rope-swiglu": dict(pos_emb="rope", mlp="swiglu")}


@pytest.mark.parametrize("options", RECIPES.values(), ids=RECIPES.keys())
def test_recipe_options_keep_masking_causality_and_caching(options):
    model = make_model(seed=2, **options)
    assert model.enc_pos is None and model.dec_pos is None  # rotary: no position tables
    src, tgt = padded_batch([6, 3], 6), padded_batch([7, 7], 7, seed=1)
    logits = model(src, tgt)[0]
    wider = torch.cat([src, torch.full((2, 3), PAD)], dim=1)
    torch.testing.assert_close(model(wider, tgt)[0], logits, atol=1e-5, rtol=1e-5)
    changed = tgt.clone()
    changed[:, 4:] = torch.randint(4, 40, changed[:, 4:].shape)
    torch.testing.assert_close(model(src, changed)[0][:, :4], logits[:, :4], atol=1e-5, rtol=1e-5)
    memory, src_mask = model.encode(src)
    cache = model.new_cache(src.size(1))
    steps = torch.cat([model.decode(tgt[:, t:t + 1], memory, src_mask, cache) for t in range(7)], dim=1)
    torch.testing.assert_close(steps, logits, atol=1e-5, rtol=1e-5)


def test_rotary_positions_make_word_order_matter_on_both_sides():
    """Without position tables, order must come from the rotations: swapping two source tokens,
    or two earlier target tokens, changes the next-token logits."""
    model = make_model(seed=5, pos_emb="rope", init_std=0.2)  # weights large enough to tell
    src, tgt = padded_batch([6], 6), padded_batch([5], 5, seed=1)
    logits = model(src, tgt)[0][:, -1]
    assert not torch.allclose(model(src[:, [1, 0, 2, 3, 4, 5]], tgt)[0][:, -1], logits, atol=1e-3)
    assert not torch.allclose(model(src, tgt[:, [1, 0, 2, 3, 4]])[0][:, -1], logits, atol=1e-3)


def test_one_beam_search_ranks_for_every_length_penalty():
    """beam_search_alphas gives, for each alpha, what a beam search with that alpha gives; and a
    larger alpha never picks a shorter translation."""
    model = make_model(seed=6)
    src = padded_batch([6, 3, 5, 6, 2], 6, seed=7)
    alphas = [0.0, 0.6, 1.2, 3.0]
    together = beam_search_alphas(model, src, 4, alphas, max_new_tokens=15)
    for alpha in alphas:
        assert together[alpha] == beam_search(model, src, 4, alpha, max_new_tokens=15)
    for short, long in itertools.pairwise(alphas):
        assert all(len(a) <= len(b) for a, b in zip(together[short], together[long], strict=True))
    assert length_penalty(torch.tensor([1.0]), 0.0) == 1.0  # alpha 0: raw log-probabilities


def test_config_rejects_what_cannot_work():
    with pytest.raises(ValueError, match="'flash' cannot take key padding masks"):
        Seq2SeqConfig(attn_impl="flash")
    with pytest.raises(ValueError, match="n_decoder_layer must be at least 1"):
        Seq2SeqConfig(n_decoder_layer=0)
    with pytest.raises(ValueError, match="divisible by n_head"):
        Seq2SeqConfig(n_embd=30, n_head=4)
    with pytest.raises(ValueError, match="pos_emb 'absolute' is unknown; choose one of"):
        Seq2SeqConfig(pos_emb="absolute")
    with pytest.raises(ValueError, match="head size n_embd / n_head \\(3\\) must be even"):
        Seq2SeqConfig(pos_emb="rope", n_embd=12, n_head=4)
    with pytest.raises(ValueError, match="mlp 'tanh' is unknown"):
        Seq2SeqConfig(mlp="tanh")
    with pytest.raises(ValueError, match="longer than max_len"):
        make_model()(torch.ones(1, 30, dtype=torch.long), torch.ones(1, 3, dtype=torch.long))
