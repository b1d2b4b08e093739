"""The attention module: masks, shapes, and agreement of the attention paths."""

import pytest
import torch

from model import ATTENTION_KERNELS, MultiHeadAttention, causal_mask

IMPLS = sorted(ATTENTION_KERNELS)
# fp32, dropout off: the fused kernel and the reference differ only by summation order
ATOL, RTOL = 1e-5, 1e-4


def make_attention(impl="naive", n_embd=32, n_head=4, seed=0, **kwargs):
    torch.manual_seed(seed)
    return MultiHeadAttention(n_embd, n_head, attn_impl=impl, **kwargs).eval()


def twin(impl, **kwargs):
    """The same weights under another attention path."""
    ref = make_attention("naive", **kwargs)
    other = make_attention(impl, **kwargs)
    other.load_state_dict(ref.state_dict())
    return ref, other


def test_causal_mask_is_bottom_right_aligned():
    assert torch.equal(causal_mask(3, 3), torch.tensor([[1, 0, 0], [1, 1, 0], [1, 1, 1]], dtype=torch.bool))
    # 2 new queries after 3 cached keys: they see everything before them and themselves
    assert torch.equal(causal_mask(2, 5), torch.tensor([[1, 1, 1, 1, 0], [1, 1, 1, 1, 1]], dtype=torch.bool))


@pytest.mark.parametrize("impl", IMPLS)
def test_future_positions_do_not_change_the_past(impl):
    attn = make_attention(impl, causal=True)
    x = torch.randn(2, 10, 32)
    t = 4
    x2 = x.clone()
    x2[:, t + 1:] = torch.randn_like(x2[:, t + 1:])
    y, y2 = attn(x), attn(x2)
    assert torch.equal(y[:, :t + 1], y2[:, :t + 1])
    assert not torch.allclose(y[:, t + 1:], y2[:, t + 1:])


def test_naive_weights_are_causal_and_rows_sum_to_one():
    attn = make_attention("naive", causal=True)
    _, w = attn(torch.randn(3, 7, 32), return_weights=True)  # (B, nh, T, T)
    assert w.shape == (3, 4, 7, 7)
    above = ~causal_mask(7, 7)
    assert torch.all(w[..., above] == 0)
    assert torch.all(w[..., ~above] > 0)
    torch.testing.assert_close(w.sum(-1), torch.ones(3, 4, 7))


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("causal", [False, True])
def test_key_mask_hides_padded_keys(impl, causal):
    attn = make_attention(impl, causal=causal)
    x = torch.randn(2, 6, 32)
    key_mask = torch.tensor([[True] * 6, [True] * 4 + [False] * 2])  # row 1: last two are padding
    x2 = x.clone()
    x2[1, 4:] = torch.randn(2, 32)  # change only the padding
    y, y2 = attn(x, key_mask=key_mask), attn(x2, key_mask=key_mask)
    # real positions of the padded row see no padding; the other row is untouched
    torch.testing.assert_close(y[1, :4], y2[1, :4], atol=ATOL, rtol=RTOL)
    torch.testing.assert_close(y[0], y2[0], atol=0, rtol=0)
    _, w = attn(x, key_mask=key_mask, return_weights=True)
    assert torch.all(w[1, :, :, 4:] == 0)


@pytest.mark.parametrize("impl", IMPLS)
def test_query_with_no_visible_key_outputs_zeros_without_nan(impl):
    attn = make_attention(impl, bias=False)
    x = torch.randn(2, 5, 32, requires_grad=True)
    key_mask = torch.tensor([[True] * 5, [False] * 5])  # row 1 is all padding
    y = attn(x, key_mask=key_mask)
    assert torch.isfinite(y).all()
    assert torch.all(y[1] == 0)  # zero attention output, projected without bias
    y.sum().backward()
    assert torch.isfinite(x.grad).all()


