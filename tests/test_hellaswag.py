"""scripts/hellaswag.py: the scores are the ending's cross-entropy (checked against a token-by-token
loop), acc and acc_norm follow their rules, padding and truncation change nothing they should not,
and bad data or no data ends in one line."""

import json
import re
import time

import pytest
import torch

torch.set_num_threads(1)

from data.tokenizers import CharTokenizer, GPT2Tokenizer  # noqa: E402
from model.checkpoint import load_model  # noqa: E402
from model.gpt import GPT, GPTConfig  # noqa: E402
from scripts import hellaswag  # noqa: E402
from scripts.hellaswag import choose, item_tokens, pad_right, score_item  # noqa: E402
from training.errors import exit_code  # noqa: E402

# items in the characters of the checkpoints fixture's text (conftest.make_text); the first two
# contexts are longer than its block_size (32), so they are cut
ITEMS = [
    ("The cat sat on the mat and then the dog", ["ran under a log.", "sat.", "flew over a tree.",
                                                 "happy"], 0),
    ("A bird flew over the tree and then the cat sat", ["on the mat.", "Red.", "quickly", "a"], 2),
    ("The cat sat on the mat.", ["A dog ran under the log.", "Qq.", "Happy.", "Red blue."], 1),
    ("Green", ["tree.", "log.", "dog.", "cat."], 3),
    ("The dog", ["ran.", "sat on a log.", "flew.", "was sad."], 1),
]
REPORT = re.compile(r"^hellaswag (\S+): (\d+) items, acc (\d\.\d{4}), acc_norm (\d\.\d{4}) "
                    r"\((.+)\)$")


def write_items(path, items=ITEMS, hub_format=False):
    """A HellaSwag JSONL file: rowanz/hellaswag's (label an int) or the hub's (label a string, an
    activity_label)."""
    rows = [{"ind": i, "ctx": ctx, "endings": endings, "label": label, "split": "val"}
            for i, (ctx, endings, label) in enumerate(items)]
    if hub_format:
        rows = [{"activity_label": "Cats", "ctx": row["ctx"], "endings": row["endings"],
                 "label": str(row["label"])} for row in rows]
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def run(capsys, *argv) -> re.Match:
    assert exit_code(lambda: hellaswag.main([str(a) for a in argv])) == 0, capsys.readouterr().err
    out = capsys.readouterr().out.strip()
    report = REPORT.match(out)
    assert report, out
    return report


@pytest.fixture(scope="module")
def gpt2_model():
    """An untrained GPT in GPT-2's vocabulary, and GPT-2's tokenizer."""
    torch.manual_seed(0)
    return GPT(GPTConfig(vocab_size=50257, block_size=48, n_layer=2, n_head=2, n_embd=16)).eval(), \
        GPT2Tokenizer()


def expected(checkpoint, items=ITEMS) -> tuple[float, float]:
    """acc and acc_norm, an item at a time through the scoring functions."""
    model, tokenizer, _ = load_model(str(checkpoint))
    right = right_norm = 0
    for ctx, endings, label in items:
        tokens, mask = item_tokens(tokenizer, ctx, endings, model.config.block_size)
        sums, means = score_item(model, tokens, mask)
        right += choose(sums).item() == label
        right_norm += choose(means).item() == label
    return right / len(items), right_norm / len(items)


# ---------------------------------------------------------------- the command


def test_the_script_scores_a_checkpoint_from_either_format_in_batches_and_with_a_limit(
        checkpoints, tmp_path, capsys):
    ckpt = checkpoints["gpt"]
    original = write_items(tmp_path / "hellaswag_val.jsonl")
    hub = write_items(tmp_path / "hub.jsonl", hub_format=True)
    report = run(capsys, ckpt, "--data", original, "--device", "cpu", "--out", tmp_path / "a.json")
    assert report.group(1, 2, 5) == ("hellaswag_val.jsonl", "5", str(ckpt))
    acc, acc_norm = float(report.group(3)), float(report.group(4))
    assert (acc, acc_norm) == pytest.approx(expected(ckpt), abs=1e-4)
    saved = json.loads((tmp_path / "a.json").read_text())
    assert saved["items"] == 5 and saved["checkpoint"] == str(ckpt)
    assert (saved["acc"], saved["acc_norm"]) == pytest.approx((acc, acc_norm), abs=1e-4)

    # the same numbers from the hub's format, and from one item a forward pass (4 rows, padded
    # alone) as from 3 (12 rows of different items, padded to the longest)
    for argv in (["--data", hub], ["--data", original, "--batch-size", "1"],
                 ["--data", original, "--batch-size", "3"]):
        assert run(capsys, ckpt, *argv).group(3, 4) == report.group(3, 4), argv

    limited = run(capsys, ckpt, "--data", original, "--limit", "2")
    assert limited.group(2) == "2"
    assert (float(limited.group(3)), float(limited.group(4))) == pytest.approx(
        expected(ckpt, ITEMS[:2]), abs=1e-4)


