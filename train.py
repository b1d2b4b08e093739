"""Train a GPT, or a seq2seq Transformer for translation, with Lightning from the command line.

    python train.py fit --config configs/shakespeare_char_cpu.yaml
    python train.py fit --config configs/shakespeare_char_cpu.yaml --model.config.n_layer 2 \\
        --trainer.max_steps 500
    python train.py fit --config configs/multi30k_de_en.yaml --data.source ../shared/data/multi30k
    python train.py fit --config configs/shakespeare_char_cpu.yaml --print_config
    python train.py fit --config configs/shakespeare_char_cpu.yaml \\
        --ckpt_path runs/mini-gpt/<run>/checkpoints/last.ckpt

Options come from the YAML files in configs/ and can be overridden on the command line, later flags
winning. A config's top-level ``kind`` (``gpt``, the default, or ``seq2seq``) picks the model and
data classes from ``KINDS``. This file is the training program and nothing else: the models are in
model/ (pure PyTorch), the data in data/, loading a checkpoint for inference in model/checkpoint.py.

Reading order: optimization; the LightningModules; callbacks and plugins; run folders and logging;
the CLI and ``main``.
"""

import csv
import json
import math
import netrc
import os
import random
import re
import secrets
import shutil
import signal
import subprocess
import sys
import threading
import time
from dataclasses import asdict, dataclass, replace
from functools import partial
from pathlib import Path
from typing import Literal

import lightning as L
import torch
import yaml
from lightning.fabric.connector import _PRECISION_INPUT
from lightning.pytorch.callbacks import (
    LearningRateMonitor,
    ModelCheckpoint,
    ProgressBar,
    ThroughputMonitor,
    Timer,
    TQDMProgressBar,
    WeightAveraging,
)
from lightning.pytorch.cli import LightningCLI, SaveConfigCallback
from lightning.pytorch.loggers import CSVLogger, WandbLogger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter
from lightning.pytorch.loggers.logger import rank_zero_experiment
from lightning.pytorch.plugins import CheckpointIO, TorchCheckpointIO
from lightning.pytorch.plugins.precision import MixedPrecision
from lightning.pytorch.utilities import rank_zero_info
from torch import nn
from torch.nn import functional as F

from data.lm import LMDataModule
from data.tokenizers import tokenizer_from_dict
from data.translation import TranslationDataModule
from model import Block, GPTConfig, Seq2SeqConfig
from model.checkpoint import (
    MODELS,
    load_gpt_weights,
    read_checkpoint,
    source_config,
    source_state_dict,
)
from model.device import (
    DeviceInfo,
    choose_attn_impl,
    choose_precision,
    device_info,
    resolve_device,
    slow_precision_warning,
)
from model.optim import CombinedOptimizer, Muon
from model.translate import bleu, bleu_signature, translate, translate_alphas
from scripts._common import exit_code, keep_freed_memory

# ------------------------------------------------------------------------------------------------
# Optimization


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


OPTIMIZERS = ("adamw", "muon")


def hidden_matrices(module: nn.Module) -> list[nn.Parameter]:
    """The weight matrices inside the transformer blocks (attention and MLP projections): Muon's.
    Not the embeddings and the LM head, which map tokens, not features."""
    in_blocks = {id(m.weight) for block in module.modules() if isinstance(block, Block)
                 for m in block.modules() if isinstance(m, nn.Linear)}
    return [p for p in module.parameters() if id(p) in in_blocks]


def param_groups(module: nn.Module, weight_decay: float, decay_embeddings: bool = False,
                 exclude: list[nn.Parameter] = ()) -> list[dict]:
    """AdamW groups: weight decay on weight matrices only, not on biases, norms or embeddings
    (``decay_embeddings``: on embeddings too, as nanoGPT does). ``exclude``: parameters another
    optimizer trains."""
    embeddings = {id(m.weight) for m in module.modules() if isinstance(m, nn.Embedding)}
    excluded = {id(p) for p in exclude}
    params = [p for p in module.parameters() if id(p) not in excluded]  # tied weights appear once
    decays = [p.dim() >= 2 and (decay_embeddings or id(p) not in embeddings) for p in params]
    return [{"params": [p for p, d in zip(params, decays, strict=True) if d],
             "weight_decay": weight_decay},
            {"params": [p for p, d in zip(params, decays, strict=True) if not d],
             "weight_decay": 0.0}]


class NonFiniteLoss(ValueError):
    """The training loss became NaN or infinite."""


class Interrupted(Exception):
    """Training stopped on Ctrl-C or SIGTERM, after saving a checkpoint to resume from."""

    def __init__(self, signum: int, step: int, path: str):
        self.signum = signum
        super().__init__(f"stopped by {signal.Signals(signum).name} after step {step}; saved "
                         f"{path}. Resume with the same command and --ckpt_path {path}")


# ------------------------------------------------------------------------------------------------
# The LightningModules


