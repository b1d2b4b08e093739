"""The attention of today's models: rotary positions, grouped-query attention, sliding windows and
QK-norm, alone and together, on every attention path, in the KV cache and in old checkpoints."""

import itertools
from dataclasses import replace

import pytest
import torch
from conftest import fit, run_folders

from model import (
    ATTENTION_KERNELS,
    GPT,
    GPTConfig,
    KVCache,
    MultiHeadAttention,
    Seq2SeqConfig,
    Seq2SeqTransformer,
    capture_attention,
    greedy_search,
    tiled_attention,
)
from model.attention import naive_attention
from model.checkpoint import load_gpt_checkpoint
from model.masks import causal_mask
from model.rotary import apply_rotary, rotary_angles
from scripts import bench_generate

IMPLS = sorted(ATTENTION_KERNELS)
ATOL, RTOL = 1e-5, 1e-4  # fp32: the paths and the reference differ only by summation order
BLOCK = 16

# every combination of the four options (window 5 < BLOCK, so that it hides keys)
COMBOS = [dict(pos_emb=pos, n_kv_head=kv, window=w, qk_norm=norm)
          for pos, kv, w, norm in itertools.product(["learned", "rope"], [None, 2, 1], [None, 5],
                                                    [False, True])]


def combo_id(combo: dict) -> str:
    parts = [combo["pos_emb"]]
    parts += [f"kv{combo['n_kv_head']}"] if combo["n_kv_head"] else []
    parts += [f"w{combo['window']}"] if combo["window"] else []
    parts += ["qknorm"] if combo["qk_norm"] else []
    return "-".join(parts)


def servable(impl: str, combo: dict) -> bool:
    """PyTorch's flash kernel takes no mask: a window is refused at construction (flash_attn, which
    can, is not installed here); test_flash_refuses_a_window checks that."""
    return not (impl == "flash" and combo["window"])


CASES = [pytest.param(impl, combo, id=f"{impl}-{combo_id(combo)}")
         for impl in IMPLS for combo in COMBOS if servable(impl, combo)]


def make_gpt(impl="naive", seed=0, n_layer=2, **options) -> GPT:
    torch.manual_seed(seed)
    config = GPTConfig(vocab_size=50, block_size=BLOCK, n_layer=n_layer, n_head=4, n_embd=32,
                       attn_impl=impl, **options)
    return GPT(config).eval()


def twin(impl, **options) -> tuple[GPT, GPT]:
    """The reference model and the same weights under another path."""
    ref, other = make_gpt("naive", **options), make_gpt(impl, **options)
    other.load_state_dict(ref.state_dict())
    return ref, other


# ------------------------------------------------------------------ every path, every combination


@pytest.mark.parametrize("impl,combo", CASES)
def test_a_future_token_changes_no_earlier_logit(impl, combo):
    model = make_gpt(impl, **combo)
    idx = torch.randint(0, 50, (2, BLOCK))
    idx2 = idx.clone()
    idx2[:, 9:] = (idx2[:, 9:] + 1) % 50
    with torch.no_grad():
        logits, logits2 = model(idx)[0], model(idx2)[0]
    assert torch.equal(logits[:, :9], logits2[:, :9])
    assert not torch.allclose(logits[:, 9:], logits2[:, 9:])


@pytest.mark.parametrize("impl,combo", CASES)
def test_every_path_equals_the_reference_in_outputs_and_gradients(impl, combo):
    ref, other = twin(impl, **combo)
    idx, targets = torch.randint(0, 50, (2, BLOCK)), torch.randint(0, 50, (2, BLOCK))
    logits_ref, loss_ref = ref(idx, targets)
    logits, loss = other(idx, targets)
    torch.testing.assert_close(logits, logits_ref, atol=ATOL, rtol=RTOL)
    loss_ref.backward()
    loss.backward()
    grads = dict(other.named_parameters())
    for name, p in ref.named_parameters():
        torch.testing.assert_close(grads[name].grad, p.grad, atol=ATOL, rtol=RTOL, msg=name)


