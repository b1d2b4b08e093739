"""Reliable training: exact resume, interrupts, atomic checkpoints, non-finite losses and bad
input."""

import csv
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from conftest import REPO, fit, reverse_pairs, run_folders, tiny_run, write_parallel

from data.translation import PairBatches, TranslationDataModule
from model import GPT
from train import NonFiniteLoss, cli, main
from training.checkpointing import AtomicCheckpointIO


def losses(folder: Path) -> dict[int, float]:
    with open(folder / "metrics.csv", newline="") as f:
        return {int(r["step"]): float(r["train/loss"])
                for r in csv.DictReader(f) if r["train/loss"]}


@pytest.mark.parametrize("optimizer", ["adamw", "muon"])
def test_n_steps_then_resume_then_n_steps_equals_2n_steps_straight(text_file, tmp_path, optimizer):
    """Model, optimizer (both of Muon's pair), schedule, step, random state (dropout) and data
    position all come back."""
    same = ["--model.config.dropout", "0.2", "--model.lr_decay_steps", "24",
            "--trainer.log_every_n_steps", "1", "--trainer.val_check_interval", "12",
            "--model.optimizer", optimizer]
    fit(text_file, tmp_path / "straight", *same, "--trainer.max_steps", "24")
    fit(text_file, tmp_path / "resumed", *same, "--trainer.max_steps", "12")
    folder, = run_folders(tmp_path / "resumed")
    fit(text_file, tmp_path / "resumed", *same, "--trainer.max_steps", "24",
        "--ckpt_path", str(folder / "checkpoints" / "last.ckpt"))
    straight, resumed = losses(run_folders(tmp_path / "straight")[0]), losses(folder)
    assert sorted(straight) == sorted(resumed) == list(range(24))
    assert [resumed[s] for s in range(24)] == pytest.approx([straight[s] for s in range(24)],
                                                            rel=1e-6)


@pytest.mark.parametrize("resume_at", ["epoch_end", "mid_epoch"])
def test_seq2seq_resume_equals_straight_across_epochs_with_ema(tmp_path, resume_at):
    """Batches regrouped and reshuffled each epoch come back in the same order, and so do the EMA
    weights."""
    folder = write_parallel(tmp_path / "data", {"train": reverse_pairs(300, 0),
                                                "val": reverse_pairs(20, 1)})
    dm = TranslationDataModule(str(folder), "xx", "yy", vocab_size=40, max_len=16, max_tokens=200)
    per_epoch = len(PairBatches(*dm.ids["train"], 200, shuffle=True))
    first = per_epoch if resume_at == "epoch_end" else per_epoch + 2
    total = 2 * per_epoch + 3
    same = ["--config", str(REPO / "configs" / "multi30k_de_en.yaml"), "--data.source", str(folder),
            "--data.src_lang", "xx", "--data.tgt_lang", "yy", "--data.vocab_size", "40",
            "--data.max_len", "16", "--data.max_tokens", "200", "--data.dev_size", "0",
            "--model.tune_length_penalty", "null", "--model.config.n_embd", "32",
            "--model.config.mlp_hidden", "64", "--model.warmup_steps", "5",
            "--model.lr_decay_steps", str(total), "--model.val_bleu", "false",
            "--trainer.max_time", "null", "--trainer.log_every_n_steps", "1",
            "--trainer.val_check_interval", str(first), "--trainer.limit_val_batches", "1",
            "--trainer.enable_progress_bar", "false"]
    main(["fit", *same, "--trainer.max_steps", str(total),
          "--run.save_dir", str(tmp_path / "straight")])
    main(["fit", *same, "--trainer.max_steps", str(first),
          "--run.save_dir", str(tmp_path / "resumed")])
    run, = run_folders(tmp_path / "resumed")
    main(["fit", *same, "--trainer.max_steps", str(total),
          "--run.save_dir", str(tmp_path / "resumed"),
          "--ckpt_path", str(run / "checkpoints" / "last.ckpt")])
    straight, resumed = losses(run_folders(tmp_path / "straight")[0]), losses(run)
    assert sorted(straight) == sorted(resumed) == list(range(total))
    assert [resumed[s] for s in range(total)] == pytest.approx([straight[s] for s in range(total)],
                                                               rel=1e-6)
    ema = [torch.load(r / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]
           for r in (run_folders(tmp_path / "straight")[0], run)]
    for name, value in ema[0].items():
        torch.testing.assert_close(ema[1][name], value, rtol=1e-5, atol=1e-6)


