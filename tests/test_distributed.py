"""Training on several processes: the global batch (--tokens_per_step, training/global_batch.py),
the data of a step wherever its batches run (data/lm.py), and DDP on 2 CPU processes against 1
process accumulating, with a checkpoint of 2 ranks resumed on 1."""

import csv
import subprocess
import sys

import pytest
import torch
from conftest import REPO, fit, run_folders, tiny_run

from data.lm import RandomWindows
from training.errors import UsageError
from training.global_batch import accumulation


def val_losses(folder) -> dict[int, float]:
    with open(folder / "metrics.csv", newline="") as f:
        return {int(r["step"]): float(r["val/loss"]) for r in csv.DictReader(f) if r["val/loss"]}


def test_the_accumulation_follows_from_the_global_batch_and_the_processes():
    # GPT-2 small's 524,288 tokens per step with 32 sequences of 1,024 tokens
    assert [accumulation(524_288, 32, 1024, n) for n in (1, 2, 8, 16)] == [16, 8, 2, 1]
    with pytest.raises(UsageError, match=r"not a multiple of one batch on every process: 32 "
                                         r"sequences x 1024 tokens x 32 processes = 1,048,576 "
                                         r"tokens; give a multiple of 1,048,576"):
        accumulation(524_288, 32, 1024, 32)
    with pytest.raises(UsageError, match="give a multiple of 49,152 \\(e.g. 491,520\\)"):
        accumulation(500_000, 48, 1024, 1)
    with pytest.raises(UsageError, match="--tokens_per_step 0"):
        accumulation(0, 32, 1024, 1)


def test_tokens_per_step_sets_the_accumulation_and_validates_in_steps(text_file, tmp_path):
    # 128 tokens per step from batches of 4 x 16 tokens: 2 batches per step
    fit(text_file, tmp_path, "--tokens_per_step", "128", "--data.batch_size", "4",
        "--trainer.max_steps", "6", "--trainer.val_check_interval", "3")
    folder, = run_folders(tmp_path)
    assert set(val_losses(folder)) == {2, 5}  # after steps 3 and 6 (the logs count from 0)
    # a token budget that ends before trainer.max_steps ends training: 640 tokens, 5 steps
    budget = tmp_path / "budget"
    fit(text_file, budget, "--tokens_per_step", "128", "--data.batch_size", "4",
        "--max_tokens", "640", "--trainer.max_steps", "20", "--trainer.val_check_interval", "5")
    assert set(val_losses(run_folders(budget)[0])) == {4}
    with pytest.raises(UsageError, match="accumulate_grad_batches 3 contradicts --tokens_per_step "
                                         "128, which needs 2 here"):
        fit(text_file, tmp_path, "--tokens_per_step", "128", "--data.batch_size", "4",
            "--trainer.accumulate_grad_batches", "3")


def test_a_step_trains_on_the_same_windows_however_its_batches_are_spread(text_file, tmp_path):
    from data.corpus import prepare_corpus

    corpus = prepare_corpus(str(text_file), "char", cache_dir=tmp_path / "cache")

    def batches(rank, accumulate, start=0, count=4):
        stream = iter(RandomWindows(corpus, "train", 16, 4, 1337, rank, accumulate, start))
        return [next(stream)[0] for _ in range(count)]

    one = batches(rank=0, accumulate=4, count=8)  # 1 process, 4 batches per step
    two = [batches(rank=r, accumulate=2) for r in (0, 1)]  # 2 processes, 2 batches each
    four = [batches(rank=r, accumulate=1, count=2) for r in range(4)]
    for step in range(2):
        ours = one[4 * step:4 * step + 4]
        spread = two[0][2 * step:2 * step + 2] + two[1][2 * step:2 * step + 2]
        assert all(torch.equal(a, b) for a, b in zip(ours, spread, strict=True))
        assert all(torch.equal(ours[r], four[r][step]) for r in range(4))
    assert not torch.equal(one[0], one[1])  # (the batches of a step differ)
    # resumed after step 1: the stream goes on
    assert all(torch.equal(a, b) for a, b in zip(batches(0, 4, start=4), one[4:],
                                                     strict=True))


