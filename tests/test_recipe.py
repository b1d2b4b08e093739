"""The modern recipe's model options (MLP, norm, untied head, zero-initialised projections, logit
softcap) and its optimizer (Muon beside AdamW, one optimizer to Lightning), and time to a target
loss."""

import copy
import csv
import itertools
import logging
import subprocess
import time
from pathlib import Path

import pytest
import torch
from conftest import REPO, fit, run_folders, tiny_run
from torch import nn

from model import GPT, GPTConfig
from model.checkpoint import load_gpt_checkpoint
from model.optim import CombinedOptimizer, Muon, hidden_matrices, orthogonalize, param_groups
from scripts import ablate, compare_runs
from train import cli, warmup_cosine
from training.callbacks import TargetLoss
from training.errors import UsageError
from training.run_state import process_start_time

OPTIONS = {"mlp": ("gelu", "relu2", "swiglu"), "norm": ("layernorm", "rmsnorm"),
           "tie_embeddings": (True, False), "zero_init_proj": (False, True),
           "logit_softcap": (None, 5.0)}
# every MLP and norm with every other option on and off, without all 48 combinations: each pair of
# values of two options appears together in at least one of these
COMBINATIONS = [dict(zip(OPTIONS, values, strict=True)) for values in [
    ("gelu", "layernorm", True, False, None), ("gelu", "rmsnorm", False, True, 5.0),
    ("relu2", "layernorm", False, True, None), ("relu2", "rmsnorm", True, False, 5.0),
    ("swiglu", "layernorm", True, True, 5.0), ("swiglu", "rmsnorm", False, False, None),
    ("relu2", "rmsnorm", False, True, 5.0), ("swiglu", "layernorm", False, False, 5.0),
    ("gelu", "rmsnorm", True, True, None)]]
NAMES = ["-".join(str(v) for v in c.values()) for c in COMBINATIONS]
NS = ((3.4445, -4.7750, 2.0315), 5, 1e-7)  # torch.optim.Muon's coefficients, steps and eps


def small(**options) -> GPTConfig:
    return GPTConfig(vocab_size=32, block_size=16, n_layer=2, n_head=2, n_embd=32, **options)


def test_the_combinations_pair_every_two_option_values():
    for a, b in itertools.combinations(OPTIONS, 2):
        pairs = {(c[a], c[b]) for c in COMBINATIONS}
        assert pairs == set(itertools.product(OPTIONS[a], OPTIONS[b])), (a, b)


@pytest.mark.parametrize("options", COMBINATIONS, ids=NAMES)
def test_options_keep_shapes_and_causality(options):
    torch.manual_seed(0)
    model = GPT(small(**options, pos_emb="rope")).eval()
    idx = torch.randint(0, 32, (2, 12))
    logits, loss = model(idx, idx)
    assert logits.shape == (2, 12, 32) and loss.ndim == 0
    changed = idx.clone()
    changed[:, 7:] = (changed[:, 7:] + 1) % 32
    with torch.no_grad():
        torch.testing.assert_close(model(changed)[0][:, :7], logits[:, :7], atol=0, rtol=0)
        assert not torch.allclose(model(changed)[0][:, 7:], logits[:, 7:])


@pytest.mark.parametrize("options", COMBINATIONS, ids=NAMES)
def test_options_learn_a_batch(options):
    """60 AdamW steps on one batch take the loss from about ln(32) = 3.5 to under a third of it."""
    torch.manual_seed(0)
    model = GPT(small(**options))
    idx = torch.randint(0, 32, (4, 16))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    first = model(idx[:, :-1], idx[:, 1:])[1].item()
    for _ in range(60):
        loss = model(idx[:, :-1], idx[:, 1:])[1]
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert first > 3.0 and loss.item() < first / 3, (first, loss.item())


def test_softcap_bounds_the_logits_smoothly():
    torch.manual_seed(0)
    capped, plain = GPT(small(logit_softcap=2.0)), GPT(small())
    plain.load_state_dict(capped.state_dict())
    for p in plain.lm_head.parameters():
        p.data.mul_(100)  # logits far beyond the cap (tanh rounds the largest to the cap itself)
    capped.load_state_dict(plain.state_dict())
    idx = torch.randint(0, 32, (2, 8))
    raw, capped_logits = plain(idx)[0], capped(idx)[0]
    assert raw.abs().max() > 10 and capped_logits.abs().max() <= 2.0
    torch.testing.assert_close(capped_logits, 2.0 * torch.tanh(raw / 2.0))


