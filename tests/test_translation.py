"""Parallel data, the BPE vocabulary, training a seq2seq model through Lightning, and
scripts/translate.py."""

import csv
import json
import logging
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
from conftest import REPO, REVERSE_WORDS, reverse_pairs, write_parallel

from data.batching import token_batches
from data.corpus import DataSourceError, _hub_splits
from data.tokenizers import BPETokenizer, tokenizer_from_dict
from data.translation import PairBatches, TranslationDataModule, load_pairs
from model import Seq2SeqConfig, greedy_search
from model.checkpoint import load_gpt_checkpoint, load_seq2seq_checkpoint
from model.translate import bleu, translate
from scripts import translate as translate_script
from train import Seq2SeqLightningModule
from training.callbacks import EMA


@pytest.fixture(scope="module")
def reverse_folder(tmp_path_factory) -> Path:
    return write_parallel(tmp_path_factory.mktemp("reverse"), {"train": reverse_pairs(2000, 0),
                                                               "val": reverse_pairs(100, 1)})


def data_module(folder: Path, **overrides) -> TranslationDataModule:
    args = dict(source=str(folder), src_lang="xx", tgt_lang="yy", vocab_size=40, max_len=16, max_tokens=400)
    return TranslationDataModule(**{**args, **overrides})


# ------------------------------------------------------------------ data


def test_aligned_gzipped_files_load_and_empty_pairs_are_dropped(tmp_path, caplog):
    caplog.set_level(logging.INFO)
    pairs = {"train": [("ein Hund", "a dog"), ("", "orphan"), ("zwei Katzen", "two cats")],
             "val": [("ein Haus", "a house")]}
    loaded = load_pairs(str(write_parallel(tmp_path, pairs, "de", "en", gz=True)), "de", "en")
    assert loaded["train"] == (["ein Hund", "zwei Katzen"], ["a dog", "two cats"])
    assert loaded["val"] == (["ein Haus"], ["a house"])
    assert "dropped 1 of 3 pairs with an empty side" in caplog.text


def test_a_test_split_loads_where_there_is_one_and_half_of_one_is_refused(tmp_path):
    pairs = {"train": [("ein Hund", "a dog")], "val": [("ein Haus", "a house")],
             "test": [("eine Katze", "a cat"), ("", "orphan")]}
    folder = write_parallel(tmp_path / "lines", pairs, "de", "en", gz=True)
    assert load_pairs(str(folder), "de", "en")["test"] == (["eine Katze"], ["a cat"])
    assert "test" not in load_pairs(str(write_parallel(tmp_path / "none", {
        k: v for k, v in pairs.items() if k != "test"}, "de", "en")), "de", "en")
    (folder / "test.en.gz").unlink()
    with pytest.raises(DataSourceError, match=r"test.de.gz but no test.en\[.gz\]: a test split needs both"):
        load_pairs(str(folder), "de", "en")
    jsonl = _jsonl(tmp_path / "jsonl")
    (jsonl / "test.jsonl").write_text(json.dumps({"de": "eine Katze", "en": "a cat"}) + "\n")
    assert load_pairs(str(jsonl), "de", "en")["test"] == (["eine Katze"], ["a cat"])


def test_a_hub_datasets_test_split_is_kept_for_translation_only():
    from datasets import Dataset, DatasetDict

    one = Dataset.from_dict({"de": ["a"], "en": ["b"]})
    hub = DatasetDict({"train": one, "validation": one, "test": one})
    assert set(_hub_splits(hub, "someone/pairs", keep_test=True)) == {"train", "val", "test"}
    assert set(_hub_splits(hub, "someone/pairs")) == {"train", "val"}  # language modelling's
    published = DatasetDict({"train": one, "validation": one, "test": one})  # val = both of them
    assert set(_hub_splits(published, "karpathy/tiny_shakespeare", keep_test=True)) == {"train", "val"}


def test_jsonl_pairs_load_in_either_layout(tmp_path):
    (tmp_path / "train.jsonl").write_text(json.dumps({"de": "ein Hund", "en": "a dog"}) + "\n"
                                          + json.dumps({"de": "eine Katze", "en": "a cat"}) + "\n")
    (tmp_path / "val.jsonl").write_text(json.dumps({"translation": {"de": "ein Haus", "en": "a house"}}) + "\n")
    loaded = load_pairs(str(tmp_path), "de", "en")
    assert loaded["train"] == (["ein Hund", "eine Katze"], ["a dog", "a cat"])
    assert loaded["val"] == (["ein Haus"], ["a house"])


