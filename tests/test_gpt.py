"""The GPT model: shapes, causality, initialisation, errors, and that it can learn."""

import math

import pytest
import torch

from model import ATTENTION_KERNELS, GPT, GPTConfig, KVCache

IMPLS = sorted(ATTENTION_KERNELS)


def tiny_config(**overrides) -> GPTConfig:
    kwargs = dict(vocab_size=50, block_size=16, n_layer=2, n_head=4, n_embd=32, dropout=0.0)
    return GPTConfig(**{**kwargs, **overrides})


def make_gpt(seed=0, **overrides) -> GPT:
    torch.manual_seed(seed)
    return GPT(tiny_config(**overrides)).eval()


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("B,T", [(1, 1), (2, 5), (3, 16)])
def test_output_shapes_and_loss(impl, B, T):
    model = make_gpt(attn_impl=impl)
    idx = torch.randint(0, 50, (B, T))
    logits, loss = model(idx)
    assert logits.shape == (B, T, 50) and loss is None
    logits, loss = model(idx, targets=torch.randint(0, 50, (B, T)))
    assert loss.shape == () and torch.isfinite(loss)


@pytest.mark.parametrize("n_head", [1, 2, 8])
def test_head_counts(n_head):
    logits, _ = make_gpt(n_head=n_head)(torch.randint(0, 50, (2, 9)))
    assert logits.shape == (2, 9, 50)


@pytest.mark.parametrize("impl", IMPLS)
def test_changing_future_tokens_changes_no_past_logit(impl):
    model = make_gpt(attn_impl=impl)
    idx = torch.randint(0, 50, (2, 16))
    for t in (0, 7, 14):
        idx2 = idx.clone()
        idx2[:, t + 1:] = (idx2[:, t + 1:] + 1 + torch.randint(0, 48, idx2[:, t + 1:].shape)) % 50
        logits, logits2 = model(idx)[0], model(idx2)[0]
        assert torch.equal(logits[:, :t + 1], logits2[:, :t + 1])
        assert not torch.allclose(logits[:, t + 1:], logits2[:, t + 1:])


def test_paths_give_the_same_model_outputs_and_gradients():
    idx, targets = torch.randint(0, 50, (4, 16)), torch.randint(0, 50, (4, 16))
    results = {}
    for impl in IMPLS:
        model = make_gpt(attn_impl=impl)  # same seed: same weights
        logits, loss = model(idx, targets)
        loss.backward()
        results[impl] = (logits, [p.grad for p in model.parameters()])
    ref_logits, ref_grads = results["naive"]
    for impl in IMPLS:
        torch.testing.assert_close(results[impl][0], ref_logits, atol=1e-5, rtol=1e-4)
        for g, g_ref in zip(results[impl][1], ref_grads, strict=True):
            torch.testing.assert_close(g, g_ref, atol=1e-5, rtol=1e-3)


def test_lm_head_is_tied_and_init_follows_gpt2():
    torch.manual_seed(0)
    config = GPTConfig(vocab_size=1000, block_size=64, n_layer=4, n_head=4, n_embd=256)
    model = GPT(config)
    assert model.lm_head.weight is model.wte.weight
    resid_std = 0.02 / math.sqrt(2 * config.n_layer)
    for block in model.blocks:
        assert block.attn.out_proj.weight.std().item() == pytest.approx(resid_std, rel=0.05)
        assert block.mlp.out_proj.weight.std().item() == pytest.approx(resid_std, rel=0.05)
        assert block.mlp.fc.weight.std().item() == pytest.approx(0.02, rel=0.05)
        assert torch.all(block.attn.qkv_proj.bias == 0)
    assert model.wte.weight.std().item() == pytest.approx(0.02, rel=0.05)


def test_parameter_count():
    V, T, L, C = 50, 16, 2, 32
    model = make_gpt()
    per_block = (2 * 2 * C) + (3 * C * C + 3 * C) + (C * C + C) + (4 * C * C + 4 * C) + (4 * C * C + C)
    expected_total = V * C + T * C + L * per_block + 2 * C  # tied head counted once
    assert model.num_params(non_embedding=False) == expected_total
    assert model.num_params() == expected_total - T * C


def test_initial_loss_is_close_to_uniform():
    model = make_gpt(vocab_size=500, n_embd=64)
    idx = torch.randint(0, 500, (8, 16))
    _, loss = model(idx, torch.randint(0, 500, (8, 16)))
    assert loss.item() == pytest.approx(math.log(500), abs=0.1)


def test_errors():
    model = make_gpt()
    with pytest.raises(ValueError, match="longer than block_size 16"):
        model(torch.zeros(1, 17, dtype=torch.long))
    with pytest.raises(ValueError, match="shape \\(batch, time\\)"):
        model(torch.zeros(17, dtype=torch.long))
    with pytest.raises(ValueError, match="n_embd \\(30\\) must be divisible by n_head \\(4\\)"):
        tiny_config(n_embd=30)
    with pytest.raises(ValueError, match="n_layer must be at least 1"):
        tiny_config(n_layer=0)
    with pytest.raises(ValueError, match="attn_impl 'flashy' is unknown"):
        tiny_config(attn_impl="flashy")
    with pytest.raises(ValueError, match="dropout"):
        tiny_config(dropout=1.0)