@pytest.mark.parametrize("impl", [i for i in IMPLS if i != "naive"])
@pytest.mark.parametrize("case", ["causal", "padded", "causal+padded", "cross", "kv-cache-shaped"])
def test_paths_agree_with_reference_outputs_and_gradients(impl, case):
    cross = case == "cross"
    ref, other = twin(impl, causal="causal" in case or case == "kv-cache-shaped", cross=cross)
    B, T = 3, 9
    x = torch.randn(B, 4 if case == "kv-cache-shaped" else T, 32)
    context = torch.randn(B, 13, 32) if cross else None
    key_mask = None
    if "padded" in case or cross:
        T_k = 13 if cross else T
        key_mask = torch.arange(T_k)[None, :] < torch.tensor([T_k, T_k - 3, T_k - 5])[:, None]

    outs, grads = [], []
    for module in (ref, other):
        xi = x.clone().requires_grad_()
        y = module(xi, context=context, key_mask=key_mask)
        y.pow(2).sum().backward()
        outs.append(y)
        grads.append([xi.grad] + [p.grad for p in module.parameters()])
    torch.testing.assert_close(outs[1], outs[0], atol=ATOL, rtol=RTOL)
    for g_other, g_ref in zip(grads[1], grads[0], strict=True):
        torch.testing.assert_close(g_other, g_ref, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("impl", IMPLS)
def test_new_queries_over_cached_keys_equal_the_full_causal_pass(impl):
    """The bottom-right causal mask is what a KV cache needs: the last 3 queries over all 8 keys
    give the last 3 rows of the full causal attention."""
    from model.attention import ATTENTION_KERNELS

    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 4, 8, 16) for _ in range(3))
    full = ATTENTION_KERNELS[impl](q, k, v, causal=True, key_mask=None, dropout_p=0.0)
    last = ATTENTION_KERNELS[impl](q[:, :, -3:], k, v, causal=True, key_mask=None, dropout_p=0.0)
    torch.testing.assert_close(last, full[:, :, -3:], atol=ATOL, rtol=RTOL)


@pytest.mark.parametrize("impl", IMPLS)
def test_returned_weights_match_the_output_of_any_path(impl):
    attn = make_attention(impl, causal=True)
    x = torch.randn(2, 6, 32)
    y_fast = attn(x)
    y_ref, w = attn(x, return_weights=True)
    torch.testing.assert_close(y_ref, y_fast, atol=ATOL, rtol=RTOL)
    assert w.shape == (2, 4, 6, 6)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("B,T,n_head", [(1, 1, 1), (2, 1, 4), (3, 7, 2), (4, 16, 8)])
def test_self_attention_shapes(impl, B, T, n_head):
    attn = make_attention(impl, n_embd=32, n_head=n_head, causal=True)
    assert attn(torch.randn(B, T, 32)).shape == (B, T, 32)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("B,T_q,T_k", [(1, 1, 5), (2, 7, 3), (3, 4, 11)])
def test_cross_attention_shapes(impl, B, T_q, T_k):
    attn = make_attention(impl, cross=True)
    y, w = attn(torch.randn(B, T_q, 32), context=torch.randn(B, T_k, 32), return_weights=True)
    assert y.shape == (B, T_q, 32)
    assert w.shape == (B, 4, T_q, T_k)
    assert attn(torch.randn(B, T_q, 32), context=torch.randn(B, T_k, 32)).shape == (B, T_q, 32)


def test_attention_dropout_is_active_only_in_training():
    attn = make_attention("naive", dropout=0.5, causal=True)
    x = torch.randn(2, 8, 32)
    torch.testing.assert_close(attn(x), attn(x))  # eval: deterministic
    attn.train()
    assert not torch.allclose(attn(x), attn(x))


def test_bad_arguments_raise_clear_errors():
    with pytest.raises(ValueError, match="divisible by n_head"):
        MultiHeadAttention(30, 4)
    with pytest.raises(ValueError, match="unknown attn_impl"):
        MultiHeadAttention(32, 4, attn_impl="fast")
    with pytest.raises(ValueError, match="needs a context"):
        MultiHeadAttention(32, 4, cross=True)(torch.randn(1, 3, 32))
    with pytest.raises(ValueError, match="takes no context"):
        MultiHeadAttention(32, 4)(torch.randn(1, 3, 32), context=torch.randn(1, 3, 32))
    with pytest.raises(ValueError, match="key_mask must be a bool tensor"):
        MultiHeadAttention(32, 4)(torch.randn(1, 3, 32), key_mask=torch.ones(1, 3))
