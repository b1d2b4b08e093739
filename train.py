"""Train a GPT, or a seq2seq Transformer for translation, with Lightning from the command line.

    python train.py fit --config configs/shakespeare_char_cpu.yaml --trainer.max_steps 500
    python train.py fit --config configs/shakespeare_char_cpu.yaml --print_config  # every option

This file is how a model is trained here: the learning-rate schedule, the LightningModules (the
optimizer, the training and validation steps, what a checkpoint keeps) and the program that runs
them. A config's ``kind`` (``gpt``, the default, or ``seq2seq``) picks the module and data classes
of ``KINDS``. The models are in model/ (pure PyTorch), the data in data/, and the Lightning
plumbing in training/ (the command line, run folders and loggers, checkpoints, callbacks).

What happens, in order: the CLI reads the options (configs/ and the command line, later flags
winning) and resolves ``auto`` precision and attention path for the device; the data module reads
and tokenizes the corpus; the module builds the model (``TrainModule.__init__``) and, when fitting
starts, the optimizer and its schedule (``configure_optimizers``); Lightning then runs
``training_step`` on batch after batch, clips the gradients and steps the optimizer and the
schedule, runs ``validation_step`` over the validation split every ``val_check_interval`` steps
and saves checkpoints; at the end the module evaluates what its kind evaluates
(``evaluate_after_fit``: the translation model's BLEU).
"""

import sys

# first: Ctrl-C while the libraries below load ends in one line (training/errors.py)
from training.errors import exit_at_once_on_ctrl_c, exit_code  # isort: split

if __name__ == "__main__":
    exit_at_once_on_ctrl_c()

import math
from dataclasses import asdict
from functools import partial
from typing import Literal

import lightning as L
import torch
from lightning.pytorch.callbacks import Timer
from lightning.pytorch.plugins.precision import MixedPrecision
from torch.nn import functional as F

from data.lm import LMDataModule
from data.tokenizers import tokenizer_from_dict
from data.translation import TranslationDataModule
from model import GPTConfig, Seq2SeqConfig
from model.checkpoint import MODELS
from model.device import device_info
from model.optim import build_optimizer
from training.callbacks import EMA  # noqa: F401 (run configs written before training/ name it)
from training.cli import CLI, build_cli
from training.command import ModelKind
from training.evaluation import final_bleu, log_samples, log_val_bleu
from training.global_batch import rescale_batches_done
from training.optimization import check_optimization, lower_lr_advice, take_settings
from training.run_state import process_start_time

# ------------------------------------------------------------------------------------------------
# The learning-rate schedule


def warmup_cosine(step: int, warmup_steps: int, decay_steps: int | None, min_ratio: float,
                  time_progress: float = 0.0) -> float:
    """LR multiplier: linear warmup to 1, cosine decay to ``min_ratio`` at ``decay_steps``, then
    flat. ``time_progress``: the fraction of the decay's time budget spent so far (see
    ``TrainModule.time_progress``); the decay is as far along as the steps or the time say,
    whichever is further, so a run with a time budget ends its schedule when the time is up.
    ``decay_steps`` None: the time alone."""
    if step < warmup_steps:
        return (step + 1) / (warmup_steps + 1)
    by_steps = ((step - warmup_steps) / max(1, decay_steps - warmup_steps)
                if decay_steps is not None else 0.0)
    progress = max(by_steps, time_progress)
    if progress >= 1.0:
        return min_ratio
    return min_ratio + 0.5 * (1.0 + math.cos(math.pi * progress)) * (1.0 - min_ratio)


# ------------------------------------------------------------------------------------------------
# The LightningModules


class NonFiniteLoss(ValueError):
    """The training loss became NaN or infinite."""


