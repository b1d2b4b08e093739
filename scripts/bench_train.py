"""Training speed of a config across attention paths and precisions (and torch.compile), against the
fastest of them and against a bare PyTorch loop doing the same work.

    python scripts/bench_train.py              # the CPU config on the shipped Tiny Shakespeare
    python scripts/bench_train.py --variants auto:auto sdpa:32-true naive:bf16-mixed --steps 50
    python scripts/bench_train.py --config configs/shakespeare_char.yaml --device cuda \\
        --variants auto:auto sdpa:bf16-mixed flash:bf16-mixed sdpa:bf16-mixed:compile
    python scripts/bench_train.py --variants auto:auto --peak-flops 1.2e12  # MFU on a CPU

A variant is ATTN_IMPL:PRECISION[:compile]; ``auto`` resolves as train.py resolves it for the device
(model/device.py), and the table shows what it became. Each variant is trained --repeats times two
ways, alternating, for --warmup + --steps optimizer steps, and the best run of each way counts:
through train.py's Lightning path (its CLI, callbacks and loggers as a run has them, wandb offline;
no validation; one checkpoint at the end) and through a bare loop that does the same work (same
module, optimizer, LR schedule, clipping, autocast, batches, gradient accumulation). Times are over
the last --steps steps.
MFU is the Lightning loop's tokens/s times the model's training FLOPs per token
(``GPT.flops_per_token``), over the dense peak FLOP/s of one device at the variant's precision:
model/device.py's table of GPUs, or --peak-flops (which a CPU needs).
Flags this script does not know go to train.py's CLI (e.g. --model.config.n_layer 2). Prints a
markdown table and the machine it ran on.
"""

import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository: model/, data/
# first: Ctrl-C while the libraries below load ends in one line
from training.errors import ArgumentParser, exit_at_once_on_ctrl_c, exit_code  # isort: split

if __name__ == "__main__":
    exit_at_once_on_ctrl_c()

import lightning as L
import torch

import train
from model.device import device_info, peak_flops
from scripts._common import add_device_argument, pick_device
from training.command import model_kind

REPO = Path(__file__).resolve().parents[1]
DEFAULT_VARIANTS = ["auto:auto", "naive:32-true", "sdpa:32-true", "flash:32-true",
                    "naive:bf16-mixed", "sdpa:bf16-mixed", "flash:bf16-mixed"]
AUTOCAST = {"bf16-mixed": torch.bfloat16, "16-mixed": torch.float16}


class StepClock(L.Callback):
    """Time at the end of every optimizer step: of every training batch, or with gradient
    accumulation, of the last batch of each step."""

    def __init__(self):
        self.times, self._step = [], 0

    def on_train_batch_end(self, trainer, *args):
        if trainer.global_step != self._step:  # this batch ended an optimizer step
            self._step = trainer.global_step
            self.times.append(time.perf_counter())


def build(args, attn_impl: str, precision: str, compile: bool):
    """The objects train.py would build for this variant (extra train.py flags last: they win)."""
    overrides = ["--config", args.config, "--model.config.attn_impl", attn_impl,
                 "--model.compile", str(compile).lower(), "--trainer.precision", precision,
                 "--trainer.accelerator", args.device,
                 "--trainer.max_steps", str(args.warmup + args.steps),
                 "--trainer.limit_val_batches", "0", "--checkpoint.monitor", "null",
                 "--checkpoint.save_last", "false", "--run.save_dir", args.run_dir,
                 *(["--data.source", args.source] if args.source else []), *args.train_flags]
    return train.main(overrides, run=False)


def ms_per_step(times: list[float], steps: int) -> float:
    return 1000 * (times[-1] - times[-1 - steps]) / steps


def mfu(tokens_per_s: float, flops_per_token: float, peak: float | None) -> float | None:
    """Model FLOPs utilization: the FLOP/s the model's arithmetic needs at this speed, over the
    device's peak FLOP/s; None where the peak is unknown."""
    return None if peak is None else tokens_per_s * flops_per_token / peak


