"""The attention module: masks, shapes, and agreement of the attention paths."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import REPO

from model import ATTENTION_KERNELS, KVCache, MultiHeadAttention, causal_mask

IMPLS = sorted(ATTENTION_KERNELS)
MASKABLE = [i for i in IMPLS if i != "flash"]  # flash kernels take no key padding mask
# fp32, dropout off: the paths and the reference differ only by summation order
ATOL, RTOL = 1e-5, 1e-4
# bf16 keeps 8 bits of mantissa: outputs of size ~1 agree with the fp32 reference to a few 1e-2
BF16_ATOL, BF16_RTOL = 3e-2, 3e-2


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


@pytest.mark.parametrize("impl", MASKABLE)
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


@pytest.mark.parametrize("impl", MASKABLE)
def test_query_with_no_visible_key_outputs_zeros_without_nan(impl):
    attn = make_attention(impl, bias=False)
    x = torch.randn(2, 5, 32, requires_grad=True)
    key_mask = torch.tensor([[True] * 5, [False] * 5])  # row 1 is all padding
    y = attn(x, key_mask=key_mask)
    assert torch.isfinite(y).all()
    assert torch.all(y[1] == 0)  # zero attention output, projected without bias
    y.sum().backward()
    assert torch.isfinite(x.grad).all()


CASES = {  # name: (causal, cross, T_q, padded)
    "causal": (True, False, 9, False),
    "bidirectional": (False, False, 9, False),
    "padded": (False, False, 9, True),
    "causal+padded": (True, False, 9, True),
    "cross": (False, True, 9, False),
    "cross+padded": (False, True, 9, True),
    "new queries over cached keys": (True, False, 4, False),
}


def run_both(impl, case, dtype=torch.float32):
    """Outputs and gradients (input and parameters) of the reference and of ``impl`` on one case."""
    causal, cross, T_q, padded = CASES[case]
    ref, other = twin(impl, causal=causal, cross=cross)
    B, T_k = 3, 13 if cross else 9
    torch.manual_seed(1)
    x = torch.randn(B, T_q if not cross else 9, 32)
    context = torch.randn(B, T_k, 32) if cross else None
    if case == "new queries over cached keys":  # self-attention over 9 keys, of which the last 4 are new
        x = torch.randn(B, T_q, 32)
    key_mask = torch.arange(T_k)[None, :] < torch.tensor([T_k, T_k - 3, T_k - 5])[:, None] if padded else None
    results = []
    for module, module_dtype in ((ref, torch.float32), (other, dtype)):
        module.to(module_dtype)
        xi = x.to(module_dtype, copy=True).requires_grad_()
        ctx = context.to(module_dtype) if cross else None
        y = module(xi, context=ctx, key_mask=key_mask)
        y.float().pow(2).sum().backward()
        results.append((y.float(), [xi.grad.float()] + [p.grad.float() for p in module.parameters()]))
    return results


def servable(impls, cases):
    """(impl, case) pairs, without key-masked cases for flash
    (test_flash_refuses_what_it_cannot_serve)."""
    return [(i, c) for i in impls for c in cases if i in MASKABLE or not CASES[c][3]]


@pytest.mark.parametrize("impl,case", servable([i for i in IMPLS if i != "naive"], CASES))
def test_paths_agree_with_reference_outputs_and_gradients(impl, case):
    (y_ref, g_ref), (y, g) = run_both(impl, case)
    torch.testing.assert_close(y, y_ref, atol=ATOL, rtol=RTOL)
    for g_other, g_reference in zip(g, g_ref, strict=True):
        torch.testing.assert_close(g_other, g_reference, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("impl,case", servable(IMPLS, ["causal", "cross+padded"]))
def test_bf16_paths_track_the_fp32_reference(impl, case):
    (y_ref, g_ref), (y, g) = run_both(impl, case, dtype=torch.bfloat16)
    torch.testing.assert_close(y, y_ref, atol=BF16_ATOL, rtol=BF16_RTOL)
    torch.testing.assert_close(g[0], g_ref[0], atol=BF16_ATOL, rtol=BF16_RTOL)  # input gradient


@pytest.mark.parametrize("impl", IMPLS)
def test_new_queries_over_cached_keys_equal_the_full_causal_pass(impl):
    """The bottom-right causal mask is what a KV cache needs: the last 3 queries over all 8 keys
    give the last 3 rows of the full causal attention."""
    from model.attention import ATTENTION_KERNELS

    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 4, 8, 16) for _ in range(3))
    full = ATTENTION_KERNELS[impl](q, k, v, causal=True, key_mask=None, dropout_p=0.0)
    for new in (3, 1):
        last = ATTENTION_KERNELS[impl](q[:, :, -new:], k, v, causal=True, key_mask=None, dropout_p=0.0)
        torch.testing.assert_close(last, full[:, :, -new:], atol=ATOL, rtol=RTOL)


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
@pytest.mark.parametrize("B,T_q,T_k", [(1, 1, 5), (2, 7, 3), (3, 4, 11), (2, 300, 200)])
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


def test_cross_attention_cache_projects_the_context_once():
    attn = MultiHeadAttention(32, 4, cross=True).eval()
    x, context = torch.randn(2, 3, 32), torch.randn(2, 5, 32)
    key_mask = torch.tensor([[True] * 5, [True] * 2 + [False] * 3])
    cache = KVCache(5)
    first = attn(x[:, :1], context, key_mask=key_mask, kv_cache=cache)
    assert cache.length == 5
    calls = []
    attn.kv_proj.register_forward_hook(lambda *_: calls.append(1))
    later = attn(x[:, 1:], None, key_mask=key_mask, kv_cache=cache)  # no context needed any more
    assert not calls and cache.length == 5
    torch.testing.assert_close(torch.cat([first, later], 1), attn(x, context, key_mask=key_mask))


def test_bad_arguments_raise_clear_errors():
    with pytest.raises(ValueError, match="divisible by n_head"):
        MultiHeadAttention(30, 4)
    with pytest.raises(ValueError, match="attn_impl 'fast' is unknown"):
        MultiHeadAttention(32, 4, attn_impl="fast")
    with pytest.raises(ValueError, match="needs a context"):
        MultiHeadAttention(32, 4, cross=True)(torch.randn(1, 3, 32))
    with pytest.raises(ValueError, match="takes no context"):
        MultiHeadAttention(32, 4)(torch.randn(1, 3, 32), context=torch.randn(1, 3, 32))
    with pytest.raises(ValueError, match="key_mask must be a bool tensor"):
        MultiHeadAttention(32, 4)(torch.randn(1, 3, 32), key_mask=torch.ones(1, 3))


def test_flash_refuses_what_it_cannot_serve():
    attn = make_attention("flash", causal=True)
    with pytest.raises(ValueError, match="not a key padding mask.*use attn_impl='sdpa'"):
        attn(torch.randn(2, 4, 32), key_mask=torch.ones(2, 4, dtype=torch.bool))
    attn = make_attention("flash", causal=True, dropout=0.1).train()
    with pytest.raises(ValueError, match="flash kernel on CPU has no attention dropout"):
        attn(torch.randn(2, 4, 32))
    with pytest.raises(ValueError, match="'tiled' has no attention dropout"):
        make_attention("tiled", dropout=0.1).train()(torch.randn(2, 4, 32))


@pytest.mark.parametrize("options,window_size", [({}, (-1, -1)), ({"window": 3, "n_kv_head": 2}, (2, 0))])
def test_flash_attn_package_gets_its_layout_the_causal_flag_and_the_window(monkeypatch, options, window_size):
    """Where flash_attn is installed (CUDA), its function is called in its (B, T, nh, hs) layout,
    with a window as (keys to the left, keys to the right) and the fewer kv heads of GQA as they are."""
    import model.attention as attention

    calls = []

    def fake_flash_attn_func(q, k, v, dropout_p, causal, window_size):  # the reference, in its layout
        calls.append((q.shape, k.shape, causal, window_size))
        window = window_size[0] + 1 if window_size[0] >= 0 else None
        mask = causal_mask(q.size(1), k.size(1), window=window) if causal else None
        y, _ = attention.naive_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), mask, dropout_p)
        return y.transpose(1, 2)

    ref, flash = twin("flash", causal=True, **options)
    x = torch.randn(2, 6, 32)
    expected = ref(x)
    monkeypatch.setattr(attention, "flash_attn_func", fake_flash_attn_func)
    monkeypatch.setattr(attention, "_use_flash_attn_package", lambda q: True)
    torch.testing.assert_close(flash(x), expected, atol=ATOL, rtol=RTOL)
    kv_heads = options.get("n_kv_head", 4)
    assert calls == [((2, 6, 4, 8), (2, 6, kv_heads, 8), True, window_size)]


@pytest.mark.parametrize("tile", [1, 4, 5, 64])
def test_tiled_attention_any_tile_size(tile):
    """Tiles that do not divide T, and T_q > T_k (the first queries see no key), match the
    reference."""
    from model import tiled_attention
    from model.attention import naive_attention
    from model.masks import build_mask

    torch.manual_seed(0)
    q = torch.randn(2, 3, 11, 8, requires_grad=True)
    k, v = torch.randn(2, 3, 7, 8, requires_grad=True), torch.randn(2, 3, 7, 8, requires_grad=True)
    key_mask = torch.tensor([[True] * 7, [True] * 5 + [False] * 2])
    y = tiled_attention(q, k, v, causal=True, key_mask=key_mask, tile=tile)
    y_ref, _ = naive_attention(q, k, v, build_mask(11, 7, True, key_mask))
    torch.testing.assert_close(y, y_ref, atol=ATOL, rtol=RTOL)
    assert torch.all(y[:, :, :4] == 0)  # queries 0-3 come before every key
    grads = torch.autograd.grad(y.pow(2).sum(), (q, k, v))
    grads_ref = torch.autograd.grad(y_ref.pow(2).sum(), (q, k, v))
    for g, g_ref in zip(grads, grads_ref, strict=True):
        torch.testing.assert_close(g, g_ref, atol=1e-4, rtol=1e-4)


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="measures CPU peak memory through Linux /proc")
def test_tiled_path_memory_stays_far_under_the_reference_at_long_T(tmp_path):
    """Measured by the attention benchmark, each run in a fresh process. At T=2048 the reference
    holds (heads, T, T) fp32 matrices of 64 MiB each; the tiled path only tiles of 128 x 128."""
    out = tmp_path / "bench.json"
    subprocess.run([sys.executable, str(REPO / "scripts" / "bench_attention.py"), "--paths", "naive", "tiled",
                    "--seq-lens", "2048", "--batch", "1", "--heads", "4", "--head-dim", "32", "--repeats", "1",
                    "--warmup", "0", "--threads", "1", "--plot", str(tmp_path / "bench.png"), "--json", str(out)],
                   check=True, capture_output=True, timeout=300)
    mib = {r["path"]: r["mib"] for r in json.loads(out.read_text())["results"]}
    assert mib["naive"] > 3 * 64, f"the reference added only {mib['naive']:.0f} MiB"
    assert mib["tiled"] < mib["naive"] / 10, f"tiled {mib['tiled']:.1f} MiB vs reference {mib['naive']:.1f} MiB"
    assert (tmp_path / "bench.png").stat().st_size > 10_000  # the plot was drawn


@pytest.mark.parametrize("impl", IMPLS)
def test_large_scores_do_not_overflow_in_fp16(impl):
    """q . k = 40 * 40 * 64 = 102,400 exceeds fp16's 65,504; scaled by 1/sqrt(64) first it does
    not."""
    q = torch.full((1, 2, 4, 64), 40.0, dtype=torch.float16)
    v = torch.randn(1, 2, 4, 64, dtype=torch.float16)
    y = ATTENTION_KERNELS[impl](q, q.clone(), v, causal=True, key_mask=None, dropout_p=0.0)
    assert torch.isfinite(y).all()
    expected = v.float().cumsum(2) / torch.arange(1, 5).view(1, 1, 4, 1)  # equal scores: running means of v
    torch.testing.assert_close(y.float(), expected, atol=1e-2, rtol=1e-2)