def test_untied_head_has_its_own_matrix_and_the_tied_default_is_unchanged():
    tied, untied = GPT(small()), GPT(small(tie_embeddings=False))
    assert tied.lm_head.weight is tied.wte.weight
    assert untied.lm_head.weight is not untied.wte.weight
    assert set(untied.state_dict()) == set(tied.state_dict())  # the same keys; two tensors now
    extra = untied.wte.weight.numel()
    assert sum(p.numel() for p in untied.parameters()) == sum(
        p.numel() for p in tied.parameters()) + extra
    assert untied.num_params() == tied.num_params()  # the table is looked up, not multiplied


def test_zero_init_projections_start_each_block_as_the_identity():
    torch.manual_seed(0)
    model = GPT(small(zero_init_proj=True))
    projections = [p for n, p in model.named_parameters() if n.endswith("out_proj.weight")]
    assert len(projections) == 4 and all(torch.count_nonzero(p) == 0 for p in projections)
    idx = torch.randint(0, 32, (2, 8))
    x = model.wte(idx) + model.wpe(torch.arange(8))  # the stream is the embedding, unchanged
    torch.testing.assert_close(model(idx)[0], model.lm_head(model.ln_f(x)))
    model(idx, idx)[1].backward()
    assert all(p.grad.abs().sum() > 0 for p in projections)  # they learn from the first step


def test_norm_and_mlp_choices_build_what_they_name():
    model = GPT(small(norm="rmsnorm", mlp="swiglu"))
    norms = [m for m in model.modules() if isinstance(m, (nn.LayerNorm, nn.RMSNorm))]
    assert norms and all(isinstance(m, nn.RMSNorm) for m in norms)
    gelu = GPT(small())
    count = lambda m: sum(p.numel() for n, p in m.named_parameters() if ".mlp." in n)  # noqa: E731
    assert abs(count(model) - count(gelu)) / count(gelu) < 0.05  # SwiGLU sized like the 4x MLP
    assert model.blocks[0].mlp.fc.out_features == 2 * model.blocks[0].mlp.out_proj.in_features


def test_defaults_build_todays_model():
    torch.manual_seed(0)
    default = GPT(small())
    torch.manual_seed(0)
    spelled = GPT(small(mlp="gelu", norm="layernorm", tie_embeddings=True, zero_init_proj=False,
                        logit_softcap=None))
    for (name, a), (_, b) in zip(default.state_dict().items(), spelled.state_dict().items(),
                                 strict=True):
        assert torch.equal(a, b), name


@pytest.mark.parametrize("field, value, match", [
    ("mlp", "tanh", "mlp 'tanh' is unknown"), ("norm", "batchnorm", "norm 'batchnorm' is unknown"),
    ("logit_softcap", 0.0, "logit_softcap must be positive")])
def test_bad_options_are_refused_by_name(field, value, match):
    with pytest.raises(ValueError, match=match):
        small(**{field: value})


# ------------------------------------------------------------------ Muon


def test_orthogonalize_brings_every_singular_value_near_one():
    """Five steps lift singular values as small as 1/100 of the largest (not much smaller: the
    polynomial's slope at 0 is 3.4, and 3.4^5 ~ 460)."""
    torch.manual_seed(0)
    for shape in [(96, 32), (32, 128), (48, 48)]:
        k = min(shape)
        U = torch.linalg.qr(torch.randn(shape[0], k))[0]
        V = torch.linalg.qr(torch.randn(shape[1], k))[0]
        G = U @ torch.diag(torch.logspace(-2, 0, k)) @ V.T  # singular values from 0.01 to 1
        s = torch.linalg.svdvals(orthogonalize(G, *NS, torch.float32))
        assert s.min() > 0.5 and s.max() < 1.25, (shape, s.min(), s.max())