@pytest.mark.slow
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_saves_a_checkpoint_exits_cleanly_and_the_run_resumes(text_file, tmp_path, signum,
                                                                     monkeypatch):
    args = [sys.executable, str(REPO / "train.py"),
            *tiny_run(text_file, tmp_path, "--trainer.max_steps", "100000",
                      "--trainer.val_check_interval", "5")]
    process = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               cwd=tmp_path)
    deadline = time.monotonic() + 120
    while (not list(tmp_path.glob("mini-gpt/*/checkpoints/last.ckpt"))
           and time.monotonic() < deadline):
        time.sleep(0.2)
    time.sleep(1.0)
    process.send_signal(signum)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 128 + signum, stderr[-3000:]
    assert "Traceback" not in stderr
    last, = tmp_path.glob("mini-gpt/*/checkpoints/last.ckpt")
    step = torch.load(last, weights_only=True)["global_step"]
    assert f"stopped by {signal.Signals(signum).name} after {step} steps and saved {last}" in stderr
    assert step > 5

    monkeypatch.chdir(tmp_path)  # the same command, resumed (in this process: no second start-up)
    assert cli([*args[2:-4], "--trainer.max_steps", str(step + 5), "--ckpt_path", str(last)]) == 0
    assert torch.load(last, weights_only=True)["global_step"] == step + 5


def test_checkpoints_are_written_atomically(tmp_path):
    class Unpicklable:
        def __reduce__(self):
            raise RuntimeError("crash while saving")

    path = tmp_path / "last.ckpt"
    io = AtomicCheckpointIO()
    io.save_checkpoint({"weights": torch.arange(1000)}, path)
    with pytest.raises(RuntimeError, match="crash while saving"):
        io.save_checkpoint({"weights": torch.zeros(1000), "later": Unpicklable()}, path)
    # the previous one, whole
    assert torch.equal(torch.load(path, weights_only=True)["weights"], torch.arange(1000))
    assert [p.name for p in tmp_path.iterdir()] == ["last.ckpt"]  # nothing half-written left behind


def test_a_non_finite_loss_stops_training_naming_the_step_and_keeps_the_last_good_checkpoint(
        text_file, tmp_path, monkeypatch):
    forward = GPT.forward

    def nan_from_step_8(self, idx, targets=None, **kwargs):
        logits, loss = forward(self, idx, targets, **kwargs)
        calls.append(1)
        return logits, loss * float("nan") if self.training and len(calls) > 8 else loss

    calls = []
    monkeypatch.setattr(GPT, "forward", nan_from_step_8)
    with pytest.raises(NonFiniteLoss, match=r"the training loss is nan at step \d+; training "
                                            r"stopped before it changed the weights\. Resume "
                                            r"from the last good checkpoint") as e:
        fit(text_file, tmp_path, "--trainer.val_check_interval", "5",
            "--model.embedding_lr", "0.02")
    last, = tmp_path.glob("mini-gpt/*/checkpoints/last.ckpt")
    ckpt = torch.load(last, weights_only=True)
    assert ckpt["global_step"] == 5
    assert all(torch.isfinite(v).all() for v in ckpt["state_dict"].values())

    # the advice is a command that works: it resumes the run at half the learning rates
    monkeypatch.undo()
    advice = re.search(r"python train.py (fit .*?)( \(or with .*)?$", str(e.value))
    command = advice.group(1).split()
    assert command[command.index("--ckpt_path") + 1] == str(last)
    assert cli([*command, "--trainer.max_steps", "8"]) == 0
    resumed = torch.load(last, weights_only=True)
    groups = [g for state in resumed["optimizer_states"][0]["optimizers"]
              for g in state["param_groups"]]
    assert resumed["global_step"] == 8
    # adamw's two groups, the embeddings', muon's
    assert [g["initial_lr"] for g in groups] == [0.0015, 0.0015, 0.01, 0.01]
    recorded = yaml.safe_load((last.parent.parent / "config-resume-1.yaml").read_text())["model"]
    assert (recorded["lr"], recorded["muon_lr"], recorded["embedding_lr"]) == (0.0015, 0.01, 0.01)