def test_acc_takes_the_lowest_sum_and_acc_norm_the_lowest_mean(checkpoints, tmp_path, capsys):
    # by hand: ending 1 is short, so its sum is the lowest, ending 2 long, with the lowest mean
    sums, counts = torch.tensor([[4.0, 3.0, 6.0, 9.0]]), torch.tensor([[2, 1, 6, 3]])
    assert choose(sums).tolist() == [1] and choose(sums / counts).tolist() == [2]
    assert choose(torch.tensor([2.0, 1.0, 1.0, 3.0])).item() == 1  # a tie: the first

    # through the command: an item whose short ending has the lowest sum and a long one the
    # lowest mean; labelled with one, then the other, it is right by one rule only
    ckpt = checkpoints["gpt"]
    model, tokenizer, _ = load_model(str(ckpt))
    ctx, endings = "The cat sat on the mat.", ["A dog ran under the log.", "Qq.", "Happy.", "Red."]
    sums, means = score_item(model, *item_tokens(tokenizer, ctx, endings, 32))
    by_sum, by_mean = choose(sums).item(), choose(means).item()
    assert by_sum != by_mean, (sums, means)  # (the case this test needs)
    for label, right in ((by_sum, ("1.0000", "0.0000")), (by_mean, ("0.0000", "1.0000"))):
        data = write_items(tmp_path / "one.jsonl", [(ctx, endings, label)])
        assert run(capsys, ckpt, "--data", data).group(3, 4) == right


# ---------------------------------------------------------------- the scoring


@pytest.mark.parametrize("pos_emb", ["learned", "rope"])
def test_the_score_is_the_endings_cross_entropy_token_by_token(gpt2_model, pos_emb):
    _, tokenizer = gpt2_model
    torch.manual_seed(1)
    model = GPT(GPTConfig(vocab_size=50257, block_size=48, n_layer=2, n_head=2, n_embd=16,
                          pos_emb=pos_emb)).eval()
    ctx = "A man is sitting on a roof. He"
    endings = ["is using wrap to wrap a pair of skis.", "is ripping level tiles off.",
               "is holding a rubik's cube.", "starts pulling up roofing on a roof."]
    tokens, mask = item_tokens(tokenizer, ctx, endings, 48)
    sums, means = score_item(model, tokens, mask)
    for row, ending in enumerate(endings):
        ids = tokenizer.encode(ctx) + tokenizer.encode(" " + ending)
        n = len(tokenizer.encode(" " + ending))
        assert mask[row].sum().item() == n and tokens[row, :len(ids)].tolist() == ids
        with torch.no_grad():  # each ending token from the tokens before it alone, one at a time
            losses = [-torch.log_softmax(model(torch.tensor([ids[:t]]))[0][0, -1], -1)[ids[t]]
                      for t in range(len(ids) - n, len(ids))]
        assert sums[row].item() == pytest.approx(sum(losses).item(), abs=1e-4)
        assert means[row].item() == pytest.approx(sum(losses).item() / n, abs=1e-5)


def test_padding_changes_no_score(gpt2_model):
    model, tokenizer = gpt2_model
    items = [("The dog", ["ran.", "sat down on the old wooden chair by the door.", "a", "b c"]),
             ("Then the man picks up the long stick and", ["throws it.", "x", "y y", "z"])]
    tokenized = [item_tokens(tokenizer, ctx, endings, 48) for ctx, endings in items]
    T = max(tokens.shape[1] for tokens, _ in tokenized) + 5  # 5 more pads than any row needs
    together = score_item(model, pad_right([t for t, _ in tokenized], T),
                          pad_right([m for _, m in tokenized], T))  # (8,), (8,)
    alone = [score_item(model, *item_tokens(tokenizer, ctx, [ending], 48))
             for ctx, endings in items for ending in endings]  # each ending, unpadded
    for i, (sums, means) in enumerate(alone):
        assert together[0][i].item() == pytest.approx(sums.item(), abs=1e-4)
        assert together[1][i].item() == pytest.approx(means.item(), abs=1e-5)