@pytest.mark.parametrize("impl", [i for i in IMPLS if i != "flash"])
@pytest.mark.parametrize("pos_emb", ["learned", "rope"])
def test_a_token_outside_the_window_changes_no_logit(impl, pos_emb):
    """One layer with window 5: token 3 reaches positions 3..7 and no further. Two layers: each
    adds window - 1 = 4 positions of reach, so token 3 reaches position 11 but not 12."""
    idx = torch.randint(0, 50, (2, BLOCK))
    idx2 = idx.clone()
    idx2[:, 3] = (idx2[:, 3] + 1) % 50
    for n_layer, reach in ((1, 7), (2, 11)):
        model = make_gpt(impl, n_layer=n_layer, pos_emb=pos_emb, window=5)
        with torch.no_grad():
            changed = (model(idx)[0] != model(idx2)[0]).any(-1).any(0)  # (T,): a logit moved
        assert changed.nonzero().flatten().tolist() == list(range(3, reach + 1)), n_layer


# ------------------------------------------------------------------ each option's own property


def test_n_kv_head_equal_to_n_head_is_multi_head_attention_exactly():
    mha, gqa = make_gpt("sdpa"), make_gpt("sdpa", n_kv_head=4)
    assert {k: v.shape for k, v in mha.state_dict().items()} == \
        {k: v.shape for k, v in gqa.state_dict().items()}
    gqa.load_state_dict(mha.state_dict())
    idx = torch.randint(0, 50, (2, BLOCK))
    assert torch.equal(mha(idx)[0], gqa(idx)[0])


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("n_kv_head", [2, 1])
def test_grouped_query_attention_is_multi_head_attention_with_shared_key_value_heads(impl,
                                                                                   n_kv_head):
    """A GQA module equals a multi-head one whose key and value heads are copies: kv head h for
    query heads h * g .. h * g + g - 1 (g = n_head / n_kv_head)."""
    torch.manual_seed(0)
    gqa = MultiHeadAttention(32, 4, n_kv_head=n_kv_head, attn_impl=impl, causal=True)
    mha = MultiHeadAttention(32, 4, attn_impl="naive", causal=True)
    hs, g = 8, 4 // n_kv_head
    w, b = gqa.qkv_proj.weight.detach(), gqa.qkv_proj.bias.detach()
    q_w, k_w, v_w = w.split([32, n_kv_head * hs, n_kv_head * hs])
    q_b, k_b, v_b = b.split([32, n_kv_head * hs, n_kv_head * hs])

    def per_query_head(t):  # (n_kv * hs, ...) -> (n_head * hs, ...): each kv head g times
        return t.reshape(n_kv_head, hs, *t.shape[1:]).repeat_interleave(g, 0).flatten(0, 1)

    with torch.no_grad():
        mha.qkv_proj.weight.copy_(torch.cat([q_w, per_query_head(k_w), per_query_head(v_w)]))
        mha.qkv_proj.bias.copy_(torch.cat([q_b, per_query_head(k_b), per_query_head(v_b)]))
        mha.out_proj.load_state_dict(gqa.out_proj.state_dict())
        x = torch.randn(2, 10, 32)
        torch.testing.assert_close(gqa(x), mha(x), atol=ATOL, rtol=RTOL)


@pytest.mark.parametrize("impl", ["naive", "sdpa", "tiled"])
def test_a_window_as_long_as_the_keys_is_full_causal_attention(impl):
    """Through the kernels themselves (the module drops such a window before calling them)."""
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 4, 12, 8) for _ in range(3))
    kernel = ATTENTION_KERNELS[impl]
    full = kernel(q, k, v, causal=True, key_mask=None, dropout_p=0.0)
    for window in (12, 13, 100):
        windowed = kernel(q, k, v, causal=True, key_mask=None, dropout_p=0.0, window=window)
        torch.testing.assert_close(windowed, full, atol=ATOL, rtol=RTOL)
    narrower = kernel(q, k, v, causal=True, key_mask=None, dropout_p=0.0, window=11)
    assert not torch.allclose(narrower[:, :, -1], full[:, :, -1])  # the last query lost key 0