def test_muon_in_fp32_takes_pytorchs_bf16_step_within_bf16_rounding():
    torch.manual_seed(0)
    weights = [torch.randn(48, 16), torch.randn(16, 64)]
    ours = [nn.Parameter(w.clone()) for w in weights]
    theirs = [nn.Parameter(w.clone()) for w in weights]
    fp32 = Muon(ours, lr=0.02, ns_dtype=torch.float32)
    bf16 = torch.optim.Muon(theirs, lr=0.02)
    for _ in range(3):
        grads = [torch.randn_like(w) for w in weights]
        for params, optimizer in ((ours, fp32), (theirs, bf16)):
            for p, g in zip(params, grads, strict=True):
                p.grad = g.clone()
            optimizer.step()
    for a, b, w in zip(ours, theirs, weights, strict=True):
        assert not torch.equal(a, w)
        moved_a, moved_b = a.detach() - w, b.detach() - w
        assert (moved_a - moved_b).norm() / moved_b.norm() < 0.03  # bf16 keeps 8 bits
    assert fp32.state_dict()["state"].keys() == bf16.state_dict()["state"].keys()
    assert set(fp32.state[ours[0]]) == set(bf16.state[theirs[0]])  # checkpoints interchange


def test_muon_takes_the_blocks_matrices_and_adamw_the_rest():
    model = GPT(small(tie_embeddings=False, bias=True))
    hidden = hidden_matrices(model)
    names = {id(p): n for n, p in model.named_parameters()}
    assert sorted(names[id(p)] for p in hidden) == sorted(
        n for n, p in model.named_parameters() if n.startswith("blocks.") and p.dim() == 2)
    groups = param_groups(model, 0.1, exclude=hidden)
    rest = [names[id(p)] for g in groups for p in g["params"]]
    assert {"wte.weight", "lm_head.weight", "wpe.weight", "ln_f.weight"} <= set(rest)
    assert sorted(rest + [names[id(p)] for p in hidden]) == sorted(names.values())


def test_combined_optimizer_schedules_saves_and_resumes_both():
    def build():
        torch.manual_seed(0)
        model = GPT(small())
        hidden = hidden_matrices(model)
        adamw = torch.optim.AdamW(param_groups(model, 0.1, exclude=hidden), lr=3e-3)
        muon = Muon(hidden, lr=0.02, ns_dtype=torch.float32)
        optimizer = CombinedOptimizer(adamw, muon)
        schedule = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda s: warmup_cosine(s, 2, 10, 0.1))
        return model, optimizer, schedule

    def train(model, optimizer, schedule, steps, start=0):
        for step in range(start, start + steps):
            idx = torch.randint(0, 32, (2, 16), generator=torch.Generator().manual_seed(step))
            model(idx[:, :-1], idx[:, 1:])[1].backward()
            optimizer.step()
            optimizer.zero_grad()
            schedule.step()

    model, optimizer, schedule = build()
    assert [g["lr"] for g in optimizer.param_groups] == pytest.approx([3e-3 / 3] * 2 + [0.02 / 3])
    train(model, optimizer, schedule, 4)
    saved = copy.deepcopy((model.state_dict(), optimizer.state_dict(), schedule.state_dict()))
    train(model, optimizer, schedule, 4, start=4)  # 8 straight

    resumed, resumed_optimizer, resumed_schedule = build()
    resumed.load_state_dict(saved[0])
    resumed_optimizer.load_state_dict(saved[1])
    resumed_schedule.load_state_dict(saved[2])
    train(resumed, resumed_optimizer, resumed_schedule, 4, start=4)  # 4 + 4
    for (name, a), b in zip(model.state_dict().items(), resumed.state_dict().values(), strict=True):
        assert torch.equal(a, b), name
    assert [g["lr"] for g in resumed_optimizer.param_groups] == [
        g["lr"] for g in optimizer.param_groups]
    with pytest.raises(ValueError, match="saved with another optimizer"):
        resumed_optimizer.load_state_dict({"optimizers": [saved[1]["optimizers"][0]]})


# ------------------------------------------------------------------ through train.py

RECIPE = ["--model.optimizer", "muon", "--model.config.pos_emb", "rope",
          "--model.config.qk_norm", "true", "--model.config.mlp", "relu2",
          "--model.config.norm", "rmsnorm", "--model.config.tie_embeddings", "false",
          "--model.config.zero_init_proj", "true", "--model.config.logit_softcap", "15"]