def test_bad_parallel_sources_get_clear_errors(tmp_path):
    folder = write_parallel(tmp_path / "a", {"train": [("a", "b")] * 3, "val": [("a", "b")]}, "de", "en")
    (folder / "train.en").write_text("b\nb\n")
    with pytest.raises(DataSourceError, match=r"train.de has 3 lines but .*train.en has 2: the files must be aligned"):
        load_pairs(str(folder), "de", "en")
    with pytest.raises(DataSourceError, match=r"has no val.de\[.gz\] or val.fr\[.gz\]: a translation folder needs"):
        load_pairs(str(write_parallel(tmp_path / "b", {"train": [("a", "b")]}, "de", "fr")), "de", "fr")
    with pytest.raises(DataSourceError, match="no \\['fr'\\] column"):
        load_pairs(str(_jsonl(tmp_path / "c")), "de", "fr")
    with pytest.raises(DataSourceError, match="not a folder of parallel text files nor a hub "
                                              "dataset id"):
        load_pairs(str(tmp_path / "missing.txt"), "de", "en")


def _jsonl(folder: Path) -> Path:
    folder.mkdir()
    for split in ("train", "val"):
        (folder / f"{split}.jsonl").write_text(json.dumps({"de": "a", "en": "b"}) + "\n")
    return folder