def lightning_run(args, variant) -> tuple[float, str, str, int, int, float | None]:
    """ms per optimizer step through Lightning, the resolved attention path and precision, tokens
    per step (every batch's, with gradient accumulation), training FLOPs per token, and the peak
    GPU memory allocated in GiB (None on other devices)."""
    cli = build(args, *variant)
    clock = StepClock()
    cli.trainer.callbacks.append(clock)
    if args.device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    cli.trainer.fit(cli.model, cli.datamodule)
    memory = torch.cuda.max_memory_allocated() / 2**30 if args.device == "cuda" else None
    x, _ = next(iter(cli.datamodule.train_dataloader()))
    return (ms_per_step(clock.times, args.steps), cli.model.model.config.attn_impl,
            str(cli.trainer.precision), x.numel() * cli.trainer.accumulate_grad_batches,
            cli.model.model.flops_per_token(x.size(1)), memory)


def bare_run(args, variant) -> float:
    """What the Lightning step does, written out: forward under autocast and backward (for each
    batch a step accumulates), clip, step, schedule."""
    cli = build(args, *variant)
    module, dm, trainer = cli.model.to(args.device), cli.datamodule, cli.trainer
    dm.setup("fit")
    module.trainer = trainer  # configure_optimizers reads max_steps and the precision here
    module.configure_model()
    optimizers = module.configure_optimizers()
    optimizer, scheduler = optimizers["optimizer"], optimizers["lr_scheduler"]["scheduler"]
    dtype = AUTOCAST.get(str(trainer.precision))
    autocast = torch.autocast(args.device, dtype=dtype or torch.float32, enabled=dtype is not None)
    scaler = torch.amp.GradScaler(args.device, enabled=dtype == torch.float16)
    batches = iter(dm.train_dataloader())
    module.train()
    times, accumulate = [], trainer.accumulate_grad_batches
    for _ in range(args.warmup + args.steps):
        for _ in range(accumulate):  # the step's gradient: the mean over its batches
            x, y = (t.to(args.device, non_blocking=True) for t in next(batches))
            with autocast:
                _, loss = module.model(x, y)
            scaler.scale(loss / accumulate).backward()
        scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(module.parameters(), trainer.gradient_clip_val)
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        scheduler.step()
        loss.item()  # as logging the loss does
        if args.device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter())
    return ms_per_step(times, args.steps)


def parse_args(argv):
    p = ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default=str(REPO / "configs" / "shakespeare_char_cpu.yaml"))
    p.add_argument("--source", default=None,
                   help="training text, as --data.source (default: the config's)")
    p.add_argument("--variants", nargs="+", default=DEFAULT_VARIANTS,
                   help="ATTN_IMPL:PRECISION[:compile] ...")
    add_device_argument(p)
    p.add_argument("--steps", type=int, default=100, help="timed optimizer steps")
    p.add_argument("--warmup", type=int, default=20,
                   help="untimed steps first (compilation happens here)")
    p.add_argument("--repeats", type=int, default=3, help="runs of each loop; the best counts")
    p.add_argument("--threads", type=int, default=None,
                   help="torch threads (default: torch's own choice)")
    p.add_argument("--peak-flops", type=float, default=None,
                   help="peak FLOP/s of one device, for every variant's MFU (default: "
                        "model/device.py's table of GPUs, at each variant's precision; a CPU "
                        "needs it, e.g. 1.2e12)")
    args, args.train_flags = p.parse_known_args(argv)  # the rest goes to train.py's CLI
    if not Path(args.config).is_file():
        p.error(f"--config {args.config}: no such file")
    kind = model_kind(["--config", args.config, *args.train_flags], train.KINDS)  # as train.py
    if kind != "gpt":
        p.error(f"the run trains a {kind} model (--config {args.config} or --kind); this "
                "script times the GPT's training only (a translation run logs its training "
                "time, val/train_time_s, at every validation)")
    for spec in args.variants:
        parts = spec.split(":")
        if len(parts) not in (2, 3) or parts[2:] not in ([], ["compile"]):
            p.error(f"variant {spec!r}: write ATTN_IMPL:PRECISION or ATTN_IMPL:PRECISION:compile, "
                    f"e.g. sdpa:32-true or auto:auto")
    if args.steps < 1 or args.warmup < 0 or args.repeats < 1:
        p.error("--steps and --repeats must be at least 1, --warmup at least 0")
    if args.peak_flops is not None and not 0 < args.peak_flops < float("inf"):
        p.error(f"--peak-flops {args.peak_flops:g}: give one device's peak FLOP/s, above 0 "
                f"(e.g. 1.2e12)")
    return args