def _bad_input_cases(tmp_path: Path, text_file: Path) -> dict[str, tuple[list[str], str]]:
    (tmp_path / "empty.txt").write_text("")
    (tmp_path / "short.txt").write_text("To be.\n")
    (tmp_path / "latin1.txt").write_bytes("Ein Bär\n".encode("latin-1") * 50)
    (tmp_path / "binary.txt").write_bytes(bytes(range(256)) * 40)
    (tmp_path / "two_bytes.txt").write_bytes(b"ab")
    (tmp_path / "truncated.ckpt").write_bytes(b"PK\x03\x04 not a whole zip")
    (tmp_path / "unknown_key.yaml").write_text("model:\n  lrr: 0.1\n")
    (tmp_path / "broken.yaml").write_text("model:\n  lr: 0.1\n  betas: [0.9, 0.95\n")
    return {
        "missing data path": (["--data.source", str(tmp_path / "nope.txt")], "no such file"),
        "empty file": (["--data.source", str(tmp_path / "empty.txt")], "empty"),
        "corpus shorter than a block": (["--data.source", str(tmp_path / "short.txt")],
                                        "fewer than block_size + 1"),
        "non-UTF-8 bytes": (["--data.source", str(tmp_path / "latin1.txt")], "UTF-8"),
        "binary file": (["--data.source", str(tmp_path / "binary.txt")], "UTF-8"),
        "2-byte file": (["--data.source", str(tmp_path / "two_bytes.txt")],
                        "fewer than block_size + 1"),
        "unknown tokenizer": (["--data.tokenizer", "bpe9"], "tokenizer"),
        "n_embd not divisible by n_head": (["--model.config.n_head", "3"], "n_embd"),
        "zero layers": (["--model.config.n_layer", "0"], "n_layer"),
        "truncated checkpoint": (["--ckpt_path", str(tmp_path / "truncated.ckpt")],
                                 "not a readable checkpoint"),
        "hub id offline": (["--data.source", "someone/some-dataset"], "cannot be reached"),
        "unknown config key": (["--config", str(tmp_path / "unknown_key.yaml")], "lrr"),
        "YAML syntax error": (["--config", str(tmp_path / "broken.yaml")],
                              f"--config {tmp_path / 'broken.yaml'}, line 4: not valid YAML"),
        "unknown option": (["--model.lrr", "3"], "unrecognized arguments: --model.lrr 3"),
        "not a number": (["--model.lr", "fast"], 'Parser key "model.lr": Expected a'),
        "zero learning rate": (["--model.lr", "0"], "--model.lr 0.0: give a learning rate above 0"),
        "negative betas": (["--model.betas", "[-0.1, 0.9]"], "--model.betas"),
        "negative steps": (["--trainer.max_steps=-5"], "--trainer.max_steps -5: give"),
        "zero steps": (["--trainer.max_steps", "0"], "--trainer.max_steps 0 trains nothing"),
        "validations never": (["--trainer.val_check_interval", "0"],
                              "--trainer.val_check_interval 0"),
        "Lightning's own checks": (["--trainer.gradient_clip_algorithm", "foo"],
                                   "--trainer: `gradient_clip"),
        "checkpoint interval 0": (["--checkpoint.every_n_steps", "0"],
                                  "--checkpoint.every_n_steps 0"),
        "abbreviated option": (["--trainer.max_step", "30"],
                               "unrecognized arguments: --trainer.max_step"),
        "Lightning's optimizer flag": (["--optimizer", "AdamW"],
                                       "unrecognized arguments: --optimizer"),
        "fp16 on a CPU": (["--trainer.precision", "16-mixed"], "a CPU has no fp16 autocast"),
        "wandb online without a key": (["--run.mode", "online"], "needs a wandb API key"),
    }


BAD_INPUT = ["missing data path", "empty file", "corpus shorter than a block", "non-UTF-8 bytes",
             "binary file", "2-byte file", "unknown tokenizer",
             "n_embd not divisible by n_head", "zero layers", "truncated checkpoint",
             "hub id offline", "unknown config key", "YAML syntax error", "unknown option",
             "not a number", "zero learning rate", "negative betas", "negative steps", "zero steps",
             "validations never", "Lightning's own checks", "checkpoint interval 0",
             "abbreviated option", "Lightning's optimizer flag", "fp16 on a CPU",
             "wandb online without a key"]


