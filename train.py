"""Train a GPT with Lightning from the command line.

    python train.py fit --config configs/shakespeare_char_cpu.yaml --data.source path/to/input.txt
    python train.py fit --config configs/shakespeare_char_cpu.yaml --model.config.n_layer 2 --trainer.max_steps 500
    python train.py fit --config configs/shakespeare_char_cpu.yaml --print_config
    python train.py fit --config configs/shakespeare_char_cpu.yaml --ckpt_path runs/.../checkpoints/last.ckpt

Options come from the YAML files in configs/ and can be overridden on the command line, later flags winning.
"""

import math
import os
import sys
from dataclasses import asdict
from functools import partial
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.callbacks import LearningRateMonitor, ModelCheckpoint, ThroughputMonitor
from lightning.pytorch.cli import LightningCLI
from lightning.pytorch.loggers import WandbLogger
from lightning.pytorch.plugins.precision import MixedPrecision
from lightning.pytorch.utilities import rank_zero_info
from torch import nn

from data import LMDataModule, tokenizer_from_dict
from model import GPT, GPTConfig


def warmup_cosine(step: int, warmup_steps: int, decay_steps: int, min_ratio: float) -> float:
    """LR multiplier: linear warmup to 1, cosine decay to ``min_ratio`` at ``decay_steps``, then flat."""
    if step < warmup_steps:
        return (step + 1) / (warmup_steps + 1)
    if step >= decay_steps:
        return min_ratio
    progress = (step - warmup_steps) / max(1, decay_steps - warmup_steps)
    return min_ratio + 0.5 * (1.0 + math.cos(math.pi * progress)) * (1.0 - min_ratio)


def param_groups(module: nn.Module, weight_decay: float) -> list[dict]:
    """AdamW groups: weight decay on weight matrices only, not on biases, norms or embeddings."""
    embeddings = {id(m.weight) for m in module.modules() if isinstance(m, nn.Embedding)}
    params = list(module.parameters())  # tied weights appear once
    decay = [p for p in params if p.dim() >= 2 and id(p) not in embeddings]
    no_decay = [p for p in params if p.dim() < 2 or id(p) in embeddings]
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


