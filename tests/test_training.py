"""The Lightning training path: schedule, optimizer groups, loss falling, checkpoints, the CLI."""

import csv
import re
import subprocess
import sys
from argparse import ArgumentError
from functools import partial
from types import SimpleNamespace

import lightning as L
import pytest
import torch
import yaml
from conftest import REPO, fit, run_folders, tiny_run
from lightning.pytorch.callbacks import Timer

from data.lm import LMDataModule
from model import GPTConfig
from model.optim import param_groups
from train import GPTLightningModule, main, warmup_cosine
from training.command import subcommands
from training.errors import UsageError


def test_warmup_then_cosine_schedule():
    f = [warmup_cosine(s, warmup_steps=10, decay_steps=110, min_ratio=0.1) for s in range(130)]
    assert f[0] == pytest.approx(1 / 11) and f[9] == pytest.approx(10 / 11)
    assert all(a < b for a, b in zip(f[:10], f[1:11], strict=True))  # rising warmup
    assert f[10] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(f[10:110], f[11:111], strict=True))  # falling cosine
    assert f[60] == pytest.approx(0.55)  # half way: the middle of 1 and 0.1
    assert f[110:] == [0.1] * 20


def test_the_decay_follows_steps_or_time_whichever_is_further():
    steps_only = [warmup_cosine(s, 10, 110, 0.1) for s in range(130)]
    # the time is further along than the steps: the multiplier is the cosine at the time's point
    assert warmup_cosine(60, 10, 110, 0.1, time_progress=0.75) == pytest.approx(
        warmup_cosine(85, 10, 110, 0.1))
    assert warmup_cosine(60, 10, 110, 0.1, time_progress=0.2) == steps_only[60]  # steps further
    assert warmup_cosine(5, 10, 110, 0.1, time_progress=0.9) == steps_only[5]  # warmup: in steps
    # no step count: the time alone, from 1 at its start to min_ratio when the time is up
    by_time = [warmup_cosine(500, 10, None, 0.1, time_progress=t / 10) for t in range(12)]
    assert by_time[0] == 1.0 and by_time[5] == pytest.approx(0.55)
    assert all(a > b for a, b in zip(by_time[:10], by_time[1:11], strict=True))
    assert by_time[10:] == [0.1, 0.1]


class FakeTimer(Timer):
    """Lightning's Timer with a clock the test sets."""

    def __init__(self, duration: float):
        super().__init__(duration={"seconds": duration})
        self.now = 0.0

    def time_elapsed(self, stage="train") -> float:
        return self.now


def test_time_progress_runs_from_the_end_of_warmup_to_the_end_of_the_budget():
    module = GPTLightningModule(GPTConfig(vocab_size=40, block_size=8, n_layer=1, n_head=2,
                                          n_embd=16), warmup_steps=10)
    timer = FakeTimer(duration=100)
    timer.now = 15.0
    assert module.time_progress(5, timer) == 0.0  # warming up
    timer.now = 20.0
    assert module.time_progress(10, timer) == 0.0  # the decay begins here, 20 s into the budget
    for now, progress in ((60.0, 0.5), (100.0, 1.0)):
        timer.now = now
        assert module.time_progress(50, timer) == pytest.approx(progress)
    assert module.time_progress(50, None) == 0.0  # no max_time: no time progress
    module._trainer = SimpleNamespace(callbacks=[timer])  # time_budget finds the Timer
    assert module.time_budget() is timer
    module._trainer = SimpleNamespace(callbacks=[])
    assert module.time_budget() is None


def test_a_time_budget_alone_sizes_the_schedule(text_file, tmp_path):
    """No max_steps, a 4-second max_time: training stops when the time is up, and the learning
    rate has then decayed to min_lr (not cut off part way)."""
    cli = main(tiny_run(text_file, tmp_path, "--trainer.max_steps", "-1", "--model.lr_decay_steps",
                        "null", "--trainer.max_time", "00:00:00:04", "--model.warmup_steps", "5",
                        "--trainer.val_check_interval", "1000", "--model.lr", "1e-2",
                        "--model.min_lr", "1e-3", "--model.optimizer", "adamw"), )
    module = cli.model
    assert module.global_step > 5  # it trained past the warmup, and stopped by time
    lr = cli.trainer.optimizers[0].param_groups[0]["lr"]
    assert lr == pytest.approx(1e-3, rel=0.05)  # the end of the cosine: min_lr
    ckpt = torch.load(next(tmp_path.rglob("last.ckpt")), weights_only=True)
    assert 0.0 < ckpt["lr_decay_began_s"] < 4.0  # kept for a resume