@pytest.mark.parametrize("case", BAD_INPUT)
def test_bad_input_is_one_clear_message_not_a_traceback(case, text_file, tmp_path, capsys,
                                                        monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("NETRC", str(tmp_path / "no-netrc"))  # no wandb key
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    argv, message = _bad_input_cases(tmp_path, text_file)[case]
    try:
        code = cli(tiny_run(text_file, tmp_path, *argv))
    except SystemExit as e:  # the argument parser's own errors
        code = e.code
    err = capsys.readouterr().err
    assert code == 1
    assert "Traceback" not in err
    last = err.strip().splitlines()[-1]
    assert last.startswith("error: ") and message in last, err[-2000:]
    assert not list(tmp_path.glob("mini-gpt/*")), "a start that failed left a run folder behind"


def test_a_resume_may_change_how_the_model_computes_and_the_command_wins(text_file, tmp_path):
    fit(text_file, tmp_path, "--trainer.max_steps", "4", "--model.config.attn_impl", "sdpa")
    last, = tmp_path.glob("mini-gpt/*/checkpoints/last.ckpt")
    resumed = main(tiny_run(text_file, tmp_path, "--trainer.max_steps", "6",
                            "--model.config.attn_impl", "naive", "--ckpt_path", str(last)))
    assert resumed.trainer.global_step == 6
    assert resumed.model.model.blocks[0].attn.attn_impl == "naive"  # not the checkpoint's sdpa


def test_resuming_with_other_model_options_is_refused_naming_them(text_file, tmp_path, capsys):
    fit(text_file, tmp_path, "--trainer.max_steps", "2")
    folder, = run_folders(tmp_path)
    last = folder / "checkpoints" / "last.ckpt"
    code = cli(tiny_run(text_file, tmp_path, "--ckpt_path", str(last),
                        "--model.config.n_layer", "2", "--model.lr", "0.01",
                        "--trainer.max_steps", "4"))
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 1
    message = err[-1]
    assert "model.config.n_layer is 2 here but 1 in the checkpoint" in message
    assert "model.lr" not in message  # the optimizer's settings may change (see the NaN test)
    assert f"--config {folder / 'config.yaml'}" in message
    assert torch.load(last, weights_only=True)["global_step"] == 2  # nothing trained

    # the same command resumes; the attention path may change (how it computes, not what)
    assert cli(tiny_run(text_file, tmp_path, "--ckpt_path", str(last), "--trainer.max_steps", "4",
                        "--model.config.attn_impl", "naive")) == 0
    ckpt = torch.load(last, weights_only=True)
    assert ckpt["global_step"] == 4 and ckpt["hyper_parameters"]["config"]["attn_impl"] == "naive"


def test_options_newer_than_a_checkpoint_resume_as_trained_and_embedding_lr_retunes():
    from training.resume import check_resume_options

    def check(ours, theirs):
        return check_resume_options("last.ckpt", ours, theirs, "block_size")

    before = {"config": {"n_layer": 1}, "lr": 3e-3}  # a checkpoint from before both options
    now = {"config": {"n_layer": 1, "smear": False}, "lr": 3e-3, "embedding_lr": None}
    assert check(now, before) == []
    with pytest.raises(ValueError, match="model.config.smear is True here but False in the"):
        check({**now, "config": {"n_layer": 1, "smear": True}}, before)
    # a rate of its own changes the optimizer's groups: not from or to null, but rate to rate
    with pytest.raises(ValueError, match="model.embedding_lr is 0.1 here but None in the"):
        check({**now, "embedding_lr": 0.1}, before)
    with pytest.raises(ValueError, match="model.embedding_lr is None here but 0.1 in the"):
        check(now, {**now, "embedding_lr": 0.1})
    assert check({**now, "embedding_lr": 0.05}, {**now, "embedding_lr": 0.1}) == [
        "model.embedding_lr 0.1 -> 0.05"]


def test_a_checkpoint_of_another_kind_or_vocabulary_is_refused(text_file, tmp_path, capsys,
                                                               checkpoints):
    fit(text_file, tmp_path, "--trainer.max_steps", "2")
    last, = tmp_path.glob("mini-gpt/*/checkpoints/last.ckpt")
    other_text = tmp_path / "other.txt"
    other_text.write_text("0123456789 xyz\n" * 200)  # other characters: another vocabulary
    assert cli(tiny_run(other_text, tmp_path, "--ckpt_path", str(last))) == 1
    assert ("was trained with another vocabulary than this data's tokenizer"
            in capsys.readouterr().err)

    assert cli(tiny_run(text_file, tmp_path, "--ckpt_path", str(checkpoints["seq2seq"]))) == 1
    assert "holds a seq2seq model, not a gpt one" in capsys.readouterr().err