def main(argv=None):
    args = parse_args(argv)
    args.device = pick_device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    os.environ.setdefault("WANDB_MODE", "offline")  # a benchmark's runs stay here, quietly
    os.environ.setdefault("WANDB_SILENT", "true")
    args.run_dir = tempfile.mkdtemp(prefix="bench_train-")  # its run folders are thrown away
    rows = []
    try:
        for spec in args.variants:
            attn_impl, precision, *rest = spec.split(":")
            variant = (attn_impl, precision, rest == ["compile"])
            lightning, bare = [], []
            for _ in range(args.repeats):  # alternate, keep each one's best: noise only slows
                ms, resolved_attn, resolved_precision, tokens, flops_per_token, memory = \
                    lightning_run(args, variant)
                lightning.append(ms)
                bare.append(bare_run(args, variant))
            rows.append((spec, resolved_attn, resolved_precision, variant[2], min(lightning),
                         min(bare), tokens, flops_per_token, memory))
    finally:
        shutil.rmtree(args.run_dir, ignore_errors=True)

    fastest = min(row[4] for row in rows if not row[3])  # among the eager variants
    info = device_info(args.device)
    print(f"\n{Path(args.config).name}, {info.describe()}, {torch.get_num_threads()} threads, "
          f"torch {torch.__version__}; {args.steps} timed steps after {args.warmup}, "
          f"best of {args.repeats}\n")
    print("| variant | attn_impl | precision | compile | ms/step | tokens/s | MFU | GPU memory "
          "| bare loop ms/step | Lightning overhead | vs fastest |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    tf32 = torch.get_float32_matmul_precision() != "highest"  # as train.py set it
    unknown = []  # precisions with no peak
    for spec, attn_impl, precision, compiled, ms, bare_ms, tokens, flops_per_token, memory in rows:
        overhead = 100 * (ms - bare_ms) / bare_ms
        peak = args.peak_flops or peak_flops(info.name, precision, tf32=tf32)
        utilization = mfu(1000 * tokens / ms, flops_per_token, peak)
        if utilization is None and precision not in unknown:
            unknown.append(precision)
        print(f"| {spec} | {attn_impl} | {precision} | {'yes' if compiled else 'no'} | "
              f"{ms:.1f} | {1000 * tokens / ms:,.0f} | "
              f"{'-' if utilization is None else f'{100 * utilization:.3g}%'} | "
              f"{'-' if memory is None else f'{memory:.1f} GiB'} | {bare_ms:.1f} | "
              f"{overhead:+.1f}% | {ms / fastest:.2f}x |")
    # (every variant trains the same model: one count)
    print(f"\nFLOPs per token (training, 6N + 12·L·C·T): {rows[0][7]:,}")
    if unknown:
        print(f"MFU: no peak FLOP/s known for {info.name} at {', '.join(unknown)}; give one "
              f"device's peak with --peak-flops (e.g. --peak-flops 1.2e12)")

if __name__ == "__main__":
    sys.exit(exit_code(main))
