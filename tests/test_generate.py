"""Generation: KV cache equals recomputation, sampling controls, stop tokens, scripts/sample.py."""

import subprocess
import sys

import pytest
import torch
from conftest import REPO

from model import ATTENTION_KERNELS, GPT, GPTConfig, KVCache, top_k_filter, top_p_filter
from scripts import bench_generate, sample

IMPLS = sorted(ATTENTION_KERNELS)


def make_gpt(impl="sdpa", seed=0, block_size=16) -> GPT:
    torch.manual_seed(seed)
    return GPT(GPTConfig(vocab_size=50, block_size=block_size, n_layer=2, n_head=4, n_embd=32,
                         attn_impl=impl)).eval()


@pytest.mark.parametrize("impl", IMPLS)
def test_cached_generation_equals_uncached_past_block_size(impl):
    """Greedy, 60 steps with block_size 16: the context is cropped and the cache rebuilt several
    times."""
    model = make_gpt(impl)
    idx = torch.randint(0, 50, (3, 5))

    def run(use_cache):
        return list(model._decode(idx, 60, lambda logits: logits.argmax(-1), use_cache=use_cache))

    cached, uncached = run(True), run(False)
    for step, ((tok_c, logits_c), (tok_u, logits_u)) in enumerate(zip(cached, uncached, strict=True)):
        assert torch.equal(tok_c, tok_u), f"step {step}"
        torch.testing.assert_close(logits_c, logits_u, atol=1e-5, rtol=1e-4, msg=f"logits at step {step}")
    assert torch.equal(model.generate(idx, 60, temperature=0), model.generate(idx, 60, temperature=0,
                                                                             use_cache=False))


def test_prompt_longer_than_block_size_is_cropped_alike():
    model = make_gpt()
    idx = torch.randint(0, 50, (2, 40))  # longer than block_size 16
    assert torch.equal(model.generate(idx, 20, temperature=0), model.generate(idx, 20, temperature=0, use_cache=False))


def test_kv_cache_fills_in_place_and_refuses_overflow():
    cache = KVCache(max_len=4)
    k = torch.randn(2, 3, 3, 8)
    keys, values = cache.append(k, k + 1)
    assert cache.length == 3 and torch.equal(keys, k) and torch.equal(values, k + 1)
    keys, _ = cache.append(k[:, :, :1], k[:, :, :1])
    assert keys.shape == (2, 3, 4, 8) and torch.equal(keys[:, :, 3:], k[:, :, :1])
    with pytest.raises(ValueError, match="holds 4 positions; 5 do not fit"):
        cache.append(k[:, :, :1], k[:, :, :1])
    cache.reset()
    assert cache.append(k, k)[0].shape == (2, 3, 3, 8)


@pytest.mark.parametrize("rolling", [False, True])
def test_kv_cache_reorder_moves_the_stored_rows_and_keeps_filling(rolling):
    cache = KVCache(max_len=6, rolling=rolling)
    k = torch.randn(2, 3, 4, 8)
    cache.append(k, -k)
    index = torch.tensor([1, 1, 0])  # as beam search picks parents: repeated, reordered, 2 -> 3
    cache.reorder(index)
    keys, values = cache.stored() if not rolling else (cache.k, cache.v)
    assert torch.equal(keys, k[index]) and torch.equal(values, -k[index])
    new = torch.randn(3, 3, 1, 8)
    keys, values = cache.append(new, -new)
    assert torch.equal(keys, torch.cat([k[index], new], dim=2))
    assert torch.equal(values, -torch.cat([k[index], new], dim=2))


def test_top_k_keeps_exactly_k_even_with_ties():
    logits = torch.tensor([[1.0, 3.0, 3.0, 3.0, 2.0], [0.0, 1.0, 2.0, 3.0, 4.0]])
    kept = torch.isfinite(top_k_filter(logits, 2))
    assert kept.sum(-1).tolist() == [2, 2]
    assert kept[0, [1, 2, 3]].sum() == 2 and kept[1].tolist() == [False, False, False, True, True]
    assert torch.isfinite(top_k_filter(logits, 10)).all()  # k above the vocabulary keeps everything


@pytest.mark.parametrize("p,kept", [(0.3, 1), (0.5, 1), (0.6, 2), (0.8, 2), (0.81, 3), (0.96, 4), (1.0, 4)])
def test_top_p_keeps_the_smallest_set_reaching_p(p, kept):
    probs = torch.tensor([[0.15, 0.5, 0.05, 0.3]])  # sorted: 0.5, 0.3, 0.15, 0.05
    filtered = top_p_filter(probs.log(), p)
    survivors = torch.isfinite(filtered)
    assert survivors.sum().item() == kept
    assert probs[survivors].sum() >= min(p, 1.0) - 1e-6  # the kept set reaches p ...
    dropped = probs[~survivors]
    assert not len(dropped) or probs[survivors].min() >= dropped.max()  # ... with the likeliest tokens
    assert kept == 1 or probs[survivors].sum() - probs[survivors].min() < p  # ... and no more than needed


def test_temperature_zero_is_greedy_and_deterministic():
    model = make_gpt()
    idx = torch.randint(0, 50, (2, 4))
    out = model.generate(idx, 10, temperature=0)
    assert torch.equal(out, model.generate(idx, 10, temperature=0))
    logits = model(out[:, :-1])[0]
    assert torch.equal(out[:, 4:], logits[:, 3:].argmax(-1))  # each token is the argmax after its prefix