class GPTLightningModule(L.LightningModule):
    """Trains ``model.GPT``: AdamW, linear warmup then cosine decay to ``min_lr``, stepped per optimizer step.

    Args:
        config: the model's shape (``vocab_size`` and ``block_size`` come from the data).
        lr: peak learning rate, reached after ``warmup_steps``.
        min_lr: learning rate at the end of the decay.
        warmup_steps: optimizer steps of linear warmup.
        lr_decay_steps: optimizer step where the cosine reaches ``min_lr``; default ``trainer.max_steps``.
        weight_decay: AdamW weight decay of the weight matrices.
        betas: AdamW betas.
        compile: compile the model with ``torch.compile`` (in place: checkpoint keys are unchanged).
        val_samples: samples generated at each validation (0: none), logged as text and, with wandb, a table.
        val_sample_tokens: tokens per sample.
    """

    def __init__(self, config: GPTConfig = GPTConfig(), lr: float = 1e-3, min_lr: float = 1e-4,
                 warmup_steps: int = 100, lr_decay_steps: int | None = None, weight_decay: float = 0.1,
                 betas: tuple[float, float] = (0.9, 0.95), compile: bool = False, val_samples: int = 2,
                 val_sample_tokens: int = 200):
        super().__init__()
        if isinstance(config, dict):  # from a checkpoint's hyperparameters
            config = GPTConfig(**config)
        self.save_hyperparameters(ignore=["config"])
        self.hparams["config"] = asdict(config)  # a plain dict: checkpoints load without our classes
        self.model = GPT(config)
        self.tokenizer = None  # taken from the data module; saved in every checkpoint
        self._flops_shape = None

    def setup(self, stage: str):
        tokenizer = getattr(self.trainer.datamodule, "tokenizer", None)
        if tokenizer is not None:
            if tokenizer.vocab_size != self.model.config.vocab_size:
                raise ValueError(f"the data's tokenizer has {tokenizer.vocab_size} tokens but the model was built "
                                 f"for {self.model.config.vocab_size}; train and resume with the same tokenizer")
            self.tokenizer = tokenizer

    def configure_model(self):
        if self.hparams.compile:
            self.model.compile()  # nn.Module.compile: no "_orig_mod." prefixes in the state dict

    def on_train_batch_start(self, batch, batch_idx):
        x, _ = batch
        if x.shape != self._flops_shape:  # read by Throughput; counting parameters every step costs time
            self._flops_shape, self.flops_per_batch = x.shape, self.model.flops_per_token(x.size(1)) * x.numel()

    def training_step(self, batch, batch_idx):
        x, y = batch
        _, loss = self.model(x, y)
        self.log("train/loss", loss, prog_bar=True)
        return loss

    def validation_step(self, batch, batch_idx):
        x, y = batch
        _, loss = self.model(x, y)
        self.log("val/loss", loss, prog_bar=True, sync_dist=True, batch_size=x.size(0))

    def on_validation_epoch_end(self):
        hp = self.hparams
        if self.trainer.sanity_checking or self.tokenizer is None or hp.val_samples < 1 \
                or not self.trainer.is_global_zero:
            return
        start = torch.full((hp.val_samples, 1), self.tokenizer.start_token, device=self.device)
        generator = torch.Generator(self.device).manual_seed(0)  # the same draws at every validation
        tokens = self.model.generate(start, hp.val_sample_tokens, temperature=0.8, top_k=200, generator=generator)
        texts = [self.tokenizer.decode(row[1:].tolist()) for row in tokens]
        rank_zero_info(f"\nSamples at step {self.global_step}:\n" + "\n---\n".join(texts))
        for logger in self.loggers:
            if isinstance(logger, WandbLogger):
                logger.log_text("val/samples", columns=["step", "sample"], data=[[self.global_step, t] for t in texts])

    def configure_optimizers(self):
        hp = self.hparams
        decay_steps = hp.lr_decay_steps or self.trainer.max_steps
        if decay_steps is None or decay_steps < 1:
            raise ValueError("the learning-rate schedule needs a length: set --trainer.max_steps or "
                             "--model.lr_decay_steps")
        # fused: one kernel for all parameters (7x faster optimizer steps on CPU). Lightning refuses to clip
        # the gradients of a fused optimizer under mixed precision, so AMP runs take the multi-tensor (foreach)
        # one, which is not PyTorch's default on CPU (that is a Python loop over the parameters).
        mixed = isinstance(self.trainer.precision_plugin, MixedPrecision)
        fused = self.device.type in ("cuda", "cpu") and not mixed
        optimizer = torch.optim.AdamW(param_groups(self.model, hp.weight_decay), lr=hp.lr, betas=tuple(hp.betas),
                                      fused=fused, foreach=not fused)
        schedule = partial(warmup_cosine, warmup_steps=hp.warmup_steps, decay_steps=decay_steps,
                           min_ratio=hp.min_lr / hp.lr)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def on_save_checkpoint(self, checkpoint):
        if self.tokenizer is not None:
            checkpoint["tokenizer"] = self.tokenizer.to_dict()

    def on_load_checkpoint(self, checkpoint):
        if "tokenizer" in checkpoint:
            self.tokenizer = tokenizer_from_dict(checkpoint["tokenizer"])