def metrics(folder: Path) -> list[dict]:
    with open(folder / "metrics.csv", newline="") as f:
        return list(csv.DictReader(f))


def test_a_recipe_run_learns_saves_and_its_checkpoint_loads(text_file, tmp_path):
    fit(text_file, tmp_path, *RECIPE, "--model.warmup_steps", "5", "--trainer.max_steps", "40",
        "--trainer.val_check_interval", "20", "--model.val_samples", "1",
        "--model.val_sample_tokens", "8")
    folder, = run_folders(tmp_path)
    assert "rope" in folder.name and "qknorm" in folder.name
    val = [float(r["val/loss"]) for r in metrics(folder) if r["val/loss"]]
    assert val[-1] < val[0] - 0.5, val
    model, tokenizer = load_gpt_checkpoint(folder / "checkpoints" / "last.ckpt")
    assert model.config.mlp == "relu2" and not model.config.tie_embeddings
    assert model.lm_head.weight is not model.wte.weight
    with torch.no_grad():  # a loaded model computes the loss the run validated with
        idx = torch.tensor([tokenizer.encode(text_file.read_text()[:17])])
        assert model(idx[:, :-1], idx[:, 1:])[1].item() < val[0]


def test_muon_ns_steps_embedding_lr_and_smear_reach_the_run_and_zeros_are_refused(
        text_file, tmp_path, capsys):
    fit(text_file, tmp_path / "a", "--model.optimizer", "muon", "--model.muon_ns_steps", "3",
        "--model.embedding_lr", "0.05", "--model.config.smear", "true", "--trainer.max_steps", "3")
    folder, = run_folders(tmp_path / "a")
    saved = torch.load(folder / "checkpoints" / "last.ckpt", weights_only=False)
    adamw, muon = saved["optimizer_states"][0]["optimizers"]  # AdamW's state, then Muon's
    assert [g["ns_steps"] for g in muon["param_groups"]] == [3]
    tables = [g for g in adamw["param_groups"] if g["name"] == "embeddings"]
    assert [g["initial_lr"] for g in tables] == [0.05] and len(tables[0]["params"]) == 1  # wte
    model, _ = load_gpt_checkpoint(folder / "checkpoints" / "last.ckpt")
    assert model.config.smear and model.smear.abs().sum() > 0  # it trained
    for option in ("muon_ns_steps", "embedding_lr"):
        assert cli(tiny_run(text_file, tmp_path / "b", "--model.optimizer", "muon",
                            f"--model.{option}", "0")) == 1
    err = capsys.readouterr().err
    assert "--model.muon_ns_steps 0: give 1 or more" in err
    assert "--model.embedding_lr 0.0: give a learning rate above 0" in err


def test_embedding_lr_gives_the_tables_a_group_of_their_own():
    model = GPT(small(tie_embeddings=False))
    hidden = hidden_matrices(model)
    names = {id(p): n for n, p in model.named_parameters()}
    assert len(param_groups(model, 0.1, exclude=hidden)) == 2
    *rest, tables = param_groups(model, 0.1, exclude=hidden, embedding_lr=0.5)
    assert sorted(names[id(p)] for p in tables["params"]) == ["wpe.weight", "wte.weight"]
    assert tables["lr"] == 0.5 and tables["weight_decay"] == 0.0
    others = {names[id(p)] for group in rest for p in group["params"]}
    assert "lm_head.weight" in others and not others & {"wpe.weight", "wte.weight"}
    assert all("lr" not in group for group in rest)  # the optimizer's own lr
    *_, decayed = param_groups(model, 0.1, decay_embeddings=True, embedding_lr=0.5)
    assert decayed["weight_decay"] == 0.1