@pytest.mark.slow
def test_two_processes_train_as_one_accumulating_and_their_checkpoint_resumes_on_one(
        text_file, tmp_path):
    """2 DDP processes accumulating 2 batches per step against 1 process accumulating 4: the same
    windows per step, gradients averaged either way, so the validation losses agree to float
    rounding (within 1e-4). The worker process takes its launcher's run id and only rank 0 writes:
    one run folder, one wandb run. The 2-rank checkpoint then resumes on 1 process and continues
    as the 1-process run does."""
    common = ("--tokens_per_step", "512", "--data.batch_size", "8", "--trainer.val_check_interval",
              "4", "--trainer.limit_val_batches", "4")
    single = tmp_path / "single"
    fit(text_file, single, *common, "--trainer.max_steps", "8")
    expected = val_losses(run_folders(single)[0])
    assert set(expected) == {3, 7}

    ranks = tmp_path / "ranks"  # 2 processes: each validates 2 of the 4 batches
    cmd = [sys.executable, str(REPO / "train.py"),
           *tiny_run(text_file, ranks, *common, "--trainer.max_steps", "4",
                     "--trainer.strategy", "ddp", "--trainer.devices", "2",
                     "--trainer.limit_val_batches", "2")]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "x 2 processes x 2 accumulated batches" in result.stdout + result.stderr
    folder, = run_folders(ranks)
    assert len(list((folder / "wandb").glob("offline-run-*"))) == 1
    assert val_losses(folder)[3] == pytest.approx(expected[3], abs=1e-4)

    fit(text_file, ranks, *common, "--trainer.max_steps", "8",
        "--ckpt_path", str(folder / "checkpoints" / "last.ckpt"))
    resumed = val_losses(folder)
    assert resumed[7] == pytest.approx(expected[7], abs=1e-4)
    assert expected[7] < expected[3]  # (it trains)


@pytest.mark.parametrize("config", ["gpt2_124m.yaml", "gpt2_124m_modern.yaml"])
def test_the_gpt2_124m_configs_build_for_any_number_of_devices(config, tmp_path, caplog):
    """The configs parse and build GPT-2 small on local data (the hub is not reachable here): 124M
    parameters for GPT-2's architecture, 524,288 tokens per step as 16 batches of 32 x 1,024 on 1
    device or 2 on 8, 19,073 steps for 10B tokens, validation every 250 steps."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from train import main

    pq.write_table(pa.table({"text": ["Some web text to read. " * 400] * 40}),
                   tmp_path / "web.parquet")
    shapes = ((1, 16), (8, 2)) if config == "gpt2_124m.yaml" else ((8, 2),)
    for devices, accumulate in shapes:
        cli = main(["--config", str(REPO / "configs" / config), "--data.source",
                    str(tmp_path / "web.parquet"), "--data.subset", "null",
                    "--data.cache_dir", str(tmp_path / "cache"), "--trainer.accelerator", "cpu",
                    "--trainer.devices", str(devices), "--trainer.strategy", "ddp",
                    "--run.save_dir", str(tmp_path / "runs")], run=False)
        trainer, gpt = cli.trainer, cli.model.model
        assert (trainer.world_size, trainer.accumulate_grad_batches) == (devices, accumulate)
        assert trainer.max_steps == 19_073 and trainer.val_check_interval == 250 * accumulate
        assert (gpt.config.n_layer, gpt.config.n_embd, gpt.config.block_size) == (12, 768, 1024)
        assert f"524,288 = 32 sequences x 1,024 tokens x {devices} process" in caplog.text
    if config != "gpt2_124m.yaml":
        assert cli.model.hparams.optimizer == "muon" and gpt.config.pos_emb == "rope"
        return
    # a number of steps as well (a short test of the config): training stops at whichever is first
    cli = main(["--config", str(REPO / "configs" / config), "--data.source",
                str(tmp_path / "web.parquet"), "--data.subset", "null", "--data.cache_dir",
                str(tmp_path / "cache"), "--trainer.max_steps", "2", "--run.save_dir",
                str(tmp_path / "runs")], run=False)
    assert cli.trainer.max_steps == 2
    assert "trainer.max_steps 2 ends it first, before --max_tokens" in caplog.text
    assert gpt.num_params(non_embedding=False) == 124_439_808  # GPT-2 small's count


def test_muon_under_fsdp_is_refused_in_one_line(text_file, tmp_path):
    with pytest.raises(UsageError, match="FSDP shards them across processes: use "
                                         "--trainer.strategy ddp with Muon"):
        fit(text_file, tmp_path, "--trainer.strategy", "fsdp", "--model.optimizer", "muon")


def test_the_documented_fsdp_command_reaches_lightnings_strategy(text_file, tmp_path):
    """docs/scaling.md's FSDP flags (the strategy's class, its wrap and checkpointing policies)
    parse and build Lightning's FSDPStrategy, which then asks for GPUs: on a CPU, one line."""
    with pytest.raises(ValueError, match="strategy `fsdp` requires a GPU accelerator"):
        fit(text_file, tmp_path, "--model.optimizer", "adamw", "--trainer.devices", "2",
            "--trainer.strategy", "FSDPStrategy",
            "--trainer.strategy.auto_wrap_policy", "[model.block.Block]",
            "--trainer.strategy.activation_checkpointing_policy", "[model.block.Block]")