@pytest.mark.parametrize("impl", IMPLS)
def test_a_single_batch_can_be_overfit(impl):
    model = make_gpt(attn_impl=impl).train()
    idx = torch.randint(0, 50, (4, 16))
    x, y = idx[:, :-1], idx[:, 1:]
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    first = None
    for _ in range(150):
        _, loss = model(x, y)
        first = first if first is not None else loss.item()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert first > 3.5  # about ln(50) = 3.9 at the start
    assert loss.item() < 0.05  # the batch is memorised


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_squared_relu_with_its_written_out_backward_matches_autograd(dtype):
    from torch.nn import functional as F

    from model.block import ReLUSquared

    torch.manual_seed(0)
    h = torch.randn(3, 5, 16, dtype=dtype)
    h[0, 0, :4] = 0.0  # relu's kink: no gradient there
    grad = torch.randn_like(h)
    ours, theirs = h.clone().requires_grad_(), h.clone().requires_grad_()
    out = ReLUSquared.apply(ours)
    out.backward(grad)
    expected = F.relu(theirs).square()
    expected.backward(grad)
    torch.testing.assert_close(out, expected, rtol=0, atol=0)  # the same products
    torch.testing.assert_close(ours.grad, theirs.grad)
    assert torch.autograd.gradcheck(ReLUSquared.apply, (torch.randn(4, 6, dtype=torch.float64,
                                                                    requires_grad=True),))


def smeared_gpt(**overrides) -> GPT:
    """A model with ``smear`` whose shares are not zero (they start at zero: the identity)."""
    model = make_gpt(smear=True, **overrides)
    with torch.no_grad():
        model.smear.uniform_(-1.0, 1.0)
    return model


def test_smear_starts_as_the_identity_and_mixes_in_only_earlier_tokens():
    idx = torch.randint(0, 50, (2, 16))
    torch.testing.assert_close(make_gpt(smear=True)(idx)[0], make_gpt()(idx)[0])
    model = smeared_gpt()
    assert not torch.allclose(model(idx)[0], make_gpt()(idx)[0])
    for t in (0, 7, 14):  # a change after t reaches no logit up to t
        idx2 = idx.clone()
        idx2[:, t + 1:] = (idx2[:, t + 1:] + 1 + torch.randint(0, 48, idx2[:, t + 1:].shape)) % 50
        assert torch.equal(model(idx)[0][:, :t + 1], model(idx2)[0][:, :t + 1])


def test_smear_adds_exactly_each_tokens_predecessor():
    model = smeared_gpt()
    x = torch.randn(2, 5, 32)  # (B, T, C) embeddings
    before = torch.cat([torch.zeros(2, 1, 32), x[:, :-1]], dim=1)  # zeros at the start
    torch.testing.assert_close(model._smear(x, 0, None), x + model.smear * before)
    prev = torch.tensor([3, 7])  # a cached run's: the token before x's first
    before[:, 0] = model.wte(prev)
    torch.testing.assert_close(model._smear(x, 4, prev), x + model.smear * before)


@pytest.mark.parametrize("pos_emb", ["learned", "rope"])
def test_smeared_cached_generation_equals_uncached(pos_emb):
    """48 steps past block_size 16: learned positions crop and rebuild the cache (the first kept
    token then has no predecessor, as the first of a training window), rotary ones roll it, each
    new token smeared with the one before it."""
    model = smeared_gpt(pos_emb=pos_emb)
    idx = torch.randint(0, 50, (2, 5))

    def run(use_cache):
        return list(model._decode(idx, 48, lambda logits: logits.argmax(-1), use_cache=use_cache))

    for step, ((tok_c, logits_c), (tok_u, logits_u)) in enumerate(zip(run(True), run(False),
                                                                      strict=True)):
        assert torch.equal(tok_c, tok_u), f"step {step}"
        torch.testing.assert_close(logits_c, logits_u, atol=1e-5, rtol=1e-4, msg=f"step {step}")


def test_smear_continuing_a_cache_needs_the_token_before():
    model = smeared_gpt(pos_emb="rope")
    idx = torch.randint(0, 50, (1, 6))
    caches = [KVCache(16, rolling=True) for _ in model.blocks]
    model(idx[:, :5], kv_caches=caches)
    with pytest.raises(ValueError, match="pass prev_tokens"):
        model(idx[:, 5:], kv_caches=caches)
    whole = model(idx)[0][:, -1]
    torch.testing.assert_close(model(idx[:, 5:], kv_caches=caches, prev_tokens=idx[:, 4])[0][:, -1],
                               whole, atol=1e-5, rtol=1e-4)