@pytest.mark.parametrize("tile", [1, 4, 5, 16])
@pytest.mark.parametrize("window", [1, 3, 8])
@pytest.mark.parametrize("T_q,T_k", [(37, 37), (6, 37)])
def test_tiled_windowed_attention_equals_the_reference_across_skipped_tiles(tile, window, T_q, T_k):
    """Tiles of 1 to 16 keys over 37, so that whole tiles lie outside the window and are skipped,
    with new queries over cached keys (T_q < T_k) as in generation, forward and backward."""
    torch.manual_seed(0)
    q = torch.randn(2, 4, T_q, 8, requires_grad=True)
    k, v = (torch.randn(2, 2, T_k, 8, requires_grad=True) for _ in range(2))  # and GQA
    mask = causal_mask(T_q, T_k, window=window)
    ref, _ = naive_attention(q, k, v, mask)
    out = tiled_attention(q, k, v, causal=True, window=window, tile=tile)
    torch.testing.assert_close(out, ref, atol=ATOL, rtol=RTOL)
    d_out = torch.randn_like(ref)
    grads_ref = torch.autograd.grad(ref, (q, k, v), d_out)
    grads = torch.autograd.grad(out, (q, k, v), d_out)
    for name, g, g_ref in zip("qkv", grads, grads_ref, strict=True):
        torch.testing.assert_close(g, g_ref, atol=ATOL, rtol=RTOL, msg=f"d{name}")


def test_the_window_mask_is_a_band_under_the_diagonal():
    assert torch.equal(causal_mask(4, 4, window=2).int(),
                       torch.tensor([[1, 0, 0, 0], [1, 1, 0, 0], [0, 1, 1, 0], [0, 0, 1, 1]]))
    # 2 new queries after 3 cached keys, window 3: keys 1..3 and 2..4
    assert torch.equal(causal_mask(2, 5, window=3).int(),
                       torch.tensor([[0, 1, 1, 1, 0], [0, 0, 1, 1, 1]]))


def test_qk_norm_makes_attention_blind_to_the_scale_of_queries_and_keys():
    """RMS-normalised q and k do not change when their projections are scaled; without QK-norm the
    scores (and so the outputs) do."""
    x = torch.randn(2, 10, 32)
    for qk_norm in (True, False):
        torch.manual_seed(0)
        attn = MultiHeadAttention(32, 4, n_kv_head=2, causal=True, qk_norm=qk_norm)
        before = attn(x)
        with torch.no_grad():
            attn.qkv_proj.weight[:48] *= 7.0  # the q rows (32) and the k rows (2 heads x 8)
            attn.qkv_proj.bias[:48] *= 7.0
        after = attn(x)
        assert torch.allclose(before, after, atol=1e-5) == qk_norm


def test_rotary_scores_depend_on_the_distance_between_positions_only():
    torch.manual_seed(0)
    q, k = torch.randn(1, 2, 6, 16), torch.randn(1, 2, 6, 16)

    def scores(offset):
        cos, sin = rotary_angles(torch.arange(offset, offset + 6), 16)
        return apply_rotary(q, cos, sin) @ apply_rotary(k, cos, sin).transpose(-2, -1)

    torch.testing.assert_close(scores(0), scores(500), atol=1e-4, rtol=1e-4)
    assert not torch.allclose(scores(0), q @ k.transpose(-2, -1), atol=1e-2)  # positions matter
    cos, sin = rotary_angles(torch.arange(6), 16)
    torch.testing.assert_close(apply_rotary(q, cos, sin).norm(dim=-1), q.norm(dim=-1))  # rotation