def test_the_schedule_needs_a_length(text_file, tmp_path):
    with pytest.raises(ValueError, match="needs a length: set --trainer.max_steps"):
        main(tiny_run(text_file, tmp_path, "--trainer.max_steps", "-1", "--model.lr_decay_steps",
                      "null", "--trainer.max_time", "null"))


def test_weight_decay_only_on_weight_matrices():
    module = GPTLightningModule(GPTConfig(vocab_size=40, block_size=8, n_layer=2, n_head=2, n_embd=16))
    decay, no_decay = param_groups(module.model, 0.1)
    names = {id(p): n for n, p in module.model.named_parameters()}
    decayed = {names[id(p)] for p in decay["params"]}
    assert decayed and all(n.endswith("proj.weight") or n.endswith("fc.weight") for n in decayed)
    not_decayed = {names[id(p)] for p in no_decay["params"]}
    assert {"wte.weight", "wpe.weight", "ln_f.weight"} <= not_decayed  # wte is also the tied LM head
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(module.model.parameters()))


def tiny_setup(text_file, cache_dir, **model_kwargs):
    dm = LMDataModule(str(text_file), block_size=32, batch_size=16, cache_dir=str(cache_dir))
    config = GPTConfig(vocab_size=dm.vocab_size, block_size=32, n_layer=2, n_head=2, n_embd=32)
    module = GPTLightningModule(config, lr=3e-3, min_lr=3e-4, warmup_steps=10, **model_kwargs)
    return dm, module


def tiny_trainer(tmp_path, max_steps, **kwargs) -> L.Trainer:
    return L.Trainer(accelerator="cpu", max_steps=max_steps, val_check_interval=max_steps,
                     check_val_every_n_epoch=None, gradient_clip_val=1.0, logger=False, enable_progress_bar=False,
                     enable_model_summary=False, default_root_dir=tmp_path, **kwargs)


def test_validation_loss_falls_through_the_lightning_path(text_file, cache_dir, tmp_path):
    L.seed_everything(0)
    dm, module = tiny_setup(text_file, cache_dir)
    trainer = tiny_trainer(tmp_path, max_steps=80, enable_checkpointing=False)
    before = trainer.validate(module, datamodule=dm, verbose=False)[0]["val/loss"]
    trainer.fit(module, datamodule=dm)
    after = trainer.callback_metrics["val/loss"].item()
    assert trainer.global_step == 80
    assert before > 3.0  # about ln(vocab) at the start (vocab ~ 30 characters)
    assert after < before - 1.0, f"val/loss only went from {before:.3f} to {after:.3f}"


def test_bf16_mixed_training_tracks_fp32(text_file, cache_dir, tmp_path):
    """The same seeded run in bf16-mixed and 32-true: both learn, and end within 0.05 of each
    other."""
    final = {}
    for precision in ("32-true", "bf16-mixed"):
        L.seed_everything(0)
        dm, module = tiny_setup(text_file, cache_dir)
        trainer = tiny_trainer(tmp_path / precision, max_steps=80, precision=precision, enable_checkpointing=False)
        trainer.fit(module, datamodule=dm)
        final[precision] = trainer.callback_metrics["val/loss"].item()
    assert final["32-true"] < 2.3  # learnt (the start is about ln(30) = 3.4)
    assert abs(final["bf16-mixed"] - final["32-true"]) < 0.05, final


def test_flops_per_token_match_torch_flop_counter():
    """6N + 12 L C T against torch's FLOP counter on a forward + backward pass (on the meta
    device)."""
    from lightning.fabric.utilities.throughput import measure_flops

    from model import GPT

    config = GPTConfig(vocab_size=1000, block_size=128, n_layer=4, n_head=4, n_embd=128)
    with torch.device("meta"):
        model = GPT(config)
        idx = torch.randint(0, 1000, (2, 128))
        counted = measure_flops(model, lambda: model(idx, idx)[1], loss_fn=lambda loss: loss)
    assert model.flops_per_token() * idx.numel() == pytest.approx(counted, rel=0.05)