def test_a_resume_counts_whole_steps_of_its_own_accumulation():
    """A checkpoint written between the batches of a step (Ctrl-C), or by a run with another
    accumulation, resumes with its batches done at steps done x this accumulation: the step it was
    stopped in is redone from its first batch, where the loader starts it."""
    from training.global_batch import rescale_batches_done

    def checkpoint(batches):  # saved in a batch's hooks: "completed" one behind the others
        counters = {"ready": batches, "completed": batches - 1, "started": batches,
                    "processed": batches}
        return {"global_step": 6, "loops": {"fit_loop": {"epoch_loop.batch_progress": {
            "total": dict(counters), "current": dict(counters), "is_last_batch": False}}}}

    for saved, accumulate in ((13, 2), (6, 2), (12, 4), (12, 2)):  # mid-step, other A's, whole
        state = checkpoint(saved)
        rescale_batches_done(state, accumulate)
        progress = state["loops"]["fit_loop"]["epoch_loop.batch_progress"]
        for counters in (progress["total"], progress["current"]):
            assert counters == {"ready": 6 * accumulate, "completed": 6 * accumulate - 1,
                                "started": 6 * accumulate, "processed": 6 * accumulate}


def test_a_signal_between_the_batches_of_a_step_saves_after_the_step_and_resumes_as_one_run(
        text_file, tmp_path, monkeypatch):
    """Ctrl-C arriving after the first of a step's 2 batches: the run trains that step's second
    batch, saves at the step's end and stops; resumed, it reaches the validation loss of a run
    never stopped."""
    import signal

    from training.checkpointing import Checkpoint
    from training.errors import Stopped

    common = ("--tokens_per_step", "128", "--data.batch_size", "4", "--trainer.max_steps", "6",
              "--trainer.val_check_interval", "3", "--model.lr_decay_steps", "6")
    straight = tmp_path / "straight"
    fit(text_file, straight, *common)
    expected = val_losses(run_folders(straight)[0])

    original = Checkpoint.on_train_batch_end

    def signalled_mid_step(self, trainer, pl_module, outputs, batch, batch_idx):
        if batch_idx == 8:  # the first batch of step 5 (its batches are 8 and 9)
            self._stop_after_this_step(signal.SIGINT, None)
        original(self, trainer, pl_module, outputs, batch, batch_idx)

    stopped = tmp_path / "stopped"
    with monkeypatch.context() as m:
        m.setattr(Checkpoint, "on_train_batch_end", signalled_mid_step)
        with pytest.raises(Stopped):
            fit(text_file, stopped, *common)
    folder, = run_folders(stopped)
    last = torch.load(folder / "checkpoints" / "last.ckpt", weights_only=False)
    assert last["global_step"] == 5  # the step finished, not cut after its first batch
    fit(text_file, stopped, *common, "--ckpt_path", str(folder / "checkpoints" / "last.ckpt"))
    assert val_losses(folder)[5] == pytest.approx(expected[5], abs=1e-5)