def test_a_hub_id_offline_fails_fast_with_a_hint(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    start = time.perf_counter()
    with pytest.raises(DataSourceError, match="cannot be reached.*multi30k"):
        load_pairs("bentrevett/multi30k", "de", "en")
    assert time.perf_counter() - start < 10


def test_over_long_pairs_are_dropped_and_reported(tmp_path, caplog):
    caplog.set_level(logging.INFO)
    long = " ".join(REVERSE_WORDS * 3)
    folder = write_parallel(tmp_path, {"train": reverse_pairs(50, 0) + [(long, "ab")], "val": reverse_pairs(5, 1)})
    dm = data_module(folder)
    assert len(dm.ids["train"][0]) == 50
    assert "train: dropped 1 of 51 pairs longer than max_len (16 tokens)" in caplog.text


def test_dev_split_is_held_out_of_train_at_random_and_the_same_each_time(tmp_path):
    pairs = [(f"q{i}", f"a{i}") for i in range(50)]
    folder = write_parallel(tmp_path, {"train": pairs, "val": pairs[:3]})
    texts = data_module(folder, dev_size=10).texts
    dev, train = set(zip(*texts["dev"], strict=True)), set(zip(*texts["train"], strict=True))
    assert len(dev) == 10 and len(train) == 40 and dev.isdisjoint(train) and dev | train == set(pairs)
    assert dev != set(pairs[:10])  # drawn at random, not the head of the file
    assert data_module(folder, dev_size=10).texts["dev"] == texts["dev"]
    assert "dev" not in data_module(folder).texts
    with pytest.raises(DataSourceError, match=r"dev_size \(50\) must be smaller than the 50 training pairs"):
        data_module(folder, dev_size=50).texts  # noqa: B018
    with pytest.raises(ValueError, match="dev_size must be 0"):
        data_module(folder, dev_size=-1)


def test_bpe_vocabulary_is_trained_on_train_only_round_trips_and_has_fixed_specials(reverse_folder):
    dm = data_module(reverse_folder)
    tok = dm.tokenizer
    assert tok.vocab_size == 40
    assert [tok.tokenizer.id_to_token(i) for i in range(4)] == ["<pad>", "<bos>", "<eos>", "<unk>"]
    for source in dm.texts["val"][0][:20]:
        assert tok.decode(tok.encode(source)) == source
    again = tokenizer_from_dict(tok.to_dict())
    assert again.encode("ab cd") == tok.encode("ab cd")
    assert BPETokenizer.train(["zz yy"] * 5, 40).encode("ab") != tok.encode("ab")  # built from its own text


def test_token_batches_respect_the_budget_and_cover_every_pair_once():
    rng = np.random.default_rng(0)
    lengths = rng.integers(1, 40, size=1000)
    for shuffle in (None, np.random.default_rng(1)):
        batches = token_batches(lengths, 300, shuffle)
        assert sorted(np.concatenate(batches).tolist()) == list(range(1000))
        assert all(len(b) * lengths[b].max() <= 300 for b in batches)
        padded = sum(len(b) * lengths[b].max() for b in batches)
        assert padded < 1.1 * lengths.sum()  # grouped by length: padding stays small


def test_pair_batches_are_padded_shifted_and_reshuffled_each_epoch():
    src = [[5, 6, 7], [8], [9, 10]]
    tgt = [[11, 12], [13, 14, 15], [16]]
    data = PairBatches(src, tgt, max_tokens=100, shuffle=True, seed=0)
    (s, tin, tout), = list(data)
    row = [i for i in range(3) if s[i, 0] == 8][0]
    assert s[row].tolist() == [8, 0, 0] and tin[row].tolist() == [1, 13, 14, 15] and tout[row].tolist() == [
        13, 14, 15, 2]
    many = PairBatches([[4]] * 200, [[5]] * 200, max_tokens=20, shuffle=True, seed=0)
    first, second = [b[0].size(0) for b in many], [b[0].size(0) for b in many]
    assert data.epoch == 1 and many.epoch == 2 and sum(first) == sum(second) == 200
    ranks = []
    for rank in range(2):
        part = PairBatches([[i + 4] for i in range(60)], [[5]] * 60, max_tokens=8, shuffle=True, seed=0)
        part.rank, part.world_size = rank, 2
        ranks.append({int(x) for b in part for x in b[0].flatten()})
    assert not ranks[0] & ranks[1] and len(ranks[0]) == len(ranks[1])  # disjoint halves, equal counts


# ------------------------------------------------------------------ training


def test_tuning_the_length_penalty_without_a_dev_split_is_refused_before_training(reverse_folder):
    dm = data_module(reverse_folder)
    config = Seq2SeqConfig(vocab_size=dm.vocab_size, max_len=16, n_encoder_layer=1, n_decoder_layer=1, n_head=2,
                           n_embd=16, mlp_hidden=32)
    module = Seq2SeqLightningModule(config, tune_length_penalty=[0.6, 1.0])
    trainer = L.Trainer(max_steps=1, logger=False, enable_progress_bar=False, enable_checkpointing=False)
    with pytest.raises(ValueError, match="tune_length_penalty needs a dev split to tune on: set "
                                         "--data.dev_size"):
        trainer.fit(module, datamodule=dm)
    assert trainer.global_step == 0


@pytest.fixture(scope="module")
def trained(reverse_folder, tmp_path_factory):
    """A small model trained on the reverse task through the real Lightning path; its checkpoint."""
    L.seed_everything(0)
    dm = data_module(reverse_folder)
    config = Seq2SeqConfig(vocab_size=dm.vocab_size, max_len=16, n_encoder_layer=2, n_decoder_layer=2, n_head=4,
                           n_embd=64, mlp_hidden=128, dropout=0.0, label_smoothing=0.0, attn_impl="naive")
    module = Seq2SeqLightningModule(config, lr=3e-3, min_lr=3e-4, warmup_steps=30, val_bleu=False, beam_size=2)
    start_loss = L.Trainer(logger=False, enable_progress_bar=False, enable_checkpointing=False).validate(
        module, datamodule=dm, verbose=False)[0]["val/loss"]
    folder = tmp_path_factory.mktemp("run")
    trainer = L.Trainer(max_steps=400, val_check_interval=None, check_val_every_n_epoch=100, logger=False,
                        enable_progress_bar=False, enable_model_summary=False, default_root_dir=folder,
                        enable_checkpointing=False, gradient_clip_val=1.0, callbacks=[EMA(0.99)])
    trainer.fit(module, datamodule=dm)
    end_loss = trainer.validate(module, datamodule=dm, verbose=False)[0]["val/loss"]
    trainer.save_checkpoint(folder / "reverse.ckpt")
    return {"module": module, "dm": dm, "start": start_loss, "end": end_loss, "ckpt": folder / "reverse.ckpt"}


@pytest.mark.slow
def test_loss_falls_and_greedy_decoding_solves_the_reverse_task(trained):
    assert trained["start"] > 3.0 and trained["end"] < 0.5, (trained["start"], trained["end"])
    module, (sources, references) = trained["module"].eval(), trained["dm"].texts["val"]
    hypotheses = translate(module.model, module.tokenizer, sources, beam_size=1)
    exact = np.mean([h == r for h, r in zip(hypotheses, references, strict=True)])
    assert exact >= 0.9, list(zip(sources[:5], hypotheses[:5], strict=True))
    assert bleu(translate(module.model, module.tokenizer, sources, beam_size=2), references)["bleu"] > 80


@pytest.mark.slow
def test_checkpoint_rebuilds_the_model_and_tokenizer_alone(trained):
    model, tokenizer = load_seq2seq_checkpoint(str(trained["ckpt"]))
    src = torch.tensor([tokenizer.encode("ab cd ef gh")])
    assert tokenizer.decode(greedy_search(model, src)[0]) == "gh ef cd ab"
    with pytest.raises(ValueError, match="holds a seq2seq model, not a gpt one"):
        load_gpt_checkpoint(str(trained["ckpt"]))


@pytest.mark.slow
def test_translate_script_translates_and_scores_from_a_subprocess(trained, reverse_folder, tmp_path):
    script, ckpt = str(REPO / "scripts" / "translate.py"), str(trained["ckpt"])
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    one = subprocess.run([sys.executable, script, "--ckpt", ckpt, "--text", "ab cd ef"], capture_output=True,
                         text=True, timeout=120, env=env)
    assert one.returncode == 0, one.stderr[-2000:]
    assert one.stdout == "ef cd ab\n"
    piped = subprocess.run([sys.executable, script, "--ckpt", ckpt, "--beam", "1"], input="ab cd ef\n\nst qr op\n",
                           capture_output=True, text=True, timeout=120, env=env)
    assert piped.stdout == "ef cd ab\n\nop qr st\n"  # an empty line stays empty
    out = tmp_path / "hyps.txt"
    scored = subprocess.run([sys.executable, script, "--ckpt", ckpt, "--eval", str(reverse_folder / "val.xx"),
                             str(reverse_folder / "val.yy"), "--output", str(out)], capture_output=True, text=True,
                            timeout=120, env=env)
    assert scored.returncode == 0, scored.stderr[-2000:]
    assert scored.stdout.startswith("sacreBLEU ") and "(lowercase " in scored.stdout and "beam 4" in scored.stdout
    assert "nrefs:1|case:mixed|eff:no|tok:13a|smooth:exp|version:" in scored.stdout  # sacreBLEU's signature
    assert float(scored.stdout.split()[1]) > 80
    assert len(out.read_text().splitlines()) == 100


@pytest.mark.parametrize("argv,message", [
    (["--ckpt", "missing.ckpt", "--text", "a"], "no checkpoint at missing.ckpt"),
    (["--text", "a", "--beam", "0"], "--beam and --max-tokens must be at least 1"),
    (["--eval", "nope.de", "nope.en"], "cannot read nope.de"),
    (["--text", "a", "--output", "x.txt"], "--output goes with --eval"),
])
def test_translate_script_bad_input(checkpoints, argv, message):
    # any seq2seq checkpoint: conftest's, which most workers build anyway, not this file's trained
    # one, which each worker that runs a test of it trains again
    args = argv if argv[0] == "--ckpt" else ["--ckpt", str(checkpoints["seq2seq"]), *argv]
    with pytest.raises(ValueError, match=message):
        translate_script.main(args)


@pytest.mark.slow
def test_cli_trains_seq2seq_from_the_config_kind(reverse_folder, tmp_path):
    """configs/multi30k_de_en.yaml says kind: seq2seq; train.py picks the classes from it. The
    length penalty is chosen on dev, and the test split scored once with it, at the end."""
    folder = write_parallel(tmp_path / "data", {"train": reverse_pairs(2000, 0),
                                                "val": reverse_pairs(100, 1),
                                                "test": reverse_pairs(50, 2)})
    result = subprocess.run(
        [sys.executable, "train.py", "fit", "--config", "configs/multi30k_de_en.yaml",
         "--data.source", str(folder), "--data.src_lang", "xx", "--data.tgt_lang", "yy",
         "--data.vocab_size", "40", "--data.max_len", "16", "--data.max_tokens", "400",
         "--model.config.n_embd", "32", "--model.config.mlp_hidden", "64", "--trainer.max_steps", "6",
         "--trainer.max_time", "null", "--trainer.check_val_every_n_epoch", "null",
         "--trainer.val_check_interval", "6", "--trainer.limit_val_batches", "2", "--model.beam_size", "2",
         "--data.dev_size", "20", "--model.tune_length_penalty", "[0.6, 1.0]",
         "--run.save_dir", str(tmp_path), "--trainer.enable_progress_bar", "false"],
        cwd=REPO, capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    output = result.stdout + result.stderr
    assert re.search(r"Dev sacreBLEU \(beam 2\) by length penalty: 0.6: [\d.]+, 1.0: [\d.]+; using (0.6|1.0)\n",
                     output), output[-3000:]
    chosen = re.search(r"using (0.6|1.0)", output).group(1)
    assert re.search(rf"Final sacreBLEU \(beam 2, length penalty {chosen}\): val [\d.]+ cased, "
                     r"[\d.]+ lowercase; test [\d.]+ cased, [\d.]+ lowercase \(nrefs:1\|case:mixed\|"
                     r"eff:no\|tok:13a\|smooth:exp\|version:[\d.]+\); \d+ s of evaluation", output)
    assert "val sacreBLEU" in result.stdout + result.stderr
    ckpts = list(tmp_path.rglob("last.ckpt"))
    assert ckpts and torch.load(ckpts[0], weights_only=True)["model_kind"] == "seq2seq"
    with open(next(tmp_path.rglob("metrics.csv"))) as f:
        final = [row for row in csv.DictReader(f) if row.get("final/test_bleu")]
    assert len(final) == 1 and {"final/bleu", "final/test_bleu_lc"} <= final[0].keys()
