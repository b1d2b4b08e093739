"""capture_attention (the weights of every attention module of a model, from one forward pass) and
scripts/plot_attention.py."""

import pytest
import torch

from model import (
    GPT,
    GPTConfig,
    MultiHeadAttention,
    Seq2SeqConfig,
    Seq2SeqTransformer,
    capture_attention,
)
from scripts import plot_attention


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


# ------------------------------------------------------------------ scripts/plot_attention.py

@pytest.mark.parametrize("kind,extra", [
    ("gpt", []), ("gpt", ["--head", "1"]), ("gpt", ["--layer", "0", "--average"]),
    ("seq2seq", ["--beam", "2"]), ("seq2seq", ["--attention", "self", "--beam", "1", "--layer", "-1"]),
])
def test_the_script_writes_a_png_of_the_attention_maps(checkpoints, tmp_path, kind, extra):
    out = tmp_path / "maps.png"
    text = "The cat" if kind == "gpt" else "the cat sat on a mat"
    plot_attention.main(["--ckpt", str(checkpoints[kind]), "--text", text, "--out", str(out),
                         *extra])
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and out.stat().st_size > 5_000


@pytest.mark.parametrize("extra,message", [
    (["--layer", "2"], r"--layer 2: the model has 2 layers \(0 to 1\)"),
    (["--head", "5"], r"--head 5: the model has 2 heads"),
    (["--head", "0", "--layer", "1"], "--head shows one head in every layer"),
    (["--text", ""], "--text is empty"),
])
def test_the_script_bad_input(checkpoints, tmp_path, extra, message):
    argv = ["--ckpt", str(checkpoints["gpt"]), "--text", "The", "--out", str(tmp_path / "x.png"),
            *extra]
    with pytest.raises(ValueError, match=message):
        plot_attention.main(argv)
    with pytest.raises(ValueError, match="no checkpoint at"):
        plot_attention.main(["--ckpt", str(tmp_path / "missing.ckpt"), "--text", "a"])
