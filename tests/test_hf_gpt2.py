"""GPT-2 in the Hugging Face format in and out of our GPT (model/hf_gpt2.py), warm starts
(``--model.init_from``), and the scripts that take a source. Offline: the reference models are
small random GPT2LMHeadModels built here by transformers itself."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import GPT2_SHAPED, REPO, fit, run_folders

from model import ATTENTION_KERNELS, GPT, GPTConfig
from model.checkpoint import load_gpt_weights, load_model, source_config
from model.hf_gpt2 import HFImportError, save_hf
from scripts import export_hf, sample

transformers = pytest.importorskip("transformers")

TOL = 1e-5  # fp32 logits: the same sums in another order (Conv1D's addmm, our Linear)


def make_hf_gpt2(folder: Path, vocab_size: int = 97, seed: int = 0, **config) -> Path:
    """A GPT2LMHeadModel of a small config, saved to ``folder``. Its weights are drawn wide
    (std 0.2, biases and LayerNorm gains included, not GPT-2's 0.02 and zeros), so that a weight
    mapped to the wrong place, or left untransposed, changes the logits far beyond TOL."""
    torch.manual_seed(seed)
    hf_config = transformers.GPT2Config(**{"n_layer": 2, "n_head": 4, "n_embd": 32,
                                           "n_positions": 64, "vocab_size": vocab_size,
                                           "bos_token_id": None, "eos_token_id": None, **config})
    model = transformers.GPT2LMHeadModel(hf_config)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.2)
    model.save_pretrained(folder)
    return folder


def hf_logits(folder: Path, idx: torch.Tensor) -> torch.Tensor:
    model = transformers.GPT2LMHeadModel.from_pretrained(folder).eval()
    with torch.no_grad():
        return model(idx).logits


def our_logits(model: GPT, idx: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(idx)[0]


@pytest.fixture
def gpt2_folder(tmp_path) -> Path:
    """A small GPT-2 with GPT-2's vocabulary: it takes the GPT-2 tokenizer, so runs can warm-start
    from it."""
    return make_hf_gpt2(tmp_path / "tiny-gpt2", vocab_size=50257)


# ------------------------------------------------------------------------------------------------
# Import and export


@pytest.mark.parametrize("attn_impl", sorted(ATTENTION_KERNELS))
@pytest.mark.parametrize("hf_config", [{}, {"activation_function": "gelu_pytorch_tanh"},
                                       {"activation_function": "gelu"},
                                       {"tie_word_embeddings": False}],
                         ids=["gpt2", "pytorch_tanh", "exact_gelu", "untied"])
def test_an_imported_gpt2_computes_the_logits_of_transformers(tmp_path, attn_impl, hf_config):
    folder = make_hf_gpt2(tmp_path / "hf", **hf_config)
    _, config, tokenizer = source_config(str(folder))
    model = GPT(GPTConfig(**{**config, "attn_impl": attn_impl}))
    load_gpt_weights(model, load_model(str(folder))[0].state_dict(), str(folder))
    idx = torch.randint(0, 97, (3, 64), generator=torch.Generator().manual_seed(1))
    expected = hf_logits(folder, idx)
    assert expected.std() > 1.0  # logits that a misplaced weight would change
    torch.testing.assert_close(our_logits(model, idx), expected, atol=TOL, rtol=0)
    assert tokenizer is None  # 97 tokens: not GPT-2's vocabulary, and no tokenizer of ours saved
    assert model.config.tie_embeddings == hf_config.get("tie_word_embeddings", True)


def test_a_shorter_block_size_keeps_the_first_positions(tmp_path):
    folder = make_hf_gpt2(tmp_path / "hf")
    _, config, _ = source_config(str(folder))
    model = GPT(GPTConfig(**{**config, "block_size": 16}))
    load_gpt_weights(model, load_model(str(folder))[0].state_dict(), str(folder))
    idx = torch.randint(0, 97, (2, 16), generator=torch.Generator().manual_seed(2))
    torch.testing.assert_close(our_logits(model, idx), hf_logits(folder, idx), atol=TOL, rtol=0)


@pytest.mark.parametrize("bias", [True, False])
def test_an_exported_gpt_loads_in_transformers_with_the_same_logits(tmp_path, bias):
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=50257, block_size=32, n_layer=2, n_head=2, n_embd=16,
                          bias=bias, mlp="gelu_tanh"))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.2)
    from data.tokenizers import GPT2Tokenizer

    folder = save_hf(model, tmp_path / "exported", GPT2Tokenizer())
    idx = torch.randint(0, 50257, (2, 32), generator=torch.Generator().manual_seed(3))
    ours = our_logits(model, idx)
    torch.testing.assert_close(hf_logits(folder, idx), ours, atol=TOL, rtol=0)

    # and back: the folder is a source here, GPT-2's tokenizer with it
    again, tokenizer, kind = load_model(str(folder))
    torch.testing.assert_close(our_logits(again, idx), ours, atol=TOL, rtol=0)
    assert (kind, tokenizer.name, again.config.bias, again.config.mlp) == ("gpt", "gpt2", True,
                                                                          "gelu_tanh")
    # transformers reads the tokenizer files written beside the weights as GPT-2's own
    text = "O Romeo, Romeo! wherefore art thou Romeo?"
    hf_tokenizer = transformers.AutoTokenizer.from_pretrained(folder)
    assert hf_tokenizer(text)["input_ids"] == GPT2Tokenizer().encode(text)


def test_a_character_model_exports_with_its_tokenizer(checkpoints, tmp_path):
    ckpt = checkpoints["gpt"]  # of GPT-2's architecture
    out = tmp_path / "exported"
    export_hf.main(["--ckpt", str(ckpt), "--out", str(out)])
    model, tokenizer, _ = load_model(str(out))
    trained, trained_tokenizer, _ = load_model(str(ckpt))
    assert tokenizer.to_dict() == trained_tokenizer.to_dict()
    idx = torch.tensor([trained_tokenizer.encode("The cat sat on the mat.")])
    torch.testing.assert_close(our_logits(model, idx), our_logits(trained, idx), atol=TOL, rtol=0)
    with pytest.raises(ValueError, match="exists and is not an empty folder"):
        export_hf.main(["--ckpt", str(ckpt), "--out", str(out)])


def test_an_architecture_gpt2_cannot_hold_is_not_exported(tmp_path):
    model = GPT(GPTConfig(vocab_size=50, block_size=16, n_layer=1, n_head=2, n_embd=16,
                          pos_emb="rope", qk_norm=True, mlp="relu2", smear=True))
    with pytest.raises(ValueError, match=r"GPT-2's format has no place for pos_emb 'rope', "
                                         r"mlp 'relu2', qk_norm True, smear True: only a model "
                                         r"of GPT-2's"):
        save_hf(model, tmp_path / "out")
    assert not (tmp_path / "out").exists()


# ------------------------------------------------------------------------------------------------
# Sources that cannot be imported: one clear line each


def write_config(folder: Path, **config) -> Path:
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps(config))
    return folder


def test_sources_that_do_not_import_say_why(tmp_path, monkeypatch):
    with pytest.raises(HFImportError, match=r"'gpt3' is no model this project knows: give one of "
                                            r"gpt2, gpt2-medium, gpt2-large, gpt2-xl"):
        load_model("gpt3")
    llama = write_config(tmp_path / "llama", model_type="llama", hidden_size=64)
    with pytest.raises(HFImportError, match="holds a 'llama' model, not GPT-2"):
        load_model(str(llama))
    variant = write_config(tmp_path / "variant", model_type="gpt2", n_layer=1, n_head=2, n_embd=16,
                           n_positions=8, vocab_size=10, n_inner=100, activation_function="relu")
    with pytest.raises(HFImportError, match=r"activation_function 'relu' .*, n_inner 100"):
        load_model(str(variant))
    with pytest.raises(HFImportError, match="has no config.json"):
        load_model(str(tmp_path))
    folder = make_hf_gpt2(tmp_path / "no-weights")
    (folder / "model.safetensors").unlink()
    with pytest.raises(HFImportError, match="weights in .* cannot be read"):
        load_model(str(folder))

    # offline, and not in the (empty, temporary) Hugging Face cache: at once, with what to do
    monkeypatch.setattr("data.corpus.hub_reachable", lambda timeout=1.0: False)
    with pytest.raises(HFImportError, match=r"gpt2-medium is not in the Hugging Face cache, and "
                                            r"the hub cannot be reached \(offline\)"):
        load_model("gpt2-medium")
    # the architecture of a published size is known without the hub
    assert source_config("gpt2-xl")[1]["n_layer"] == 48

    monkeypatch.setitem(sys.modules, "transformers", None)  # as if not installed
    with pytest.raises(HFImportError, match=r"pip install -e '.\[hf\]'"):
        load_model(str(make_hf_gpt2(tmp_path / "fine")))


def test_the_command_line_shows_one_line(tmp_path):
    result = subprocess.run([sys.executable, str(REPO / "scripts" / "sample.py"), "--init-from",
                             str(make_hf_gpt2(tmp_path / "hf"))],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert result.stderr.startswith("error: ")
    assert "no tokenizer this project knows" in result.stderr


def test_sample_takes_an_imported_gpt2(gpt2_folder, capsys):
    sample.main(["--init-from", str(gpt2_folder), "--prompt", "ROMEO:", "--max-new-tokens", "5",
                 "--temperature", "0"])
    text = capsys.readouterr().out.split("\n---")[0]
    model, tokenizer, _ = load_model(str(gpt2_folder))
    ids = torch.tensor([tokenizer.encode("ROMEO:")])
    assert text == tokenizer.decode(model.generate(ids, 5, temperature=0)[0].tolist())


# ------------------------------------------------------------------------------------------------
# Warm starts through train.py


def finetune_run(source, text_file: Path, save_dir: Path, *extra: str) -> list[str]:
    """train.py arguments for a tiny fine-tune with the shipped config, from ``source``."""
    return ["fit", "--config", str(REPO / "configs" / "finetune_shakespeare_gpt2.yaml"),
            "--model.init_from", str(source), "--data.source", str(text_file),
            "--data.cache_dir", str(save_dir / "cache"), "--data.block_size", "16",
            "--data.batch_size", "2", "--trainer.accumulate_grad_batches", "1",
            "--trainer.max_steps", "6", "--trainer.val_check_interval", "3",
            "--trainer.limit_val_batches", "2", "--model.val_samples", "0",
            "--trainer.enable_progress_bar", "false", "--run.save_dir", str(save_dir), *extra]


@pytest.fixture
def first_step(monkeypatch) -> list[dict]:
    """What each run of train.py in this test had when its training began: its step, weights and
    optimizer state."""
    import train

    seen = []
    on_train_start = train.GPTLightningModule.on_train_start

    def record(self):
        on_train_start(self)
        optimizer = self.trainer.optimizers[0]
        states = [o.state_dict()["state"] for o in getattr(optimizer, "optimizers", [optimizer])]
        seen.append({"step": self.global_step, "optimizer_state": states,
                     "weights": {k: v.to("cpu", copy=True)
                                 for k, v in self.model.state_dict().items()}})

    monkeypatch.setattr(train.GPTLightningModule, "on_train_start", record)
    return seen


def test_a_warm_start_from_gpt2_begins_with_its_weights_and_a_fresh_optimizer(
        gpt2_folder, text_file, tmp_path, first_step):
    from train import main

    main(finetune_run(gpt2_folder, text_file, tmp_path))
    start, = first_step
    source = load_model(str(gpt2_folder))[0].state_dict()
    source["wpe.weight"] = source["wpe.weight"][:16]  # the run's block_size: the first 16 positions
    assert start["step"] == 0 and start["optimizer_state"] == [{}]
    assert start["weights"].keys() == source.keys()
    for key, value in source.items():
        assert torch.equal(start["weights"][key], value), key

    folder, = run_folders(tmp_path)
    config = (folder / "config.yaml").read_text()
    assert f"init_from: {gpt2_folder}" in config and "n_layer: 2" in config  # the source's shape
    trained, tokenizer, _ = load_model(str(folder / "checkpoints" / "last.ckpt"))
    assert tokenizer.name == "gpt2" and trained.config.mlp == "gelu_tanh"
    assert not torch.equal(trained.state_dict()["wte.weight"], source["wte.weight"])  # it trained


def test_validate_with_init_from_measures_the_source_as_it_comes(gpt2_folder, text_file, tmp_path):
    """`train.py validate --model.init_from gpt2`: GPT-2's val loss before any fine-tuning."""
    from train import main

    args = finetune_run(gpt2_folder, text_file, tmp_path)
    # fp32 on the CPU, as the reference below: under bf16 (a GPU, or a CPU with bf16 instructions)
    # or TF32 (a GPU's fp32) the loss differs by ~1e-3 (measured on an H100), past this tolerance
    cli = main(["validate", *args[1:args.index("--trainer.accumulate_grad_batches")],
                "--trainer.limit_val_batches", "3", "--run.save_dir", str(tmp_path),
                "--trainer.accelerator", "cpu", "--trainer.precision", "32-true"])
    model, _, _ = load_model(str(gpt2_folder))
    losses = []
    for x, y in list(cli.datamodule.val_dataloader())[:3]:  # the batches validate saw
        losses.append(torch.nn.functional.cross_entropy(our_logits(model, x).flatten(0, 1),
                                                        y.flatten()))
    expected = torch.stack(losses).mean()  # equal-sized batches: the mean of means
    assert cli.trainer.callback_metrics["val/loss"] == pytest.approx(expected.item(), abs=1e-5)


def test_a_warm_start_from_a_checkpoint_is_a_new_run_and_ckpt_path_still_resumes(
        checkpoints, tmp_path, first_step):
    source = tmp_path / "source.ckpt"  # a copy, deleted before the resume
    shutil.copy(checkpoints["gpt"], source)
    shape = ["--data.block_size", "32", *GPT2_SHAPED, "--model.config.n_layer", "2"]  # the source's
    fit(checkpoints["text"], tmp_path, *shape, "--model.init_from", str(source),
        "--trainer.max_steps", "10", "--model.lr", "1e-3")
    warm = first_step[0]
    source_weights = load_model(str(source))[0].state_dict()
    assert warm["step"] == 0 and all(state == {} for state in warm["optimizer_state"])
    assert all(torch.equal(warm["weights"][k], v) for k, v in source_weights.items())
    folder, = run_folders(tmp_path)  # a run folder of its own

    # resumed with --ckpt_path: its checkpoint's weights and step, the source not read again (a
    # warm start's architecture is checked against the checkpoint being resumed)
    last = folder / "checkpoints" / "last.ckpt"
    saved = torch.load(last, weights_only=True)
    source.unlink()
    fit(checkpoints["text"], tmp_path, *shape, "--model.init_from", str(source),
        "--trainer.max_steps", "14", "--model.lr", "1e-3", "--ckpt_path", str(last))
    resumed = first_step[1]
    assert resumed["step"] == 10 and run_folders(tmp_path) == [folder]
    assert all(resumed["optimizer_state"])  # the optimizer's moments, restored
    for key, value in saved["state_dict"].items():
        assert torch.equal(resumed["weights"][key.removeprefix("model.")], value), key


def test_a_warm_start_from_a_source_older_than_smear_takes_it_as_off():
    from dataclasses import asdict

    from training.resume import take_architecture

    defaults = asdict(GPTConfig())
    older = {key: value for key, value in defaults.items() if key != "smear"}  # no such field
    with pytest.raises(ValueError, match="model.config.smear is True here but False there"):
        take_architecture(dict(defaults, smear=True), older, defaults, "old.ckpt")
    ours = dict(defaults)
    take_architecture(ours, older, defaults, "old.ckpt")
    assert ours["smear"] is False


def test_warm_start_mistakes_get_one_clear_message(checkpoints, gpt2_folder, text_file, tmp_path):
    from train import main

    with pytest.raises(ValueError, match=r"reads gpt2 tokens, but the data is tokenized with "
                                         r"--data.tokenizer char: the tokenizer comes with the "
                                         r"weights; set --data.tokenizer gpt2"):
        main(finetune_run(gpt2_folder, text_file, tmp_path, "--data.tokenizer", "char"))
    with pytest.raises(ValueError, match=r"was trained on another character vocabulary than "
                                         r"this data's \(46 characters\)"):
        other = tmp_path / "other.txt"  # characters the checkpoint's vocabulary does not have
        other.write_text("XYZ!? " + text_file.read_text())
        fit(other, tmp_path, "--data.block_size", "32", *GPT2_SHAPED, "--model.config.n_layer",
            "2", "--model.init_from", str(checkpoints["gpt"]))
    with pytest.raises(ValueError, match=r"keeps the architecture of the model it starts from: "
                                         r"model.config.smear is True here but False there; "
                                         r"model.config.n_layer is 1 here but 2 there; "
                                         r"model.config.pos_emb is 'rope' here but 'learned'"):
        fit(checkpoints["text"], tmp_path, "--data.block_size", "32", "--model.init_from",
            str(checkpoints["gpt"]))
    with pytest.raises(ValueError, match=r"--data.block_size 128 is longer than the 64 positions"):
        main(finetune_run(gpt2_folder, text_file, tmp_path, "--data.block_size", "128"))
    with pytest.raises(ValueError, match="holds a seq2seq model; a gpt run cannot start from it"):
        main(finetune_run(checkpoints["seq2seq"], text_file, tmp_path))
    with pytest.raises(ValueError, match="'gpt3' is no model this project knows"):
        main(finetune_run("gpt3", text_file, tmp_path))
    assert not (tmp_path / "mini-gpt").exists()  # no run folder left behind