class TrainModule(L.LightningModule):
    """What both models' training shares: the optimizer and its schedule, the tokenizer (taken
    from the data module), val loss and perplexity, the gradient norm, and what a checkpoint keeps
    beside Lightning's own state (model/checkpoint.py has the format). Subclasses set ``kind`` (a
    key of ``model.checkpoint.MODELS``) and ``shape`` (layers and width, for run names), and pass
    these options on as keyword arguments.

    Args:
        lr: peak learning rate of AdamW, reached after ``warmup_steps``.
        min_lr: learning rate at the end of the decay; every group, Muon's too, decays to its own
            peak times ``min_lr / lr``.
        warmup_steps: optimizer steps of linear warmup.
        lr_decay_steps: optimizer step where the cosine reaches ``min_lr``; default
            ``trainer.max_steps``. With a time budget (``--trainer.max_time``) the decay follows
            the time as well, and ends at whichever comes first (``time_progress``).
        weight_decay: weight decay of the weight matrices (AdamW's and Muon's, decoupled).
        betas: AdamW betas.
        optimizer: ``adamw`` for every parameter, or ``muon``: Muon (model/optim.py) for the
            weight matrices inside the blocks, AdamW at ``lr`` for the rest (embeddings, LM head,
            norms, biases; the embeddings at ``embedding_lr`` where it is set).
        muon_lr: Muon's peak learning rate, on the same warmup and decay as ``lr``.
        muon_momentum: Muon's momentum (Nesterov).
        muon_ns_steps: Muon's Newton-Schulz iterations (PyTorch's default: 5); each costs three
            matrix products per weight matrix.
        decay_embeddings: weight decay on the embeddings too (nanoGPT's choice; off by default).
        embedding_lr: AdamW's peak learning rate for the embedding tables (the token embedding,
            which is also the LM head when tied, and the position table), on the same warmup and
            decay; default ``lr``.
    """

    kind: str
    shape: str

    def __init__(self, config, lr: float = 1e-3, min_lr: float = 1e-4, warmup_steps: int = 100,
                 lr_decay_steps: int | None = None, weight_decay: float = 0.1,
                 betas: tuple[float, float] = (0.9, 0.95),
                 optimizer: Literal["adamw", "muon"] = "adamw", muon_lr: float = 0.02,
                 muon_momentum: float = 0.95, muon_ns_steps: int = 5,
                 decay_embeddings: bool = False, embedding_lr: float | None = None):
        super().__init__()
        # the __init__ arguments of the chain of subclasses but config become self.hparams
        self.save_hyperparameters(ignore=["config"], logger=False)
        check_optimization(self.hparams)
        # the model from its config: a dataclass, or a dict (a checkpoint's hyperparameters). The
        # hyperparameters keep it as a plain dict, so that checkpoints load without our classes
        model_class, config_class = MODELS[self.kind]
        if isinstance(config, dict):
            config = config_class(**config)
        self.hparams["config"] = asdict(config)
        self.model = model_class(config)
        self.tokenizer = None  # taken from the data module; saved in every checkpoint
        self.run_info: dict | None = None  # the run's id, name and folder (set by the CLI)
        self._decay_began_s: float | None = None  # time-budget clock when the lr decay began

    def setup(self, stage: str):
        tokenizer = getattr(self.trainer.datamodule, "tokenizer", None)
        if tokenizer is not None and tokenizer.vocab_size != self.model.config.vocab_size:
            raise ValueError(f"the data's tokenizer has {tokenizer.vocab_size} tokens but the "
                             f"model was built for {self.model.config.vocab_size}; train and "
                             f"resume with the same tokenizer")
        if tokenizer is not None:
            self.tokenizer = tokenizer

    # The optimizer and its schedule

    def configure_optimizers(self):
        hp = self.hparams
        decay_steps = hp.lr_decay_steps or self.trainer.max_steps
        decay_steps = decay_steps if decay_steps is not None and decay_steps >= 1 else None
        timer = self.time_budget()
        if decay_steps is None and timer is None:
            raise ValueError("the learning-rate schedule needs a length: set --trainer.max_steps, "
                             "--model.lr_decay_steps or a time budget, --trainer.max_time")
        # fused AdamW: one kernel for all parameters (7x faster optimizer steps on a CPU).
        # Lightning refuses to clip the gradients of a fused optimizer under mixed precision, so
        # mixed-precision runs take the multi-tensor (foreach) one
        mixed = isinstance(self.trainer.precision_plugin, MixedPrecision)
        # Muon's Newton-Schulz iterations run in bf16 only where the device computes in it (a
        # device without bf16 arithmetic emulates it, slowly): fp32 elsewhere (model/optim.py)
        bf16 = device_info(self.device.type).bf16
        optimizer = build_optimizer(
            self.model, hp.optimizer, lr=hp.lr, betas=hp.betas, weight_decay=hp.weight_decay,
            decay_embeddings=hp.decay_embeddings, muon_lr=hp.muon_lr,
            muon_momentum=hp.muon_momentum, muon_ns_steps=hp.muon_ns_steps,
            ns_dtype=torch.bfloat16 if bf16 else torch.float32, embedding_lr=hp.embedding_lr,
            fused=self.device.type in ("cuda", "cpu") and not mixed)
        # this command's settings of each group, which a resumed run takes (on_train_start)
        self._group_settings = [{k: v for k, v in group.items() if k != "params"}
                                for group in optimizer.param_groups]
        # one schedule for every group: each group's own peak lr times the same multiplier. (A
        # lambda, not a bound method: LambdaLR would save a method's object in its state.)
        schedule = partial(warmup_cosine, warmup_steps=hp.warmup_steps, decay_steps=decay_steps,
                           min_ratio=hp.min_lr / hp.lr)
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda step: schedule(step, time_progress=self.time_progress(step, timer)))
        return {"optimizer": optimizer,
                "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def on_train_start(self):
        if self.trainer.ckpt_path is not None:  # resumed: this command's optimizer settings
            take_settings(self.lr_schedulers(), self._group_settings)

    def time_budget(self) -> Timer | None:
        """Lightning's Timer of ``--trainer.max_time``, which stops training when the time is up
        (validations included); None without a time budget."""
        timer = next((c for c in self.trainer.callbacks if isinstance(c, Timer)), None)
        return timer if timer is not None and timer.time_remaining() is not None else None

    def time_progress(self, step: int, timer: Timer | None) -> float:
        """How far the learning-rate decay is through the time budget of ``timer``: 0 when it
        begins (after warmup, counted in steps), 1 when the Timer stops training; 0 without a time
        budget. The schedule follows it, so that a slower machine trains fewer steps but finishes
        its decay rather than being cut off at a high learning rate."""
        if timer is None or step < self.hparams.warmup_steps:
            return 0.0
        elapsed = timer.time_elapsed()  # resumes included
        if self._decay_began_s is None:
            self._decay_began_s = elapsed
        budget = elapsed + timer.time_remaining()
        return (elapsed - self._decay_began_s) / max(budget - self._decay_began_s, 1e-6)

    # Training and validation

    def _finite(self, loss: torch.Tensor) -> torch.Tensor:
        """The loss, or NonFiniteLoss before it reaches the weights (the last checkpoint stays the
        last good one)."""
        if not torch.isfinite(loss):
            raise NonFiniteLoss(f"the training loss is {loss.item()} at step {self.global_step}; "
                                f"training stopped before it changed the weights. "
                                f"{lower_lr_advice(self.hparams, self.trainer, self.run_info)}")
        return loss

    def on_before_optimizer_step(self, optimizer):
        if self.global_step % self.trainer.log_every_n_steps == 0:  # before clipping, unscaled
            norms = [torch.linalg.vector_norm(p.grad) for p in self.parameters()
                     if p.grad is not None]
            self.log("train/grad_norm", torch.linalg.vector_norm(torch.stack(norms)))

    def on_validation_epoch_start(self):
        self._val_nll = torch.zeros(2, device=self.device)  # NLL summed over target tokens; count

    def _log_val_loss(self, loss: torch.Tensor, nll: torch.Tensor, tokens: int):
        """val/loss (the training objective) and, at the epoch's end, val/ppl: exp of the mean NLL
        per token."""
        self.log("val/loss", loss, prog_bar=True, sync_dist=True, batch_size=tokens)
        self._val_nll += torch.stack([nll.detach().float() * tokens,
                                      nll.new_tensor(tokens, dtype=torch.float)])

    def on_validation_epoch_end(self):
        nll, tokens = self.trainer.strategy.reduce(self._val_nll, reduce_op="sum")  # all processes
        self.log("val/ppl", torch.exp(nll / tokens), sync_dist=True)  # the same on every process

    def evaluate_after_fit(self):  # what a kind evaluates once training has ended
        pass

    # Checkpoints: beside Lightning's state and the run's clock (training/run_state.py), the model's
    # kind and tokenizer, which inference needs, the run's folder, and where the decay began

    def on_save_checkpoint(self, checkpoint):
        checkpoint["model_kind"] = self.kind
        checkpoint["lr_decay_began_s"] = self._decay_began_s
        if self.run_info is not None:
            checkpoint["run"] = self.run_info
        if self.tokenizer is not None:
            checkpoint["tokenizer"] = self.tokenizer.to_dict()

    def on_load_checkpoint(self, checkpoint):
        if checkpoint.get("model_kind", "gpt") != self.kind:
            raise ValueError(f"this is a {checkpoint['model_kind']} checkpoint; it cannot resume a "
                             f"{self.kind} run")
        self._decay_began_s = checkpoint.get("lr_decay_began_s")
        if "tokenizer" in checkpoint:
            self.tokenizer = tokenizer_from_dict(checkpoint["tokenizer"])


class GPTLightningModule(TrainModule):
    """Trains ``model.GPT`` on (x, y) windows of a corpus from ``LMDataModule``.

    Args:
        config: the model's shape (``vocab_size`` and ``block_size`` come from the data).
        compile: compile the model with ``torch.compile`` (in place: checkpoint keys are unchanged).
        val_samples: samples generated at each validation (0: none), logged as text.
        val_sample_tokens: tokens per sample.
        init_from: a warm start from the weights of this source: a checkpoint written here, a
            published GPT-2 (``gpt2`` ... ``gpt2-xl``) or a Hugging Face GPT-2 folder, with a new
            optimizer, schedule and run folder (``--ckpt_path`` resumes a run instead). The
            architecture and the tokenizer are the source's (training/resume.py).
        **optimization: the optimizer and schedule options of ``TrainModule``.
    """

    kind = "gpt"

    @property
    def shape(self) -> str:  # e.g. 4L128d, or 4L128d-rope-kv2-w32-qknorm with attention options
        c = self.model.config
        options = [c.pos_emb if c.pos_emb != "learned" else "",
                   f"kv{c.n_kv_head}" if c.n_kv_head not in (None, c.n_head) else "",
                   f"w{c.window}" if c.window is not None else "", "qknorm" if c.qk_norm else ""]
        return "-".join([f"{c.n_layer}L{c.n_embd}d", *filter(None, options)])

    def __init__(self, config: GPTConfig = GPTConfig(), compile: bool = False,
                 val_samples: int = 2, val_sample_tokens: int = 200,
                 init_from: str | None = None, **optimization):
        super().__init__(config, **optimization)
        self._flops_shape = None
        self._token_bytes: torch.Tensor | None = None  # UTF-8 bytes of each token (bits per byte)
        self._notext_tokens = False  # some tokens have no bytes (GPT-2's <|endoftext|>)

    def on_load_checkpoint(self, checkpoint):
        super().on_load_checkpoint(checkpoint)
        # the training stream is one endless epoch: its batches done are whole steps (a resumed
        # run redoes a step it was stopped in), whatever the accumulation
        if self._trainer is not None:  # resuming a run (not loading weights alone)
            rescale_batches_done(checkpoint, self.trainer.accumulate_grad_batches)

    def configure_model(self):
        if self.hparams.compile:
            self.model.compile()  # nn.Module.compile: no "_orig_mod." prefixes in the state dict

    def on_train_batch_start(self, batch, batch_idx):
        x, _ = batch
        if x.shape != self._flops_shape:  # read by Throughput; counting parameters costs time
            self._flops_shape = x.shape
            self.flops_per_batch = self.model.flops_per_token(x.size(1)) * x.numel()

    def training_step(self, batch, batch_idx):
        x, y = batch
        _, loss = self.model(x, y)
        self.log("train/loss", loss, prog_bar=True)
        return self._finite(loss)

    def validation_step(self, batch, batch_idx):
        x, y = batch
        logits, loss = self.model(x, y)
        self._log_val_loss(loss, loss, y.numel())
        self._count_bytes(logits, loss, y)

    # Bits per byte: the validation NLL in bits over the UTF-8 bytes of the text it predicts, a
    # measure that does not depend on the tokenizer (a character model and a BPE model compare).
    # Tokens that are no text (GPT-2's <|endoftext|>) are left out of both sums, as nanochat does.

    def on_validation_epoch_start(self):
        super().on_validation_epoch_start()
        self._val_bits = torch.zeros(2, device=self.device)  # NLL (nats) of text tokens; bytes
        if self.tokenizer is not None and self._token_bytes is None:
            token_bytes = self.tokenizer.token_bytes()
            self._token_bytes = torch.tensor(token_bytes)
            self._notext_tokens = min(token_bytes) == 0
        if self._token_bytes is not None:
            self._token_bytes = self._token_bytes.to(self.device)

    def _count_bytes(self, logits: torch.Tensor, loss: torch.Tensor, y: torch.Tensor):
        if self._token_bytes is None:
            return
        nbytes = self._token_bytes[y]  # (B, T)
        nll = loss.detach().float() * y.numel()  # summed over every target
        if self._notext_tokens:  # a vocabulary with no-text tokens: take theirs out
            notext = nbytes == 0
            log_probs = F.log_softmax(logits[notext].float(), dim=-1)  # (n, vocab_size)
            nll = nll + log_probs.gather(-1, y[notext].unsqueeze(-1)).sum()
        self._val_bits += torch.stack([nll, nbytes.sum().float()])

    def on_validation_epoch_end(self):
        super().on_validation_epoch_end()
        hp = self.hparams
        if self._token_bytes is not None:
            nats, nbytes = self.trainer.strategy.reduce(self._val_bits, reduce_op="sum")
            self.log("val/bpb", nats / (math.log(2) * nbytes.clamp(min=1)), sync_dist=True)
        if (not self.trainer.sanity_checking and self.tokenizer is not None
                and hp.val_samples > 0 and self.trainer.is_global_zero):
            log_samples(self, hp.val_samples, hp.val_sample_tokens)


class Seq2SeqLightningModule(TrainModule):
    """Trains ``model.Seq2SeqTransformer`` on batches of (src, tgt_in, tgt_out) from
    ``TranslationDataModule``.

    Args:
        config: the model's shape (``vocab_size`` and ``max_len`` come from the data).
        val_bleu: translate the validation set with greedy search at each validation and log
            sacreBLEU (``val/bleu``, ``val/bleu_lc``), with a few examples.
        beam_size: beam for the BLEU at the end of training (``final/bleu``).
        length_penalty: alpha of GNMT's length penalty for beam search.
        tune_length_penalty: alphas to try at the end of training, with beam search on the data's
            dev split (``--data.dev_size``); the one with the best cased BLEU there replaces
            ``length_penalty`` for the final val BLEU, so that val is never used to choose it.
        **optimization: the optimizer and schedule options of ``TrainModule``.
    """

    kind = "seq2seq"

    @property
    def shape(self) -> str:
        c = self.model.config
        return f"{c.n_encoder_layer}+{c.n_decoder_layer}L{c.n_embd}d"

    def __init__(self, config: Seq2SeqConfig = Seq2SeqConfig(), val_bleu: bool = True,
                 beam_size: int = 4, length_penalty: float = 0.6,
                 tune_length_penalty: list[float] | None = None, **optimization):
        super().__init__(config, **optimization)

    def setup(self, stage: str):
        super().setup(stage)
        if stage == "fit" and self.hparams.tune_length_penalty \
                and "dev" not in self.trainer.datamodule.texts:
            raise ValueError("model.tune_length_penalty needs a dev split to tune on: set "
                             "--data.dev_size (e.g. 1000 training pairs held out), or leave "
                             "tune_length_penalty unset")

    def on_train_batch_start(self, batch, batch_idx):
        src, tgt_in, _ = batch  # read by Throughput
        self.flops_per_batch = self.model.flops_per_batch(src.numel(), tgt_in.numel())

    def training_step(self, batch, batch_idx):
        src, tgt_in, tgt_out = batch
        _, loss = self.model(src, tgt_in, tgt_out)
        self.log("train/loss", loss, prog_bar=True, batch_size=src.size(0))
        return self._finite(loss)

    def validation_step(self, batch, batch_idx):
        src, tgt_in, tgt_out = batch
        pad = self.model.config.pad_id
        logits, loss = self.model(src, tgt_in, tgt_out)  # loss: label-smoothed
        nll = F.cross_entropy(logits.flatten(0, 1).float(), tgt_out.flatten(), ignore_index=pad)
        tokens = int((tgt_out != pad).sum())  # the mean over batches weighs them by tokens
        self._log_val_loss(loss, nll, tokens)
        # BLEU here, at the last batch, not in on_validation_epoch_end: callbacks' epoch-end hooks
        # run first, and the EMA callback's puts the training weights back
        if (batch_idx == self.trainer.num_val_batches[0] - 1 and not self.trainer.sanity_checking
                and self.hparams.val_bleu and self.trainer.is_global_zero):
            log_val_bleu(self)

    def evaluate_after_fit(self):
        """The final weights (the EMA's, with that callback) translate val, and test where the data
        has it, with beam search and a length penalty chosen on dev
        (``training.evaluation.final_bleu``)."""
        if self.trainer.is_global_zero and not self.trainer.interrupted and self.tokenizer:
            self.hparams.length_penalty = final_bleu(self)


# ------------------------------------------------------------------------------------------------
# The program

KINDS = {"gpt": ModelKind(GPTLightningModule, LMDataModule, "block_size",
                          masks_padded_keys=False),
         "seq2seq": ModelKind(Seq2SeqLightningModule, TranslationDataModule, "max_len",
                              masks_padded_keys=True)}


def main(args: list[str] | None = None, run: bool = True,
         command_started: float | None = None) -> CLI:
    """train.py's CLI for ``args`` (default: the command line). ``run=False`` builds the model, data
    module and Trainer without training (``args`` then has no ``fit``), as scripts/bench_train.py
    does. ``command_started``: when the command started (``time.time()``), from which
    ``--target_loss`` counts its command time; default now."""
    torch.set_float32_matmul_precision("high")  # TF32 matmuls on GPUs that have them
    return build_cli(KINDS, args, run, command_started)


def cli(args: list[str] | None = None) -> int:
    """``main`` as a command: bad input, a full disk, Ctrl-C or SIGTERM (after saving a checkpoint)
    end in one line and an exit status (training/errors.py). The command clock of the command line
    (``args`` None) starts when this process did, imports included, where the system says when;
    else (and for ``args`` given in a running program) now."""
    started = process_start_time() if args is None else None
    return exit_code(lambda: main(args, command_started=started))


if __name__ == "__main__":
    sys.exit(cli())