# ------------------------------------------------------------------ generation and the KV cache


def greedy_steps(model, idx, steps, use_cache):
    return list(model._decode(idx, steps, lambda logits: logits.argmax(-1), use_cache=use_cache))


@pytest.mark.parametrize("impl,combo", [c for c in CASES
                                        if not (c.values[0] == "flash"
                                                and c.values[1]["pos_emb"] == "rope")])
def test_cached_generation_equals_uncached(impl, combo):
    """3 x block_size tokens: learned positions crop and rebuild the cache, rotary ones roll it."""
    model = make_gpt(impl, **combo)
    idx = torch.randint(0, 50, (2, 5))
    cached, uncached = greedy_steps(model, idx, 3 * BLOCK, True), greedy_steps(model, idx,
                                                                               3 * BLOCK, False)
    for step, ((tok_c, logits_c), (tok_u, logits_u)) in enumerate(zip(cached, uncached,
                                                                      strict=True)):
        assert torch.equal(tok_c, tok_u), f"step {step}"
        torch.testing.assert_close(logits_c, logits_u, atol=ATOL, rtol=RTOL, msg=f"step {step}")


def test_flash_reads_a_rotary_sequence_longer_than_block_size_only_through_flash_attn():
    """PyTorch's flash kernel takes no mask: the window of block_size a rotary model applies past
    block_size is refused in one line (cached generation, one token at a time, needs no mask)."""
    model = make_gpt("flash", pos_emb="rope")
    idx = torch.randint(0, 50, (1, 5))
    assert model.generate(idx, 3 * BLOCK, temperature=0).shape == (1, 5 + 3 * BLOCK)
    with pytest.raises(ValueError, match="flash_attn package.*use attn_impl='sdpa' or 'tiled'"):
        model(torch.randint(0, 50, (1, BLOCK + 1)))


@pytest.mark.parametrize("impl", ["naive", "sdpa", "tiled"])
@pytest.mark.parametrize("window", [None, 6])
def test_rolling_cache_generation_is_sliding_window_attention_over_the_whole_sequence(impl, window):
    """Rotary positions: generating 4 x block_size tokens with caches that keep the latest
    block_size keys (or window) equals one uncached pass over the whole generated sequence with
    window = block_size (or window): token for token, logits within 1e-5."""
    model = make_gpt(impl, pos_emb="rope", window=window)
    idx = torch.randint(0, 50, (2, 3))
    steps = greedy_steps(model, idx, 4 * BLOCK, use_cache=True)
    seq = torch.cat([idx, *(tokens[:, None] for tokens, _ in steps)], dim=1)  # (2, 3 + 4 * BLOCK)

    reference = GPT(replace(model.config, window=window or BLOCK, attn_impl="naive")).eval()
    reference.load_state_dict(model.state_dict())
    with torch.no_grad():
        logits = reference(seq)[0][:, idx.size(1) - 1:-1]  # the logits that chose each new token
    torch.testing.assert_close(torch.stack([lg for _, lg in steps], 1), logits, atol=ATOL, rtol=0)
    assert torch.equal(logits.argmax(-1), seq[:, idx.size(1):])


def test_the_rolling_cache_holds_at_most_its_length_and_every_position_it_has_seen():
    cache = KVCache(4, rolling=True)
    k = torch.arange(10.0).view(1, 1, 10, 1)
    keys, _ = cache.append(k[:, :, :6], k[:, :, :6])  # a prompt longer than the cache
    assert keys.size(2) == 6 and cache.length == 4 and cache.seen == 6
    keys, _ = cache.append(k[:, :, 6:7], k[:, :, 6:7])  # then one token: the held 4, then it
    assert keys.flatten().tolist() == [2, 3, 4, 5, 6]
    assert cache.stored()[0].flatten().tolist() == [3, 4, 5, 6] and cache.seen == 7