@pytest.mark.slow
def test_compiled_model_trains_and_saves_plain_checkpoints(text_file, cache_dir, tmp_path,
                                                            monkeypatch):
    if not torch.cuda.is_available():  # dynamo and AOTAutograd trace the model as they do for
        # inductor, which would then spend half a minute building C++ kernels on a CPU
        monkeypatch.setattr(torch, "compile", partial(torch.compile, backend="aot_eager"))
    dm, module = tiny_setup(text_file, cache_dir, compile=True)
    # training steps only: each mode (validation, no_grad, another shape) would compile again
    trainer = tiny_trainer(tmp_path, max_steps=3, limit_val_batches=0, num_sanity_val_steps=0)
    trainer.fit(module, datamodule=dm)
    path = tmp_path / "compiled.ckpt"
    trainer.save_checkpoint(path)
    keys = list(torch.load(path, map_location="cpu")["state_dict"])
    assert keys and not any("_orig_mod" in k for k in keys)
    eager = GPTLightningModule.load_from_checkpoint(path)  # loads into a plain, uncompiled model
    x, y = next(iter(dm.train_dataloader()))  # the shape and mode the compiled model trained in
    torch.testing.assert_close(eager.model.train()(x, y)[0], module.model(x, y)[0], atol=1e-5,
                               rtol=1e-4)


def test_a_short_context_warmup_trains_through_lightning(text_file, tmp_path, monkeypatch):
    """Windows of 4 tokens for 10 of 20 steps, then the full 16: the batches the model trains on
    change shape at step 10, and its FLOP count and the validation follow."""
    seen = []  # (step, batch shape, FLOPs a batch) of every training batch
    count_flops = GPTLightningModule.on_train_batch_start

    def record(module, batch, batch_idx):
        count_flops(module, batch, batch_idx)
        seen.append((module.global_step, tuple(batch[0].shape), module.flops_per_batch))

    monkeypatch.setattr(GPTLightningModule, "on_train_batch_start", record)
    fit(text_file, tmp_path, "--data.batch_size", "4", "--data.short_block_size", "4",
        "--data.short_steps", "10")
    assert [(step, shape) for step, shape, _ in seen] == \
        [(s, (16, 4)) for s in range(10)] + [(s, (4, 16)) for s in range(10, 20)]
    assert seen[9][2] < seen[10][2]  # the same tokens, but attention over longer windows
    run, = run_folders(tmp_path)
    with open(run / "metrics.csv", newline="") as f:
        val = {int(r["step"]): float(r["val/loss"]) for r in csv.DictReader(f) if r["val/loss"]}
    assert sorted(val) == [9, 19] and val[19] < val[9]
    # a warmup as long as the run would never train the windows validation reads
    with pytest.raises(UsageError, match="--data.short_steps 20 covers the whole run \\(20 steps"):
        fit(text_file, tmp_path / "whole", "--data.short_block_size", "4",
            "--data.short_steps", "20")


def test_checkpoint_alone_rebuilds_model_and_tokenizer(text_file, cache_dir, tmp_path):
    dm, module = tiny_setup(text_file, cache_dir)
    trainer = tiny_trainer(tmp_path, max_steps=5)
    trainer.fit(module, datamodule=dm)
    path = tmp_path / "model.ckpt"
    trainer.save_checkpoint(path)

    loaded = GPTLightningModule.load_from_checkpoint(path)  # default weights_only load: no pickled classes
    assert loaded.model.config == module.model.config
    assert loaded.tokenizer.to_dict() == dm.tokenizer.to_dict()
    idx = torch.tensor([loaded.tokenizer.encode("The cat sat")])
    module.eval()
    torch.testing.assert_close(loaded.model(idx)[0], module.model(idx)[0])


def test_tokenizer_and_model_vocabulary_must_match(text_file, cache_dir, tmp_path):
    dm = LMDataModule(str(text_file), block_size=32, batch_size=4, cache_dir=str(cache_dir))
    module = GPTLightningModule(GPTConfig(vocab_size=dm.vocab_size + 1, block_size=32, n_layer=1, n_head=1,
                                          n_embd=8))
    with pytest.raises(ValueError, match="tokenizer has .* tokens but the model was built for"):
        tiny_trainer(tmp_path, max_steps=1).fit(module, datamodule=dm)


@pytest.mark.parametrize("config", sorted(p.name for p in (REPO / "configs").glob("*.yaml")))
def test_every_config_parses_and_overrides_win(config, capsys):
    seq2seq = yaml.safe_load((REPO / "configs" / config).read_text()).get("kind") == "seq2seq"
    layers = "n_decoder_layer" if seq2seq else "n_layer"
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", str(REPO / "configs" / config), f"--model.config.{layers}", "3",
              "--trainer.max_steps", "7", "--print_config"])
    assert exit_info.value.code in (0, None)
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["model"]["config"][layers] == 3
    assert printed["trainer"]["max_steps"] == 7
    if seq2seq:
        assert printed["kind"] == "seq2seq" and printed["data"]["max_len"] == 128  # linked to model.config
    else:
        assert printed["data"]["tokenizer"] in ("char", "gpt2")


