"""capture_attention: the weights of every attention module of a model, from one forward pass."""

import torch

from model import GPT, GPTConfig, MultiHeadAttention, Seq2SeqConfig, Seq2SeqTransformer, capture_attention


def test_gpt_weights_are_causal_rows_sum_to_one_and_capturing_changes_no_output():
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=50, block_size=16, n_layer=3, n_head=2, n_embd=32, attn_impl="sdpa")).eval()
    idx = torch.randint(0, 50, (2, 12))
    with torch.no_grad():
        plain, _ = model(idx)
        with capture_attention(model) as weights:
            captured, _ = model(idx)
    torch.testing.assert_close(captured, plain, atol=1e-5, rtol=1e-5)  # reference path vs fused, same outputs
    assert sorted(weights) == ["blocks.0.attn", "blocks.1.attn", "blocks.2.attn"]
    for w in weights.values():
        assert w.shape == (2, 2, 12, 12)
        assert torch.all(w.triu(diagonal=1) == 0)  # no weight on a later token
        torch.testing.assert_close(w.sum(-1), torch.ones(2, 2, 12))
    assert all(m.capture is None for m in model.modules() if isinstance(m, MultiHeadAttention))  # off again


def test_seq2seq_cross_attention_gives_padded_source_positions_no_weight():
    torch.manual_seed(0)
    config = Seq2SeqConfig(vocab_size=40, max_len=16, n_encoder_layer=2, n_decoder_layer=2, n_head=2, n_embd=32,
                           mlp_hidden=64, dropout=0.0)
    model = Seq2SeqTransformer(config).eval()
    src = torch.randint(4, 40, (2, 9))
    src[1, 5:] = config.pad_id  # the second source is 5 tokens long
    tgt_in = torch.randint(4, 40, (2, 7))
    with torch.no_grad(), capture_attention(model) as weights:
        model(src, tgt_in)
    cross = weights["decoder.0.cross_attn"]
    assert cross.shape == (2, 2, 7, 9)  # target tokens x source tokens
    assert torch.all(cross[1, :, :, 5:] == 0) and torch.all(cross[0] > 0)
    torch.testing.assert_close(cross.sum(-1), torch.ones(2, 2, 7))
    assert torch.all(weights["decoder.1.attn"].triu(diagonal=1) == 0)  # the decoder's self-attention is causal
    assert torch.all(weights["encoder.0.attn"][1, :, :, 5:] == 0)  # the encoder's hides the padding too