@pytest.mark.parametrize("n_kv_head", [None, 2, 1])
def test_the_kv_cache_holds_n_kv_head_heads(n_kv_head):
    """Its memory falls by exactly n_head / n_kv_head."""
    model = make_gpt("sdpa", n_kv_head=n_kv_head)
    caches = [KVCache(BLOCK) for _ in model.blocks]
    with torch.no_grad():
        model(torch.randint(0, 50, (2, 7)), kv_caches=caches)
    k, v = caches[0].stored()
    assert k.shape == v.shape == (2, n_kv_head or 4, 7, 8)


def test_rotary_models_read_sequences_longer_than_block_size_learned_ones_refuse():
    idx = torch.randint(0, 50, (1, 3 * BLOCK))
    assert make_gpt("sdpa", pos_emb="rope")(idx)[0].shape == (1, 3 * BLOCK, 50)
    with pytest.raises(ValueError, match="longer than block_size 16.*pos_emb 'rope'"):
        make_gpt("sdpa")(idx)


def table_rows(text: str) -> list[list[str]]:
    return [line.strip("| ").split(" | ") for line in text.splitlines()
            if line.startswith("| ") and not line.startswith("| ---")][1:]


def test_the_benchmark_measures_the_kv_cache_n_head_over_n_kv_head_smaller(capsys):
    """On the CPU config's shape (4 layers, 4 heads of 32, fp32): 2 * 4 * 4 * 32 * 4 bytes per
    token with multi-head attention."""
    bench_generate.main(["--kv-heads", "4", "2", "1", "--new-tokens", "2", "--repeats", "1"])
    rows = table_rows(capsys.readouterr().out)
    assert [row[:3] for row in rows] == [["4 (MHA)", "4,096", "1.00x"],
                                         ["2 (GQA)", "2,048", "2.00x"],
                                         ["1 (MQA)", "1,024", "4.00x"]]


def test_the_benchmark_times_long_generation_for_both_kinds_of_positions(capsys):
    bench_generate.main(["--long", "70", "--repeats", "1"])
    rows = table_rows(capsys.readouterr().out)
    assert [row[0] for row in rows] == ["learned", "rope"]
    assert all(float(row[3].replace(",", "")) > 0 for row in rows)


# ------------------------------------------------------------------ errors, seq2seq, capture


@pytest.mark.parametrize("options,message", [
    (dict(pos_emb="alibi"), "pos_emb 'alibi' is unknown; choose one of"),
    (dict(pos_emb="rope", n_head=32), r"head size n_embd / n_head \(1\) must be even"),
    (dict(n_kv_head=3), r"n_kv_head \(3\) must divide n_head \(4\)"),
    (dict(n_kv_head=0), r"n_kv_head \(0\) must divide"),
    (dict(window=0), r"window must be in \[1, block_size=16\]"),
    (dict(window=17), r"window must be in \[1, block_size=16\]"),
    (dict(rope_theta=0.0), "rope_theta must be positive"),
])
def test_bad_options_fail_at_construction_in_one_line(options, message):
    shape = dict(vocab_size=50, block_size=BLOCK, n_layer=1, n_head=4, n_embd=32)
    with pytest.raises(ValueError, match=message):
        GPTConfig(**{**shape, **options})


def test_flash_refuses_a_window_at_construction():
    with pytest.raises(ValueError, match="'flash' cannot serve a window.*use attn_impl 'sdpa'"):
        make_gpt("flash", window=5)


def test_the_module_refuses_what_it_cannot_serve():
    with pytest.raises(ValueError, match="causal self-attention only"):
        MultiHeadAttention(32, 4, window=4)  # bidirectional
    with pytest.raises(ValueError, match="must be a multiple of n_kv_head"):
        MultiHeadAttention(32, 4, n_kv_head=3, causal=True)
    cross = MultiHeadAttention(32, 4, cross=True)
    with pytest.raises(ValueError, match="rotary positions are for self-attention"):
        cross(torch.randn(1, 3, 32), torch.randn(1, 5, 32),
              rotary=rotary_angles(torch.arange(3), 8))