def test_a_seed_reproduces_samples():
    model = make_gpt()
    idx = torch.zeros(4, 1, dtype=torch.long)

    def draw(seed):
        return model.generate(idx, 30, temperature=1.0, top_p=0.9, generator=torch.Generator().manual_seed(seed))

    assert torch.equal(draw(7), draw(7))
    assert not torch.equal(draw(7), draw(8))


def test_stop_tokens_end_generation():
    model = make_gpt()
    idx = torch.randint(0, 50, (1, 3))
    free = model.generate(idx, 20, temperature=0)[0, 3:].tolist()
    stop = free[5]
    first = free.index(stop)
    stopped = model.generate(idx, 20, temperature=0, stop=[stop])[0, 3:].tolist()
    assert stopped == free[:first + 1]
    # in a batch, finished rows repeat their stop token until every row has stopped
    batch = torch.cat([idx, torch.randint(0, 50, (1, 3))])
    out = model.generate(batch, 20, temperature=0, stop=[stop])[0, 3:].tolist()
    assert out[:first + 1] == free[:first + 1] and set(out[first:]) == {stop}


def test_bad_sampling_arguments_fail_at_the_call():
    model = make_gpt()
    idx = torch.zeros(1, 1, dtype=torch.long)
    for kwargs, message in [({"temperature": -1}, "temperature"), ({"top_k": 0}, "top_k"), ({"top_p": 0.0}, "top_p"),
                            ({"top_p": 1.5}, "top_p")]:
        with pytest.raises(ValueError, match=message):
            model.stream(idx, 5, **kwargs)  # no iteration needed
    with pytest.raises(ValueError, match="at least one token"):
        model.generate(torch.zeros(1, 0, dtype=torch.long), 5)


# ---------------------------------------------------------------- scripts/sample.py

@pytest.fixture
def checkpoint(checkpoints):
    """A tiny character model (block_size 32) trained for 30 steps by train.py."""
    return checkpoints["gpt"]


def run_sample(capsys, *argv) -> str:
    sample.main(list(argv))
    return capsys.readouterr().out


def test_sample_script_end_to_end_from_a_subprocess(checkpoint):
    result = subprocess.run([sys.executable, str(REPO / "scripts" / "sample.py"), "--ckpt", str(checkpoint),
                             "--prompt", "The cat", "--num-samples", "2", "--max-new-tokens", "40", "--seed", "3"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    samples = result.stdout.split("---------------\n")
    assert len(samples) == 3 and samples[-1] == ""
    assert all(s.startswith("The cat") and len(s) > len("The cat") + 20 for s in samples[:2])


def test_sample_script_seed_cache_stream_and_stop(checkpoint, capsys):
    args = ["--ckpt", str(checkpoint), "--prompt", "The", "--max-new-tokens", "60", "--num-samples", "2"]
    first = run_sample(capsys, *args, "--seed", "5")
    assert first == run_sample(capsys, *args, "--seed", "5")  # reproducible
    assert first != run_sample(capsys, *args, "--seed", "6")
    assert first == run_sample(capsys, *args, "--seed", "5", "--no-cache")  # the cache changes nothing
    assert first == run_sample(capsys, *args, "--seed", "5", "--stream")  # streaming prints the same text

    greedy = run_sample(capsys, *args[:6], "--temperature", "0").split("\n---------------")[0]
    stop = greedy[len("The") + 5:len("The") + 8]  # a piece of what greedy decoding writes
    stopped = run_sample(capsys, *args[:6], "--temperature", "0", "--stop", stop).split("\n---------------")[0]
    assert stopped == greedy[:greedy.index(stop, len("The"))]


@pytest.mark.parametrize("argv,message", [
    (["--ckpt", "missing.ckpt"], "no checkpoint at missing.ckpt"),
    (["--prompt", "The 🙂"], "cannot be encoded: characters not in the character vocabulary"),
    (["--prompt", "The cat sat on the mat and then the dog ran"], "reads at most 32 \\(its block_size: its positions are learned\\)"),
    (["--top-p", "2"], "top_p must be in"),
])
def test_sample_script_bad_input(checkpoint, argv, message):
    args = ["--ckpt", str(checkpoint), *argv] if argv[0] != "--ckpt" else argv
    with pytest.raises(ValueError, match=message):
        sample.main(args)


def test_sample_script_rejects_corrupt_checkpoints(checkpoint, tmp_path):
    truncated = tmp_path / "truncated.ckpt"
    truncated.write_bytes(checkpoint.read_bytes()[:5000])
    with pytest.raises(ValueError, match="not a readable checkpoint"):
        sample.main(["--ckpt", str(truncated)])
    other = tmp_path / "other.ckpt"
    torch.save({"state_dict": {}}, other)
    with pytest.raises(ValueError, match="not a checkpoint of this project"):
        sample.main(["--ckpt", str(other)])


def test_generation_benchmark_prints_a_row_per_batch_and_context(capsys):
    bench_generate.main(["--config", str(REPO / "configs" / "shakespeare_char_cpu.yaml"),
                         "--contexts", "1", "64", "--batch", "1", "2", "--new-tokens", "3",
                         "--repeats", "1"])
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| ") and "x |" in line]
    assert [row.split(" | ")[:2] for row in rows] == [["| 1", "1"], ["| 1", "64 (full)"], ["| 2", "1"],
                                                       ["| 2", "64 (full)"]]