def run_cli(*args, cwd) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(REPO / "train.py"), *args], cwd=cwd, capture_output=True, text=True,
                          timeout=300)


def test_cli_trains_a_tiny_config_end_to_end(text_file, cache_dir, tmp_path):
    result = run_cli("fit", "--config", str(REPO / "configs" / "shakespeare_char_cpu.yaml"),
                     "--data.source", str(text_file), "--data.cache_dir", str(cache_dir),
                     "--data.block_size", "16", "--model.config.n_layer", "1", "--model.config.n_embd", "16",
                     "--model.config.n_head", "2", "--trainer.max_steps", "20", "--trainer.val_check_interval", "10",
                     "--trainer.log_every_n_steps", "5", "--throughput.window_size", "5",
                     "--run.save_dir", str(tmp_path / "runs"), cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    run, = (tmp_path / "runs" / "mini-gpt").iterdir()
    checkpoints = sorted(p.name for p in (run / "checkpoints").iterdir())
    assert "last.ckpt" in checkpoints and any(n.startswith("best-step=") for n in checkpoints)
    output = result.stdout + result.stderr
    assert f"Best checkpoint: {run / 'checkpoints'}" in output
    assert "Samples at step 10:" in output and "Samples at step 20:" in output  # text samples at each validation
    saved = yaml.safe_load((run / "config.yaml").read_text())
    assert saved["model"]["config"]["n_layer"] == 1  # the override, as run
    metrics = (run / "metrics.csv").read_text().splitlines()[0].split(",")
    assert {"train/loss", "val/loss", "lr-CombinedOptimizer/muon", "train/device/items_per_sec"} <= set(metrics)
    ckpt = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu")
    assert ckpt["global_step"] == 20 and ckpt["tokenizer"]["name"] == "char"


def test_the_progress_bar_counts_optimizer_steps_with_accumulation_and_on_a_resume(
        text_file, tmp_path, capsys):
    """2 batches a step: the bar goes to max_steps in steps, not past it in batches; resumed, it
    starts at the steps done."""
    bar = ("--trainer.enable_progress_bar", "true", "--trainer.accumulate_grad_batches", "2")
    fit(text_file, tmp_path, *bar, "--trainer.max_steps", "10", "--trainer.val_check_interval",
        "10")
    first = capsys.readouterr()
    last = run_folders(tmp_path)[0] / "checkpoints" / "last.ckpt"
    fit(text_file, tmp_path, *bar, "--trainer.max_steps", "15", "--trainer.val_check_interval",
        "10", "--ckpt_path", str(last))
    resumed = capsys.readouterr()
    for out, done, total in ((first, 0, 10), (resumed, 10, 15)):
        bars = re.findall(r"(?:Epoch 0|Training):[^\r\n]*", out.out + out.err)  # not validation's
        bars = [b for b in bars if "| 0/? " not in b]  # drawn as it is made, before it has a total
        counts = [re.search(r"\| *(\d+)/(\S+) ", b).groups() for b in bars]  # (n, total)
        assert counts and {t for _, t in counts} == {str(total)}, counts  # never past it, to "n/?"
        assert int(counts[0][0]) == done and int(counts[-1][0]) == total, counts


def test_a_command_builds_the_parser_of_its_subcommand_and_help_lists_them_all(capsys):
    """Each subcommand's parser takes a good part of a second to build: `train.py fit ...` builds
    fit's alone; without a subcommand first, every one is built, to list or to refuse."""
    config = ["--config", str(REPO / "configs" / "shakespeare_char_cpu.yaml")]
    with pytest.raises(SystemExit):
        main(["validate", *config, "--trainer.max_steps", "7", "--print_config"])
    assert yaml.safe_load(capsys.readouterr().out)["trainer"]["max_steps"] == 7
    assert list(subcommands(["fit", *config])) == ["fit"]
    assert list(subcommands([*config, "fit"])) == ["fit", "validate", "test", "predict"]
    with pytest.raises(SystemExit):
        main(["--help"])
    assert "{fit,validate,test,predict}" in capsys.readouterr().out
    with pytest.raises(ArgumentError, match="invalid choice: 'fitt'"):
        main(["fitt", *config])


def test_cli_bad_input_is_one_clear_line_not_a_traceback(tmp_path):
    result = run_cli("fit", "--config", str(REPO / "configs" / "shakespeare_char_cpu.yaml"),
                     "--data.source", str(tmp_path / "missing.txt"), cwd=tmp_path)
    assert result.returncode != 0
    assert "error: data source" in result.stderr and "no such file" in result.stderr
    assert "Traceback" not in result.stderr