@pytest.mark.parametrize("impl", ["naive", "sdpa", "tiled"])
def test_seq2seq_takes_grouped_query_attention_and_qk_norm(impl):
    """The same module in the encoder, the decoder and cross-attention: the paths agree, and cached
    decoding equals uncached."""
    torch.manual_seed(0)
    shape = dict(vocab_size=40, max_len=24, n_encoder_layer=2, n_decoder_layer=2, n_head=4,
                 n_embd=32, mlp_hidden=64, dropout=0.0, n_kv_head=2, qk_norm=True)
    ref = Seq2SeqTransformer(Seq2SeqConfig(**shape, attn_impl="naive")).eval()
    model = Seq2SeqTransformer(Seq2SeqConfig(**shape, attn_impl=impl)).eval()
    model.load_state_dict(ref.state_dict())
    src = torch.randint(4, 40, (3, 7))
    src[1, 4:] = 0  # padding
    tgt_in, tgt_out = torch.randint(4, 40, (3, 6)), torch.randint(4, 40, (3, 6))
    torch.testing.assert_close(model(src, tgt_in, tgt_out)[0], ref(src, tgt_in, tgt_out)[0],
                               atol=ATOL, rtol=RTOL)
    assert greedy_search(model, src, 10) == greedy_search(model, src, 10, use_cache=False)


def test_captured_maps_show_the_window_band_and_every_query_head():
    model = make_gpt("sdpa", pos_emb="rope", window=4, n_kv_head=1)
    with torch.no_grad(), capture_attention(model) as weights:
        model(torch.randint(0, 50, (2, 12)))
    w = weights["blocks.0.attn"]
    assert w.shape == (2, 4, 12, 12)  # one map per query head, though all share one kv head
    band = causal_mask(12, 12, window=4)
    assert torch.all(w[..., ~band] == 0) and torch.all(w[..., band] > 0)
    torch.testing.assert_close(w.sum(-1), torch.ones(2, 4, 12))


# ------------------------------------------------------------------ checkpoints


def test_a_checkpoint_from_before_these_options_still_loads_and_samples(text_file, tmp_path):
    """Checkpoints written before the attention options and the recipe's model options have none
    of their config fields; their weights have the same names and shapes, so the defaults rebuild
    the same model."""
    fit(text_file, tmp_path, "--model.config.pos_emb", "learned", "--model.config.qk_norm", "false",
        "--model.config.mlp", "gelu", "--model.config.tie_embeddings", "true",
        "--model.optimizer", "adamw")  # GPT-2's layout, as every model was before the options
    folder, = run_folders(tmp_path)
    path = folder / "checkpoints" / "last.ckpt"
    ckpt = torch.load(path, weights_only=True)
    config = ckpt["hyper_parameters"]["config"]
    new_fields = {"pos_emb", "rope_theta", "n_kv_head", "window", "qk_norm", "mlp", "norm",
                  "tie_embeddings", "zero_init_proj", "logit_softcap"}
    assert new_fields <= set(config)
    ckpt["hyper_parameters"]["config"] = {k: v for k, v in config.items() if k not in new_fields}
    old = tmp_path / "old.ckpt"
    torch.save(ckpt, old)
    model, tokenizer = load_gpt_checkpoint(old)
    current, _ = load_gpt_checkpoint(path)
    assert model.config == current.config
    prompt = torch.tensor([tokenizer.encode("the ")])
    sample = model.generate(prompt, 20, temperature=0)
    assert torch.equal(sample, current.generate(prompt, 20, temperature=0))
    assert len(tokenizer.decode(sample[0].tolist())) > 4