def load_gpt_checkpoint(path: str, device: str = "cpu"):
    """The GPT (in eval mode) and tokenizer of a checkpoint written by train.py; nothing else needed.
    Raises ValueError, saying why, for a missing, unreadable or foreign file."""
    if not Path(path).is_file():
        raise ValueError(f"no checkpoint at {path}")
    try:
        ckpt = torch.load(path, map_location=device, weights_only=True)
    except Exception as e:
        raise ValueError(f"{path} is not a readable checkpoint ({type(e).__name__}); is the file complete, "
                         f"and was it written by train.py?") from None
    config = ckpt.get("hyper_parameters", {}).get("config") if isinstance(ckpt, dict) else None
    if config is None or "tokenizer" not in ckpt or "state_dict" not in ckpt:
        raise ValueError(f"{path} is not a GPT checkpoint of this project (it has no model config or tokenizer)")
    model = GPT(GPTConfig(**config))
    model.load_state_dict({k.removeprefix("model."): v for k, v in ckpt["state_dict"].items()})
    return model.to(device).eval(), tokenizer_from_dict(ckpt["tokenizer"])


class Throughput(ThroughputMonitor):
    """Logs tokens/s (``train/device/items_per_sec``) every log interval and, where the device's peak
    FLOP/s is known, MFU (``train/device/mfu``): from Lightning's table of common GPUs, or ``peak_flops``
    (FLOP/s of one device at the training precision) when given, e.g. for a CPU.

    Args:
        peak_flops: peak FLOP/s of one device; overrides the table.
        window_size: batches averaged over.
    """

    def __init__(self, peak_flops: float | None = None, window_size: int = 50):
        super().__init__(batch_size_fn=lambda batch: batch[0].size(0), length_fn=lambda batch: batch[0].numel(),
                         window_size=window_size)
        self.peak_flops = peak_flops

    def setup(self, trainer, pl_module, stage):
        super().setup(trainer, pl_module, stage)
        if self.peak_flops:
            self.available_flops = self.peak_flops
            for throughput in self._throughputs.values():
                throughput.available_flops = self.peak_flops


class GPTCLI(LightningCLI):
    def add_arguments_to_parser(self, parser):
        # the data decides the context length and the vocabulary; the model follows
        parser.link_arguments("data.block_size", "model.config.block_size")
        parser.link_arguments("data.vocab_size", "model.config.vocab_size", apply_on="instantiate")
        parser.add_lightning_class_args(ModelCheckpoint, "checkpoint")
        parser.set_defaults({"checkpoint.monitor": "val/loss", "checkpoint.mode": "min",
                             "checkpoint.save_last": True, "checkpoint.filename": "best-{step}"})
        parser.add_lightning_class_args(LearningRateMonitor, "lr_monitor")
        parser.set_defaults({"lr_monitor.logging_interval": "step"})
        parser.add_lightning_class_args(Throughput, "throughput")

    def after_fit(self):
        ckpt = self.trainer.checkpoint_callback
        if ckpt is not None and ckpt.best_model_path:
            rank_zero_info(f"Best checkpoint: {ckpt.best_model_path} (val/loss {ckpt.best_model_score:.4f})")


TRAINER_DEFAULTS = {
    "max_steps": 5000,
    "val_check_interval": 250,  # training batches between validations
    "check_val_every_n_epoch": None,  # the training stream is endless: validate by steps only
    "gradient_clip_val": 1.0,
    "log_every_n_steps": 10,
    "logger": {"class_path": "lightning.pytorch.loggers.CSVLogger", "init_args": {"save_dir": "runs", "name": "gpt"}},
}


def main(args=None):
    torch.set_float32_matmul_precision("high")  # TF32 matmuls on GPUs that have them
    return GPTCLI(GPTLightningModule, LMDataModule, seed_everything_default=1337, trainer_defaults=TRAINER_DEFAULTS,
                  args=args)


if __name__ == "__main__":
    try:
        main()
    except (ValueError, FileNotFoundError) as e:  # bad input: say what and how to fix, not a traceback
        if os.environ.get("MINIGPT_TRACEBACK"):
            raise
        sys.exit(f"error: {e}\n(set MINIGPT_TRACEBACK=1 to see the traceback)")