def test_a_long_context_is_cut_from_the_left_keeping_the_ending_whole():
    tokenizer = CharTokenizer("abcdefghijklmnopqrstuvwxyz .")
    # the last ending is as long as can be: 11 tokens with its space, after 1 of the context
    ctx, endings = "the quick brown fox jumps over the lazy dog", ["runs.", "a", "sleeps all"]
    tokens, mask = item_tokens(tokenizer, ctx, endings, 12)
    assert tokens.shape == (3, 12)
    for row, ending in enumerate(endings):
        text = ctx + " " + ending
        kept = tokens[row][:min(12, len(text))]
        assert tokenizer.decode(kept.tolist()) == text[-12:]  # the last 12 characters
        assert tokenizer.decode(tokens[row][mask[row]].tolist()) == " " + ending  # all of it
    short, _ = item_tokens(tokenizer, "a dog", ["runs."], 12)  # fits: nothing cut
    assert tokenizer.decode(short[0].tolist()) == "a dog runs." and short.shape == (1, 11)
    with pytest.raises(ValueError, match="an ending is 12 tokens long; this model reads at most "
                                         "12"):
        item_tokens(tokenizer, ctx, ["runs.", "a" * 11], 12)  # no context token left before it


# ---------------------------------------------------------------- bad input


@pytest.mark.parametrize("row,message", [
    ({"ctx": "The dog", "endings": ["a", "b", "c", "d"], "label": 4},
     r"'label' is 4, not one of 0 to 3"),
    ({"ctx": "The dog", "endings": ["a", "b", "c"], "label": 0}, "it has 3 endings, not 4"),
    ({"endings": ["a", "b", "c", "d"], "label": "1"}, "no 'ctx'"),
    ({"ctx": "The dog", "endings": ["a", "b", "c", "d"], "label": "x"}, r"'label' is 'x'"),
    ("not json", r"not JSON"),
])
def test_a_bad_item_ends_in_one_line_naming_it(checkpoints, tmp_path, capsys, row, message):
    path = write_items(tmp_path / "bad.jsonl", ITEMS[:1])
    bad = row if isinstance(row, str) else json.dumps(row)
    path.write_text(path.read_text() + "\n" + bad + "\n")  # item 1, after a blank line
    assert exit_code(lambda: hellaswag.main([str(checkpoints["gpt"]), "--data", str(path)])) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"error: item 1 (line 3 of {path}): "), err
    assert re.search(message, err), err


@pytest.mark.parametrize("argv,message", [
    (["--data", "{items}", "--limit", "0"], "--limit and --batch-size must be at least 1"),
    (["--data", "{items}", "--split", "train"], "--split picks a split of Rowan/hellaswag"),
    (["--data", "missing.jsonl"], "--data missing.jsonl: no such file"),
    (["--data", "{unknown}"], r"item 1 \(line 2 of .*\) cannot be scored: characters not in the "
                              r"character vocabulary .*'7' \(and 1 more of the 3 items\): "
                              r"a character model reads only"),
])
def test_bad_arguments_and_text_the_tokenizer_cannot_encode_end_in_one_line(
        checkpoints, tmp_path, capsys, argv, message):
    files = {"{items}": str(write_items(tmp_path / "items.jsonl")),
             "{unknown}": str(write_items(tmp_path / "unknown.jsonl", [
                 ITEMS[0], ("The 7 dogs", ITEMS[0][1], 0), ("The cat", ["sat", "ran", "a", "7"], 0),
             ]))}
    argv = [files.get(a, a) for a in argv]
    assert exit_code(lambda: hellaswag.main([str(checkpoints["gpt"]), *argv])) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and re.search(message, err), err


@pytest.fixture
def offline(tmp_path, monkeypatch):
    """No network, and empty Hugging Face caches."""
    import datasets
    import huggingface_hub

    for var in ("HF_HOME", "HF_DATASETS_CACHE"):
        monkeypatch.setenv(var, str(tmp_path / var))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    # (read by the libraries at import, which may have been earlier in this process)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "HF_DATASETS_CACHE")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))


def test_offline_without_data_it_fails_at_once_pointing_to_data(checkpoints, offline, capsys):
    start = time.perf_counter()
    assert exit_code(lambda: hellaswag.main([str(checkpoints["gpt"])])) == 1
    assert time.perf_counter() - start < 10  # (not the ~20 s of retries)
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "'Rowan/hellaswag' is not" in err, err
    assert "the hub cannot be reached" in err and "--data path/to/hellaswag_val.jsonl" in err


def test_a_published_gpt2_offline_and_not_cached_fails_at_once(tmp_path, offline, capsys):
    pytest.importorskip("transformers")
    data = write_items(tmp_path / "items.jsonl")
    start = time.perf_counter()
    assert exit_code(lambda: hellaswag.main(["gpt2", "--data", str(data)])) == 1
    assert time.perf_counter() - start < 30  # (importing transformers takes seconds)
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "gpt2 is not in the Hugging Face cache" in err, err