def test_time_to_target_is_logged_printed_and_compared(text_file, tmp_path, caplog):
    caplog.set_level(logging.INFO)
    fit(text_file, tmp_path, "--target_loss", "3.0", "--trainer.max_steps", "30",
        "--trainer.val_check_interval", "10", "--model.warmup_steps", "5")
    folder, = run_folders(tmp_path)
    rows = metrics(folder)
    val = [(int(r["step"]), float(r["val/loss"]), float(r["val/train_time_s"]),
            float(r["val/wall_time_s"]), float(r["val/command_time_s"]))
           for r in rows if r["val/loss"]]
    # validations are left out of the training time; the command's clock counts everything,
    # the set-up before training and the validation itself
    assert all(train < wall < command for _, _, train, wall, command in val)
    first = next(v for v in val if v[1] <= 3.0)
    target = {k: float(v) for r in rows for k, v in r.items() if k.startswith("target/") and v}
    assert target["target/step"] == first[0] + 1  # the CSV's step is the last one done, 0-based
    assert target["target/train_time_s"] == pytest.approx(first[2])
    assert target["target/command_time_s"] == pytest.approx(first[4])
    assert (f"Time to val/loss <= 3.0: step {first[0] + 1}, {first[2]:.1f} s of training "
            f"({first[3]:.1f} s with validations, {first[4]:.1f} s from the command's start;"
            in caplog.text)
    # wandb's run summary (the runs table's columns) carries both clocks
    offline, = (folder / "wandb").glob("offline-run-*/*.wandb")
    summary = {i.key: float(i.value_json) for record in compare_runs.wandb_records(offline)
               if record.WhichOneof("record_type") == "summary" for i in record.summary.update
               if i.key.startswith("target/")}
    assert summary["target/command_time_s"] == pytest.approx(first[4])
    assert summary["target/train_time_s"] == pytest.approx(first[2])
    run = compare_runs.load(str(folder))
    assert compare_runs.to_target(run, "val/loss", 3.0) == (first[0] + 1, *first[2:])
    assert compare_runs.to_target(run, "val/loss", 0.01) == (None, None, None, None)
    assert compare_runs.ms_per_step(run) == pytest.approx(1000 * val[-1][2] / (val[-1][0] + 1))
    assert "| steps to 3 | train s to 3 | wall s to 3 | command s to 3 |" in \
        compare_runs.table([run], "val/loss", target=3.0).replace("  ", "")


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="Linux's /proc")
def test_the_command_clock_starts_when_the_process_did():
    before = time.time()
    process = subprocess.Popen(["sleep", "5"])
    after = time.time()
    try:
        started = process_start_time(process.pid)
    finally:
        process.kill()
        process.wait()
    assert before - 0.02 <= started <= after + 0.02  # the kernel's clock ticks: 1/100 s
    assert process_start_time() < before  # this process is older


def test_an_unreached_target_says_so_and_a_bad_one_is_refused(text_file, tmp_path, caplog, capsys):
    caplog.set_level(logging.INFO)
    fit(text_file, tmp_path / "a", "--target_loss", "0.001", "--trainer.max_steps", "10")
    assert "has not reached the target 0.001 (best " in caplog.text
    assert cli(["fit", "--config", "configs/shakespeare_char_cpu.yaml", "--target_loss", "-1",
                "--data.source", str(text_file), "--run.save_dir", str(tmp_path / "b")]) == 1
    assert "--target_loss must be a positive loss" in capsys.readouterr().err


def test_target_state_survives_a_resume():
    callback = TargetLoss(1.5)
    callback.reached, callback.best = {"step": 7, "wall_time_s": 2.0, "train_time_s": 1.0,
                                       "val_loss": 1.4}, 1.4
    again = TargetLoss(1.5)
    again.load_state_dict(callback.state_dict())
    assert again.summary() == callback.summary() and "step 7, 1.0 s of training" in again.summary()


def test_ablation_variants_resolve_from_the_runs_shape_and_unknown_ones_are_refused():
    shape = {"n_head": 4, "block_size": 64}
    assert ablate.resolve("--model.config.n_kv_head=n_head/2", shape) == \
        "--model.config.n_kv_head=2"
    assert ablate.resolve("--model.config.window=block_size/2", shape) == \
        "--model.config.window=32"
    assert ablate.resolve("--model.lr=3e-3", shape) == "--model.lr=3e-3"
    assert ablate.resolve("--config=configs/x.yaml", shape) == f"--config={REPO}/configs/x.yaml"
    with pytest.raises(UsageError, match="not a variant of the recipe study"):
        ablate.main(["recipe", "--variants", "baseline", "gqa"])