class TrainModule(L.LightningModule):
    """What both models' training shares: AdamW (or Muon for the blocks' matrices beside it), linear
    warmup then cosine decay to ``min_lr`` over the steps or the time budget; the tokenizer, taken
    from the data module; val perplexity, gradient norm, wall time and training time; and, in every
    checkpoint, what Lightning does not keep itself (the format is in model/checkpoint.py): the
    model kind, the tokenizer, the random states, the wall and validation times and the run's
    folder. Subclasses set ``kind`` (a key of ``model.checkpoint.MODELS``) and ``shape``
    (layers and width, for run names)."""

    kind: str
    shape: str

    def __init__(self, config):
        super().__init__()
        # the subclass's __init__ arguments but config become self.hparams, kept in checkpoints
        # (Lightning collects them through the chain of __init__ calls); the CLI logs all options
        self.save_hyperparameters(ignore=["config"], logger=False)
        # the model from its config: a dataclass, or a dict (a checkpoint's hyperparameters). The
        # hyperparameters keep it as a plain dict, so that checkpoints load without our classes
        model_class, config_class = MODELS[self.kind]
        if isinstance(config, dict):
            config = config_class(**config)
        self.hparams["config"] = asdict(config)
        self.model = model_class(config)
        self.tokenizer = None  # taken from the data module; saved in every checkpoint
        self.run_info: dict | None = None  # the run's id, name and folder (set by the CLI)
        self._elapsed_before = 0.0  # wall-clock seconds of training before a resume
        self._fit_start: float | None = None
        self._val_seconds = 0.0  # of that wall time, seconds spent validating (resumes included)
        self._val_began: float | None = None  # when the validation under way began
        self.val_started_at = (0.0, 0.0)  # (wall time, training time) when the last one began
        self._decay_began_s: float | None = None  # time-budget clock when the lr decay began
        self._rng_to_restore: dict | None = None

    def setup(self, stage: str):
        tokenizer = getattr(self.trainer.datamodule, "tokenizer", None)
        if tokenizer is not None:
            if tokenizer.vocab_size != self.model.config.vocab_size:
                raise ValueError(f"the data's tokenizer has {tokenizer.vocab_size} tokens but the "
                                 f"model was built for {self.model.config.vocab_size}; train and "
                                 f"resume with the same tokenizer")
            self.tokenizer = tokenizer

    def configure_optimizers(self):
        hp = self.hparams
        decay_steps = hp.lr_decay_steps or self.trainer.max_steps
        decay_steps = decay_steps if decay_steps is not None and decay_steps >= 1 else None
        timer = self.time_budget()
        if decay_steps is None and timer is None:
            raise ValueError("the learning-rate schedule needs a length: set --trainer.max_steps, "
                             "--model.lr_decay_steps or a time budget, --trainer.max_time")
        if hp.optimizer not in OPTIMIZERS:
            raise ValueError(f"--model.optimizer {hp.optimizer!r} is unknown; choose one of "
                             f"{list(OPTIMIZERS)}")
        if hp.muon_ns_steps < 1:
            raise ValueError(f"--model.muon_ns_steps must be 1 or more (Muon's Newton-Schulz "
                             f"iterations; PyTorch's default is 5), got {hp.muon_ns_steps}")
        # fused: one kernel for all parameters (7x faster optimizer steps on CPU). Lightning refuses
        # to clip the gradients of a fused optimizer under mixed precision, so AMP runs take the
        # multi-tensor (foreach) one, which is not PyTorch's default on CPU (a loop over parameters)
        mixed = isinstance(self.trainer.precision_plugin, MixedPrecision)
        fused = self.device.type in ("cuda", "cpu") and not mixed
        muon_params = hidden_matrices(self.model) if hp.optimizer == "muon" else []
        optimizer = torch.optim.AdamW(
            param_groups(self.model, hp.weight_decay, hp.decay_embeddings, exclude=muon_params),
            lr=hp.lr, betas=tuple(hp.betas), fused=fused, foreach=not fused)
        if muon_params:
            # PyTorch's Muon runs its Newton-Schulz iterations in bf16, emulated (slow) on a device
            # without bf16 arithmetic: there they run in fp32 (model/optim.py)
            ns_dtype = torch.bfloat16 if device_info(self.device.type).bf16 else torch.float32
            muon = Muon(muon_params, lr=hp.muon_lr, momentum=hp.muon_momentum,
                        weight_decay=hp.weight_decay, ns_steps=hp.muon_ns_steps, ns_dtype=ns_dtype)
            # group names: the learning-rate monitor logs lr-CombinedOptimizer/{adamw,muon,...}
            for group, name in zip(optimizer.param_groups + muon.param_groups,
                                   ("adamw", "adamw_no_decay", "muon"), strict=True):
                group["name"] = name
            optimizer = CombinedOptimizer(optimizer, muon)
        # one schedule for every group: each group's own peak lr times the same multiplier. (A
        # lambda, not a bound method: LambdaLR would save a method's object in its state.)
        schedule = partial(warmup_cosine, warmup_steps=hp.warmup_steps, decay_steps=decay_steps,
                           min_ratio=hp.min_lr / hp.lr)
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda step: schedule(step, time_progress=self.time_progress(step, timer)))
        return {"optimizer": optimizer,
                "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def time_budget(self) -> Timer | None:
        """Lightning's Timer of ``--trainer.max_time``, which stops training when the time is up
        (validations included), or None without a time budget."""
        timer = next((c for c in self.trainer.callbacks if isinstance(c, Timer)), None)
        return timer if timer is not None and timer.time_remaining() is not None else None

    def time_progress(self, step: int, timer: Timer | None) -> float:
        """How far the learning-rate decay is through the time budget of ``timer``
        (``time_budget()``): 0 when it begins (after warmup, counted in steps), 1 when the Timer
        stops training; 0 without a time budget. The schedule follows it, so that a slower machine
        trains fewer steps but finishes its decay rather than being cut off at a high learning
        rate."""
        if timer is None or step < self.hparams.warmup_steps:
            return 0.0
        elapsed = timer.time_elapsed()  # resumes included
        if self._decay_began_s is None:
            self._decay_began_s = elapsed
        budget = elapsed + timer.time_remaining()
        return (elapsed - self._decay_began_s) / max(budget - self._decay_began_s, 1e-6)

    def _finite(self, loss: torch.Tensor) -> torch.Tensor:
        """The loss, or NonFiniteLoss before it reaches the weights (the last checkpoint stays the
        last good one)."""
        if not torch.isfinite(loss):
            ckpt = self.trainer.checkpoint_callback
            last = ckpt.last_model_path if ckpt is not None else ""
            where = (f"{last} is the last good checkpoint: resume from it" if last
                     else "no checkpoint yet: start again")
            raise NonFiniteLoss(f"the training loss is {loss.item()} at step {self.global_step}; "
                                f"training stopped before it changed the weights. {where} with a "
                                f"lower --model.lr, --trainer.gradient_clip_val, or 32-true "
                                f"precision")
        return loss

    def on_validation_start(self):
        self.val_started_at = (self.wall_time(), self.train_time())
        self._val_began = time.perf_counter()

    def on_validation_end(self):  # after the callbacks': the checkpoint saved here counts too
        self._val_seconds += time.perf_counter() - self._val_began
        self._val_began = None

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
        if self._fit_start is not None and not self.trainer.sanity_checking:
            # val loss against time: the wall time, and the training time (validations left out),
            # that training took to reach these weights
            wall, train = self.val_started_at
            self.log("val/wall_time_s", wall, sync_dist=True)
            self.log("val/train_time_s", train, sync_dist=True)

    def on_before_optimizer_step(self, optimizer):
        if self.global_step % self.trainer.log_every_n_steps == 0:  # before clipping, unscaled
            norms = [torch.linalg.vector_norm(p.grad) for p in self.parameters()
                     if p.grad is not None]
            self.log("train/grad_norm", torch.linalg.vector_norm(torch.stack(norms)))

    def evaluate_after_fit(self):
        """What a kind evaluates, prints and logs once training has ended (the CLI calls it)."""

    # Resuming. Lightning restores the weights, optimizer, schedule, step and loops; these hooks add
    # what makes N + N steps equal 2N straight: the wall time so far, and the random states
    # (dropout, the data order), which are put back at the last moment before the first step, after
    # anything else in the set-up may have drawn random numbers.

    def on_save_checkpoint(self, checkpoint):
        checkpoint["model_kind"] = self.kind
        checkpoint["wall_time_s"] = self.wall_time()
        checkpoint["val_time_s"] = self.validation_time()
        checkpoint["lr_decay_began_s"] = self._decay_began_s
        checkpoint["rng_states"] = {"torch": torch.get_rng_state(), "python": random.getstate()}
        if torch.cuda.is_available():
            checkpoint["rng_states"]["cuda"] = torch.cuda.get_rng_state_all()
        if self.run_info is not None:
            checkpoint["run"] = self.run_info
        if self.tokenizer is not None:
            checkpoint["tokenizer"] = self.tokenizer.to_dict()

    def on_load_checkpoint(self, checkpoint):
        if checkpoint.get("model_kind", "gpt") != self.kind:
            raise ValueError(f"this is a {checkpoint['model_kind']} checkpoint; it cannot resume a "
                             f"{self.kind} run")
        self._elapsed_before = checkpoint.get("wall_time_s", 0.0)
        self._val_seconds = checkpoint.get("val_time_s", 0.0)
        self._decay_began_s = checkpoint.get("lr_decay_began_s")
        self._rng_to_restore = checkpoint.get("rng_states")
        if "tokenizer" in checkpoint:
            self.tokenizer = tokenizer_from_dict(checkpoint["tokenizer"])

    def on_fit_start(self):  # after a resume's on_load_checkpoint: the clock continues from there
        self._fit_start = time.perf_counter() - self._elapsed_before

    def on_train_start(self):  # the last hook before the first step: nothing draws after it
        if self._rng_to_restore is not None:
            torch.set_rng_state(self._rng_to_restore["torch"])
            if "cuda" in self._rng_to_restore and torch.cuda.is_available():
                torch.cuda.set_rng_state_all(self._rng_to_restore["cuda"])
            version, state, gauss = self._rng_to_restore["python"]  # a list after torch.load
            random.setstate((version, tuple(state), gauss))
            self._rng_to_restore = None

    def wall_time(self) -> float:
        """Seconds since this run's training started, resumes included (time between them left
        out)."""
        if self._fit_start is None:
            return self._elapsed_before
        return time.perf_counter() - self._fit_start

    def validation_time(self) -> float:
        """Of ``wall_time``, the seconds spent validating: val loss, samples, BLEU, and the
        checkpoints saved at validations (the sanity check's included)."""
        running = time.perf_counter() - self._val_began if self._val_began is not None else 0.0
        return self._val_seconds + running

    def train_time(self) -> float:
        """``wall_time`` less ``validation_time``: the speedrun's measure, which does not change
        with how often a run validates."""
        return self.wall_time() - self.validation_time()


class GPTLightningModule(TrainModule):
    """Trains ``model.GPT`` on (x, y) windows of a corpus from ``LMDataModule``.

    Args:
        config: the model's shape (``vocab_size`` and ``block_size`` come from the data).
        lr: peak learning rate, reached after ``warmup_steps``.
        min_lr: learning rate at the end of the decay.
        warmup_steps: optimizer steps of linear warmup.
        lr_decay_steps: optimizer step where the cosine reaches ``min_lr``; default
            ``trainer.max_steps``. With a time budget (``--trainer.max_time``) the decay follows
            the time as well, and ends at whichever comes first (``TrainModule.time_progress``).
        weight_decay: weight decay of the weight matrices (AdamW's and Muon's, decoupled).
        betas: AdamW betas.
        optimizer: ``adamw`` for every parameter, or ``muon``: Muon (model/optim.py) for the
            weight matrices inside the blocks, AdamW at ``lr`` for the rest (embeddings, LM head,
            norms, biases).
        muon_lr: Muon's peak learning rate, on the same warmup and decay as ``lr``.
        muon_momentum: Muon's momentum (Nesterov).
        muon_ns_steps: Muon's Newton-Schulz iterations (PyTorch's default: 5); each costs three
            matrix products per weight matrix, a quarter of a CPU step at 5 (docs/translation.md).
        decay_embeddings: weight decay on the embeddings too (nanoGPT's choice; off by default).
        compile: compile the model with ``torch.compile`` (in place: checkpoint keys are unchanged).
        val_samples: samples generated at each validation (0: none), logged as text and, with
            wandb, a table.
        val_sample_tokens: tokens per sample.
        init_from: a warm start: the run begins from the weights of this source instead of random
            ones, with a new optimizer, schedule and run folder (``--ckpt_path`` resumes a run
            instead). A source is a checkpoint written by train.py, a published GPT-2 (``gpt2``,
            ``gpt2-medium``, ``gpt2-large``, ``gpt2-xl``) or a Hugging Face GPT-2 folder
            (model/checkpoint.py). The model's architecture is the source's (``config`` options
            left unset take its values; see ``WARM_START_MAY_CHANGE``), and so is the tokenizer:
            the data's must be the same.
    """

    kind = "gpt"

    @property
    def shape(self) -> str:
        """e.g. 4L128d, or 4L128d-rope-kv2-w32-qknorm with the attention options set."""
        c = self.model.config
        options = [c.pos_emb if c.pos_emb != "learned" else "",
                   f"kv{c.n_kv_head}" if c.n_kv_head not in (None, c.n_head) else "",
                   f"w{c.window}" if c.window is not None else "", "qknorm" if c.qk_norm else ""]
        return "-".join([f"{c.n_layer}L{c.n_embd}d", *filter(None, options)])

    def __init__(self, config: GPTConfig = GPTConfig(), lr: float = 1e-3, min_lr: float = 1e-4,
                 warmup_steps: int = 100, lr_decay_steps: int | None = None,
                 weight_decay: float = 0.1, betas: tuple[float, float] = (0.9, 0.95),
                 optimizer: Literal["adamw", "muon"] = "adamw", muon_lr: float = 0.02,
                 muon_momentum: float = 0.95, muon_ns_steps: int = 5,
                 decay_embeddings: bool = False, compile: bool = False, val_samples: int = 2,
                 val_sample_tokens: int = 200, init_from: str | None = None):
        super().__init__(config)
        self._flops_shape = None

    def warm_start(self):
        """Copy the weights of ``init_from`` into the model, before anything is trained: the first
        step starts from them, and the optimizer is made afterwards, fresh."""
        source = self.hparams.init_from
        load_gpt_weights(self.model, source_state_dict(source), source)
        rank_zero_info(f"Warm start: the weights of {source} "
                       f"({self.model.num_params(non_embedding=False) / 1e6:.1f}M parameters)")

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
        _, loss = self.model(x, y)
        self._log_val_loss(loss, loss, y.numel())

    def on_validation_epoch_end(self):
        super().on_validation_epoch_end()
        hp = self.hparams
        if (self.trainer.sanity_checking or self.tokenizer is None or hp.val_samples < 1
                or not self.trainer.is_global_zero):
            return
        start = torch.full((hp.val_samples, 1), self.tokenizer.start_token, device=self.device)
        generator = torch.Generator(self.device).manual_seed(0)  # the same draws every validation
        tokens = self.model.generate(start, hp.val_sample_tokens, temperature=0.8, top_k=200,
                                     generator=generator)
        texts = [self.tokenizer.decode(row[1:].tolist()) for row in tokens]
        rank_zero_info(f"\nSamples at step {self.global_step}:\n" + "\n---\n".join(texts))
        for logger in self.loggers:
            if isinstance(logger, WandbLogger):
                logger.log_text("val/samples", columns=["step", "sample"],
                                data=[[self.global_step, text] for text in texts])


class Seq2SeqLightningModule(TrainModule):
    """Trains ``model.Seq2SeqTransformer`` on batches of (src, tgt_in, tgt_out) from
    ``TranslationDataModule``.

    Args:
        config: the model's shape (``vocab_size`` and ``max_len`` come from the data).
        lr, min_lr, warmup_steps, lr_decay_steps, weight_decay, betas, optimizer, muon_lr,
            muon_momentum, muon_ns_steps, decay_embeddings: as for GPTLightningModule.
        val_bleu: translate the validation set with greedy search at each validation and log
            sacreBLEU (``val/bleu``, ``val/bleu_lc``), with a few examples.
        beam_size: beam for the BLEU at the end of training (``final/bleu``).
        length_penalty: alpha of GNMT's length penalty for beam search.
        tune_length_penalty: alphas to try at the end of training, with beam search on the data's
            dev split (``--data.dev_size``); the one with the best cased BLEU there replaces
            ``length_penalty`` for the final val BLEU, so that val is never used to choose it.
    """

    kind = "seq2seq"

    @property
    def shape(self) -> str:
        c = self.model.config
        return f"{c.n_encoder_layer}+{c.n_decoder_layer}L{c.n_embd}d"

    def __init__(self, config: Seq2SeqConfig = Seq2SeqConfig(), lr: float = 1.5e-3,
                 min_lr: float = 1e-4, warmup_steps: int = 400, lr_decay_steps: int | None = None,
                 weight_decay: float = 0.1, betas: tuple[float, float] = (0.9, 0.98),
                 optimizer: Literal["adamw", "muon"] = "adamw", muon_lr: float = 0.02,
                 muon_momentum: float = 0.95, muon_ns_steps: int = 5,
                 decay_embeddings: bool = False, val_bleu: bool = True, beam_size: int = 4,
                 length_penalty: float = 0.6, tune_length_penalty: list[float] | None = None):
        super().__init__(config)

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
        if batch_idx == self.trainer.num_val_batches[0] - 1 and not self.trainer.sanity_checking:
            self._log_val_bleu()

    def evaluate_bleu(self, beam_size: int = 1, split: str = "val",
                      length_penalty: float | None = None) -> tuple[dict[str, float], list[str]]:
        """sacreBLEU of the model's translations of a split of the data module's pairs, and the
        translations."""
        sources, references = self.trainer.datamodule.texts[split]
        alpha = self.hparams.length_penalty if length_penalty is None else length_penalty
        hypotheses = translate(self.model, self.tokenizer, sources, beam_size, alpha, truncate=True)
        return bleu(hypotheses, references), hypotheses

    def best_length_penalty(self) -> float:
        """The alpha of ``tune_length_penalty`` with the best cased beam-search BLEU on the dev
        split (one beam search: the alphas only rank its final hypotheses)."""
        hp = self.hparams
        sources, references = self.trainer.datamodule.texts["dev"]
        translations = translate_alphas(self.model, self.tokenizer, sources, hp.beam_size,
                                        hp.tune_length_penalty, truncate=True)
        scores = {alpha: bleu(hyps, references)["bleu"] for alpha, hyps in translations.items()}
        best = max(scores, key=scores.get)
        rank_zero_info(f"Dev sacreBLEU (beam {hp.beam_size}) by length penalty: "
                       + ", ".join(f"{alpha}: {score:.2f}" for alpha, score in scores.items())
                       + f"; using {best}")
        return best

    def _log_val_bleu(self):
        if not self.hparams.val_bleu or not self.trainer.is_global_zero:
            return
        scores, hypotheses = self.evaluate_bleu()
        for name, value in scores.items():
            self.log(f"val/{name}", value, rank_zero_only=True, batch_size=1)
        sources, references = self.trainer.datamodule.texts["val"]
        examples = [[self.global_step, sources[i], hypotheses[i], references[i]] for i in range(3)]
        rank_zero_info(f"\nStep {self.global_step}: val sacreBLEU {scores['bleu']:.2f} (lowercase "
                       f"{scores['bleu_lc']:.2f}), greedy, {bleu_signature()}\n"
                       + "\n".join(f"  {s}\n  -> {h}\n  (ref: {r})" for _, s, h, r in examples))
        for logger in self.loggers:
            if isinstance(logger, WandbLogger):
                logger.log_text("val/translations", data=examples,
                                columns=["step", "source", "translation", "reference"])

    def evaluate_after_fit(self):
        """The final weights (the EMA's, with that callback) translate val with beam search, after
        tuning the length penalty on dev: ``final/bleu``, ``final/bleu_lc``. A test split, where
        the data has one, is scored once, with the same settings: ``final/test_bleu``,
        ``final/test_bleu_lc``."""
        trainer = self.trainer
        if not trainer.is_global_zero or trainer.interrupted or self.tokenizer is None:
            return
        start = time.perf_counter()
        self.eval()
        # Lightning's teardown moved the model to the CPU when fit ended: search on the device it
        # trained on (on a GPU the final beam search had run on the host's CPU), then put it back
        self.to(trainer.strategy.root_device)
        hp = self.hparams
        try:
            if hp.tune_length_penalty:
                hp.length_penalty = self.best_length_penalty()
            metrics, results = {"length_penalty": hp.length_penalty}, []
            for split, prefix in (("val", ""), ("test", "test_")):
                if split in trainer.datamodule.texts:
                    scores, _ = self.evaluate_bleu(hp.beam_size, split)
                    metrics.update({prefix + name: value for name, value in scores.items()})
                    results.append(f"{split} {scores['bleu']:.2f} cased, "
                                   f"{scores['bleu_lc']:.2f} lowercase")
        finally:
            self.cpu()
        rank_zero_info(f"Final sacreBLEU (beam {hp.beam_size}, length penalty "
                       f"{hp.length_penalty}): {'; '.join(results)} ({bleu_signature()}); "
                       f"{time.perf_counter() - start:.0f} s of evaluation. scripts/translate.py: "
                       f"--beam {hp.beam_size} --length-penalty {hp.length_penalty}")
        for logger in trainer.loggers:
            logger.log_metrics({f"final/{k}": v for k, v in metrics.items()},
                               step=trainer.global_step)


# ------------------------------------------------------------------------------------------------
# Callbacks and plugins


class EMA(WeightAveraging):
    """An exponential moving average of the weights, updated after every optimizer step (Lightning's
    WeightAveraging): validation runs on it, checkpoints store it as the model's weights, and the
    model ends training with it.

    Args:
        decay: weight of the average at each update (0.998: about the last 500 steps), reached
            gradually: update n uses min(decay, (1 + n) / (10 + n)), so the random initial weights
            fade out early.
    """

    def __init__(self, decay: float = 0.998):
        if not 0.0 < decay < 1.0:
            raise ValueError(f"EMA decay must be in (0, 1), got {decay}")

        @torch.no_grad()
        def update(averaged: list[torch.Tensor], current: list[torch.Tensor],
                   n_averaged: torch.Tensor):
            weight = 1.0 - min(decay, (1.0 + n_averaged.item()) / (10.0 + n_averaged.item()))
            torch._foreach_lerp_(averaged, current, weight)

        super().__init__(multi_avg_fn=update, use_buffers=True)


class Throughput(ThroughputMonitor):
    """Logs tokens/s (``train/device/items_per_sec``) every log interval and, where the device's
    peak FLOP/s is known, MFU (``train/device/mfu``): from Lightning's table of common GPUs, or
    ``peak_flops`` (FLOP/s of one device at the training precision) when given, e.g. for a CPU.

    Args:
        peak_flops: peak FLOP/s of one device; overrides the table.
        window_size: batches averaged over.
    """

    def __init__(self, peak_flops: float | None = None, window_size: int = 50):
        super().__init__(batch_size_fn=lambda batch: batch[0].size(0), window_size=window_size,
                         length_fn=lambda batch: batch[0].numel())
        self.peak_flops = peak_flops

    def setup(self, trainer, pl_module, stage):
        super().setup(trainer, pl_module, stage)
        if self.peak_flops:
            self.available_flops = self.peak_flops
            for throughput in self._throughputs.values():
                throughput.available_flops = self.peak_flops


class TargetLoss(L.Callback):
    """Time to a target loss: the first validation whose ``val/loss`` is at most ``loss``, with the
    step, wall time and training time (wall time less validations) that reached it. Printed when it
    happens and at the end of training (``summary``), logged once as ``target/step``,
    ``target/wall_time_s`` and ``target/train_time_s``, and kept in checkpoints (a resumed run
    still knows). train.py adds it for ``--target_loss``. The resolution is the validation
    interval: the target was reached at most ``val_check_interval`` steps earlier."""

    def __init__(self, loss: float):
        if not loss > 0:
            raise ValueError(f"--target_loss must be a positive loss, got {loss}")
        self.loss = loss
        self.reached: dict | None = None
        self.best: float | None = None

    def on_validation_end(self, trainer, pl_module):
        metric = trainer.callback_metrics.get("val/loss")
        if trainer.sanity_checking or metric is None:
            return
        loss = metric.item()
        self.best = loss if self.best is None else min(self.best, loss)
        if self.reached is not None or loss > self.loss:
            return
        wall, train = pl_module.val_started_at
        self.reached = {"step": trainer.global_step, "wall_time_s": wall, "train_time_s": train,
                        "val_loss": loss}
        rank_zero_info(f"\n{self.summary()}")
        for logger in trainer.loggers:
            logger.log_metrics({f"target/{key}": value for key, value in self.reached.items()},
                               step=trainer.global_step)

    def summary(self) -> str:
        if self.reached is None:
            best = f" (best {self.best:.4f})" if self.best is not None else ""
            return f"val/loss has not reached the target {self.loss}{best}"
        r = self.reached
        return (f"Time to val/loss <= {self.loss}: step {r['step']}, {r['train_time_s']:.1f} s of "
                f"training ({r['wall_time_s']:.1f} s wall time with validations; val/loss "
                f"{r['val_loss']:.4f})")

    def state_dict(self) -> dict:
        return {"reached": self.reached, "best": self.best}

    def load_state_dict(self, state_dict: dict) -> None:
        self.reached, self.best = state_dict["reached"], state_dict["best"]


class AtomicCheckpointIO(TorchCheckpointIO):
    """Writes a checkpoint to a temporary file beside it, flushes it to disk, then renames it into
    place: a crash while saving leaves the previous file whole, never a truncated one."""

    def save_checkpoint(self, checkpoint, path, storage_options=None):
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        partial_path = path.with_name(f".{path.name}.partial")
        try:
            with open(partial_path, "wb") as f:
                torch.save(checkpoint, f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(partial_path, path)
        finally:
            partial_path.unlink(missing_ok=True)


class Checkpoint(ModelCheckpoint):
    """Lightning's ModelCheckpoint (here: the best by val/loss, and last.ckpt), with two more
    guarantees.

    - last.ckpt holds the final step: it is saved at the last training batch. (Lightning saves it at
      the end of training only when no validation did, and after the EMA callback has put the
      average in the model.)
    - Ctrl-C or SIGTERM: the current step finishes, last.ckpt is saved and training stops with
      Interrupted; the same command with ``--ckpt_path`` that checkpoint resumes. A second Ctrl-C
      stops at once.
    """

    def on_train_start(self, trainer, pl_module):
        self._signal, self._final_step = None, None
        if threading.current_thread() is threading.main_thread():  # where Python delivers signals
            for signum in (signal.SIGINT, signal.SIGTERM):  # Lightning restores them at teardown
                signal.signal(signum, self._stop_after_this_step)

    def _stop_after_this_step(self, signum, frame):
        self._signal = signum
        if signum == signal.SIGINT:
            signal.signal(signal.SIGINT, signal.default_int_handler)
        rank_zero_info(f"\n{signal.Signals(signum).name}: saving a checkpoint after this step, "
                       f"then stopping (Ctrl-C again to stop at once, without one)")

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        stop = self._signal is not None
        if trainer.world_size > 1:  # one process was signalled: all stop together
            stop = trainer.strategy.reduce_boolean_decision(stop, all=False)
        if stop or trainer.should_stop or 0 <= trainer.max_steps <= trainer.global_step:
            path = os.path.join(self.dirpath, self.CHECKPOINT_NAME_LAST + self.FILE_EXTENSION)
            trainer.save_checkpoint(path)  # a validation at this step may save it again, scored
            self._final_step = trainer.global_step
            if stop:
                raise Interrupted(self._signal or signal.SIGTERM, trainer.global_step, path)

    def on_train_end(self, trainer, pl_module):
        if self._final_step != trainer.global_step:  # ended another way (epochs, time limit)
            super().on_train_end(trainer, pl_module)


# ------------------------------------------------------------------------------------------------
# Run folders and logging


@dataclass
class RunConfig:
    """Where a run's files go and how wandb knows it (the ``run`` section of a config). Each run has
    its own folder, ``{save_dir}/{project}/{name}-{id}``, holding config.yaml, metrics.csv (always
    written, so that runs compare with no wandb account), checkpoints/ and wandb/. Resuming from a
    checkpoint of a run (``--ckpt_path``) continues that run: the same folder, CSV and wandb run.

    Args:
        project: wandb project, and the folder of its runs under ``save_dir``; default
            ``$WANDB_PROJECT``, else ``mini-gpt``.
        name: readable run name; default from the config: file stem, model shape, attention path,
            precision.
        group: wandb group; default ``$WANDB_RUN_GROUP``, else the config file's stem.
        tags: wandb tags; default ``$WANDB_TAGS`` (comma-separated).
        notes: wandb notes.
        entity: wandb user or team; default ``$WANDB_ENTITY``, else your wandb default.
        mode: wandb ``online``, ``offline`` (upload later with ``wandb sync``) or ``disabled``;
            default ``$WANDB_MODE``, else online where a wandb API key is set up, else offline.
        id: run id; default new for each run (a date and 4 random hex digits). Give it to resume a
            wandb run by id, or to share one id between the nodes of a multi-node job.
        save_dir: folder of the projects' run folders.
    """

    project: str | None = None
    name: str | None = None
    group: str | None = None
    tags: list[str] | None = None
    notes: str | None = None
    entity: str | None = None
    mode: Literal["online", "offline", "disabled"] | None = None
    id: str | None = None
    save_dir: str = "runs"

    def with_environment(self, stem: str) -> "RunConfig":
        """The settings the config leaves unset, taken from wandb's environment variables as wandb
        itself would (WANDB_MODE is read by ``wandb_mode``), else from our defaults."""
        env = os.environ.get
        tags = self.tags if self.tags is not None else env("WANDB_TAGS", "").split(",")
        return replace(self, project=self.project or env("WANDB_PROJECT") or "mini-gpt",
                       group=self.group or env("WANDB_RUN_GROUP") or stem,
                       tags=[t.strip() for t in tags if t.strip()],
                       entity=self.entity or env("WANDB_ENTITY"))


def wandb_mode(mode: str | None) -> str | None:
    """The mode to ask wandb for; None lets wandb read $WANDB_MODE."""
    if mode or os.environ.get("WANDB_MODE"):
        return mode
    if os.environ.get("WANDB_API_KEY"):
        return "online"
    try:
        return "online" if netrc.netrc().authenticators("api.wandb.ai") else "offline"
    except (OSError, netrc.NetrcParseError):
        return "offline"


def git_commit() -> str | None:
    """The commit of this code, with ``+dirty`` when tracked files have changed since; None outside
    git."""
    def git(*args):
        return subprocess.run(["git", *args], cwd=Path(__file__).resolve().parent, timeout=10,
                              capture_output=True, text=True, check=True).stdout.strip()
    try:
        dirty = git("status", "--porcelain", "--untracked-files=no")
        return git("rev-parse", "HEAD") + ("+dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return None


class _KeepingWriter(ExperimentWriter):
    def _check_log_dir_exists(self):  # Lightning's warns about, and deletes, an earlier metrics.csv
        pass


class RunCSVLogger(CSVLogger):
    """Lightning's CSVLogger writing ``metrics.csv`` straight into a run folder. Resuming, it keeps
    the rows up to the step it resumes from (Lightning's deletes the file) and drops the later ones,
    which the resumed run logs again."""

    def __init__(self, run_dir: Path, resume_step: int | None = None):
        super().__init__(save_dir=run_dir.parent, name="", version=run_dir.name)
        self.resume_step = resume_step

    @property
    @rank_zero_experiment
    def experiment(self) -> ExperimentWriter:
        if self._experiment is None:
            self._experiment = _KeepingWriter(self.log_dir)
            path = self._experiment.metrics_file_path
            if self.resume_step is not None and os.path.isfile(path):
                with open(path, newline="") as f:
                    reader = csv.DictReader(f)
                    rows = [row for row in reader
                            if row["step"] and int(row["step"]) <= self.resume_step]
                with open(path, "w", newline="") as f:
                    writer = csv.DictWriter(f, fieldnames=reader.fieldnames)
                    writer.writeheader()
                    writer.writerows(rows)
                self._experiment.metrics_keys = list(reader.fieldnames)
        return self._experiment


# wandb run summaries keep the best value of these (and the last): val loss is best low, BLEU high
SUMMARY_METRICS = {"val/loss": "min", "val/ppl": "min", "val/bleu": "max", "val/bleu_lc": "max"}


class SaveRunConfig(SaveConfigCallback):
    """Writes the resolved config into the run folder, as config.yaml (config-resume-N.yaml at the
    N-th resume: nothing is overwritten), and logs it to every logger with the parameter count, the
    device and the git commit, so that runs can be filtered and grouped by any setting."""

    def save_config(self, trainer, pl_module, stage):
        folder = Path(trainer.loggers[0].log_dir)  # the CSV logger's (trainer.log_dir would wait)
        folder.mkdir(parents=True, exist_ok=True)
        path, n = folder / "config.yaml", 0
        while path.exists():
            n += 1
            path = folder / f"config-resume-{n}.yaml"
        self.parser.save(self.config, str(path), skip_unset=False)
        config = json.loads(json.dumps(self.config.as_dict(), default=str))
        config["config_files"] = config.pop("config", None)
        device = device_info(trainer.strategy.root_device.type).describe()
        config.update(n_params=sum(p.numel() for p in pl_module.parameters()),
                      git_commit=git_commit(), device=device,
                      **{f"run_{key}": value for key, value in (pl_module.run_info or {}).items()})
        for logger in trainer.loggers:
            logger.log_hyperparams(config)
            if isinstance(logger, WandbLogger) and trainer.is_global_zero:  # for the runs table
                for metric, best in SUMMARY_METRICS.items():
                    logger.experiment.define_metric(metric, summary=f"{best},last")


# ------------------------------------------------------------------------------------------------
# The CLI and main


def accelerator_device(accelerator) -> DeviceInfo:
    """The device a Trainer ``accelerator`` setting trains on, and what it can do."""
    return device_info(resolve_device(accelerator if isinstance(accelerator, str) else "auto"))


class Trainer(L.Trainer):
    """Lightning's Trainer, whose ``precision`` also takes ``auto`` (the default): bf16-mixed where
    the device computes in bf16, else 16-mixed on GPUs and 32-true on CPUs
    (``model.device.choose_precision``). The CLI resolves ``auto`` before building the Trainer, so
    that the run's config holds the choice."""

    def __init__(self, *args, precision: Literal["auto"] | _PRECISION_INPUT | None = "auto",
                 **kwargs):
        if precision == "auto":
            precision = choose_precision(accelerator_device(kwargs.get("accelerator", "auto")))
        super().__init__(*args, precision=precision, **kwargs)


@dataclass(frozen=True)
class Kind:
    """What a model kind trains with: its LightningModule and data module, and what ``attn_impl:
    auto`` needs to know: the data option that is also the model's longest sequence (linked to the
    model option of the same name), and whether the model masks padded keys."""

    module: type[TrainModule]
    data: type[L.LightningDataModule]
    seq_len: str
    masks_padded_keys: bool


KINDS = {"gpt": Kind(GPTLightningModule, LMDataModule, "block_size", masks_padded_keys=False),
         "seq2seq": Kind(Seq2SeqLightningModule, TranslationDataModule, "max_len",
                         masks_padded_keys=True)}

# Model options a resumed run may change: the attention path and compiling change how it computes,
# not what. Any other model option that differs from the checkpoint's ends the start with a message.
RESUME_MAY_CHANGE = ("config.attn_impl", "compile")
# Model config options a warm start (--model.init_from) sets for itself: how the model computes and
# is regularised, and its initialisation (overwritten by the source's weights), not the shapes of
# its weights. block_size too: up to the source's with learned positions (the table is cut to it).
# The vocabulary is the tokenizer's, which must be the source's. Any other option left at its
# default takes the source's value; set to another value, it ends the start with a message.
WARM_START_MAY_CHANGE = ("dropout", "attn_impl", "block_size", "zero_init_proj", "vocab_size")


def _flat(options: dict, prefix: str = "") -> dict:
    """{"config": {"n_layer": 4}, "lr": 3e-3} -> {"config.n_layer": 4, "lr": 0.003}, with tuples as
    lists (YAML's and a checkpoint's spellings of the same betas compare equal)."""
    flat = {}
    for key, value in options.items():
        if isinstance(value, dict):
            flat.update(_flat(value, f"{prefix}{key}."))
        elif not key.startswith("_"):  # Lightning's _instantiator, _class_path
            flat[f"{prefix}{key}"] = list(value) if isinstance(value, tuple) else value
    return flat


class CLI(LightningCLI):
    """LightningCLI for one kind of ``KINDS``, with what both share: the run folder and wandb
    (``run``, see RunConfig), checkpoints (best by val/loss, and last), the learning rate and
    throughput monitors, ``auto`` precision and attention path, and resuming a run from its
    checkpoint. Loggers given in ``trainer.logger`` are added to the run's CSV and wandb ones.

    Args:
        launcher_run_id: the run id of a multi-process run, which its launcher passes to the
            worker processes in $MINIGPT_RUN_ID (they start from the command line again).
    """

    def __init__(self, *args, launcher_run_id: str | None = None, **kwargs):
        self.launcher_run_id = launcher_run_id
        super().__init__(*args, **kwargs)

    @property
    def kind(self) -> Kind:
        return KINDS[self._model_class.kind]

    def add_arguments_to_parser(self, parser):
        parser.add_argument("--kind", choices=list(KINDS), default="gpt", help="the model to train")
        # the data decides the longest sequence and the vocabulary; the model follows
        seq_len = self.kind.seq_len
        parser.link_arguments(f"data.{seq_len}", f"model.config.{seq_len}")
        parser.link_arguments("data.vocab_size", "model.config.vocab_size", apply_on="instantiate")
        parser.add_class_arguments(RunConfig, "run")
        parser.add_lightning_class_args(Checkpoint, "checkpoint")
        parser.set_defaults({"checkpoint.monitor": "val/loss", "checkpoint.mode": "min",
                             "checkpoint.save_last": True, "checkpoint.filename": "best-{step}"})
        parser.add_lightning_class_args(LearningRateMonitor, "lr_monitor")
        parser.set_defaults({"lr_monitor.logging_interval": "step"})
        parser.add_lightning_class_args(Throughput, "throughput")
        parser.add_argument("--target_loss", type=float | None, default=None,
                            help="report the step and time at which val/loss first reaches this "
                                 "(train.TargetLoss)")

    def before_instantiate_classes(self):
        """Resolve ``auto`` precision and attention path from what the device can do
        (model/device.py), in the config itself: the run's config.yaml and wandb config hold the
        choice, not ``auto``."""
        config = self.config[self.subcommand] if self.subcommand else self.config
        trainer, model_config = config.trainer, config.model.config
        info = accelerator_device(trainer.accelerator)
        resolved = []
        if trainer.precision == "auto":
            trainer.precision = choose_precision(info)
            resolved.append(f"precision auto -> {trainer.precision}")
        elif (warning := slow_precision_warning(info, trainer.precision)) is not None:
            rank_zero_info(f"Warning: {warning}")
        if model_config.attn_impl == "auto":
            model_config.attn_impl = choose_attn_impl(
                info, str(trainer.precision), seq_len=config.data[self.kind.seq_len],
                key_mask=self.kind.masks_padded_keys)
            resolved.append(f"attn_impl auto -> {model_config.attn_impl}")
        choices = f"; {', '.join(resolved)}" if resolved else ""
        rank_zero_info(f"Device: {info.describe()}{choices}")

    # Resuming a run: ``--ckpt_path`` names a checkpoint. Its run continues in the same folder, CSV
    # and wandb run, with the same model and training options. The checkpoint is read once, before
    # anything is built (_parse_ckpt_path): a missing or foreign file, or options that differ from
    # the run's, end the start with a message. instantiate_trainer then finds the run's folder.

    def _parse_ckpt_path(self):
        """Lightning's (it applies the checkpoint's model hyperparameters to the config), after the
        checks above. The checkpoint is kept for instantiate_trainer."""
        subcommand = self.config.get("subcommand")
        ckpt_path = self.config[subcommand].get("ckpt_path") if subcommand else None
        if ckpt_path in ("last", "best", "hpc", "registry"):
            raise ValueError(f"--ckpt_path {ckpt_path}: give the checkpoint's path, e.g. "
                             f"runs/<project>/<run>/checkpoints/last.ckpt. Each run has its own "
                             f"folder, where Lightning's {ckpt_path!r} would find nothing and "
                             f"train from scratch")
        self._checkpoint = self._init_tokenizer = None
        model = self.config[subcommand].model if subcommand else self.config.model
        if not ckpt_path:
            if model.get("init_from"):
                _, self._init_tokenizer = self._take_architecture(model, model.init_from)
            return super()._parse_ckpt_path()
        self._checkpoint = read_checkpoint(ckpt_path, "cpu", self.kind.module.kind)
        if model.get("init_from"):  # a warm-started run resumes: its architecture is in the file
            self._take_architecture(model, ckpt_path)
        ours = _flat(model.as_dict())
        theirs = _flat(self._checkpoint["hyper_parameters"])
        conflicts = [(key, value, ours[key]) for key, value in theirs.items()
                     if key in ours and key not in RESUME_MAY_CHANGE and key != "config.vocab_size"
                     and ours[key] != value]
        if conflicts:
            raise ValueError(self._resume_conflict_message(ckpt_path, conflicts))
        super()._parse_ckpt_path()  # sets the model options to the checkpoint's...
        for key in RESUME_MAY_CHANGE:  # ... but these are how the run computes: the command's win
            if key in ours:
                self.config[subcommand].model[key] = ours[key]

    def _take_architecture(self, model, source: str) -> tuple[dict, dict | None]:
        """A warm start's model options (``model``, a Namespace) take the architecture of
        ``source``: each config option left at its default gets the source's value, and one set
        to another value is an error (but ``WARM_START_MAY_CHANGE``). Returns the source's config
        and tokenizer (``to_dict()``; None for one this project does not know), read without the
        weights."""
        kind, theirs, tokenizer = source_config(source)
        if kind != self.kind.module.kind:
            raise ValueError(f"--model.init_from {source} holds a {kind} model; a "
                             f"{self.kind.module.kind} run cannot start from it")
        ours, defaults = model.config, asdict(GPTConfig())
        conflicts = []
        for key, value in theirs.items():
            if key in WARM_START_MAY_CHANGE or ours[key] == value:
                continue
            if ours[key] == defaults[key]:
                ours[key] = value  # left unset: the source's
            else:
                conflicts.append(f"model.config.{key} is {ours[key]!r} here but {value!r} there")
        if conflicts:
            raise ValueError(f"--model.init_from {source} keeps the architecture of the model it "
                             f"starts from: {'; '.join(conflicts)}. Leave these options out (the "
                             f"source's are taken), or train from scratch without "
                             f"--model.init_from")
        shape = ", ".join(f"{key} {ours[key]}" for key in ("n_layer", "n_head", "n_embd"))
        rank_zero_info(f"Model: the architecture of {source} ({shape}; model.config in the run's "
                       f"config.yaml)")
        if theirs.get("pos_emb", "learned") == "learned" and ours.block_size > theirs["block_size"]:
            raise ValueError(f"--data.block_size {ours.block_size} is longer than the "
                             f"{theirs['block_size']} positions {source} has learned: set "
                             f"--data.block_size {theirs['block_size']} or less")
        return theirs, tokenizer

    def _resume_conflict_message(self, ckpt_path: str, conflicts: list[tuple[str, object, object]]
                                 ) -> str:
        seq_len = self.kind.seq_len  # set through the data option, which is what to name
        option = {f"config.{seq_len}": f"data.{seq_len}"}
        settings = "; ".join(f"{option.get(key, f'model.{key}')} is {ours} here but {theirs} in "
                             f"the checkpoint" for key, theirs, ours in conflicts)
        run_config = Path(ckpt_path).parent.parent / "config.yaml"
        how = (f"--config {run_config} (the run's own config)" if run_config.is_file()
               else "the options the run was started with")
        return (f"--ckpt_path {ckpt_path} resumes a run with other settings: {settings}. A resumed "
                f"run keeps its model and training options: resume with {how}, or start a new run "
                f"without --ckpt_path to train with the new ones")

    def _resumed_run(self, ckpt_path: str | None) -> tuple[dict, int] | None:
        """The id, name and folder of the run that wrote the checkpoint a fit resumes from, and its
        step; None to start a new run."""
        info = self._checkpoint.get("run") if ckpt_path else None
        if info is None:  # no checkpoint, or one written outside a run folder
            return None
        if Path(ckpt_path).parent.name == "checkpoints":  # the run's folder, wherever it now is
            info = {**info, "dir": str(Path(ckpt_path).parent.parent)}
        return info, self._checkpoint["global_step"]

    def instantiate_trainer(self, **kwargs):
        """The Trainer, logging into the run's folder: a new one, or that of the run a fit
        resumes."""
        config = self.config_init[self.subcommand] if self.subcommand else self.config_init
        files = config.get("config") or []
        stem = Path(str(files[-1])).stem if files else self.model.kind
        run: RunConfig = config.run.with_environment(stem)
        name = run.name or (f"{stem}-{self.model.shape}-{self.model.model.config.attn_impl}-"
                            f"{config.trainer.get('precision') or '32'}")
        run_id = (run.id or self.launcher_run_id
                  or f"{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(2)}")
        run_dir = Path(run.save_dir) / run.project / (re.sub(r"[^\w.+-]", "_", name) + f"-{run_id}")
        resumed = self._resumed_run(config.get("ckpt_path")) if self.subcommand == "fit" else None
        if resumed:
            run_id, name, run_dir = resumed[0]["id"], resumed[0]["name"], Path(resumed[0]["dir"])
        if self._checkpoint is not None and "tokenizer" in self._checkpoint:
            ours = getattr(self.datamodule, "tokenizer", None)
            if ours is not None and ours.to_dict() != self._checkpoint["tokenizer"]:
                raise ValueError(f"{config.ckpt_path} was trained with another vocabulary than "
                                 f"this data's tokenizer ({ours.vocab_size} tokens): use it with "
                                 f"the data and --data.tokenizer it was trained with")
        elif self.model.hparams.get("init_from"):  # a warm start: the data must speak its tokens
            self._check_init_tokenizer(self.model.hparams.init_from)
        if self._checkpoint is None and run_dir.exists() and not self.launcher_run_id:
            raise ValueError(f"the run folder {run_dir} exists already: choose another --run.id, "
                             f"or resume that run with --ckpt_path {run_dir}/checkpoints/last.ckpt")
        # the folder itself is made when training sets up (SaveRunConfig), so that bad input
        # leaves none behind
        self.run_dir, self.resumed = run_dir, resumed is not None
        self.model.run_info = {"id": run_id, "name": name, "dir": str(run_dir)}
        checkpoint = config.get("checkpoint")
        if checkpoint is not None and checkpoint.dirpath is None:
            checkpoint.dirpath = str(run_dir / "checkpoints")
        loggers = [RunCSVLogger(run_dir, resume_step=resumed[1] if resumed else None),
                   WandbLogger(name=name, project=run.project, id=run_id, save_dir=str(run_dir),
                               group=run.group, tags=run.tags, notes=run.notes, entity=run.entity,
                               mode=wandb_mode(run.mode), job_type=self.subcommand or "fit"),
                   *_as_list(config.trainer.get("logger"))]
        rank_zero_info(f"Run {name}, id {run_id}: {run_dir}"
                       + (f" (resumed at step {resumed[1]})" if resumed else ""))
        plugins = _as_list(config.trainer.get("plugins"))
        if not any(isinstance(plugin, CheckpointIO) for plugin in plugins):
            plugins.append(AtomicCheckpointIO())
        callbacks = _as_list(config.trainer.get("callbacks"))
        if config.get("target_loss") is not None:
            callbacks.append(TargetLoss(config.target_loss))
        if config.trainer.get("enable_progress_bar") is not False and \
                not any(isinstance(callback, ProgressBar) for callback in callbacks):
            # the bar redraws when the loggers write, not at every step: on the CPU config a
            # redraw per step cost 1.1 ms of a 69 ms step (docs/speed.md)
            callbacks.append(TQDMProgressBar(refresh_rate=config.trainer.log_every_n_steps or 1))
        return super().instantiate_trainer(**{**kwargs, "logger": loggers, "plugins": plugins,
                                              "callbacks": callbacks})

    def _check_init_tokenizer(self, source: str):
        ours = getattr(self.datamodule, "tokenizer", None)
        if ours is None or ours.to_dict() == self._init_tokenizer:
            return
        if self._init_tokenizer is None:
            raise ValueError(f"--model.init_from {source} has a vocabulary of "
                             f"{self.model.model.config.vocab_size} tokens and no tokenizer this "
                             f"project knows, so no data can be tokenized for it")
        theirs = self._init_tokenizer["name"]
        if theirs == ours.name:  # characters: each text has its own vocabulary
            raise ValueError(f"--model.init_from {source} was trained on another character "
                             f"vocabulary than this data's ({ours.vocab_size} characters): the "
                             f"tokenizer comes with the weights; start from it on text of the "
                             f"same characters (such as the text it was trained on)")
        raise ValueError(f"--model.init_from {source} reads {theirs} tokens, but the data is "
                         f"tokenized with --data.tokenizer {ours.name}: the tokenizer comes with "
                         f"the weights; set --data.tokenizer {theirs}")

    def _run_subcommand(self, subcommand):
        # The worker processes of a multi-process run start from the command line again and take
        # this run's id from the environment (make_cli): set for as long as the run lasts only,
        # so that a later CLI in this process (or one built without running) starts its own run.
        os.environ["MINIGPT_RUN_ID"] = self.model.run_info["id"]
        try:
            if self.model.hparams.get("init_from") and not self.config_init[subcommand].ckpt_path:
                self.model.warm_start()  # (a resumed run's weights are its checkpoint's)
            super()._run_subcommand(subcommand)
        except BaseException:  # interrupted, or failed: close the wandb run as failed
            self.finish_run(exit_code=1)  # (a resume reopens it)
            if not self.resumed and self.trainer.global_step == 0 and self.trainer.is_global_zero:
                shutil.rmtree(self.run_dir, ignore_errors=True)  # a failed start leaves no folder
            raise
        finally:
            os.environ.pop("MINIGPT_RUN_ID", None)

    def after_fit(self):
        ckpt = self.trainer.checkpoint_callback
        if ckpt is not None and ckpt.best_model_path:
            rank_zero_info(f"Best checkpoint: {ckpt.best_model_path} "
                           f"(val/loss {ckpt.best_model_score:.4f})")
        self.model.evaluate_after_fit()
        for callback in self.trainer.callbacks:
            if isinstance(callback, TargetLoss):
                rank_zero_info(callback.summary())
        self.finish_run()

    def after_validate(self):
        self.finish_run()

    def after_test(self):
        self.finish_run()

    def finish_run(self, exit_code: int = 0):
        """Flush the loggers and close the wandb run (the next run in this process gets its own)."""
        for logger in self.trainer.loggers:
            started = getattr(logger, "_experiment", True) is not None  # never start one to end it
            if started:
                logger.save()
            if started and isinstance(logger, WandbLogger) and self.trainer.is_global_zero:
                logger.experiment.finish(exit_code=exit_code)
                # finish() can return before wandb's service has written the last records of the
                # run's .wandb file (measured: 3 of 30 offline runs read short right after it);
                # stopping the service flushes it, so the file is whole when this run returns.
                import wandb  # (imported already, by the logger)

                wandb.teardown()


def _as_list(value) -> list:
    """A Trainer option that takes one object or a list of them (None, or a bool, is none)."""
    if value is None or isinstance(value, bool):
        return []
    return list(value) if isinstance(value, list) else [value]


def model_kind(args: list[str]) -> str:
    """The ``kind`` the command line asks for, read before the CLI is built (the kind picks its
    classes): ``--kind K``, else the last ``--config`` file that sets one, else ``gpt``."""
    kind = "gpt"
    for i, arg in enumerate(args):
        flag, equals, value = arg.partition("=")
        if not equals:  # "--config FILE" rather than "--config=FILE"
            value = args[i + 1] if i + 1 < len(args) else ""
        if flag == "--config" and Path(value).is_file():
            with open(value) as f:
                config = yaml.safe_load(f)
            kind = config.get("kind", kind) if isinstance(config, dict) else kind
        elif flag == "--kind" and value:
            kind = value
    if kind not in KINDS:
        raise ValueError(f"unknown kind {kind!r}; choose one of {', '.join(KINDS)}")
    return kind


TRAINER_DEFAULTS = {
    "max_steps": 5000,
    "val_check_interval": 250,  # training batches between validations
    "check_val_every_n_epoch": None,  # the training stream is endless: validate by steps only
    "gradient_clip_val": 1.0,
    "log_every_n_steps": 10,
}


def make_cli(args: list[str] | None = None, run: bool = True) -> CLI:
    """train.py's CLI for ``args`` (default: the command line). ``run=False`` builds the model, data
    module and Trainer without training (``args`` then has no ``fit``), as scripts/bench_train.py
    does."""
    kind = KINDS[model_kind(sys.argv[1:] if args is None else args)]
    keep_freed_memory()  # big CPU tensors reused, not paged in at every step (scripts/_common.py)
    return CLI(kind.module, kind.data, trainer_class=Trainer, seed_everything_default=1337, run=run,
               trainer_defaults=TRAINER_DEFAULTS, args=args, save_config_callback=SaveRunConfig,
               save_config_kwargs={"save_to_log_dir": False},
               launcher_run_id=os.environ.pop("MINIGPT_RUN_ID", None))


def main(args: list[str] | None = None) -> CLI:
    torch.set_float32_matmul_precision("high")  # TF32 matmuls on GPUs that have them
    return make_cli(args)


def cli(args: list[str] | None = None) -> int:
    """``main`` as a command: bad input ends in one line (scripts/_common.py), Ctrl-C and SIGTERM in
    a message and the exit status of a signalled process, after saving a checkpoint."""
    try:
        return exit_code(lambda: main(args))
    except Interrupted as e:
        print(str(e), file=sys.stderr)
        return 128 + e.signum


if __name__ == "__main__":
    sys.exit(cli())
